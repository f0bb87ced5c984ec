"""What every route of the server shares: the LLM, the engine the server owns (built from the LLM's public
settings), its worker thread, the metrics and the limits, with the helpers routes use to validate sampling
settings, admit a request and read its chunks. No routes here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from glmkit.engine.sampling import DEFAULT_MAX_TOKENS, SamplingParams
from glmkit.engine.sequence import Chunk
from glmkit.errors import GlmkitError
from glmkit.server.access import RequestStats, stats_of
from glmkit.server.metrics import Metrics
from glmkit.server.worker import Busy, EngineWorker, Handle


POLL_S = 0.25  # how often a waiting request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


@dataclass
class ServerState:
    llm: Any
    model_name: str
    worker: EngineWorker
    request_timeout: float = 600.0
    metrics: Metrics = field(init=False)

    def __post_init__(self):
        engine = self.worker.engine
        self.metrics = Metrics(lambda: engine.running, lambda: len(engine.waiting), engine.runner.steps)

    @property
    def ctx(self) -> int:
        return self.llm.config.max_seq_len

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.model_name):
            raise ApiError(404, f"model {name!r} is not served here; this server serves {self.model_name!r}.",
                           "not_found_error")

    def sampling(self, body, max_tokens: int, prompt_len: int, **extra) -> SamplingParams:
        """A request's sampling settings, checked against the context."""
        ctx = self.ctx
        if prompt_len >= ctx:
            raise ApiError(400, f"the prompt has {prompt_len} tokens but the model's context is {ctx} tokens; "
                                "shorten it.")
        if max_tokens < 0:
            raise ApiError(400, f"max_tokens must be at least 0, got {max_tokens}.")
        if prompt_len + max_tokens > ctx:
            raise ApiError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                f"model's context of {ctx} tokens; lower max_tokens.")
        try:
            bias = {int(k): v for k, v in (body.logit_bias or {}).items()} or None
        except ValueError:
            raise ApiError(400, "logit_bias keys must be token ids.") from None
        if bias and max(bias) >= self.llm.config.vocab_size:
            raise ApiError(400, f"logit_bias names token id {max(bias)}, outside 0..{self.llm.config.vocab_size - 1}.")
        try:  # fields the request leaves out take the model's defaults (llm.defaults)
            return self.llm.sampling_params(logit_bias=bias,
                max_tokens=max(1, max_tokens), temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                min_p=body.min_p, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []), seed=body.seed,
                ignore_eos=body.ignore_eos, **extra)
        except GlmkitError as e:
            raise ApiError(400, str(e)) from None

    async def grammar(self, body, tools: list[dict] | None = None):
        """The grammar a request's output must follow (a forced tool call, else its response_format), compiled
        off the event loop (the first one reads the vocabulary); None for free text."""
        tool_choice = getattr(body, "tool_choice", None)
        if body.response_format is None and tool_choice in (None, "none", "auto"):
            return None
        try:
            return await asyncio.to_thread(self.llm.output_grammar, body.response_format, tools, tool_choice)
        except Exception as e:  # noqa: BLE001 - a bad schema or tool choice is the client's to fix
            raise render_error(e) from None

    @staticmethod
    def with_seed(params: SamplingParams, i: int) -> SamplingParams:
        """The i-th of n samples: seeded requests give each its own seed (seed + i), so the n differ yet repeat."""
        return params if i == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + i)

    def default_max_tokens(self, prompt_len: int) -> int:
        """A chat request without max_tokens: the checkpoint's max_new_tokens, else DEFAULT_MAX_TOKENS, within the
        context."""
        return min(self.llm.defaults.get("max_tokens", DEFAULT_MAX_TOKENS), self.ctx - prompt_len)

    def admit_all(self, requests: list[tuple[list[int], SamplingParams]]) -> list[Handle]:
        """Admit every (prompt, params) of one request, or none: on a 503 the ones already admitted are cancelled,
        so no part of a refused request keeps running."""
        handles = []
        try:
            for prompt, params in requests:
                handles.append(self.admit(prompt, params))
        except ApiError:
            for handle in handles:
                self.worker.cancel(handle)
            raise
        return handles

    def admit(self, prompt: list[int], params: SamplingParams) -> Handle:
        try:
            handle = self.worker.submit(prompt, params)
        except Busy:
            raise ApiError(503, "the server is at capacity; retry shortly.", "server_busy",
                           headers={"Retry-After": "1"}) from None
        self.metrics.prompt_tokens.inc(len(prompt))
        return handle

    async def chunks(self, handle: Handle, started: float, request: Request | None = None) -> AsyncIterator[Chunk]:
        """A sequence's chunks; cancels it if the consumer stops early or the client goes away."""
        first, last, deadline = True, started, started + self.request_timeout
        stats = stats_of(request.scope.setdefault("state", {})) if request is not None else RequestStats()
        checked = 0.0  # when the client was last seen connected (a check per token would cost ~0.1 ms each)
        try:
            while True:
                if request is not None and time.monotonic() - checked >= POLL_S:
                    if await request.is_disconnected():
                        return  # the client left: the finally below frees its slot (or its place in the queue) now
                    checked = time.monotonic()
                try:
                    item = handle.chunks.get_nowait()  # decoding keeps up: no timer, no task
                except asyncio.QueueEmpty:
                    try:  # wake up now and then while queued or slow, to notice a client that left
                        item = await asyncio.wait_for(handle.chunks.get(), timeout=min(POLL_S, deadline - time.time()))
                    except asyncio.TimeoutError:
                        if time.time() >= deadline:
                            raise ApiError(504, f"the request took longer than {self.request_timeout:.0f} s.") from None
                        continue
                if isinstance(item, Exception):
                    raise ApiError(400 if isinstance(item, GlmkitError) else 500, str(item))
                now = time.time()
                if item.token_ids:
                    (self.metrics.ttft if first else self.metrics.tpot).observe(now - (started if first else last))
                    self.metrics.generation_tokens.inc(len(item.token_ids))
                    first, last = False, now
                    stats.completion_tokens += len(item.token_ids)
                    stats.first_token, stats.last_token = min(stats.first_token or now, now), now
                if item.finish_reason is not None and handle.seq is not None:
                    stats.prompt_tokens += len(handle.seq.prompt)
                if handle.seq is not None and handle.seq.error:
                    raise ApiError(500 if handle.seq.error_is_internal else 400, handle.seq.error)
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.worker.cancel(handle)


async def merged(state: ServerState, handles: list[Handle], started: float,
                 request: Request | None = None) -> AsyncIterator[tuple[int, Chunk]]:
    """(index, chunk) from several sequences as they come (n > 1 streamed); the first error raises, and
    leaving early cancels every sequence still running."""
    if len(handles) == 1:  # one sequence: its chunks as they come, with no task or queue in between
        chunks = state.chunks(handles[0], started, request)
        try:
            async for chunk in chunks:
                yield 0, chunk
        finally:
            await chunks.aclose()  # leaving early cancels the sequence now
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle: Handle) -> None:
        try:
            async for chunk in state.chunks(handle, started, request):
                queue.put_nowait((i, chunk))
        except ApiError as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if isinstance(item, ApiError):
                raise item
            if item is None:
                running -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


def check_text(value: Any, where: str = "the request") -> None:
    """Every string in a request must be encodable text: a lone UTF-16 surrogate is refused here (400), not
    deep in a tokenizer or the JSON writer."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{where} holds a lone UTF-16 surrogate; send valid Unicode text.") from None
    elif isinstance(value, dict):
        for v in value.values():
            check_text(v, where)
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_text(v, where)


def render_error(e: Exception) -> ApiError:
    """A failure to render or tokenize a client's messages: their own sentence for glmkit's errors, and for
    anything else (a tool without a name, a tool call without arguments) a 400 that says what broke."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, GlmkitError):
        return ApiError(400, str(e))
    return ApiError(400, f"the messages or tools are malformed ({type(e).__name__}: {e}); check them against "
                         "OpenAI's chat format.")


def state_of(request: Request) -> ServerState:
    return request.app.state.glmkit


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def json_reply(content: dict) -> JSONResponse:
    """A whole reply, encoded off the event loop: 8,000 prompt tokens' top-20 logprobs, or many embeddings, took
    the loop (and every other stream) a second to encode."""
    return await asyncio.to_thread(JSONResponse, content)
