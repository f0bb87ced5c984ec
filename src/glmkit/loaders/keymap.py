"""Checkpoint name tables: source tensor name -> glmkit parameter name, as data.

Each table is a list of (regex over the source name, target). A target is our name (with regex
back-references), a `Target` that also says which piece of a fused parameter the tensor is or which
named layout fix it needs, or None: "drop this tensor on purpose". `map_tensors` applies a table
strictly: a name no rule matches is an error. No file I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch

from glmkit.config import ModelConfig
from glmkit.errors import CheckpointError


@dataclass(frozen=True)
class Target:
    name: str
    piece: int | None = None  # index among tensors concatenated along dim 0 (q, k, v / gate, up)
    transform: str | None = None  # key of TRANSFORMS


Rule = tuple[str, Union[str, Target, None]]
L = r"(\d+)"  # layer index


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

THUDM_V1: list[Rule] = [
    (r"transformer\.word_embeddings\.weight", "embed.weight"),
    (rf"transformer\.layers\.{L}\.input_layernorm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (rf"transformer\.layers\.{L}\.attention\.query_key_value\.(weight|bias|weight_scale)",
     Target(r"layers.\1.attn.qkv.\2", transform="v1_qkv")),
    (rf"transformer\.layers\.{L}\.attention\.dense\.(weight|bias|weight_scale)", r"layers.\1.attn.out.\2"),
    (rf"transformer\.layers\.{L}\.attention\.rotary_emb\.inv_freq", None),  # recomputed from the config
    (rf"transformer\.layers\.{L}\.post_attention_layernorm\.(weight|bias)", r"layers.\1.mlp_norm.\2"),
    (rf"transformer\.layers\.{L}\.mlp\.dense_h_to_4h\.(weight|bias|weight_scale)", r"layers.\1.mlp.in_proj.\2"),
    (rf"transformer\.layers\.{L}\.mlp\.dense_4h_to_h\.(weight|bias|weight_scale)", r"layers.\1.mlp.out_proj.\2"),
    (r"transformer\.final_layernorm\.(weight|bias)", r"norm.\1"),
    (r"lm_head\.weight", "lm_head.weight"),
]

THUDM_V2: list[Rule] = [  # ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B
    (r"transformer\.embedding\.word_embeddings\.weight", "embed.weight"),
    (rf"transformer\.encoder\.layers\.{L}\.input_layernorm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (rf"transformer\.encoder\.layers\.{L}\.self_attention\.query_key_value\.(weight|bias|weight_scale)",
     r"layers.\1.attn.qkv.\2"),
    (rf"transformer\.encoder\.layers\.{L}\.self_attention\.dense\.(weight|bias|weight_scale)", r"layers.\1.attn.out.\2"),
    (rf"transformer\.encoder\.layers\.{L}\.post_attention_layernorm\.(weight|bias)", r"layers.\1.mlp_norm.\2"),
    (rf"transformer\.encoder\.layers\.{L}\.mlp\.dense_h_to_4h\.(weight|bias|weight_scale)", r"layers.\1.mlp.in_proj.\2"),
    (rf"transformer\.encoder\.layers\.{L}\.mlp\.dense_4h_to_h\.(weight|bias|weight_scale)", r"layers.\1.mlp.out_proj.\2"),
    (r"transformer\.encoder\.final_layernorm\.(weight|bias)", r"norm.\1"),
    (r"transformer\.output_layer\.weight", "lm_head.weight"),
    (r"transformer\.rotary_pos_emb\.inv_freq", None),  # recomputed from the config
]

TRANSFORMERS: list[Rule] = [  # GlmForCausalLM, Glm4ForCausalLM, LlamaForCausalLM
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (rf"model\.layers\.{L}\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (rf"model\.layers\.{L}\.self_attn\.q_proj\.(weight|bias)", Target(r"layers.\1.attn.qkv.\2", piece=0)),
    (rf"model\.layers\.{L}\.self_attn\.k_proj\.(weight|bias)", Target(r"layers.\1.attn.qkv.\2", piece=1)),
    (rf"model\.layers\.{L}\.self_attn\.v_proj\.(weight|bias)", Target(r"layers.\1.attn.qkv.\2", piece=2)),
    (rf"model\.layers\.{L}\.self_attn\.o_proj\.(weight|bias)", r"layers.\1.attn.out.\2"),
    (rf"model\.layers\.{L}\.self_attn\.rotary_emb\.inv_freq", None),  # old Llama checkpoints; recomputed
    (rf"model\.layers\.{L}\.post_self_attn_layernorm\.weight", r"layers.\1.attn_post_norm.weight"),
    (rf"model\.layers\.{L}\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
    (rf"model\.layers\.{L}\.post_mlp_layernorm\.weight", r"layers.\1.mlp_post_norm.weight"),
    (rf"model\.layers\.{L}\.mlp\.gate_up_proj\.(weight|bias)", r"layers.\1.mlp.in_proj.\2"),
    (rf"model\.layers\.{L}\.mlp\.gate_proj\.(weight|bias)", Target(r"layers.\1.mlp.in_proj.\2", piece=0)),
    (rf"model\.layers\.{L}\.mlp\.up_proj\.(weight|bias)", Target(r"layers.\1.mlp.in_proj.\2", piece=1)),
    (rf"model\.layers\.{L}\.mlp\.down_proj\.(weight|bias)", r"layers.\1.mlp.out_proj.\2"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]


GLMKIT: list[Rule] = [  # glmkit's own parameter names (config.json {"glmkit_config": ...})
    (r"(embed\.weight|norm\.(?:weight|bias)|lm_head\.weight|layers\.\d+\.[a-z_.]+\.(?:weight|bias))", r"\1"),
]


def map_tensors(rules: list[Rule], named: Iterable[tuple[str, str, Callable[[], torch.Tensor]]],
                config: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Apply a table to (source name, file, loader) triples.

    Returns our tensors and, for error messages, where each came from ("file: source name").
    With tied embeddings an `lm_head.weight` in the file is dropped: the embedding serves as the head."""
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for name, file, load in named:
        target = _match(compiled, name)
        if target is _NO_MATCH:
            raise CheckpointError(f"unexpected tensor {name!r} in {file}: glmkit has no place for it in this "
                                  "architecture. The checkpoint may belong to a different model or be damaged.")
        if target is None:
            continue
        ours = target.name
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue
        if ours in sources and target.piece is None:
            raise CheckpointError(f"tensor {name!r} in {file} fills {ours!r}, which {sources[ours]} already filled.")
        sources.setdefault(ours, f"{file}: {name}")
        tensor = load()
        if target.transform:
            tensor = TRANSFORMS[target.transform](tensor, config)
        if target.piece is None:
            tensors[ours] = tensor
        else:
            pieces.setdefault(ours, {})[target.piece] = tensor
    for ours, parts in pieces.items():
        if sorted(parts) != list(range(len(parts))) or len(parts) < (3 if ".attn.qkv." in ours else 2):
            raise CheckpointError(f"{sources[ours]}: the checkpoint has only some pieces of {ours!r} "
                                  f"(found {sorted(parts)}); the file set is incomplete.")
        ordered = [parts[i] for i in sorted(parts)]
        # float tensors concatenate; packed weights (GGUF blocks) bring their own cat, and a mix of kinds
        # (e.g. Q4_K q and k with a Q6_K v) concatenates as float
        if len({"float" if isinstance(p, torch.Tensor) else p.layout for p in ordered}) > 1:
            dtype = next((p.dtype for p in ordered if isinstance(p, torch.Tensor)), torch.float32)
            ordered = [p if isinstance(p, torch.Tensor) else p.to_float(dtype) for p in ordered]
        tensors[ours] = torch.cat(ordered, dim=0) if isinstance(ordered[0], torch.Tensor) else type(ordered[0]).cat(ordered)
    return tensors, sources


_NO_MATCH = object()


def _match(compiled, name: str):
    for pattern, target in compiled:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        if target is None:
            return None
        if isinstance(target, str):
            return Target(m.expand(target))
        return Target(m.expand(target.name), target.piece, target.transform)
    return _NO_MATCH
