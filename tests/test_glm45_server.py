"""GLM-4.5 ... 5.x thinking and XML tool calls through glmkit's server: the official `openai` client, LangChain and
the OpenAI Agents SDK against a deterministic scripted model (tests/scripted.py) behind the official GLM-4.6 and
GLM-4.7-Flash templates."""

from __future__ import annotations

import json

import pytest

from conftest import LiveServer
from scripted import GREETING, scripted_llm, write_glm45_checkpoint

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "days": {"type": "integer"}},
                                                "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time.",
                                        "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TEMPLATES = {"GLM-4.6.jinja": True, "GLM-4.7-Flash.jinja": False}  # template -> newlines between a call's tags


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def server(request, tmp_path_factory):
    directory = write_glm45_checkpoint(tmp_path_factory.mktemp("glm45") / "model", request.param)
    live = LiveServer(scripted_llm(directory, TEMPLATES[request.param]))
    yield live
    live.close()


def _stream(client, **kw) -> tuple[dict, list, str]:
    """A streamed chat completion put together: (message, the tool-call deltas as sent, finish reason)."""
    message = {"content": "", "reasoning_content": "", "tool_calls": []}
    pieces, reason = [], None
    for chunk in client.chat.completions.create(model="tiny", stream=True, **kw):
        choice = chunk.choices[0]
        delta, reason = choice.delta, choice.finish_reason or reason
        message["content"] += delta.content or ""
        message["reasoning_content"] += (delta.model_extra or {}).get("reasoning_content") or ""
        for call in delta.tool_calls or []:
            pieces.append(call)
            if call.index == len(message["tool_calls"]):
                message["tool_calls"].append({"id": call.id, "name": call.function.name, "arguments": ""})
            message["tool_calls"][call.index]["arguments"] += call.function.arguments or ""
    return message, pieces, reason


def test_the_checkpoint_reads_as_a_glm45_model(tmp_path):
    """The format comes from the template (XML calls), the stops from generation_config.json, and the think /
    tool tags (special tokens) survive decoding, so the parser sees them."""
    llm = scripted_llm(write_glm45_checkpoint(tmp_path / "m"), newlines=True)
    tok = llm.tokenizer
    assert llm.chat_format.name == "glm45"
    assert {tok.special[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>")} <= set(llm.stop_ids)
    done = llm.generate(llm.apply_chat_template(ASK, [WEATHER]), max_tokens=100)
    assert done.text.startswith("\n<think>The user needs get_weather") and "<tool_call>get_weather\n" in done.text
    assert done.finish_reason == "stop" and done.token_ids[-1] != tok.special["<|observation|>"]


def test_reasoning_and_tool_calls_arrive_as_openai_messages_and_deltas(server):
    client = server.client()
    whole = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, NOW])
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.model_extra["reasoning_content"] == "The user needs get_weather; I will call it."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}

    streamed, pieces, reason = _stream(client, messages=ASK, tools=[WEATHER, NOW])
    assert reason == "tool_calls" and streamed["content"] == ""
    assert streamed["reasoning_content"] == choice.message.model_extra["reasoning_content"]
    (got,) = streamed["tool_calls"]
    assert got["name"] == "get_weather" and got["arguments"] == call.function.arguments
    assert pieces[0].function.name == "get_weather" and pieces[0].id and pieces[0].function.arguments == ""
    assert len([p for p in pieces if p.function.arguments]) == 3  # {"city": ...  , "days": 3  }


def test_a_tool_result_goes_back_in(server):
    client = server.client()
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER]).choices[0].message
    call = first.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "reasoning_content": first.model_extra["reasoning_content"],
                      "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 °C"}]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER]).choices[0]
    assert answer.finish_reason == "stop" and answer.message.content == "The tool says: sunny, 21 °C"
    assert answer.message.model_extra["reasoning_content"] == "The tool answered."
    streamed, _, reason = _stream(client, messages=history, tools=[WEATHER])
    assert (streamed["content"], streamed["reasoning_content"], reason) == (
        "The tool says: sunny, 21 °C", "The tool answered.", "stop")


def test_tool_choice_is_enforced(server):
    """The script would call get_weather: a named choice makes it `now`; after a tool result the script would
    answer in text: 'required' makes it a call; 'none' leaves the tools out."""
    client = server.client()
    named = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, NOW],
                                           tool_choice={"type": "function", "function": {"name": "now"}}).choices[0]
    assert named.finish_reason == "tool_calls" and named.message.tool_calls[0].function.name == "now"
    assert json.loads(named.message.tool_calls[0].function.arguments) == {}
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "rain"}]
    required = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER],
                                              tool_choice="required").choices[0]
    assert required.finish_reason == "tool_calls" and required.message.tool_calls[0].function.name == "get_weather"
    assert "city" in json.loads(required.message.tool_calls[0].function.arguments)
    plain = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="none").choices[0]
    assert plain.finish_reason == "stop" and plain.message.content == GREETING


def test_thinking_can_be_switched_off(server):
    reply = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}],
        extra_body={"chat_template_kwargs": {"enable_thinking": False}}).choices[0].message
    assert reply.content == GREETING and not (reply.model_extra or {}).get("reasoning_content")


HOSTILE = ["<think>never closed", "</think></think>answer", "<tool_call>unknown_tool</tool_call>",
           "<tool_call>get_weather<arg_key>city</arg_key><arg_value>cut", "<tool_call>{not json}</tool_call>",
           "<think><tool_call>now</tool_call>", "<arg_key>a</arg_key><arg_value>b</arg_value>", "<<<>>>" * 20]


@pytest.mark.parametrize("text", HOSTILE)
def test_malformed_model_output_is_content_or_a_clean_finish(server, text):
    """Whatever the model writes, the reply is a well-formed message (streamed and not), never an error."""
    client = server.client()
    messages = [{"role": "user", "content": "Say: " + text}]
    whole = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, NOW]).choices[0]
    assert whole.finish_reason in ("stop", "tool_calls")
    streamed, _, reason = _stream(client, messages=messages, tools=[WEATHER, NOW])
    assert reason == whole.finish_reason
    assert streamed["content"] == (whole.message.content or "")
    assert streamed["reasoning_content"] == ((whole.message.model_extra or {}).get("reasoning_content") or "")
    assert [(c["name"], c["arguments"]) for c in streamed["tool_calls"]] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    if "unknown_tool" in text:  # not a call: the text stays (in the reasoning when the reply starts inside it)
        assert "<tool_call>unknown_tool</tool_call>" in streamed["content"] + streamed["reasoning_content"]


def test_langchain_bind_tools_round_trip(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="k", model="tiny", max_retries=0).bind_tools([get_weather])
    messages = [HumanMessage("What is the weather in Paris?")]
    ai = llm.invoke(messages)
    assert ai.tool_calls[0]["name"] == "get_weather" and ai.tool_calls[0]["args"] == {"city": "Paris"}
    messages += [ai, ToolMessage(get_weather.invoke(ai.tool_calls[0]["args"]), tool_call_id=ai.tool_calls[0]["id"])]
    assert llm.invoke(messages).content == "The tool says: sunny in Paris"
    chunks = list(llm.stream(messages[:1]))  # LangChain's own streaming assembly of tool-call deltas
    total = chunks[0]
    for c in chunks[1:]:
        total += c
    assert total.tool_calls[0]["name"] == "get_weather" and total.tool_calls[0]["args"] == {"city": "Paris"}


def test_openai_agents_sdk_round_trip(server):
    from agents import Agent, OpenAIChatCompletionsModel, RunConfig, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    seen = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"cloudy in {city}"

    model = OpenAIChatCompletionsModel(model="tiny", openai_client=AsyncOpenAI(base_url=server.url + "/v1",
                                                                               api_key="k", max_retries=0))
    agent = Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather], model=model)
    result = Runner.run_sync(agent, "What is the weather in Paris?", run_config=RunConfig(tracing_disabled=True))
    assert seen == ["Paris"] and result.final_output == "The tool says: cloudy in Paris"


def test_parallel_tool_calls_false_keeps_the_first_call(server):
    client = server.client()
    messages = [{"role": "user", "content": "Say: </think><tool_call>now</tool_call><tool_call>get_weather"
                                            "<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>"}]
    both = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, NOW]).choices[0].message
    assert [c.function.name for c in both.tool_calls] == ["now", "get_weather"]
    one = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, NOW],
                                         parallel_tool_calls=False).choices[0].message
    assert [c.function.name for c in one.tool_calls] == ["now"]
    streamed, _, reason = _stream(client, messages=messages, tools=[WEATHER, NOW], parallel_tool_calls=False)
    assert [c["name"] for c in streamed["tool_calls"]] == ["now"] and reason == "tool_calls"


@pytest.mark.parametrize("tty", [False, True])
def test_glmkit_chat_shows_reasoning_dimmed_then_the_answer(tmp_path, tty):
    """The terminal chat writes the reasoning (dimmed on a terminal), a blank line, then the answer; the
    conversation keeps the whole assistant message (reasoning included) for the next turn."""
    import io

    from glmkit.cli.chat import show

    class Out(io.StringIO):
        def isatty(self):
            return tty

    llm = scripted_llm(write_glm45_checkpoint(tmp_path / "m"), newlines=True)
    out = Out()
    reply, final, n = show(llm.chat([{"role": "user", "content": "Hi"}], stream=True), out, io.StringIO())
    dim, undim = ("\x1b[2m", "\x1b[0m") if tty else ("", "")
    assert out.getvalue() == f"{dim}A greeting is polite.{undim}\n\n{GREETING}"
    assert reply == GREETING and final.message["reasoning_content"] == "A greeting is polite."
    assert n == final.usage["completion_tokens"] > 0


def test_web_page_shows_reasoning_in_a_collapsible_block(tmp_path):
    """In headless chromium: the reasoning streams into a 'Reasoning' block, which closes once the answer
    starts; the answer is the message body; both survive a reload."""
    import shutil

    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium")
    assert browser_path, "Debian's chromium is needed for this test (scripts/setup --test installs it)"
    live = LiveServer(scripted_llm(write_glm45_checkpoint(tmp_path / "m"), newlines=True))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(live.url + "/")
            page.fill("#input", "Hi")
            page.press("#input", "Enter")
            page.wait_for_function("document.getElementById('send').hidden === false && "
                                   "document.querySelector('.msg.assistant .body').textContent.length > 0",
                                   timeout=20000)
            for _ in range(2):  # as streamed, then as stored and re-rendered after a reload
                think = page.locator(".msg.assistant details.think")
                assert think.is_visible() and think.get_attribute("open") is None
                assert page.inner_text(".msg.assistant details.think summary") == "Reasoning"
                assert page.text_content(".msg.assistant .reasoning") == "A greeting is polite."
                assert page.inner_text(".msg.assistant .body") == GREETING
                page.reload()
            browser.close()
    finally:
        live.close()
