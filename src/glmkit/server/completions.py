"""/v1/completions: OpenAI's four prompt shapes, echo, logprobs (prompt ones from the reference forward, run on
the engine thread), streaming, `max_tokens: 0` as lm-evaluation-harness sends it, and GLM blank infilling
for prompts with [MASK] on ChatGLM-6B-architecture models.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from glmkit.server.schema import CompletionRequest, error_body
from glmkit.server.state import ApiError, ServerState, check_text, json_reply, merged, sse, state_of

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    s = state_of(request)
    s.check_model(body.model)
    s.metrics.requests.labels("completions").inc()
    check_text([body.prompt, body.stop])
    if _is_infill(body.prompt, s.llm):
        return await _infill(s, body, request)
    prompts = await asyncio.to_thread(prompt_ids, body.prompt, s.llm)  # tokenizing a long prompt: off the event loop
    if len(prompts) > 1 and body.stream:
        raise ApiError(400, "stream=true takes a single prompt.")
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    grammar = await s.grammar(body)
    rid, started = f"cmpl-{uuid.uuid4().hex[:24]}", time.time()
    head = {"id": rid, "object": "text_completion", "created": int(started), "model": s.model_name}
    if body.stream:
        return StreamingResponse(_stream(s, prompts[0], body, max_tokens, grammar, head, started, request),
                                 media_type="text/event-stream")
    jobs = [(i * body.n + j, p) for i, p in enumerate(prompts) for j in range(body.n)]  # (choice index, prompt)
    params = [s.with_seed(s.sampling(body, max_tokens, len(p), logprobs=body.logprobs, grammar=grammar), index % body.n)
              for index, p in jobs]  # every prompt checked before any is admitted
    handles = s.admit_all([(p, sp) for (_, p), sp in zip(jobs, params)]) if max_tokens > 0 else [None] * len(jobs)
    choices = await asyncio.gather(*(_complete(s, index, p, handle, body, started, request)
                                     for (index, p), handle in zip(jobs, handles)))
    n_prompt, n_gen = sum(len(p) for p in prompts), sum(c.pop("_n") for c in choices)
    return await json_reply({**head, "choices": choices, "usage": {
        "prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}})


async def _infill(s: ServerState, body: CompletionRequest, request: Request) -> dict:
    """GLM blank infilling: each [MASK] is generated after <sop> at the blank's position and spliced in,
    left to right; the choice's text is the whole prompt with its blanks filled (fills lists the spans)."""
    if body.stream or body.echo or body.logprobs is not None or body.response_format is not None:
        raise ApiError(400, "prompts with [MASK] (blank infilling) take no stream, echo, logprobs or response_format.")
    llm, started = s.llm, time.time()
    c, ids = llm.config, llm.tokenizer.encode(body.prompt, allow_special=True)
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    fills, n_prompt, n_gen, reason = [], 0, 0, "stop"
    while c.mask_token_id in ids:
        prompt = ids + [c.sop_token_id]
        handle = s.admit(prompt, s.sampling(body, max_tokens, len(prompt)))
        out = []
        async for chunk in s.chunks(handle, started, request):
            out += chunk.token_ids
            reason = chunk.finish_reason or reason
        ids = llm.fill_first_blank(ids, out)
        fills.append(llm.tokenizer.decode(out, skip_special=True))
        n_prompt, n_gen = n_prompt + len(prompt), n_gen + len(out)
    choice = {"index": 0, "text": llm.tokenizer.decode(ids, skip_special=True), "finish_reason": reason,
              "logprobs": None, "fills": fills}
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(started),
            "model": s.model_name, "choices": [choice],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}


async def _complete(s: ServerState, index: int, prompt: list[int], handle, body: CompletionRequest,
                    started: float, request: Request) -> dict:
    """One choice: its admitted sequence's text (handle None: max_tokens 0, nothing generated), echo, logprobs."""
    want = body.logprobs
    out, seq, reason = [], None, "length"
    if handle is not None:
        async for c in s.chunks(handle, started, request):
            out += c.token_ids
            reason = c.finish_reason or reason
        seq = handle.seq
    tok = s.llm.tokenizer
    text = tok.decode(out, skip_special=True) if out else ""
    logprobs = None
    if want is not None:
        entries = await s.worker.call(lambda: s.llm.prompt_logprobs(prompt, want)) if body.echo else []
        entries += [(t, lp, top) for t, (lp, top) in zip(out, seq.logprobs if seq else [])]
        logprobs = await asyncio.to_thread(_logprob_block, entries, tok)  # a token's text each: off the event loop
    if body.echo:
        text = tok.decode(prompt, skip_special=False) + text
    return {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs, "_n": len(out)}


async def _stream(s: ServerState, prompt: list[int], body: CompletionRequest, max_tokens: int, grammar, head: dict,
                  started: float, request: Request):
    try:
        params = s.sampling(body, max_tokens, len(prompt), grammar=grammar)
        handles = s.admit_all([(prompt, s.with_seed(params, i)) for i in range(body.n)])  # n samples, one prefill
        n = 0
        async for i, c in merged(s, handles, started, request):
            n += len(c.token_ids)
            yield sse({**head, "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                                            "logprobs": None}]})
        if (body.stream_options or {}).get("include_usage"):
            yield sse({**head, "choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": n,
                                                        "total_tokens": len(prompt) + n}})
    except ApiError as e:
        yield sse(error_body(e.message, e.kind))
    yield sse("[DONE]")


def _is_infill(prompt, llm) -> bool:
    """A text prompt with [MASK] for a GLM (ChatGLM-6B-architecture) model asks for blank infilling."""
    c = llm.config
    return isinstance(prompt, str) and "[MASK]" in prompt and c.positions == "2d" and c.mask_token_id is not None \
        and c.sop_token_id is not None and llm.tokenizer is not None


def prompt_ids(prompt, llm) -> list[list[int]]:
    """OpenAI's four prompt shapes (also /v1/embeddings' inputs) -> token id lists."""
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


def _logprob_block(entries, tok) -> dict[str, Any]:
    """OpenAI completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
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
