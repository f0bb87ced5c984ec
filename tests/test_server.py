"""glmkit serve against the official `openai` client, raw HTTP and a real headless Chromium, on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import glmkit
from conftest import LLAMA_CONFIGS, LiveServer, make_hf_model
from vocab import GLM4_SPECIALS, build_tokenizer_json

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory, vocab_dirs):
    d = tmp_path_factory.mktemp("served")
    make_hf_model("llama", LLAMA_CONFIGS["gqa-bias"], vocab_size=500, seed=2,
                  max_position_embeddings=512).save_pretrained(d)
    for f in vocab_dirs["chatml"].iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def server(chatml_dir):
    live = LiveServer(glmkit.load(chatml_dir), api_keys=["k1", "k2"], max_batch=4, max_queue=32)
    yield live
    live.close()


def headers(key="k1"):
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------------------ openai client
def test_chat_plain_and_streamed(server):
    client = server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好 hello"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert plain.choices[0].message.role == "assistant" and plain.usage.completion_tokens <= 12
    assert plain.usage.prompt_tokens == len(glmkit.load(server.app.state.llm.source).apply_chat_template(messages))
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    events = list(stream)
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == plain.choices[0].message.content
    assert events[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [e.choices[0].finish_reason for e in events if e.choices and e.choices[0].finish_reason] == [
        plain.choices[0].finish_reason]


def test_completions_echo_logprobs_on_token_ids(server):
    llm = server.app.state.llm
    ids = [5, 17, 230, 41, 99, 7]
    out = server.client().completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    ref = torch.log_softmax(llm.logits(ids)[0].double(), dim=-1)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-5)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-5)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
    batch = server.client().completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=4, temperature=0,
                                               extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1] and batch.usage.completion_tokens == 8


def test_models_tokenize_detokenize(server):
    assert server.client().models.list().data[0].id == "tiny"
    t = httpx.post(server.url + "/tokenize", json={"prompt": "你好 world"}, headers=headers()).json()
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 512
    d = httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}, headers=headers()).json()
    assert d["prompt"] == "你好 world"
    info = httpx.get(server.url + "/tokenizer_info", headers=headers()).json()
    assert info["eos_token"] == "<|im_end|>" and info["model_max_length"] == 512


# ----------------------------------------------------------------------------------- bad input
BAD = [
    ("invalid JSON", dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    ("schema", dict(json={"model": "tiny", "messages": "hello"}), 400, "messages"),
    ("no messages", dict(json={"model": "tiny", "messages": []}), 400, "messages"),
    ("unknown model", dict(json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404, "gpt-9"),
    ("negative max_tokens", dict(json={"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}), 400,
     "max_tokens"),
    ("huge max_tokens", dict(json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 9}), 400,
     "exceeds the model's context of 512"),
    ("too long", dict(json={"messages": [{"role": "user", "content": "hello " * 600}]}), 400,
     r"the prompt has \d+ tokens but the model's context is 512"),
    ("bad role", dict(json={"messages": [{"role": "robot", "content": "x"}]}), 400, "role 'robot'"),
    ("image part", dict(json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}), 400,
     "'image_url' part, but this model reads text only"),
    ("too large", dict(content=b"x" * (5 << 20), headers={"content-type": "application/json"}), 413, "limit"),
]


@pytest.mark.parametrize("name,request_kw,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_then_good_request(server, name, request_kw, status, message):
    import re

    r = httpx.post(server.url + "/v1/chat/completions", headers={**headers(), **request_kw.pop("headers", {})},
                   **request_kw)
    assert r.status_code == status, r.text
    assert re.search(message, r.json()["error"]["message"]) and r.json()["error"]["type"]
    ok = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3)
    assert ok.choices[0].message.role == "assistant"


def test_busy_server_answers_503_with_retry_after(chatml_dir):
    live = LiveServer(glmkit.load(chatml_dir), max_batch=1, max_queue=0)
    try:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            body = {"prompt": "hello", "max_tokens": 400, "stream": True, "ignore_eos": True}
            with http.stream("POST", "/v1/completions", json=body) as first:
                lines = first.iter_lines()  # kept: a dropped iterator closes the stream (and frees the slot)
                next(lines)  # the first request holds the only slot
                second = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert second.status_code == 503 and second.headers["retry-after"] == "1"
            worker, deadline = live.app.state.worker, time.time() + 5
            while worker.admitted:  # the client left: its cancel reaches the engine between two steps
                assert time.time() < deadline, "the disconnected client kept its slot"
                time.sleep(0.02)
            after = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})  # the slot came back
            assert after.status_code == 200, after.text
    finally:
        live.close()


# ----------------------------------------------------------------------------------- concurrency
def stream_tokens(server, n: int) -> int:
    events = server.client().completions.create(model="tiny", prompt="the quick brown fox", max_tokens=n,
                                                stream=True, temperature=0.8, extra_body={"ignore_eos": True},
                                                stream_options={"include_usage": True})
    return [e.usage.completion_tokens for e in events if e.usage][-1]


def test_concurrent_streams_and_disconnects(server):
    engine = server.app.state.worker.engine
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(lambda _: stream_tokens(server, 20), range(16))) == [20] * 16
    with httpx.Client(base_url=server.url, headers=headers(), timeout=30) as http:
        for _ in range(3):  # clients that leave mid-stream
            body = {"prompt": "hello", "max_tokens": 300, "stream": True, "ignore_eos": True}
            with http.stream("POST", "/v1/completions", json=body) as r:
                next(r.iter_lines())
    deadline = time.time() + 10
    while engine.running or engine.waiting:
        assert time.time() < deadline, "a disconnected client kept its slot"
        time.sleep(0.05)
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(lambda _: stream_tokens(server, 8), range(16))) == [8] * 16
    metrics = httpx.get(server.url + "/metrics", headers=headers()).text
    assert "glmkit_time_to_first_token_seconds_count" in metrics and "glmkit_running_sequences 0.0" in metrics


# ------------------------------------------------------------------------------------------ auth
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                         ("POST", "/v1/completions"), ("POST", "/tokenize"), ("POST", "/detokenize"),
                                         ("GET", "/tokenizer_info"), ("GET", "/metrics")])
def test_auth_on_every_route(server, method, path):
    for h in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"}):
        r = httpx.request(method, server.url + path, headers=h, json={})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.request(method, server.url + path, headers=headers("k2"), json={}).status_code != 401


# ----------------------------------------------------------------------------------- reliability
PATHOLOGICAL = [{"temperature": 1e-40}, {"top_p": 1e-300}, {"repetition_penalty": 1e-300}, {"seed": 2 ** 64},
                {"temperature": 1e-40, "seed": 3}]


def test_a_pathological_request_never_harms_its_neighbours(server):
    """Three streams decode while requests with extreme sampling values arrive beside them: the streams all
    finish in full; each extreme request is answered (greedy below the floors) or refused with a 400."""
    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream_tokens, server, 40) for _ in range(3)]
        time.sleep(0.2)
        bad = [pool.submit(httpx.post, server.url + "/v1/completions", headers=headers(), timeout=60,
                           json={"prompt": "hello", "max_tokens": 8, **extra}) for extra in PATHOLOGICAL]
        assert [f.result() for f in streams] == [40] * 3
        answers = [f.result() for f in bad]
    assert [r.status_code for r in answers] == [200, 200, 400, 400, 200], [r.text for r in answers]
    assert all("out of range" in r.json()["error"]["message"] for r in answers if r.status_code == 400)


FORMER_500S = [  # (body, what the error says): each answered 400 in OpenAI's shape
    ({"messages": [{"role": "user", "content": "\ud800 lone"}]}, "lone UTF-16 surrogate"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 2 ** 64}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, ""),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": "x"}]}, {"role": "user", "content": "x"}]}, ""),
]


@pytest.mark.parametrize("body,message", FORMER_500S, ids=["surrogate", "seed", "empty tool", "bad tool call"])
def test_malformed_requests_are_4xx_in_openai_shape(server, body, message):
    raw = json.dumps({"model": "tiny", "max_tokens": 2, **body}).encode()  # ASCII JSON: a surrogate as \\ud800
    r = httpx.post(server.url + "/v1/chat/completions", headers={**headers(), "content-type": "application/json"},
                   content=raw)
    assert r.status_code in (200, 400), r.text  # a template may accept an empty tool; never a 500
    if r.status_code == 400:
        assert message in r.json()["error"]["message"] and r.json()["error"]["type"]


def test_framework_errors_are_openai_shaped(server):
    unknown = httpx.get(server.url + "/v1/nothing", headers=headers())
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    wrong = httpx.get(server.url + "/v1/chat/completions", headers=headers())
    assert wrong.status_code == 405 and "GET is not allowed" in wrong.json()["error"]["message"]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]  # text parts on a Jinja model
    ok = httpx.post(server.url + "/v1/chat/completions", headers=headers(), json={"messages": parts, "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_abandoned_queued_request_frees_its_place(tmp_path):
    """A non-streaming request whose client leaves while it waits in the queue is dropped at once."""
    from vocab import CHATML_SPECIALS

    tok = build_tokenizer_json(CHATML_SPECIALS)
    bigram_model(tmp_path, tok, [5], 5, context=65536, eos_token="<|im_end|>")  # a long context: a slow first reply
    live = LiveServer(glmkit.load(tmp_path), max_batch=1, max_queue=1)
    try:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            body = {"prompt": "hello", "max_tokens": 60000, "stream": True, "ignore_eos": True}
            with http.stream("POST", "/v1/completions", json=body) as first:
                lines = first.iter_lines()  # kept: a dropped iterator closes the stream
                next(lines)  # the first reply holds the only slot
                with pytest.raises(httpx.ReadTimeout):  # queued behind it, then the client gives up
                    httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=0.5)
                worker, deadline = live.app.state.worker, time.time() + 3
                while worker.admitted > 1:
                    assert time.time() < deadline, "the abandoned queued request kept its place"
                    time.sleep(0.02)
    finally:
        live.close()


def test_auth_details(chatml_dir):
    """The scheme is case-insensitive, an empty key is refused at start, and a 401 carries CORS headers."""
    from glmkit.errors import GlmkitError
    from glmkit.server.app import create_app

    llm = glmkit.load(chatml_dir)
    with pytest.raises(GlmkitError, match="an API key is empty"):
        create_app(llm, model_name="tiny", api_keys=[" "])
    live = LiveServer(llm, api_keys=["k1"], cors_origins=["http://page.example"])
    try:
        origin = {"Origin": "http://page.example"}
        assert httpx.get(live.url + "/v1/models", headers={"Authorization": "bearer k1"}).status_code == 200
        denied = httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer nope", **origin})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://page.example"
    finally:
        live.close()


# ----------------------------------------------------------------------------- GLM-4 tool calls
def bigram_model(directory, tok, chain: list[int], default: int, context: int = 4096, **special_tokens):
    """A deterministic test model: with attention and MLP outputs at zero and one-hot embeddings, the next
    token depends only on the current one: chain[i] -> chain[i + 1], anything else -> default."""
    from transformers import PreTrainedTokenizerFast

    V = tok.get_vocab_size()
    assert len(set(chain)) == len(chain), "a chain must not repeat a token"
    hf = make_hf_model("llama", dict(num_attention_heads=1, num_key_value_heads=1, head_dim=8, rope_theta=1e4),
                       vocab_size=V, hidden_size=V, intermediate_size=8, num_hidden_layers=1, seed=0,
                       max_position_embeddings=context)
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        hf.model.embed_tokens.weight.copy_(torch.eye(V))
        for norm in (hf.model.norm, hf.model.layers[0].input_layernorm, hf.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        head = torch.zeros(V, V)
        head[default, :] = 1.0
        for a, b in zip(chain, chain[1:]):
            head[:, a] = 0.0
            head[b, a] = 2.0
        hf.lm_head.weight.copy_(head)
    hf.save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens).save_pretrained(directory)
    return directory


def bigram_glm4_model(directory):
    """GLM-4 chat format (GLM-4 specials, no template): after <|assistant|> it writes a tool call."""
    tok = build_tokenizer_json(GLM4_SPECIALS)
    tok.add_tokens(["get_weather", '{"city": "北京"}'])  # so the call spells with distinct tokens
    call = tok.encode('get_weather\n{"city": "北京"}').ids
    chain = [tok.token_to_id("<|assistant|>")] + call + [tok.token_to_id("<|observation|>")]
    return bigram_model(directory, tok, chain, tok.token_to_id("<|endoftext|>"), eos_token="<|endoftext|>")


def test_glm4_tool_call_round_trip(tmp_path):
    llm = glmkit.load(bigram_glm4_model(tmp_path))
    assert llm.chat_format.name == "glm4"
    live = LiveServer(llm)
    try:
        client = live.client()
        messages = [{"role": "user", "content": "北京天气怎么样？"}]
        reply = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0)
        call = reply.choices[0].message.tool_calls[0]
        assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}
        stream = list(client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0,
                                                     stream=True))
        deltas = [d for e in stream for d in (e.choices[0].delta.tool_calls or [])]
        assert deltas[0].function.name == "get_weather" and json.loads(deltas[0].function.arguments) == {"city": "北京"}
        assert stream[-1].choices[0].finish_reason == "tool_calls"
        history = messages + [reply.choices[0].message.model_dump(exclude_none=True),
                              {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
        again = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, temperature=0)
        rendered = llm.tokenizer.decode(llm.apply_chat_template(history, TOOLS))
        assert '<|assistant|>get_weather\n{"city": "北京"}<|observation|>\n{"temperature": 21}' in rendered
        assert again.choices[0].finish_reason == "tool_calls"
        plain = client.chat.completions.create(model="tiny", messages=messages, temperature=0)  # no tools offered
        assert plain.choices[0].message.tool_calls is None and "get_weather" in plain.choices[0].message.content
    finally:
        live.close()


# -------------------------------------------------------------------------------- the web page
def test_web_page_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    from vocab import CHATML_SPECIALS, SMOLLM2_TEMPLATE

    browser_path = shutil.which("chromium")
    assert browser_path, "Debian's chromium is needed for this test (scripts/setup --test installs it)"
    tok = build_tokenizer_json(CHATML_SPECIALS)
    loop_token = next(i for i in range(tok.get_vocab_size())  # a model that repeats one word until stopped
                      if (w := tok.decode([i])).startswith(" ") and w[1:].isalpha() and len(w) > 2)
    twice = tok.decode([loop_token]) * 2
    # a long context: the reply must still be streaming when the test presses Stop, however fast decoding is
    bigram_model(tmp_path, tok, [loop_token], loop_token, context=65536, eos_token="<|im_end|>")
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    hf_tok.chat_template = SMOLLM2_TEMPLATE
    hf_tok.save_pretrained(tmp_path)
    live = LiveServer(glmkit.load(tmp_path), api_keys=["page-key"])
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"])
            page = browser.new_page()
            page.goto(live.url + "/")
            page.click("#gear")  # the settings panel: the API key and the system prompt
            page.fill("#s-key", "page-key")
            page.dispatch_event("#s-key", "change")
            page.fill("#s-system", "你是一个助手")
            page.fill("#input", "你好，请介绍一下你自己")
            page.press("#input", "Enter")
            assert "你好" in page.inner_text(".msg.user")
            # the reply streams in: its text grows while the Stop button is shown
            page.wait_for_function(f"document.querySelector('.msg.assistant .body').textContent.includes({twice.strip()!r})",
                                   timeout=20000)
            first = len(page.inner_text(".msg.assistant .body"))
            page.wait_for_function(f"document.querySelector('.msg.assistant .body').textContent.length > {first}",
                                   timeout=20000)
            assert page.is_visible("#stop") and not page.is_visible("#send")
            page.click("#stop")
            page.wait_for_function("document.getElementById('status').textContent === 'stopped'", timeout=10000)
            assert page.is_visible("#send")
            stored = page.evaluate("JSON.parse(localStorage.getItem('glmkit.chats'))")
            assert stored[0]["system"] == "你是一个助手" and [m["role"] for m in stored[0]["messages"]] == [
                "user", "assistant"]
            page.reload()  # conversations survive a reload
            assert "你好" in page.inner_text(".msg.user") and twice.strip() in page.inner_text(".msg.assistant")
            browser.close()
        deadline = time.time() + 5
        while live.app.state.worker.admitted:  # stopping in the browser freed the slot on the server
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        live.close()


def test_malformed_tools_on_native_glm_formats_are_400(tmp_path):
    """GLM-4's native renderer reads tool names and call arguments: malformed ones are the client's 400."""
    live = LiveServer(glmkit.load(bigram_glm4_model(tmp_path)))
    try:
        for extra in ({"tools": [{}]}, {"messages": [{"role": "user", "content": "x"},
                                                     {"role": "assistant", "tool_calls": [{"function": "x"}]},
                                                     {"role": "user", "content": "y"}]}):
            body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **extra}
            r = httpx.post(live.url + "/v1/chat/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
        assert httpx.post(live.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}).status_code == 200
    finally:
        live.close()


# ------------------------------------------------------------------------------------ schema fuzz
HOSTILE = [None, -1, 0, 2 ** 70, -(2 ** 70), 1e308, float("nan"), "x" * 5000, "", [], {}, [[[[[]]]]], True,
           "\ud800", {"type": "image_url"}, [{"role": "user"}], [1, "a", None], "<|im_end|>"]
ROUTES = {
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 2},
    "/tokenize": {"model": "tiny", "prompt": "hi"},
    "/detokenize": {"model": "tiny", "tokens": [1, 2]},
}
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed",
          "n", "stream", "stream_options", "tools", "tool_choice", "logprobs", "echo", "tokens", "presence_penalty",
          "repetition_penalty", "max_completion_tokens", "ignore_eos"]


def _send(client: httpx.Client, path: str, body) -> httpx.Response:
    raw = json.dumps(body, allow_nan=True).encode()  # NaN and lone surrogates go out as JSON allows them
    return client.post(path, content=raw, headers={**headers(), "content-type": "application/json"})


def test_schema_fuzz_never_answers_5xx(server):
    """Every route and field with hostile values (a few hundred requests): no 5xx but 503, OpenAI-shaped errors,
    and a good request answered after."""
    import random

    rng, seen = random.Random(0), 0
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for path, base in ROUTES.items():
            for field in FIELDS:
                for value in rng.sample(HOSTILE, 6):
                    r = _send(client, path, {**base, field: value})
                    seen += 1
                    assert r.status_code < 500 or r.status_code == 503, (path, field, value, r.status_code, r.text)
                    if r.status_code >= 400:
                        error = r.json()["error"]
                        assert isinstance(error["message"], str) and error["type"], (path, field, value, r.text)
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            r = client.request(method, "/v1/completions", headers=headers())
            assert r.status_code == 405 and "error" in r.json()
        for raw in (b"\xff\xfe not utf-8", b"[" * 5000 + b"]" * 5000, b'{"max_tokens": ' + b"9" * 4300 + b"}"):
            r = client.post("/v1/completions", content=raw, headers={**headers(), "content-type": "application/json"})
            assert 400 <= r.status_code < 500 and "error" in r.json(), r.text
    assert seen >= 400
    ok = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3)
    assert ok.choices[0].message.role == "assistant"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def test_disconnect_soak_leaks_no_slot_or_memory(server):
    """40 clients leave mid-stream or while queued, 8 at a time: afterwards nothing runs or waits, the worker's
    admission count is back to zero, and resident memory has not grown by more than 100 MB."""
    engine, worker = server.app.state.worker.engine, server.app.state.worker

    def leave(i: int) -> None:
        body = {"prompt": f"hello {i}", "max_tokens": 200, "stream": i % 2 == 0, "ignore_eos": True}
        try:
            with httpx.Client(base_url=server.url, headers=headers(), timeout=0.05 + 0.05 * (i % 4)) as http:
                if body["stream"]:
                    with http.stream("POST", "/v1/completions", json=body) as r:
                        lines = r.iter_lines()
                        for _ in range(i % 5):
                            next(lines)
                else:
                    http.post("/v1/completions", json=body)
        except httpx.TimeoutException:
            pass

    before = _rss_mb()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(leave, range(40)))
    deadline = time.time() + 10
    while engine.running or engine.waiting or worker.admitted:
        assert time.time() < deadline, "a client that left kept its slot or place"
        time.sleep(0.05)
    assert _rss_mb() - before < 100


def test_request_sizes_are_bounded(server):
    cases = [("/v1/completions", {"prompt": ["a"] * 129, "max_tokens": 1}, "at most 128 prompts"),
             ("/v1/completions", {"prompt": "a", "max_tokens": 1, "stop": ["x"] * 17}, "at most 16 stop strings"),
             ("/v1/completions", {"prompt": "a", "max_tokens": 1, "stop": "x" * 513}, "at most 16 stop strings"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS * 129}, "128")]
    for path, body, message in cases:
        r = httpx.post(server.url + path, headers=headers(), json=body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_longest_echo_logprobs_prompt_is_bounded(tmp_path):
    """An 8,000-token prompt with echo, logprobs 20 and max_tokens 0 (lm-evaluation-harness's loglikelihood
    request at its largest): memory stays bounded and the event loop keeps answering /health meanwhile."""
    from vocab import CHATML_SPECIALS

    tok = build_tokenizer_json(CHATML_SPECIALS)
    bigram_model(tmp_path, tok, [5], 5, context=16384, eos_token="<|im_end|>")
    live = LiveServer(glmkit.load(tmp_path))
    try:
        prompt = [5 + (i % 7) for i in range(8000)]
        before, slowest = _rss_mb(), 0.0
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(httpx.post, live.url + "/v1/completions", timeout=300,
                              json={"prompt": prompt, "echo": True, "logprobs": 20, "max_tokens": 0})
            while not job.done():
                t = time.time()
                assert httpx.get(live.url + "/health", timeout=5).status_code == 200
                slowest = max(slowest, time.time() - t)
                time.sleep(0.05)
            r = job.result()
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == 8000 and 1 <= len(lp["top_logprobs"][-1]) <= 20  # keyed by text
        assert slowest < 1.0, slowest
        assert _rss_mb() - before < 400
    finally:
        live.close()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_half_sent_request_is_closed_by_the_server(chatml_dir, parser):
    """A client that sends half a request line and stalls is disconnected after the header deadline; whole
    requests on the same server are unaffected. On both HTTP parsers: glmkit serve's (httptools, installed
    with glmkit) and the fallback (h11)."""
    import uvicorn

    from glmkit.server.app import create_app
    from glmkit.server.protocol import HeaderTimeoutH11, http_protocol

    protocol = http_protocol() if parser == "httptools" else HeaderTimeoutH11
    assert (parser in protocol.__mro__[2].__module__) and protocol.header_timeout == 10.0

    class Quick(protocol):
        header_timeout = 0.5

    app = create_app(glmkit.load(chatml_dir), model_name="tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", http=Quick))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as stalled:
            stalled.sendall(b"GET /hea")
            t = time.time()
            assert stalled.recv(100) == b""  # closed by the server
            assert time.time() - t < 3
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_requests_without_sampling_fields_take_the_server_defaults(chatml_dir):
    """What `glmkit serve --temperature 0` does: llm.defaults decide every field a request leaves out."""
    llm = glmkit.load(chatml_dir)
    llm.defaults.update(temperature=0.0)
    live = LiveServer(llm)
    try:
        body = {"prompt": "the quick brown fox", "max_tokens": 12, "ignore_eos": True}
        plain = [httpx.post(live.url + "/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(2)]
        greedy = httpx.post(live.url + "/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
        assert plain == [greedy, greedy]
        hot = {httpx.post(live.url + "/v1/completions", json={**body, "temperature": 2.0, "seed": s}).json()[
            "choices"][0]["text"] for s in range(3)}
        assert len(hot) > 1  # a request's own value still wins
    finally:
        live.close()


def test_model_route_logit_bias_and_jinja_tool_round_trip(server):
    client = server.client()
    assert client.models.retrieve("tiny").id == "tiny"
    missing = httpx.get(server.url + "/v1/models/gpt-9", headers=headers())
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    # logit_bias +100 makes greedy decoding pick one token every time; -100 bans the token it would pick first
    llm, tok = server.app.state.llm, server.app.state.llm.tokenizer
    fox = tok.encode(" fox")[-1]
    forced = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=4, temperature=0,
                                       logit_bias={str(fox): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == tok.decode([fox] * 4)
    ids = tok.encode("the quick brown fox")
    first = llm.generate(ids, max_tokens=1, temperature=0, ignore_eos=True).token_ids[0]
    banned = llm.generate(ids, max_tokens=8, temperature=0, ignore_eos=True, logit_bias={first: -100}).token_ids
    assert first not in banned
    bad = httpx.post(server.url + "/v1/completions", headers=headers(),
                     json={"prompt": "x", "max_tokens": 1, "logit_bias": {"999999": -100}})
    assert bad.status_code == 400 and "logit_bias" in bad.json()["error"]["message"]
    # a tool round trip on a Jinja-template model: the assistant's tool call has content None
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [{"role": "user", "content": "weather in Paris?"}, {"role": "assistant", "content": None,
                                                                  "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    reply = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=3)
    assert reply.choices[0].message.role == "assistant"


def test_serve_checks_the_port_before_loading(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "glmkit", "serve", str(tmp_path / "never-loaded"), "--port",
                              str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out.stderr and "loading" not in out.stderr


def test_chat_logprobs_equal_the_reference_forward(server):
    llm = server.app.state.llm
    messages = [{"role": "user", "content": "hello there"}]
    reply = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                    logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    prompt = llm.apply_chat_template(messages)
    out = llm.generate(prompt, max_tokens=6, temperature=0, ignore_eos=True).token_ids  # the same greedy tokens
    assert len(content) == len(out) == 6
    for i, (entry, token) in enumerate(zip(content, out)):
        reference = torch.log_softmax(llm.logits(prompt + out[:i])[0, -1].double(), dim=-1)
        assert abs(entry.logprob - float(reference[token])) < 1e-4
        assert len(entry.top_logprobs) <= 2 and entry.top_logprobs[0].logprob == pytest.approx(
            float(reference.max()), abs=1e-4)
    streamed = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                       logprobs=True, stream=True, extra_body={"ignore_eos": True})
    values = [e.logprob for ev in streamed if ev.choices and ev.choices[0].logprobs
              for e in ev.choices[0].logprobs.content]
    assert values == pytest.approx([e.logprob for e in content], abs=1e-6)


def test_sigterm_ends_streams_in_flight_at_once(tmp_path):
    """`glmkit serve` on SIGTERM: a stream in flight ends within 2 s with a finish chunk of its own ('abort') and
    [DONE], and the process exits."""
    import signal

    from vocab import CHATML_SPECIALS

    bigram_model(tmp_path, build_tokenizer_json(CHATML_SPECIALS), [5], 5, context=65536, eos_token="<|im_end|>")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "glmkit", "serve", str(tmp_path), "--port", str(port), "--eager"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.2)
        body = {"prompt": "hello", "max_tokens": 60000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            t = time.time()
            rest = [line for line in lines if line]
            assert time.time() - t < 2
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "abort"
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
    finally:
        if proc.poll() is None:
            proc.kill()


def test_n_choices(server):
    """n choices, plain and streamed (chat and completions): seeded samples repeat, greedy ones agree."""
    client = server.client()
    messages = [{"role": "user", "content": "hello"}]
    three = client.chat.completions.create(model="tiny", messages=messages, n=3, max_tokens=5, temperature=1.0,
                                           seed=11, extra_body={"ignore_eos": True})
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.usage.completion_tokens == 15 and three.usage.prompt_tokens == len(
        server.app.state.llm.apply_chat_template(messages))
    assert len({c.message.content for c in three.choices}) > 1  # each its own sample (seed, seed + 1, ...)
    again = client.chat.completions.create(model="tiny", messages=messages, n=3, max_tokens=5, temperature=1.0,
                                           seed=11, extra_body={"ignore_eos": True})
    assert [c.message.content for c in again.choices] == [c.message.content for c in three.choices]
    greedy = client.completions.create(model="tiny", prompt=["a b", "c d"], n=2, max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(greedy.choices, key=lambda c: c.index)]
    assert len(texts) == 4 and texts[0] == texts[1] and texts[2] == texts[3] and greedy.usage.completion_tokens == 16
    streamed = client.chat.completions.create(model="tiny", messages=messages, n=3, max_tokens=5, temperature=1.0,
                                              seed=11, stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True})
    pieces, reasons, usage = {0: "", 1: "", 2: ""}, {}, None
    for chunk in streamed:
        usage = chunk.usage or usage
        for c in chunk.choices:
            pieces[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    assert [pieces[i] for i in range(3)] == [c.message.content for c in three.choices]  # the same samples
    assert reasons == {0: "length", 1: "length", 2: "length"} and usage.completion_tokens == 15
    text_stream = client.completions.create(model="tiny", prompt="a b", n=2, max_tokens=4, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    by_index = {0: "", 1: ""}
    for chunk in text_stream:
        by_index[chunk.choices[0].index] += chunk.choices[0].text
    assert by_index[0] == by_index[1] == texts[0]


def test_n_beyond_capacity_admits_none(tmp_path):
    """n choices are admitted all or none: a 503 leaves no sample of the request running."""
    from transformers import AutoTokenizer

    from vocab import CHATML_SPECIALS, SMOLLM2_TEMPLATE

    tok = build_tokenizer_json(CHATML_SPECIALS)
    bigram_model(tmp_path, tok, [5], 5, context=65536, eos_token="<|im_end|>")  # samples that would run for long
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    hf_tok.chat_template = SMOLLM2_TEMPLATE
    hf_tok.save_pretrained(tmp_path)
    live = LiveServer(glmkit.load(tmp_path), max_batch=1, max_queue=1)
    try:
        chat = {"messages": [{"role": "user", "content": "hi"}], "n": 3}
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", {"prompt": "hi", "n": 3}),
                           ("/v1/completions", {"prompt": ["a", "b", "c"]})):
            r = httpx.post(live.url + path, json={**body, "max_tokens": 60000, "ignore_eos": True})
            assert r.status_code == 503, r.text
        deadline = time.time() + 3
        while live.app.state.worker.admitted:
            assert time.time() < deadline, "part of a refused n request kept running"
            time.sleep(0.02)
    finally:
        live.close()


def test_access_log_has_one_line_per_request_with_tokens_and_speed(chatml_dir, caplog):
    import logging

    live = LiveServer(glmkit.load(chatml_dir), access_log="json")
    try:
        with caplog.at_level(logging.INFO, logger="glmkit.access"):
            stream = live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                           max_tokens=6, temperature=0, stream=True,
                                                           extra_body={"ignore_eos": True})
            streamed = sum(1 for _ in stream)
            httpx.get(live.url + "/v1/nowhere")
            deadline = time.time() + 5
            while len(caplog.records) < 2 and time.time() < deadline:
                time.sleep(0.05)
    finally:
        live.close()
    chat, missing = (json.loads(r.getMessage()) for r in caplog.records[:2])
    assert streamed > 0 and chat["path"] == "/v1/chat/completions" and chat["status"] == 200
    assert chat["completion_tokens"] == 6 and chat["prompt_tokens"] > 0 and chat["ttft_s"] > 0
    assert chat["tokens_per_s"] > 0 and chat["duration_s"] >= chat["ttft_s"]
    assert missing["path"] == "/v1/nowhere" and missing["status"] == 404 and missing["completion_tokens"] == 0
    from glmkit.server.access import AccessLog, RequestStats

    text = AccessLog(None).line({"method": "POST", "path": "/v1/completions", "client": ("1.2.3.4", 5)}, 200,
                                time.time() - 1, RequestStats(10, 5, time.time() - 0.5, time.time()))
    assert text.startswith('1.2.3.4 "POST /v1/completions" 200 prompt=10 completion=5 ttft=') and "tok/s" in text


def test_embeddings_equal_pooled_transformers_hidden_states(server, chatml_dir):
    """/v1/embeddings through the openai client (floats and base64) against transformers' final hidden states,
    mean- and last-pooled, unit length; the token counts and the 400s."""
    import base64

    import numpy as np
    import openai
    from transformers import AutoModel, AutoTokenizer

    client = server.client()
    texts = ["hello world", "你好，世界", "a"]
    got = client.embeddings.create(model="tiny", input=texts)
    got64 = client.embeddings.create(model="tiny", input=texts, encoding_format="base64")
    last = client.embeddings.create(model="tiny", input=texts, extra_body={"pooling": "last"})
    tok, hf = AutoTokenizer.from_pretrained(chatml_dir), AutoModel.from_pretrained(chatml_dir).eval()
    for i, text in enumerate(texts):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            h = hf(input_ids=ids).last_hidden_state[0]  # (T, C)
        for response, want in ((got, h.mean(0)), (got64, h.mean(0)), (last, h[-1])):
            vector = response.data[i].embedding  # explicit base64 comes back as the string the server sent
            vector = torch.tensor(vector if isinstance(vector, list) else
                                  np.frombuffer(base64.b64decode(vector), "<f4").copy())
            torch.testing.assert_close(vector, torch.nn.functional.normalize(want, dim=0), atol=1e-5, rtol=0)
    assert got.usage.prompt_tokens == sum(len(tok(t).input_ids) for t in texts)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="tiny", input="x", dimensions=3)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.embeddings.create(model="tiny", input=[[1] * 600])


def test_chat_template_kwargs_reach_the_template(server):
    """`chat_template_kwargs` in a request (as vLLM accepts it) reaches the model's Jinja template: a variable the
    template reads changes the prompt; the names glmkit sets itself are refused."""
    llm = server.app.state.llm
    messages = [{"role": "user", "content": "hi"}]
    plain = httpx.post(server.url + "/tokenize", headers=headers(), json={"messages": messages}).json()["tokens"]
    assert plain == llm.apply_chat_template(messages)
    refused = httpx.post(server.url + "/v1/chat/completions", headers=headers(),
                         json={"messages": messages, "chat_template_kwargs": {"add_generation_prompt": False}})
    assert refused.status_code == 400 and "set by glmkit itself" in refused.json()["error"]["message"]
    done = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                                   extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert done.usage.prompt_tokens == len(plain)  # SmolLM2's template reads no such variable: same prompt


def engine_steps(url: str) -> dict[str, float]:
    """The engine's steps by path, as /metrics reports them."""
    lines = httpx.get(url + "/metrics").text.splitlines()
    return {line.split('"')[1]: float(line.split()[-1]) for line in lines if line.startswith("glmkit_engine_steps{")}


@pytest.mark.slow
def test_the_server_decodes_compiled_once_the_step_is_ready(chatml_dir, tmp_path, monkeypatch):
    """A server decodes eagerly while its compiled step builds in the background (export traces a twin of the
    model, so requests meanwhile never meet its fake tensors), then through the compiled step (/metrics counts
    the engine's steps by path); greedy replies are the same all along (float32)."""
    monkeypatch.setenv("GLMKIT_HOME", str(tmp_path / "home"))
    llm = glmkit.load(chatml_dir)
    decoder = llm.compile(background=True, batched=False)  # as glmkit serve starts it (batched: test_compiled)
    live = LiveServer(llm, max_batch=4)
    try:
        client = live.client()

        def ask() -> str:
            return client.completions.create(model="tiny", prompt="The lighthouse", max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text

        before = ask()
        assert not decoder.ready and engine_steps(live.url)["eager"] >= 11
        assert httpx.get(live.url + "/health").json() == {"status": "ok", "decode": ["eager"]}
        deadline = time.time() + 600
        while not decoder.ready and time.time() < deadline:  # requests all through the export and the build
            assert ask() == before
        assert decoder.wait(10), decoder.error
        assert httpx.get(live.url + "/health").json() == {"status": "ok", "decode": ["compiled"]}
        assert ask() == before
        steps = engine_steps(live.url)
        assert steps["compiled"] >= 11 and steps["compiled_rows"] == 0, steps
    finally:
        live.close()
