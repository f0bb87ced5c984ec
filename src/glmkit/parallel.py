"""Tensor parallelism on torch.distributed: one model split across the ranks of a process group (torchrun; gloo on
CPU, NCCL on GPUs; env:// rendezvous, so several machines work as several processes do).

What each rank holds (gpt-fast's tp.py and mlx-lm's shard(), as weight slicing plus one all-reduce per sublayer):
attention by heads (its query heads and their kv heads; kv heads are replicated when there are fewer than ranks),
the output projection by the matching input columns; dense MLPs and shared experts by columns (gate and up rows)
then rows (down's input columns); routed experts by expert columns (the default: every expert's slice of width
I / W, so every rank works on every chosen expert and nothing depends on which rank owns what), or by expert
(GLMKIT_SPLIT_EXPERTS=experts: rank r holds experts [r E / W, (r + 1) E / W) whole and runs the chosen ones it
holds, expert parallelism); the embedding and the output head by vocabulary rows. The attention and MLP outputs are summed over ranks
(all-reduce), the embedding too, and the head's logits gathered. Norms and routers are replicated.

`local_config` gives the shapes of one rank's model, `shard` the slice of a full tensor a rank keeps,
`prepare` puts the collectives in; the engine mirrors rank 0's steps on the other ranks (engine/follow.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glmkit.config import ModelConfig
from glmkit.errors import GlmkitError


class RankLost(GlmkitError):
    """Another rank of the group stopped answering (it died, or its machine went away)."""


@dataclass
class World:
    rank: int
    size: int
    experts: str = "columns"  # how routed experts are split: "columns" or "experts" (expert parallelism)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        try:
            dist.all_reduce(x)
        except RuntimeError as e:
            raise lost(e) from None
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x (..., n) -> (..., n * size), rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        try:
            dist.all_gather(parts, x.contiguous())
        except RuntimeError as e:
            raise lost(e) from None
        return torch.cat(parts, dim=-1)

    def send(self, message) -> None:
        """Rank 0: a command every other rank follows (engine/follow.py)."""
        try:
            dist.broadcast_object_list([message], src=0)
        except RuntimeError as e:
            raise lost(e) from None

    def leave(self) -> None:
        """Every rank, at the end: wait for the others (so none tears its connections down under another's
        last operation), then close the group."""
        try:
            dist.barrier()
            dist.destroy_process_group()
        except RuntimeError as e:
            raise lost(e) from None

    def receive(self):
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0)
        except RuntimeError as e:
            raise lost(e) from None
        return box[0]


def from_env(device: str | None = None) -> World | None:
    """Under torchrun (WORLD_SIZE > 1, env:// rendezvous): join the process group (gloo on CPU, NCCL on CUDA,
    each rank on its LOCAL_RANK's GPU) and return this rank's World; None for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    experts = os.environ.get("GLMKIT_SPLIT_EXPERTS", "columns")
    if experts not in ("columns", "experts"):
        raise GlmkitError(f"GLMKIT_SPLIT_EXPERTS={experts!r}: use 'columns' (each expert's width split) or 'experts' "
                          "(whole experts per rank).")
    if not dist.is_initialized():
        cuda = str(device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # a long timeout: the other ranks wait for rank 0's next step as long as a server stays idle; a rank that
        # dies is still noticed at once (its connections close)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(days=30))
    return World(dist.get_rank(), dist.get_world_size(), experts)


def lost(e: Exception) -> RankLost:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return RankLost(f"another rank of the tensor-parallel group stopped answering ({first}); the model is split "
                    "across the ranks, so this process cannot go on. Restart the whole group.")


def _split(n: int, world: World, what: str) -> int:
    if n % world.size:
        raise GlmkitError(f"{what} ({n}) does not divide among {world.size} ranks; use a number of ranks that "
                          "divides it.")
    return n // world.size


def local_config(config: ModelConfig, world: World) -> ModelConfig:
    """The shapes of one rank's share: heads, kv heads, MLP and expert widths divided by the ranks."""
    if config.mla is not None:
        raise GlmkitError("tensor parallelism does not split latent attention (GLM-4.7-Flash, GLM-5) yet; run "
                          "these models in one process.")
    H, K = config.num_heads, config.num_kv_heads
    heads = _split(H, world, "the attention heads")
    if K >= world.size:
        kv = _split(K, world, "the kv heads")
    elif world.size % K or heads > H // K:
        raise GlmkitError(f"{K} kv heads cannot be shared out among {world.size} ranks (each rank's query heads "
                          "must belong to one kv head); use a number of ranks that divides or is divided by it.")
    else:
        kv = 1
    moe = config.moe
    if moe is not None and world.experts == "columns":
        moe = dataclasses.replace(moe, expert_size=_split(moe.expert_size, world, "the expert width"))
    elif moe is not None:  # whole experts per rank; the shared experts are still split by columns (their width)
        _split(moe.num_experts, world, "the routed experts")
        _split(moe.expert_size * moe.shared_experts, world, "the shared experts' width")
    return dataclasses.replace(config, num_heads=heads, num_kv_heads=kv, moe=moe,
                               intermediate_size=_split(config.intermediate_size, world, "the MLP width"))


def vocab_rows(config: ModelConfig, world: World) -> tuple[int, int]:
    """This rank's [lo, lo + n) of the vocabulary (n rows held; the last rank's may run past V, zero-padded)."""
    n = -(-config.vocab_size // world.size)
    return world.rank * n, n


def shard(name: str, t: torch.Tensor, config: ModelConfig, world: World) -> torch.Tensor:
    """The slice of the full tensor `name` (our parameter name) that this rank keeps; `config` is the full one."""
    r, W = world.rank, world.size
    if name.startswith("visual."):  # a vision tower runs whole on every rank
        return t
    if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
        q, k, v = t.split([H * D, K * D, K * D])
        h = H // W
        kv = (lambda x: x.chunk(W)[r]) if K >= W else (lambda x: x.view(K, D, *x.shape[1:])[r * h // (H // K)])
        return torch.cat([q.chunk(W)[r], kv(k), kv(v)])
    if name.endswith(("attn.out.weight", "mlp.out_proj.weight", "shared.out_proj.weight")):
        return t.chunk(W, dim=1)[r]
    if name.endswith(("attn.out.bias", "mlp.out_proj.bias", "shared.out_proj.bias")):
        return t if r == 0 else torch.zeros_like(t)  # added once, by rank 0
    if name.endswith(("mlp.in_proj.weight", "mlp.in_proj.bias", "shared.in_proj.weight", "shared.in_proj.bias")):
        if config.mlp != "swiglu":
            return t.chunk(W)[r]
        gate, up = t.chunk(2)
        return torch.cat([gate.chunk(W)[r], up.chunk(W)[r]])
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")) and world.experts == "experts":
        return t.chunk(W)[r]  # whole experts
    if name.endswith("experts.gate_up_proj"):  # (E, 2I, C)
        gate, up = t.chunk(2, dim=1)
        return torch.cat([gate.chunk(W, dim=1)[r], up.chunk(W, dim=1)[r]], dim=1)
    if name.endswith("experts.down_proj"):  # (E, C, I)
        return t.chunk(W, dim=2)[r]
    if name in ("embed.weight", "lm_head.weight"):
        lo, n = vocab_rows(config, world)
        part = t[lo: lo + n]
        return part if part.shape[0] == n else torch.cat([part, part.new_zeros(n - part.shape[0], *part.shape[1:])])
    return t


class VocabShard(nn.Module):
    """This rank's rows [lo, lo + n) of the token embedding: a lookup of the ids it holds, zero for the others,
    summed over the ranks."""

    sharded = True  # quantize_model keeps a sharded table float (an int8 head shared with it would be unsharded)

    def __init__(self, rows: int, dim: int, lo: int, world: World):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
        self.lo, self.world = lo, world

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.lo
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)  # (B, T, C)
        return self.world.all_reduce(x.masked_fill(outside[..., None], 0))


def prepare(model: nn.Module, full: ModelConfig, world: World) -> nn.Module:
    """A meta-device model built from local_config: the embedding and head cut to this rank's vocabulary rows,
    the attention and MLP outputs summed over the ranks, the logits gathered (Transformer.head)."""
    lo, n = vocab_rows(full, world)
    with torch.device("meta"):
        model.embed = VocabShard(n, full.hidden_size, lo, world)
        if model.lm_head is not None:
            model.lm_head = nn.Linear(full.hidden_size, n, bias=False)
    for block in model.layers:
        experts = getattr(block.mlp, "experts", None)
        if experts is not None and world.experts == "experts":  # this rank's whole experts only
            n = experts.num_experts // world.size
            with torch.device("meta"):
                experts.gate_up_proj = nn.Parameter(experts.gate_up_proj[:n].clone())
                experts.down_proj = nn.Parameter(experts.down_proj[:n].clone())
                shared = block.mlp.shared  # still split by columns: its width, not whole experts
                if shared is not None:
                    rows, width = shared.in_proj.weight.shape
                    shared.in_proj = nn.Linear(width, rows // world.size, bias=shared.in_proj.bias is not None)
                    shared.out_proj = nn.Linear(rows // world.size // (2 if shared.gated else 1), width,
                                                bias=shared.out_proj.bias is not None)
            experts.held = (world.rank * n, n)
        for part in (block.attn, block.mlp):
            part.register_forward_hook(lambda module, inputs, out: world.all_reduce(out))
    model.tp = world
    return model
