"""GPU figures: GLM-4-9B- and ChatGLM3-6B-shaped models with random weights (nothing is downloaded), glmkit in
bfloat16 and int4 next to transformers' GlmForCausalLM in bfloat16 on the same shapes, in one run.

Decode: tokens/s at batch 1, 128 greedy tokens after a 32-token prompt, median of --runs. Memory: the peak
GPU memory torch allocated while the model reads a 2k-token context (2,000-token prompt + 48 new tokens), and
the weights alone. Each configuration runs in its own process, so peaks are its own. `--compile` adds glmkit's
compiled decode step (an AOTInductor package, as `glmkit compile` builds). The int4 kernel is torch's
tinygemm (`_weight_int4pack_mm`, Ampere or newer). `--device cpu --shapes tiny` smoke-tests the script.

    .venv/bin/python benchmarks/gpu.py [--shapes glm-4-9b chatglm3-6b] [--runs 3] [--group-size 128] [--compile]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

GLM2_BLOCK = dict(hidden_size=4096, intermediate_size=13696, num_heads=32, num_kv_heads=2, head_dim=128,
                  qkv_bias=True, rope_layout="interleaved", rope_fraction=0.5, norm_eps=1e-5, max_seq_len=8192)
SHAPES = {  # ../shared/reference/glm-family.md: ChatGLM2/3 and GLM-4 share the block; vocab and depth differ
    "glm-4-9b": dict(GLM2_BLOCK, vocab_size=151552, num_layers=40, rope_theta=5_000_000.0),
    "chatglm3-6b": dict(GLM2_BLOCK, vocab_size=65024, num_layers=28, rope_theta=10000.0),
    "tiny": dict(GLM2_BLOCK, hidden_size=256, intermediate_size=512, num_heads=4, head_dim=64, vocab_size=1000,
                 num_layers=2, rope_theta=10000.0),
}

CHILD = r"""
import json, statistics, time, types
import torch
from glmkit.benchmark import prompt_ids
shape, kind, runs, device, group_size = {shape!r}, {kind!r}, {runs}, {device!r}, {group_size}
c = {config!r}
dev = torch.device(device)
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)


def gib(n):
    return n / 2 ** 30


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_reset():
    if dev.type == "cuda":
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()


def peak():
    return gib(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else float("nan")


out = {{}}
if kind.startswith("glmkit"):
    from glmkit.config import ModelConfig
    from glmkit.engine.runner import ModelRunner
    from glmkit.engine.scheduler import Scheduler
    from glmkit.engine.generate import complete, stream
    from glmkit.engine.sampling import SamplingParams
    from glmkit.model import Transformer
    with dev:
        model = Transformer(ModelConfig(**c)).eval().requires_grad_(False)
    if "int4" in kind:
        from glmkit.quant import Int4Linear, quantize_model
        quantize_model(model, bits=4, group_size=group_size)
        out["int4_layout"] = next(m.layout for m in model.modules() if isinstance(m, Int4Linear))
    out["weights_gib"] = gib(sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]))
    greedy = dict(temperature=0, ignore_eos=True)
    peak_reset()
    complete(Scheduler(ModelRunner(model), max_batch=1), prompt_ids(2000, c["vocab_size"]), SamplingParams(max_tokens=48, **greedy))
    sync(); out["peak_2k_gib"] = peak()
    engine = Scheduler(ModelRunner(model), max_batch=1)
    if kind.endswith("compiled"):
        from glmkit.engine.compiled import CompiledDecoder
        from glmkit.llm import compiled_dir
        decoder = CompiledDecoder(model, compiled_dir()).compile()
        if not decoder.ready:
            raise SystemExit(decoder.error)
        engine.runner.compiled, out["compile_s"] = decoder, decoder.seconds
    complete(engine, prompt_ids(32, c["vocab_size"], 99), SamplingParams(max_tokens=8, **greedy))  # warm up
    rates = []
    for r in range(runs):
        chunks = stream(engine, prompt_ids(32, c["vocab_size"], 2000 + r), SamplingParams(max_tokens=128, **greedy))
        next(chunks); sync(); t = time.perf_counter()
        n = sum(1 for _ in chunks); sync()
        rates.append(n / (time.perf_counter() - t))
    out["decode_tps"] = statistics.median(rates)
else:  # transformers' GlmForCausalLM (ChatGLM2/3 and GLM-4-9B's architecture) on the same shapes
    from transformers import GlmConfig, GlmForCausalLM
    cfg = GlmConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                    num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
                    num_key_value_heads=c["num_kv_heads"], head_dim=c["head_dim"], attention_bias=True,
                    rms_norm_eps=c["norm_eps"], max_position_embeddings=c["max_seq_len"], pad_token_id=0)
    with dev:
        hf = GlmForCausalLM(cfg).eval().requires_grad_(False)
    out["weights_gib"] = gib(sum(t.numel() * t.element_size() for t in [*hf.parameters(), *hf.buffers()]))
    gen = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        peak_reset()
        hf.generate(torch.tensor([prompt_ids(2000, c["vocab_size"])], device=dev), max_new_tokens=48, min_new_tokens=48, **gen)
        sync(); out["peak_2k_gib"] = peak()
        ids = torch.tensor([prompt_ids(32, c["vocab_size"], 99)], device=dev)
        hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **gen)  # warm up
        rates = []
        for r in range(runs):
            ids = torch.tensor([prompt_ids(32, c["vocab_size"], 2000 + r)], device=dev)
            sync(); t = time.perf_counter(); hf.generate(ids, max_new_tokens=1, **gen); sync()
            first = time.perf_counter() - t
            t = time.perf_counter(); hf.generate(ids, max_new_tokens=128, min_new_tokens=128, **gen); sync()
            rates.append(127 / (time.perf_counter() - t - first))
    out["decode_tps"] = statistics.median(rates)
print(json.dumps(out))
"""


def run_child(shape: str, kind: str, args) -> dict:
    code = CHILD.format(shape=shape, kind=kind, runs=args.runs, device=args.device, group_size=args.group_size,
                        config=SHAPES[shape])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["glm-4-9b", "chatglm3-6b"], choices=list(SHAPES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size (glmkit quantize's --group-size)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="also time glmkit's compiled decode step")
    args = ap.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (torch sees none); --device cpu --shapes tiny smoke-tests it.")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    kinds = ["glmkit bfloat16", "glmkit int4", "transformers bfloat16"]
    if args.compile:
        kinds[2:2] = ["glmkit bfloat16 compiled", "glmkit int4 compiled"]
    rows = {}
    for shape in args.shapes:
        for kind in kinds:
            t = time.perf_counter()
            rows[shape, kind] = run_child(shape, kind, args)
            print(f"  {shape} {kind}: {rows[shape, kind]} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    print(f"\n{gpu}, torch {torch.__version__}, batch 1, int4 group size {args.group_size}, medians of {args.runs} runs\n")
    print("| shape | configuration | decode tok/s | vs transformers bf16 | weights GiB | peak GiB at 2k |")
    print("|---|---|---:|---:|---:|---:|")
    for (shape, kind), r in rows.items():
        if "error" in r:
            print(f"| {shape} | {kind} | failed: {r['error'][:80]} | | | |")
            continue
        base = rows.get((shape, "transformers bfloat16"), {}).get("decode_tps")
        vs = f"{r['decode_tps'] / base:.2f}x" if base else "–"
        label = kind + (f" ({r['int4_layout']} layout)" if "int4_layout" in r else "")
        print(f"| {shape} | {label} | {r['decode_tps']:.1f} | {vs} | {r['weights_gib']:.2f} | {r['peak_2k_gib']:.2f} |")


if __name__ == "__main__":
    main()
