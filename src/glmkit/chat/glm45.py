"""Replies of GLM-4.5 / 4.6 / 4.7 / 5.x: `<think>` reasoning and XML tool calls, parsed whole or as a stream.

A reply is `[<think>]reasoning</think>` (GLM-4.7 and later put the opening tag in the prompt, so their
replies start inside the reasoning), then content, then calls
`<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>` (GLM-4.5 / 4.6 put newlines
between the tags). An argument is typed by the tool's JSON schema: a "string" stays text, anything else goes
through JSON, then a Python literal, then stays text. A `<tool_call>` body that is a JSON object (what drifting
quantized models write) is read too. Nothing here raises on model output: what is not a call of a known tool
stays content. `StreamParser` gives OpenAI-style deltas as text arrives, holding back only what could still be
the start of a tag; its final message is always `parse_glm45` of the whole text. No torch, no tokenizer.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from glmkit.chat.tools import _call, functions

THINK, END_THINK, CALL, END_CALL = "<think>", "</think>", "<tool_call>", "</tool_call>"
TAGS = (THINK, END_THINK, CALL, END_CALL)
ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str, str]:
    """-> (reasoning, the rest). Without a closing tag, a reply that started in reasoning is all reasoning; a
    closing tag without an opening one means the opening tag was in the prompt (GLM-4.7 and later)."""
    if not in_reasoning:
        head = text.lstrip()
        if head.startswith(THINK):
            text = head[len(THINK):]
        elif END_THINK not in text.split(CALL, 1)[0]:
            return "", text
    reasoning, sep, rest = text.partition(END_THINK)
    return (reasoning, rest) if sep else (text, "")


def _typed(value: str, schema: dict | None) -> Any:
    if isinstance(schema, dict) and schema.get("type") == "string":
        return value
    for read in (json.loads, ast.literal_eval):
        try:
            return read(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return value


def parse_call(body: str, tools: list[dict] | None) -> dict | None:
    """The inside of one <tool_call>...</tool_call> -> an OpenAI tool call of a known tool, else None."""
    known = dict(functions(tools)) if tools else {}
    stripped = body.strip()
    if stripped.startswith("{"):  # a JSON body: {"name": ..., "arguments": {...}}
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return None
        args = value.get("arguments", value.get("parameters", {})) if isinstance(value, dict) else None
        ok = isinstance(value, dict) and value.get("name") in known and isinstance(args, dict)
        return _call(value["name"], args) if ok else None
    name, _, rest = stripped.partition("<arg_key>")
    name = name.strip()
    if name not in known:
        return None
    props = known[name].get("properties") if isinstance(known[name].get("properties"), dict) else {}
    args = {k.strip(): _typed(v, props.get(k.strip())) for k, v in ARG.findall("<arg_key>" + rest if rest else "")}
    return _call(name, args)


def parse_glm45(text: str, tools: list[dict] | None = None, in_reasoning: bool = False) -> dict[str, Any]:
    """A whole reply -> the assistant message: content, reasoning_content (when there was any), tool_calls."""
    reasoning, rest = split_reasoning(text, in_reasoning)
    content, calls, pos = [], [], 0
    for m in re.finditer(re.escape(CALL) + r"(.*?)" + re.escape(END_CALL), rest, re.S):
        call = parse_call(m.group(1), tools)
        content.append(rest[pos: m.start()] if call is not None else rest[pos: m.end()])
        if call is not None:
            calls.append(call)
        pos = m.end()
    content.append(rest[pos:])
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content).strip() or (None if calls else "")}
    if reasoning.strip():
        message["reasoning_content"] = reasoning.strip()
    if calls:
        message["tool_calls"] = calls
    return message


def _held(text: str) -> int:
    """How many characters at the end of `text` could still grow into a tag."""
    for k in range(min(len(text), max(map(len, TAGS)) - 1), 0, -1):
        if any(tag.startswith(text[-k:]) for tag in TAGS):
            return k
    return 0


class StreamParser:
    """feed(text) -> deltas ({'content'}, {'reasoning_content'} or {'tool_calls': [...]}) as the reply streams;
    close() -> the last deltas. `message` (after close) is parse_glm45 of everything fed."""

    def __init__(self, tools: list[dict] | None = None, in_reasoning: bool = False):
        self.tools, self.in_reasoning = tools, in_reasoning
        self.text, self.sent = "", {"reasoning_content": 0, "content": 0}
        self.calls: list[dict] = []  # the calls sent so far (the final message keeps their ids)
        self.message: dict[str, Any] | None = None

    def _view(self, final: bool) -> tuple[str, str, list]:
        """(reasoning, content, complete calls) of the text so far; a possible tag prefix and an open call wait."""
        if final:
            m = self.message
            return m.get("reasoning_content", ""), m.get("content") or "", m.get("tool_calls", [])
        text = self.text[: len(self.text) - _held(self.text)]
        reasoning, rest = split_reasoning(text, self.in_reasoning)
        if END_THINK not in text and (self.in_reasoning or text.lstrip().startswith(THINK)):
            return reasoning.lstrip(), "", []  # still thinking
        closed = rest[: rest.rfind(CALL)] if rest.count(CALL) > rest.count(END_CALL) else rest  # an open call waits
        message = parse_glm45(closed, self.tools)
        return reasoning.lstrip(), message.get("content") or "", message.get("tool_calls", [])

    def _deltas(self, final: bool) -> list[dict]:
        reasoning, content, calls = self._view(final)
        out = []
        for key, value in (("reasoning_content", reasoning), ("content", content)):
            if len(value) > self.sent[key] and value.startswith(self._sent_text(key)):
                out.append({key: value[self.sent[key]:]})
                self._record(key, value)
        for i in range(len(self.calls), len(calls)):
            self.calls.append(calls[i])
            out.append({"tool_calls": [{"index": i, **calls[i]}]})
        return out

    def _sent_text(self, key: str) -> str:
        return getattr(self, f"_{key}", "")

    def _record(self, key: str, value: str) -> None:
        setattr(self, f"_{key}", value)
        self.sent[key] = len(value)

    def feed(self, text: str) -> list[dict]:
        self.text += text
        return self._deltas(final=False)

    def close(self) -> list[dict]:
        self.message = parse_glm45(self.text, self.tools, self.in_reasoning)
        for sent, call in zip(self.calls, self.message.get("tool_calls", [])):
            call["id"] = sent["id"]  # one id per call, streamed or not
        return self._deltas(final=True)
