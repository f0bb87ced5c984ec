"""A preallocated key/value cache: one (B, K, max_len, D) buffer pair per layer.

Created by the engine and passed into the model's forward; the model writes the new keys and values
at [start, start + T) and reads [0, start + T). It knows nothing about tokens, sampling or positions.
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
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) at [start, start + T); return all keys and values so far, (B, K, start + T, D)."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise GlmkitError(f"the KV cache holds {self.max_len} positions but {end} are needed; "
                              "create it with a larger max_len or shorten the input.")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
