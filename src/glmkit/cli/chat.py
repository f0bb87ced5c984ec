"""`glmkit chat [MODEL]`: interactive chat in the terminal.

The chat loop needs a tokenizer, the chat formats and the generation engine; until those land this
command says so plainly instead of starting a half-working session.
"""

from __future__ import annotations

import argparse
import sys


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="checkpoint directory, .gguf file or alias (default: smollm2-135m-instruct)")


def main(args: argparse.Namespace) -> int:
    print("glmkit chat: interactive chat is not available in this version yet: it needs the tokenizers, chat "
          "formats and generation engine that are still being built. What works today: "
          "`python -c \"import glmkit; print(glmkit.load('CHECKPOINT_DIR').logits([[1, 2, 3]]))\"`.",
          file=sys.stderr)
    return 1
