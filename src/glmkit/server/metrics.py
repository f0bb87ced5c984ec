"""Prometheus metrics for the server (prometheus_client, one registry per app): requests, tokens in and
out, time to first token and per-token latency, running and waiting sequences, and the engine's steps by the
path they took (eager, or the compiled one-row / rows step)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self, running: Callable[[], int], waiting: Callable[[], int], steps: dict[str, int]):
        """steps: the engine runner's live step counts by path (ModelRunner.steps)."""
        r = self.registry = CollectorRegistry()
        self.requests = Counter("glmkit_requests", "requests by endpoint", ["endpoint"], registry=r)
        self.prompt_tokens = Counter("glmkit_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("glmkit_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("glmkit_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tpot = Histogram("glmkit_time_per_output_token_seconds", "time between tokens", registry=r,
                              buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1))
        Gauge("glmkit_running_sequences", "sequences decoding", registry=r).set_function(running)
        Gauge("glmkit_waiting_sequences", "sequences queued", registry=r).set_function(waiting)
        by_path = Gauge("glmkit_engine_steps", "engine steps run, by path", ["path"], registry=r)
        for path in steps:
            by_path.labels(path).set_function(lambda path=path: steps[path])

    def render(self) -> str:
        return generate_latest(self.registry).decode()
