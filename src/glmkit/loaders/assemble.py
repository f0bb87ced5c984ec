"""`assemble(checkpoint, skeleton, device, dtype, quantize)`: the model, filled with strict accounting.

`skeleton(config)` builds the model on the meta device (llm passes Transformer.skeleton: loaders never import
the model) and every parameter is assigned from the checkpoint: every tensor used
or dropped on purpose, every parameter filled, shapes checked. This is the one place quantized modules are
built from disk data: GGUF int4 blocks and other quantized rows, official ChatGLM -int4 / -int8 layers,
glmkit's quantized checkpoints, and tied int8 heads; `quantize` then converts what is still float.
Quantized models are built on the CPU and moved (a move repacks int4 for the device's kernel).
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Callable

import torch
from torch import nn

from glmkit.config import ModelConfig
from glmkit.errors import CheckpointError, GlmkitError
from glmkit.loaders.checkpoint import Checkpoint
from glmkit.loaders.keymap import text_layer
from glmkit.quant import (Int4Linear, Int8Linear, StackedInt4, StackedInt8, TiedInt8Embedding, quantize_model,
                          replace_module)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise GlmkitError(f"device {device!r} is not supported; use 'cpu' or 'cuda'.")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise GlmkitError("device 'cuda' was asked for but this torch build sees no CUDA GPU; use device='cpu' "
                          "or install a CUDA build of torch (see the README).")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise GlmkitError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


Skeleton = Callable[[ModelConfig], nn.Module]


def assemble(checkpoint: Checkpoint, skeleton: Skeleton, device: str | None = None,
             dtype: str | torch.dtype | None = None, quantize: str | None = None, group_size: int = 32,
             world=None) -> nn.Module:
    """quantize: None, 'int8' or 'int4' (group_size: int4's columns per scale). A quantized GGUF stays quantized
    on the CPU unless a dtype is asked for; quantized models default to bfloat16 activations (what the
    weight-only kernels run fastest with) and are read and quantized one layer at a time. world (a
    parallel.World): this rank's share of a tensor-parallel model only."""
    if quantize not in (None, "int8", "int4"):
        raise GlmkitError(f"quantize={quantize!r} is not supported; use None, 'int8' or 'int4'.")
    dev = pick_device(device)
    if world is not None and checkpoint.quantization is not None and checkpoint.gguf is None:
        raise GlmkitError(f"{checkpoint.source} is stored quantized; tensor parallelism splits float weights and "
                          "quantizes each share: load the float checkpoint with quantize='int8' or 'int4'.")
    if checkpoint.layout.name == "glmkit_quantized":
        with lean_heap():
            model = _glmkit_quantized(checkpoint, skeleton, pick_dtype(dtype or "bfloat16", dev))
            return model.to(dev)
    if quantize is None and dtype is None and dev.type == "cpu" and checkpoint.gguf is not None:
        quantize = checkpoint.quantization
    dtype = pick_dtype("bfloat16" if quantize is not None and dtype is None else dtype, dev)
    bits = {"int8": 8, "int4": 4}.get(quantize)
    with lean_heap():
        if world is not None:
            return _share(checkpoint, skeleton, dtype, bits, group_size, world).to(dev)
        if bits is not None:
            layers = checkpoint.layers(keep_int4=bits == 4, keep_int8=True, dtype=dtype)  # checks the names first
            return _by_layer(skeleton(checkpoint.config), layers, checkpoint.config, f"loading as int{bits}", dtype,
                             bits, group_size).to(dev)
        tensors, sources = checkpoint.tensors(dtype=dtype, wrap=lambda g: progress(g, checkpoint.config, "loading"))
        return fill(skeleton(checkpoint.config), tensors, sources, dev, dtype)


def _share(checkpoint: Checkpoint, skeleton: Skeleton, dtype: torch.dtype, bits: int | None, group_size: int,
           world) -> nn.Module:
    """One rank's share of a tensor-parallel model: each layer read (memory-mapped) as float (a GGUF's blocks
    dequantized) and cut to this rank's slices, then as _by_layer."""
    from glmkit import parallel

    layers = checkpoint.layers(dtype=dtype)  # checks the names first
    full = checkpoint.config
    model = parallel.prepare(skeleton(parallel.local_config(full, world)), full, world)
    return _by_layer(model, layers, full, f"loading rank {world.rank}'s share", dtype, bits, group_size,
                     cut=lambda name, t: parallel.shard(name, t, full, world).contiguous())


def _by_layer(model: nn.Module, layers, config: ModelConfig, what: str, dtype: torch.dtype, bits: int | None,
              group_size: int, cut=None) -> nn.Module:
    """Each layer (from Checkpoint.layers) filled and, with bits, quantized before the next is read (then the
    embedding, norm and head): the float weights of one layer at most are ever in memory, beside the model.
    cut(name, tensor): the part of each tensor this model keeps (a tensor-parallel share)."""
    for index, tensors, sources in progress(layers, config, what):
        if cut is not None:
            tensors = {name: cut(name, t) for name, t in tensors.items()}
        fill(model, tensors, sources, torch.device("cpu"), dtype, layer=index)
        if bits is not None and index is not None:
            quantize_model(model.layers[index], bits, group_size)
    unfilled = next((name for name, t in model.state_dict().items() if t.is_meta), None)
    if unfilled is not None:
        raise CheckpointError(f"the checkpoint has no tensor for {unfilled!r}; the download is incomplete or "
                              "config.json does not match the weights.")
    return model if bits is None else quantize_model(model, bits, group_size)  # the head (and a tied embedding)


def progress(layers, config: ModelConfig, what: str):
    """A progress bar over the layers being read, on a terminal (stderr) only; GLMKIT_PROGRESS=0 turns it off."""
    import os
    import sys

    from tqdm import tqdm

    off = not sys.stderr.isatty() or os.environ.get("GLMKIT_PROGRESS") == "0"
    return tqdm(layers, total=config.num_layers + config.mtp_layers + 1, desc=what, unit="layer", leave=False,
                disable=off)


_EVERY = object()  # fill()'s default: the whole model


def fill(model: nn.Module, tensors: dict, sources: dict[str, str], device: torch.device,
         dtype: torch.dtype, layer=_EVERY) -> nn.Module:
    """A meta-device model filled with `assign=True`; every parameter must come from the checkpoint. Empties
    `tensors` as it goes, so a checkpoint is never held twice. `layer`: fill only that layer's parameters (an
    index; None: those of no layer), which `tensors` must then hold exactly."""
    expected = model.state_dict()
    if layer is not _EVERY:
        expected = {k: v for k, v in expected.items() if text_layer(k) == layer}
    for path in _official_quantized(model, tensors, expected, sources):  # ChatGLM -int4 / -int8 layers
        expected = {k: v for k, v in expected.items() if k.rsplit(".", 1)[0] != path}
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{sources[unexpected[0]]} has no place in this model (it would fill "
                              f"{unexpected[0]!r}); config.json and the weights disagree.")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"the checkpoint has no tensor for {missing[0]!r}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; the download is "
                              "incomplete or config.json does not match the weights.")
    for name, param in expected.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise CheckpointError(f"{sources[name]} has shape {tuple(tensors[name].shape)} but config.json implies "
                                  f"{tuple(param.shape)} for {name!r}; config.json and the weights disagree.")
        stored = getattr(tensors[name], "dtype", torch.float32)  # packed GGUF blocks are float weights
        if param.is_floating_point() and not stored.is_floating_point:
            raise CheckpointError(f"{sources[name]} holds {stored} values where a floating-point weight belongs; "
                                  "the file is damaged or not a model checkpoint.")
    packed = [name for name, t in tensors.items() if not isinstance(t, torch.Tensor)]
    state = {name: tensors.pop(name).to(device=device, dtype=dtype) for name in list(tensors) if name not in packed}
    for name in packed:  # GGUF int4 / int8 blocks become quantized modules directly, never float
        blocks = tensors.pop(name)
        if hasattr(blocks, "experts"):  # a MoE layer's stacked experts: the parameter becomes a stacked module
            replace_module(model, name, _stacked_module(blocks))
        else:
            _packed_module(model, name.rsplit(".", 1)[0], blocks, state, dtype)
    model.load_state_dict(state, strict=False, assign=True)  # completeness was checked above
    if layer is not _EVERY:  # the rest of the model is still on the meta device
        return model.requires_grad_(False)
    return model.to(device).requires_grad_(False)  # quantized layers were built on the CPU: moved (and repacked)


def _stacked_module(stacked) -> nn.Module:
    """GGUF experts kept as the file's bytes -> StackedInt4 (int4 blocks, exactly) or StackedInt8 (other types,
    each row requantized to one scale a few rows at a time, as for dense layers: no float copy)."""
    from glmkit.loaders.gguf import Int4Blocks

    E, N, K = stacked.shape
    b = stacked.blocks
    if isinstance(b, Int4Blocks):
        return StackedInt4(b.q.view(E, N, K), b.scales.view(E, N, -1), b.zeros.view(E, N, -1), 32)
    return StackedInt8.from_rows((E, N, K), b.rows)


def _packed_module(model: nn.Module, path: str, blocks, state: dict, dtype: torch.dtype) -> None:
    from glmkit.loaders.gguf import Int4Blocks

    bias = state.pop(path + ".bias", None)
    if isinstance(blocks, Int4Blocks):
        module = Int4Linear(blocks.q, blocks.scales, blocks.zeros, 32, bias)
    else:  # Int8Rows
        module = Int8Linear.from_rows(blocks.shape, blocks.rows, bias)
    if path == "embed":  # a tied table kept 8-bit: the int8 head serves the embedding as well
        model.lm_head, model.embed = module, TiedInt8Embedding(module, dtype)
    else:
        replace_module(model, path, module)


def _official_quantized(model: nn.Module, tensors: dict, expected: dict, sources: dict) -> list[str]:
    """Official ChatGLM -int8 / -int4 layers: an int8 `weight` (int4: two values per byte, first in the high
    nibble) with a per-row `weight_scale` (row absmax / 127 or / 7) become int8 / int4 modules directly."""
    done = []
    for scale_name in [n for n in tensors if n.endswith(".weight_scale")]:
        path = scale_name[: -len(".weight_scale")]
        scale, weight = tensors.pop(scale_name).float(), tensors.pop(path + ".weight", None)
        if weight is None or path + ".weight" not in expected:
            raise CheckpointError(f"{sources[scale_name]} has no quantized weight to go with it.")
        N, K = expected[path + ".weight"].shape
        bias = tensors.pop(path + ".bias", None)
        if tuple(weight.shape) == (N, K):
            module = Int8Linear(weight.to(torch.int8), scale, bias)
        elif tuple(weight.shape) == (N, K // 2):
            packed = weight.to(torch.int8).view(torch.uint8).to(torch.int16)
            signed = torch.stack([packed >> 4, packed & 15], dim=-1).view(N, K)  # (N, K), 0..15 two's complement
            values = torch.where(signed >= 8, signed - 16, signed)  # -8..7
            module = Int4Linear((values + 8).to(torch.uint8), scale[:, None].expand(N, K // 32).contiguous(),
                                torch.zeros(N, K // 32), 32, bias)
        else:
            raise CheckpointError(f"{sources[path + '.weight']} has shape {tuple(weight.shape)}; a quantized layer of "
                                  f"{(N, K)} needs {(N, K)} (int8) or {(N, K // 2)} (int4).")
        replace_module(model, path, module)
        done.append(path)
    return done


def _glmkit_quantized(checkpoint: Checkpoint, skeleton: Skeleton, dtype: torch.dtype) -> nn.Module:
    """A checkpoint written by `glmkit quantize`: float parameters assigned, the recorded quantized modules
    rebuilt (int4 as portable nibbles plus scales and zeros, int8 with per-channel scales)."""
    from glmkit.quant.int4_packing import from_bytes

    spec = checkpoint.raw_config["quantization"]
    tensors, _ = checkpoint.tensors()  # read (and its layer count checked) before the model is built
    model = skeleton(checkpoint.config)

    def take(key: str) -> torch.Tensor:
        # a fresh, aligned copy: the packed kernels read with vector loads that a file's memory map
        # (8-byte aligned tensors) does not guarantee
        return tensors.pop(key).clone()

    for name, kind in spec["modules"].items():
        bias = take(f"{name}.bias") if f"{name}.bias" in tensors else None
        try:
            if kind == "int4":
                module = Int4Linear(from_bytes(take(f"{name}.qweight")), take(f"{name}.scales"),
                                    take(f"{name}.zeros"), spec["group_size"], bias)
            elif kind == "int4_experts":
                module = StackedInt4(from_bytes(take(f"{name}.qweight")), take(f"{name}.scales"),
                                     take(f"{name}.zeros"), spec["group_size"])
            elif kind == "int8_experts":
                module = StackedInt8(take(f"{name}.qweight"), take(f"{name}.scales"))
            else:
                module = Int8Linear(take(f"{name}.qweight"), take(f"{name}.scales"), bias)
        except KeyError as e:
            raise CheckpointError(f"{checkpoint.source} lacks tensor {e.args[0]!r} for quantized layer {name!r}.") from None
        replace_module(model, name, module)
    if spec.get("embedding") == "lm_head":
        model.embed = TiedInt8Embedding(model.lm_head, dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v.clone() for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if m.rsplit(".", 1)[0] not in spec["modules"]  # those were built above
               and not (m == "embed.weight" and spec.get("embedding") == "lm_head")]
    if unexpected or missing:
        raise CheckpointError(f"{checkpoint.source} does not match its config.json (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).")
    return model.requires_grad_(False)


_heap_depth = 0  # lean_heap nesting


@contextlib.contextmanager
def lean_heap():
    """While loading, give every allocation of 64 KiB or more its own mapping (glibc's M_MMAP_THRESHOLD), so
    the loader's large temporaries go back to the system when freed instead of fragmenting the heap (the
    default model's peak RSS: ~700 -> ~490 MB). Afterwards both thresholds are fixed where glibc's own adaptive
    ones end up (32 MiB, and 64 MiB for trimming), since fresh pages for every large activation would slow
    prefill. Nested uses (load() around assemble()) act once, at the outermost. Elsewhere than glibc, a no-op."""
    global _heap_depth
    try:
        libc = ctypes.CDLL("libc.so.6")
        if _heap_depth == 0:
            libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        yield
        return
    _heap_depth += 1
    try:
        yield
    finally:
        _heap_depth -= 1
        if _heap_depth == 0:
            libc.malloc_trim(0)
            libc.mallopt(-3, 32 << 20)
            libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD, as glibc's adaptive mode would set it (twice the above)
