"""`glmkit ppl [MODEL] FILE --ctx N`: perplexity of a text file by llama.cpp's llama-perplexity protocol.

Prints the running estimate per chunk as llama.cpp does ([1]12.3456,[2]...) and ends with `PPL = <value>`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glmkit.cli.common import add_model_args, load_model


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("file", help="a UTF-8 text file")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per chunk (llama.cpp's -c; default 512)")


def main(args: argparse.Namespace) -> int:
    from glmkit.errors import GlmkitError, read_utf8

    path = Path(args.file)
    if path.is_dir():
        raise GlmkitError(f"{path} is a directory; pass a text file.")
    if not path.is_file():
        raise GlmkitError(f"{path} does not exist; pass a text file.")
    if args.ctx < 4:
        raise GlmkitError(f"--ctx must be at least 4, got {args.ctx}.")
    text = read_utf8(path, "the text")
    args.eager = True  # whole-window forward passes: a compiled one-token step would not be used
    llm = load_model(args)
    ids = llm.tokenizer.encode_prompt(text)
    bos = llm.config.bos_token_id if ids and ids[0] == llm.config.bos_token_id else None
    print(f"{len(ids)} tokens, {len(ids) // args.ctx} chunks of {args.ctx}", file=sys.stderr)
    from glmkit.perplexity import perplexity

    value = perplexity(llm.logits, ids, args.ctx, bos,
                       lambda i, p: print(f"[{i + 1}]{p:.4f},", end="", flush=True))
    print(f"\nPPL = {value:.4f}")
    return 0
