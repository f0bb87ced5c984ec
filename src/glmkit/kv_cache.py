"""A preallocated key/value cache: one (B, K, max_len, D) buffer pair per layer.

Created by the engine and passed into the model's forward; the model writes the new keys and values
at [start, start + T) of each row and reads [0, S). `start` is one int for the whole batch or one per
row (decode steps of sequences with different lengths). Row views and growth serve
continuous batching. It knows nothing about tokens, sampling or positions.
"""

from __future__ import annotations

import torch

from glmkit.config import ModelConfig
from glmkit.errors import GlmkitError


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)  # (L, B, K, S, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor,
               S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) at [start, start + T) per row; return keys and values [0, S), (B, K, S, D)."""
        if S > self.max_len:
            raise GlmkitError(f"the KV cache holds {self.max_len} positions but {S} are needed; "
                              "create it with a larger max_len or shorten the input.")
        if isinstance(start, int):
            self.k[layer, :, :, start: start + k.shape[2]] = k
            self.v[layer, :, :, start: start + k.shape[2]] = v
        else:  # one new position per row, each at its own offset
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[layer, rows, :, start] = k[:, :, 0]
            self.v[layer, rows, :, start] = v[:, :, 0]
        return self.k[layer, :, :, :S], self.v[layer, :, :, :S]

    def rows(self, lo: int, hi: int) -> "KVCache":
        """A view of rows [lo, hi) that shares storage with this cache."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, lo:hi], self.v[:, lo:hi]
        return view

    def grow(self, max_len: int) -> None:
        """Make room for max_len positions, keeping what is stored."""
        if max_len <= self.max_len:
            return
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], max_len, old.shape[4])
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)
