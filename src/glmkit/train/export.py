"""Write a trained model as an HF-style checkpoint directory that `glmkit.load` (and the model's own
ecosystem) reads: config.json, model.safetensors with the layout's tensor names, tokenizer files.

Layouts (their names from the module tables in loaders/layouts.py, inverted): THUDM remote-code v1
(ChatGLM-6B architecture) and v2 (ChatGLM2/3, GLM-4-9B), transformers' Glm / Glm4 / Llama, and glmkit's own ({"glmkit_config": ModelConfig fields}, glmkit's tensor names) for
configurations no published layout expresses. The base's config.json is kept when fine-tuning; a model trained
from scratch gets one written from its ModelConfig. No training here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from glmkit.config import ModelConfig
from glmkit.errors import GlmkitError
from glmkit.loaders.keymap import export_tensors
from glmkit.loaders.layouts import detect

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


def save_checkpoint(model: nn.Module, directory: str | Path, config_json: dict,
                    tokenizer_dir: str | Path | None = None, state: dict | None = None) -> Path:
    """Write model (float weights; or `state`, its full state dict) under the names config_json's layout
    uses, plus config.json and the tokenizer files found in tokenizer_dir."""
    c: ModelConfig = model.config
    sd = {k: v.detach().float().contiguous() for k, v in (state if state is not None else model.state_dict()).items()}
    if c.tie_embeddings:
        sd.pop("lm_head.weight", None)
    try:
        layout = detect(config_json)
    except GlmkitError:
        raise GlmkitError(f"cannot write a checkpoint for model_type {config_json.get('model_type')!r}.") from None
    tensors = sd if layout.table is None else export_tensors(layout.table, sd, c)  # the layout's own table
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
