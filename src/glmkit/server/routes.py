"""The routes of the OpenAI-compatible API and the page, as module-level functions over the app's ServerState:
/v1/chat/completions, /v1/models, /v1/embeddings, /tokenize, /detokenize, /tokenizer_info, /health, /metrics and `/`
(/v1/completions lives in completions.py). Model output is only parsed, never executed.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse

from glmkit.chat import ChatTurn
from glmkit.chat.jinja import RESERVED
from glmkit.server.completions import prompt_ids
from glmkit.server.schema import ChatRequest, DetokenizeRequest, EmbeddingRequest, TokenizeRequest, error_body
from glmkit.server.state import ApiError, ServerState, check_text, json_reply, merged, render_error, sse, state_of

STATIC = Path(__file__).parent / "static"
router = APIRouter()


@router.get("/health")
async def health(request: Request):
    """ok, and how decode steps run now: "compiled" (and "compiled_rows" for batches) or "eager" (still loading or
    building the compiled steps, or without them)."""
    compiled = state_of(request).worker.engine.runner.compiled
    paths = [name for name, ready in (("compiled", compiled is not None and compiled.ready),
                                      ("compiled_rows", compiled is not None and compiled.rows_ready)) if ready]
    return {"status": "ok", "decode": paths or ["eager"]}


@router.get("/")
async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/page.js")
async def page_script():
    return FileResponse(STATIC / "page.js", media_type="text/javascript")


VENDOR_TYPES = {".js": "text/javascript", ".css": "text/css", ".woff2": "font/woff2"}


@router.get("/vendor/{name:path}")
async def vendor(name: str):
    """The page's vendored libraries (static/vendor: marked, DOMPurify, highlight.js, KaTeX and its fonts)."""
    path = (STATIC / "vendor" / name).resolve()
    if path.suffix not in VENDOR_TYPES or not path.is_file() or (STATIC / "vendor").resolve() not in path.parents:
        raise ApiError(404, f"no page file {name!r}.")
    return FileResponse(path, media_type=VENDOR_TYPES[path.suffix], headers={"Cache-Control": "max-age=86400"})


@router.get("/metrics")
async def get_metrics(request: Request):
    return PlainTextResponse(state_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [_model_card(state_of(request))]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    s = state_of(request)
    s.check_model(model_id)  # another name: the 404, in OpenAI's shape
    return _model_card(s)


def _model_card(s: ServerState) -> dict:
    return {"id": s.model_name, "object": "model", "created": 0, "owned_by": "glmkit", "max_model_len": s.ctx}


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request):
    s = state_of(request)
    s.check_model(body.model)
    s.metrics.requests.labels("chat").inc()
    if s.llm.chat_format is None:
        raise ApiError(400, "this model has no chat format; use /v1/completions.")
    tools = None if body.tool_choice == "none" else body.tools
    check_text([body.messages, tools, body.stop, body.chat_template_kwargs])
    try:  # off the event loop: a long conversation takes a while to render and tokenize
        ids = await asyncio.to_thread(s.llm.apply_chat_template, body.messages, tools, True,
                                      **template_kwargs(body))
    except Exception as e:  # noqa: BLE001 - malformed messages or tools are the client's to fix
        raise render_error(e) from None
    max_tokens = body.max_completion_tokens or body.max_tokens
    extra = {"logprobs": body.top_logprobs or 0} if body.logprobs else {}
    extra["grammar"] = await s.grammar(body, tools)
    params = s.sampling(body, max_tokens if max_tokens is not None else s.default_max_tokens(len(ids)), len(ids),
                        **extra)
    started = time.time()
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(started), "model": s.model_name}
    handles = s.admit_all([(ids, s.with_seed(params, i)) for i in range(body.n)])  # n samples, one prefill
    turns = [ChatTurn(s.llm.chat_format, tools, ids, body.parallel_tool_calls) for _ in handles]
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_chat_stream(s, handles, turns, base, started, request, include_usage, body.logprobs),
                                 media_type="text/event-stream")
    choices = await asyncio.gather(*(_choice(s, i, h, t, started, request, body.logprobs)
                                     for i, (h, t) in enumerate(zip(handles, turns))))
    n_out = sum(t.tokens for t in turns)
    return await json_reply({**base, "object": "chat.completion", "choices": list(choices), "usage": {
        "prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out}})


async def _choice(s: ServerState, index: int, handle, turn: ChatTurn, started: float, request: Request,
                  want_logprobs: bool) -> dict:
    async for c in s.chunks(handle, started, request):
        turn.feed(c.text, len(c.token_ids), c.finish_reason)
    message, reason, _ = turn.finish()
    logprobs = await asyncio.to_thread(_logprobs, s, handle.seq, 0, len(handle.seq.output)) if want_logprobs else None
    return {"index": index, "message": message, "finish_reason": reason, "logprobs": logprobs}


def _logprobs(s: ServerState, seq, lo: int, hi: int) -> dict:
    """OpenAI's chat logprobs for output tokens [lo, hi) of a sequence (recorded by the engine as it sampled)."""
    tok = s.llm.tokenizer

    def entry(token: int, logprob: float) -> dict:
        text = tok.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in top.items()]}
                        for t, (lp, top) in zip(seq.output[lo:hi], seq.logprobs[lo:hi])]}


async def _chat_stream(s: ServerState, handles: list, turns: list[ChatTurn], base: dict, started: float,
                       request: Request, include_usage: bool, want_logprobs: bool = False):
    """SSE chunks of n choices as they decode (each with its index), their closing deltas, then usage."""
    head = {**base, "object": "chat.completion.chunk"}

    def delta(i: int, d: dict, reason: str | None = None, logprobs: dict | None = None) -> str:
        return sse({**head, "choices": [{"index": i, "delta": d, "finish_reason": reason, "logprobs": logprobs}]})

    for i in range(len(handles)):
        yield delta(i, {"role": "assistant", "content": ""})
    shown = [0] * len(handles)  # output tokens of each choice whose logprobs went out
    try:
        async for i, c in merged(s, handles, started, request):
            for d in turns[i].feed(c.text, len(c.token_ids), c.finish_reason):
                logprobs = None
                if want_logprobs and "content" in d:
                    seq, upto = handles[i].seq, len(handles[i].seq.output)
                    logprobs, shown[i] = _logprobs(s, seq, shown[i], upto), upto
                yield delta(i, d, logprobs=logprobs)
            if c.finish_reason is not None:
                yield delta(i, {}, turns[i].finish()[1])
    except ApiError as e:
        yield sse(error_body(e.message, e.kind))
        yield sse("[DONE]")
        return
    if include_usage:
        n_out = sum(t.tokens for t in turns)
        yield sse({**head, "choices": [], "usage": {"prompt_tokens": turns[0].prompt_tokens, "completion_tokens":
                                                    n_out, "total_tokens": turns[0].prompt_tokens + n_out}})
    yield sse("[DONE]")


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    """Mean (or, with "pooling": "last", last-token) pooling of the final hidden states, unit length."""
    s = state_of(request)
    s.check_model(body.model)
    check_text(body.input)
    if body.dimensions not in (None, s.llm.config.hidden_size):
        raise ApiError(400, f"this model's embeddings have {s.llm.config.hidden_size} dimensions; leave "
                            "'dimensions' out or send that number.")
    ids = await asyncio.to_thread(prompt_ids, body.input, s.llm)
    if max(map(len, ids)) > s.ctx:
        raise ApiError(400, f"an input has {max(map(len, ids))} tokens but the model's context is {s.ctx}; shorten it.")
    vectors = await s.worker.call(lambda: s.llm.embed(ids, body.pooling))  # on the engine thread: no race
    data = [{"object": "embedding", "index": i, "embedding": _encoded(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    n = sum(map(len, ids))
    return await json_reply({"object": "list", "data": data, "model": s.model_name,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})


def _encoded(vector, encoding: str):
    """float: a list of numbers; base64: little-endian float32 bytes, as OpenAI's client decodes them."""
    return vector.tolist() if encoding == "float" else base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()


def template_kwargs(body) -> dict:
    """A request's chat_template_kwargs (what the model's template reads: enable_thinking, ...)."""
    kwargs = body.chat_template_kwargs or {}
    reserved = sorted(set(kwargs) & RESERVED)
    if reserved:
        raise ApiError(400, f"chat_template_kwargs {reserved} are set by glmkit itself; leave them out.")
    return kwargs


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    s = state_of(request)
    s.check_model(body.model)
    check_text([body.messages, body.prompt])
    if body.messages is None and body.prompt is None:
        raise ApiError(400, "give 'prompt' (text) or 'messages'.")
    try:  # off the event loop, as every tokenization of client text
        ids = await asyncio.to_thread(_tokenize, s.llm, body)
    except Exception as e:  # noqa: BLE001 - malformed messages are the client's to fix
        raise render_error(e) from None
    return {"tokens": ids, "count": len(ids), "max_model_len": s.ctx}


def _tokenize(llm, body: TokenizeRequest) -> list[int]:
    if body.messages is not None:
        return llm.apply_chat_template(body.messages, **template_kwargs(body))
    # a raw tokenizer endpoint, like HF's and vLLM's: special-token text is parsed (lm-evaluation-harness finds
    # the EOS id this way); chat messages stay protected by their renderers
    ids = llm.tokenizer.encode(body.prompt, allow_special=True)
    return llm.chat_format.wrap_plain(ids) if body.add_special_tokens and llm.chat_format is not None else ids


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    s = state_of(request)
    s.check_model(body.model)
    if any(t < 0 or t >= s.llm.config.vocab_size for t in body.tokens):
        raise ApiError(400, f"token ids must lie in 0..{s.llm.config.vocab_size - 1}.")
    return {"prompt": s.llm.tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    s = state_of(request)
    llm = s.llm
    tok, eos = llm.tokenizer, sorted(s.worker.engine.stop_ids)
    name = lambda i: None if i is None else tok.decode([i])  # noqa: E731
    return {"tokenizer_class": type(tok).__name__, "model_max_length": s.ctx, "vocab_size": tok.vocab_size,
            "eos_token": name(eos[0]) if eos else None, "eos_token_ids": eos,
            "bos_token": name(llm.config.bos_token_id), "pad_token": name(llm.config.pad_token_id),
            "chat_format": llm.chat_format.name if llm.chat_format else None,
            "chat_template": getattr(llm.chat_format, "template", None)}
