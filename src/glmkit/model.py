"""The one config-driven Transformer for every GLM generation and Llama.

tokens (or embeddings) + positions (+ KV cache) -> logits. It samples nothing, tokenizes nothing, reads no
files and chooses no device: the engine builds positions and owns the cache; loaders fill the weights.
A layer's kind may depend on its index (Block(config, index)); what one forward shares across layers
(rotary tables, mask, cache, offsets) travels as one `Step`. Sub-configs it does not run yet are refused.

Glossary: B batch, T new tokens, S attended length (cached + new), C hidden size, H query heads,
K kv heads, D head dim, R rotated dims per rotary block, F ffn size, V vocab.
Parameter names: embed, layers.N.{attn_norm, attn.qkv, attn.out, attn_post_norm, mlp_norm,
mlp.in_proj, mlp.out_proj, mlp_post_norm}, norm, lm_head. qkv rows are [Q | K | V]; for SwiGLU the
in_proj rows are [gate | up]. MoE layers: mlp.{router, experts.{gate_up_proj, down_proj}, shared} (moe.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from glmkit.config import ModelConfig
from glmkit.errors import UnsupportedArchitectureError
from glmkit.kv_cache import KVCache
from glmkit.moe import MoE


class Step(NamedTuple):
    """What every layer of one forward shares: rotary tables, the mask (None: causal, or every cached key for
    one new token), the cache (None: no cache), where the new keys go (int or (B,)), the attended length S."""
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    cache: KVCache | None
    start: int | torch.Tensor
    S: int


# ---------------------------------------------------------------------------------------------- rope
def rope_cos_sin(positions: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) for 1d or (B, 2, T) for 2d -> cos, sin of shape (B, T, R/2) or (B, 2, T, R/2), float32."""
    R = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, R, 2, device=positions.device, dtype=torch.float32) / R))
    if config.rope_freq_dtype == "float16":  # ChatGLM-6B computes its frequencies in float16
        inv_freq = inv_freq.half().float()
    angles = (positions.float() / config.rope_linear_factor)[..., None] * inv_freq  # (..., T, R/2)
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
    if config.positions == "1d":
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


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One new token per row attending every cached key: q (B, K, G, D) holds the G query heads of each kv
    head, k and v (B, K, S, D) -> (B, K, G, D). Compiled code gets the maths spelled out, which inductor fuses
    into a few loops (at decode sizes the CPU flash-attention kernel's setup costs ~30 us a layer, far more
    than the work); eager code calls SDPA."""
    if not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v)
    scores = (q.float()[:, :, :, None] * k.float()[:, :, None]).sum(-1) * q.shape[-1] ** -0.5  # (B, K, G, S)
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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.config, self.index = config, index
        c = config
        self.qkv = nn.Linear(c.hidden_size, c.qkv_size, bias=c.qkv_bias)
        self.out = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.out_bias)
        self.q_norm = Norm(c.head_dim, c.norm_eps) if c.qk_norm else None  # per head, before rotary
        self.k_norm = Norm(c.head_dim, c.norm_eps) if c.qk_norm else None

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        H, K, D = c.num_heads, c.num_kv_heads, c.head_dim
        q, k, v = self.qkv(x).split([H * D, K * D, K * D], dim=-1)
        q, k = q.view(B, T, H, D), k.view(B, T, K, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # (B, H, T, D)
        k = k.transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, step.cos, step.sin, c), apply_rope(k, step.cos, step.sin, c)
        if step.cache is not None:
            k, v = step.cache.update(self.index, k, v, step.start, step.S)  # (B, K, S, D)
        if T == 1 and step.mask is None:  # decode: the H/K query heads of a kv head become its query rows
            y = decode_attention(q.view(B, K, H // K, D), k, v).view(B, H, 1, D)  # (B, H, 1, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, is_causal=step.mask is None and T > 1,
                                               enable_gqa=H != K)  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU (in_proj rows [gate | up]) or GELU-tanh. Under float16 the activation product and the
    down-projection run in float32 (DESIGN principle 6): GLM's gate * up products overflow float16's 65504."""

    def __init__(self, config: ModelConfig, size: int | None = None):
        """size: the intermediate width, when not config.intermediate_size (a MoE layer's shared experts)."""
        super().__init__()
        self.gated = config.mlp == "swiglu"
        F_ = size or config.intermediate_size
        self.in_proj = nn.Linear(config.hidden_size, 2 * F_ if self.gated else F_, bias=config.mlp_bias)
        self.out_proj = nn.Linear(F_, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_proj(x)  # (B, T, 2F) or (B, T, F)
        wide = x.dtype == torch.float16 and isinstance(self.out_proj, nn.Linear)
        if wide:
            h = h.float()
        if self.gated:
            gate, up = h.chunk(2, dim=-1)  # (B, T, F) each
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        if wide:  # float32 GEMM, then back to float16 (a sum that overflows there is a real overflow)
            w, b = self.out_proj.weight, self.out_proj.bias
            return F.linear(h, w.float(), None if b is None else b.float()).to(x.dtype)  # (B, T, C)
        return self.out_proj(h)  # (B, T, C)


class Block(nn.Module):
    """Pre-norm block `index`; `deepnorm` keeps alpha * normalized input as the residual (ChatGLM-6B);
    `sandwich` adds a norm after each sublayer (GLM-4-0414); a MoE MLP past the first dense layers (GLM-4.5).
    Blocks past num_layers are GLM-4.5's next-token-prediction (MTP) layers: they also hold enorm / hnorm /
    eh_proj / head_norm (next id's embedding and the last hidden state, joined), and are kept, not run."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.deepnorm = config.residual == "deepnorm"
        self.alpha = config.residual_alpha
        self.attn_norm, self.attn = model_norm(config), Attention(config, index)
        moe = config.moe
        if moe is not None and index >= moe.first_dense_layers:
            shared = MLP(config, moe.expert_size * moe.shared_experts) if moe.shared_experts else None
            self.mlp_norm, self.mlp = model_norm(config), MoE(config.hidden_size, moe, shared)
        else:
            self.mlp_norm, self.mlp = model_norm(config), MLP(config)
        if index >= config.num_layers:  # an MTP layer
            self.enorm, self.hnorm, self.head_norm = model_norm(config), model_norm(config), model_norm(config)
            self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        sandwich = config.extra_norms == "sandwich"
        self.attn_post_norm = model_norm(config) if sandwich else None
        self.mlp_post_norm = model_norm(config) if sandwich else None

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        h = self.attn_norm(x)
        a = self.attn(h, step)
        if self.attn_post_norm is not None:
            a = self.attn_post_norm(a)
        x = h * self.alpha + a if self.deepnorm else x + a
        h = self.mlp_norm(x)
        m = self.mlp(h)
        if self.mlp_post_norm is not None:
            m = self.mlp_post_norm(m)
        return h * self.alpha + m if self.deepnorm else x + m


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, init: bool = True):
        """init=False leaves the embedding uninitialised (see skeleton)."""
        super().__init__()
        for name in ("mla", "vision"):
            if getattr(config, name) is not None:
                raise UnsupportedArchitectureError(f"unsupported architecture feature {name!r}: glmkit's model does "
                                                   "not run it yet.")
        self.config = config
        table = None if init else torch.empty(config.vocab_size, config.hidden_size)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        # MTP blocks after the num_layers that run (hidden_states stops before them)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers + config.mtp_layers))
        self.norm = model_norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # training: recompute each block's activations in backward

    @classmethod
    def skeleton(cls, config: ModelConfig) -> "Transformer":
        """The model on the meta device, for loaders that assign every parameter. Its embedding skips normal_(),
        which on meta tensors imports torch's Python decompositions: ~70 MB resident, for nothing."""
        with torch.device("meta"):
            return cls(config, init=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (quantized layers keep their own storage types)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def step(self, T: int, positions: torch.Tensor, cache: KVCache | None, start: int | torch.Tensor,
             prefix_len: torch.Tensor | None) -> Step:
        """The Step of T new tokens per row at `start` (see hidden_states)."""
        cos, sin = rope_cos_sin(positions, self.config)
        S = T if cache is None else (int(start.max()) if isinstance(start, torch.Tensor) else start) + T
        if cache is None:
            start = 0
        one_step = T == 1 and not isinstance(start, torch.Tensor) and prefix_len is None  # sees every cached key
        mask = None
        if (prefix_len is not None or cache is not None) and not one_step:
            mask = attention_mask(T, S, start, prefix_len, positions.device)
        return Step(cos, sin, mask, cache, start, S)

    def hidden_states(self, tokens: torch.Tensor | None, positions: torch.Tensor, cache: KVCache | None = None,
                      start: int | torch.Tensor = 0, prefix_len: torch.Tensor | None = None,
                      embeds: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) (or embeds (B, T, C) instead, e.g. with image features at image-token positions),
        positions (B, T) or (B, 2, T) -> final-normed hidden states (B, T, C).

        With a cache, row b's new keys land at [start_b, start_b + T) and attention spans [0, start_b + T);
        start is an int, or a (B,) tensor for one-token steps of rows at different offsets.
        prefix_len (B,) makes keys before it visible to every query (ChatGLM-6B's prefix mask)."""
        x = self.embed(tokens) if embeds is None else embeds  # (B, T, C)
        step = self.step(x.shape[1], positions, cache, start, prefix_len)
        for layer in self.layers[: self.config.num_layers]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, step, use_reentrant=False)
            else:
                x = layer(x, step)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor | None, positions: torch.Tensor, cache: KVCache | None = None,
                start: int | torch.Tensor = 0, prefix_len: torch.Tensor | None = None,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """-> logits (B, T, V) in the model's dtype."""
        return self.head(self.hidden_states(tokens, positions, cache, start, prefix_len, embeds))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, C) -> logits (B, T, V)."""
        if self.lm_head is None:  # tied embeddings
            return F.linear(h, self.embed.weight)  # (B, T, V)
        return self.lm_head(h)  # (B, T, V)
