"""Write LoRA adapters in PEFT's file format (glmkit.adapters applies them; this is the training side).

The module names and row-order fixes come from the layout's module table, so an adapter trained here on
a THUDM or transformers checkpoint loads into PEFT on the original model. No training loop here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from glmkit.adapters import LoRALinear, LoRASettings, add_lora, lora_layers, merge, read_adapter
from glmkit.config import ModelConfig
from glmkit.loaders.keymap import INVERSE_TRANSFORMS
from glmkit.loaders.layouts import LAYOUTS

PEFT_PREFIX = "base_model.model."
__all__ = ["LoRALinear", "LoRASettings", "add_lora", "lora_layers", "merge", "read_adapter", "save_adapter"]


def save_adapter(model: nn.Module, directory: str | Path, layout: str, settings: LoRASettings,
                 base_model: str = "", state: dict[str, torch.Tensor] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors with PEFT's tensor names (from `state`, the model's
    full state dict, when given: sharded training)."""
    config: ModelConfig = model.config
    targets = LAYOUTS[layout].table.linear_names(config)
    tensors, modules = {}, set()
    for path, layer in lora_layers(model):
        for i, ((lo, hi, name), A, B) in enumerate(zip(layer.pieces, layer.lora_A, layer.lora_B)):
            if state is not None:
                A, B = state[f"{path}.lora_A.{i}"], state[f"{path}.lora_B.{i}"]
            target = targets[name]
            B = B.detach()
            if target.transform:
                B = INVERSE_TRANSFORMS[target.transform](B, config)
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().float().contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.float().contiguous()
            modules.add(name.rsplit(".", 1)[1])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": settings.r, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False, "use_rslora": settings.use_rslora,
        "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "revision": None}, indent=2))
