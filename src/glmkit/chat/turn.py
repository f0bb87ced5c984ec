"""ChatTurn: one assistant reply as it streams in, read the same way by LLM.chat, the server and the CLI.

Feed it the engine's text chunks; it returns OpenAI `choices[0].delta` dicts (content, reasoning_content,
tool_calls) from the chat format's stream parser, which holds back only what may still turn out to be a
tag or a tool call. `finish()` gives the assistant message (the format's parse of the whole reply), the
finish reason ('tool_calls' when the model called a tool) and the token usage. No torch, no engine.
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
    """One piece of a streamed LLM.chat: {'delta': content text, 'completion_tokens': n so far}, plus
    'reasoning_content' (text) and 'tool_calls' (OpenAI tool-call deltas) when the piece has them."""

    @property
    def delta(self) -> str:
        return self["delta"]

    @property
    def reasoning_content(self) -> str:
        return self.get("reasoning_content", "")

    @property
    def completion_tokens(self) -> int:
        return self["completion_tokens"]

    @classmethod
    def of(cls, deltas: list[dict], completion_tokens: int) -> "ChatDelta | None":
        """The OpenAI deltas of one chunk as one ChatDelta; None when there are none."""
        if not deltas:
            return None
        out = cls(delta="".join(d.get("content", "") for d in deltas), completion_tokens=completion_tokens)
        reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
        calls = [c for d in deltas for c in d.get("tool_calls", [])]
        out.update({k: v for k, v in (("reasoning_content", reasoning), ("tool_calls", calls)) if v})
        return out


class ChatTurn:
    def __init__(self, fmt: ChatFormat, tools: list[dict] | None, prompt: list[int], parallel_calls: bool = True):
        """parallel_calls=False: only the reply's first tool call counts (OpenAI's parallel_tool_calls)."""
        self.prompt_tokens, self.parallel_calls = len(prompt), parallel_calls
        self.parser = fmt.stream_parser(tools or None, prompt)
        self.tokens, self.finish_reason = 0, "stop"

    def feed(self, text: str, n_tokens: int = 0, finish_reason: str | None = None) -> list[dict]:
        """Take one chunk of the reply; return the deltas to send now (with a finish reason: the last ones)."""
        self.tokens += n_tokens
        self.finish_reason = finish_reason or self.finish_reason
        out = self._calls_allowed(self.parser.feed(text)) if text else []
        return out + self.close() if finish_reason is not None else out

    def close(self) -> list[dict]:
        """The deltas the stream still owes at its end (none a second time: the parser has its message then)."""
        return [] if self.parser.message is not None else self._calls_allowed(self.parser.close())

    def _calls_allowed(self, deltas: list[dict]) -> list[dict]:
        return deltas if self.parallel_calls else [d for d in deltas if d.get("tool_calls", [{"index": 0}])[0][
            "index"] == 0]

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                "total_tokens": self.prompt_tokens + self.tokens}

    def finish(self) -> tuple[dict[str, Any], str, dict[str, int]]:
        """-> (assistant message, finish reason, usage)."""
        self.close()
        message = dict(self.parser.message)
        if not self.parallel_calls and message.get("tool_calls"):
            message["tool_calls"] = message["tool_calls"][:1]
        reason = "tool_calls" if message.get("tool_calls") and self.finish_reason != "length" else self.finish_reason
        return message, reason, self.usage

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
