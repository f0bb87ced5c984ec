"""`glmkit quantize SRC DST --bits 4|8 [--group-size N]`: write a weight-only quantized checkpoint.

DST is a directory that `glmkit.load` and every command read back (config.json records which layers are
quantized and how); the tokenizer files travel along (a GGUF's tokenizer is written as tokenizer.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "ice_text.model", "chat_template.jinja", "chat_template.json", "generation_config.json")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint directory, .gguf file or alias")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--bits", type=int, choices=[4, 8], required=True)
    parser.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128, 256], help="int4 group size")


def main(args: argparse.Namespace) -> int:
    import glmkit
    from glmkit.errors import GlmkitError
    from glmkit.quant import quantize_model
    from glmkit.loaders.quantized import save_quantized
    from glmkit.tokenizer import HFTokenizer

    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()):
        raise GlmkitError(f"{dst} exists and is not empty; choose a new directory.")
    print(f"loading {args.src} ...", file=sys.stderr)
    llm = glmkit.load(args.src, device="cpu", dtype="bfloat16")
    quantize_model(llm.model, bits=args.bits, group_size=args.group_size)
    save_quantized(llm.model, dst, args.bits, args.group_size)
    src = Path(llm.source)
    try:
        tokenizer = llm.tokenizer
    except GlmkitError:  # weights only
        tokenizer = None
    if src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, dst / name)
    elif isinstance(tokenizer, HFTokenizer):  # a GGUF: its tokenizer and chat template as files
        (dst / "tokenizer.json").write_text(tokenizer.tok.to_str())
        template = getattr(llm.chat_format, "template", None)
        strings = getattr(llm.chat_format, "special_strings", {})
        (dst / "tokenizer_config.json").write_text(json.dumps({**strings, **({"chat_template": template}
                                                                             if template else {})}, ensure_ascii=False))
    else:
        print("glmkit quantize: this source's tokenizer cannot be written out; copy it next to the weights.",
              file=sys.stderr)
    size = sum(f.stat().st_size for f in dst.iterdir()) / 2**20
    print(f"wrote {dst} ({size:.0f} MiB, int{args.bits}" + (f", group size {args.group_size}" if args.bits == 4 else "")
          + ")")
    return 0
