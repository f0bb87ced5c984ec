"""Replies of GLM-4.5 / 4.6 / 4.7 / 5.x: `<think>` reasoning and XML tool calls, parsed whole or as a stream.

A reply is `[<think>]reasoning</think>` (GLM-4.7 and later put the opening tag in the prompt, so their
replies start inside the reasoning), then content, then calls
`<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>` (GLM-4.5 / 4.6 put newlines
between the tags). An argument is typed by the tool's JSON schema: a "string" stays text, anything else goes
through JSON, then a Python literal, then stays text; a repeated key keeps its first value. A `<tool_call>`
body that is a JSON object (what drifting quantized models write) is read too, and a call of a known tool cut
off before `</tool_call>` keeps its complete arguments. Nothing here raises on model output: what is not a
call of a known tool stays content.

`StreamParser` re-parses what has arrived and sends the difference as OpenAI deltas: reasoning and content as
they come (holding back only what could still be the start of a tag, and trailing spaces), a call's name as
soon as it is complete and its arguments one key at a time, as JSON pieces that add up to the final
`arguments`; its final message is always `parse_glm45` of the whole text. No torch, no tokenizer.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from glmkit.chat.base import growth
from glmkit.chat.jinja import JinjaFormat
from glmkit.chat.tools import FREE_TEXT, call_id, functions, openai_call, read_json_call, special, tool_names

THINK, END_THINK, CALL, END_CALL = "<think>", "</think>", "<tool_call>", "</tool_call>"
ARG_KEY, END_ARG_KEY, ARG_VALUE, END_ARG_VALUE = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
TAGS = (THINK, END_THINK, CALL, END_CALL, ARG_KEY, END_ARG_KEY, ARG_VALUE, END_ARG_VALUE)
ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)
NAME_END = re.compile(r"\s|<arg_key>|\{")


def split_reasoning(text: str, in_reasoning: bool | None = None) -> tuple[str, str]:
    """-> (reasoning, the rest). in_reasoning: whether the prompt left a <think> open (GLM-4.7 and later), None
    when the prompt is not known. A reply that starts in reasoning is all reasoning until its </think>. With the
    prompt unknown, a closing tag without an opening one means the opening tag was in the prompt; with a
    prompt known not to open one, such a stray tag is dropped."""
    if not in_reasoning:
        head = text.lstrip()
        if head.startswith(THINK):
            text = head[len(THINK):]
        elif in_reasoning is False:
            return "", text.replace(END_THINK, "")
        elif END_THINK not in text.split(CALL, 1)[0]:
            return "", text
    reasoning, sep, rest = text.partition(END_THINK)
    return (reasoning, rest) if sep else (text, "")


JSON_TYPES = {"null": type(None), "boolean": bool, "integer": int, "number": (int, float), "array": list,
              "object": dict}


def _typed(value: str, schema: dict | None) -> Any:
    """An argument's text as its schema types it: text when it says string (or lists only strings in an enum);
    else JSON, then a Python literal, then the text. With "string" among several types, a value that reads as
    one of the others is that, else it stays text."""
    schema = schema if isinstance(schema, dict) else {}
    types = schema.get("type") if isinstance(schema.get("type"), list) else [schema.get("type")]
    enum = schema.get("enum")
    if types == ["string"] or (types == [None] and isinstance(enum, list) and enum and
                               all(isinstance(e, str) for e in enum)):
        return value
    for read in (json.loads, ast.literal_eval):
        try:
            parsed = read(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        others = tuple(JSON_TYPES[t] for t in types if t in JSON_TYPES)
        return value if "string" in types and not isinstance(parsed, others) else parsed
    return value


def argument_pieces(pairs: list[tuple[str, Any]], closed: bool) -> list[str]:
    """The JSON text of arguments as pieces, one per key (and the closing brace once the call is closed);
    joined, they are json.dumps of the arguments dict."""
    pieces = [("{" if i == 0 else ", ") + json.dumps(k, ensure_ascii=False) + ": " + json.dumps(v, ensure_ascii=False)
              for i, (k, v) in enumerate(pairs)]
    return pieces + (["}" if pairs else "{}"] if closed else [])


class Call:
    """One tool call as far as it has arrived: its name, its complete argument pairs, whether it is closed."""

    def __init__(self, name: str, pairs: list[tuple[str, Any]], closed: bool):
        self.name, self.pairs, self.closed = name, pairs, closed

    @property
    def pieces(self) -> list[str]:
        return argument_pieces(self.pairs, self.closed)

    def openai(self) -> dict[str, Any]:
        """As an OpenAI tool call: its arguments are the JSON the closed call's pieces join to."""
        return openai_call(self.name, dict(self.pairs))


def read_call(body: str, tools: list[dict] | None, closed: bool = True) -> Call | None:
    """The inside of one <tool_call> (closed: its </tool_call> arrived) -> a Call of a known tool, else None.
    An open call is a Call once its name is complete; a JSON body only once closed."""
    known = dict(functions(tools)) if tool_names(tools) else {}
    body = body.lstrip()
    if body.startswith("{"):  # a JSON body: {"name": ..., "arguments": {...}}
        call = read_json_call(body.rstrip(), tools) if closed else None
        return None if call is None else Call(call[0], list(call[1].items()), True)
    end = NAME_END.search(body)
    if not closed and end is None:
        return None  # the name may still grow
    name, rest = (body[: end.start()].strip(), body[end.start():]) if end else (body.strip(), "")
    if name not in known:
        return None
    if rest.strip().startswith("{") and ARG_KEY not in rest:  # `name {json}` / `name\n{json}`, as models drift
        return _json_arguments(name, rest) if closed else None
    props = known[name].get("properties") if isinstance(known[name].get("properties"), dict) else {}
    pairs: dict[str, Any] = {}
    for k, v in ARG.findall(rest):
        pairs.setdefault(k.strip(), _typed(v, props.get(k.strip())))
    return Call(name, list(pairs.items()), closed)


def _json_arguments(name: str, text: str) -> Call | None:
    try:
        args = json.loads(text)
    except json.JSONDecodeError:
        return None
    return Call(name, list(args.items()), True) if isinstance(args, dict) else None


def read_rest(rest: str, tools: list[dict] | None, final: bool) -> tuple[str, list[Call]]:
    """The text after the reasoning -> (content, calls). Not final: an open call that is not yet a Call
    holds back everything from its <tool_call> on; final: it is content."""
    content, calls, pos = [], [], 0
    while (start := rest.find(CALL, pos)) >= 0:
        content.append(rest[pos:start])
        end = rest.find(END_CALL, start)
        body = rest[start + len(CALL): end if end >= 0 else len(rest)]
        call = read_call(body, tools, closed=end >= 0 or final) if tools else None
        if end < 0 and call is None and not final:
            return "".join(content), calls
        if call is not None and final:
            call.closed = True  # cut off: its complete arguments are all it has
        if call is None:
            content.append(rest[start: end + len(END_CALL) if end >= 0 else len(rest)])
        else:
            calls.append(call)
        pos = end + len(END_CALL) if end >= 0 else len(rest)
    content.append(rest[pos:])
    return "".join(content), calls


def parts(text: str, tools: list[dict] | None, in_reasoning: bool | None) -> tuple[str, str, list[Call]]:
    """A whole reply -> (reasoning, content, calls), stripped."""
    reasoning, rest = split_reasoning(text, in_reasoning)
    content, calls = read_rest(rest, tools, final=True)
    return reasoning.strip(), content.strip(), calls


def message_of(reasoning: str, content: str, calls: list[Call]) -> dict[str, Any]:
    """The assistant message: content, reasoning_content (when there was any), tool_calls."""
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [c.openai() for c in calls]
    return message


def parse_glm45(text: str, tools: list[dict] | None = None, in_reasoning: bool | None = None) -> dict[str, Any]:
    """A whole reply -> the assistant message: content, reasoning_content (when there was any), tool_calls."""
    return message_of(*parts(text, tools, in_reasoning))


def held(text: str, tags: tuple[str, ...] = TAGS) -> int:
    """How many characters at the end of `text` could still grow into a tag."""
    for k in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(tag.startswith(text[-k:]) for tag in tags):
            return k
    return 0


class StreamParser:
    """feed(text) -> deltas ({'reasoning_content'}, {'content'} or {'tool_calls': [...]}) as the reply streams;
    close() -> the last deltas. `message` (after close) is parse_glm45 of everything fed."""

    def __init__(self, tools: list[dict] | None = None, in_reasoning: bool | None = None):
        self.tools, self.in_reasoning = tools, in_reasoning
        self.text = ""
        self.sent = {"reasoning_content": "", "content": ""}
        self.ids: list[str] = []  # one id per call announced
        self.pieces_sent: list[int] = []  # argument pieces sent, per call
        self.message: dict[str, Any] | None = None

    def feed(self, text: str) -> list[dict]:
        self.text += text
        return self._deltas(*self._view(self.text[: len(self.text) - held(self.text)]))

    def close(self) -> list[dict]:
        whole = parts(self.text, self.tools, self.in_reasoning)
        deltas = self._deltas(*whole)
        self.message = message_of(*whole)
        for sent_id, call in zip(self.ids, self.message.get("tool_calls", [])):
            call["id"] = sent_id  # one id per call, streamed or not
        return deltas

    def _view(self, text: str) -> tuple[str, str, list[Call]]:
        """(reasoning, content, calls) of the text so far: an open call not yet a Call, and the content after
        it, wait."""
        reasoning, rest = split_reasoning(text, self.in_reasoning)
        if END_THINK not in text and (self.in_reasoning or text.lstrip().startswith(THINK)):
            return reasoning.strip(), "", []  # still thinking
        content, calls = read_rest(rest, self.tools, final=False)
        return reasoning.strip(), content.strip(), calls

    def _deltas(self, reasoning: str, content: str, calls: list[Call]) -> list[dict]:
        out = []
        for key, value in (("reasoning_content", reasoning), ("content", content)):
            piece = growth(self.sent[key], value)
            if piece:
                out.append({key: piece})
                self.sent[key] = value
        for i, call in enumerate(calls):
            if i == len(self.ids):  # announce: id, type and name
                self.ids.append(call_id())
                self.pieces_sent.append(0)
                out.append({"tool_calls": [{"index": i, "id": self.ids[i], "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
            pieces = call.pieces
            if len(pieces) > self.pieces_sent[i]:
                piece = "".join(pieces[self.pieces_sent[i]:])
                self.pieces_sent[i] = len(pieces)
                out.append({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        return out


class Glm45Format(JinjaFormat):
    """GLM-4.5 ... 5.x: the checkpoint's own template renders (without one, `native_text` writes GLM-4.5 / 4.6's
    prompt); replies are read by parse_glm45 / StreamParser
    (starting inside the reasoning when the prompt ends in an open <think>); a forced call is the XML form."""

    name = "glm45"
    needs = ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<arg_key>")
    reply_tokens = TAGS
    user_switches = ("/nothink",)
    STOPS = ("<|endoftext|>", "<|user|>", "<|observation|>")

    def __init__(self, tokenizer, template, special_strings, stop_ids):
        stop_ids = set(stop_ids) | {tokenizer.special[t] for t in self.STOPS if t in tokenizer.special}
        super().__init__(tokenizer, template, special_strings, stop_ids)
        self.newlines = template is None or "\n<arg_key>" in template  # GLM-4.5 / 4.6: newlines between tags

    def in_reasoning(self, prompt: list[int] | str | None) -> bool | None:
        """Whether the prompt (ids, or its text) leaves a <think> open after its last <|assistant|> (GLM-4.7
        and later); None without a prompt."""
        if prompt is None:
            return None
        if isinstance(prompt, str):
            tail = prompt.rpartition("<|assistant|>")[2]
        else:
            assistant = self.tok.special.get("<|assistant|>")
            tail = self.tok.decode(prompt[max((i for i, t in enumerate(prompt) if t == assistant), default=-1) + 1:])
        return tail.rfind(THINK) > tail.rfind(END_THINK)

    def parse_reply(self, text, tools=None, prompt=None):
        return parse_glm45(text, tools, self.in_reasoning(prompt))

    def stream_parser(self, tools=None, prompt=None):
        return StreamParser(tools or None, self.in_reasoning(prompt))

    def forced_call(self, tools, name=None):
        """Reasoning (optional), then `<tool_call>NAME`, the arguments in schema order (required ones always,
        string values as free text, others as JSON of their schema), `</tool_call>`."""
        tag = lambda t: special(t) if t in self.tok.special else t  # noqa: E731
        nl = "\n" if self.newlines else ""
        reasoning = [["\n"], [tag(THINK)], FREE_TEXT, tag(END_THINK), ["\n"]]
        out = []
        for n, params in functions(tools, name):
            props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
            required = [k for k in params.get("required") or [] if k in props]
            items: list = [reasoning, tag(CALL), n]
            for k in required + [k for k in props if k not in required]:
                schema = props[k] if isinstance(props[k], dict) else {}
                value = FREE_TEXT if schema.get("type") == "string" else schema
                arg = [nl, tag(ARG_KEY), k, tag(END_ARG_KEY), nl, tag(ARG_VALUE), value, tag(END_ARG_VALUE)]
                items += arg if k in required else [arg]
            out.append(items + [nl, tag(END_CALL)] if nl else items + [tag(END_CALL)])
        return out

    def prepared(self, messages: list[dict]) -> list[dict]:
        """Also: reasoning written inline in an assistant's content (<think>...</think>) moves to its
        reasoning_content before user text is made inert, as the official templates split it."""
        out = []
        for m in JinjaFormat.prepared(messages):
            text = m.get("content") or ""
            if m["role"] == "assistant" and not isinstance(m.get("reasoning_content"), str) and END_THINK in text:
                m = {**m, "reasoning_content": text.split(END_THINK)[0].rstrip("\n").split(THINK)[-1].lstrip("\n"),
                     "content": text.split(END_THINK)[-1].lstrip("\n")}
            out.append(m)
        return out

    def render_text(self, messages, tools=None, add_generation_prompt=True, **template_kwargs) -> str:
        if self.template is not None:
            return super().render_text(messages, tools, add_generation_prompt, **template_kwargs)
        self.check_kwargs(template_kwargs)
        return native_text(self._mark(self.prepared(messages)), self._mark(tools), add_generation_prompt,
                           template_kwargs.get("enable_thinking", True))


TOOLS_HEAD = ("<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are "
              "provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
TOOLS_TAIL = ("</tools>\n\nFor each function call, output the function name and arguments within the following XML "
              "format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}"
              "</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>")


def native_text(messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
                enable_thinking: Any = True) -> str:
    """GLM-4.5 / 4.6's prompt as their official template writes it, for files that carry no template: tools in a
    system turn, reasoning kept only after the last user message, tool results in one <|observation|> turn."""
    def value(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)

    out = ["[gMASK]<sop>"]
    if tools:
        out += [TOOLS_HEAD, *(json.dumps(t, ensure_ascii=False) + "\n" for t in tools), TOOLS_TAIL]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for i, m in enumerate(messages):
        text = m.get("content") or ""
        if m["role"] == "user":
            out.append("<|user|>\n" + text + ("/nothink" if not enable_thinking and not text.endswith("/nothink")
                                              else ""))
        elif m["role"] == "system":
            out.append("<|system|>\n" + text)
        elif m["role"] == "tool":
            first = i == 0 or messages[i - 1]["role"] != "tool"
            out.append(("<|observation|>" if first else "") + "\n<tool_response>\n" + text + "\n</tool_response>")
        else:
            reasoning = m.get("reasoning_content") if isinstance(m.get("reasoning_content"), str) else ""
            keep = i > last_user and reasoning
            out.append("<|assistant|>\n<think>" + (reasoning.strip() if keep else "") + "</think>"
                       + ("\n" + text.strip() if text.strip() else ""))
            for tc in m.get("tool_calls") or []:
                fn = tc.get("function") or tc
                out.append("\n<tool_call>" + fn["name"] + "\n" + "".join(
                    f"<arg_key>{k}</arg_key>\n<arg_value>{value(v)}</arg_value>\n"
                    for k, v in (fn.get("arguments") or {}).items()) + "</tool_call>")
    if add_generation_prompt:
        out.append("<|assistant|>" + ("" if enable_thinking else "\n<think></think>"))
    return "".join(out)
