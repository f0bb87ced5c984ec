"""The GLM pretraining objective: autoregressive blank infilling (THUDM/GLM, ACL 2022).

A document's spans are replaced by one mask token each (Part A); the spans follow in shuffled order,
each as <sop> + span, to be predicted left to right and ended by <eop> (Part B). 2D positions: a
Part-B token takes its span's mask position and a block position counting from 1 at <sop>. Part A is
bidirectional and sees no Part B (prefix_len = len(Part A)); Part B is causal. Loss on Part B only.
`build_sample` is the deterministic layout; `sample_spans` / `sentence_spans` / `glm_sample` draw the
spans, choosing per sample between token-level [MASK], sentence-level [sMASK] and document-level [gMASK]
blanks with the weights of `Mixture`. No model and no tensors here (data.py collates).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

IGNORE = -100


@dataclass
class GLMTokens:
    mask: int  # [MASK]: token-level spans
    smask: int  # [sMASK]: sentence-level spans
    gmask: int  # [gMASK]: one document-level span at the end
    sop: int
    eop: int


@dataclass
class GLMSample:
    input_ids: list[int]
    position_ids: list[list[int]]  # [positions, block positions]
    prefix_len: int  # len(Part A): these tokens see each other; Part B is causal
    labels: list[int]  # IGNORE on Part A; on Part B the next token of the span (eop at its end)


def build_sample(tokens: list[int], spans: list[tuple[int, int]], order: list[int], mask_id: int,
                 sop: int, eop: int) -> GLMSample:
    """tokens with spans [(start, end), ...] (sorted, disjoint) blanked by mask_id; Part B in `order`."""
    part_a, mask_at, cursor = [], [], 0
    for start, end in spans:
        part_a += tokens[cursor:start]
        mask_at.append(len(part_a))
        part_a.append(mask_id)
        cursor = end
    part_a += tokens[cursor:]
    ids, pos, block, labels = list(part_a), list(range(len(part_a))), [0] * len(part_a), [IGNORE] * len(part_a)
    for k in order:
        start, end = spans[k]
        span = tokens[start:end]
        ids += [sop] + span
        pos += [mask_at[k]] * (len(span) + 1)
        block += list(range(1, len(span) + 2))
        labels += span + [eop]
    return GLMSample(ids, [pos, block], len(part_a), labels)


def poisson_lengths(rng: random.Random, total: int, ratio: float = 0.15, lam: float = 3.0,
                    max_len: int = 39) -> list[int]:
    """Span lengths ~ Poisson(lam) truncated to 1..max_len, drawn until they cover `ratio` of `total`."""
    weights = [math.exp(-lam) * lam ** k / math.factorial(k) for k in range(1, max_len + 1)]
    lengths = []
    while sum(lengths) < ratio * total:
        lengths.append(rng.choices(range(1, max_len + 1), weights)[0])
    return lengths


def sample_spans(rng: random.Random, lengths: list[int], total: int) -> list[tuple[int, int]]:
    """Place spans of the given lengths (in shuffled order) with at least one token between them."""
    lengths = list(lengths)
    rng.shuffle(lengths)
    free = total - sum(lengths) - len(lengths) + 1
    if free < 0:
        return []
    places = sorted(rng.randrange(free + 1) for _ in lengths)
    spans, offset = [], 0
    for place, n in zip(places, lengths):
        spans.append((offset + place, offset + place + n))
        offset += n + 1
    return spans


@dataclass(frozen=True)
class Mixture:
    """Per-sample choice of blank kind (THUDM/GLM's GLM-10B recipe: 0.5 / 0.3 / 0.2)."""

    mask: float = 0.5  # token-level spans, Poisson(3) lengths, ~15% of tokens
    sentence: float = 0.3  # whole sentences, ~15% of tokens
    gmask: float = 0.2  # one span at the end, a share of the text in [gpt_min_ratio, 1)
    ratio: float = 0.15
    gpt_min_ratio: float = 0.5


def sentence_spans(rng: random.Random, tokens: list[int], ends: frozenset[int],
                   ratio: float = 0.15) -> list[tuple[int, int]]:
    """Whole sentences (a sentence ends after a token in `ends`), picked in random order until they cover
    `ratio` of the tokens; [] when the text has fewer than two sentences."""
    bounds, start = [], 0
    for i, t in enumerate(tokens):
        if t in ends:
            bounds.append((start, i + 1))
            start = i + 1
    if start < len(tokens):
        bounds.append((start, len(tokens)))
    if len(bounds) < 2:
        return []
    picked, covered = [], 0
    for k in rng.sample(range(len(bounds)), len(bounds) - 1):  # never every sentence: Part A keeps one
        picked.append(bounds[k])
        covered += bounds[k][1] - bounds[k][0]
        if covered >= ratio * len(tokens):
            break
    return sorted(picked)


def glm_sample(tokens: list[int], ids: GLMTokens, rng: random.Random, mixture: Mixture = Mixture(),
               sentence_ends: frozenset[int] = frozenset()) -> GLMSample:
    """One training sample of the GLM objective, its blank kind drawn from `mixture`."""
    L = len(tokens)
    kind = rng.choices(("mask", "sentence", "gmask"), (mixture.mask, mixture.sentence, mixture.gmask))[0]
    spans: list[tuple[int, int]] = []
    if kind == "gmask" and L >= 4:
        n = rng.randint(max(1, int(mixture.gpt_min_ratio * L)), L - 2)
        spans, mask = [(L - n, L)], ids.gmask
    elif kind == "sentence":
        spans, mask = sentence_spans(rng, tokens, sentence_ends, mixture.ratio), ids.smask
    if not spans:  # token-level spans (also when the text is too short for the other kinds)
        spans, mask = sample_spans(rng, poisson_lengths(rng, L, mixture.ratio), L), ids.mask
        if not spans:  # too short for the drawn spans: one token
            spans = [(L // 2, L // 2 + 1)]
    order = list(range(len(spans)))
    rng.shuffle(order)
    return build_sample(tokens, spans, order, mask, ids.sop, ids.eop)
