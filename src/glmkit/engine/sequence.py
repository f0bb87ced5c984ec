"""One request's state in the engine: prompt, sampled ids, streamed text and its stop rules.

Stop ids end a sequence without being emitted; stop strings are found even when they span tokens and
are never emitted either (text that could still become a stop string is held back); max_tokens ends
it with finish_reason 'length'. Knows nothing about the model or the cache layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from glmkit.engine.detokenize import StreamingDetokenizer
from glmkit.engine.sampling import SamplingParams, make_sampler, top_logprobs
from glmkit.errors import GlmkitError


@dataclass
class Chunk:
    """A piece of streamed output: new text, the ids it came from, and the finish reason on the last one."""
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Completion:
    """A finished generation; fields also read as completion["text"], like LLM.chat's ChatReply."""
    text: str
    token_ids: list[int]  # generated ids only, without the stop id
    finish_reason: str  # 'stop', 'length', 'tool_calls' (chat) or 'cancelled'
    usage: dict[str, int] = field(default_factory=dict)
    logprobs: list[tuple[float, dict[int, float]]] | None = None  # per token: (its logprob, top alternatives)

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)


def prompt_key(prompt: list[int], images) -> list:
    """The prompt with each image's tokens replaced by (its digest, i): two prompts share cached keys only where
    their images are the same, whatever placeholder ids stand for them."""
    if not images:
        return prompt
    key, at = list(prompt), 0
    for image in images:
        at = prompt.index(image.token_id, at)
        key[at: at + image.tokens] = [(image.digest, i) for i in range(image.tokens)]
        at += image.tokens
    return key


class Sequence:
    def __init__(self, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int],
                 decode: Callable[[list[int]], str] | None, device: torch.device | str = "cpu"):
        self.prompt = list(prompt)
        self.images = tuple(getattr(prompt, "images", ()))  # an image prompt's images (llm / images.py)
        self.key = prompt_key(self.prompt, self.images)  # what prefix reuse compares: images by content
        self.params = params
        self.stop_ids = frozenset() if params.ignore_eos else frozenset(stop_ids) | set(params.stop_token_ids)
        self.sample = make_sampler(params)
        self.matcher = params.grammar.start() if params.grammar is not None else None  # structured output
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.output: list[int] = []
        self.detok = StreamingDetokenizer(decode) if decode is not None else None
        self.text = ""  # decoded output so far (complete characters only)
        self.emitted = 0  # characters of self.text already handed out
        self.finish_reason: str | None = None
        self.slot: int | None = None
        self.pending: list[int] = []  # ids accepted since the last chunk
        self.max_new = params.max_tokens  # lowered by the engine to fit the context
        self.fed = 0  # ids whose keys are in the cache
        self.prefilled = 0  # prompt ids the last prefill ran (the rest came from a cached prefix)
        self.error: str | None = None
        self.error_is_internal = False  # True: not the request's fault (the server answers 500, not 400)
        self.logprobs: list[tuple[float, dict[int, float]]] = []  # per output id: (its logprob, top alternatives)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.output

    @property
    def length(self) -> int:
        """len(ids), without building them."""
        return len(self.prompt) + len(self.output)

    @property
    def last_id(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]

    @property
    def keys(self) -> list:
        """ids as prefix reuse compares them: an image's tokens stand for that image's content."""
        return self.key + self.output

    def take(self, logits: torch.Tensor) -> Chunk | None:
        """Sample the next id from this sequence's logits (V,) and accept it. Any failure here (NaN / Inf
        logits, a stop rule or detokenizer error) ends this sequence only, with the reason: the batch
        around it keeps decoding."""
        try:
            allowed = self.matcher.allowed() if self.matcher is not None else None
            token = self.sample(logits, self.prompt, self.output, self.generator, allowed)
            if self.matcher is not None and token not in self.stop_ids:
                self.matcher.advance(token)
            if self.params.logprobs is not None:  # under the model's own distribution, before sampling filters
                self.logprobs.append(top_logprobs(logits, token, self.params.logprobs))
            return self.accept(token)
        except Exception as e:  # noqa: BLE001 - contained to this sequence, reported to its client
            return self.fail(e, "sampling")

    def fail(self, error: Exception, during: str) -> Chunk:
        """End this sequence with an error (a GlmkitError's own sentence, else what failed), nothing else."""
        self.error_is_internal = not isinstance(error, GlmkitError)
        self.error = str(error) if not self.error_is_internal else \
            f"this request failed during {during} ({type(error).__name__}: {error})."
        return self.finish("error", flush=False)

    def accept(self, token: int) -> Chunk | None:
        """Take one sampled id; return a chunk of newly safe text (or the final chunk), else None."""
        if token in self.stop_ids:
            return self.finish("stop")
        self.output.append(token)
        self.pending.append(token)
        if self.detok is not None:
            self.text += self.detok.push(token)
            if self.params.stop and self._cut_at_stop_string():
                return self.finish("stop", flush=False)
        if len(self.output) >= self.max_new:
            return self.finish("length")
        return self._chunk()

    def _cut_at_stop_string(self) -> bool:
        window = max(map(len, self.params.stop)) + 16
        lo = max(0, self.emitted - window)
        hits = [i for i in (self.text.find(s, lo) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _safe_end(self) -> int:
        """End of the text that cannot be the beginning of a stop string."""
        end = len(self.text)
        for s in self.params.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if self.text.endswith(s[:k]):
                    end = min(end, len(self.text) - k)
                    break
        return end

    def _chunk(self) -> Chunk | None:
        end = self._safe_end()
        if end <= self.emitted and not self.pending:
            return None
        piece, self.emitted = self.text[self.emitted: end], max(self.emitted, end)
        ids, self.pending = self.pending, []
        return Chunk(piece, ids)

    def finish(self, reason: str, flush: bool = True) -> Chunk:
        if flush and self.detok is not None:
            self.text += self.detok.flush()
        self.finish_reason = reason
        piece, self.emitted = self.text[self.emitted:], len(self.text)
        ids, self.pending = self.pending, []
        return Chunk(piece, ids, reason)

    def cancel(self) -> None:
        if not self.done:
            self.finish_reason = "cancelled"

    def completion(self) -> Completion:
        n = len(self.output)
        return Completion(self.text, list(self.output), self.finish_reason or "cancelled",
                          {"prompt_tokens": len(self.prompt), "completion_tokens": n,
                           "total_tokens": len(self.prompt) + n},
                          list(self.logprobs) if self.params.logprobs is not None else None)
