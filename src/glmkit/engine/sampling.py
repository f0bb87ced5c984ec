"""Sampling: small pure functions over one row of logits, composed by `make_sampler`.

Penalties (repetition, presence, frequency) look at the ids seen so far; filters (top-k, top-p,
min-p) set logits to -inf; temperature 0 is greedy; randomness comes only from an explicit
torch.Generator. Parameters are bounded so that no request can produce non-finite probabilities
(temperature and top_p below a floor mean greedy); NaN/Inf logits are reported, never sampled.
Knows nothing about models or text.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, TypedDict

import torch

from glmkit.errors import GlmkitError


MIN_TEMPERATURE = 1e-4  # dividing logits by less overflows float32: greedy instead
MIN_TOP_P = 1e-8
RANGES = {"max_tokens": "at least 1", "temperature": "0 to 100; 0 is greedy", "top_p": "above 0, at most 1",
          "top_k": "0 (off) or more", "min_p": "0 to 1", "repetition_penalty": "0.01 to 100",
          "presence_penalty": "-2 to 2", "frequency_penalty": "-2 to 2", "seed": "0 to 2**63 - 1",
          "logprobs": "0 to 20", "logit_bias": "at most 1024 token ids, each biased by -100 to 100"}


# Without the authors' settings: llama-server's defaults, which stop the small models on their own
FALLBACK = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
NEUTRAL = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}  # what a generation_config leaves unsaid
DEFAULT_MAX_TOKENS = 4096  # when neither the request nor the checkpoint says: never the whole of a 128k context


def sampling_defaults(generation: dict) -> dict:
    """The sampling defaults a checkpoint's generation_config.json asks for (as vLLM reads it: the keys it sets
    over neutral values; do_sample false is greedy), or llama-server's defaults when it sets none."""
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "do_sample")
    if not any(generation.get(k) is not None for k in keys):
        return dict(FALLBACK)
    out = dict(NEUTRAL)
    for key in keys[:-1]:
        if isinstance(generation.get(key), (int, float)) and not isinstance(generation.get(key), bool):
            out[key] = generation[key]
    if generation.get("do_sample") is False:
        out["temperature"] = 0.0
    if isinstance(generation.get("max_new_tokens"), int) and generation["max_new_tokens"] > 0:
        out["max_tokens"] = generation["max_new_tokens"]
    return out


class Sampling(TypedDict, total=False):
    """The sampling keyword arguments of LLM.generate / generate_batch / chat (left out: the model's defaults)."""
    max_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # 0 = off
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    stop: str | list[str]  # stop strings, never emitted
    stop_token_ids: list[int]
    ignore_eos: bool
    seed: int
    logprobs: int  # record each token's log-probability and this many top alternatives (Completion.logprobs)
    logit_bias: dict[int, float]  # token id -> bias added to its logit (-100 bans it)
    response_format: dict  # OpenAI's: {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {...}}
    grammar: Any  # a compiled grammar (llm.grammars.json(schema) / .lark(text)) the output must follow


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens already seen (CTRL-style, on prompt and output)
    presence_penalty: float = 0.0  # OpenAI-style, on output tokens
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)  # stop strings: never emitted, may span tokens
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's own stop ids
    ignore_eos: bool = False  # keep going past stop ids (benchmarks)
    seed: int | None = None
    logprobs: int | None = None  # record each sampled token's log-probability and this many top alternatives
    logit_bias: dict[int, float] | None = None  # added to those ids' logits before anything else (-100 bans)
    grammar: Any = None  # constrained decoding: anything with .start() -> a matcher (allowed(), advance(id))

    def __post_init__(self):
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (
            self.temperature, self.top_p, self.min_p, self.repetition_penalty, self.presence_penalty,
            self.frequency_penalty))
        checks = [("max_tokens", self.max_tokens >= 1), ("temperature", finite and 0 <= self.temperature <= 100),
                  ("top_p", 0 < self.top_p <= 1), ("top_k", self.top_k >= 0), ("min_p", 0 <= self.min_p <= 1),
                  ("repetition_penalty", 0.01 <= self.repetition_penalty <= 100),
                  ("presence_penalty", -2 <= self.presence_penalty <= 2),
                  ("frequency_penalty", -2 <= self.frequency_penalty <= 2),
                  ("seed", self.seed is None or 0 <= self.seed < 2 ** 63),
                  ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20)]
        bias = self.logit_bias or {}
        checks.append(("logit_bias", isinstance(bias, dict) and len(bias) <= 1024 and all(
            isinstance(k, int) and k >= 0 and isinstance(v, (int, float)) and -100 <= v <= 100
            for k, v in bias.items())))
        for name, ok in checks:
            if not ok:
                raise GlmkitError(f"sampling parameter {name}={getattr(self, name)!r} is out of range "
                                  f"({RANGES[name]}).")
        if self.temperature < MIN_TEMPERATURE or self.top_p < MIN_TOP_P:
            self.temperature = 0.0  # below these floors sampling is greedy in all but rounding: made exactly so
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]


def apply_penalties(logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int],
                    p: SamplingParams) -> torch.Tensor:
    """logits (V,) float32 -> penalized copy."""
    if p.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=logits.device)
        vals = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and output_ids:
        ids = torch.tensor(output_ids, device=logits.device)
        counts = torch.zeros_like(logits).index_add_(0, ids, torch.ones(len(output_ids), device=logits.device))
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return logits


NUCLEUS_HEADS = (64, 1024, 8192, 1 << 62)  # top-p alone: the nucleus is looked for among this many best first
SPLIT_FROM = 8192  # top-k of a vocabulary at least this big runs on its two halves at once
ARGMAX_BLOCK = 256  # argmax() searches a big vocabulary's blocks of this many logits first
TIE_ROOM = 16  # top-k searches this many more than k, for the ties with the k-th
FEW = 256  # up to this many best are merged from the halves as Python lists (best_few)


def best(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest logits of (V,) and their ids, largest first. A big vocabulary's halves are searched at
    once (one search each: ~1.8x faster than one over the whole; torch sorts 49k floats in ~3.5 ms here)."""
    V = logits.numel()
    if n >= V:
        return torch.sort(logits, descending=True)
    if V >= SPLIT_FROM and V % 2 == 0:
        values, ids = torch.topk(logits.view(2, V // 2), n)  # (2, n): each half's best
        ids = ids + torch.tensor([[0], [V // 2]], device=ids.device)  # (2, n) ids in the whole vocabulary
        values, pick = torch.topk(values.reshape(-1), n)  # (n,): the best of both
        return values, ids.reshape(-1)[pick]
    return torch.topk(logits, n)


def argmax(logits: torch.Tensor) -> int:
    """int(torch.argmax(logits (V,))), the first of equal maxima too, ~6x faster on a big vocabulary: the best
    block of ARGMAX_BLOCK logits by its maximum (a vectorized reduction), then the best in that block (torch's
    argmax over 49k bfloat16 logits takes ~180 us here)."""
    V = logits.numel()
    if V < 4 * ARGMAX_BLOCK or V % ARGMAX_BLOCK:
        return int(torch.argmax(logits))
    blocks = logits.view(V // ARGMAX_BLOCK, ARGMAX_BLOCK)  # (B, 256)
    block = int(torch.argmax(blocks.amax(1)))  # the first block holding the maximum (NaN counts as one)
    return block * ARGMAX_BLOCK + int(torch.argmax(blocks[block]))


def best_few(logits: torch.Tensor, n: int) -> tuple[list[float], list[int]]:
    """best() as lists, for a few (n <= FEW) of a big vocabulary: one search of its halves, merged in Python (a
    tensor op costs tens of microseconds right after a decode step has swept the caches). NaN sorts first,
    as in torch.topk."""
    V = logits.numel()
    if n > FEW or V < SPLIT_FROM or V % 2:
        return tuple(t.tolist() for t in best(logits, n))
    values, ids = torch.topk(logits.view(2, V // 2), n)  # (2, n): each half's best
    (first, second), (at, at2) = values.tolist(), ids.tolist()
    pairs = list(zip(first, at)) + list(zip(second, (i + V // 2 for i in at2)))
    pairs.sort(key=lambda vi: -math.inf if math.isnan(vi[0]) else -vi[0])  # (stable: ties keep topk's order)
    return [v for v, _ in pairs[:n]], [i for _, i in pairs[:n]]


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top if not math.isfinite(top) else top + math.log(sum(math.exp(v - top) for v in values))


def candidates(logits: torch.Tensor, top_k: int, top_p: float, min_p: float,
               temperature: float = 1.0) -> tuple[torch.Tensor | list[float], list[int] | None]:
    """What top-k, top-p and min-p keep of logits (V,) / temperature: (their scaled logits, their ids). With
    top-k on, only the k + TIE_ROOM best logits are read, in any dtype, and only those kept are scaled (no pass
    over the whole vocabulary beyond the search). With top-k or top-p on, both
    are lists, most likely first (they hold few tokens: list arithmetic beats a dozen tiny tensor ops), but for
    a nucleus of thousands of tokens or min-p alone the logits stay a tensor; with no filter, (logits, None).
    Top-k keeps the k best; top-p the smallest set of most likely tokens whose probability reaches p (at least
    one); both also keep every token tied with the last one they keep (no arbitrary choice among equals, which
    a grammar's forced tokens often are); min-p drops tokens less likely than min_p times the most likely one
    (a ratio, so it does not matter that top-k/top-p came first). Only candidates are sorted: the k best, or
    for top-p alone the fewest of NUCLEUS_HEADS best that hold p of the probability."""
    V = logits.numel()
    k = top_k if 0 < top_k < V else V
    if k == V:  # the filters below read the whole vocabulary: scale it whole
        logits = logits.float() / temperature
    if k == V and top_p >= 1.0:  # min-p alone, or nothing: over the whole vocabulary
        if min_p <= 0.0:
            return logits, None
        keep = logits >= logits.max() + math.log(min_p)  # (V,): p_i >= min_p * p_max
        return logits[keep], keep.nonzero()[:, 0].tolist()
    total = None  # log of the probability mass top-p measures against (all tokens, or the top-k kept)
    if k == V:  # top-p alone: the best few may already hold p of the whole vocabulary's mass
        total = float(torch.logsumexp(logits.double(), -1))  # in double, as the sums below
        for head in NUCLEUS_HEADS:
            values, ids = best(logits, min(head, V))
            if head >= V or float(torch.exp(values.double() - total).sum()) >= top_p:
                break
        if head > NUCLEUS_HEADS[1]:  # a nucleus of thousands of tokens: cut as tensors
            return wide_nucleus(values, ids, total, top_p, min_p)
        values, ids = values.tolist(), ids.tolist()
    else:
        # of the logits as given (a temperature keeps their order), and a few more: ties with the k-th all stay,
        # and bfloat16 logits tie often
        values, ids = best_few(logits, min(V, k + TIE_ROOM))
        if not math.isfinite(values[0]):  # NaN or +inf on top (they sort first): as found, for the caller to report
            return values, ids
        n = k
        while n < len(values) and values[n] == values[k - 1] and math.isfinite(values[n]):
            n += 1
        if n == len(values) < V:  # the ties run past the search: all of them, from the whole vocabulary
            tied = (logits >= values[k - 1]).nonzero()[:, 0]
            ordered, order = logits[tied].sort(descending=True)
            values, ids = ordered.tolist(), tied[order].tolist()
        else:
            values, ids = values[:n], ids[:n]
        values = [v / temperature for v in values]  # (in double: distinct logits stay distinct)
    if top_p < 1.0:
        total = _logsumexp(values) if total is None else total
        n, mass = len(values), 0.0
        for i, v in enumerate(values):
            if mass >= top_p:  # the mass before token i already reaches p: it is not needed
                n = i
                break
            mass += math.exp(v - total)
        n = max(1, n)
        while n < len(values) and values[n] >= values[n - 1]:  # and the tokens tied with the last one kept
            n += 1
        values, ids = values[:n], ids[:n]
    if min_p > 0.0:
        floor = values[0] + math.log(min_p)  # p_i >= min_p * p_max (values[0] is the largest)
        kept = [i for i, v in enumerate(values) if v >= floor]
        values, ids = [values[i] for i in kept], [ids[i] for i in kept]
    return values, ids


def wide_nucleus(ordered: torch.Tensor, order: torch.Tensor, total: float, top_p: float,
                 min_p: float) -> tuple[torch.Tensor, list[int]]:
    """candidates() for top-p alone when the nucleus holds thousands of tokens (of `ordered`, the best logits
    largest first, ids `order`): the same cut, ties and min-p as tensor operations, where lists would cost
    milliseconds."""
    probs = torch.exp(ordered.double() - total)  # (n,)
    n = max(1, int(((probs.cumsum(0) - probs) < top_p).sum()))  # the mass before a token below p: it stays
    n = int((ordered >= ordered[n - 1]).sum())  # and the tokens tied with the last one kept
    if min_p > 0.0:
        n = min(n, int((ordered >= ordered[0] + math.log(min_p)).sum()))  # p_i >= min_p * p_max
    return ordered[:n], order[:n].tolist()


def draw(values: torch.Tensor | list[float], generator: torch.Generator | None) -> int:
    """An index into values (logits) drawn with probability softmax(values), from the generator's stream (torch's
    global one without): one uniform number and a search in the cumulative weights. (torch.multinomial over a
    whole vocabulary costs ~0.8 ms here.)"""
    u = torch.rand((), generator=generator, device=values.device if torch.is_tensor(values) else "cpu")
    if torch.is_tensor(values):
        weights = torch.exp(values - values.max()).cumsum(0)  # (n,)
        return min(int(torch.searchsorted(weights, u * weights[-1], right=True)), len(weights) - 1)
    top = max(values)
    weights = list(itertools.accumulate(math.exp(v - top) for v in values))
    return min(bisect.bisect_right(weights, float(u) * weights[-1]), len(weights) - 1)


def make_sampler(p: SamplingParams) -> Callable[..., int]:
    """-> sample(logits (V,), prompt ids, output ids, generator, allowed (V,) bool or None) -> token id."""

    plain = not p.logit_bias and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty

    def sample(logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int],
               generator: torch.Generator | None, allowed: torch.Tensor | None = None) -> int:
        if plain and allowed is None and (p.temperature == 0 or 0 < p.top_k < logits.numel()):
            return from_the_best(logits, generator)
        logits = logits.float()
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            if int(ids.max()) >= logits.numel():
                raise GlmkitError(f"logit_bias names token id {int(ids.max())}, outside the vocabulary "
                                  f"(0..{logits.numel() - 1}).")
            bias = torch.tensor([float(v) for v in p.logit_bias.values()], device=logits.device)  # (n,)
            logits = logits.index_add(0, ids, bias)
        if not math.isfinite(float(logits.sum())):  # one reduction: NaN or inf anywhere makes the sum so
            raise GlmkitError(NON_FINITE)
        if allowed is not None:  # a grammar's mask: what it rules out can never be sampled
            logits = logits.masked_fill(~allowed, float("-inf"))
        logits = apply_penalties(logits, prompt_ids, output_ids, p)
        if p.temperature == 0:
            return argmax(logits)
        values, ids = candidates(logits, p.top_k, p.top_p, p.min_p, p.temperature)  # (n,) each
        chosen = draw(values, generator)
        return chosen if ids is None else ids[chosen]

    def from_the_best(logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """Greedy or top-k with nothing else to apply: one search over the logits as the model gave them (each
        pass over a big vocabulary costs ~40-50 us right after a decode step). NaN and +inf sort first, so the
        best logit being finite means the candidates are."""
        if p.temperature == 0:
            token = argmax(logits)
            top = float(logits[token])
        else:
            values, ids = candidates(logits, p.top_k, p.top_p, p.min_p, p.temperature)
            top, token = values[0], None
        if not math.isfinite(top):
            raise GlmkitError(NON_FINITE)
        return token if token is not None else ids[draw(values, generator)]

    return sample


NON_FINITE = ("the model produced NaN or infinite logits; the weights may be damaged, or float16 overflowed (load "
              "with dtype='bfloat16' or 'float32').")


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, dict[int, float]]:
    """logits (V,) -> (the log-probability of `token`, {id: log-probability} of the k most likely ids)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, k) if k else None
    return float(lp[token]), ({} if top is None else dict(zip(top.indices.tolist(), top.values.tolist())))
