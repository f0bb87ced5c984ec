"""The OpenAI-compatible HTTP API (FastAPI) plus the web chat page at `/`.

Routes: /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize, /tokenizer_info,
/health, /metrics. Requests decode together through the engine worker (continuous batching). Every
route but /health and the static page needs the API key when one is set; bad input gets OpenAI's
error shape and the server keeps serving. Model output is only parsed, never executed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from glmkit.engine.batch import Engine
from glmkit.engine.sampling import SamplingParams
from glmkit.engine.sequence import Chunk
from glmkit.errors import GlmkitError
from glmkit.server.metrics import Metrics
from glmkit.server.schema import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, error_body
from glmkit.server.worker import Busy, EngineWorker, Handle

STATIC = Path(__file__).parent / "static"


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def create_app(llm, *, model_name: str, api_keys: list[str] | None = None, cors_origins: list[str] | None = None,
               max_batch: int = 8, max_queue: int = 64, max_body_bytes: int = 4 << 20,
               request_timeout: float = 600.0) -> FastAPI:
    previous = llm.engine
    engine = llm._engine = Engine(llm.model, previous.stop_ids, previous.decode, max_batch=max_batch,
                                  prefix_kv=llm.prefix_kv)
    engine.compiled = previous.compiled  # a compiled step (glmkit serve --compile) serves single streams
    worker = EngineWorker(engine, max_queue=max_queue)
    metrics = Metrics(lambda: engine.running, lambda: len(engine.waiting))
    keys = set(api_keys or [])
    ctx = llm.config.max_seq_len
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.stop()  # graceful shutdown: in-flight sequences are cancelled and their clients told

    app = FastAPI(title="glmkit", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.worker, app.state.llm = worker, llm

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    # ------------------------------------------------------------------ errors and guards
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.message, e.kind), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON ({first.get('msg', '')})."), 400)
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return JSONResponse(error_body(f"{where}: {first.get('msg', 'invalid value')}", param=where), 400)

    app.add_middleware(Guard, keys=keys, max_body_bytes=max_body_bytes)

    def check_model(name: str | None) -> None:
        if name not in (None, "", model_name):
            raise ApiError(404, f"model {name!r} is not served here; this server serves {model_name!r}.",
                           "not_found_error")

    def sampling(body, max_tokens: int, prompt_len: int, **extra) -> SamplingParams:
        if prompt_len >= ctx:
            raise ApiError(400, f"the prompt has {prompt_len} tokens but the model's context is {ctx} tokens; "
                                "shorten it.")
        if max_tokens < 0:
            raise ApiError(400, f"max_tokens must be at least 0, got {max_tokens}.")
        if prompt_len + max_tokens > ctx:
            raise ApiError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                f"model's context of {ctx} tokens; lower max_tokens.")
        try:
            return SamplingParams(
                max_tokens=max(1, max_tokens), temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                min_p=body.min_p, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []), seed=body.seed,
                ignore_eos=body.ignore_eos, **extra)
        except GlmkitError as e:
            raise ApiError(400, str(e)) from None

    def admit(prompt: list[int], params: SamplingParams) -> Handle:
        try:
            handle = worker.submit(prompt, params)
        except Busy:
            raise ApiError(503, "the server is at capacity; retry shortly.", "server_busy",
                           headers={"Retry-After": "1"}) from None
        metrics.prompt_tokens.inc(len(prompt))
        return handle

    async def chunks(handle: Handle, started: float, request: Request | None = None) -> AsyncIterator[Chunk]:
        """A sequence's chunks; cancels it if the consumer stops early or the client goes away."""
        first, last, deadline = True, started, started + request_timeout
        try:
            while True:
                if request is not None and await request.is_disconnected():
                    return  # the client left: the finally below frees its slot now

                try:
                    item = await asyncio.wait_for(handle.chunks.get(), timeout=max(0.01, deadline - time.time()))
                except asyncio.TimeoutError:
                    raise ApiError(504, f"the request took longer than {request_timeout:.0f} s.") from None
                if isinstance(item, Exception):
                    raise ApiError(400 if isinstance(item, GlmkitError) else 500, str(item))
                now = time.time()
                if item.token_ids:
                    (metrics.ttft if first else metrics.tpot).observe(now - last if not first else now - started)
                    metrics.generation_tokens.inc(len(item.token_ids))
                    first, last = False, now
                if handle.seq is not None and handle.seq.error:
                    raise ApiError(500, handle.seq.error)
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            worker.cancel(handle)

    def sse(data: dict | str) -> str:
        return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"

    # ---------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "glmkit",
                                            "max_model_len": ctx}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        metrics.requests.labels("chat").inc()
        fmt = llm.chat_format
        if fmt is None:
            raise ApiError(400, "this model has no chat format; use /v1/completions.")
        tools = None if body.tool_choice == "none" else body.tools
        try:
            ids = llm.apply_chat_template(body.messages, tools)
        except GlmkitError as e:
            raise ApiError(400, str(e)) from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = sampling(body, max_tokens if max_tokens is not None else ctx - len(ids), len(ids))
        rid, created, started = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), time.time()
        handle = admit(ids, params)
        base = {"id": rid, "created": created, "model": model_name}

        def finish(text: str, reason: str, n: int) -> tuple[dict, str, dict]:
            message = fmt.parse_reply(text, tools)
            reason = "tool_calls" if message.get("tool_calls") else reason
            usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
            return message, reason, usage

        if not body.stream:
            text, reason, n = "", "stop", 0
            async for c in chunks(handle, started, request):
                text, n, reason = text + c.text, n + len(c.token_ids), c.finish_reason or reason
            message, reason, usage = finish(text, reason, n)
            return {**base, "object": "chat.completion", "usage": usage,
                    "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": None}]}

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def stream():
            text, n, started_text, reason = "", 0, False, "stop"
            head = {**base, "object": "chat.completion.chunk"}
            yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]})
            try:
                async for c in chunks(handle, started, request):
                    text, n, reason = text + c.text, n + len(c.token_ids), c.finish_reason or reason
                    piece = c.text if started_text else c.text.lstrip()
                    if piece and not tools:  # with tools, the reply may be a call: known only at its end
                        started_text = True
                        yield sse({**head, "choices": [{"index": 0, "delta": {"content": piece},
                                                        "finish_reason": None}]})
            except ApiError as e:
                yield sse(error_body(e.message, e.kind))
                yield sse("[DONE]")
                return
            message, reason, usage = finish(text, reason, n)
            if tools and message.get("tool_calls"):
                deltas = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
                yield sse({**head, "choices": [{"index": 0, "delta": {"tool_calls": deltas}, "finish_reason": None}]})
            elif tools and message.get("content"):
                yield sse({**head, "choices": [{"index": 0, "delta": {"content": message["content"]},
                                                "finish_reason": None}]})
            yield sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage})
            yield sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        metrics.requests.labels("completions").inc()
        if _is_infill(body.prompt, llm):
            return await _infill(body, request)
        prompts = _prompts(body.prompt, llm)
        if len(prompts) > 1 and body.stream:
            raise ApiError(400, "stream=true takes a single prompt.")
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        rid, created, started = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), time.time()
        if body.stream:
            return StreamingResponse(_stream_completion(prompts[0], body, max_tokens, rid, created, started, request),
                                     media_type="text/event-stream")
        choices = await asyncio.gather(*(_complete(i, p, body, max_tokens, started, request)
                                         for i, p in enumerate(prompts)))
        n_prompt = sum(len(p) for p in prompts)
        n_gen = sum(c.pop("_n") for c in choices)
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}

    async def _infill(body: CompletionRequest, request: Request) -> dict:
        """GLM blank infilling: each [MASK] is generated after <sop> at the blank's position and spliced in,
        left to right; the choice's text is the whole prompt with its blanks filled (fills lists the spans)."""
        if body.stream or body.echo or body.logprobs is not None:
            raise ApiError(400, "prompts with [MASK] (blank infilling) take no stream, echo or logprobs.")
        c, started = llm.config, time.time()
        ids = llm.tokenizer.encode(body.prompt, allow_special=True)
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        fills, n_prompt, n_gen, reason = [], 0, 0, "stop"
        while c.mask_token_id in ids:
            prompt = ids + [c.sop_token_id]
            handle = admit(prompt, sampling(body, max_tokens, len(prompt)))
            out = []
            async for chunk in chunks(handle, started, request):
                out += chunk.token_ids
                reason = chunk.finish_reason or reason
            ids = llm.fill_first_blank(ids, out)
            fills.append(llm.tokenizer.decode(out, skip_special=True))
            n_prompt, n_gen = n_prompt + len(prompt), n_gen + len(out)
        choice = {"index": 0, "text": llm.tokenizer.decode(ids, skip_special=True), "finish_reason": reason,
                  "logprobs": None, "fills": fills}
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(started),
                "model": model_name, "choices": [choice],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}

    async def _complete(index: int, prompt: list[int], body: CompletionRequest, max_tokens: int, started: float,
                        request: Request):
        want = body.logprobs
        params = sampling(body, max_tokens, len(prompt), logprobs=want)
        out, seq = [], None
        if max_tokens > 0:
            handle = admit(prompt, params)
            reason = "length"
            async for c in chunks(handle, started, request):
                out += c.token_ids
                reason = c.finish_reason or reason
            seq = handle.seq
        else:
            reason = "length"
        text = llm.tokenizer.decode(out, skip_special=True) if out else ""
        logprobs = None
        if want is not None:
            entries = []
            if body.echo:
                entries += await _prompt_logprobs(prompt, want)
            entries += [(t, lp, top) for t, (lp, top) in zip(out, seq.logprobs if seq else [])]
            logprobs = _logprob_block(entries, llm)
        if body.echo:
            text = llm.tokenizer.decode(prompt, skip_special=False) + text
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs, "_n": len(out)}

    async def _prompt_logprobs(prompt: list[int], want: int) -> list[tuple[int, float | None, dict]]:
        import torch

        logits = await worker.call(lambda: llm.logits(prompt)[0])  # (T, V), the reference path
        lp = torch.log_softmax(logits.double(), dim=-1)
        entries: list[tuple[int, float | None, dict]] = [(prompt[0], None, {})]
        for i in range(1, len(prompt)):
            top = torch.topk(lp[i - 1], want) if want else None
            alternatives = {} if top is None else dict(zip(top.indices.tolist(), top.values.tolist()))
            entries.append((prompt[i], float(lp[i - 1, prompt[i]]), alternatives))
        return entries

    async def _stream_completion(prompt, body, max_tokens, rid, created, started, request):
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        try:
            params = sampling(body, max_tokens, len(prompt))
            handle = admit(prompt, params)
            n = 0
            async for c in chunks(handle, started, request):
                n += len(c.token_ids)
                yield sse({**head, "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason,
                                                "logprobs": None}]})
            if (body.stream_options or {}).get("include_usage"):
                yield sse({**head, "choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": n,
                                                            "total_tokens": len(prompt) + n}})
        except ApiError as e:
            yield sse(error_body(e.message, e.kind))
        yield sse("[DONE]")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if body.messages is not None:
            ids = llm.apply_chat_template(body.messages)
        elif body.prompt is not None:
            # a raw tokenizer endpoint, like HF's and vLLM's: special-token text is parsed (lm-evaluation-harness
            # finds the EOS id this way); chat messages stay protected by their renderers
            ids = llm.tokenizer.encode(body.prompt, allow_special=True)
            if body.add_special_tokens and llm.chat_format is not None:
                ids = llm.chat_format.wrap_plain(ids)
        else:
            raise ApiError(400, "give 'prompt' (text) or 'messages'.")
        return {"tokens": ids, "count": len(ids), "max_model_len": ctx}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        if any(t < 0 or t >= llm.config.vocab_size for t in body.tokens):
            raise ApiError(400, f"token ids must lie in 0..{llm.config.vocab_size - 1}.")
        return {"prompt": llm.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok, eos = llm.tokenizer, sorted(llm.engine.stop_ids)
        name = lambda i: None if i is None else tok.decode([i])  # noqa: E731
        return {"tokenizer_class": type(tok).__name__, "model_max_length": ctx, "vocab_size": tok.vocab_size,
                "eos_token": name(eos[0]) if eos else None, "eos_token_ids": eos,
                "bos_token": name(llm.config.bos_token_id), "pad_token": name(llm.config.pad_token_id),
                "chat_format": llm.chat_format.name if llm.chat_format else None,
                "chat_template": getattr(llm.chat_format, "template", None)}

    return app


def _is_infill(prompt, llm) -> bool:
    """A text prompt with [MASK] for a GLM (ChatGLM-6B-architecture) model asks for blank infilling."""
    c = llm.config
    return isinstance(prompt, str) and "[MASK]" in prompt and c.positions == "2d" and c.mask_token_id is not None \
        and c.sop_token_id is not None and llm.tokenizer is not None


def _prompts(prompt, llm) -> list[list[int]]:
    """OpenAI's four prompt shapes -> token id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        ids = llm.encode_prompt(p) if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(400, "a prompt is empty.")
        if min(ids) < 0 or max(ids) >= llm.config.vocab_size:
            raise ApiError(400, f"prompt token ids must lie in 0..{llm.config.vocab_size - 1}.")
        out.append(ids)
    if not out:
        raise ApiError(400, "the prompt list is empty.")
    return out


def _logprob_block(entries, llm) -> dict[str, Any]:
    """OpenAI completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tok = llm.tokenizer
    tokens, offsets, position = [], [], 0
    for token, _, _ in entries:
        text = tok.decode([token])
        tokens.append(text)
        offsets.append(position)
        position += len(text)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if lp is None else {tok.decode([t]): v for t, v in top.items()}
                             for _, lp, top in entries],
            "text_offset": offsets}


class _TooLarge(Exception):
    pass


class Guard:
    """Plain ASGI middleware: the API key on every route but /health and the page, and the body size limit
    (by Content-Length, and counted for bodies sent without one)."""

    OPEN = ("/health", "/", "/index.html")

    def __init__(self, app, keys: set[str], max_body_bytes: int):
        self.app, self.keys, self.limit = app, keys, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.keys and scope["path"] not in self.OPEN and scope["method"] != "OPTIONS":
            auth = headers.get("authorization", "")
            if not auth.startswith("Bearer ") or auth[7:].strip() not in self.keys:
                return await JSONResponse(error_body("invalid or missing API key; send 'Authorization: Bearer <key>'.",
                                                     "authentication_error", code="invalid_api_key"), 401)(
                    scope, receive, send)
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > self.limit:
            return await self._too_large(int(size), scope, receive, send)
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._too_large(seen, scope, receive, send)

    async def _too_large(self, size, scope, receive, send):
        await JSONResponse(error_body(f"the request body ({size} bytes) is over the {self.limit}-byte limit; "
                                      "send a smaller request."), 413)(scope, receive, send)
