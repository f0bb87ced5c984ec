"""Mixture-of-Experts MLP of the GLM-4.5 family (transformers' Glm4MoeMoE): a sigmoid router with a correction
bias used only to choose, group-limited top-k, routed SwiGLU experts stored stacked, plus shared experts.

Router (float32): s = sigmoid(x W^T); the choice ranks s + bias, only within the `topk_groups` groups whose two
best biased scores sum highest; the weights are the unbiased s of the chosen experts, renormalised when
norm_topk_prob, times routed_scaling_factor. Experts: gate_up_proj (E, 2I, C) rows [gate | up], down_proj
(E, C, I). A few tokens (decode) gather their chosen experts' weights and run batched matmuls, with static
shapes and no Python loop over experts (so the compiled step covers it); many tokens (prefill) go expert
by expert over the tokens each one got.

Glossary: N tokens, C hidden, E experts, k experts per token, I expert width, G groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.config import MoEConfig


class Router(nn.Module):
    def __init__(self, hidden: int, moe: MoEConfig):
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.zeros(moe.num_experts, hidden))  # (E, C)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(moe.num_experts))  # (E,): for the choice only

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C) -> chosen experts (N, k) and their weights (N, k) float32."""
        m, N = self.moe, x.shape[0]
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias.float()  # (N, E)
        if m.groups > 1:
            grouped = choice.view(N, m.groups, -1)  # (N, G, E/G)
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(m.topk_groups, dim=-1).indices  # (N, topk_groups)
            keep = torch.zeros(N, m.groups, dtype=torch.bool, device=x.device).scatter(1, best, True)  # (N, G)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, -1)  # (N, E)
        chosen = choice.topk(m.experts_per_token, dim=-1).indices  # (N, k)
        weights = scores.gather(1, chosen)  # (N, k): the unbiased scores
        if m.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return chosen, weights * m.routed_scaling_factor


class Experts(nn.Module):
    """E SwiGLU experts, stacked. `gather_below`: token counts up to this many use the gather path."""

    def __init__(self, num_experts: int, hidden: int, width: int, gather_below: int = 4):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * width, hidden))  # (E, 2I, C)
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden, width))  # (E, C, I)
        self.num_experts, self.gather_below = num_experts, gather_below

    def weight(self, name: str, index, dtype: torch.dtype) -> torch.Tensor:
        """The experts at `index` of gate_up_proj / down_proj, in `dtype`: indexed, or dequantized when the weights
        are stacked int8 / int4 (quant.StackedInt8 / StackedInt4, which quantize_model puts in their place)."""
        w = getattr(self, name)
        return w.dequantize(index, dtype) if isinstance(w, nn.Module) else w[index].to(dtype)

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, C), chosen (N, k), weights (N, k) -> (N, C)."""
        if x.shape[0] <= self.gather_below:
            return self._gathered(x, chosen, weights)
        return self._grouped(x, chosen, weights)

    def _gathered(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        wide = torch.float32 if x.dtype == torch.float16 else x.dtype  # float16 products overflow (GLM's MLPs)
        h = torch.einsum("nkfc,nc->nkf", self.weight("gate_up_proj", chosen, x.dtype), x)  # (N, k, 2I)
        gate, up = h.float().chunk(2, dim=-1)  # (N, k, I) each
        a = (F.silu(gate) * up).to(wide)  # (N, k, I)
        y = torch.einsum("nkci,nki->nkc", self.weight("down_proj", chosen, wide), a)  # (N, k, C)
        return (y.float() * weights[..., None]).sum(1).to(x.dtype)  # (N, C)

    def _grouped(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        N, k = chosen.shape
        wide = torch.float32 if x.dtype == torch.float16 else x.dtype
        out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)  # (N, C)
        flat = chosen.flatten()  # (N k,)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        lo = 0
        for e, n in enumerate(counts):
            if n:
                slots = order[lo: lo + n]  # positions in (N k)
                rows = slots // k  # (n,) token of each
                gate, up = F.linear(x[rows], self.weight("gate_up_proj", e, x.dtype)).float().chunk(2, dim=-1)
                y = F.linear((F.silu(gate) * up).to(wide), self.weight("down_proj", e, wide))  # (n, C)
                out.index_add_(0, rows, y.float() * weights.flatten()[slots, None])
                lo += n
        return out.to(x.dtype)


class MoE(nn.Module):
    """Routed experts plus the shared expert MLP (`shared`, built by the model, or None)."""

    def __init__(self, hidden: int, moe: MoEConfig, shared: nn.Module | None):
        super().__init__()
        self.router = Router(hidden, moe)
        self.experts = Experts(moe.num_experts, hidden, moe.expert_size)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        chosen, weights = self.router(flat)  # (N, k) each
        y = self.experts(flat, chosen, weights).view(B, T, C)  # (B, T, C)
        return y if self.shared is None else y + self.shared(x)
