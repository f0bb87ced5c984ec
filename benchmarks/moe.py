"""A GLM-4.5-Air-shaped Mixture-of-Experts model scaled down to this machine, in one run: decode / prefill
tokens/s and peak RSS of glmkit (int8 and int4, eager and compiled) next to transformers' Glm4MoeForCausalLM
(float32 and bfloat16) and llama.cpp's llama-bench on the same weights as GGUF (Q8_0 and Q4_0).

The model: 8 layers (1 dense + 7 MoE), hidden 1024, 8 heads / 2 kv heads of 128 (half rotary), 64 routed
experts of width 384, top-8, 1 shared expert, vocabulary 16384, random weights (a wide router, a non-zero
correction bias). It is built once under --workdir (HF directory, and GGUF files written as llama.cpp's
converter writes glm4moe, every linear weight in the file's type). Decode: 128 greedy tokens after a
32-token prompt; prefill: 512 tokens; medians of --runs; each configuration in its own process.

    .venv/bin/python benchmarks/moe.py [--runs 3] [--llama-bench PATH] [--workdir /tmp/glmkit-moe-bench]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from decode import llama_bench  # noqa: E402

SHAPE = dict(vocab_size=16384, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, head_dim=128, moe_intermediate_size=384, n_routed_experts=64,
             num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
             routed_scaling_factor=1.0, norm_topk_prob=True, use_qk_norm=False, attention_bias=True,
             max_position_embeddings=4096, num_nextn_predict_layers=0,
             rope_parameters={"rope_theta": 1e6, "partial_rotary_factor": 0.5, "rope_type": "default"})

CHILD = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads({threads})
from glmkit.benchmark import measure_llm, peak_rss_mb, prompt_ids
kind, source, runs = {kind!r}, {source!r}, {runs}
t = time.perf_counter()
if kind.startswith("glmkit"):
    import glmkit
    llm = glmkit.load(source)
    load = time.perf_counter() - t
    extra = {{}}
    if kind.endswith("compiled"):
        decoder = llm.compile()
        if not decoder.ready:
            raise SystemExit(decoder.error)
        extra["compile_s"] = decoder.seconds
    out = {{**measure_llm(llm, runs=runs), **extra}}
else:
    from transformers import Glm4MoeForCausalLM
    dtype = torch.bfloat16 if "bfloat16" in kind else torch.float32
    hf = Glm4MoeForCausalLM.from_pretrained(source, dtype=dtype).eval()
    load = time.perf_counter() - t
    V = hf.config.vocab_size
    pre, dec, ttft = [], [], []
    with torch.no_grad():
        hf.generate(torch.tensor([prompt_ids(8, V, 99)]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for r in range(runs):
            ids = torch.tensor([prompt_ids(512, V, 1000 + r)])
            s = time.perf_counter(); hf(ids); pre.append(512 / (time.perf_counter() - s))
            ids = torch.tensor([prompt_ids(32, V, 2000 + r)])
            s = time.perf_counter(); hf.generate(ids, max_new_tokens=1, do_sample=False); first = time.perf_counter() - s
            s = time.perf_counter()
            hf.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
            total = time.perf_counter() - s
            ttft.append(first); dec.append(127 / (total - first))
    out = {{"prefill_tps": statistics.median(pre), "ttft_s": statistics.median(ttft),
           "decode_tps": statistics.median(dec)}}
print(json.dumps({{**out, "load_s": load, "peak_rss_mb": peak_rss_mb()}}))
"""


def build(workdir: Path) -> tuple[Path, dict[str, Path]]:
    """The HF directory (bfloat16 safetensors) and GGUF files (Q8_0, Q4_0), made once."""
    hf_dir, ggufs = workdir / "hf", {q: workdir / f"moe-{q}.gguf" for q in ("Q8_0", "Q4_0")}
    if hf_dir.joinpath("config.json").exists() and all(p.exists() for p in ggufs.values()):
        return hf_dir, ggufs
    import torch
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    from test_moe import randomized, write_glm4moe_gguf

    print("building the model (once) ...", file=sys.stderr)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = randomized(Glm4MoeForCausalLM(Glm4MoeConfig(**SHAPE)).eval(), std=0.02, bias_std=0.05)
    for qtype, path in ggufs.items():
        write_glm4moe_gguf(model, path, qtype, linear_qtype=qtype, vocabulary=True)
    model.to(torch.bfloat16).save_pretrained(hf_dir)
    return hf_dir, ggufs


def run_child(kind: str, source: str, runs: int, threads: int) -> dict:
    code = CHILD.format(kind=kind, source=source, runs=runs, threads=threads)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{kind} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bench", default=shutil.which("llama-bench"))
    ap.add_argument("--llama-args", default="", help="more llama-bench arguments, written --llama-args='--repack 0'")
    ap.add_argument("--workdir", default="/tmp/glmkit-moe-bench")
    ap.add_argument("--only", nargs="*", default=None, help="a subset of the configurations")
    args = ap.parse_args()
    hf_dir, ggufs = build(Path(args.workdir))
    kinds = {"glmkit int8 (Q8_0 GGUF)": ggufs["Q8_0"], "glmkit int4 (Q4_0 GGUF)": ggufs["Q4_0"],
             "glmkit int8 (Q8_0 GGUF) compiled": ggufs["Q8_0"], "glmkit int4 (Q4_0 GGUF) compiled": ggufs["Q4_0"],
             "transformers float32": hf_dir, "transformers bfloat16": hf_dir}
    rows = {}
    for kind, source in kinds.items():
        if args.only and kind not in args.only:
            continue
        t = time.perf_counter()
        rows[kind] = run_child(kind, str(source), args.runs, args.threads)
        print(f"  {kind}: {rows[kind]} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    if args.llama_bench:
        for qtype, path in ggufs.items():
            rows[f"llama.cpp {qtype}"] = llama_bench(args.llama_bench, str(path), args.runs, args.threads,
                                                     shlex.split(args.llama_args))
    hf_best = max((r["decode_tps"] for k, r in rows.items() if k.startswith("transformers")), default=None)
    print(f"\nGLM-4.5-Air-shaped MoE (8 layers, hidden 1024, 64 experts top-8), {args.threads} threads, "
          f"medians of {args.runs} runs\n")
    print("| configuration | decode tok/s | prefill tok/s | peak RSS MB | compile s | decode vs best transformers |"
          " decode vs llama.cpp, same bits |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, r in rows.items():
        if not r:
            print(f"| {kind} | failed | | | | | |")
            continue
        same = rows.get(f"llama.cpp {'Q4_0' if 'int4' in kind else 'Q8_0'}") if kind.startswith("glmkit") else None
        cell = lambda k, f, r=r: f.format(r[k]) if k in r else "–"  # noqa: E731
        print(f"| {kind} | {cell('decode_tps', '{:.1f}')} | {cell('prefill_tps', '{:.0f}')} | "
              f"{cell('peak_rss_mb', '{:.0f}')} | {cell('compile_s', '{:.0f}')} | ", end="")
        print(f"{r['decode_tps'] / hf_best:.2f}x | " if hf_best and "decode_tps" in r else "– | ", end="")
        print(f"{r['decode_tps'] / same['decode_tps']:.2f}x |" if same and "decode_tps" in same else "– |")


if __name__ == "__main__":
    main()
