"""Mixture-of-Experts MLP of the GLM-4.5 family (transformers' Glm4MoeMoE): a sigmoid router with a correction
bias used only to choose, group-limited top-k, routed SwiGLU experts stored stacked, plus shared experts.

Router (float32): s = sigmoid(x W^T) (softmax where a GGUF file says so); the choice ranks s + bias, only within the `topk_groups` groups whose two
best biased scores sum highest; the weights are the unbiased s of the chosen experts, renormalised when
norm_topk_prob, times routed_scaling_factor. Experts: gate_up_proj (E, 2I, C) rows [gate | up], down_proj
(E, C, I), float or stacked int8 / int4. A few tokens (decode) run each through its k chosen experts, one
kernel call each with nothing copied (a gather of the chosen weights measured ~50x slower for int4 here), or
all k in one call of glmkit's fused int4 kernel (quant.cpu_kernels) where it runs;
many tokens (prefill) go expert by expert over the tokens each one got.

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
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.sigmoid() if m.scoring == "sigmoid" else logits.softmax(dim=-1)  # (N, E)
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
    """E SwiGLU experts, stacked. Up to `pairs_below` tokens (decode) go token by token through their k chosen
    experts; more (prefill) go expert by expert over the tokens each got."""

    def __init__(self, num_experts: int, hidden: int, width: int, pairs_below: int = 4):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * width, hidden))  # (E, 2I, C)
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden, width))  # (E, C, I)
        self.num_experts, self.pairs_below = num_experts, pairs_below
        self.held = (0, num_experts)  # the experts [lo, lo + n) this module holds (expert parallelism: a share)

    def linear(self, name: str, e, x: torch.Tensor) -> torch.Tensor:
        """x (n, in) through expert e's gate_up_proj / down_proj -> (n, out): a float matmul, or the kernel of
        the stacked int8 / int4 module (quant.StackedInt8 / StackedInt4) that quantize_model put in its place."""
        w = getattr(self, name)
        return w.linear(e, x) if isinstance(w, nn.Module) else F.linear(x, w[e].to(x.dtype))

    def expert(self, e, x: torch.Tensor) -> torch.Tensor:
        """x (n, C) through SwiGLU expert e -> (n, C) float32 (float16 products would overflow: GLM's MLPs)."""
        wide = torch.float32 if x.dtype == torch.float16 else x.dtype
        gate, up = self.linear("gate_up_proj", e, x).float().chunk(2, dim=-1)  # (n, I) each
        return self.linear("down_proj", e, (F.silu(gate) * up).to(wide)).float()  # (n, C)

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, C), chosen (N, k), weights (N, k) -> (N, C)."""
        if x.shape[0] < self.pairs_below:
            return self._pairs(x, chosen, weights)
        return self._grouped(x, chosen, weights)

    def _pairs(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each token through its k experts: one kernel call per expert and projection, no weights copied, the
        activation and the weighted sum batched over the k. The loop's length is static; the expert ids are read
        as scalars (torch.export traces them as bounded unknowns), so the compiled step covers it. Under expert
        parallelism (a share of the experts held) only the chosen experts held here run."""
        lo, held = self.held
        rows = []
        fused = getattr(self.gate_up_proj, "swiglu_token", None) if held == self.num_experts else None
        for n in range(x.shape[0]):
            y = fused(self.down_proj, x[n: n + 1], chosen[n], weights[n: n + 1]) if fused else None  # glmkit's int4 kernel
            if y is not None:  # all k experts in one call
                rows.append(y)
                continue
            ids = []
            for j in range(chosen.shape[1]):
                e = chosen[n, j].item()
                torch._check(e >= 0)
                torch._check(e < self.num_experts)
                ids.append(e)
            if held == self.num_experts:
                rows.append(self._token(x[n: n + 1], ids, weights[n: n + 1]))
                continue
            slots = [j for j, e in enumerate(ids) if lo <= e < lo + held]
            rows.append(self._token(x[n: n + 1], [ids[j] - lo for j in slots], weights[n: n + 1, slots]) if slots
                        else x.new_zeros(1, x.shape[1], dtype=torch.float32))
        return torch.cat(rows).to(x.dtype)  # (N, C)

    def _token(self, xn: torch.Tensor, ids: list, w: torch.Tensor) -> torch.Tensor:
        """One token xn (1, C) through experts `ids`, weighted by w (1, len(ids)) -> (1, C) float32."""
        wide = torch.float32 if xn.dtype == torch.float16 else xn.dtype
        h = torch.cat([self.linear("gate_up_proj", e, xn) for e in ids])  # (k, 2I)
        gate, up = h.float().chunk(2, dim=-1)  # (k, I) each
        a = (F.silu(gate) * up).to(wide)  # (k, I)
        y = torch.cat([self.linear("down_proj", e, a[j: j + 1]) for j, e in enumerate(ids)])  # (k, C)
        return w @ y.float()  # (1, C)

    def _grouped(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        N, k = chosen.shape
        out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)  # (N, C)
        flat = chosen.flatten()  # (N k,)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        first, held = self.held
        lo = 0
        for e, n in enumerate(counts):
            if n and first <= e < first + held:  # (expert parallelism: the experts held here)
                slots = order[lo: lo + n]  # positions in (N k)
                rows = slots // k  # (n,) token of each
                out.index_add_(0, rows, self.expert(e - first, x[rows]) * weights.flatten()[slots, None])
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
