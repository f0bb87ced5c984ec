"""A preallocated key/value cache: one (B, K, max_len, D) buffer pair per layer (for latent attention: the
latent and the rope key, see layer_widths).

Created by the engine and passed into the model's forward; the model writes the new keys and values
at [start, start + T) of each row and reads [0, S). `start` is one int for the whole batch or one per
row (decode steps of sequences with different lengths). Each layer has its own buffers, so a compiled
step updates them in place (one shared tensor would be copied whole on every step). Row views and
growth (in length and in rows) serve continuous batching. It knows nothing about tokens, sampling or positions.
"""

from __future__ import annotations

import torch

from glmkit.config import ModelConfig
from glmkit.errors import GlmkitError


def layer_widths(config: ModelConfig) -> list[tuple[int, int, int]]:
    """(heads, key width, value width) of each layer's cache. Latent attention (MLA) keeps one compressed latent
    and the shared rope key per token (plus, where a layer runs GLM-5's indexer, its key after the rope key)."""
    m = config.mla
    if m is None:
        return [(config.num_kv_heads, config.head_dim, config.head_dim)] * config.num_layers
    return [(1, m.kv_lora_rank, m.qk_rope_head_dim + (m.index_head_dim if m.has_indexer(i) else 0))
            for i in range(config.num_layers)]


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        widths = layer_widths(config)  # (B, K, S, D) buffers per layer
        self.k = [torch.zeros(batch_size, K, max_len, Dk, dtype=dtype, device=device) for K, Dk, _ in widths]
        self.v = [torch.zeros(batch_size, K, max_len, Dv, dtype=dtype, device=device) for K, _, Dv in widths]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor,
               S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) at [start, start + T) per row; return keys and values [0, S), (B, K, S, D)."""
        if S > self.max_len:
            raise GlmkitError(f"the KV cache holds {self.max_len} positions but {S} are needed; "
                              "create it with a larger max_len or shorten the input.")
        ck, cv = self.k[layer], self.v[layer]
        if isinstance(start, torch.Tensor):  # one new position per row, each at its own offset
            rows = torch.arange(k.shape[0], device=k.device)
            ck[rows, :, start] = k[:, :, 0]
            cv[rows, :, start] = v[:, :, 0]
        else:
            ck[:, :, start: start + k.shape[2]] = k
            cv[:, :, start: start + k.shape[2]] = v
        return ck[:, :, :S], cv[:, :, :S]

    def write_prefix(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put P-tuning prefix keys and values, each (L, K, P, D), at positions [0, P) of every row."""
        P = keys.shape[2]
        for layer in range(len(self.k)):
            self.k[layer][:, :, :P] = keys[layer].to(self.k[layer])
            self.v[layer][:, :, :P] = values[layer].to(self.v[layer])

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Row dst's first `length` positions become row src's (n samples of one prompt share its prefill)."""
        for buffers in (self.k, self.v):
            for t in buffers:
                t[dst, :, :length] = t[src, :, :length]

    def rows(self, lo: int, hi: int) -> "KVCache":
        """A view of rows [lo, hi) that shares storage with this cache."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [t[lo:hi] for t in self.k], [t[lo:hi] for t in self.v]
        return view

    def grow(self, max_len: int, batch_size: int | None = None) -> range:
        """Make room for max_len positions and batch_size rows, keeping what is stored; returns the new rows."""
        old_rows, rows = self.k[0].shape[0], max(batch_size or 0, self.k[0].shape[0])
        if max_len <= self.max_len and rows == old_rows:
            return range(0)
        max_len = max(max_len, self.max_len)
        for buffers in (self.k, self.v):
            for i, old in enumerate(buffers):
                new = old.new_zeros(rows, old.shape[1], max_len, old.shape[3])
                new[: old_rows, :, : old.shape[2]] = old
                buffers[i] = new
        return range(old_rows, rows)
