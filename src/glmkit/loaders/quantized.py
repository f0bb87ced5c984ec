"""glmkit's own quantized checkpoints: the writer (loaders/assemble.py rebuilds a model from one).

config.json holds {"glmkit_config": ModelConfig fields, "quantization": {"bits", "group_size",
"modules": {name: "int4" | "int8" | "int4_experts" | "int8_experts"}}}; model.safetensors holds glmkit's
parameter names, with int4 weights as nibbles two per byte (portable, not torch's CPU-specific packing) plus
scales and zeros, and int8 weights with their per-channel scales (MoE experts: the same, stacked per layer).
The recorded module list, not tensor names, says which layers are quantized; "embedding": "lm_head" says a tied embedding is served from the int8 head. No engine here.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from glmkit.quant import Int4Linear, Int8Linear, StackedInt4, StackedInt8, TiedInt8Embedding
from glmkit.quant.int4_packing import to_bytes

FORMAT = "glmkit-weight-only-v1"


def save_quantized(model: nn.Module, directory: Path, bits: int, group_size: int) -> None:
    tensors, modules = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, (Int4Linear, StackedInt4)):  # portable nibbles and the bfloat16 scales as used
            modules[name] = "int4" if isinstance(module, Int4Linear) else "int4_experts"
            tensors[f"{name}.qweight"] = to_bytes(module.all_nibbles())  # ([E,] N, K / 2)
            sz = module.group_scales()  # ([E,] K / gs, N, 2)
            tensors[f"{name}.scales"] = sz[..., 0].transpose(-1, -2).contiguous()  # ([E,] N, K / gs)
            tensors[f"{name}.zeros"] = sz[..., 1].transpose(-1, -2).contiguous()
        elif isinstance(module, Int8Linear):
            modules[name] = "int8"
            tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = module.rows(), module.scales
        elif isinstance(module, StackedInt8):  # a MoE layer's stacked experts
            modules[name] = "int8_experts"
            tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = module.rows(), module.scales
            continue
        else:
            continue
        if getattr(module, "bias", None) is not None:  # stacked experts have none
            tensors[f"{name}.bias"] = module.bias.detach()
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] not in modules:
            tensors[name] = param.detach()  # in the model's dtype (bfloat16 when quantized by glmkit quantize)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    spec = {"format": FORMAT, "bits": bits, "group_size": group_size, "modules": modules}
    if isinstance(model.embed, TiedInt8Embedding):
        spec["embedding"] = "lm_head"  # no table of its own: rebuilt from the int8 head
    config = {"glmkit_config": model.config.to_dict(), "quantization": spec}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
