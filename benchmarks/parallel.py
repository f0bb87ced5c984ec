"""Tensor parallelism on CPU: the GLM-4.5-Air-shaped MoE model of benchmarks/moe.py (8 layers, hidden 1024, 64
experts of width 384, top-8, one shared expert) in one process and split across 2 processes (torchrun, gloo), int8
and bfloat16: decode and prefill tokens/s (rank 0, medians of --runs) and, per rank, the weights it holds, its
private memory after the run and its peak RSS (which counts the checkpoint's memory-mapped file pages, shared and
droppable), in one run.

On this 2-core machine the point is memory per rank and that the split works, not speed: two ranks share the
same two cores (one thread each, as torchrun sets it) and pay an all-reduce per sublayer over loopback. On a GPU
machine, run the same with CUDA: each rank takes its LOCAL_RANK's GPU.

    .venv/bin/python benchmarks/parallel.py [--runs 3] [--workdir /tmp/glmkit-moe-bench] [--experts columns|experts]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from moe import build  # noqa: E402

CHILD = r"""
import atexit, json, os, sys
from glmkit.benchmark import measure_llm, peak_rss_mb
out, source, quantize, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rank = int(os.environ.get("RANK", "0"))
import torch
model = []
def report(extra={}):
    anon = int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) / 1024
    weights = sum(t.numel() * t.element_size() for t in model[0].state_dict().values()) / 2**20 if model else 0
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rank": rank, "peak_rss_mb": peak_rss_mb(), "private_mb": anon, "weights_mb": weights, **extra}, f)
atexit.register(report)  # the ranks that follow rank 0 report when it stops them
from glmkit import loaders
_assemble = loaders.assemble
def keep(*a, **k):  # note the model this rank holds
    model.append(_assemble(*a, **k))
    return model[-1]
loaders.assemble = keep
import glmkit
llm = glmkit.load(source, quantize=None if quantize == "bfloat16" else quantize, dtype="bfloat16")
atexit.unregister(report)
report(measure_llm(llm, runs=runs, prefill=256, decode=64))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ranks: int, source: Path, quantize: str, runs: int, experts: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp) / "child.py", Path(tmp) / "result"
        script.write_text(CHILD)
        launcher = [sys.executable] if ranks == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port())]
        env = {**os.environ, "GLMKIT_SPLIT_EXPERTS": experts, "OMP_NUM_THREADS": "2" if ranks == 1 else "1"}
        done = subprocess.run([*launcher, str(script), str(out), str(source), quantize, str(runs)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return []
        return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(ranks)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/glmkit-moe-bench")
    ap.add_argument("--experts", default="columns", choices=["columns", "experts"],
                    help="how routed experts are split (GLMKIT_SPLIT_EXPERTS)")
    args = ap.parse_args()
    hf_dir, _ = build(Path(args.workdir))
    print(f"GLM-4.5-Air-shaped MoE, experts split by {args.experts}, medians of {args.runs} runs\n")
    print("| configuration | processes | decode tok/s | prefill tok/s | weights per rank MB | private memory per "
          "rank MB (after the run) | peak RSS per rank MB (file pages of the checkpoint included) |")
    print("|---|---:|---:|---:|---|---|---|")
    for quantize in ("int8", "bfloat16"):
        for ranks in (1, 2):
            rows = run(ranks, hf_dir, quantize, args.runs, args.experts)
            if not rows:
                print(f"| glmkit {quantize} | {ranks} | failed | | |")
                continue
            lead = rows[0]
            per_rank = [" / ".join(f"{r[key]:.0f}" for r in rows) for key in ("weights_mb", "private_mb", "peak_rss_mb")]
            print(f"| glmkit {quantize} | {ranks} | {lead['decode_tps']:.1f} | {lead['prefill_tps']:.0f} | "
                  + " | ".join(per_rank) + " |", flush=True)


if __name__ == "__main__":
    main()
