"""The one config-driven Transformer for every GLM generation and Llama (its building blocks: layers.py; latent
attention: mla.py; Mixture-of-Experts: moe.py).

tokens (or embeddings) + positions (+ KV cache) -> logits. It samples nothing, tokenizes nothing, reads no
files and chooses no device: the engine builds positions and owns the cache; loaders fill the weights.
A layer's kind may depend on its index (Block(config, index)); what one forward shares across layers
(rotary tables, mask, cache, offsets) travels as one `Step`. A vision tower (vision.py), when the config has one,
turns pixels into the rows `embeddings()` puts at the image tokens.

Glossary: B batch, T new tokens, S attended length (cached + new), C hidden size, H query heads,
K kv heads, D head dim, R rotated dims per rotary block, F ffn size, V vocab.
Parameter names: embed, layers.N.{attn_norm, attn.qkv, attn.out, attn_post_norm, mlp_norm,
mlp.in_proj, mlp.out_proj, mlp_post_norm}, norm, lm_head. qkv rows are [Q | K | V]; for SwiGLU the
in_proj rows are [gate | up]. MoE layers: mlp.{router, experts.{gate_up_proj, down_proj}, shared} (moe.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from glmkit.config import ModelConfig
from glmkit.kv_cache import KVCache
from glmkit.layers import Norm, Step, apply_rope, attention_mask, decode_attention, model_norm, rope_cos_sin
from glmkit.mla import LatentAttention
from glmkit.moe import MoE
from glmkit.vision import VisionTower


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
        if T == 1:  # decode: the H/K query heads of a kv head become its query rows
            y = decode_attention(q.view(B, K, H // K, D), k, v, step.mask).view(B, H, 1, D)  # (B, H, 1, D)
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
        attention = LatentAttention if config.mla is not None else Attention
        self.attn_norm, self.attn = model_norm(config), attention(config, index)
        moe = config.moe
        if moe is not None and moe.is_sparse(index, config.num_layers):
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
        self.config = config
        table = None if init else torch.empty(config.vocab_size, config.hidden_size)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        # MTP blocks after the num_layers that run (hidden_states stops before them)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers + config.mtp_layers))
        self.norm = model_norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # training: recompute each block's activations in backward
        self.visual = VisionTower(config.vision) if config.vision is not None else None  # image features
        self.tp = None  # a parallel.World when this is one rank's share of a tensor-parallel model

    def embeddings(self, tokens: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> (B, T, C), the image tokens' rows replaced by image_features (n, C) in order: what
        hidden_states takes as `embeds` for a prompt holding images."""
        x = self.embed(tokens)  # (B, T, C)
        if image_features is None:
            return x
        at = tokens == self.config.vision.image_token_id  # (B, T)
        if int(at.sum()) != image_features.shape[0]:
            raise ValueError(f"{int(at.sum())} image tokens but {image_features.shape[0]} image feature rows")
        return x.masked_scatter(at[..., None], image_features.to(x.dtype))  # (B, T, C)

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
             prefix_len: torch.Tensor | None, attended: int | None = None) -> Step:
        """The Step of T new tokens per row at `start` (see hidden_states)."""
        cos, sin = rope_cos_sin(positions, self.config)
        if attended is not None:
            S = attended
        else:
            S = T if cache is None else (int(start.max()) if isinstance(start, torch.Tensor) else start) + T
        if cache is None:
            start = 0
        one_step = T == 1 and not isinstance(start, torch.Tensor) and prefix_len is None  # sees every cached key
        mask = None
        if (prefix_len is not None or cache is not None) and not one_step:
            mask = attention_mask(T, S, start, prefix_len, positions.device)
        return Step(cos, sin, mask, cache, start, S, {})

    def hidden_states(self, tokens: torch.Tensor | None, positions: torch.Tensor, cache: KVCache | None = None,
                      start: int | torch.Tensor = 0, prefix_len: torch.Tensor | None = None,
                      embeds: torch.Tensor | None = None, attended: int | None = None) -> torch.Tensor:
        """tokens (B, T) (or embeds (B, T, C) instead, e.g. with image features at image-token positions),
        positions (B, T) or (B, 2, T) -> final-normed hidden states (B, T, C).

        With a cache, row b's new keys land at [start_b, start_b + T) and attention spans [0, start_b + T);
        start is an int, or a (B,) tensor for one-token steps of rows at different offsets (then `attended`
        may give max(start) + 1 as a size, for a compiled step that cannot read it from the tensor).
        prefix_len (B,) makes keys before it visible to every query (ChatGLM-6B's prefix mask)."""
        x = self.embed(tokens) if embeds is None else embeds  # (B, T, C)
        step = self.step(x.shape[1], positions, cache, start, prefix_len, attended)
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
        logits = F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)  # (B, T, V or V/W)
        if self.tp is not None:  # each rank's vocabulary rows: gathered, the padding past V dropped
            logits = self.tp.gather_last(logits)[..., : self.config.vocab_size]  # (B, T, V)
        return logits
