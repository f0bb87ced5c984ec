"""The access log: one line per HTTP request, written when its response (a stream included) has ended, with the
tokens it read and wrote, time to first token and decode speed, as llama-server and vLLM print them; plain
text or one JSON object per line. Routes record token counts through `RequestStats` (state.py's chunks()).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

logger = logging.getLogger("glmkit.access")


@dataclass
class RequestStats:
    """What one request generated, summed over its sequences (n > 1, several prompts)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None  # time.time() of the first generated token
    last_token: float | None = None


def stats_of(scope_state: dict) -> RequestStats:
    return scope_state.setdefault("glmkit_stats", RequestStats())


class AccessLog:
    """Plain ASGI middleware around the app: logs each request once its last response byte went out."""

    def __init__(self, app, fmt: str = "text"):
        self.app, self.fmt = app, fmt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.time(), 0

        async def logged_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            stats = scope.get("state", {}).get("glmkit_stats") or RequestStats()
            logger.info(self.line(scope, status, started, stats))

    def line(self, scope, status: int, started: float, stats: RequestStats) -> str:
        now = time.time()
        ttft = None if stats.first_token is None else stats.first_token - started
        decode = stats.last_token - stats.first_token if stats.first_token is not None else 0.0
        rate = (stats.completion_tokens - 1) / decode if decode > 0 and stats.completion_tokens > 1 else None
        client = (scope.get("client") or ("-", 0))[0]
        record = {"time": round(now, 3), "client": client, "method": scope["method"], "path": scope["path"],
                  "status": status or 500, "prompt_tokens": stats.prompt_tokens,
                  "completion_tokens": stats.completion_tokens, "ttft_s": None if ttft is None else round(ttft, 4),
                  "tokens_per_s": None if rate is None else round(rate, 2), "duration_s": round(now - started, 4)}
        if self.fmt == "json":
            return json.dumps(record)
        tokens = (f" prompt={stats.prompt_tokens} completion={stats.completion_tokens}"
                  + ("" if ttft is None else f" ttft={ttft * 1e3:.0f}ms")
                  + ("" if rate is None else f" {rate:.1f} tok/s")) if stats.prompt_tokens else ""
        return f'{client} "{scope["method"]} {scope["path"]}" {record["status"]}{tokens} {now - started:.3f}s'
