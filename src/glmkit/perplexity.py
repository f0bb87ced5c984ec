"""Perplexity by llama.cpp's `llama-perplexity` protocol, so figures compare 1:1 with its tables.

Tokenize the whole text; cut it into non-overlapping chunks of `ctx` tokens (a trailing remainder is
dropped); when the vocabulary adds a BOS token, the first token of each chunk is replaced by BOS;
score only the second half of each chunk (each of its tokens predicted from everything before it in
the chunk). The running estimate after each chunk is exp(mean NLL so far).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from glmkit.errors import GlmkitError


def chunk_nll(logits_fn: Callable[[list[int]], torch.Tensor], ids: list[int], ctx: int,
              bos_id: int | None) -> Iterator[tuple[float, int]]:
    """Yield (summed NLL, token count) for each chunk."""
    if ctx < 4:
        raise GlmkitError(f"--ctx must be at least 4, got {ctx}.")
    n_chunks = len(ids) // ctx
    if n_chunks == 0:
        raise GlmkitError(f"the text has {len(ids)} tokens, fewer than one chunk of {ctx}; use a longer text or a "
                          "smaller --ctx.")
    first = ctx // 2
    for i in range(n_chunks):
        chunk = ids[i * ctx: (i + 1) * ctx]
        if bos_id is not None:
            chunk = [bos_id] + chunk[1:]
        logp = torch.log_softmax(logits_fn(chunk)[0].double(), dim=-1)  # (ctx, V)
        targets = torch.tensor(chunk[first + 1:])
        nll = -logp[first: ctx - 1].gather(1, targets[:, None]).sum()
        yield float(nll), ctx - first - 1


def perplexity(logits_fn, ids: list[int], ctx: int, bos_id: int | None,
               progress: Callable[[int, float], None] | None = None) -> float:
    total, count = 0.0, 0
    for i, (nll, n) in enumerate(chunk_nll(logits_fn, ids, ctx, bos_id)):
        total, count = total + nll, count + n
        if progress is not None:
            progress(i, math.exp(total / count))
    return math.exp(total / count)
