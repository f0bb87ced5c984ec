"""The base of every chat format: message checks, the (ids, loss mask) builder and the ChatFormat interface.

`normalize` checks OpenAI-style messages and flattens text parts; an image or other non-text part is a clear
error (glmkit's models read text only), never silently dropped. No torch, no model.
"""

from __future__ import annotations

from typing import Any

from glmkit.chat.tools import forced_json_call, parse_json_call
from glmkit.errors import GlmkitError
from glmkit.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


def normalize(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check OpenAI-style messages and flatten list-of-parts content into text."""
    if not isinstance(messages, list) or not messages:
        raise GlmkitError("messages must be a non-empty list of {'role': ..., 'content': ...} objects.")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise GlmkitError(f"message {n} has role {role!r}; each message needs a role out of {', '.join(ROLES)}.")
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(_text_part(n, p) for p in content)
        if content is not None and not isinstance(content, str):
            raise GlmkitError(f"message {n} content must be text, got {type(content).__name__}.")
        out.append({**m, "content": content or ""})
    return out


IMAGE_PARTS = ("image_url", "image", "input_image")
PLACEHOLDER = {"type": "image"}  # an image's place in a message, as GLM-V chat templates read it


def split_images(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """OpenAI messages -> the same messages with each image part replaced by {'type': 'image'} (a GLM-V template
    renders it as <|begin_of_image|><|image|><|end_of_image|>), and the image parts in order."""
    out, images = [], []
    for n, m in enumerate(messages if isinstance(messages, list) else []):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list) or not any(_is_image(p) for p in content):
            out.append(m)
            continue
        if m.get("role") != "user":
            raise GlmkitError(f"message {n} ({m.get('role')}) has an image part; images go in user messages.")
        images += [p for p in content if _is_image(p)]
        out.append({**m, "content": [PLACEHOLDER if _is_image(p) else p for p in content]})
    return out, images


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PARTS and part != PLACEHOLDER


def has_placeholders(message: Any) -> bool:
    return isinstance(message, dict) and isinstance(message.get("content"), list) and PLACEHOLDER in message["content"]


def _text_part(n: int, part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind in ("image_url", "image", "input_image", "video_url", "video", "input_audio", "audio", "file"):
        raise GlmkitError(f"message {n} has an {kind!r} part, but this model reads text only; send text parts, "
                          "or use a vision model.")
    raise GlmkitError(f"message {n} has a content part of type {kind!r}; content parts must be "
                      "{'type': 'text', 'text': ...}.")


class Ids:
    """Token ids with a parallel loss mask."""

    def __init__(self):
        self.ids: list[int] = []
        self.mask: list[bool] = []

    def add(self, ids: list[int], train: bool = False) -> None:
        self.ids += ids
        self.mask += [train] * len(ids)


class ChatFormat:
    name = "base"
    stop_ids: frozenset[int] = frozenset()
    needs: tuple[str, ...] = ()  # special tokens the format writes: a tokenizer without them cannot serve it
    reply_tokens: tuple[str, ...] = ()  # special tokens of replies that parse_reply reads: kept in decoded text

    @classmethod
    def misfit(cls, tokenizer: Tokenizer) -> str | None:
        """Why this format cannot run on `tokenizer`, or None when it can."""
        missing = [t for t in cls.needs if t not in tokenizer.special]
        if missing:
            return f"its tokenizer has no {', '.join(missing)} token{'s' if len(missing) > 1 else ''}"
        if cls.name in ("chatglm2", "chatglm3") and getattr(tokenizer, "eos_id", -1) < 0:
            return "its tokenizer has no end-of-sequence id"
        return None

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    def render(self, messages, tools=None, add_generation_prompt: bool = True,
               **template_kwargs) -> tuple[list[int], list[bool]]:
        """-> (ids, loss mask). template_kwargs (enable_thinking, ...) are for Jinja templates; the native GLM
        formats have no such switches and ignore them, as a template ignores variables it does not read."""
        raise NotImplementedError

    def parse_reply(self, text: str, tools: list[dict] | None = None, prompt: list[int] | None = None) -> dict[str, Any]:
        """The generated text as an OpenAI assistant message (content, reasoning_content, tool_calls); `prompt`
        is the rendered prompt ids the reply continues. Template-driven models call a tool with a JSON object
        {"name": ..., "arguments": {...}}."""
        return (tools and parse_json_call(text, tools)) or {"role": "assistant", "content": text.strip()}

    def may_call(self, text: str, tools: list[dict]) -> bool:
        """Whether the reply so far is, or may still become, a tool call (its content then waits for the end)."""
        head = text.lstrip()
        return not head or head.startswith(("{", "<tool_call>")) or "<tool_call>".startswith(head)

    def stream_parser(self, tools: list[dict] | None = None, prompt: list[int] | None = None):
        """A parser of the reply as it streams: .feed(text) -> OpenAI deltas, .close() -> the last ones,
        .message (after close) the parse_reply of the whole text."""
        return ReplyStream(self, tools, prompt)

    def forced_call(self, tools: list[dict] | None, name: str | None = None) -> list[list]:
        """The reply that calls one of `tools` (or the one named), in the text parse_reply reads back: for
        constrained decoding (tool_choice 'required' or named), as alternatives of text and JSON schemas."""
        return forced_json_call(tools, name)

    def wrap_plain(self, ids: list[int]) -> list[int]:
        """Token ids of plain text -> a prompt as this generation's tokenizer builds one (no chat format)."""
        return ids


class ReplyStream:
    """The stream parser of formats whose tool call is a whole reply: content streams as it arrives (trailing
    spaces wait), unless the reply may still be a call; then everything waits for close()."""

    def __init__(self, fmt: ChatFormat, tools: list[dict] | None, prompt: list[int] | None):
        self.fmt, self.tools, self.prompt = fmt, tools or None, prompt
        self.text, self.sent = "", ""
        self.message: dict[str, Any] | None = None

    def feed(self, text: str) -> list[dict]:
        self.text += text
        if self.tools and self.fmt.may_call(self.text, self.tools):
            return []
        return self._content(self.fmt.parse_reply(self.text, None, self.prompt).get("content") or "")

    def close(self) -> list[dict]:
        self.message = self.fmt.parse_reply(self.text, self.tools, self.prompt)
        out = self._content(self.message.get("content") or "")
        calls = self.message.get("tool_calls") or []
        return out + ([{"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}] if calls else [])

    def _content(self, value: str) -> list[dict]:
        piece = growth(self.sent, value)
        if not piece:
            return []
        self.sent = value
        return [{"content": piece}]


def growth(sent: str, value: str) -> str:
    """What a stream may still send of `value` after `sent`: the new tail when value extends it, else ''."""
    return value[len(sent):] if len(value) > len(sent) and value.startswith(sent) else ""
