"""`glmkit compile [MODEL]`: compile the one-token decode step ahead of time, so that later runs with
--compile find it in the on-disk cache ($GLMKIT_HOME/inductor) and start decoding compiled in seconds.
"""

from __future__ import annotations

import argparse

from glmkit.cli.common import add_model_args, load_model


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)


def main(args: argparse.Namespace) -> int:
    from glmkit.engine.compiled import inductor_cache_dir
    from glmkit.errors import GlmkitError

    args.compile = False
    llm = load_model(args)
    decoder = llm.compile()
    if not decoder.ready:
        raise GlmkitError(f"compiling failed ({decoder.error}); eager decoding still works.")
    print(f"compiled the decode step of {args.model} in {decoder.seconds:.0f} s; cached in {inductor_cache_dir()}")
    return 0
