"""A GLM-4.7-Flash-shaped latent-attention (MLA) model scaled down to this machine, in one run: decode tokens/s at a
4k and a 32k context, KV-cache bytes per token and peak RSS, for glmkit (bfloat16, int8, int4; eager and
compiled) next to transformers' Glm4MoeLiteForCausalLM (float32 and bfloat16).

The model keeps GLM-4.7-Flash's attention exactly (20 heads, q_lora_rank 768, kv_lora_rank 512, rope 64, nope
192, value 256: what sets the cache and the decode cost) and its router (64 experts, top 4, 1 shared, scaling
1.8), with fewer and narrower layers: 4 layers (1 dense + 3 MoE), hidden 2048, expert width 256, dense width
2048, vocabulary 16384, random weights. Decode at a context of C tokens: the cache is filled with C positions of
random latents (both runtimes keep the compressed latent, so this costs no prefill of C tokens), then one-token
steps are timed: --steps for glmkit, fewer for transformers, which re-expands the whole cache every step.
Each configuration runs in its own process; figures are medians of --runs.

    .venv/bin/python benchmarks/mla.py [--runs 3] [--contexts 4096 32768] [--workdir /tmp/glmkit-mla-bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(vocab_size=16384, hidden_size=2048, intermediate_size=2048, moe_intermediate_size=256,
             num_hidden_layers=4, num_attention_heads=20, num_key_value_heads=20, n_routed_experts=64,
             num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=1.8, kv_lora_rank=512, q_lora_rank=768,
             qk_rope_head_dim=64, qk_nope_head_dim=192, v_head_dim=256, max_position_embeddings=40960,
             mlp_layer_types=["dense", "sparse", "sparse", "sparse"], rope_interleave=True,
             rope_parameters={"rope_theta": 1e6, "rope_type": "default"})

CHILD = r"""
import json, statistics, time
import torch
torch.set_num_threads({threads})
from glmkit.benchmark import peak_rss_mb
kind, source, context, steps, runs = {kind!r}, {source!r}, {context}, {steps}, {runs}
g = torch.Generator().manual_seed(0)
rates = []
if kind.startswith("glmkit"):
    import glmkit
    from glmkit.engine.runner import ModelRunner, StepInputs
    bits = {{"int8": "int8", "int4": "int4"}}.get(kind.split()[1])
    llm = glmkit.load(source, quantize=bits, dtype="bfloat16")
    if kind.endswith("compiled"):
        decoder = llm.compile()
        if not decoder.ready:
            raise SystemExit(decoder.error)
    runner = ModelRunner(llm.model)
    runner.compiled = llm.compiled
    runner.reserve(context + (steps + 2) * runs + 8, 1)
    for buffers in (runner.cache.k, runner.cache.v):  # the first `context` positions: random latents
        for t in buffers:
            t[:, :, :context].normal_(0, 1, generator=g)
    position = context
    def step():
        global position
        runner.step(StepInputs([0], [[int(torch.randint(100, 16000, (1,), generator=g))]], [position]))
        position += 1
    kv_bytes = sum(t[0, :, 0].numel() * t.element_size() for t in runner.cache.k + runner.cache.v)
else:
    from transformers import DynamicCache, Glm4MoeLiteForCausalLM
    dtype = torch.bfloat16 if "bfloat16" in kind else torch.float32
    model = Glm4MoeLiteForCausalLM.from_pretrained(source, dtype=dtype).eval()
    c = model.config
    cache = DynamicCache(config=c)
    for layer in range(c.num_hidden_layers):  # its cache keeps the compressed latent and the rope key too
        cache.update(torch.randn(1, 1, context, c.kv_lora_rank, generator=g).to(dtype),
                     torch.randn(1, 1, context, c.qk_rope_head_dim, generator=g).to(dtype), layer)
    position = context
    def step():
        global position
        with torch.no_grad():
            model(input_ids=torch.randint(100, 16000, (1, 1), generator=g), position_ids=torch.tensor([[position]]),
                  past_key_values=cache, use_cache=True)
        position += 1
    kv_bytes = sum(t[0, :, 0].numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
with torch.inference_mode():
    step()  # warm-up
    for r in range(runs):
        s = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps / (time.perf_counter() - s))
print(json.dumps({{"decode_tps": statistics.median(rates), "kv_bytes_per_token": kv_bytes,
                  "peak_rss_mb": peak_rss_mb()}}))
"""


def build(workdir: Path) -> Path:
    """The HF directory (bfloat16 safetensors), made once."""
    hf_dir = workdir / "hf"
    if hf_dir.joinpath("config.json").exists():
        return hf_dir
    import torch
    from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    print("building the model (once) ...", file=sys.stderr)
    torch.manual_seed(0)
    model = Glm4MoeLiteForCausalLM(Glm4MoeLiteConfig(**SHAPE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.02)
            else:
                p.normal_(0.0, 0.5 if name.endswith("gate.weight") else
                          (0.05 if name.endswith("e_score_correction_bias") else 0.02))
    model.to(torch.bfloat16).save_pretrained(hf_dir)
    return hf_dir


def run_child(kind: str, source: str, context: int, steps: int, runs: int, threads: int) -> dict:
    code = CHILD.format(kind=kind, source=source, context=context, steps=steps, runs=runs, threads=threads)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{kind} at {context} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16, help="glmkit's timed steps a run (transformers: a quarter)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--workdir", default="/tmp/glmkit-mla-bench")
    ap.add_argument("--only", nargs="*", default=None, help="a subset of the configurations")
    args = ap.parse_args()
    hf_dir = str(build(Path(args.workdir)))
    kinds = ["glmkit bfloat16", "glmkit int8", "glmkit int4", "glmkit int8 compiled", "transformers float32",
             "transformers bfloat16"]
    rows: dict[tuple[int, str], dict] = {}
    for context in args.contexts:
        for kind in kinds:
            if args.only and kind not in args.only:
                continue
            steps = args.steps if kind.startswith("glmkit") else max(1, args.steps // 4)
            t = time.perf_counter()
            rows[context, kind] = run_child(kind, hf_dir, context, steps, args.runs, args.threads)
            print(f"  {kind} @ {context}: {rows[context, kind]} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    s = SHAPE
    expanded = s["num_key_value_heads"] * (s["qk_nope_head_dim"] + s["qk_rope_head_dim"] + s["v_head_dim"])
    latent = s["kv_lora_rank"] + s["qk_rope_head_dim"]
    print(f"\nGLM-4.7-Flash-shaped MLA model ({s['num_hidden_layers']} layers, hidden {s['hidden_size']}, "
          f"{s['num_attention_heads']} heads, latent {s['kv_lora_rank']} + rope {s['qk_rope_head_dim']}), "
          f"{args.threads} threads, medians of {args.runs} runs\n")
    print(f"Cache values per token and layer: {latent} (latent + rope key) against {expanded} for the same heads "
          f"kept as keys and values ({s['num_key_value_heads']} kv heads of {s['qk_nope_head_dim'] + s['qk_rope_head_dim']}"
          f" + {s['v_head_dim']}): {latent / expanded:.3f} of it (1/{expanded / latent:.1f}).\n")
    print("| context | configuration | decode tok/s | vs best transformers | KV bytes / token | peak RSS MB |")
    print("|---:|---|---:|---:|---:|---:|")
    for context in args.contexts:
        best = max((r["decode_tps"] for (c, k), r in rows.items() if c == context and k.startswith("transformers")
                    and r), default=None)
        for (c, kind), r in rows.items():
            if c != context:
                continue
            if not r:
                print(f"| {context} | {kind} | failed | | | |")
                continue
            ratio = f"{r['decode_tps'] / best:.1f}x" if best else "–"
            print(f"| {context} | {kind} | {r['decode_tps']:.2f} | {ratio} | {r['kv_bytes_per_token']:,} | "
                  f"{r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
