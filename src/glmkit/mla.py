"""Multi-head latent attention (GLM-4.7-Flash, GLM-5; DeepSeek's MLA) and GLM-5's sparse-attention indexer (DSA).

A token's keys and values come from one compressed latent c = kv_a_norm(kv_a(x)[:L]) and one rope key shared by
all heads (kv_a(x)[L:], rotated); the cache keeps only those: L + R numbers a token and layer. A prefill expands
them with kv_b into per-head keys [k_nope | k_rope] and values. A one-token step never expands: kv_b's key half
is absorbed into the query (q_nope W_uk lives in the latent space) and its value half applied after attention,
so a step reads L + R numbers per cached token.

The indexer scores every cached token for each query with its own small heads (ReLU of q.k, weighted per head
and summed) and keeps the index_topk best: attention may use only those. Its key (LayerNorm, rotary on the first
R dims) is cached after the rope key; "shared" layers reuse the last full layer's choice (GLM-5.2 IndexShare).

Glossary: B batch, T new tokens, S attended length, C hidden, H heads, L kv_lora_rank, R rope dims, N / V the
nope key and value head dims, Q q_lora_rank, I / E indexer heads and head dim.
Parameter names: attn.{q_a, q_a_norm, q_b | q, kv_a, kv_a_norm, kv_b, out, indexer.{wq_b, wk, k_norm, weights}}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.config import ModelConfig
from glmkit.layers import Norm, Step, attention_mask, rope_half_split, rope_interleaved

EPS = 1e-6  # the latent norms' epsilon in the released code (not the model's rms_norm_eps)


class LatentUp(nn.Module):
    """kv_b: latent (L) -> per head [k_nope (N) | value (V)], weight (H*(N+V), L). Not an nn.Linear: one-token
    steps multiply by it from both sides, so it keeps the activation dtype when the model is quantized."""

    def __init__(self, L: int, H: int, N: int, V: int):
        super().__init__()
        self.H, self.N, self.V = H, N, V
        self.weight = nn.Parameter(torch.empty(H * (N + V), L))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return F.linear(c, self.weight)  # (..., H*(N+V))

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> W_uk (H, N, L) and W_uv (H, V, L)."""
        w = self.weight.view(self.H, self.N + self.V, -1)  # (H, N+V, L)
        return w[:, : self.N], w[:, self.N:]


class Indexer(nn.Module):
    int8_only = True  # quantized to 8 bits at most: a small error flips its discrete top-k choice

    def __init__(self, config: ModelConfig):
        super().__init__()
        m = config.mla
        self.heads, self.dim, self.topk = m.index_heads, m.index_head_dim, m.index_topk
        self.wq_b = nn.Linear(m.q_lora_rank, m.index_heads * m.index_head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, m.index_head_dim, bias=False)
        self.k_norm = Norm(m.index_head_dim, EPS, "layernorm")
        self.weights = nn.Linear(config.hidden_size, m.index_heads, bias=False)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> the indexer keys (B, 1, T, E), rotated on their first R dims."""
        return rope_interleaved(self.k_norm(self.wk(x))[:, None], cos, sin)  # (B, 1, T, E)

    def select(self, x: torch.Tensor, q_latent: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """The keys each query may attend: x (B, T, C), q_latent (B, T, Q), keys (B, S, E), allowed (B or 1, T, S)
        bool (causality; None: one query that sees every key) -> (B, T, S) bool, at most topk True per query."""
        B, T, _ = x.shape
        q = self.wq_b(q_latent).view(B, T, self.heads, self.dim).transpose(1, 2)  # (B, I, T, E)
        q = rope_interleaved(q, cos, sin).transpose(1, 2)  # (B, T, I, E)
        scores = torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1)) * self.dim ** -0.5  # (B,T,I,S)
        weights = self.weights(x).float() * self.heads ** -0.5  # (B, T, I)
        index = torch.matmul(weights.unsqueeze(-2), scores.relu()).squeeze(-2)  # (B, T, S)
        if allowed is None and torch.compiler.is_compiling():  # the compiled one-token step: no size may depend on S
            S = index.shape[-1]
            padded = torch.cat((index, index.new_full((*index.shape[:-1], self.topk), float("-inf"))), -1)  # (1,1,S+k)
            top = padded.topk(self.topk, dim=-1).indices  # (1, 1, k): padding only where S < k
            return torch.zeros_like(padded, dtype=torch.bool).scatter(-1, top, True)[..., :S]
        if allowed is None:  # (eagerly: top-k over exactly S scores, as transformers picks among equal ones)
            allowed = torch.ones_like(index, dtype=torch.bool)
        index = index.masked_fill(~allowed, float("-inf"))
        chosen = torch.zeros_like(index, dtype=torch.bool)  # (B, T, S)
        for b in range(B):  # each row over its own keys: the choice among equal scores never depends on its batch
            n = int(allowed[min(b, allowed.shape[0] - 1), -1].nonzero().max()) + 1
            chosen[b, :, :n].scatter_(-1, index[b, :, :n].topk(min(self.topk, n), dim=-1).indices, True)
        return chosen & allowed


class LatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        c, m = config, config.mla
        self.config, self.m, self.index = config, m, index
        H, C, bias = c.num_heads, c.hidden_size, c.qkv_bias
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            self.q = nn.Linear(C, H * qk, bias=False)
        else:
            self.q_a = nn.Linear(C, m.q_lora_rank, bias=bias)
            self.q_a_norm = Norm(m.q_lora_rank, EPS)
            self.q_b = nn.Linear(m.q_lora_rank, H * qk, bias=False)
        self.kv_a = nn.Linear(C, m.kv_lora_rank + m.qk_rope_head_dim, bias=bias)
        self.kv_a_norm = Norm(m.kv_lora_rank, EPS)
        self.kv_b = LatentUp(m.kv_lora_rank, H, m.qk_nope_head_dim, m.v_head_dim)
        self.out = nn.Linear(H * m.v_head_dim, C, bias=bias)
        self.indexer = Indexer(config) if m.has_indexer(index) else None
        self.sparse = m.index_topk > 0
        self.scale = qk ** -0.5
        self.rotate = rope_interleaved if m.rope_interleave else rope_half_split

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        m, H = self.m, self.config.num_heads
        B, T, _ = x.shape
        N, R, L = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
        q_latent = None if m.q_lora_rank is None else self.q_a_norm(self.q_a(x))  # (B, T, Q)
        q = (self.q(x) if q_latent is None else self.q_b(q_latent)).view(B, T, H, N + R).transpose(1, 2)  # (B,H,T,N+R)
        q_nope, q_rope = q.split([N, R], dim=-1)
        latent, k_rope = self.kv_a(x).split([L, R], dim=-1)  # (B, T, L), (B, T, R)
        cos, sin = step.cos[:, None], step.sin[:, None]  # (B, 1, T, R/2)
        q_rope = self.rotate(q_rope, cos, sin)  # (B, H, T, R)
        rest = self.rotate(k_rope[:, None], cos, sin)  # (B, 1, T, R)
        if self.indexer is not None:
            rest = torch.cat((rest, self.indexer.keys(x, cos, sin)), dim=-1)  # (B, 1, T, R+E)
        latent = self.kv_a_norm(latent)[:, None]  # (B, 1, T, L)
        if step.cache is not None:
            latent, rest = step.cache.update(self.index, latent, rest, step.start, step.S)  # (B,1,S,L), (B,1,S,R..)
        mask = self._mask(x, q_latent, rest[:, 0, :, R:], cos, sin, step) if self.sparse else step.mask
        if T == 1:
            y = self._absorbed(q_nope, q_rope, latent[:, 0], rest[:, 0, :, :R], mask)  # (B, H, 1, V)
        else:
            y = self._expanded(q_nope, q_rope, latent[:, 0], rest[:, 0, :, :R], mask, step)  # (B, H, T, V)
        return self.out(y.transpose(1, 2).reshape(B, T, H * m.v_head_dim))  # (B, T, C)

    def _mask(self, x, q_latent, keys, cos, sin, step: Step) -> torch.Tensor:
        """The sparse layers' mask (B, 1, T, S): causal, and only the keys the indexer (this layer's, or the last
        full layer's) chose."""
        if self.indexer is None:
            return step.shared["indexed"]
        T, S = x.shape[1], keys.shape[1]
        if step.mask is not None:
            allowed = step.mask[:, 0]
        else:
            allowed = None if T == 1 and x.shape[0] == 1 else attention_mask(T, S, S - T, None, x.device)[:, 0]
        chosen = self.indexer.select(x, q_latent, keys, cos, sin, allowed)[:, None]  # (B, 1, T, S)
        step.shared["indexed"] = chosen
        return chosen

    def _expanded(self, q_nope, q_rope, latent, k_rope, mask, step: Step) -> torch.Tensor:
        """Prefill: per-head keys and values from the latents. latent (B, S, L), k_rope (B, S, R)."""
        m, H = self.m, self.config.num_heads
        B, S, _ = latent.shape
        kv = self.kv_b(latent).view(B, S, H, m.qk_nope_head_dim + m.v_head_dim).transpose(1, 2)  # (B, H, S, N+V)
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rope[:, None].expand(B, H, S, -1)), dim=-1)  # (B, H, S, N+R)
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, H, T, N+R)
        causal = mask is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """One new token per row, attending in the latent space: q_nope (B, H, 1, N), q_rope (B, H, 1, R), latent
        (B, S, L), k_rope (B, S, R), mask None or (B or 1, 1, 1, S). The heads are the rows of one GEMM against
        the cache (no per-head copy of it); scores and context in the cache's dtype, softmax in float32."""
        w_uk, w_uv = self.kv_b.absorbed()  # (H, N, L), (H, V, L)
        q_lat = torch.matmul(q_nope, w_uk.to(q_nope.dtype))[:, :, 0]  # (B, H, L)
        scores = (torch.bmm(q_lat.to(latent.dtype), latent.transpose(1, 2)).float()
                  + torch.bmm(q_rope[:, :, 0].to(k_rope.dtype), k_rope.transpose(1, 2)).float()) * self.scale  # (B,H,S)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        context = torch.bmm(scores.softmax(dim=-1).to(latent.dtype), latent)  # (B, H, L)
        return torch.matmul(context[:, :, None].to(q_nope.dtype), w_uv.transpose(1, 2).to(q_nope.dtype))  # (B,H,1,V)
