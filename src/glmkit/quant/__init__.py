"""Weight-only int8 / int4 linear layers and stacked MoE expert weights, and swapping them in for nn.Linear
and 3-D expert parameters.

Int8Linear: symmetric per-output-channel int8. Int4Linear: asymmetric group-wise int4 in torch's
tinygemm layout, w = (q - 8) * scale + zero per group of `group_size` input columns (GGUF Q4_0 / Q4_1
blocks map onto it exactly). On CPU with bfloat16 activations they call torch's packed kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`); on CUDA int4 calls torch's tinygemm kernel
(`_weight_int4pack_mm`, Ampere or newer, checked once per device) and int8 casts the int8 weights and
scales the output; anywhere else they dequantize and matmul, the portable (and float32-exact) path.
Nothing here loads files or knows about the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.errors import GlmkitError
from glmkit.quant import cpu_kernels
from glmkit.quant import int4_packing as packing


# inputs with at least this many rows (prefill) run a bfloat16 GEMM on weights dequantized for the call: at
# 512 rows oneDNN's bf16 GEMM is 2.6-4.9x faster than the weight-only kernels. Unpacking int4 costs more
# (~0.25 s for the default model against ~0.02 s for int8), so int4 switches later. On CUDA the tinygemm
# int4 kernel is built for few rows (torchao's measurements: slower than a dequantized GEMM from ~64 rows).
PREFILL_ROWS = 32
PREFILL_ROWS_INT4 = 256
PREFILL_ROWS_CUDA = 64


def int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (..., K) -> asymmetric int4 per `group_size` columns: q (..., K) 0..15, scales and zeros (..., K / gs),
    with w ~ (q - 8) * scale + zero."""
    g = w.float().view(*w.shape[:-1], -1, group_size)  # (..., K / gs, gs)
    lo, hi = g.amin(-1), g.amax(-1)  # (..., K / gs)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).view(w.shape)
    return q, scales, lo + 8 * scales


def stored_nibbles(packed: torch.Tensor, layout: str, N: int, K: int, group_size: int) -> torch.Tensor:
    """An (N, K) int4 weight's stored values, 0..15, from its packed layout ("bytes", "cpu" or "cuda")."""
    if layout == "bytes":
        return packing.from_bytes(packed)
    if layout == "cpu" and packing.cpu_layout_known(N, K):
        return packing.cpu_blocks(packed, N, K).transpose(1, 2).reshape(N, K)
    if layout == "cuda" and packing.cuda_layout_known(packed.device, N, K):
        return packing.cuda_values(packed, N, K)
    # any other layout: the packed kernel on the identity with scale 1, zero 8
    eye = torch.eye(K, dtype=torch.bfloat16, device=packed.device)
    unit = torch.empty(K // group_size, N, 2, dtype=torch.bfloat16, device=packed.device)
    unit[..., 0], unit[..., 1] = 1.0, 8.0
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu if layout == "cpu" else torch.ops.aten._weight_int4pack_mm
    return kernel(eye, packed, group_size, unit).T.round().to(torch.uint8)


def repacked(module: nn.Module, fn, recurse: bool, apply) -> nn.Module:
    """Module.to() and friends for int4 modules: a move to another kind of device repacks the 4-bit values
    (module.all_nibbles()) and the scales (module.group_scales()) for that device's kernel (module._pack)."""
    target = fn(torch.empty(0, dtype=torch.uint8, device=module.packed.device)).device
    if target.type == module.packed.device.type:
        return apply(fn, recurse)
    q, sz = module.all_nibbles(), module.group_scales()
    module.packed, module.scales_zeros = (torch.empty(0, dtype=t) for t in (torch.uint8, torch.bfloat16))  # repacked below
    apply(fn, recurse)
    module._pack(q.to(target), sz.to(target))
    return module


def int8_rows(shape: tuple[int, int], rows, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an (N, K) weight given as rows(lo, hi) -> its rows [lo, hi) as a float tensor, read a few rows
    at a time (float32 temporaries stay small for big heads, and the whole float matrix need never exist):
    q (N, K) int8 and per-row scales (N,)."""
    N, K = shape
    q = torch.empty(N, K, dtype=torch.int8, device=device)  # (N, K)
    scales = torch.empty(N, device=device)  # (N,)
    step = max(1, (1 << 20) // K)
    for lo in range(0, N, step):
        part = rows(lo, min(lo + step, N)).float()  # (n, K)
        s = (part.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (n,)
        scales[lo: lo + step] = s
        q[lo: lo + step] = torch.round(part / s[:, None]).clamp(-127, 127)
    return q, scales


def int8_tiles(q: torch.Tensor) -> torch.Tensor:
    """(..., N, K) int8 -> (..., N / 16, K / 4, 16, 4), the tiles of glmkit's int8 CPU kernel: byte (r, j) of
    tile t and chunk c holds q[16 t + r, 4 c + j]."""
    *lead, N, K = q.shape
    return q.view(*lead, N // 16, 16, K // 4, 4).transpose(-3, -2).contiguous()


def tiles_to_rows(tiles: torch.Tensor) -> torch.Tensor:
    """(..., N / 16, K / 4, 16, 4) int8_tiles -> (..., N, K)."""
    *lead, T, C, _, _ = tiles.shape
    return tiles.transpose(-3, -2).reshape(*lead, T * 16, C * 4)


def untiled_off_cpu(module: nn.Module, fn, recurse: bool, apply) -> nn.Module:
    """Module.to() and friends for the int8 modules: tiles are for glmkit's CPU kernels only, so a move to
    another kind of device takes the weights as rows."""
    target = fn(torch.empty(0, dtype=torch.int8, device=module.q.device)).device
    if module.layout == "vnni" and target.type != "cpu":
        module.q, module.layout = module.rows().contiguous(), "rows"
    return apply(fn, recurse)


class Int8Linear(nn.Module):
    """Symmetric int8 per output row: `q` is (N, K) (`layout` "rows"), or its int8_tiles where glmkit's CPU
    kernels run ("vnni"); rows() gives (N, K) either way."""

    bits = 8  # weight-only bits: what the compiler's options and the engine ask of a layer

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = N, K = q.shape
        q = q.to(torch.int8).contiguous()
        self.layout = "vnni" if cpu_kernels.fits(q.device, N, K) else "rows"
        self.register_buffer("q", int8_tiles(q) if self.layout == "vnni" else q)  # (N, K) or (N / 16, K / 4, 16, 4)
        self.register_buffer("scales", scales.float().contiguous())  # (N,)
        self.register_buffer("scales_bf16", self.scales.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        return cls.from_rows(w.shape, lambda lo, hi: w[lo:hi], bias, w.device)

    @classmethod
    def from_rows(cls, shape: tuple[int, int], rows, bias: torch.Tensor | None = None,
                  device: torch.device | str = "cpu") -> "Int8Linear":
        return cls(*int8_rows(shape, rows, device), bias)

    def rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The int8 weights (N, K), or the rows numbered by `index` (...) -> (..., K)."""
        if self.layout == "rows":
            return self.q if index is None else self.q[index]
        if index is None:
            return tiles_to_rows(self.q)
        return self.q[index // 16, :, index % 16, :].flatten(-2)  # (..., K / 4, 4) -> (..., K)

    def _apply(self, fn, recurse: bool = True):
        return untiled_off_cpu(self, fn, recurse, super()._apply)

    def dequantize(self) -> torch.Tensor:
        return self.rows().float() * self.scales[:, None]  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch 2.13's int8 kernel crashes (segfault) for input widths that are not a multiple of 16 once
        # there are 8 or more rows: those shapes take the portable path
        if self.layout == "vnni" and x.dtype == torch.bfloat16:
            y = torch.ops.glmkit.int8_linear(x.reshape(-1, self.in_features).contiguous(), self.q,
                                             self.scales.float())  # (rows, N) float32
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        elif x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.numel() >= PREFILL_ROWS * self.in_features:
            y = F.linear(x, self.q.to(torch.bfloat16) * self.scales_bf16[:, None])  # prefill: bf16 GEMM
        elif x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.in_features % 16 == 0:
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.q, self.scales_bf16)
            y = y.view(*x.shape[:-1], self.out_features)
        elif x.device.type == "cuda" and x.dtype != torch.float32:
            y = F.linear(x, self.q.to(x.dtype)) * self.scales.to(x.dtype)  # scaled after: no float weight copy
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int4Linear(nn.Module):
    """`packed` holds the 4-bit values in the layout of its device's kernel (`layout`: "vnni" for glmkit's own
    CPU kernels, "cpu", "cuda" or "bytes", see int4_packing); moving the module to another kind of device repacks
    them."""

    bits = 4

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None):
        """q (N, K) ints 0..15; scales and zeros (N, K / group_size)."""
        super().__init__()
        N, K = q.shape
        self.check(N, K, group_size)
        self.out_features, self.in_features, self.group_size = N, K, group_size
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("scales_zeros", torch.empty(0, dtype=torch.bfloat16))
        self._pack(q, torch.stack([scales.float().T, zeros.float().T], dim=-1).to(torch.bfloat16))  # (K / gs, N, 2)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @staticmethod
    def check(N: int, K: int, group_size: int) -> None:
        if group_size not in (32, 64, 128, 256) or K % group_size or N % 16:
            raise GlmkitError(f"int4 needs a group size of 32, 64, 128 or 256 dividing the input size ({K}) and an "
                              f"output size divisible by 16 ({N}); got group size {group_size}.")

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32) -> "Int4Linear":
        N, K = w.shape
        cls.check(N, K, group_size)
        return cls(*int4_groups(w, group_size), group_size, bias)

    def _pack(self, q: torch.Tensor, sz: torch.Tensor) -> None:
        """Store q (N, K) and sz (K / gs, N, 2) bfloat16 in the layout of q's device's kernel: glmkit's own on CPU
        where it runs (as one stacked expert), torch's otherwise; two values a byte where there is none."""
        N, K = q.shape
        self.scales_zeros = sz.contiguous()
        if cpu_kernels.fits(q.device, N, self.group_size):
            self.packed = packing.to_vnni(q[None])  # (1, N / 16, K / 8, 16, 4)
            self.scales_zeros, self.layout = packing.scales_to_vnni(sz[None]), "vnni"  # (1, N / 16, K / gs, 2, 16)
        elif q.device.type == "cpu":
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
            self.layout = "cpu"
        elif (q.device.type == "cuda" and N % 8 == 0 and packing.cuda_inner_k_tiles(K)
              and packing.cuda_kernel_works(q.device)):
            self.packed, self.layout = packing.pack_cuda(q), "cuda"
        else:
            self.packed, self.layout = packing.to_bytes(q), "bytes"

    def _apply(self, fn, recurse: bool = True):
        return repacked(self, fn, recurse, super()._apply)

    def all_nibbles(self) -> torch.Tensor:
        return self.nibbles()

    def nibbles(self) -> torch.Tensor:
        """The stored 4-bit values (N, K), 0..15."""
        if self.layout == "vnni":
            return packing.from_vnni(self.packed[0])
        return stored_nibbles(self.packed, self.layout, self.out_features, self.in_features, self.group_size)

    def group_scales(self) -> torch.Tensor:
        """The bfloat16 scales and zeros as (K / gs, N, 2)."""
        return packing.scales_from_vnni(self.scales_zeros[0]) if self.layout == "vnni" else self.scales_zeros

    def bf16_weight_t(self) -> torch.Tensor:
        """W^T as (K, N) bfloat16 from the CPU layout, for prefill-sized inputs (a bf16 GEMM beats the int4
        kernel there); built block by block in the packed order, so every pass reads and writes contiguous memory."""
        N, K, gs = self.out_features, self.in_features, self.group_size
        B = packing.cpu_block_rows(N, K)
        sz = self.scales_zeros.view(K // gs, N // B, 1, B, 2).transpose(0, 1).contiguous()  # (N/B, K/gs, 1, B, 2)
        q = packing.cpu_blocks(self.packed, N, K).view(N // B, K // gs, gs, B).to(torch.bfloat16) - 8  # (N/B, K/gs, gs, B)
        w = torch.addcmul(sz[..., 1], q, sz[..., 0])  # (N / B, K / gs, gs, B)
        return w.reshape(N // B, K, B).transpose(0, 1).reshape(K, N)

    def dequantize(self) -> torch.Tensor:
        """The weights as stored (bfloat16 scales), (N, K), in float32."""
        sz = self.group_scales().float()  # (K / gs, N, 2)
        g = self.nibbles().float().view(self.out_features, -1, self.group_size)
        return ((g - 8) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.layout == "vnni" and x.dtype == torch.bfloat16:
            y = torch.ops.glmkit.int4_linear(x.reshape(-1, self.in_features).contiguous(), self.packed,
                                             self.scales_zeros, 0, self.group_size)  # (rows, N) float32
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        elif self.layout == "cpu" and x.dtype == torch.bfloat16:
            if rows >= PREFILL_ROWS_INT4 and packing.cpu_layout_known(self.out_features, self.in_features):
                y = x @ self.bf16_weight_t()  # prefill: bf16 GEMM
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), self.packed,
                                                               self.group_size, self.scales_zeros)
                y = y.view(*x.shape[:-1], self.out_features)
        elif self.layout == "cuda" and x.dtype == torch.bfloat16 and rows < PREFILL_ROWS_CUDA:
            y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, self.in_features).contiguous(), self.packed,
                                                   self.group_size, self.scales_zeros)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)


class StackedInt8(nn.Module):
    """Stacked expert weights (E, N, K) as int8 with per-row scales (E, N), each expert in int8_tiles where
    glmkit's CPU kernels run (`layout` "vnni", as Int8Linear): `linear(e, x)` runs expert e through glmkit's or
    torch's int8 kernel, `dequantize(e)` gives its weights; no float copy is kept."""

    bits = 8

    def __init__(self, q: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        N, K = q.shape[1:]
        q = q.to(torch.int8).contiguous()
        self.layout = "vnni" if cpu_kernels.fits(q.device, N, K) else "rows"
        self.register_buffer("q", int8_tiles(q) if self.layout == "vnni" else q)  # (E, N, K) or tiles
        self.register_buffer("scales", scales.float().contiguous())  # (E, N)
        self.register_buffer("scales_bf16", self.scales.to(torch.bfloat16))

    def rows(self, index=slice(None)) -> torch.Tensor:
        """Expert `index`'s int8 weights (N, K) (a slice: (E', N, K))."""
        return self.q[index] if self.layout == "rows" else tiles_to_rows(self.q[index])

    def _apply(self, fn, recurse: bool = True):
        return untiled_off_cpu(self, fn, recurse, super()._apply)

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "StackedInt8":
        flat = w.reshape(-1, w.shape[-1])  # (E N, K)
        return cls.from_rows(w.shape, lambda lo, hi: flat[lo:hi], w.device)

    @classmethod
    def from_rows(cls, shape: tuple[int, int, int], rows, device: torch.device | str = "cpu") -> "StackedInt8":
        """(E, N, K) experts given as rows(lo, hi) of their E N rows, quantized as Int8Linear.from_rows does."""
        E, N, K = shape
        q, scales = int8_rows((E * N, K), rows, device)
        return cls(q.view(E, N, K), scales.view(E, N))

    def dequantize(self, index=slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert `index` (an int, or a slice) -> (N, K) (or (E', N, K)) in `dtype`."""
        return self.rows(index).to(dtype) * self.scales[index][..., None].to(dtype)

    def linear(self, e, x: torch.Tensor) -> torch.Tensor:
        """x (n, K) through expert e -> (n, N)."""
        if self.layout == "vnni" and x.dtype == torch.bfloat16:
            return torch.ops.glmkit.int8_linear(x.contiguous(), self.q[e], self.scales[e]).to(x.dtype)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.shape[0] < PREFILL_ROWS and \
                self.q.shape[-1] % 16 == 0:
            return torch._weight_int8pack_mm(x, self.q[e], self.scales_bf16[e])
        return F.linear(x, self.dequantize(e, x.dtype))


class StackedInt4(nn.Module):
    """Stacked expert weights (E, N, K) as Int4Linear's asymmetric group-wise int4, w = (q - 8) * scale + zero per
    `group_size` columns. On CPU they are kept in the "vnni" layout of glmkit's own kernels (cpu_kernels: int8
    activations, integer dot products) where those run, else packed for torch's CPU int4 kernel; two values a
    byte elsewhere. `linear(e, x)` runs expert e, `dequantize(e)` gives its weights (as computed with)."""

    bits = 4

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
        """q (E, N, K) ints 0..15; scales and zeros (E, N, K / group_size)."""
        super().__init__()
        E, N, K = q.shape
        if K % group_size:
            raise GlmkitError(f"int4 experts need a group size ({group_size}) dividing the input size ({K}).")
        self.experts, self.out_features, self.in_features, self.group_size = E, N, K, group_size
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("scales_zeros", torch.empty(0, dtype=torch.bfloat16))  # as the layout wants them
        sz = torch.stack([scales.float().transpose(1, 2), zeros.float().transpose(1, 2)], dim=-1)  # (E, K / gs, N, 2)
        self._pack(q, sz.to(torch.bfloat16))

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int = 32) -> "StackedInt4":
        if w.shape[-1] % group_size:
            raise GlmkitError(f"int4 experts need a group size ({group_size}) dividing the input size ({w.shape[-1]}).")
        E, N, K = w.shape
        q = torch.empty(E, N, K, dtype=torch.uint8, device=w.device)  # (E, N, K)
        scales, zeros = (torch.empty(E, N, K // group_size, device=w.device) for _ in range(2))  # (E, N, K / gs)
        for e in range(E):  # expert by expert: float32 temporaries of one expert, not of the whole layer
            qe, scales[e], zeros[e] = int4_groups(w[e], group_size)
            q[e] = qe
        return cls(q, scales, zeros, group_size)

    def _pack(self, q: torch.Tensor, sz: torch.Tensor) -> None:
        """q (E, N, K) values and sz (E, K / gs, N, 2) bfloat16 -> the layout of q's device's kernel."""
        N, gs, cpu = self.out_features, self.group_size, q.device.type == "cpu"
        if cpu_kernels.fits(q.device, N, gs):
            E, K = q.shape[0], self.in_features
            self.packed = torch.empty(E, N // 16, K // 8, 16, 4, dtype=torch.uint8)  # filled expert by expert
            for e in range(E):
                self.packed[e] = packing.to_vnni(q[e])
            self.scales_zeros, self.layout = packing.scales_to_vnni(sz), "vnni"
        elif cpu and N % 16 == 0 and gs in (32, 64, 128, 256):
            self.packed = torch.stack([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q[e].to(torch.int32).contiguous(), 1) for e in range(q.shape[0])])
            self.scales_zeros, self.layout = sz.contiguous(), "cpu"
        else:
            self.packed, self.scales_zeros, self.layout = packing.to_bytes(q), sz.contiguous(), "bytes"

    def _apply(self, fn, recurse: bool = True):
        return repacked(self, fn, recurse, super()._apply)

    def all_nibbles(self) -> torch.Tensor:
        if self.layout == "vnni":
            return packing.from_vnni(self.packed)
        return torch.stack([self.nibbles(e) for e in range(self.experts)])  # (E, N, K)

    def nibbles(self, e: int) -> torch.Tensor:
        """Expert e's stored 4-bit values (N, K), 0..15."""
        if self.layout == "vnni":
            return packing.from_vnni(self.packed[e])
        return stored_nibbles(self.packed[e], self.layout, self.out_features, self.in_features, self.group_size)

    def group_scales(self, index=slice(None)) -> torch.Tensor:
        """The bfloat16 scales and zeros of expert `index` (an int or a slice) as (..., K / gs, N, 2)."""
        sz = self.scales_zeros[index]
        return packing.scales_from_vnni(sz) if self.layout == "vnni" else sz

    def dequantize(self, index=slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert `index` (an int, or a slice) -> (N, K) (or (E', N, K)) in `dtype`, with the bfloat16 scales."""
        if isinstance(index, slice):
            return torch.stack([self.dequantize(e, dtype) for e in range(self.experts)[index]])
        sz = self.group_scales(index).to(dtype)  # (K / gs, N, 2)
        g = self.nibbles(index).to(dtype).view(self.out_features, -1, self.group_size) - 8  # (N, K / gs, gs)
        return (g * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]).view(self.out_features, self.in_features)

    def linear(self, e, x: torch.Tensor) -> torch.Tensor:
        """x (n, K) through expert e -> (n, N)."""
        if x.dtype == torch.bfloat16 and x.shape[0] < PREFILL_ROWS_INT4:
            if self.layout == "vnni":
                y = torch.ops.glmkit.int4_linear(x.contiguous(), self.packed, self.scales_zeros, e, self.group_size)
                return y.to(x.dtype)
            if self.layout == "cpu":
                return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed[e], self.group_size,
                                                                  self.scales_zeros[e])
        return F.linear(x, self.dequantize(e, x.dtype))

    def swiglu_token(self, down: nn.Module, x: torch.Tensor, ids: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor | None:
        """One bfloat16 token x (1, C) through SwiGLU experts `ids` (k,) (these gate_up weights, then `down`),
        weighted by `weights` (1, k) and summed -> (1, C) float32, in one call of glmkit's fused kernel; None where
        that kernel does not apply."""
        if not (isinstance(down, StackedInt4) and self.layout == "vnni" and down.layout == "vnni"
                and x.dtype == torch.bfloat16 and down.in_features % 32 == 0):
            return None
        return torch.ops.glmkit.moe_int4_token(x.contiguous(), ids, weights, self.packed, self.scales_zeros,
                                               down.packed, down.scales_zeros, self.group_size, down.group_size)


class TiedInt8Embedding(nn.Module):
    """The token embedding served from an int8 output head that shares its weights (tied embeddings): rows
    are gathered and scaled, so the float table need not stay in memory beside the head. The head is held
    outside the module tree: its weights are saved, loaded and counted once, as the head's."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.__dict__["head"] = head  # not a submodule

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        head = self.__dict__["head"]
        return head.rows(tokens).to(self.dtype) * head.scales[tokens, None].to(self.dtype)  # (B, T, C)


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at the dotted `path` of model (e.g. 'layers.3.attn.qkv', 'lm_head', or a parameter such as
    'layers.3.mlp.experts.gate_up_proj')."""
    parent, _, child = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if child in owner._parameters:  # stacked expert weights: a parameter becomes a quantized module
        delattr(owner, child)
    setattr(owner, child, module)


def quantize_experts(w: torch.Tensor, bits: int, group_size: int = 32) -> nn.Module:
    """Stacked expert weights (E, N, K) -> StackedInt4 (int8 where the width does not fit the groups) or StackedInt8."""
    if bits == 4 and w.shape[-1] % group_size == 0:
        return StackedInt4.from_float(w, group_size)
    return StackedInt8.from_float(w)


def quantize_model(model: nn.Module, bits: int, group_size: int = 32, include_head: bool = True) -> nn.Module:
    """Swap every nn.Linear (attention, MLP and, with include_head, the output head) for a weight-only module.

    The output head stays int8 even for bits=4: it decides every token, and 4 bits there cost far more
    quality than they save (GGUF files keep it at 8 bits too); so do modules marked `int8_only` (GLM-5's
    indexer, whose top-k choice is discrete)."""
    if bits not in (4, 8):
        raise GlmkitError(f"quantize to 4 or 8 bits, not {bits}.")

    def make(w: torch.Tensor, bias, head: bool = False) -> nn.Module:
        try:
            if bits == 4 and not head:
                return Int4Linear.from_float(w, bias, group_size)
        except GlmkitError:
            pass  # a shape the int4 kernel cannot take: int8 serves it
        return Int8Linear.from_float(w, bias)

    for path, module in list(model.named_modules()):
        if path.split(".")[0] == "visual":  # a vision tower stays float (its cost is per image, not per token)
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and (child_name != "lm_head" or include_head):
                eight = child_name == "lm_head" or getattr(module, "int8_only", False)  # e.g. GLM-5's indexer
                setattr(module, child_name, make(child.weight.detach(), child.bias, eight))
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 3 and name.endswith("_proj"):  # stacked experts (E, N, K): a MoE layer
                replace_module(module, name, quantize_experts(param.detach(), bits, group_size))
    if include_head and getattr(model, "lm_head", False) is None and not getattr(model.embed, "sharded", False):
        # tied: one int8 table serves head and embedding (a tensor-parallel share of it stays float)
        dtype = model.embed.weight.dtype
        model.lm_head = make(model.embed.weight.detach(), None, head=True)
        model.embed = TiedInt8Embedding(model.lm_head, dtype)
    return model
