"""Speed measurements shared by `glmkit bench` and benchmarks/decode.py: load time, prefill tokens/s,
time to first token, decode tokens/s and peak memory, each the median of several runs.

Prompts are fixed token ids (no tokenizer needed); decode is greedy with ignore_eos, so every run does
the same work. Never used by tests: timings are reported, not asserted.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch


def peak_rss_mb() -> float:
    """This process's high-water RSS; ru_maxrss would carry a parent's over a fork + exec (a benchmark's child
    would report the size of the parent that built its model)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass  # not Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, max(101, vocab - 100), (n,), generator=g).tolist()


def measure_llm(llm, *, runs: int = 3, prefill: int = 512, prompt: int = 32, decode: int = 128) -> dict[str, float]:
    """-> prefill_tps, ttft_s, decode_tps (medians of `runs`); the engine's cache is warmed first."""
    from glmkit.engine.generate import complete, stream
    from glmkit.engine.sampling import SamplingParams

    engine, vocab = llm.engine, llm.config.vocab_size
    greedy = dict(temperature=0, ignore_eos=True)
    complete(engine, prompt_ids(8, vocab, 99), SamplingParams(max_tokens=4, **greedy))  # warm up
    pre, ttft, dec = [], [], []
    for r in range(runs):
        ids = prompt_ids(prefill, vocab, 1000 + r)  # fresh ids: no cached prefix to reuse
        t = time.perf_counter()
        complete(engine, ids, SamplingParams(max_tokens=1, **greedy))
        pre.append(prefill / (time.perf_counter() - t))
        ids = prompt_ids(prompt, vocab, 2000 + r)
        t = time.perf_counter()
        chunks = stream(engine, ids, SamplingParams(max_tokens=decode, **greedy))
        next(chunks)
        first = time.perf_counter()
        n = 1 + sum(1 for _ in chunks)
        ttft.append(first - t)
        dec.append((decode - 1) / (time.perf_counter() - first))
        assert n >= 1
    return {"prefill_tps": statistics.median(pre), "ttft_s": statistics.median(ttft),
            "decode_tps": statistics.median(dec)}
