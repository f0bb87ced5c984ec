"""The building blocks every attention kind shares: the per-forward `Step`, rotary tables and both rotary layouts,
attention masks, the one-token decode attention, and the norm (RMSNorm or LayerNorm, computed in float32).

Glossary: B batch, T new tokens, S attended length, H query heads, K kv heads, D head dim, R rotated dims per
rotary block.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.config import ModelConfig
from glmkit.kv_cache import KVCache


class Step(NamedTuple):
    """What every layer of one forward shares: rotary tables, the mask (None: causal, or every cached key for
    one new token), the cache (None: no cache), where the new keys go (int or (B,)), the attended length S,
    and what one layer leaves for later ones (GLM-5's indexer choice, under "indexed")."""
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    cache: KVCache | None
    start: int | torch.Tensor
    S: int
    shared: dict | None = None


# ---------------------------------------------------------------------------------------------- rope
def rope_cos_sin(positions: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) for 1d, (B, 2, T) for 2d or (B, 3, T) for mrope -> cos, sin of shape (B, T, R/2)
    ((B, 2, T, R/2) for 2d), float32."""
    R = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, R, 2, device=positions.device, dtype=torch.float32) / R))
    if config.rope_freq_dtype == "float16":  # ChatGLM-6B computes its frequencies in float16
        inv_freq = inv_freq.half().float()
    angles = (positions.float() / config.rope_linear_factor)[..., None] * inv_freq  # (..., T, R/2)
    if config.positions == "mrope" and positions.dim() == 3:  # (B, 3, T, R/2): slot i reads stream t, h or w in turn
        stream = torch.cat([torch.full((n,), i % 3, device=positions.device)
                            for i, n in enumerate(config.mrope_section)])  # (R/2,)
        angles = angles.gather(1, stream.expand(angles.shape[0], 1, angles.shape[2], -1)).squeeze(1)  # (B, T, R/2)
    return angles.cos(), angles.sin()


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GLM layout: pairs (2i, 2i+1) of the first R dims rotate by angle i. x (B, n, T, D), cos (B, 1, T, R/2)."""
    R = 2 * cos.shape[-1]
    xr, x_pass = x[..., :R].float(), x[..., R:]
    x1, x2 = xr[..., 0::2], xr[..., 1::2]  # (B, n, T, R/2) each
    rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)  # (B, n, T, R)
    return torch.cat((rotated.to(x.dtype), x_pass), dim=-1)


def rope_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama / NeoX layout: dim i pairs with dim i + R/2 of the first R dims. x (B, n, T, D), cos (B, 1, T, R/2)."""
    R = 2 * cos.shape[-1]
    xr, x_pass = x[..., :R].float(), x[..., R:]
    x1, x2 = xr.chunk(2, dim=-1)  # (B, n, T, R/2) each
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, n, T, R)
    return torch.cat((rotated.to(x.dtype), x_pass), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    rotate = rope_interleaved if config.rope_layout == "interleaved" else rope_half_split
    if config.positions != "2d":
        return rotate(x, cos[:, None], sin[:, None])
    # 2d (ChatGLM-6B): first half of each head rotates with the position, second with the block position
    first, second = x.chunk(2, dim=-1)  # (B, n, T, D/2) each
    return torch.cat((rotate(first, cos[:, None, 0], sin[:, None, 0]),
                      rotate(second, cos[:, None, 1], sin[:, None, 1])), dim=-1)


def attention_mask(T: int, S: int, start: int | torch.Tensor, prefix_len: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor:
    """Boolean mask, True = may attend: key j is visible to query i iff j <= start + i or j < prefix_len.

    start is an int or one offset per row (B,); prefix_len is None or (B,). Returns (1 or B, 1, T, S)."""
    start = torch.as_tensor(start, device=device).reshape(-1, 1)  # (1 or B, 1)
    q = start + torch.arange(T, device=device)  # (1 or B, T)
    k = torch.arange(S, device=device)  # (S,)
    allowed = k <= q[..., None]  # (1 or B, T, S)
    if prefix_len is not None:
        allowed = allowed | (k < prefix_len.to(device)[:, None, None])  # (B, T, S)
    return allowed[:, None]  # (1 or B, 1, T, S)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per row attending the cached keys (all, or where mask (B, 1, 1, S) is True): q (B, K, G, D)
    holds the G query heads of each kv head, k and v (B, K, S, D) -> (B, K, G, D). Compiled code gets the maths
    spelled out, which inductor fuses into a few loops (at decode sizes the CPU flash-attention kernel's setup
    costs ~30 us a layer, far more than the work); eager code calls SDPA."""
    if not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q.float()[:, :, :, None] * k.float()[:, :, None]).sum(-1) * q.shape[-1] ** -0.5  # (B, K, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)  # (B, K, G, S)
    return (weights[..., None] * v.float()[:, :, None]).sum(-2).to(q.dtype)  # (B, K, G, D)


# --------------------------------------------------------------------------------------------- layers
class Norm(nn.Module):
    """RMSNorm or LayerNorm (with bias) over the last `dim` features, in float32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float, kind: str = "rmsnorm"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.bias is None:
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * y.to(x.dtype)
        return F.layer_norm(xf, xf.shape[-1:], self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def model_norm(config: ModelConfig) -> Norm:
    return Norm(config.hidden_size, config.norm_eps, config.norm)
