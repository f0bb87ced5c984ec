"""What structured outputs cost per token, two ways, in one run.

1. Mask libraries, in-process: the time to compute one token mask (and apply it to the logits) while a
   JSON-schema reply is replayed token by token over the default model's vocabulary, for llguidance (what
   glmkit uses) and xgrammar (when importable: `pip install --no-deps xgrammar apache-tvm-ffi`), plus each
   one's grammar compile time. Medians over --runs replays.
2. Servers, end to end: decode tokens/s of greedy chat replies with and without a json_schema
   response_format, on `glmkit serve` and on `llama-server` (its own grammar engine) with the same GGUF
   and prompts; tokens/s from the first to the last streamed token, median over the prompts and --runs.

    .venv/bin/python benchmarks/structured.py [--model smollm2-135m-instruct] [--runs 3] [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_concurrency import free_port, wait_ready  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "country": {"type": "string"}, "population": {"type": "integer"},
    "landmarks": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "year_built": {"type": "integer"}, "visited": {"type": "boolean"}},
        "required": ["name", "year_built", "visited"]}},
    "climate": {"enum": ["oceanic", "continental", "mediterranean", "tropical"]}},
    "required": ["name", "country", "population", "landmarks", "climate"], "additionalProperties": False}
SAMPLE = {"name": "Paris", "country": "France", "population": 2102650, "landmarks": [
    {"name": "Eiffel Tower", "year_built": 1889, "visited": True},
    {"name": "Notre-Dame de Paris", "year_built": 1345, "visited": False}], "climate": "oceanic"}
PROMPTS = ["Describe Paris as a JSON record.", "Describe Tokyo as a JSON record.", "介绍一下北京，用 JSON 回答。",
           "Give me a record for Rome with two landmarks."]


# ------------------------------------------------------------------------------ 1. mask libraries
def replay_llguidance(llm, ids: list[int], runs: int) -> tuple[float, float]:
    """-> (grammar compile ms, median µs per token for mask + apply)."""
    import torch

    llm.grammars.lltokenizer  # the vocabulary is read once per model, outside the timing
    t = time.perf_counter()
    grammar = llm.grammars.json(SCHEMA)
    compile_ms = (time.perf_counter() - t) * 1e3
    logits = torch.randn(llm.config.vocab_size)
    per_token = []
    for _ in range(runs):
        matcher = grammar.start()
        t = time.perf_counter()
        for token in ids:
            logits.masked_fill(~matcher.allowed(), float("-inf"))
            matcher.advance(token)
        per_token.append((time.perf_counter() - t) / len(ids) * 1e6)
    return compile_ms, statistics.median(per_token)


def replay_xgrammar(llm, ids: list[int], runs: int) -> tuple[float, float] | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    import torch

    from glmkit.grammar import tightened

    vocab = llm.tokenizer.token_bytes()[: llm.config.vocab_size]
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=llm.config.vocab_size,
                             stop_token_ids=sorted(llm.stop_ids))
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(tightened(SCHEMA)), any_whitespace=False,
                                            separators=(", ", ": "))
    compile_ms = (time.perf_counter() - t) * 1e3
    logits = torch.randn(1, llm.config.vocab_size)
    bitmask = xgr.allocate_token_bitmask(1, llm.config.vocab_size)
    per_token = []
    for _ in range(runs):
        matcher = xgr.GrammarMatcher(compiled)
        t = time.perf_counter()
        for token in ids:
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            if not matcher.accept_token(token):
                sys.exit(f"xgrammar refused token {token} of the sample")
        per_token.append((time.perf_counter() - t) / len(ids) * 1e6)
    return compile_ms, statistics.median(per_token)


def libraries(model: str, runs: int) -> None:
    import glmkit

    llm = glmkit.load(model)
    ids = llm.tokenizer.encode(json.dumps(SAMPLE, ensure_ascii=False))
    print(f"\nmask libraries: {len(ids)}-token JSON reply replayed over a {llm.config.vocab_size}-id vocabulary, "
          f"median of {runs}\n")
    print("| library | grammar compile ms | µs per token (mask + apply) |")
    print("|---|---:|---:|")
    for name, result in (("llguidance", replay_llguidance(llm, ids, runs)),
                         ("xgrammar", replay_xgrammar(llm, ids, runs))):
        print(f"| {name} | " + ("not installed | – |" if result is None else f"{result[0]:.1f} | {result[1]:.1f} |"))


# ------------------------------------------------------------------------------ 2. servers
def decode_rate(url: str, prompt: str, constrained: bool) -> tuple[float, int]:
    """-> (tokens/s from the first to the last streamed token, completion tokens)."""
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 128,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    first = last = None
    n = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                first, last = first or time.perf_counter(), time.perf_counter()
            if event.get("usage"):
                n = event["usage"]["completion_tokens"]
    return (n - 1) / (last - first) if first and last > first else float("nan"), n


def serve_rates(command, runs: int) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen(command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        decode_rate(url, PROMPTS[0], True)  # warm up (the first constrained request reads the vocabulary)
        out = {}
        for constrained in (False, True):
            rates = [decode_rate(url, p, constrained)[0] for _ in range(runs) for p in PROMPTS]
            out["json_schema" if constrained else "free"] = statistics.median(rates)
        return out
    finally:
        proc.terminate()
        proc.wait()


def servers(model: str, runs: int, llama_server: str | None) -> None:
    from glmkit.loaders.hub import resolve

    gguf = Path(resolve(model))
    rows = {"glmkit serve": serve_rates(lambda port: [sys.executable, "-m", "glmkit", "serve", str(gguf), "--port",
                                                      str(port), "--model-name", "m"], runs)}
    if llama_server and gguf.suffix == ".gguf":
        rows["llama-server"] = serve_rates(lambda port: [llama_server, "-m", str(gguf), "--port", str(port), "-c",
                                                         "4096", "-t", "2", "-np", "1"], runs)
    print(f"\ndecode tokens/s of greedy chat replies (max 128 tokens), {len(PROMPTS)} prompts x {runs} runs, "
          f"medians ({gguf.name})\n")
    print("| server | free | json_schema | constrained / free |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['free']:.1f} | {r['json_schema']:.1f} | {r['json_schema'] / r['free']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="glmkit MODEL (alias, .gguf or directory)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--llama-server", default=shutil.which("llama-server"))
    args = ap.parse_args()
    libraries(args.model, args.runs)
    servers(args.model, args.runs, args.llama_server)


if __name__ == "__main__":
    main()
