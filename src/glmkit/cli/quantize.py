"""`glmkit quantize SRC DST --bits 4|8 [--group-size N]`: write a weight-only quantized checkpoint.

DST is a directory that `glmkit.load` and every command read back (config.json records which layers are
quantized and how); the tokenizer files travel along (a GGUF's tokenizer is written as tokenizer.json). The
source is read and quantized one layer at a time, so a checkpoint larger than RAM can be quantized as long as
the result fits. A source that is already stored quantized is refused unless --requantize: rounding rounded
weights again only loses quality.
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
    parser.add_argument("--bits", type=int, choices=[4, 8], required=True, help="weight bits (choices: 4, 8)")
    parser.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128, 256],
                        help="int4: input columns per scale and zero (choices: 32, 64, 128, 256; default: 32)")
    parser.add_argument("--requantize", action="store_true",
                        help="quantize a source that is already stored quantized (default: refuse)")


def main(args: argparse.Namespace) -> int:
    from glmkit import loaders
    from glmkit.chat import tokenizer_and_format
    from glmkit.errors import GlmkitError
    from glmkit.loaders.quantized import save_quantized
    from glmkit.model import Transformer
    from glmkit.quant import quantize_model
    from glmkit.tokenizer import HFTokenizer

    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()):
        raise GlmkitError(f"{dst} exists and is not empty; choose a new directory.")
    checkpoint = loaders.open(args.src)
    stored = checkpoint.quantization
    if stored is not None and not args.requantize:
        larger = " into a larger file" if args.bits == 8 and stored == "int4" else ""
        raise GlmkitError(f"{args.src} is already stored quantized ({stored}); quantizing it again rounds rounded "
                          f"weights{larger} and quality can only drop. Use it as it is (glmkit loads it quantized), "
                          "or pass --requantize to do it anyway.")
    print(f"reading and quantizing {checkpoint.source} layer by layer ...", file=sys.stderr)
    try:
        tokenizer, fmt = tokenizer_and_format(checkpoint, None)
    except GlmkitError:  # weights only
        tokenizer, fmt = None, None
    checkpoint.release_metadata()
    if stored is None:
        model = loaders.assemble(checkpoint, Transformer.skeleton, "cpu", "bfloat16", f"int{args.bits}", args.group_size)
    else:  # --requantize: the stored values, dequantized, quantized anew
        model = quantize_model(loaders.assemble(checkpoint, Transformer.skeleton, "cpu", "bfloat16"), args.bits,
                               args.group_size)
    save_quantized(model, dst, args.bits, args.group_size)
    src = Path(checkpoint.source)
    if src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, dst / name)
    elif isinstance(tokenizer, HFTokenizer):  # a GGUF: its tokenizer and chat template as files
        (dst / "tokenizer.json").write_text(tokenizer.tok.to_str())
        template = getattr(fmt, "template", None)
        strings = getattr(fmt, "special_strings", {})
        (dst / "tokenizer_config.json").write_text(json.dumps({**strings, **({"chat_template": template}
                                                                             if template else {})}, ensure_ascii=False))
    else:
        print("glmkit quantize: this source's tokenizer cannot be written out; copy it next to the weights.",
              file=sys.stderr)
    size = sum(f.stat().st_size for f in dst.iterdir()) / 2**20
    print(f"wrote {dst} ({size:.0f} MiB, int{args.bits}" + (f", group size {args.group_size}" if args.bits == 4 else "")
          + ")")
    return 0
