"""Where an int4 weight's 4-bit values live: one layout per device kernel, packing into it and reading back.

Layouts of an (N, K) matrix of values 0..15:
- "cpu": torch's CPU packing (`_convert_weight_to_int4pack_for_cpu`), (N, K / 2) uint8, for
  `_weight_int4pack_mm_for_cpu`; read back directly in blocks of 64 rows (32 where torch's kernel uses
  AVX2; checked once per shape).
- "cuda": torch's CUDA tinygemm packing (`_convert_weight_to_int4pack`), (N / 8, K / (16 t), 32, t / 2) int32
  with t inner k-tiles, for `_weight_int4pack_mm` (Ampere or newer); read back from the layout its packing
  kernel writes, checked once per shape against the op itself.
- "vnni": glmkit's own CPU kernels (kernels/quant.cpp, AVX-512 VNNI or AVX2), (N / 16, K / 8, 16, 4) uint8:
  tiles of 16 rows; byte (r, j) of chunk c holds columns 8 c + j (low nibble) and 8 c + 4 + j (high) of row
  r; the scales and zeros as (N / 16, K / group, 2, 16), each tile's 16 scales then its 16 zeros per group.
- "bytes": two values per byte, the even column in the low nibble, (N, K / 2) uint8: devices without a
  kernel (and glmkit's checkpoint format).
All kernels dequantize w = (q - 8) * scale + zero with bfloat16 scales_zeros, (K / group, N, 2) but in "vnni". No
modules here: Int4Linear (glmkit.quant) picks the layout for its device.
"""

from __future__ import annotations

import functools

import torch


def to_bytes(q: torch.Tensor) -> torch.Tensor:
    """(..., N, K) values 0..15 -> (..., N, K / 2) uint8, even column in the low nibble."""
    q = q.to(torch.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def from_bytes(packed: torch.Tensor) -> torch.Tensor:
    """(..., N, K / 2) uint8 -> (..., N, K) values 0..15."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(*packed.shape[:-1], -1)


# ------------------------------------------------------------------------------------------------ CPU
def cpu_block_rows(N: int, K: int) -> int | None:
    """The rows in a block of torch's CPU int4 packing of an (N, K) weight (64 where torch's kernel uses AVX-512,
    32 with AVX2) when it is the layout cpu_blocks reads (byte (block, k, i) holds row B block + i in its low
    nibble and row B block + B / 2 + i in its high one); None when it is neither. Checked once per width on two
    blocks of rows (the packing repeats block by block; a full-size check of a large layer would cost tens of MB)."""
    return next((rows for rows in (64, 32) if N % rows == 0 and _cpu_probe(min(N, 2 * rows), K, rows)), None)


def cpu_layout_known(N: int, K: int) -> bool:
    return cpu_block_rows(N, K) is not None


@functools.lru_cache(maxsize=None)
def _cpu_probe(N: int, K: int, rows: int) -> bool:
    for q in _position_codes(N, K, torch.device("cpu")):
        blocks = cpu_blocks(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1), N, K, rows)
        if not torch.equal(blocks.transpose(1, 2).reshape(N, K), q):
            return False
    return True


def _position_codes(N: int, K: int, device: torch.device):
    """(N, K) uint8 matrices of 4-bit digits of each element's position: together they name every element,
    so a layout that reads all of them back correctly reads any matrix back correctly."""
    pos = torch.arange(N * K, dtype=torch.int32, device=device).view(N, K)
    for shift in range(0, max(N * K - 1, 1).bit_length(), 4):
        yield ((pos >> shift) & 15).to(torch.uint8)


def cpu_blocks(packed: torch.Tensor, N: int, K: int, rows: int | None = None) -> torch.Tensor:
    """torch's CPU int4 packing (N, K / 2) -> the values as (N / B, K, B) uint8, 0..15, B = `rows` or
    cpu_block_rows(N, K) (the layout must be known): each block is then a K x B slice of W^T."""
    B = rows or cpu_block_rows(N, K)
    packed = packed.view(N // B, K, 1, B // 2)
    return torch.cat([packed & 0x0F, packed >> 4], dim=2).view(N // B, K, B)


# ----------------------------------------------------------------------------------------- glmkit's CPU
def to_vnni(q: torch.Tensor) -> torch.Tensor:
    """(..., N, K) values 0..15 -> (..., N / 16, K / 8, 16, 4) uint8, the "vnni" layout."""
    *lead, N, K = q.shape
    v = q.to(torch.uint8).view(*lead, N // 16, 16, K // 8, 2, 4).transpose(-4, -3)  # (..., N/16, K/8, 16, 2, 4)
    return (v[..., 0, :] | (v[..., 1, :] << 4)).contiguous()


def from_vnni(packed: torch.Tensor) -> torch.Tensor:
    """(..., N / 16, K / 8, 16, 4) uint8 -> (..., N, K) values 0..15."""
    *lead, T, C, _, _ = packed.shape
    v = torch.stack([packed & 0x0F, packed >> 4], dim=-2)  # (..., N/16, K/8, 16, 2, 4)
    return v.transpose(-4, -3).reshape(*lead, T * 16, C * 8)


def scales_to_vnni(sz: torch.Tensor) -> torch.Tensor:
    """(..., K / group, N, 2) -> (..., N / 16, K / group, 2, 16)."""
    *lead, G, N, _ = sz.shape
    return sz.view(*lead, G, N // 16, 16, 2).permute(*range(len(lead)), -3, -4, -1, -2).contiguous()


def scales_from_vnni(sz: torch.Tensor) -> torch.Tensor:
    """(..., N / 16, K / group, 2, 16) -> (..., K / group, N, 2)."""
    *lead, T, G, _, _ = sz.shape
    return sz.permute(*range(len(lead)), -3, -4, -1, -2).reshape(*lead, G, T * 16, 2)


# ----------------------------------------------------------------------------------------------- CUDA
def cuda_inner_k_tiles(K: int) -> int | None:
    """The most k-tiles of 16 (8, 4 or 2) the CUDA packing can put side by side for width K, or None."""
    return next((t for t in (8, 4, 2) if K % (16 * t) == 0), None)


def pack_cuda(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 on a CUDA device -> torch's tinygemm packing. The op takes two values per byte with
    the even column in the high nibble."""
    q = q.to(torch.uint8)
    pairs = ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()  # (N, K / 2)
    return torch.ops.aten._convert_weight_to_int4pack(pairs, cuda_inner_k_tiles(q.shape[1]))


def cuda_values(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """torch's tinygemm packing -> (N, K) values 0..15, from the layout its packing kernel writes: int32
    [n / 8][k / 16t][lane][j] holds, for row 8 n_tile + lane / 4, bytes b_i (i = 0..3) of the paired input at
    8 (t k_outer + 2 j) + {0, 4, 8, 12}[i] + lane % 4; bits 4i..4i+3 are b_i's high nibble (even column),
    bits 16+4i.. its low one (odd column). In columns: 16 (t k_outer + 2 j + a) + 8 c + 2 (lane % 4) + h for
    i = 2a + c and h = 0 (high) / 1 (low)."""
    t = packed.shape[-1] * 2
    words = packed.view(N // 8, K // (16 * t), 32, t // 2)  # (n_tile, k_outer, lane, j)
    nib = torch.stack([(words >> (4 * b)) & 15 for b in range(8)], dim=-1)  # (n_tile, k_outer, lane, j, 8): b = 4h + 2a + c
    nib = nib.view(N // 8, K // (16 * t), 8, 4, t // 2, 2, 2, 2)  # (n_tile, k_outer, lane/4, lane%4, j, h, a, c)
    return nib.permute(0, 2, 1, 4, 6, 7, 3, 5).reshape(N, K).to(torch.uint8)  # rows (n_tile, lane/4); cols (k_outer, j, a, c, lane%4, h)


def cuda_layout_known(device: torch.device, N: int, K: int) -> bool:
    """Whether cuda_values reads torch's CUDA packing of an (N, K) weight back exactly: checked on the device
    once per width on 64 rows (the packing repeats every 8 rows)."""
    return N % 8 == 0 and _cuda_probe(device, min(N, 64), K)


@functools.lru_cache(maxsize=None)
def _cuda_probe(device: torch.device, N: int, K: int) -> bool:
    return all(torch.equal(cuda_values(pack_cuda(q), N, K), q) for q in _position_codes(N, K, device))


@functools.lru_cache(maxsize=None)
def cuda_kernel_works(device: torch.device) -> bool:
    """Whether torch's CUDA int4 kernel runs on this device (Ampere or newer) and computes
    x @ ((q - 8) * scale + zero)^T, the dequantization glmkit stores weights for: one small check per device."""
    try:
        N, K, gs = 64, 256, 32
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8).to(device)
        sz = (torch.rand(K // gs, N, 2, generator=g) - 0.5).to(device=device, dtype=torch.bfloat16)  # (K / gs, N, 2)
        x = torch.randn(3, K, generator=g).to(device=device, dtype=torch.bfloat16)
        w = (q.float().view(N, K // gs, gs) - 8) * sz[..., 0].T.float()[..., None] + sz[..., 1].T.float()[..., None]
        expected = x.float() @ w.view(N, K).T  # (3, N)
        got = torch.ops.aten._weight_int4pack_mm(x, pack_cuda(q), gs, sz).float()
        return bool(torch.allclose(got, expected, rtol=2e-2, atol=5e-2 * expected.abs().max().item()))
    except Exception:  # noqa: BLE001 - any failure (old GPU, build without the kernel) means: no kernel here
        return False
