"""Tool calls in each generation's native text, to and from OpenAI-style `tool_calls`.

ChatGLM3 writes `name\\n```python\\ntool_call(a=1, b="x")\\n```` (parsed with `ast`: literals only, never
eval); GLM-4 / GLM-4-0414 write `name\\n{json}`; template-driven models a JSON object
`{"name": ..., "arguments": {...}}` (optionally inside <tool_call> tags). Output that is not a valid call of a
known tool stays plain content; nothing here raises on model output. A forced call (tool_choice "required"
or named) is described for the grammar compiler as alternatives of literal text and JSON schemas (see
`forced_json_call`). No torch, no tokenizer.
"""

from __future__ import annotations

import ast
import json
import uuid
from typing import Any

from glmkit.errors import GlmkitError


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def openai_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def tool_names(tools: list[dict] | None) -> set[str]:
    names = set()
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names


def functions(tools: list[dict] | None, name: str | None = None) -> list[tuple[str, dict]]:
    """(name, parameters schema) of every tool, or of the one named (a clear error when there is none)."""
    out = []
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str) and (name is None or fn["name"] == name):
            params = fn.get("parameters")
            out.append((fn["name"], params if isinstance(params, dict) else {"type": "object"}))
    if not out:
        raise GlmkitError(f"tool_choice names the function {name!r}, which is not among the request's tools."
                          if name is not None else "tool_choice 'required' needs at least one tool in 'tools'.")
    return out


def special(text: str) -> tuple[str, str]:
    """A special token, by its text, in a forced-call description (the grammar matches its id, not its text)."""
    return ("special", text)


FREE_TEXT = ("text",)  # any text without special tokens, in a forced-call description


def forced_json_call(tools: list[dict] | None, name: str | None = None) -> list[list]:
    """The generic forced call: one alternative per tool, `{"name": "<name>", "arguments": <its schema>}`. An
    alternative is a list of items: text (literal), special(token text), FREE_TEXT, a dict (a JSON schema), or a
    list (an optional group)."""
    return [['{"name": ' + json.dumps(n, ensure_ascii=False) + ', "arguments": ', params, "}"]
            for n, params in functions(tools, name)]


def parse_json_call(text: str, tools: list[dict] | None) -> dict[str, Any] | None:
    """A reply that is one JSON call of a known tool (as forced_json_call writes it; "parameters" read as
    "arguments", <tool_call> tags allowed around it) -> the assistant message with that call, else None."""
    body = text.strip().removeprefix("<tool_call>").removesuffix("</tool_call>").strip()
    call = read_json_call(body, tools) if body.startswith("{") else None
    return None if call is None else {"role": "assistant", "content": None, "tool_calls": [openai_call(*call)]}


def read_json_call(body: str, tools: list[dict] | None) -> tuple[str, dict[str, Any]] | None:
    """A JSON object {"name": <a known tool>, "arguments" (or "parameters"): {...}} -> (name, arguments), else
    None."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("name") not in tool_names(tools):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return (value["name"], arguments) if isinstance(arguments, dict) else None


def split_metadata(text: str) -> tuple[str, str]:
    """Replies start with a metadata line (a tool name, or empty): 'name\\nrest' -> ('name', 'rest')."""
    head, sep, rest = text.partition("\n")
    return (head.strip(), rest) if sep else ("", text)


def parse_glm4(text: str, tools: list[dict] | None) -> dict[str, Any]:
    """GLM-4: 'name\\n{json arguments}' for a known tool becomes a tool call; anything else is content."""
    name, rest = split_metadata(text)
    if name and name in tool_names(tools) and rest.lstrip().startswith("{"):
        try:
            arguments = json.loads(rest)
        except json.JSONDecodeError:
            arguments = None
        if isinstance(arguments, dict):
            return {"role": "assistant", "content": None, "tool_calls": [openai_call(name, arguments)]}
    return {"role": "assistant", "content": rest.strip() if not name else text.strip()}


def parse_chatglm3(text: str, tools: list[dict] | None) -> dict[str, Any]:
    """ChatGLM3: 'name\\n```python\\ntool_call(k=literal, ...)\\n```' for a known tool; else content."""
    name, rest = split_metadata(text)
    if name and name in tool_names(tools):
        arguments = _literal_tool_call(rest)
        if arguments is not None:
            return {"role": "assistant", "content": None, "tool_calls": [openai_call(name, arguments)]}
    return {"role": "assistant", "content": rest.strip() if not name else text.strip()}


def _literal_tool_call(code: str) -> dict[str, Any] | None:
    code = code.strip()
    if code.startswith("```"):
        lines = code.split("\n")
        if len(lines) < 2 or not lines[-1].strip().startswith("```"):
            return None
        code = "\n".join(lines[1:-1])
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError:
        return None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"
            and not call.args and all(k.arg for k in call.keywords)):
        return None
    try:
        return {k.arg: ast.literal_eval(_JsonNames().visit(k.value)) for k in call.keywords}
    except (ValueError, SyntaxError, TypeError):
        return None  # not a literal: never evaluated


class _JsonNames(ast.NodeTransformer):
    """JSON's true / false / null written as names (a grammar-forced call writes JSON values) -> constants."""
    CONSTANTS = {"true": True, "false": False, "null": None}

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.Constant(self.CONSTANTS[node.id]) if node.id in self.CONSTANTS else node


def forced_chatglm3_call(tools: list[dict] | None, name: str | None = None) -> list[list]:
    """ChatGLM3's native call with JSON values: `name\\n```python\\ntool_call(k=<value>, ...)\\n```` (required
    arguments first, then optional ones; each followed by ', ', which Python accepts before ')')."""
    out = []
    for n, params in functions(tools, name):
        props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
        required = [k for k in params.get("required") or [] if k in props]
        items: list = [n + "\n```python\ntool_call("]
        for k in required + [k for k in props if k not in required]:
            item = [f"{k}=", props[k] if isinstance(props[k], dict) else {}, ", "]
            items += item if k in required else [item]
        out.append(items + [")\n```"])
    return out


def format_chatglm3_call(arguments: dict[str, Any]) -> str:
    """The code block ChatGLM3 emits for a call, from an arguments dict."""
    args = ", ".join(f"{k}={_py_literal(v)}" for k, v in arguments.items())
    return f"```python\ntool_call({args})\n```"


def _py_literal(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_py_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py_literal(str(k))}: {_py_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)  # bool, None, int, float are Python literals as they are


def arguments_of(call: dict[str, Any]) -> dict[str, Any]:
    """The arguments of an OpenAI tool call as a dict (they arrive as a JSON string)."""
    raw = call.get("function", {}).get("arguments", "{}")
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError:
        raise GlmkitError(f"tool call arguments must be a JSON object, got {raw!r}.") from None
    return value if isinstance(value, dict) else {}
