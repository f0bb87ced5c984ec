"""P-tuning v2 (ChatGLM's official fine-tuning method): P trained key/value positions in front of every
layer's attention, the base model frozen.

The prefix is one embedding table of P rows, each row (layers, 2, kv heads, head dim) as in ChatGLM's
PrefixEncoder (no projection); it is saved under the official tensor name
`transformer.prefix_encoder.embedding.weight` in OUTPUT/final/prefix_encoder.safetensors with
ptuning_config.json, and `glmkit.load(base, ptuning=DIR)` hands it to the engine as its prefix cache (glmkit.adapters reads it).
Prefix keys carry no rotary embedding, as in the official code. No training loop here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from glmkit.adapters import PREFIX_TENSOR as TENSOR, load_prefix, prefix_kv
from glmkit.config import ModelConfig

__all__ = ["PrefixEncoder", "forward_with_prefix", "load_prefix"]


class PrefixEncoder(nn.Module):
    def __init__(self, config: ModelConfig, length: int):
        super().__init__()
        self.config, self.length = config, length
        width = config.num_layers * 2 * config.num_kv_heads * config.head_dim
        self.embedding = nn.Embedding(length, width)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> keys, values, each (L, K, P, D)."""
        return prefix_kv(self.embedding.weight, self.config)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({TENSOR: self.embedding.weight.detach().float().contiguous()}, directory / "prefix_encoder.safetensors")
        (directory / "ptuning_config.json").write_text(json.dumps({"pre_seq_len": self.length}, indent=2))


class _PrefixKeys:
    """Duck-typed cache for a training forward: each layer's keys are [prefix | new] (nothing stored)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (L, B, K, P, D)

    def update(self, layer: int, k, v, start, S):
        return torch.cat([self.k[layer].to(k.dtype), k], dim=2), torch.cat([self.v[layer].to(v.dtype), v], dim=2)


def forward_with_prefix(model: nn.Module, prefix: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor,
                        positions: torch.Tensor, prefix_len: torch.Tensor | None) -> torch.Tensor:
    """Logits (B, T, V) of a batch attending to the P prefix positions first (gradients reach the prefix)."""
    k, v = prefix  # (L, K, P, D)
    B, P = ids.shape[0], k.shape[2]
    cache = _PrefixKeys(k[:, None].expand(-1, B, -1, -1, -1), v[:, None].expand(-1, B, -1, -1, -1))
    plen = None if prefix_len is None else prefix_len + P
    return model(ids, positions, cache, P, plen)
