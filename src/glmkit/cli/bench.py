"""`glmkit bench [MODEL]`: load time, prefill and decode tokens/s, time to first token and peak memory.

For the side-by-side with transformers and llama.cpp, run benchmarks/decode.py.
"""

from __future__ import annotations

import argparse
import time

from glmkit.cli.common import add_model_args, load_model


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--runs", type=int, default=3, help="measured runs (the median is shown)")


def main(args: argparse.Namespace) -> int:
    from glmkit.benchmark import measure_llm, peak_rss_mb

    t = time.perf_counter()
    llm = load_model(args)
    load = time.perf_counter() - t
    compiled = getattr(args, "compiled", None)  # a package on disk, or one built now with --compile
    step = "eager"
    if compiled is not None:
        compiled.wait()  # measured with the decode step it will keep, not one that arrives mid-run
        if compiled.ready:
            step = f"compiled ({'from disk' if compiled.cached else 'built'} in {compiled.seconds:.0f} s)"
        elif args.compile:
            step = f"eager: {compiled.error}"
    r = measure_llm(llm, runs=args.runs)
    print(f"{llm.source} ({llm.dtype}, {args.quantize or 'as stored'}, {step}): load {load:.1f} s | prefill (512) "
          f"{r['prefill_tps']:.0f} tok/s | time to first token (32-token prompt) {r['ttft_s'] * 1000:.0f} ms | "
          f"decode {r['decode_tps']:.1f} tok/s | peak RSS {peak_rss_mb():.0f} MB  (medians of {args.runs})")
    return 0
