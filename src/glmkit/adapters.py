"""Adapters applied at inference: LoRA in PEFT's file format on glmkit's fused layers, and P-tuning v2 prefixes.

PEFT names a LoRA by the checkpoint's module (`q_proj`, `query_key_value`, `gate_up_proj`, ...); glmkit
fuses some of those (q, k, v -> attn.qkv; gate, up -> mlp.in_proj). The layout's module table
(loaders/layouts.py) says which fused layer and which rows of it a PEFT module is, so an adapter made by
PEFT on a transformers or THUDM model applies here, and one made here (train/lora.py writes it) loads
into PEFT. `LoRALinear` wraps any linear layer (float or quantized); `merge` folds adapters into float
weights. A P-tuning v2 prefix becomes the (L, K, P, D) keys and values the engine puts in front of
every sequence. No training here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from glmkit.config import ModelConfig
from glmkit.errors import CheckpointError, GlmkitError
from glmkit.loaders.hf import read_json
from glmkit.loaders.keymap import TRANSFORMS, piece_rows
from glmkit.loaders.layouts import LAYOUTS
from glmkit.quant import replace_module

PREFIX_TENSOR = "transformer.prefix_encoder.embedding.weight"  # the official P-tuning v2 name


@dataclass
class LoRASettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """base(x) plus, for each adapted piece [lo, hi) of the output rows, scale * B(A(dropout(x)))."""

    def __init__(self, base: nn.Module, out_features: int):
        super().__init__()
        self.base, self.out_features = base, out_features
        self.pieces: list[tuple[int, int, str]] = []  # (lo, hi, PEFT module name)
        self.lora_A, self.lora_B = nn.ParameterList(), nn.ParameterList()
        self.scale, self.dropout = 1.0, nn.Identity()

    def add(self, lo: int, hi: int, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        self.pieces.append((lo, hi, name))
        self.lora_A.append(nn.Parameter(A))  # (r, in)
        self.lora_B.append(nn.Parameter(B))  # (hi - lo, r)

    def delta(self) -> torch.Tensor:
        """scale * B @ A laid out over the full output rows: (out, in)."""
        A0 = self.lora_A[0]
        d = torch.zeros(self.out_features, A0.shape[1], dtype=A0.dtype, device=A0.device)
        for (lo, hi, _), A, B in zip(self.pieces, self.lora_A, self.lora_B):
            d[lo:hi] += self.scale * (B @ A)
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        h = self.dropout(x)
        parts, at = [], 0
        for (lo, hi, _), A, B in sorted(zip(self.pieces, self.lora_A, self.lora_B), key=lambda p: p[0][0]):
            if lo > at:
                parts.append(y.new_zeros(*y.shape[:-1], lo - at))
            parts.append(self.scale * ((h.to(A.dtype) @ A.T) @ B.T).to(y.dtype))  # (..., hi - lo)
            at = hi
        if at < self.out_features:
            parts.append(y.new_zeros(*y.shape[:-1], self.out_features - at))
        return y + torch.cat(parts, dim=-1)


def add_lora(model: nn.Module, layout: str, settings: LoRASettings, *, init: str = "peft",
             adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[str]:
    """Wrap the layers named by settings.target_modules (suffixes of PEFT module names) with LoRA.

    `adapters` maps PEFT module names to (A, B) as stored in an adapter file; without it A is
    Kaiming-uniform and B zero (PEFT's default init), or both random with init="random" (tests).
    Returns the PEFT module names adapted."""
    config: ModelConfig = model.config
    targets = LAYOUTS[layout].table.linear_names(config)
    chosen = [n for n in targets if any(n == t or n.endswith("." + t) for t in settings.target_modules)]
    if adapters is not None:
        chosen = sorted(adapters)
        unknown = [n for n in chosen if n not in targets]
        if unknown:
            raise CheckpointError(f"the adapter adapts {unknown[0]!r}, which this model does not have; "
                                  "it was made for a different base model.")
    if not chosen:
        raise GlmkitError(f"no layer matches the LoRA targets {settings.target_modules}; this checkpoint's layers "
                          f"are named like {sorted({n.rsplit('.', 1)[1] for n in targets})}.")
    gen = torch.Generator().manual_seed(0)
    for name in chosen:
        target = targets[name]
        path = target.name[: -len(".weight")]
        layer = model.get_submodule(path)
        if not isinstance(layer, LoRALinear):
            wrapped = LoRALinear(layer, _shape(layer)[0])
            wrapped.scale = settings.scale
            wrapped.dropout = nn.Dropout(settings.dropout) if settings.dropout else nn.Identity()
            replace_module(model, path, wrapped)
            layer = wrapped
        lo, hi = piece_rows(target, config, layer.out_features)
        in_features = _shape(layer.base)[1]
        if adapters is not None:
            A, B = adapters[name]
            if target.transform:
                B = TRANSFORMS[target.transform](B, config)  # the same row order fix as the weight's
            if A.shape[1] != in_features or B.shape[0] != hi - lo or A.shape[0] != B.shape[1]:
                raise CheckpointError(f"the adapter's {name} has shapes A {tuple(A.shape)}, B {tuple(B.shape)}; "
                                      f"this model needs A (r, {in_features}) and B ({hi - lo}, r).")
        else:
            A = torch.empty(settings.r, in_features)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
            B = torch.zeros(hi - lo, settings.r) if init == "peft" else torch.randn(hi - lo, settings.r, generator=gen) * 0.1
        device = next(layer.base.parameters(), next(layer.base.buffers(), torch.empty(0))).device
        layer.add(lo, hi, name, A.to(device=device, dtype=torch.float32), B.to(device=device, dtype=torch.float32))
    return chosen


def _shape(layer: nn.Module) -> tuple[int, int]:
    if hasattr(layer, "out_features") and hasattr(layer, "in_features"):
        return layer.out_features, layer.in_features
    raise GlmkitError(f"LoRA cannot wrap {type(layer).__name__}.")


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def read_adapter(directory: str | Path) -> tuple[LoRASettings, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A PEFT LoRA adapter directory -> settings and {module name: (A, B)}."""
    directory = Path(directory)
    cfg_path, weights = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} is not a LoRA adapter (no adapter_config.json); pass the directory "
                              "that `glmkit train --lora-r ...` or PEFT's save_pretrained wrote.")
    raw = read_json(cfg_path)  # the loaders' JSON reader: UTF-8, an object, or one clear line
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path} describes a {raw.get('peft_type')!r} adapter; glmkit applies LoRA only.")
    for key, ok in (("use_dora", (False, None)), ("bias", ("none", None)), ("fan_in_fan_out", (False, None))):
        if raw.get(key) not in ok:
            raise CheckpointError(f"{cfg_path}: {key}={raw[key]!r} is not supported (glmkit applies plain LoRA).")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise CheckpointError(f"{cfg_path}: per-layer rank_pattern / alpha_pattern are not supported.")
    if not weights.is_file():
        bin_path = directory / "adapter_model.bin"
        if not bin_path.is_file():
            raise CheckpointError(f"{directory} has adapter_config.json but no adapter_model.safetensors.")
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        try:
            state = load_file(weights)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{weights} cannot be read ({e}); it is truncated or damaged.") from None
    targets = raw.get("target_modules") or []
    settings = LoRASettings(r=int(raw["r"]), alpha=float(raw.get("lora_alpha", raw["r"])),
                            dropout=float(raw.get("lora_dropout") or 0.0),
                            target_modules=[targets] if isinstance(targets, str) else list(targets),
                            use_rslora=bool(raw.get("use_rslora", False)))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise CheckpointError(f"{weights}: tensor {key!r} is not a LoRA A/B weight (modules_to_save and bias "
                                  "tensors are not supported).")
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor.float()
    broken = [n for n, p in pairs.items() if set(p) != {"A", "B"}]
    if broken:
        raise CheckpointError(f"{weights}: {broken[0]!r} has only lora_{next(iter(pairs[broken[0]]))}; the file is incomplete.")
    return settings, {n: (p["A"], p["B"]) for n, p in pairs.items()}


def merge(model: nn.Module) -> None:
    """Fold every LoRA into its base layer's float weight (base.weight += scale * B @ A) and unwrap it."""
    for path, layer in lora_layers(model):
        weight = getattr(layer.base, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise GlmkitError("LoRA can be merged only into float weights; load the base model without quantization.")
        with torch.no_grad():
            weight += layer.delta().to(weight.dtype)
        replace_module(model, path, layer.base)


def apply_lora(model: nn.Module, layout: str, directory: str | Path) -> None:
    """Apply a PEFT LoRA adapter directory: merged into float weights, kept beside quantized ones."""
    if getattr(model, "tp", None) is not None:
        raise GlmkitError("LoRA adapters are not applied to a tensor-parallel model yet; merge the adapter into the "
                          "weights in one process (glmkit train writes merged checkpoints too), then split those.")
    settings, adapters = read_adapter(directory)
    add_lora(model, layout, settings, adapters=adapters)
    floats = all(getattr(m.base, "weight", torch.empty(0, dtype=torch.int8)).is_floating_point()
                 for _, m in lora_layers(model))
    if floats:
        merge(model)
    model.requires_grad_(False)


def prefix_kv(weight: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefix table (P, L * 2 * K * D), each row (layers, 2, kv heads, head dim) as in ChatGLM's PrefixEncoder
    -> keys, values, each (L, K, P, D)."""
    c = config
    rows = weight.view(weight.shape[0], c.num_layers, 2, c.num_kv_heads, c.head_dim)  # (P, L, 2, K, D)
    kv = rows.permute(1, 2, 3, 0, 4)  # (L, 2, K, P, D)
    return kv[:, 0], kv[:, 1]


def load_prefix(directory: str | Path, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A saved P-tuning v2 prefix -> (keys, values), each (L, K, P, D), for the engine's cache."""
    directory = Path(directory)
    path = directory / "prefix_encoder.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{directory} holds no prefix_encoder.safetensors; pass the directory that "
                              "`glmkit train --ptuning N` wrote (OUTPUT/final).")
    try:
        weight = load_file(path).get(PREFIX_TENSOR)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path} cannot be read ({e}); it is truncated or damaged.") from None
    width = config.num_layers * 2 * config.num_kv_heads * config.head_dim
    if weight is None or weight.dim() != 2 or weight.shape[1] != width:
        raise CheckpointError(f"{path} does not fit this model: it needs {PREFIX_TENSOR!r} of shape (P, {width}).")
    k, v = prefix_kv(weight.float(), config)
    return k.contiguous(), v.contiguous()
