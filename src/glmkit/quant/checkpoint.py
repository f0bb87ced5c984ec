"""glmkit's own quantized checkpoints: save a quantized model, and rebuild one from disk.

config.json holds {"glmkit_config": ModelConfig fields, "quantization": {"bits", "group_size",
"modules": {name: "int4" | "int8"}}}; model.safetensors holds glmkit's parameter names, with int4
weights as nibbles two per byte (portable, not torch's CPU-specific packing) plus scales and zeros, and
int8 weights with their per-channel scales. The recorded module list, not tensor names, says which
layers are quantized; "embedding": "lm_head" says a tied embedding is served from the int8 head. No engine here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from glmkit.config import ModelConfig
from glmkit.errors import CheckpointError
from glmkit.quant import Int4Linear, Int8Linear, TiedInt8Embedding, replace_module
from glmkit.quant.int4_packing import from_bytes, to_bytes

FORMAT = "glmkit-weight-only-v1"


def save_quantized(model: nn.Module, directory: Path, bits: int, group_size: int) -> None:
    tensors, modules = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            modules[name] = "int4"
            tensors[f"{name}.qweight"] = to_bytes(module.nibbles())  # (N, K / 2)
            sz = module.scales_zeros  # bfloat16, as the kernel uses them
            tensors[f"{name}.scales"], tensors[f"{name}.zeros"] = sz[..., 0].T.contiguous(), sz[..., 1].T.contiguous()
        elif isinstance(module, Int8Linear):
            modules[name] = "int8"
            tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = module.q, module.scales
        else:
            continue
        if module.bias is not None:
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


def is_quantized_checkpoint(raw: dict) -> bool:
    return "glmkit_config" in raw and raw.get("quantization", {}).get("format") == FORMAT


def load_quantized(directory: Path, raw: dict, model_cls, dtype: torch.dtype) -> nn.Module:
    """Rebuild the model saved by save_quantized: float parameters assigned, quantized modules recreated."""
    from safetensors import safe_open

    config = ModelConfig.from_dict(raw["glmkit_config"])
    spec = raw["quantization"]
    model = model_cls.skeleton(config)
    try:  # no `with`: the tensors are views of the file's memory map, which must outlive this function
        handle = safe_open(str(directory / "model.safetensors"), framework="pt")
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{directory / 'model.safetensors'} cannot be read ({e}); re-create it.") from None
    def take(key: str) -> torch.Tensor:
        # a fresh, aligned copy: the packed kernels read with vector loads that a file's memory map
        # (8-byte aligned tensors) does not guarantee
        return tensors.pop(key).clone()

    for name, kind in spec["modules"].items():
        bias = take(f"{name}.bias") if f"{name}.bias" in tensors else None
        try:
            if kind == "int4":
                module = Int4Linear(from_bytes(take(f"{name}.qweight")), take(f"{name}.scales"), take(f"{name}.zeros"), spec["group_size"], bias)
            else:
                module = Int8Linear(take(f"{name}.qweight"), take(f"{name}.scales"), bias)
        except KeyError as e:
            raise CheckpointError(f"{directory} lacks tensor {e.args[0]!r} for quantized layer {name!r}.") from None
        replace_module(model, name, module)
    if spec.get("embedding") == "lm_head":
        model.embed = TiedInt8Embedding(model.lm_head, dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if m.rsplit(".", 1)[0] not in spec["modules"]  # those were built above
               and not (m == "embed.weight" and spec.get("embedding") == "lm_head")]
    if unexpected or missing:
        raise CheckpointError(f"{directory} does not match its config.json (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).")
    model._weights_file = handle  # keeps the memory map alive as long as the model
    return model.requires_grad_(False)
