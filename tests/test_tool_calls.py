"""Tool-call parsing: round trips, and malformed or hostile output that must stay plain text."""

from __future__ import annotations

import json

import pytest

from glmkit.chat.tools import format_chatglm3_call, parse_chatglm3, parse_glm4

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}},
         {"type": "function", "function": {"name": "search", "parameters": {}}}]
ARGS = [{"city": "北京"}, {"q": "emoji 😀", "n": 3, "exact": True, "x": None, "f": 1.5},
        {"nested": {"a": [1, 2, {"b": "c"}]}, "quote": 'say "hi"\n'}]


@pytest.mark.parametrize("args", ARGS)
def test_glm4_round_trip(args):
    text = "search\n" + json.dumps(args, ensure_ascii=False)
    call = parse_glm4(text, TOOLS)["tool_calls"][0]["function"]
    assert call["name"] == "search" and json.loads(call["arguments"]) == args


@pytest.mark.parametrize("args", ARGS)
def test_chatglm3_round_trip(args):
    call = parse_chatglm3("search\n" + format_chatglm3_call(args), TOOLS)["tool_calls"][0]["function"]
    assert call["name"] == "search" and json.loads(call["arguments"]) == args


def test_chatglm3_reference_spelling():
    reply = parse_chatglm3('get_weather\n ```python\ntool_call(location="beijing", unit="celsius")\n```', TOOLS)
    assert json.loads(reply["tool_calls"][0]["function"]["arguments"]) == {"location": "beijing", "unit": "celsius"}


@pytest.mark.parametrize("text", [
    'get_weather\n{"city": "北京"',  # bad JSON
    'unknown_tool\n{"city": "北京"}',  # not a tool we offered
    'get_weather\n["a", "list"]',  # arguments must be an object
    "get_weather\nno json here",
    "\nplain reply",
])
def test_glm4_malformed_is_content(text):
    reply = parse_glm4(text, TOOLS)
    assert "tool_calls" not in reply and reply["content"]


@pytest.mark.parametrize("code", [
    '```python\n__import__("os").system("touch /tmp/pwned")\n```',
    '```python\ntool_call(city=__import__("os").getcwd())\n```',
    '```python\ntool_call(city=open("/etc/passwd").read())\n```',
    "```python\ntool_call(*[1, 2])\n```",
    "```python\ntool_call(**{'a': 1})\n```",
    "```python\nos.tool_call(a=1)\n```",
    "```python\ntool_call(a=1); print(2)\n```",
    "```python\nprint('not a call')\n```",
    "```python\ntool_call(a=1\n```",  # syntax error
    "```python\ntool_call(a=lambda: 1)\n```",
    "not code at all",
])
def test_chatglm3_malformed_or_hostile_is_content(tmp_path, code):
    reply = parse_chatglm3("get_weather\n" + code, TOOLS)
    assert "tool_calls" not in reply and reply["content"] == ("get_weather\n" + code).strip()


def test_unknown_tool_name_in_chatglm3_is_content():
    reply = parse_chatglm3('nope\n```python\ntool_call(a=1)\n```', TOOLS)
    assert "tool_calls" not in reply


def test_plain_replies_drop_the_empty_metadata_line():
    assert parse_chatglm3("\n你好！", TOOLS) == {"role": "assistant", "content": "你好！"}
    assert parse_glm4("\n你好！", None) == {"role": "assistant", "content": "你好！"}


def test_glm4_replies_stream_content_early_and_calls_at_the_end(vocab_dirs):
    """GLM-4 and ChatGLM3 go through the same stream-parser API: a reply that cannot be a call streams as it
    arrives; one whose first line names a tool waits and ends as a tool-call delta equal to parse_reply's."""
    from glmkit.chat import ChatGLM3Format, GLM4Format
    from glmkit.tokenizer import load_tokenizer

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    for fmt, call in ((GLM4Format(load_tokenizer(vocab_dirs["glm4"])), 'get_weather\n{"city": "Oslo"}'),
                      (ChatGLM3Format(load_tokenizer(vocab_dirs["v3"])),
                       'get_weather\n```python\ntool_call(city="Oslo")\n```')):
        parser = fmt.stream_parser(tools)
        early = [d for ch in "\nIt is sunny in Oslo today." for d in parser.feed(ch)]
        assert "".join(d["content"] for d in early) == "It is sunny in Oslo today."
        assert "".join(d["content"] for d in early + parser.close()) == parser.message["content"]
        parser = fmt.stream_parser(tools)
        assert [d for ch in call for d in parser.feed(ch)] == []
        (last,) = parser.close()
        assert last["tool_calls"][0]["function"]["name"] == "get_weather"
        assert json.loads(last["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
        assert [{k: v for k, v in c.items() if k != "index"} for c in last["tool_calls"]] == parser.message[
            "tool_calls"]
