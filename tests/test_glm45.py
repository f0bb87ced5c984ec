"""GLM-4.5 ... 5.x replies: <think> reasoning and XML tool calls, parsed whole and streamed in random pieces,
read back from what the official chat templates render."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from glmkit.chat.glm45 import TAGS, StreamParser, parse_glm45
from glmkit.chat.jinja import compile_template

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "zip": {"type": "string"},
            "opts": {"type": "object"}}}}},
         {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
CALLS = [("get_weather", {"city": "北京 <north>\nside", "days": 3, "zip": "007", "opts": {"a": [1, 2]}}), ("now", {})]


def _message(reasoning: str, content: str, calls) -> dict:
    m = {"role": "assistant", "content": content,
         "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls] or None}
    if reasoning:
        m["reasoning_content"] = reasoning
    return {k: v for k, v in m.items() if v is not None}


def _reply_text(template: str, message: dict) -> str:
    """What the official template renders for the assistant turn (the text after its <|assistant|>)."""
    messages = [{"role": "user", "content": "Weather?"}, message]
    text = compile_template((TEMPLATES / template).read_text()).render(
        messages=messages, tools=TOOLS, add_generation_prompt=False, clear_thinking=False)
    return text.rsplit("<|assistant|>", 1)[1]


def _same(parsed: dict, reasoning: str, content: str, calls) -> None:
    assert parsed.get("reasoning_content", "") == reasoning
    assert (parsed["content"] or "") == content
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.get("tool_calls", [])]
    assert got == [(n, a) for n, a in calls]


def accumulated_calls(deltas: list[dict]) -> list[dict]:
    """Tool-call deltas put together as OpenAI's clients do: by index, name once, arguments appended."""
    calls: list[dict] = []
    for d in deltas:
        for piece in d.get("tool_calls", []):
            if piece["index"] == len(calls):
                calls.append({"id": piece["id"], "type": piece["type"], "function": {"name": piece["function"]["name"],
                                                                                    "arguments": ""}})
            assert "name" not in piece["function"] or piece["function"]["name"] == calls[piece["index"]]["function"][
                "name"]
            calls[piece["index"]]["function"]["arguments"] += piece["function"].get("arguments", "")
    return calls


def _without_ids(message: dict) -> dict:
    return {**message, "tool_calls": [{**c, "id": None} for c in message.get("tool_calls", [])]}


CASES = [("thinking first", "Let me check <the> map.", "Checking two things.", CALLS),
         ("calls only", "", "", CALLS[:1]),
         ("zero-argument call", "why not", "", CALLS[1:]),
         ("content only", "思考：天气", "北京明天晴。", [])]


@pytest.mark.parametrize("template", ["GLM-4.6.jinja", "GLM-4.7-Flash.jinja"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_official_renderings_parse_back(template, case):
    _, reasoning, content, calls = case
    text = _reply_text(template, _message(reasoning, content, calls))
    _same(parse_glm45(text, TOOLS), reasoning, content, calls)
    # GLM-4.7's generation prompt ends in <think>: a reply then starts inside the reasoning
    if reasoning and text.lstrip().startswith("<think>"):
        _same(parse_glm45(text.lstrip()[len("<think>"):], TOOLS, in_reasoning=True), reasoning, content, calls)


@pytest.mark.parametrize("seed", range(12))
def test_stream_in_random_pieces_gives_the_same_message(seed):
    rng = random.Random(seed)
    template = rng.choice(["GLM-4.6.jinja", "GLM-4.7-Flash.jinja"])
    _, reasoning, content, calls = rng.choice(CASES)
    text = _reply_text(template, _message(reasoning, content, calls))
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 25))))
    parser = StreamParser(TOOLS)
    early, pieces = [], [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    for piece in pieces:
        early += parser.feed(piece)
    late = parser.close()
    assert _without_ids(parser.message) == _without_ids(parse_glm45(text, TOOLS))
    deltas = early + late
    for key in ("reasoning_content", "content"):
        streamed = "".join(d.get(key, "") for d in deltas).strip()
        assert streamed == (parser.message.get(key) or ""), key
    assert accumulated_calls(deltas) == parser.message.get("tool_calls", [])
    shown = sum(len(d.get("content", "") + d.get("reasoning_content", "")) for d in early)
    total = len(parser.message.get("content") or "") + len(parser.message.get("reasoning_content", ""))
    assert shown * 2 >= total - 20  # most text arrives before close(); only tag prefixes wait


def test_tag_text_never_reaches_content():
    parser = StreamParser(TOOLS)
    deltas = []
    for ch in "<think>deep</think>\nHi <tool_call>now</tool_call>":
        deltas += parser.feed(ch)
    deltas += parser.close()
    assert "".join(d.get("content", "") for d in deltas).strip() == "Hi"
    assert all("<" not in d.get("content", "") and "<" not in d.get("reasoning_content", "") for d in deltas)


@pytest.mark.parametrize("text", [
    "<think>never closed", "<tool_call>get_weather<arg_key>city</arg_key><arg_value>x", "</think></think>",
    "<tool_call>unknown_tool</tool_call>", "<tool_call>{not json}</tool_call>", "<think><tool_call>now</tool_call>",
    "<arg_key>a</arg_key><arg_value>b</arg_value>", "<tool_call></tool_call>" * 3, "\x00<<<>>>" * 50])
def test_hostile_output_never_crashes(text):
    message = parse_glm45(text, TOOLS)
    assert message["role"] == "assistant" and isinstance(message["content"], (str, type(None)))
    parser = StreamParser(TOOLS)
    for ch in text:
        parser.feed(ch)
    parser.close()
    assert _without_ids(parser.message) == _without_ids(message)


def test_arguments_typed_by_schema_and_drifted_json_bodies():
    text = ("<tool_call>get_weather<arg_key>zip</arg_key><arg_value>007</arg_value><arg_key>days</arg_key>"
            "<arg_value>3</arg_value><arg_key>city</arg_key><arg_value>null</arg_value></tool_call>"
            '<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    calls = parse_glm45(text, TOOLS)["tool_calls"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"zip": "007", "days": 3, "city": "null"}
    assert calls[1]["function"]["name"] == "now" and json.loads(calls[1]["function"]["arguments"]) == {}
    assert parse_glm45("<tool_call>unknown</tool_call>", TOOLS)["content"] == "<tool_call>unknown</tool_call>"


@pytest.mark.parametrize("template", ["GLM-4.6.jinja", "GLM-4.7-Flash.jinja"])
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"clear_thinking": False}])
def test_template_kwargs_render_as_transformers_renders_them(vocab_dirs, tmp_path, template, kwargs):
    """llm.apply_chat_template(**template_kwargs) on the official templates equals transformers'
    apply_chat_template with the same arguments, over tools, reasoning, tool results and list content parts."""
    import shutil

    from transformers import AutoTokenizer

    from glmkit.chat import JinjaFormat
    from glmkit.tokenizer import load_tokenizer

    source = (TEMPLATES / template).read_text()
    for f in vocab_dirs["glm4-hf"].iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "chat_template.jinja").write_text(source)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Beijing?"}]},
        _message("I should look it up.", "", CALLS[:1]),
        {"role": "tool", "content": "sunny"},
        _message("Sunny, so.", "It is sunny.", []),
        {"role": "user", "content": "Thanks! And tomorrow?"}]
    for message in conversation:  # transformers reads the arguments of a call as they are
        for call in message.get("tool_calls", []):
            call["function"]["arguments"] = dict(call["function"]["arguments"])
    ours = JinjaFormat(load_tokenizer(tmp_path), source, {}, set()).render_text(conversation, TOOLS, True, **kwargs)
    theirs = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        conversation, tools=TOOLS, tokenize=False, add_generation_prompt=True, chat_template=source, **kwargs)
    assert ours == theirs
    if kwargs.get("enable_thinking") is False:  # the switch reaches the template: thinking is turned off
        assert "/nothink" in ours or ours.endswith("</think>")
    else:
        assert "/nothink" not in ours and not ours.endswith("</think>")


def test_calls_stream_name_first_then_arguments_key_by_key():
    """Fed one character at a time, a call's name goes out before its arguments, and each argument as soon as
    its </arg_value> arrives (not at </tool_call>); a zero-argument call gets '{}'."""
    parser = StreamParser(TOOLS)
    text = ("<think>r</think><tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n"
            "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call><tool_call>now</tool_call>")
    seen = []  # (characters fed so far, delta)
    for n, ch in enumerate(text, 1):
        seen += [(n, d) for d in parser.feed(ch)]
    seen += [(len(text), d) for d in parser.close()]
    calls = [(n, c) for n, d in seen for c in d.get("tool_calls", [])]
    assert calls[0][1]["function"] == {"name": "get_weather", "arguments": ""}
    assert calls[0][0] == text.index("\n<arg_key>") + 1  # the name is complete at its newline (GLM-4.5 spacing)
    args = [(n, c["function"]["arguments"]) for n, c in calls if c["index"] == 0 and c["function"]["arguments"]]
    assert args == [(text.index("</arg_value>") + len("</arg_value>"), '{"city": "Rome"'),
                    (text.rindex("</arg_value>") + len("</arg_value>"), ', "days": 2'),
                    (text.index("</tool_call>") + len("</tool_call>"), "}")]
    assert [c["function"] for n, c in calls if c["index"] == 1] == [{"name": "now", "arguments": ""},
                                                                     {"arguments": "{}"}]
    assert accumulated_calls([d for _, d in seen]) == parser.message["tool_calls"]


NATIVE_CASES = [
    ([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "北京?"}]},
      _message("I should look it up.", "", CALLS), {"role": "tool", "content": "sunny"},
      {"role": "tool", "content": "12:00"}], TOOLS),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>old</think>\nHello!"},
      {"role": "user", "content": "And now?/nothink"},
      {"role": "assistant", "content": "\n<think>new</think>Fine."}], None),
    ([{"role": "user", "content": "Tools, but no call."}], TOOLS[1:])]


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
@pytest.mark.parametrize("case", range(len(NATIVE_CASES)))
def test_native_renderer_equals_the_official_template(tmp_path, case, kwargs):
    """A GLM-4.5 vocabulary without a template gets glmkit's own renderer: the ids equal what transformers'
    apply_chat_template makes of the official GLM-4.6 template, and replies are read as GLM-4.5 replies."""
    import copy

    from transformers import AutoTokenizer

    from glmkit.chat import pick
    from glmkit.tokenizer import load_tokenizer
    from scripted import GLM45_SPECIALS
    from vocab import save_hf_tokenizer

    source = (TEMPLATES / "GLM-4.6.jinja").read_text()
    save_hf_tokenizer(tmp_path, GLM45_SPECIALS, source, eos_token="<|endoftext|>")
    messages, tools = NATIVE_CASES[case]
    native = pick(load_tokenizer(tmp_path), None, {})
    assert native.name == "glm45" and native.template is None
    ours = native.render(messages, tools, add_generation_prompt=True, **kwargs)[0]
    theirs_messages = copy.deepcopy(messages)
    for message in theirs_messages:  # transformers reads the arguments of a call as they are
        for call in message.get("tool_calls", []):
            call["function"]["arguments"] = dict(call["function"]["arguments"])
    theirs = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        theirs_messages, tools=tools, add_generation_prompt=True, chat_template=source, **kwargs)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert ours == list(theirs)
    assert native.parse_reply("\n<think>r</think>\n<tool_call>now\n</tool_call>", TOOLS)["tool_calls"][0][
        "function"]["name"] == "now"


def streams_to(whole: dict, text: str, in_reasoning: bool, rng: random.Random, pieces: int) -> None:
    """Fed in up to `pieces` random pieces, the stream parser ends with `whole` and its deltas add up to it."""
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, pieces)))) if len(text) > 1 else []
    parser = StreamParser(TOOLS, in_reasoning)
    deltas = [d for a, b in zip([0] + cuts, cuts + [len(text)]) for d in parser.feed(text[a:b])] + parser.close()
    assert _without_ids(parser.message) == _without_ids(whole)
    for key in ("reasoning_content", "content"):
        assert "".join(d.get(key, "") for d in deltas) == (whole.get(key) or "")
    assert accumulated_calls(deltas) == parser.message.get("tool_calls", [])


PIECES = ["北京", "a < b", "x<y>z", "<", "007", "null", "{}", "[1, 2]", "line\nbreak", " spaced ", "3.5", "true",
          "<think", "</tool", "tool_call", "<arg", "😀", "\\n", '"quoted"']


def _random_reply(rng: random.Random) -> tuple[str, bool, str, str, list]:
    """A GLM-4.5- or 4.7-style reply put together from random parts -> (text, starts in reasoning, reasoning,
    content, calls as (name, arguments))."""
    newlines, in_reasoning = rng.random() < 0.5, rng.random() < 0.3
    nl = "\n" if newlines else ""
    words = lambda n: "".join(rng.choice(PIECES + [" ", "ok", "好"]) for _ in range(n))  # noqa: E731
    reasoning = words(rng.randint(0, 6)).strip() if in_reasoning or rng.random() < 0.7 else ""
    content = words(rng.randint(0, 6)).strip()
    text = ("" if in_reasoning else nl + "<think>") + reasoning + "</think>" if in_reasoning or reasoning else ""
    text += (nl if text else "") + content
    calls = []
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        if rng.random() < 0.3:
            calls.append(("now", {}))
            body = "now" + nl if rng.random() < 0.5 else "now"
        else:
            args = {k: v for k, v in (("city", words(rng.randint(0, 3))), ("days", rng.randint(-5, 500)),
                                      ("zip", rng.choice(["007", "12", "x"])), ("opts", {"a": [rng.random() < 0.5]}))
                    if rng.random() < 0.7}
            calls.append(("get_weather", args))
            if rng.random() < 0.15:  # a drifting model's JSON body
                body = json.dumps({"name": "get_weather", "arguments": args}, ensure_ascii=False)
            else:
                body = "get_weather" + nl + "".join(
                    f"<arg_key>{k}</arg_key>{nl}<arg_value>{v if isinstance(v, str) else json.dumps(v)}</arg_value>{nl}"
                    for k, v in args.items())
        text += nl + "<tool_call>" + body + "</tool_call>"
    return text, in_reasoning, reasoning, content, calls


@pytest.mark.parametrize("seed", range(80))
def test_random_replies_in_random_pieces(seed):
    """Replies made from random parts (both spacings, replies that start inside the reasoning, values with
    '<', newlines and number-like strings, several calls, zero-argument calls, JSON bodies) parse to what they
    were made from, whole and in random pieces; the deltas add up to the final message."""
    rng = random.Random(seed)
    text, in_reasoning, reasoning, content, calls = _random_reply(rng)
    whole = parse_glm45(text, TOOLS, in_reasoning)
    _same(whole, reasoning, content, calls)
    streams_to(whole, text, in_reasoning, rng, pieces=40)


SOUP = list(TAGS) + ["now", "get_weather", "city", "{", "}", '"name"', ":", "\n", " ", "x", "<", ">", "3",
                     '{"name": "now", "arguments": {}}']


@pytest.mark.parametrize("seed", range(300))
def test_tag_soup_never_breaks_the_stream(seed):
    """Random sequences of tags and fragments: no exception, the streamed message is the whole parse, the
    deltas add up to it exactly (prompt known: the reply starts inside the reasoning or not)."""
    rng = random.Random(seed)
    text = "".join(rng.choice(SOUP) for _ in range(rng.randint(0, 25)))
    in_reasoning = rng.random() < 0.5
    whole = parse_glm45(text, TOOLS, in_reasoning)
    streams_to(whole, text, in_reasoning, rng, pieces=10)
