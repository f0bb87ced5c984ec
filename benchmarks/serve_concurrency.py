"""Aggregate decode throughput of `glmkit serve` at 1, 4 and 8 concurrent streams, next to
`llama-server -np 8` on the same GGUF when a llama-server binary is on PATH (or given with --llama-server).

Each stream asks for --tokens tokens (ignore_eos) after a short prompt, through one official openai client
per server (its connections kept); aggregate tokens/s = all generated tokens / wall time of the round. The
servers run side by side and their rounds alternate (the machine's drift falls on all alike). Prints the median of --runs rounds per setting as a markdown table. Then
the latency under load: 7 streams of 128 tokens, and a ~2k-token prompt arriving a second into the round (8
sequences: both servers' slots); p50 / p99 of the gaps between the streams' tokens, and that prompt's time
to first token. glmkit's compiled
steps are built (glmkit compile) before its server starts, and the rounds begin once /health says the server
decodes through them, so the measurement sees what a warmed-up server runs.

    .venv/bin/python benchmarks/serve_concurrency.py [--model smollm2-135m-instruct] [--runs 3]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).parent))
from decode import peer_died  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until the server answers /health, and (glmkit) decodes through its compiled steps, loaded from disk."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            if proc.returncode < 0:
                sys.exit(peer_died(" ".join(proc.args[:1]), -proc.returncode, "its start (its warm-up)"))
            sys.exit(f"the server exited early (code {proc.returncode})")
        try:
            r = httpx.get(url + "/health", timeout=1)
            if r.status_code == 200 and "eager" not in r.json().get("decode", []):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    sys.exit(f"{url} did not become ready in {timeout:.0f} s")


def one_stream(client: openai.OpenAI, model: str, tokens: int) -> int:
    n = 0
    for event in client.completions.create(model=model, prompt=PROMPT, max_tokens=tokens, temperature=0.8,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if event.usage:  # the last event carries the exact count
            n = event.usage.completion_tokens
    return n


LONG_PROMPT = " ".join(f"Paragraph {i}: the keeper logged the weather, the ships that passed and the state of the "
                       "lamp, as every keeper before him had done." for i in range(80))  # about 2k tokens


def stream_times(client: openai.OpenAI, model: str, tokens: int, prompt: str) -> list[float]:
    """When each streamed piece of text arrived (perf_counter seconds), from the request's start (index 0)."""
    times = [time.perf_counter()]
    for event in client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0.8,
                                           stream=True, extra_body={"ignore_eos": True}):
        if event.choices:
            times.append(time.perf_counter())
    return times


def latency_round(client: openai.OpenAI, model: str) -> dict[str, float]:
    with ThreadPoolExecutor(8) as pool:  # 8 slots in both servers: 7 streams, then the long prompt
        streams = [pool.submit(stream_times, client, model, 128, PROMPT) for _ in range(7)]
        time.sleep(1.0)
        long = pool.submit(stream_times, client, model, 8, f"Log {time.time_ns()}. {LONG_PROMPT}")  # never cached
        gaps = sorted(b - a for f in streams for a, b in zip(f.result()[1:], f.result()[2:]))
        first = long.result()
    return {"p50": gaps[len(gaps) // 2] * 1000, "p99": gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] * 1000,
            "max": gaps[-1] * 1000, "ttft": first[1] - first[0]}


def round_throughput(client: openai.OpenAI, model: str, streams: int, tokens: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        counts = list(pool.map(lambda _: one_stream(client, model, tokens), range(streams)))
    if any(c != tokens for c in counts):
        sys.exit(f"a stream returned {counts} tokens instead of {tokens} each")
    return sum(counts) / (time.perf_counter() - start)


def client_of(url: str) -> openai.OpenAI:
    """One official openai client per server for the whole measurement (its connection pool kept, as an
    application would: a client per request would add its own setup to every stream)."""
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)


def measure(clients: dict[str, openai.OpenAI], levels: list[int], tokens: int, runs: int) -> dict[str, dict]:
    """Every server's figures, their rounds interleaved (server A, server B, A, B, ...) so that the machine's
    drift over the minutes a measurement takes falls on all of them alike."""
    out: dict[str, dict] = {name: {} for name in clients}
    for client in clients.values():
        round_throughput(client, "m", 1, 8)  # warm up
    for n in levels:
        figures: dict[str, list] = {name: [] for name in clients}
        for _ in range(runs):
            for name, client in clients.items():
                figures[name].append(round_throughput(client, "m", n, tokens))
        for name in clients:
            out[name][n] = statistics.median(figures[name])
    rounds: dict[str, list] = {name: [] for name in clients}
    for _ in range(runs):
        for name, client in clients.items():
            rounds[name].append(latency_round(client, "m"))
    for name in clients:
        out[name]["latency"] = {k: statistics.median(r[k] for r in rounds[name]) for k in ("p50", "p99", "max", "ttft")}
    return out


def serve_all_and_measure(commands: dict, levels: list[int], args) -> dict[str, dict]:
    """Start every server (name -> command(port) -> argv) side by side, measure them interleaved, stop them.
    A server between its rounds is idle (no CPU)."""
    procs, clients = [], {}
    try:
        for name, command in commands.items():
            port = free_port()
            procs.append(proc := subprocess.Popen(command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_ready(f"http://127.0.0.1:{port}", proc)
            clients[name] = client_of(f"http://127.0.0.1:{port}")
        return measure(clients, levels, args.tokens, args.runs)
    finally:
        for client in clients.values():
            client.close()
        for proc in procs:
            proc.terminate()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="glmkit MODEL (alias, .gguf or directory)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--llama-server", default=shutil.which("llama-server"))
    ap.add_argument("--llama-args", default="", help="more llama-server arguments, written --llama-args='--no-repack'")
    ap.add_argument("--chunks", type=int, nargs="+", default=[256], help="glmkit serve --prefill-chunk values")
    args = ap.parse_args()
    levels = [1, 4, 8]

    from glmkit.loaders.hub import resolve

    gguf = Path(resolve(args.model))
    subprocess.run([sys.executable, "-m", "glmkit", "compile", str(gguf)], check=True)  # once; then from disk
    commands = {f"glmkit serve --prefill-chunk {c}": (
        lambda port, c=c: [sys.executable, "-m", "glmkit", "serve", str(gguf), "--port", str(port), "--max-batch",
                           "8", "--model-name", "m", "--prefill-chunk", str(c)]) for c in args.chunks}
    if args.llama_server and gguf.suffix == ".gguf":
        commands["llama-server -np 8"] = (
            lambda port: [args.llama_server, "-m", str(gguf), "--port", str(port), "-np", "8", "-c", "32768", "-t", "2",
                          *shlex.split(args.llama_args)])
    rows = serve_all_and_measure(commands, levels, args)
    print(f"\naggregate decode tokens/s, {args.tokens} tokens per stream, median of {args.runs} runs "
          f"({gguf.name})\n")
    print("| server | " + " | ".join(f"{n} stream{'s' if n > 1 else ''}" for n in levels) + " | 8 vs 1 |")
    print("|---|" + "---:|" * (len(levels) + 1))
    for name, figures in rows.items():
        print(f"| {name} | " + " | ".join(f"{figures[n]:.1f}" for n in levels)
              + f" | {figures[8] / figures[1]:.2f}x |")
    if "llama-server -np 8" in rows:
        g, ll = next(iter(rows.values())), rows["llama-server -np 8"]
        print("| glmkit / llama-server | " + " | ".join(f"{g[n] / ll[n]:.2f}x" for n in levels) + " | |")
    print("\n7 streams of 128 tokens, a ~2k-token prompt arriving 1 s in (medians of the runs' figures)\n")
    print("| server | inter-token p50 ms | p99 ms | longest gap ms | long prompt's first token s |")
    print("|---|---:|---:|---:|---:|")
    for name, figures in rows.items():
        lat = figures["latency"]
        print(f"| {name} | {lat['p50']:.0f} | {lat['p99']:.0f} | {lat['max']:.0f} | {lat['ttft']:.2f} |")


if __name__ == "__main__":
    main()
