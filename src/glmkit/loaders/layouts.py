"""The source layouts glmkit reads, each with how to detect it, how to read its config and ONE module table.

Directories: THUDM remote code v1 (ChatGLM-6B) and v2 (ChatGLM2/3, GLM-4-9B), transformers' Glm / Glm4 and
Llama, glmkit's own names, and glmkit's quantized checkpoints. GGUF files: llama, chatglm (ChatGLM3 /
GLM-4-9B) and glm4 (GLM-4-0414). `adapter_names` says which layout's module names LoRA adapters for
these weights use (PEFT adapters for GGUF and glmkit files are made on the transformers model).
No file I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glmkit.config import ModelConfig, hf_spelling
from glmkit.errors import CheckpointError
from glmkit.loaders.keymap import W, WB, WBS, Module, Table, gate_up, qkv
from glmkit.loaders.quantized import FORMAT as QUANTIZED_FORMAT


@dataclass(frozen=True)
class Layout:
    name: str
    table: Table | None  # None: glmkit's own parameter names, read as they are
    adapter_names: str  # the layout whose module names adapters use
    format: str  # "hf" (a directory) or "gguf"


def _thudm(name: str, layer: str, attention: str, embed: str, final_norm: str, head: str,
           qkv_fix: str | None) -> Layout:
    """THUDM remote code: v1 (ChatGLM-6B, qkv rows per head) and v2 (ChatGLM2/3, GLM-4-9B) name the same modules
    under other prefixes."""
    return Layout(name, Table((
        Module("embed", embed, W),
        Module("layers.{i}.attn_norm", f"{layer}.input_layernorm"),
        Module("layers.{i}.attn.qkv", f"{layer}.{attention}.query_key_value", WBS, transform=qkv_fix, linear=True),
        Module("layers.{i}.attn.out", f"{layer}.{attention}.dense", WBS, linear=True),
        Module("layers.{i}.mlp_norm", f"{layer}.post_attention_layernorm"),
        Module("layers.{i}.mlp.in_proj", f"{layer}.mlp.dense_h_to_4h", WBS, linear=True),
        Module("layers.{i}.mlp.out_proj", f"{layer}.mlp.dense_4h_to_h", WBS, linear=True),
        Module("norm", final_norm),
        Module("lm_head", head, W),
    ), drops=(r"transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq", r"transformer\.rotary_pos_emb\.inv_freq")),
        name, "hf")


THUDM_V1 = _thudm("thudm_v1", "transformer.layers.{i}", "attention", "transformer.word_embeddings",
                  "transformer.final_layernorm", "lm_head", qkv_fix="v1_qkv")
THUDM_V2 = _thudm("thudm_v2", "transformer.encoder.layers.{i}", "self_attention",  # ChatGLM2/3, GLM-4-9B
                  "transformer.embedding.word_embeddings", "transformer.encoder.final_layernorm",
                  "transformer.output_layer", qkv_fix=None)

_HF = "model.layers.{i}"


_QKV = (qkv("layers.{i}.attn.qkv", f"{_HF}.self_attn.q_proj", f"{_HF}.self_attn.k_proj", f"{_HF}.self_attn.v_proj"),)


def _transformers(name: str, fused_gate_up: bool, extra: tuple[Module, ...] = (),
                  drops: tuple[str, ...] = (), attention: tuple[Module, ...] = _QKV,
                  rename: tuple[tuple[str, str], ...] = ()) -> Layout:
    """GlmForCausalLM / Glm4ForCausalLM write gate_up_proj fused, LlamaForCausalLM gate and up apart; both
    spellings are read. `extra`: a family's own modules (Glm4Moe's experts), which then names its adapters;
    `attention`: the q / k / v projections (latent attention has others)."""
    return Layout(name, Table(extra + attention + (
        Module("embed", "model.embed_tokens", W),
        Module("layers.{i}.attn_norm", f"{_HF}.input_layernorm", W),
        Module("layers.{i}.attn.out", f"{_HF}.self_attn.o_proj", linear=True),
        Module("layers.{i}.attn_post_norm", f"{_HF}.post_self_attn_layernorm", W),
        Module("layers.{i}.mlp_norm", f"{_HF}.post_attention_layernorm", W),
        Module("layers.{i}.mlp_post_norm", f"{_HF}.post_mlp_layernorm", W),
        Module("layers.{i}.mlp.in_proj", f"{_HF}.mlp.gate_up_proj", linear=True, export=fused_gate_up),
        gate_up("layers.{i}.mlp.in_proj", f"{_HF}.mlp.gate_proj", f"{_HF}.mlp.up_proj", export=not fused_gate_up),
        Module("layers.{i}.mlp.out_proj", f"{_HF}.mlp.down_proj", linear=True),
        Module("norm", "model.norm", W),
        Module("lm_head", "lm_head", W),
    ), drops=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",) + drops, rename=rename),
        name if extra else "transformers", "hf")


TRANSFORMERS_GLM = _transformers("transformers", fused_gate_up=True)
TRANSFORMERS_LLAMA = _transformers("transformers_llama", fused_gate_up=False)
_MLP = f"{_HF}.mlp"
_MOE = (
    Module("layers.{i}.mlp.router", f"{_MLP}.gate", ("weight", "e_score_correction_bias")),
    # experts: transformers v5's fused 3-D tensors (written on export), or one tensor per expert as released
    Module("layers.{i}.mlp.experts", f"{_MLP}.experts", ("gate_up_proj", "down_proj")),
    Module("layers.{i}.mlp.experts", (f"{_MLP}.experts.{{e}}.gate_proj", f"{_MLP}.experts.{{e}}.up_proj"), W,
           split="halves", export=False, param_name="gate_up_proj", per_expert=True),
    Module("layers.{i}.mlp.experts", f"{_MLP}.experts.{{e}}.down_proj", W, export=False, param_name="down_proj",
           per_expert=True),
    gate_up("layers.{i}.mlp.shared.in_proj", f"{_MLP}.shared_experts.gate_proj", f"{_MLP}.shared_experts.up_proj"),
    Module("layers.{i}.mlp.shared.out_proj", f"{_MLP}.shared_experts.down_proj", linear=True),
    # the next-token-prediction (MTP) layer after the last one; its embed_tokens / shared_head.head, where a file
    # has them, are the main model's embedding and head (which the layer shares), so they are not kept twice
    Module("layers.{i}.eh_proj", f"{_HF}.eh_proj", W),
    Module("layers.{i}.enorm", f"{_HF}.enorm", W),
    Module("layers.{i}.hnorm", f"{_HF}.hnorm", W),
    Module("layers.{i}.head_norm", f"{_HF}.shared_head.norm", W),
)
_MTP_DROPS = (r"model\.layers\.\d+\.embed_tokens\.weight", r"model\.layers\.\d+\.shared_head\.head\.weight")
TRANSFORMERS_GLM4_MOE = _transformers("transformers_glm4_moe", fused_gate_up=False, extra=(
    Module("layers.{i}.attn.q_norm", f"{_HF}.self_attn.q_norm", W),
    Module("layers.{i}.attn.k_norm", f"{_HF}.self_attn.k_norm", W), *_MOE), drops=_MTP_DROPS)
_LATENT_PARTS = (  # GLM-4.7-Flash / GLM-5 latent attention (mla.py) and GLM-5's indexer: (ours, params, linear)
    ("q", W, True), ("q_a", WB, True), ("q_a_norm", W, False), ("q_b", W, True), ("kv_a", WB, True),
    ("kv_a_norm", W, False), ("kv_b", W, False), ("indexer.wq_b", W, True), ("indexer.wk", W, True),
    ("indexer.k_norm", WB, False), ("indexer.weights", W, True))


def _latent(prefix: str, names: str) -> tuple[Module, ...]:
    """The latent-attention modules under a source's names (`names`: its suffixes, in _LATENT_PARTS' order)."""
    return tuple(Module(f"layers.{{i}}.attn.{ours}", f"{prefix}.{theirs}", params, linear=linear)
                 for (ours, params, linear), theirs in zip(_LATENT_PARTS, names.split(), strict=True))


_LATENT = _latent(f"{_HF}.self_attn", "q_proj q_a_proj q_a_layernorm q_b_proj kv_a_proj_with_mqa kv_a_layernorm "
                                      "kv_b_proj indexer.wq_b indexer.wk indexer.k_norm indexer.weights_proj")
TRANSFORMERS_GLM4_MOE_LITE = _transformers("transformers_glm4_moe_lite", fused_gate_up=False, extra=_MOE,
                                           drops=_MTP_DROPS, attention=_LATENT)
_VISION = tuple(Module(f"visual.{n}", f"model.visual.{n}", params) for n, params in (  # Glm4vVisionModel: same names
    ("patch_embed.proj", WB), ("post_conv_layernorm", W), ("embeddings.position_embedding", W), ("blocks.{i}.norm1", W),
    ("blocks.{i}.norm2", W), ("blocks.{i}.attn.qkv", WB), ("blocks.{i}.attn.proj", W), ("blocks.{i}.mlp.gate_proj", W),
    ("blocks.{i}.mlp.up_proj", W), ("blocks.{i}.mlp.down_proj", W), ("post_layernorm", W), ("downsample", WB),
    ("merger.proj", W), ("merger.post_projection_norm", WB), ("merger.gate_proj", W), ("merger.up_proj", W),
    ("merger.down_proj", W)))
_TEXT_PART = (("model.language_model.", "model."),)  # a vision model's text model, read as the text family's names
TRANSFORMERS_GLM4V = _transformers("transformers_glm4v", fused_gate_up=True, extra=_VISION, rename=_TEXT_PART)
TRANSFORMERS_GLM4V_MOE = _transformers("transformers_glm4v_moe", fused_gate_up=False, extra=(*_MOE, *_VISION),
                                       drops=_MTP_DROPS, rename=_TEXT_PART)
GLMKIT = Layout("glmkit", None, "transformers", "hf")
GLMKIT_QUANTIZED = Layout("glmkit_quantized", None, "transformers", "hf")

_B = "blk.{i}"
_GGUF_COMMON = (
    Module("embed", "token_embd", W),
    Module("layers.{i}.attn_norm", f"{_B}.attn_norm", W),
    Module("layers.{i}.attn.out", f"{_B}.attn_output", linear=True),
    Module("layers.{i}.mlp_norm", f"{_B}.ffn_norm", W),
    Module("layers.{i}.mlp.out_proj", f"{_B}.ffn_down", linear=True),
    Module("norm", "output_norm", W),
    Module("lm_head", "output", W),
)
_GGUF_QKV = qkv("layers.{i}.attn.qkv", f"{_B}.attn_q", f"{_B}.attn_k", f"{_B}.attn_v")
GGUF_LLAMA = Layout("gguf_llama", Table(_GGUF_COMMON + (
    _GGUF_QKV, gate_up("layers.{i}.mlp.in_proj", f"{_B}.ffn_gate", f"{_B}.ffn_up"))), "transformers", "gguf")
_GGUF_CHATGLM = (  # ChatGLM3 / GLM-4-9B as llama.cpp's converter writes them: the THUDM tensors, renamed
    Module("layers.{i}.attn.qkv", f"{_B}.attn_qkv", linear=True),
    Module("layers.{i}.mlp.in_proj", f"{_B}.ffn_up", linear=True),  # [gate; up], as dense_h_to_4h
)
GGUF_CHATGLM = Layout("gguf_chatglm", Table(_GGUF_COMMON + _GGUF_CHATGLM), "transformers", "gguf")
GGUF_GLM4 = Layout("gguf_glm4", Table(_GGUF_COMMON + _GGUF_CHATGLM + (  # GLM-4-0414: q/k/v apart, two more norms
    _GGUF_QKV, Module("layers.{i}.attn_post_norm", f"{_B}.post_attention_norm", W),
    Module("layers.{i}.mlp_post_norm", f"{_B}.post_ffw_norm", W))), "transformers", "gguf")
_GGUF_MOE = (  # the GLM-4.5 family's experts and next-token layer, as llama.cpp names them (glm4moe, deepseek2)
    Module("layers.{i}.mlp.router", f"{_B}.ffn_gate_inp", W),
    Module("layers.{i}.mlp.router", f"{_B}.exp_probs_b", ("bias",), param_name="e_score_correction_bias"),
    Module("layers.{i}.mlp.experts", (f"{_B}.ffn_gate_exps", f"{_B}.ffn_up_exps"), W, split="halves", dim=1,
           param_name="gate_up_proj"),  # (E, I, C) each -> (E, 2I, C)
    Module("layers.{i}.mlp.experts", f"{_B}.ffn_down_exps", W, param_name="down_proj"),
    gate_up("layers.{i}.mlp.shared.in_proj", f"{_B}.ffn_gate_shexp", f"{_B}.ffn_up_shexp"),
    Module("layers.{i}.mlp.shared.out_proj", f"{_B}.ffn_down_shexp", linear=True),
    Module("layers.{i}.eh_proj", f"{_B}.nextn.eh_proj", W), Module("layers.{i}.enorm", f"{_B}.nextn.enorm", W),
    Module("layers.{i}.hnorm", f"{_B}.nextn.hnorm", W),
    Module("layers.{i}.head_norm", f"{_B}.nextn.shared_head_norm", W),
)
_GGUF_MTP_DROPS = (r"blk\.\d+\.nextn\.embed_tokens\.weight", r"blk\.\d+\.nextn\.shared_head_head\.weight")
GGUF_GLM4MOE = Layout("gguf_glm4moe", Table(_GGUF_COMMON + (  # GLM-4.5 family; q/k rows as released (NeoX rotary)
    _GGUF_QKV, gate_up("layers.{i}.mlp.in_proj", f"{_B}.ffn_gate", f"{_B}.ffn_up"),
    Module("layers.{i}.mlp_norm", f"{_B}.post_attention_norm", W),
    Module("layers.{i}.attn.q_norm", f"{_B}.attn_q_norm", W), Module("layers.{i}.attn.k_norm", f"{_B}.attn_k_norm", W),
) + _GGUF_MOE, drops=_GGUF_MTP_DROPS), "transformers_glm4_moe", "gguf")
GGUF_MLA = Layout("gguf_mla", Table(_GGUF_COMMON + (  # GLM-4.7-Flash ('deepseek2'), GLM-5 ('glm-dsa')
    gate_up("layers.{i}.mlp.in_proj", f"{_B}.ffn_gate", f"{_B}.ffn_up"),
    # attn_kv_b: newer files split it into attn_k_b / attn_v_b, joined again on reading (gguf.py)
    *_latent(_B, "attn_q attn_q_a attn_q_a_norm attn_q_b attn_kv_a_mqa attn_kv_a_norm attn_kv_b indexer.attn_q_b "
                 "indexer.attn_k indexer.k_norm indexer.proj"),
) + _GGUF_MOE, drops=_GGUF_MTP_DROPS), "transformers_glm4_moe_lite", "gguf")
GGUF_LAYOUTS = {"llama": GGUF_LLAMA, "chatglm": GGUF_CHATGLM, "glm4": GGUF_GLM4, "glm4moe": GGUF_GLM4MOE,
                "deepseek2": GGUF_MLA, "glm-dsa": GGUF_MLA}
LAYOUTS = {layout.name: layout for layout in (THUDM_V1, THUDM_V2, TRANSFORMERS_GLM, TRANSFORMERS_LLAMA,
                                              TRANSFORMERS_GLM4_MOE, TRANSFORMERS_GLM4_MOE_LITE, TRANSFORMERS_GLM4V,
                                              TRANSFORMERS_GLM4V_MOE, GLMKIT,
                                              GLMKIT_QUANTIZED, *GGUF_LAYOUTS.values())}


def detect(raw: dict[str, Any]) -> Layout:
    """The layout of a checkpoint directory from its config.json (the one place this is decided)."""
    if "glmkit_config" in raw:
        quantized = isinstance(raw.get("quantization"), dict) and raw["quantization"].get("format") == QUANTIZED_FORMAT
        return GLMKIT_QUANTIZED if quantized else GLMKIT
    spelling = hf_spelling(raw)
    if spelling in ("thudm_v1", "thudm_v2"):
        return LAYOUTS[spelling]
    if spelling == "transformers":
        return {"llama": TRANSFORMERS_LLAMA, "glm4_moe": TRANSFORMERS_GLM4_MOE, "glm4_moe_lite": TRANSFORMERS_GLM4_MOE_LITE,
                "glm_moe_dsa": TRANSFORMERS_GLM4_MOE_LITE, "glm4v": TRANSFORMERS_GLM4V,
                "glm4v_moe": TRANSFORMERS_GLM4V_MOE}.get(raw.get("model_type"), TRANSFORMERS_GLM)
    ModelConfig.from_hf_dict(raw)  # raises the unknown- or unsupported-architecture error
    raise CheckpointError("config.json describes no layout glmkit reads.")


def read_config(layout: Layout, raw: dict[str, Any]) -> ModelConfig:
    """config.json -> ModelConfig in the layout's spelling."""
    if layout in (GLMKIT, GLMKIT_QUANTIZED):
        return ModelConfig.from_dict(raw["glmkit_config"])
    return ModelConfig.from_hf_dict(raw)


def adapter_table(layout: Layout) -> Table:
    return LAYOUTS[layout.adapter_names].table
