"""`glmkit compile [MODEL]`: compile the one-token decode step ahead of time, so that later runs with
--compile find the package in $GLMKIT_HOME/compiled and start decoding compiled in a second or two.
"""

from __future__ import annotations

import argparse

from glmkit.cli.common import add_model_args, load_model


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)


def main(args: argparse.Namespace) -> int:
    from glmkit.errors import GlmkitError

    args.eager = True  # compiled below, in the foreground
    llm = load_model(args)
    decoder = llm.compile()
    if not decoder.ready:
        raise GlmkitError(f"compiling failed ({decoder.error}); eager decoding still works.")
    verb = "found the compiled decode step" if decoder.cached else "compiled the decode step"
    print(f"{verb} of {args.model} in {decoder.seconds:.1f} s: {decoder.path}")
    return 0
