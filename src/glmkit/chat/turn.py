"""ChatTurn: one assistant reply as it streams in, read the same way by LLM.chat, the server and the CLI.

Feed it the engine's text chunks; it returns the content that may be shown now (leading whitespace
trimmed; nothing while the reply may still be a tool call, which is known only at its end). `finish()`
parses the whole reply in the chat format: the assistant message, the finish reason ('tool_calls' when
the model called a tool) and the token usage. No torch, no engine.
"""

from __future__ import annotations

from typing import Any, Callable

from glmkit.chat.base import ChatFormat
from glmkit.errors import GlmkitError


class ChatReply(dict):
    """LLM.chat's result: OpenAI's assistant message plus finish_reason and usage. A dict (reply["content"],
    reply.get("tool_calls"), json.dumps(reply)) with typed attributes; `.message` is the bare assistant
    message, ready to append to the conversation."""

    @property
    def content(self) -> str | None:
        return self.get("content")

    @property
    def tool_calls(self) -> list[dict[str, Any]] | None:
        return self.get("tool_calls")

    @property
    def finish_reason(self) -> str:
        return self["finish_reason"]

    @property
    def usage(self) -> dict[str, int]:
        return self["usage"]

    @property
    def message(self) -> dict[str, Any]:
        return {k: v for k, v in self.items() if k not in ("finish_reason", "usage")}


class ChatDelta(dict):
    """One piece of a streamed LLM.chat: {'delta': text, 'completion_tokens': n so far}, also as attributes."""

    @property
    def delta(self) -> str:
        return self["delta"]

    @property
    def completion_tokens(self) -> int:
        return self["completion_tokens"]


class ChatTurn:
    def __init__(self, fmt: ChatFormat, tools: list[dict] | None, prompt_tokens: int):
        self.fmt, self.tools, self.prompt_tokens = fmt, tools or None, prompt_tokens
        self.text, self.tokens, self.finish_reason = "", 0, "stop"
        self.shown = False  # some content was handed out already

    def feed(self, text: str, n_tokens: int = 0, finish_reason: str | None = None) -> str:
        """Take one chunk of the reply; return the content delta to show now ('' if none)."""
        self.text, self.tokens = self.text + text, self.tokens + n_tokens
        self.finish_reason = finish_reason or self.finish_reason
        piece = text if self.shown else text.lstrip()
        if not piece or self.tools:  # with tools, the reply may be a call: known only at its end
            return ""
        self.shown = True
        return piece

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                "total_tokens": self.prompt_tokens + self.tokens}

    def finish(self) -> tuple[dict[str, Any], str, dict[str, int]]:
        """-> (assistant message, finish reason, usage)."""
        message = self.fmt.parse_reply(self.text, self.tools)
        reason = "tool_calls" if message.get("tool_calls") else self.finish_reason
        return message, reason, self.usage

    def closing_delta(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """What a stream still owes at the end: the tool calls, or the content held back while tools were on."""
        if self.tools and message.get("tool_calls"):
            return {"tool_calls": [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]}
        if self.tools and message.get("content"):
            return {"content": message["content"]}
        return None

    def reply(self) -> ChatReply:
        """The finished reply as LLM.chat returns it: the message plus finish_reason and usage."""
        message, reason, usage = self.finish()
        return ChatReply(message, finish_reason=reason, usage=usage)


def fit_conversation(render: Callable[[list[dict]], list[int]], messages: list[dict], ctx: int,
                     truncate: str = "error") -> list[int]:
    """The prompt ids of a conversation that fits `ctx` tokens: as rendered, or with truncate='drop_oldest' minus
    its oldest turns (system messages kept, whole user turns dropped, never the last user message)."""
    if truncate not in ("error", "drop_oldest"):
        raise GlmkitError(f"truncate must be 'error' or 'drop_oldest', got {truncate!r}.")
    messages = list(messages)
    while True:
        ids = render(messages)
        if len(ids) < ctx:
            return ids
        turns = [i for i, m in enumerate(messages) if m.get("role") != "system"]
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        if truncate == "error" or not turns or turns[0] == last_user:
            hint = " or pass truncate='drop_oldest'" if truncate == "error" else ""
            raise GlmkitError(f"the conversation has {len(ids)} tokens but this model's context is {ctx}; "
                              f"shorten the last message{hint}.")
        nxt = next((i for i in turns[1:] if messages[i].get("role") == "user"), last_user)
        messages = [m for i, m in enumerate(messages) if m.get("role") == "system" or i >= nxt]
