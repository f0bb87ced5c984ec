"""Jinja chat templates (tokenizer_config.json, chat_template.jinja, GGUF metadata) rendered the way
transformers' `apply_chat_template` renders them: sandboxed jinja2, trim_blocks / lstrip_blocks,
loop controls, its `tojson`, `raise_exception`, `strftime_now`, and the special-token strings.

Special-token text inside messages or tools is wrapped in private-use markers before rendering and
encoded as plain text afterwards, so user input cannot inject a role or stop token. This matches
transformers' `sanitize_control_tokens=True`; without such text the ids equal its default output.
No torch.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any

from glmkit.chat.base import PLACEHOLDER, ChatFormat, has_placeholders, normalize
from glmkit.chat.tools import arguments_of
from glmkit.errors import GlmkitError
from glmkit.tokenizer import Tokenizer

RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt"})  # what glmkit passes itself
START, END = "\U000f0000", "\U000f0001"  # private-use markers around special-token text from users


@lru_cache(maxsize=16)
def compile_template(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise GlmkitError(f"the checkpoint's chat template is not valid Jinja ({e}).") from None


def _dict_arguments(call: Any) -> Any:
    """OpenAI sends a call's arguments as JSON text; templates iterate them as a mapping (as vLLM hands them)."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    return {**call, "function": {**call["function"], "arguments": arguments_of(call)}}


class JinjaFormat(ChatFormat):
    name = "jinja"
    user_switches: tuple[str, ...] = ()  # special tokens users are meant to type (GLM-4.5's /nothink)

    def __init__(self, tokenizer: Tokenizer, template: str, special_strings: dict[str, str],
                 stop_ids: set[int] | frozenset[int]):
        super().__init__(tokenizer)
        self.template = template
        self.special_strings = special_strings  # bos_token, eos_token, ... as transformers passes them
        self.stop_ids = frozenset(stop_ids)
        specials = sorted((t for t in tokenizer.special if t not in self.user_switches), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials)) or "(?!)")
        self._marked_re = re.compile(f"{START}({self._special_re.pattern}){END}|[{START}{END}]")

    @staticmethod
    def prepared(messages: list[dict]) -> list[dict]:
        """The same checks as every format (roles, content types); lists of text parts become their text, which
        every template reads; call arguments become mappings; other None values are dropped."""
        texts = [{**m, "content": [p for p in m["content"] if p != PLACEHOLDER]} if has_placeholders(m) else m
                 for m in messages or []]  # image placeholders (split_images) stay as parts the template reads
        flat = normalize(texts) if messages else []
        messages = [{k: v for k, v in {**m, **({"content": f["content"]} if isinstance(m.get("content"), list)
                                               and not has_placeholders(m) or m.get("tool_calls") else {})}.items()
                     if v is not None} for m, f in zip(messages, flat)]  # a tool call keeps its content ("" for None)
        return [{**m, "tool_calls": [_dict_arguments(c) for c in m["tool_calls"]]}
                if isinstance(m.get("tool_calls"), list) else m for m in messages]

    def check_kwargs(self, template_kwargs: dict) -> None:
        reserved = sorted(set(template_kwargs) & (RESERVED | set(self.special_strings)))
        if reserved:
            raise GlmkitError(f"chat template argument(s) {reserved} are set by glmkit itself; leave them out.")

    def render_text(self, messages, tools=None, add_generation_prompt=True, **template_kwargs) -> str:
        messages = self.prepared(messages)
        self.check_kwargs(template_kwargs)
        import jinja2

        try:
            return compile_template(self.template).render(
                messages=self._mark(messages), tools=self._mark(tools), documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_strings, **self._mark(template_kwargs))
        except jinja2.exceptions.TemplateError as e:
            raise GlmkitError(f"the chat template refused these messages: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise GlmkitError(f"the chat template cannot render these messages ({type(e).__name__}: {e}); check "
                              "the message fields it reads.") from None

    def _mark(self, obj: Any) -> Any:
        if isinstance(obj, str):
            obj = obj.replace(START, "").replace(END, "")
            return self._special_re.sub(lambda m: f"{START}{m.group()}{END}", obj)
        if isinstance(obj, dict):
            return {k: self._mark(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self._mark(v) for v in obj]
        return obj

    def encode_rendered(self, text: str) -> list[int]:
        """Template text with its own specials parsed; marked special text from users encoded as text."""
        pieces = self._marked_re.split(text)  # [text, marked token or None, text, ...]
        ids = self.tok.encode(pieces[0], allow_special=True)
        newline = self.tok.encode("\n", allow_special=False)
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1
            # encode after a newline so SentencePiece adds no prefix space mid-text, then drop the newline
            piece_ids = self.tok.encode("\n" + piece, allow_special=not as_text)
            ids += (piece_ids[len(newline):] if piece_ids[:len(newline)] == newline
                    else self.tok.encode(piece, allow_special=not as_text))
        return ids

    def render(self, messages, tools=None, add_generation_prompt=True, **template_kwargs):
        """template_kwargs: what the template reads beyond messages and tools (enable_thinking, clear_thinking,
        reasoning_effort, ...), as transformers' apply_chat_template passes them."""
        ids = self.encode_rendered(self.render_text(messages, tools, add_generation_prompt, **template_kwargs))
        mask = [False] * len(ids)
        for i, m in enumerate(messages):  # each assistant turn: the tokens it adds after the generation prompt
            if m.get("role") != "assistant":
                continue
            before = self.encode_rendered(self.render_text(messages[:i], tools, True, **template_kwargs)) if i else []
            upto = self.encode_rendered(self.render_text(messages[: i + 1], tools, False, **template_kwargs))
            if ids[: len(before)] == before and ids[: len(upto)] == upto:
                mask[len(before): len(upto)] = [True] * (len(upto) - len(before))
        return ids, mask
