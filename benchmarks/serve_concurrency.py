"""Aggregate decode throughput of `glmkit serve` at 1, 4 and 8 concurrent streams, next to
`llama-server -np 8` on the same GGUF when a llama-server binary is on PATH (or given with --llama-server).

Each stream asks for --tokens tokens (ignore_eos) after a short prompt; aggregate tokens/s = all generated
tokens / wall time of the round. Prints the median of --runs rounds per setting as a markdown table.

    .venv/bin/python benchmarks/serve_concurrency.py [--model smollm2-135m-instruct] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited early (code {proc.returncode})")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"{url} did not become ready in {timeout:.0f} s")


def one_stream(url: str, model: str, tokens: int) -> int:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0.8, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    n = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if event.get("usage"):  # the last event carries the exact count
                    n = event["usage"]["completion_tokens"]
    return n


def round_throughput(url: str, model: str, streams: int, tokens: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        counts = list(pool.map(lambda _: one_stream(url, model, tokens), range(streams)))
    if any(c != tokens for c in counts):
        sys.exit(f"a stream returned {counts} tokens instead of {tokens} each")
    return sum(counts) / (time.perf_counter() - start)


def measure(url: str, model: str, levels: list[int], tokens: int, runs: int) -> dict[int, float]:
    round_throughput(url, model, 1, 8)  # warm up
    return {n: statistics.median(round_throughput(url, model, n, tokens) for _ in range(runs)) for n in levels}


def serve_and_measure(command, levels: list[int], args) -> dict[int, float]:
    """Start a server (command(port) -> argv), measure it, stop it."""
    port = free_port()
    proc = subprocess.Popen(command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        return measure(f"http://127.0.0.1:{port}", "m", levels, args.tokens, args.runs)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="glmkit MODEL (alias, .gguf or directory)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--llama-server", default=shutil.which("llama-server"))
    args = ap.parse_args()
    levels = [1, 4, 8]

    from glmkit.loaders.hub import resolve

    gguf = Path(resolve(args.model))
    rows = {"glmkit serve": serve_and_measure(
        lambda port: [sys.executable, "-m", "glmkit", "serve", str(gguf), "--port", str(port), "--max-batch", "8",
                      "--model-name", "m"], levels, args)}
    if args.llama_server and gguf.suffix == ".gguf":
        rows["llama-server -np 8"] = serve_and_measure(
            lambda port: [args.llama_server, "-m", str(gguf), "--port", str(port), "-np", "8", "-c", "4096", "-t", "2"],
            levels, args)
    print(f"\naggregate decode tokens/s, {args.tokens} tokens per stream, median of {args.runs} runs "
          f"({gguf.name})\n")
    print("| server | " + " | ".join(f"{n} stream{'s' if n > 1 else ''}" for n in levels) + " | 8 vs 1 |")
    print("|---|" + "---:|" * (len(levels) + 1))
    for name, figures in rows.items():
        print(f"| {name} | " + " | ".join(f"{figures[n]:.1f}" for n in levels)
              + f" | {figures[8] / figures[1]:.2f}x |")


if __name__ == "__main__":
    main()
