"""Decode / prefill speed of glmkit in each dtype and quantization, next to transformers on the same
weights and llama.cpp's llama-bench on the same GGUF (when a binary is on PATH or given), in one run.

Decode: 128 greedy tokens after a 32-token prompt; prefill: a 512-token prompt; medians of --runs.
Each configuration runs in its own process, so load time and peak RSS are its own. "compiled" rows compile
the one-token decode step first (glmkit compile; warm when the on-disk cache already holds it) and report
that time separately.

    .venv/bin/python benchmarks/decode.py [--model smollm2-135m-instruct] [--runs 3] [--llama-bench PATH]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads({threads})
from glmkit.benchmark import measure_llm, peak_rss_mb, prompt_ids
kind, source, runs = {kind!r}, {source!r}, {runs}
t = time.perf_counter()
if kind.startswith("glmkit"):
    import glmkit
    dtype, quantize = {{"glmkit float32": ("float32", None), "glmkit bfloat16": ("bfloat16", None),
                       "glmkit int8": (None, "int8"), "glmkit int4": (None, "int4")}}[kind.replace(" compiled", "")]
    llm = glmkit.load(source, dtype=dtype, quantize=quantize)
    load = time.perf_counter() - t
    extra = {{}}
    if kind.endswith("compiled"):  # the on-disk cache decides between a cold and a warm compile
        decoder = llm.compile(batched=False)  # one stream: the one-row step
        if not decoder.ready:
            raise SystemExit(decoder.error)
        extra["compile_s"] = decoder.seconds
    out = {{**measure_llm(llm, runs=runs), **extra}}
else:  # transformers LlamaForCausalLM on the same (dequantized) weights
    from transformers import LlamaConfig, LlamaForCausalLM
    from glmkit.loaders import open as open_checkpoint
    checkpoint = open_checkpoint(source)
    config, tensors = checkpoint.config, checkpoint.tensors()[0]
    dtype = torch.bfloat16 if "bfloat16" in kind else torch.float32
    c = config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
        max_position_embeddings=c.max_seq_len)
    cfg.rope_parameters["rope_theta"] = c.rope_theta
    hf = LlamaForCausalLM(cfg).eval()
    H, K, D = c.num_heads, c.num_kv_heads, c.head_dim
    def unpermute(w, n):  # llama.cpp's converter permuted q/k rows; transformers wants them back
        return w.reshape(n, D // 2, 2, -1).transpose(1, 2).reshape(w.shape)
    sd = {{"model.embed_tokens.weight": tensors["embed.weight"], "model.norm.weight": tensors["norm.weight"]}}
    for i in range(c.num_layers):
        p, q = f"model.layers.{{i}}.", f"layers.{{i}}."
        wq, wk, wv = tensors[q + "attn.qkv.weight"].split([H * D, K * D, K * D])
        gate, up = tensors[q + "mlp.in_proj.weight"].chunk(2)
        sd.update({{p + "self_attn.q_proj.weight": unpermute(wq, H), p + "self_attn.k_proj.weight": unpermute(wk, K),
                   p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": tensors[q + "attn.out.weight"],
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": tensors[q + "mlp.out_proj.weight"],
                   p + "input_layernorm.weight": tensors[q + "attn_norm.weight"],
                   p + "post_attention_layernorm.weight": tensors[q + "mlp_norm.weight"]}})
    hf.load_state_dict(sd, strict=False)
    hf.tie_weights()
    hf = hf.to(dtype)
    load = time.perf_counter() - t
    pre, dec, ttft = [], [], []
    with torch.no_grad():
        ids = torch.tensor([prompt_ids(8, c.vocab_size, 99)])
        hf.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        for r in range(runs):
            ids = torch.tensor([prompt_ids(512, c.vocab_size, 1000 + r)])
            s = time.perf_counter(); hf(ids); pre.append(512 / (time.perf_counter() - s))
            ids = torch.tensor([prompt_ids(32, c.vocab_size, 2000 + r)])
            s = time.perf_counter(); hf.generate(ids, max_new_tokens=1, do_sample=False); first = time.perf_counter() - s
            s = time.perf_counter()
            hf.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
            total = time.perf_counter() - s
            ttft.append(first); dec.append(127 / (total - first))
    import statistics
    out = {{"prefill_tps": statistics.median(pre), "ttft_s": statistics.median(ttft), "decode_tps": statistics.median(dec)}}
print(json.dumps({{**out, "load_s": load, "peak_rss_mb": peak_rss_mb()}}))
"""


def run_child(kind: str, source: str, runs: int, threads: int) -> dict:
    code = CHILD.format(kind=kind, source=source, runs=runs, threads=threads)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_bench(binary: str, gguf: str, runs: int, threads: int, extra: list[str] | None = None) -> dict:
    """llama-bench's decode (tg128) and prefill (pp512), each its own run: a build that dies on one (see
    peer_died) still gives the other. extra: more llama-bench arguments (--llama-args)."""
    out = {}
    for key, shape in (("decode_tps", ["-p", "0", "-n", "128"]), ("prefill_tps", ["-p", "512", "-n", "0"])):
        done = subprocess.run([binary, "-m", gguf, *shape, "-t", str(threads), "-r", str(runs), "-o", "json",
                               *(extra or [])], capture_output=True, text=True)
        if done.returncode < 0:
            print(peer_died("llama-bench", -done.returncode, "prefill" if key == "prefill_tps" else "decode"),
                  file=sys.stderr)
            continue
        if done.returncode != 0:
            sys.exit(f"llama-bench failed (exit code {done.returncode}):\n{done.stderr[-2000:]}")
        out[key] = json.loads(done.stdout)[0]["avg_ts"]
    return out


def peer_died(name: str, signal_number: int, what: str) -> str:
    """One sentence for a llama.cpp binary killed by a signal. SIGILL: a -DGGML_NATIVE build's AMX kernels on
    a virtual machine that advertises AMX but faults on llama.cpp's tile instructions (this project's second
    machine: llama-bench decodes, but any prompt of more than one token, and so llama-server's warm-up, dies)."""
    flag = "--no-repack" if "server" in name else "--repack 0"
    return (f"{name} died with {signal.Signals(signal_number).name} during {what}, so it is left out. If that "
            f"was SIGILL on an AMX CPU, rerun with --llama-args='{flag}' (llama.cpp's plain CPU kernels) or build "
            "llama.cpp with -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bench", default=shutil.which("llama-bench"))
    ap.add_argument("--llama-args", default="", help="more llama-bench arguments, written --llama-args='--repack 0'")
    ap.add_argument("--only", nargs="*", default=None, help="a subset of the configurations")
    args = ap.parse_args()

    from glmkit.loaders.hub import resolve

    source = str(resolve(args.model))
    kinds = ["glmkit float32", "glmkit bfloat16", "glmkit int8", "glmkit int4", "glmkit bfloat16 compiled",
             "glmkit int8 compiled", "glmkit int4 compiled", "transformers float32", "transformers bfloat16"]
    rows = {}
    for kind in args.only or kinds:
        t = time.perf_counter()
        rows[kind] = run_child(kind, source, args.runs, args.threads)
        print(f"  {kind}: {rows[kind]} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    if args.llama_bench and source.endswith(".gguf"):
        rows["llama.cpp (llama-bench)"] = llama_bench(args.llama_bench, source, args.runs, args.threads,
                                                        shlex.split(args.llama_args))
    base = rows.get("transformers bfloat16", {}).get("decode_tps")
    ref = rows.get("llama.cpp (llama-bench)", {})
    print(f"\n{source.rsplit('/', 1)[-1]}, {args.threads} threads, medians of {args.runs} runs\n")
    print("| configuration | decode tok/s | prefill tok/s | TTFT ms | load s | compile s | peak RSS MB |"
          " decode vs llama.cpp | decode vs transformers bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, r in rows.items():
        cell = lambda k, f: f.format(r[k]) if k in r else "–"  # noqa: E731
        vs_ref = f"{r['decode_tps'] / ref['decode_tps']:.2f}x" if "decode_tps" in r and "decode_tps" in ref else "–"
        vs_hf = f"{r['decode_tps'] / base:.2f}x" if base and "decode_tps" in r else "–"
        print(f"| {kind} | {cell('decode_tps', '{:.1f}')} | {cell('prefill_tps', '{:.0f}')} | "
              f"{cell('ttft_s', '{:.0f}') if 'ttft_s' not in r else round(r['ttft_s'] * 1000)} | "
              f"{cell('load_s', '{:.1f}')} | {cell('compile_s', '{:.0f}')} | {cell('peak_rss_mb', '{:.0f}')} | "
              f"{vs_ref} | {vs_hf} |")


if __name__ == "__main__":
    main()
