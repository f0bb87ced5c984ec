"""Constrained decoding (structured outputs): a JSON schema or a Lark grammar becomes a per-token mask.

llguidance compiles grammars against the tokenizer's byte vocabulary (`Tokenizer.token_bytes`, built once per
model); every sequence then runs its own `Matcher`: `allowed()` is the (V,) bool mask of ids that keep the
output inside the grammar (only the stop ids once the output is complete), `advance(id)` moves it on. The
engine sees only that protocol, through `SamplingParams.grammar`. llguidance over xgrammar: no dependencies
of its own (xgrammar pulls transformers and triton) and the lower per-token cost on this CPU
(benchmarks/structured.py measures both). Knows nothing about requests, chat formats or HTTP.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from glmkit.errors import GlmkitError
from glmkit.tokenizer import Tokenizer

# compact JSON (", " and ": ", no free whitespace): small models otherwise pad objects with blank lines
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
JSON_EXACT = 2 ** 53 - 1  # the largest integer every JSON reader holds exactly
BITS = torch.arange(32, dtype=torch.int32)  # (32,)


def json_lark(schema: dict | bool | None) -> str:
    """A Lark fragment for one JSON value of `schema` (None: any JSON object), for use inside other grammars."""
    schema = {"type": "object"} if schema is None or schema is True else schema
    if not isinstance(schema, dict):
        raise GlmkitError("a JSON schema must be an object, e.g. {\"type\": \"object\", \"properties\": ...}.")
    schema = tightened(schema)
    return "%json " + json.dumps({**schema, "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}})


def tightened(schema: Any) -> Any:
    """The schema as generation reads it: objects that list their properties allow no others unless they say
    so (as OpenAI's strict mode and xgrammar's strict_mode read schemas), and integers without bounds stay
    within JSON's exact range, 16 digits (as llama.cpp's grammars do): otherwise a small model keeps inventing
    keys, or digits."""
    if isinstance(schema, list):
        return [tightened(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: tightened(v) if k not in ("const", "enum", "default", "examples") else v for k, v in schema.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if out.get("type") == "integer" and not {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & set(out):
        out["minimum"], out["maximum"] = -JSON_EXACT, JSON_EXACT
    return out


def response_schema(response_format: dict | None) -> dict | None:
    """OpenAI's response_format -> the JSON schema the reply must follow (None: free text)."""
    kind = response_format.get("type") if isinstance(response_format, dict) else response_format
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema") if kind == "json_schema" else None
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise GlmkitError("response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                          "'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}"
                          f"{'' if kind != 'json_schema' else ' (its json_schema.schema must be an object)'}.")
    return spec.get("schema") or {"type": "object"}


def forced_tool(tool_choice: Any) -> tuple[bool, str | None]:
    """OpenAI's tool_choice -> (a call is forced, the function it must be: None for any)."""
    if tool_choice in (None, "none", "auto"):
        return False, None
    if tool_choice == "required":
        return True, None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if tool_choice.get("type", "function") != "function" or not isinstance(fn, dict) or \
            not isinstance(fn.get("name"), str):
        raise GlmkitError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                          "{'name': ...}}.")
    return True, fn["name"]


def _lark_item(item: str | dict | list | tuple, special: dict[str, int]) -> str:
    """One item of a chat format's forced-call description (chat/tools.py) in Lark."""
    if isinstance(item, str):
        return json.dumps(item, ensure_ascii=False)  # a Lark string literal
    if isinstance(item, tuple) and item[0] == "special":  # its id: ordinary tokens could spell its text too
        return f"<[{special[item[1]]}]>"
    if isinstance(item, tuple):  # free text: special tokens are not text, so a following one ends it
        return "/(?s:.*)/"
    if isinstance(item, dict):
        return json_lark(item)
    return "(" + " ".join(_lark_item(i, special) for i in item) + ")?"


class Grammars:
    """The grammar compiler of one model: its vocabulary as llguidance reads it, made on first use (~1 s for
    a 150k vocabulary) and shared by every request."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: set[int] | frozenset[int]):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._compiled = None
        self._lock = threading.Lock()

    @property
    def lltokenizer(self):
        with self._lock:
            if self._compiled is None:
                import llguidance

                tokens = self.tokenizer.token_bytes()[: self.vocab_size]
                tokens += [b""] * (self.vocab_size - len(tokens))  # padded embedding rows: never allowed
                wrapper = _Vocabulary(tokens, self.tokenizer, self.stop_ids)
                self._compiled = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper),
                                                        n_vocab=self.vocab_size, eos_token=self.stop_ids)
            return self._compiled

    def for_reply(self, chat_format, response_format: dict | None = None, tools: list[dict] | None = None,
                  tool_choice: Any = None) -> "Grammar | None":
        """The grammar a chat reply must follow: a forced tool call (tool_choice 'required' or {'type':
        'function', 'function': {'name': ...}}) in `chat_format`'s own syntax (its forced_call), else OpenAI's
        response_format (json_object, json_schema); None for free text."""
        forced, name = forced_tool(tool_choice)
        if forced:
            if chat_format is None:
                raise GlmkitError("tool_choice needs a chat format; this model has none.")
            return self.choice(chat_format.forced_call(tools, name))
        schema = response_schema(response_format)
        return None if schema is None else self.json(schema)

    def json(self, schema: dict | None = None) -> "Grammar":
        """One JSON value of `schema` (None: any JSON object), then a stop id."""
        return self.lark("start: " + json_lark(schema))

    def choice(self, alternatives: list[list]) -> "Grammar":
        """One of several sequences of items: text (literal), a dict (a JSON schema) or a list (an optional
        group of items), as chat formats describe a forced tool call."""
        items = lambda seq: " ".join(_lark_item(i, self.tokenizer.special) for i in seq)  # noqa: E731
        return self.lark("start: " + " | ".join(map(items, alternatives)))

    def lark(self, text: str) -> "Grammar":
        """A grammar in llguidance's Lark dialect (`%json {...}` embeds a JSON schema); checked here, so a bad
        grammar or schema is the caller's clear error, not a failure mid-generation."""
        from llguidance import LLMatcher

        grammar = LLMatcher.grammar_from_lark(text)
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if failed:
            raise GlmkitError(f"the output schema or grammar cannot be used: {messages[0] if messages else text}.")
        return Grammar(self.lltokenizer, grammar, self.vocab_size)


class Grammar:
    """A checked grammar; `start()` gives each sequence its own Matcher."""

    def __init__(self, lltokenizer, grammar: str, vocab_size: int):
        self.lltokenizer, self.text, self.vocab_size = lltokenizer, grammar, vocab_size

    def start(self) -> "Matcher":
        return Matcher(self)


class Matcher:
    def __init__(self, grammar: Grammar):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(grammar.lltokenizer, grammar.text, log_level=0)
        self.vocab_size = grammar.vocab_size
        self.words = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)  # (W,) one bit per id
        self._check()

    def allowed(self) -> torch.Tensor:
        """-> (V,) bool: the ids the grammar allows next."""
        self.matcher.unsafe_compute_mask_ptr(self.words.data_ptr(), self.words.numel() * 4)
        self._check()
        bits = (self.words[:, None] >> BITS) & 1  # (W, 32)
        return bits.reshape(-1)[: self.vocab_size].bool()  # (V,)

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GlmkitError(f"constrained decoding failed: {self.matcher.get_error()}")


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: the byte strings, the stop ids and the encoder."""

    def __init__(self, tokens: list[bytes], tokenizer: Tokenizer, stop_ids: list[int]):
        self.tokens, self.tokenizer = tokens, tokenizer
        self.eos_token_id = stop_ids[0] if stop_ids else None
        self.bos_token_id = None
        self.special_token_ids = [i for i, t in enumerate(tokens) if t.startswith(b"\xff")]

    def __call__(self, text: Any) -> list[int]:
        """Text as it tokenizes mid-reply: after a newline, so SentencePiece adds no prefix space, which dropped."""
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        newline, ids = self.tokenizer.encode("\n"), self.tokenizer.encode("\n" + text)
        return ids[len(newline):] if ids[: len(newline)] == newline else self.tokenizer.encode(text)
