"""The reference forward path: whole inputs through the model with no cache (LLM.logits, LLM.prompt_logprobs,
LLM.embed): logits, each prompt token's log-probability, pooled embeddings. Token ids are checked here
against the model's vocabulary and context. No tokenizer, no engine.
"""

from __future__ import annotations

import functools

import torch

from glmkit.config import ModelConfig
from glmkit.errors import GlmkitError
from glmkit.positions import prompt_positions


def as_batch(ids, config: ModelConfig, device: torch.device) -> torch.Tensor:
    """ids [T] or [B, T] (lists or a tensor) -> a checked (B, T) long tensor on `device`."""
    t = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids)
    t = t[None] if t.dim() == 1 else t
    if t.dim() != 2 or t.shape[1] == 0 or t.is_floating_point():
        raise GlmkitError(f"token ids must be a non-empty list of ints or a [batch, time] integer tensor, "
                          f"got shape {tuple(t.shape)} of {t.dtype}.")
    V, T, lo, hi = config.vocab_size, t.shape[1], int(t.min()), int(t.max())
    if lo < 0 or hi >= V:
        raise GlmkitError(f"token id {hi if hi >= V else lo} is outside this model's vocabulary (0..{V - 1}).")
    if T > config.max_seq_len:
        raise GlmkitError(f"the input has {T} tokens but this model's context is {config.max_seq_len}; "
                          "shorten the input.")
    return t.long().to(device)


def mirrored(fn):
    """Tensor parallelism: rank 0 sends the call to the other ranks (engine/follow.py) before running it."""
    @functools.wraps(fn)
    def run(model, *args, **kw):
        world = getattr(model, "tp", None)
        if world is not None and world.rank == 0:
            world.send(("forward", fn.__name__, args, kw))
        return fn(model, *args, **kw)
    return run


def _hidden(model, t: torch.Tensor) -> torch.Tensor:
    positions, prefix_len = prompt_positions(t, model.config)
    return model.hidden_states(t, positions, prefix_len=prefix_len)  # (B, T, C)


@mirrored
@torch.inference_mode()
def logits(model, t: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, V) float32 logits."""
    positions, prefix_len = prompt_positions(t, model.config)
    return model(t, positions, prefix_len=prefix_len).float()


@mirrored
@torch.inference_mode()
def prompt_logprobs(model, t: torch.Tensor, top: int = 0,
                    chunk: int = 256) -> list[tuple[int, float | None, dict[int, float]]]:
    """(1, T) ids -> per token: (id, its log-probability given the tokens before it, the `top` likeliest ids
    there). One forward; the head and log-softmax run `chunk` positions at a time (memory: chunk x V)."""
    h = _hidden(model, t)[:, :-1]  # (1, T - 1, C)
    picked, tops = [], []
    for lo in range(0, h.shape[1], chunk):
        lp = torch.log_softmax(model.head(h[:, lo: lo + chunk])[0].float(), dim=-1)  # (n, V)
        picked += lp.gather(-1, t[0, lo + 1: lo + 1 + chunk, None])[:, 0].tolist()
        best = torch.topk(lp, top) if top else None
        tops += [{} for _ in range(lp.shape[0])] if best is None else [
            dict(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
    ids = t[0].tolist()
    return [(ids[0], None, {})] + [(tok, p, d) for tok, p, d in zip(ids[1:], picked, tops)]


@mirrored
@torch.inference_mode()
def embed(model, batches: list[torch.Tensor], pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
    """(1, T_i) ids per input -> (N, C) float32: final-normed hidden states averaged over each input's tokens
    ('mean') or taken at its last token ('last'), then scaled to unit length (llama.cpp's --pooling mean / last
    with normalization)."""
    if pooling not in ("mean", "last"):
        raise GlmkitError(f"pooling must be 'mean' or 'last', got {pooling!r}.")
    rows = []
    for t in batches:
        h = _hidden(model, t)[0].float()  # (T, C)
        rows.append(h.mean(0) if pooling == "mean" else h[-1])  # (C,)
    out = torch.stack(rows) if rows else torch.zeros(0, model.config.hidden_size)  # (N, C)
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out
