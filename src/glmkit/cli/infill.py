"""`glmkit infill [MODEL] TEXT`: fill every [MASK] of TEXT (GLM blank infilling; ChatGLM-6B-architecture
models). --ids takes comma-separated token ids instead of text, for models without a tokenizer."""

from __future__ import annotations

import argparse

from glmkit.cli.common import add_model_args, add_sampling_args, load_model, sampling


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("text", help='text with one or more [MASK], e.g. "北京是[MASK]的首都。"')
    parser.add_argument("--ids", action="store_true", help="TEXT is comma-separated token ids")
    add_sampling_args(parser, max_tokens=64)


def main(args: argparse.Namespace) -> int:
    llm = load_model(args)
    prompt = [int(t) for t in args.text.split(",")] if args.ids else args.text
    out = llm.infill(prompt, **sampling(args))
    print(",".join(map(str, out)) if args.ids else out)
    return 0
