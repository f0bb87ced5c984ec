"""The chat page in Debian's headless Chromium: the phone layout, dark mode, markdown (tables, lists, highlighted
code with a copy button, math) rendered by the vendored libraries, model output that cannot run script,
regenerate, edit-and-resend, settings that reach the request, the model name, and a server killed mid-reply.
The replies come from the scripted GLM-4.5-format model ("Say: TEXT" answers TEXT)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import LiveServer
from scripted import scripted_llm, write_glm45_checkpoint

MARKDOWN = ("| name | value |\n|---|---|\n| a | 1 |\n\n1. first\n2. second\n\n```python\ndef f(x):\n    return x * 2\n```\n\n"
            "Energy: $E = mc^2$")
HOSTILE = ('<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>[click](javascript:window.__xss=3) '
           '<svg onload="window.__xss=4"></svg>')


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    path = shutil.which("chromium")
    assert path, "Debian's chromium is needed for this test (scripts/setup --test installs it)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = LiveServer(scripted_llm(write_glm45_checkpoint(tmp_path_factory.mktemp("page") / "m"), True))
    yield server
    server.close()


def ask(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function("document.getElementById('send').hidden === false && "
                           "document.querySelectorAll('.msg.assistant').length > 0", timeout=20000)


def test_phone_layout_and_dark_mode(browser, live):
    context = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark")
    page = context.new_page()
    page.goto(live.url + "/")
    width = page.evaluate("document.querySelector('main').getBoundingClientRect().width")
    assert width >= 0.9 * 390 and not page.is_visible("aside")
    page.click("#menu")  # the conversations slide in over the chat, and go again
    assert page.is_visible("aside")
    page.click("#scrim", position={"x": 380, "y": 400})  # beside the drawer
    assert not page.is_visible("aside")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(23, 24, 28)"
    page.click("#theme")  # system -> dark (same) -> light
    page.click("#theme")
    assert page.evaluate("document.documentElement.dataset.theme") == "light"
    assert page.inner_text("#model") == "tiny"  # from /v1/models
    context.close()


def test_markdown_and_hostile_output(browser, live):
    page = browser.new_page()
    page.goto(live.url + "/")
    ask(page, "Say: " + MARKDOWN)
    reply = page.locator(".msg.assistant .body")
    assert reply.locator("table td").all_inner_texts() == ["a", "1"]
    assert reply.locator("ol li").all_inner_texts() == ["first", "second"]
    assert reply.locator("pre code.hljs span").count() > 0  # highlighted
    assert page.inner_text(".msg.assistant .codebar span") == "python"
    assert reply.locator(".codebar button.copy").count() == 1
    assert reply.locator(".katex").count() == 1 and reply.locator(".katex annotation").text_content() == "E = mc^2"
    assert page.locator(".msg.assistant .stats").inner_text().endswith("tokens/s")
    ask(page, "Say: " + HOSTILE)
    time.sleep(0.5)
    assert page.evaluate("window.__xss") is None
    assert page.locator(".msg.assistant [onerror], .msg.assistant script, .msg.assistant [onload]").count() == 0
    assert page.locator(".msg.assistant a[href^='javascript']").count() == 0
    page.close()


def test_regenerate_edit_and_settings(browser, live):
    page = browser.new_page()
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    page.goto(live.url + "/")
    page.click("#gear")
    page.fill("#s-temperature", "0.3")
    page.dispatch_event("#s-temperature", "change")
    page.fill("#s-max_tokens", "40")
    page.dispatch_event("#s-max_tokens", "change")
    ask(page, "Say: one")
    assert bodies[-1]["temperature"] == 0.3 and bodies[-1]["max_tokens"] == 40
    ask(page, "Say: two")
    page.click(".msg.assistant >> nth=-1 >> button.regenerate")
    page.wait_for_function("document.getElementById('send').hidden === false && document.querySelectorAll('.msg').length === 4")
    assert len(bodies) == 3 and page.locator(".msg.assistant .body").all_inner_texts()[-1] == "two"
    page.once("dialog", lambda d: d.accept("Say: edited"))
    page.click(".msg.user >> nth=0 >> button.edit")
    page.wait_for_function("document.querySelectorAll('.msg').length === 2 && "
                           "document.getElementById('send').hidden === false")
    assert bodies[-1]["messages"] == [{"role": "user", "content": "Say: edited"}]  # truncated, then resent
    assert page.inner_text(".msg.assistant .body") == "edited"
    page.click(".msg.assistant >> nth=0 >> button.delete")
    assert page.locator(".msg").count() == 1
    page.close()


def test_a_killed_server_keeps_the_partial_reply(browser, tmp_path):
    """`glmkit serve` killed while a reply streams: the page keeps what arrived and says the server is
    unreachable; a wrong key is said as such and the unanswered message goes back to the input box."""
    from test_server import build_tokenizer_json, bigram_model
    from vocab import CHATML_SPECIALS, SMOLLM2_TEMPLATE
    from transformers import AutoTokenizer

    tok = build_tokenizer_json(CHATML_SPECIALS)
    loop = next(i for i in range(tok.get_vocab_size()) if (w := tok.decode([i])).startswith(" ") and w[1:].isalpha())
    bigram_model(tmp_path, tok, [loop], loop, context=65536, eos_token="<|im_end|>")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    hf_tok.chat_template = SMOLLM2_TEMPLATE
    hf_tok.save_pretrained(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "glmkit", "serve", str(tmp_path), "--port", str(port), "--eager",
                             "--api-key", "right"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "GLMKIT_HOME": str(tmp_path / "home")}, start_new_session=True)
    try:
        import httpx

        deadline = time.time() + 120
        while True:
            assert time.time() < deadline and proc.poll() is None
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.click("#gear")
        page.fill("#s-key", "wrong")
        page.dispatch_event("#s-key", "change")
        page.fill("#input", "hello there")
        page.press("#input", "Enter")
        page.wait_for_function("document.getElementById('status').textContent.includes('API key')", timeout=20000)
        assert page.input_value("#input") == "hello there" and page.locator(".msg").count() == 0  # not duplicated
        page.fill("#s-key", "right")
        page.dispatch_event("#s-key", "change")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelector('.msg.assistant .body')?.textContent.length > 20", timeout=30000)
        os.killpg(proc.pid, signal.SIGKILL)
        page.wait_for_function("document.getElementById('status').textContent === 'server unreachable'", timeout=20000)
        kept = page.evaluate("JSON.parse(localStorage.getItem('glmkit.chats'))[0].messages")
        assert [m["role"] for m in kept] == ["user", "assistant"] and len(kept[1]["content"]) > 20
        assert "server unreachable" in page.inner_text(".msg.assistant")
        page.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_conversations_search_rename_export_import(browser, live, tmp_path):
    page = browser.new_page()
    page.goto(live.url + "/")
    ask(page, "Say: apples")
    page.click("#new")
    ask(page, "Say: pears")
    assert page.locator("#list li").count() == 2
    page.fill("#search", "apples")  # the text of the messages is searched, not only the titles
    assert page.locator("#list li").all_inner_texts()[0].startswith("Say: apples") and page.locator("#list li").count() == 1
    page.fill("#search", "")
    page.dispatch_event("#search", "input")
    page.once("dialog", lambda d: d.accept("Fruit talk"))
    page.click("#list li.active button[title=rename]")
    assert "Fruit talk" in page.inner_text("#list li.active")
    with page.expect_download() as download:
        page.click("#export")
    exported = tmp_path / "chats.json"
    download.value.save_as(exported)
    page.evaluate("localStorage.clear()")
    page.reload()
    page.set_input_files("#importfile", str(exported))
    page.wait_for_function("document.querySelectorAll('#list li').length === 3")  # the new empty chat and the two
    titles = page.locator("#list li span").all_inner_texts()
    assert "Fruit talk" in titles and any(t.startswith("Say: apples") for t in titles)
    page.close()
