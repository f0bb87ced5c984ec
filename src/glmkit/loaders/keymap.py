"""Checkpoint module tables: one per source layout, from which loading, export and adapter names all derive.

A table is a list of `Module(ours, theirs)`: our module path and the source's, `{i}` standing for the
layer index. A tuple `theirs` lists pieces stacked along dim 0 into one of our parameters (q, k, v into
attn.qkv; gate, up into mlp.in_proj), declared once: loading concatenates them, export splits them, LoRA
maps a PEFT module onto its rows. `transform` names a row-order fix (and its inverse); `export=False`
marks an alternative spelling that is read but never written; `drops` are source names (regexes)
dropped on purpose. `map_tensors` applies a table strictly: a name it does not know is an error.
No file I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch

from glmkit.config import ModelConfig
from glmkit.errors import CheckpointError

W, WB, WBS = ("weight",), ("weight", "bias"), ("weight", "bias", "weight_scale")  # weight_scale: official -int4/-int8


@dataclass(frozen=True)
class Module:
    ours: str  # e.g. "layers.{i}.attn.qkv"
    theirs: str | tuple[str, ...]  # a tuple: pieces stacked along dim 0
    params: tuple[str, ...] = WB
    transform: str | None = None  # key of TRANSFORMS / INVERSE_TRANSFORMS
    split: str | None = None  # how our rows divide into the pieces: key of SPLITS
    linear: bool = False  # a linear layer: adapters may target it
    export: bool = True
    param_name: str | None = None  # our parameter these tensors fill, when not the source's own suffix
    dim: int = 0  # the axis pieces join along (GGUF's stacked gate / up experts: 1)
    per_expert: bool = False  # theirs has an {e}: one tensor per expert, stacked into our 3-D parameter

    @property
    def pieces(self) -> tuple[str, ...]:
        return self.theirs if isinstance(self.theirs, tuple) else (self.theirs,)


@dataclass(frozen=True)
class Target:
    name: str  # our parameter name
    piece: int | None = None  # index among the pieces of a fused parameter
    transform: str | None = None
    split: str | None = None
    count: int = 1  # how many pieces the parameter has
    dim: int = 0
    expert: str | None = None  # the expert index of a per-expert tensor


def _v1_qkv(t: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    """ChatGLM-6B stores q, k, v rows per head (head 0: q k v, head 1: ...); we want [Q | K | V]."""
    H, D = c.num_heads, c.head_dim
    return t.reshape(H, 3, D, *t.shape[1:]).transpose(0, 1).reshape(3 * H * D, *t.shape[1:])


def _v1_qkv_inverse(t: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    """[Q | K | V] rows back to ChatGLM-6B's per-head (q k v) rows (for writing checkpoints and adapters)."""
    H, D = c.num_heads, c.head_dim
    return t.reshape(3, H, D, *t.shape[1:]).transpose(0, 1).reshape(3 * H * D, *t.shape[1:])


TRANSFORMS: dict[str, Callable[[torch.Tensor, ModelConfig], torch.Tensor]] = {"v1_qkv": _v1_qkv}
INVERSE_TRANSFORMS: dict[str, Callable[[torch.Tensor, ModelConfig], torch.Tensor]] = {"v1_qkv": _v1_qkv_inverse}
SPLITS: dict[str, Callable[[ModelConfig, int], list[int]]] = {
    "qkv": lambda c, rows: [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim],
    "halves": lambda c, rows: [rows // 2, rows // 2],
}


def qkv(ours: str, q: str, k: str, v: str, params=WB) -> Module:
    return Module(ours, (q, k, v), params, split="qkv", linear=True)


def gate_up(ours: str, gate: str, up: str, export: bool = True) -> Module:
    return Module(ours, (gate, up), WB, split="halves", linear=True, export=export)


@dataclass(frozen=True)
class Table:
    modules: tuple[Module, ...]
    drops: tuple[str, ...] = ()  # source-name regexes dropped on purpose (recomputed buffers)
    config_drops: Callable[[ModelConfig], list[str]] | None = None  # e.g. MTP layers past num_layers
    rename: tuple[tuple[str, str], ...] = ()  # source-name prefixes read as others (a vision model's text part)
    by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        index = {}
        for m in self.modules:
            for p, theirs in enumerate(m.pieces):
                piece = p if len(m.pieces) > 1 else None
                for param in m.params:
                    index.setdefault(f"{theirs}.{param}", Target(f"{m.ours}.{m.param_name or param}", piece,
                                                                 m.transform, m.split, len(m.pieces), m.dim,
                                                                 "{e}" if m.per_expert else None))
        object.__setattr__(self, "by_name", index)

    def target(self, name: str, config: ModelConfig | None = None) -> Target | None | object:
        """Our Target for a source tensor name, None when dropped on purpose, NO_MATCH when unknown."""
        for old, new in self.rename:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        template, i, e = _template(name)
        target = self.by_name.get(template)
        if target is not None:
            return replace(target, name=target.name.replace("{i}", i or ""), expert=e if target.expert else None)
        drops = list(self.drops) + (self.config_drops(config) if self.config_drops and config else [])
        return None if any(re.fullmatch(d, name) for d in drops) else NO_MATCH

    def exported(self, ours: str) -> Module | None:
        """The Module that writes our module path `ours` (layer index as {i})."""
        return next((m for m in self.modules if m.ours == ours and m.export), None)

    def linear_names(self, config: ModelConfig) -> dict[str, Target]:
        """Every source module name (PEFT's names for adapters) of a linear layer -> our Target (weight)."""
        out = {}
        for i in range(config.num_layers):
            for m in self.modules:
                for p, theirs in enumerate(m.pieces if m.linear else ()):
                    t = Target(m.ours.replace("{i}", str(i)) + ".weight", p if len(m.pieces) > 1 else None,
                               m.transform, m.split, len(m.pieces))
                    out.setdefault(theirs.replace("{i}", str(i)), t)
        return out


NO_MATCH = object()


def _template(name: str) -> tuple[str, str | None, str | None]:
    """'model.layers.3.mlp.experts.7.up_proj.weight' -> ('model.layers.{i}.mlp.experts.{e}.up_proj.weight', '3',
    '7'): the first dotted number is the layer, a second one the expert."""
    numbers = list(re.finditer(r"(?<=\.)\d+(?=\.)", name))[:2]
    for m, tag in reversed(list(zip(numbers, ("{i}", "{e}")))):
        name = name[: m.start()] + tag + name[m.end():]
    found = [m.group() for m in numbers] + [None, None]
    return name, found[0], found[1]


def layer_index(name: str) -> str | None:
    """The layer number in a tensor name (the first dotted number), or None."""
    return _template(name)[1]


def text_layer(name: str) -> int | None:
    """The text model's layer a parameter of ours belongs to, or None (embedding, head, the vision tower)."""
    i = None if name.startswith("visual.") else layer_index(name)
    return None if i is None else int(i)


def piece_rows(target: Target, config: ModelConfig, rows: int) -> tuple[int, int]:
    """The rows [lo, hi) of our parameter that a piece of it fills."""
    if target.piece is None:
        return 0, rows
    sizes = SPLITS[target.split](config, rows)
    return sum(sizes[: target.piece]), sum(sizes[: target.piece + 1])


def export_tensors(table: Table, state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the layout's tensor names (pieces split, row-order fixes undone)."""
    out = {}
    for name, t in state.items():
        path, _, param = name.rpartition(".")
        template, i, _ = _template(path + ".")
        module = table.exported(template[:-1])
        if module is None:
            raise CheckpointError(f"the layout has no name for {name!r}; write the checkpoint in glmkit's own layout.")
        if module.transform:
            t = INVERSE_TRANSFORMS[module.transform](t, config)
        parts = t.split(SPLITS[module.split](config, t.shape[0])) if len(module.pieces) > 1 else [t]
        for theirs, part in zip(module.pieces, parts):
            out[f"{theirs.replace('{i}', i or '')}.{param}"] = part
    return out


def map_tensors(table: Table, named: Iterable[tuple[str, str, Callable[[], torch.Tensor]]],
                config: ModelConfig | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Apply a table to (source name, file, loader) triples.

    Returns our tensors and, for error messages, where each came from ("file: source name").
    With tied embeddings an `lm_head.weight` in the file is dropped: the embedding serves as the head."""
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    pieces: dict[str, dict[tuple[int, int], torch.Tensor]] = {}  # ours -> (expert, piece) -> tensor
    targets: dict[str, Target] = {}
    piece_sources: dict[tuple[str, int, int], str] = {}  # (ours, expert, piece) -> where it came from
    for name, file, load in named:
        target = table.target(name, config)
        if target is NO_MATCH:
            raise CheckpointError(f"unexpected tensor {name!r} in {file}: glmkit has no place for it in this "
                                  "architecture. The checkpoint may belong to a different model or be damaged.")
        if target is None or (target.name == "lm_head.weight" and config is not None and config.tie_embeddings):
            continue
        ours, whole = target.name, target.piece is None and target.expert is None
        if ours in sources and whole:
            raise CheckpointError(f"tensor {name!r} in {file} fills {ours!r}, which {sources[ours]} already filled.")
        sources.setdefault(ours, f"{file}: {name}")
        tensor = load()
        if target.transform:
            tensor = TRANSFORMS[target.transform](tensor, config)
        if whole:
            tensors[ours] = tensor
        else:
            key = (int(target.expert or 0), target.piece or 0)
            pieces.setdefault(ours, {})[key] = tensor
            targets[ours] = target
            piece_sources[(ours, *key)] = f"{file}: {name}"
    for ours, parts in pieces.items():
        t = targets[ours]
        experts = _expert_count(ours, parts, config) if t.expert is not None else 1
        missing = [(e, p) for e in range(experts) for p in range(t.count) if (e, p) not in parts]
        if missing:
            what = f"expert {missing[0][0]} of " if t.expert is not None else f"piece {missing[0][1]} of "
            raise CheckpointError(f"{sources[ours]}: the checkpoint has no {what}{ours!r} ({len(missing)} tensor(s) "
                                  "missing); the file set is incomplete.")
        joined = []
        for e in range(experts):
            ordered = [parts[(e, p)] for p in range(t.count)]
            _check_piece_sizes(ours, t, ordered, config, {p: piece_sources[(ours, e, p)] for p in range(t.count)})
            joined.append(_join(ordered, t.dim))
            if tuple(joined[-1].shape) != tuple(joined[0].shape):
                raise CheckpointError(f"{piece_sources[(ours, e, 0)]} has shape {tuple(joined[-1].shape)} but expert 0 "
                                      f"has {tuple(joined[0].shape)}; every expert of a layer has the same shape.")
        tensors[ours] = torch.stack(joined) if t.expert is not None else joined[0]
    return tensors, sources


def _expert_count(ours: str, parts: dict, config: ModelConfig | None) -> int:
    """How many experts a per-expert parameter stacks: the config's count (a stray higher index is an error)."""
    n = config.moe.num_experts if config is not None and config.moe is not None else max(e for e, _ in parts) + 1
    if max(e for e, _ in parts) >= n:
        raise CheckpointError(f"the checkpoint has expert {max(e for e, _ in parts)} for {ours!r} but the config "
                              f"says {n} experts; the config and the weights disagree.")
    return n


def _check_piece_sizes(ours: str, t: Target, ordered: list, config: ModelConfig | None,
                       piece_sources: dict[int, str]) -> None:
    """Each piece of a fused weight has the rows the config implies (naming the piece that does not fit)."""
    if config is None or t.split is None or not ours.endswith((".weight", "_proj")) or len(ordered) < 2:
        return
    sizes = SPLITS[t.split](config, sum(p.shape[t.dim] for p in ordered))
    wrong = next((i for i, (p, n) in enumerate(zip(ordered, sizes)) if p.shape[t.dim] != n), None)
    if wrong is not None:
        raise CheckpointError(f"{piece_sources[wrong]} has {ordered[wrong].shape[t.dim]} rows but the "
                              f"config implies {sizes[wrong]}; the config and the weights disagree.")


def _join(ordered: list, dim: int = 0) -> torch.Tensor:
    """Pieces of one parameter, stacked: float tensors concatenate; packed weights (GGUF blocks) bring their own
    cat, and a mix of kinds (e.g. Q4_K q and k with a Q6_K v) concatenates as float."""
    if len({"float" if isinstance(p, torch.Tensor) else p.layout for p in ordered}) > 1:
        dtype = next((p.dtype for p in ordered if isinstance(p, torch.Tensor)), torch.float32)
        ordered = [p if isinstance(p, torch.Tensor) else p.to_float(dtype) for p in ordered]
    if len(ordered) == 1:
        return ordered[0]
    return torch.cat(ordered, dim=dim) if isinstance(ordered[0], torch.Tensor) else type(ordered[0]).cat(ordered, dim)
