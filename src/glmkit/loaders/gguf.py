"""Read a GGUF file (llama.cpp's format; the container through gguf_file.py, the quantized types through the
`gguf` package): metadata -> ModelConfig, tensors through a declarative name table per architecture
('llama'; 'chatglm' for ChatGLM3 / GLM-4-9B; 'glm4' for GLM-4-0414), quantized types dequantized a few
rows at a time into the model's float dtype, or Q4_0 / Q4_1 kept as their 4-bit blocks and Q8_0 as its 8-bit ones.

llama.cpp's converter permuted the q/k rows of llama-architecture models for its interleaved rotary
layout; we keep those rows as they are and use interleaved rotary, which is the same maths (proven by
the parity tests). Nothing here builds a model or reads the tokenizer (see tokenizer.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmkit.config import ModelConfig
from glmkit.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from glmkit.loaders.gguf_file import GGUFFile
from glmkit.loaders.keymap import Target, map_tensors

L = r"(\d+)"
LLAMA = [
    (r"token_embd\.weight", "embed.weight"),
    (rf"blk\.{L}\.attn_norm\.weight", r"layers.\1.attn_norm.weight"),
    (rf"blk\.{L}\.attn_q\.(weight|bias)", Target(r"layers.\1.attn.qkv.\2", piece=0)),
    (rf"blk\.{L}\.attn_k\.(weight|bias)", Target(r"layers.\1.attn.qkv.\2", piece=1)),
    (rf"blk\.{L}\.attn_v\.(weight|bias)", Target(r"layers.\1.attn.qkv.\2", piece=2)),
    (rf"blk\.{L}\.attn_output\.(weight|bias)", r"layers.\1.attn.out.\2"),
    (rf"blk\.{L}\.ffn_norm\.weight", r"layers.\1.mlp_norm.weight"),
    (rf"blk\.{L}\.ffn_gate\.(weight|bias)", Target(r"layers.\1.mlp.in_proj.\2", piece=0)),
    (rf"blk\.{L}\.ffn_up\.(weight|bias)", Target(r"layers.\1.mlp.in_proj.\2", piece=1)),
    (rf"blk\.{L}\.ffn_down\.(weight|bias)", r"layers.\1.mlp.out_proj.\2"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "lm_head.weight"),
]
CHATGLM = [  # ChatGLM3 / GLM-4-9B as llama.cpp's converter writes them: the THUDM tensors, renamed, unpermuted
    (r"token_embd\.weight", "embed.weight"),
    (rf"blk\.{L}\.attn_norm\.weight", r"layers.\1.attn_norm.weight"),
    (rf"blk\.{L}\.attn_qkv\.(weight|bias)", r"layers.\1.attn.qkv.\2"),
    (rf"blk\.{L}\.attn_output\.weight", r"layers.\1.attn.out.weight"),
    (rf"blk\.{L}\.ffn_norm\.weight", r"layers.\1.mlp_norm.weight"),
    (rf"blk\.{L}\.ffn_up\.weight", r"layers.\1.mlp.in_proj.weight"),  # [gate; up], as dense_h_to_4h
    (rf"blk\.{L}\.ffn_down\.weight", r"layers.\1.mlp.out_proj.weight"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "lm_head.weight"),
]
GLM4 = CHATGLM + [  # GLM-4-0414: separate q/k/v and the two extra norms
    (rf"blk\.{L}\.attn_q\.(weight|bias)", Target(r"layers.\1.attn.qkv.\2", piece=0)),
    (rf"blk\.{L}\.attn_k\.(weight|bias)", Target(r"layers.\1.attn.qkv.\2", piece=1)),
    (rf"blk\.{L}\.attn_v\.(weight|bias)", Target(r"layers.\1.attn.qkv.\2", piece=2)),
    (rf"blk\.{L}\.post_attention_norm\.weight", r"layers.\1.attn_post_norm.weight"),
    (rf"blk\.{L}\.post_ffw_norm\.weight", r"layers.\1.mlp_post_norm.weight"),
]
TABLES = {"llama": LLAMA, "chatglm": CHATGLM, "glm4": GLM4}
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}


def open_gguf(path: str | Path) -> GGUFFile:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass the path of a .gguf file.")
    try:
        return GGUFFile(path)
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError on damaged files
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated "
                              "or corrupt, re-download it.") from None


def metadata(reader) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                           "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue  # large arrays: read on demand by the tokenizer
        try:
            out[key] = field.contents()
        except Exception:  # unusual field types we do not need
            continue
    return out


def config_from_metadata(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """shapes: each tensor's torch shape ([out, in] for weights)."""
    tensor_names = set(shapes)
    arch = meta.get("general.architecture")
    if arch not in TABLES:
        raise UnsupportedArchitectureError(f"GGUF architecture {arch!r} is not supported; glmkit reads "
                                           f"{', '.join(map(repr, TABLES))} GGUF files.")
    glm = arch != "llama"
    a = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    hidden, heads = int(a("embedding_length")), int(a("attention.head_count"))
    head_dim = int(a("attention.key_length", hidden // heads))
    if a("rope.scaling.type") not in (None, "none", "linear") or "rope_freqs.weight" in tensor_names:
        raise ConfigError(f"this GGUF uses rope scaling {a('rope.scaling.type')!r} or rope frequency factors, "
                          "which glmkit does not support yet.")
    rope_dims = int(a("rope.dimension_count", head_dim))
    if rope_dims != head_dim and not glm:
        raise ConfigError("this GGUF rotates only part of each head, which glmkit does not support for llama files.")
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return ModelConfig(
        vocab_size=int(shapes["token_embd.weight"][0]),
        hidden_size=hidden, intermediate_size=int(a("feed_forward_length")), num_layers=int(a("block_count")),
        num_heads=heads, num_kv_heads=int(a("attention.head_count_kv", heads)), head_dim=head_dim,
        norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        qkv_bias=bool({"blk.0.attn_q.bias", "blk.0.attn_qkv.bias"} & tensor_names),
        out_bias="blk.0.attn_output.bias" in tensor_names, mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        extra_norms="sandwich" if "blk.0.post_ffw_norm.weight" in tensor_names else "none",
        rope_layout="interleaved",  # GLM's own layout; for llama files, the converter's permuted q/k rows
        rope_fraction=rope_dims / head_dim, rope_theta=float(a("rope.freq_base", 10000.0)),
        rope_linear_factor=float(a("rope.scaling.factor", 1.0) or 1.0) if a("rope.scaling.type") == "linear" else 1.0,
        tie_embeddings="output.weight" not in tensor_names, max_seq_len=int(a("context_length", 2048)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))


CHUNK = 1 << 20  # elements dequantized at a time: float32 intermediates stay at a few MB whatever the tensor


def dequantize(tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One GGUF tensor -> a torch tensor of `dtype` in the nn.Linear layout [out, in]."""
    from gguf import quants

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(f"tensor {tensor.name!r} has GGUF type {kind}, which glmkit cannot read yet "
                              f"(supported: {', '.join(sorted(SUPPORTED_TYPES))}).")
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest-varying dimension first
    out = torch.empty(shape, dtype=dtype)
    rows, step = out.view(-1, shape[-1]), max(1, CHUNK // shape[-1])
    for lo in range(0, rows.shape[0], step):
        hi = min(lo + step, rows.shape[0])
        raw = tensor.rows(lo, hi)
        values = raw if kind in ("F32", "F16") else quants.dequantize(raw, tensor.tensor_type)
        rows[lo:hi] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return out


@dataclass
class Int4Blocks:
    """GGUF Q4_0 / Q4_1 weights kept as the file's bytes: w = (q - 8) * scale + zero per group of 32 inputs
    (torch's int4 layout). Q4_0: scale d, zero 0; Q4_1: scale d, zero m + 8d. Built into int4 modules by
    the caller instead of being dequantized, so a 4-bit file stays 4-bit in memory."""
    raw: np.ndarray  # (N, K / 32, 20) Q4_1 blocks (d, m, 16 bytes) or (N, K / 32, 18) Q4_0 blocks (d, 16 bytes)

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape[0], self.raw.shape[1] * 32

    @property
    def q41(self) -> bool:
        return self.raw.shape[-1] == 20

    @property
    def q(self) -> torch.Tensor:
        """(N, K) uint8 values 0..15: low nibbles hold values 0..15 of a block, high nibbles 16..31."""
        nibbles = self.raw[..., 4:20] if self.q41 else self.raw[..., 2:18]  # (N, K / 32, 16)
        return torch.from_numpy(np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(self.shape))

    @property
    def scales(self) -> torch.Tensor:  # (N, K / 32) float32
        return torch.from_numpy(self.raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))

    @property
    def zeros(self) -> torch.Tensor:  # (N, K / 32) float32
        if not self.q41:
            return torch.zeros(self.raw.shape[:2])
        return torch.from_numpy(self.raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)) + 8 * self.scales

    @staticmethod
    def cat(parts: list["Int4Blocks"]) -> "Int4Blocks":
        return Int4Blocks(np.concatenate([p.raw for p in parts]))


@dataclass
class Int8Rows:
    """GGUF Q8_0 weights kept as the file's bytes until they become an int8 module: one scale per block of 32
    inputs there, one per output row in Int8Linear, so the caller requantizes each row, reading a few rows
    at a time (no float copy of the whole matrix, which for a tied 49k-token table would double the load's
    peak memory)."""
    raw: np.ndarray  # (N, K / 32, 34) Q8_0 blocks: d (float16), 32 int8 values

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape[0], self.raw.shape[1] * 32

    @staticmethod
    def cat(parts: list["Int8Rows"]) -> "Int8Rows":
        return Int8Rows(np.concatenate([p.raw for p in parts]))

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) dequantized, (hi - lo, K) float32."""
        block = self.raw[lo:hi]  # (n, K / 32, 34)
        d = torch.from_numpy(block[..., 0:2].copy().view(np.float16).astype(np.float32))  # (n, K / 32, 1)
        return (torch.from_numpy(block[..., 2:].copy().view(np.int8)).float() * d).view(hi - lo, -1)


def int4_blocks(tensor) -> Int4Blocks:
    N, K = (int(n) for n in reversed(tensor.shape))
    return Int4Blocks(tensor.data.reshape(N, K // 32, -1))


def gguf_config(reader, path) -> ModelConfig:
    """The model configuration a GGUF file's metadata and tensor shapes describe."""
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{path} has no token_embd.weight tensor; it is not a complete model file.")
    return config_from_metadata(metadata(reader), shapes)


def load_gguf(path: str | Path, keep_int4: bool = False, reader=None, dtype: torch.dtype = torch.float32,
              keep_int8: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    """keep_int4: Q4_0 / Q4_1 linear weights come back as Int4Blocks instead of float tensors; keep_int8: Q8_0
    linear weights (and the output head, or a tied embedding, which the int8 head then serves) as Int8Rows;
    the others come in `dtype`. reader: the file's GGUFFile when the caller has opened it already."""
    reader = reader if reader is not None else open_gguf(path)
    config = gguf_config(reader, path)
    linear = lambda name: name.startswith("blk.") and not name.endswith(("norm.weight", ".bias"))  # noqa: E731
    head = ("output.weight", "token_embd.weight") if config.tie_embeddings else ("output.weight",)

    def reader_of(t):
        kind = t.tensor_type.name
        if keep_int4 and kind in ("Q4_0", "Q4_1") and t.name.startswith("blk."):
            return lambda: int4_blocks(t)
        if keep_int8 and kind == "Q8_0" and (linear(t.name) or t.name in head):
            N, K = (int(n) for n in reversed(t.shape))
            return lambda: Int8Rows(t.data.reshape(N, K // 32, 34))
        return lambda: dequantize(t, dtype)

    named = ((t.name, Path(path).name, reader_of(t)) for t in reader.tensors)
    return (config, *map_tensors(TABLES[reader.fields["general.architecture"].contents()], named, config))
