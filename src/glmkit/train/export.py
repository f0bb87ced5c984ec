"""Write a trained model as an HF-style checkpoint directory that `glmkit.load` (and the model's own
ecosystem) reads: config.json, model.safetensors with the layout's tensor names, tokenizer files.

Layouts: THUDM remote-code v1 (ChatGLM-6B architecture) and v2 (ChatGLM2/3, GLM-4-9B), transformers'
Glm / Glm4 / Llama, and glmkit's own ({"glmkit_config": ModelConfig fields}, glmkit's tensor names) for
configurations no published layout expresses. The base's config.json is kept when fine-tuning; a model trained
from scratch gets one written from its ModelConfig. No training here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from glmkit.config import ModelConfig
from glmkit.errors import GlmkitError
from glmkit.loaders.keymap import INVERSE_TRANSFORMS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "ice_text.model", "generation_config.json", "chat_template.jinja")


def v1_config_json(c: ModelConfig) -> dict:
    """config.json in ChatGLM-6B's (THUDM v1) spelling; the architecture's fixed choices are checked."""
    fixed = dict(norm="layernorm", mlp="gelu_tanh", residual="deepnorm", positions="2d", attention_mask="prefix",
                 rope_layout="half_split", num_kv_heads=c.num_heads, head_dim=c.hidden_size // c.num_heads)
    wrong = [k for k, v in fixed.items() if getattr(c, k) != v]
    if wrong:
        raise GlmkitError(f"this config differs from ChatGLM-6B's architecture in {wrong}; it cannot be written in "
                          "the THUDM v1 layout.")
    return {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "inner_hidden_size": c.intermediate_size, "num_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "layernorm_epsilon": c.norm_eps, "position_encoding_2d": True,
            "max_sequence_length": c.max_seq_len, "bos_token_id": c.sop_token_id, "eos_token_id": c.eop_token_id,
            "mask_token_id": c.mask_token_id, "gmask_token_id": c.gmask_token_id, "pad_token_id": c.pad_token_id,
            "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32"}


# glmkit module -> THUDM module, and the embedding / final norm / head names, per THUDM generation
_THUDM = {
    "v1": ("transformer.layers", {"attn_norm": "input_layernorm", "attn.qkv": "attention.query_key_value",
                                  "attn.out": "attention.dense", "mlp_norm": "post_attention_layernorm",
                                  "mlp.in_proj": "mlp.dense_h_to_4h", "mlp.out_proj": "mlp.dense_4h_to_h"},
           "transformer.word_embeddings.weight", "transformer.final_layernorm", "lm_head.weight"),
    "v2": ("transformer.encoder.layers", {"attn_norm": "input_layernorm", "attn.qkv": "self_attention.query_key_value",
                                          "attn.out": "self_attention.dense", "mlp_norm": "post_attention_layernorm",
                                          "mlp.in_proj": "mlp.dense_h_to_4h", "mlp.out_proj": "mlp.dense_4h_to_h"},
           "transformer.embedding.word_embeddings.weight", "transformer.encoder.final_layernorm",
           "transformer.output_layer.weight"),
}


def _thudm(sd: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    """THUDM remote-code names: v1 (ChatGLM-6B, whose qkv rows go back to per-head order) or v2+."""
    v1 = c.positions == "2d"
    layers, names, embed, norm, head = _THUDM["v1" if v1 else "v2"]
    out = {embed: sd["embed.weight"]}
    for key, t in sd.items():
        parts = key.split(".")
        if parts[0] == "layers":
            module = ".".join(parts[2:-1])
            if v1 and module == "attn.qkv":
                t = INVERSE_TRANSFORMS["v1_qkv"](t, c)
            out[f"{layers}.{parts[1]}.{names[module]}.{parts[-1]}"] = t
        elif parts[0] == "norm":
            out[f"{norm}.{parts[1]}"] = t
        elif key == "lm_head.weight":
            out[head] = t
    return out


def _transformers(sd: dict[str, torch.Tensor], c: ModelConfig, fused_gate_up: bool) -> dict[str, torch.Tensor]:
    H, K, D = c.num_heads, c.num_kv_heads, c.head_dim
    names = {"attn_norm": "input_layernorm", "attn.out": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
             "attn_post_norm": "post_self_attn_layernorm", "mlp_post_norm": "post_mlp_layernorm",
             "mlp.out_proj": "mlp.down_proj"}
    out = {"model.embed_tokens.weight": sd["embed.weight"]}
    for key, t in sd.items():
        parts = key.split(".")
        if parts[0] != "layers":
            continue
        prefix, module, kind = f"model.layers.{parts[1]}.", ".".join(parts[2:-1]), parts[-1]
        if module == "attn.qkv":
            for name, piece in zip(("q", "k", "v"), t.split([H * D, K * D, K * D])):
                out[f"{prefix}self_attn.{name}_proj.{kind}"] = piece
        elif module == "mlp.in_proj" and not fused_gate_up:
            gate, up = t.chunk(2)
            out[f"{prefix}mlp.gate_proj.{kind}"], out[f"{prefix}mlp.up_proj.{kind}"] = gate, up
        elif module == "mlp.in_proj":
            out[f"{prefix}mlp.gate_up_proj.{kind}"] = t
        else:
            out[prefix + names[module] + "." + kind] = t
    out["model.norm.weight"] = sd["norm.weight"]
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def save_checkpoint(model: nn.Module, directory: str | Path, config_json: dict,
                    tokenizer_dir: str | Path | None = None, state: dict | None = None) -> Path:
    """Write model (float weights; or `state`, its full state dict) under the names config_json's layout
    uses, plus config.json and the tokenizer files found in tokenizer_dir."""
    c: ModelConfig = model.config
    sd = {k: v.detach().float().contiguous() for k, v in (state if state is not None else model.state_dict()).items()}
    if c.tie_embeddings:
        sd.pop("lm_head.weight", None)
    if "glmkit_config" in config_json:  # glmkit's own names
        tensors = sd
    elif "num_layers" in config_json:
        tensors = _thudm(sd, c)
    elif config_json.get("model_type") in ("glm", "glm4", "llama"):
        tensors = _transformers(sd, c, fused_gate_up=config_json["model_type"] != "llama")
    else:
        raise GlmkitError(f"cannot write a checkpoint for model_type {config_json.get('model_type')!r}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_json, indent=2, ensure_ascii=False))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file() and Path(tokenizer_dir).resolve() != directory.resolve():
                shutil.copy(Path(tokenizer_dir) / name, directory / name)
    return directory
