"""Read a GGUF file (llama.cpp's format; the container through gguf_file.py, the quantized types through the
`gguf` package): metadata -> ModelConfig, tensors under the file's names (layouts.py holds the module table
per architecture: 'llama'; 'chatglm' for ChatGLM3 / GLM-4-9B; 'glm4' for GLM-4-0414), quantized types dequantized a few
rows at a time into the model's float dtype, or kept as the file's blocks for quantized modules: Q4_0 / Q4_1 /
Q4_K (exactly group-wise int4) and the other quantized types (requantized to int8 rows by the caller).

llama.cpp's converter permuted the q/k rows of llama-architecture models for its interleaved rotary
layout; we keep those rows as they are and use interleaved rotary, which is the same maths (proven by
the parity tests). Nothing here builds a model or reads the tokenizer (see tokenizer.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from glmkit.config import ModelConfig
from glmkit.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from glmkit.loaders.gguf_file import GGUFFile
from glmkit.loaders.layouts import GGUF_LAYOUTS

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
    if arch not in GGUF_LAYOUTS:
        raise UnsupportedArchitectureError(f"GGUF architecture {arch!r} is not supported; glmkit reads "
                                           f"{', '.join(map(repr, GGUF_LAYOUTS))} GGUF files.")
    glm = arch != "llama"
    a = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    missing = [f"{arch}.{k}" for k in ("embedding_length", "attention.head_count", "feed_forward_length",
                                       "block_count") if not isinstance(a(k), int)]
    if missing:
        raise CheckpointError(f"this GGUF's metadata lacks {', '.join(missing)}; the file is incomplete or was not "
                              "written by llama.cpp's converter.")
    hidden, heads = int(a("embedding_length")), int(a("attention.head_count"))
    head_dim = int(a("attention.key_length", hidden // heads))
    if a("rope.scaling.type") not in (None, "none", "linear") or "rope_freqs.weight" in tensor_names:
        raise ConfigError(f"this GGUF uses rope scaling {a('rope.scaling.type')!r} or rope frequency factors, "
                          "which glmkit does not support yet.")
    rope_dims = int(a("rope.dimension_count", head_dim))
    if rope_dims != head_dim and not glm:
        raise ConfigError("this GGUF rotates only part of each head, which glmkit does not support for llama files.")
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    moe = _moe_fields(a, tensor_names, arch) if arch in ("glm4moe", *MLA_ARCHS) else {}
    layers = int(a("block_count")) - moe.get("mtp_layers", 0)
    mla = _mla_fields(a, tensor_names, arch, layers) if arch in MLA_ARCHS else {}
    if mla:
        head_dim = rope_dims = mla["mla"].qk_rope_head_dim
    return ModelConfig(
        vocab_size=int(shapes["token_embd.weight"][0]),
        hidden_size=hidden, intermediate_size=int(a("feed_forward_length")), num_layers=layers,
        num_heads=heads, num_kv_heads=heads if mla else int(a("attention.head_count_kv", heads)), head_dim=head_dim,
        norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        qkv_bias=bool({"blk.0.attn_q.bias", "blk.0.attn_qkv.bias", "blk.0.attn_kv_a_mqa.bias"} & tensor_names),
        out_bias="blk.0.attn_output.bias" in tensor_names, mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        extra_norms="sandwich" if "blk.0.post_ffw_norm.weight" in tensor_names else "none",
        # GLM's own layout (for llama files, the converter's permuted q/k rows); glm4moe rotates NeoX-style
        rope_layout="half_split" if moe and not mla else "interleaved",
        rope_fraction=rope_dims / head_dim, rope_theta=float(a("rope.freq_base", 10000.0)),
        rope_linear_factor=float(a("rope.scaling.factor", 1.0) or 1.0) if a("rope.scaling.type") == "linear" else 1.0,
        tie_embeddings="output.weight" not in tensor_names, max_seq_len=int(a("context_length", 2048)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"), **moe, **mla)


MLA_ARCHS = ("deepseek2", "glm-dsa")  # GLM-4.7-Flash, GLM-5 as llama.cpp's converter writes them
SPLIT_KV_B = (".attn_k_b.weight", ".attn_v_b.weight")  # read as floats: joined into kv_b
GATING = {1: "softmax", 2: "sigmoid"}  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_*


def _mla_fields(a, tensor_names: set[str], arch: str, layers: int) -> dict[str, Any]:
    """deepseek2 / glm-dsa latent-attention keys -> the mla sub-config (rotary on adjacent pairs, as llama.cpp
    runs these architectures). Newer files give the per-head sizes in key_length_mla / value_length_mla."""
    from glmkit.config import MLAConfig

    rope = int(a("rope.dimension_count"))
    key, value = a("attention.key_length_mla"), a("attention.value_length_mla")
    if key is None:  # older files: key_length and value_length were the per-head sizes
        key, value = a("attention.key_length"), a("attention.value_length")
    types, q_lora = a("attention.indexer.types"), a("attention.q_lora_rank")
    dsa = arch == "glm-dsa"
    return {"mla": MLAConfig(
        kv_lora_rank=int(a("attention.kv_lora_rank")), qk_nope_head_dim=int(key) - rope, qk_rope_head_dim=rope,
        v_head_dim=int(value), q_lora_rank=None if q_lora is None else int(q_lora),
        rope_interleave=True, index_topk=int(a("attention.indexer.top_k")) if dsa else 0,
        index_heads=int(a("attention.indexer.head_count", 0)) if dsa else 0,
        index_head_dim=int(a("attention.indexer.key_length", 0)) if dsa else 0,
        indexer_types=tuple("full" if t else "shared" for t in types[:layers]) if dsa and types else ())}


def _moe_fields(a, tensor_names: set[str], arch: str) -> dict[str, Any]:
    """The expert keys of glm4moe / deepseek2 / glm-dsa files -> moe / qk_norm / mtp_layers fields. The gating
    function is the file's: deepseek2 files without the key mean softmax (what llama.cpp then runs)."""
    import warnings

    from glmkit.config import MoEConfig

    gating = GATING.get(a("expert_gating_func", 1 if arch == "deepseek2" else 2))
    if gating is None:
        raise ConfigError(f"this GGUF gates its experts with function {a('expert_gating_func')}; glmkit runs sigmoid "
                          "(2) and softmax (1).")
    if gating == "softmax" and any(n.endswith("exp_probs_b.bias") for n in tensor_names):
        warnings.warn("this GGUF gates its experts with softmax but carries a sigmoid router's correction bias: GLM "
                      "models are trained with sigmoid gating (early GLM-4.7-Flash conversions wrote softmax by "
                      "mistake); glmkit runs what the file says. A corrected file will answer better.", stacklevel=4)
    moe = MoEConfig(scoring=gating, num_experts=int(a("expert_count")), experts_per_token=int(a("expert_used_count")),
                    expert_size=int(a("expert_feed_forward_length")), shared_experts=int(a("expert_shared_count", 0)),
                    first_dense_layers=int(a("leading_dense_block_count", 0)),
                    groups=int(a("expert_group_count", 1) or 1), topk_groups=int(a("expert_group_used_count", 1) or 1),
                    norm_topk_prob=bool(a("expert_weights_norm", True)),
                    routed_scaling_factor=float(a("expert_weights_scale", 1.0) or 1.0))
    return {"moe": moe, "qk_norm": "blk.0.attn_q_norm.weight" in tensor_names,
            "mtp_layers": int(a("nextn_predict_layers", 0) or 0)}


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


class PackedRows:
    """A GGUF tensor kept as the file's bytes, `raw` (N rows, ...), until a quantized module is built from it.
    Subclasses give `shape` and `rows(lo, hi)`: rows [lo, hi) dequantized to float32. Pieces of one weight
    (llama's q / k / v) concatenate with `cat` when of one kind, else become float (`to_float`)."""
    raw: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def layout(self) -> tuple:
        """Pieces of one layout concatenate row-wise (same class, block size and GGUF type)."""
        return type(self).__name__, self.raw.shape[1:], getattr(self, "kind", None)

    @classmethod
    def cat(cls, parts: list["PackedRows"], dim: int = 0):
        return replace(parts[0], raw=np.concatenate([p.raw for p in parts]))

    def to_float(self, dtype: torch.dtype) -> torch.Tensor:
        N, K = self.shape
        out, step = torch.empty(N, K, dtype=dtype), max(1, CHUNK // K)
        for lo in range(0, N, step):
            out[lo: lo + step] = self.rows(lo, min(lo + step, N))
        return out


@dataclass
class Int4Blocks(PackedRows):
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

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        part = replace(self, raw=self.raw[lo:hi])
        n, K = part.shape
        return ((part.q.float().view(n, -1, 32) - 8) * part.scales[..., None] + part.zeros[..., None]).view(n, K)


@dataclass
class Q4KBlocks(Int4Blocks):
    """GGUF Q4_K super-blocks of 256 inputs: 8 groups of 32, each w = d sc q - dmin m with 6-bit sc and m, so
    exactly group-wise int4: scale d sc, zero 8 d sc - dmin m."""
    raw: np.ndarray  # (N, K / 256, 144): d, dmin (float16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape[0], self.raw.shape[1] * 256

    @functools.cached_property
    def _scale_min(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K / 32) float32 each: the group scales d sc and mins dmin m."""
        d = self.raw[..., 0:2].copy().view(np.float16).astype(np.float32)  # (N, S, 1)
        dmin = self.raw[..., 2:4].copy().view(np.float16).astype(np.float32)  # (N, S, 1)
        packed = self.raw[..., 4:16].reshape(*self.raw.shape[:2], 3, 4)  # (N, S, 3, 4)
        a, b, c = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]  # (N, S, 4) each
        sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)  # (N, S, 8) 6-bit scales
        mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)  # (N, S, 8) 6-bit mins
        N = self.raw.shape[0]
        return (torch.from_numpy(d * sc.astype(np.float32)).view(N, -1),
                torch.from_numpy(dmin * mn.astype(np.float32)).view(N, -1))

    @property
    def q(self) -> torch.Tensor:
        """(N, K) values 0..15: each 32 bytes hold two groups, the first in the low nibbles."""
        qs = self.raw[..., 16:].reshape(*self.raw.shape[:2], 4, 1, 32)  # (N, S, 4, 1, 32)
        return torch.from_numpy(np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(self.shape))

    @property
    def scales(self) -> torch.Tensor:
        return self._scale_min[0]

    @property
    def zeros(self) -> torch.Tensor:
        scale, minimum = self._scale_min
        return 8 * scale - minimum


@dataclass
class Int8Rows(PackedRows):
    """Any other quantized GGUF weight (Q8_0, Q5_*, Q6_K, ...) kept as the file's bytes until it becomes an int8
    module: the caller requantizes each row to one scale, reading a few rows at a time (no float copy of the
    whole matrix, which for a tied 49k-token table would double the load's peak memory)."""
    raw: np.ndarray  # (N, bytes per row)
    kind: Any  # the GGUF quantization type
    K: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape[0], self.K

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        from gguf import quants

        return torch.from_numpy(np.ascontiguousarray(quants.dequantize(self.raw[lo:hi], self.kind), np.float32))


@dataclass
class StackedBlocks:
    """A MoE layer's stacked experts (E, N, K) kept as the file's bytes (`blocks`: Int4Blocks or Int8Rows of E N
    rows), which become a StackedInt4 or StackedInt8 module; gate and up join along each expert's rows (dim 1)."""
    blocks: Any
    experts: int

    @property
    def shape(self) -> tuple[int, int, int]:
        rows, K = self.blocks.shape
        return self.experts, rows // self.experts, K

    @property
    def layout(self) -> tuple:
        return ("stacked", *self.blocks.layout)

    @classmethod
    def cat(cls, parts: list["StackedBlocks"], dim: int = 1):
        E = parts[0].experts
        raw = np.concatenate([p.blocks.raw.reshape(E, -1, *p.blocks.raw.shape[1:]) for p in parts], axis=dim)
        return cls(replace(parts[0].blocks, raw=raw.reshape(-1, *raw.shape[2:])), E)

    def to_float(self, dtype: torch.dtype) -> torch.Tensor:
        return self.blocks.to_float(dtype).view(self.shape)


def int4_blocks(tensor) -> Int4Blocks | StackedBlocks:
    *experts, N, K = (int(n) for n in reversed(tensor.shape))
    rows = N * (experts[0] if experts else 1)
    if tensor.tensor_type.name == "Q4_K":
        blocks = Q4KBlocks(tensor.data.reshape(rows, K // 256, 144))
    else:
        blocks = Int4Blocks(tensor.data.reshape(rows, K // 32, -1))
    return StackedBlocks(blocks, experts[0]) if experts else blocks


def gguf_config(reader, path) -> ModelConfig:
    """The model configuration a GGUF file's metadata and tensor shapes describe."""
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{path} has no token_embd.weight tensor; it is not a complete model file.")
    return config_from_metadata(metadata(reader), shapes)


def named_tensors(reader: GGUFFile, config: ModelConfig, keep_int4: bool = False, keep_int8: bool = False,
                  dtype: torch.dtype = torch.float32):
    """(name, file, loader) for every tensor. keep_int4: Q4_0 / Q4_1 / Q4_K linear weights come back as Int4Blocks
    (exactly int4) instead of float tensors; keep_int8: other quantized linear weights (and the output head, or a
    tied embedding, which the int8 head then serves) as Int8Rows; the others come in `dtype`."""
    linear = lambda name: name.startswith("blk.") and not name.endswith(("norm.weight", ".bias"))  # noqa: E731
    head = ("output.weight", "token_embd.weight") if config.tie_embeddings else ("output.weight",)

    def reader_of(t):
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES or ".ffn_gate_inp." in t.name or t.name.endswith(SPLIT_KV_B):
            return lambda: dequantize(t, dtype)  # routers come as floats (or an error naming the type)
        if keep_int4 and kind in ("Q4_0", "Q4_1", "Q4_K") and t.name.startswith("blk."):
            return lambda: int4_blocks(t)  # stacked experts too: they become StackedInt4 modules
        if len(t.shape) == 3 and keep_int8 and kind not in ("F32", "F16", "BF16"):  # stacked experts, 8-bit
            E, K = int(t.shape[2]), int(t.shape[0])
            return lambda: StackedBlocks(Int8Rows(t.rows(0, t.n_rows), t.tensor_type, K), E)
        if len(t.shape) != 2:
            return lambda: dequantize(t, dtype)
        if keep_int8 and kind not in ("F32", "F16", "BF16") and (linear(t.name) or t.name in head):
            return lambda: Int8Rows(t.rows(0, t.n_rows), t.tensor_type, int(t.shape[0]))
        return lambda: dequantize(t, dtype)

    tensors = [(t.name, reader.path.name, reader_of(t)) for t in reader.tensors]
    return _join_kv_b(tensors) if config.mla is not None else iter(tensors)


def _join_kv_b(tensors: list) -> Iterator[tuple]:
    """Newer deepseek2 / glm-dsa files split each kv_b into attn_k_b (H, L, N: transposed for llama.cpp's absorbed
    step) and attn_v_b (H, V, L); glmkit keeps the one kv_b (H*(N+V), L): the pieces are joined back, in float."""
    by_name = {name: (file, load) for name, file, load in tensors}
    for name, file, load in tensors:
        if name.endswith(".attn_v_b.weight"):
            continue
        if not name.endswith(".attn_k_b.weight"):
            yield name, file, load
            continue
        v_name = name.replace(".attn_k_b.", ".attn_v_b.")
        if v_name not in by_name:
            raise CheckpointError(f"this GGUF has {name} but no {v_name}; the file is incomplete.")

        def joined(k_load=load, v_load=by_name[v_name][1]) -> torch.Tensor:
            k_b, v_b = k_load(), v_load()  # (H, L, N), (H, V, L)
            kv = torch.cat((k_b.transpose(1, 2), v_b), dim=1)  # (H, N+V, L)
            return kv.reshape(-1, kv.shape[-1])  # (H*(N+V), L)
        yield name.replace(".attn_k_b.", ".attn_kv_b."), file, joined



def stored_quantization(reader: GGUFFile) -> str | None:
    """'int4' / 'int8' for a GGUF whose linear weights are 4-bit / 8-bit quantized, else None."""
    kinds = [t.tensor_type.name for t in reader.tensors if t.name.endswith("ffn_down.weight")]
    if kinds and all(k.startswith(("Q4", "Q5", "Q6", "Q2", "Q3", "IQ")) for k in kinds):
        return "int4"
    if kinds and all(k == "Q8_0" for k in kinds):
        return "int8"
    return None


SAMPLING_KEYS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "penalty_repeat": "repetition_penalty"}  # llama.cpp's general.sampling.* -> generation_config's


def sampling_settings(reader: GGUFFile) -> dict[str, float]:
    """The authors' sampling settings a GGUF carries (general.sampling.*, as llama.cpp reads them), spelled as
    generation_config.json spells them; {} when it carries none."""
    out = {}
    for key, name in SAMPLING_KEYS.items():
        field = reader.fields.get(f"general.sampling.{key}")
        if field is not None and isinstance(field.contents(), (int, float)):
            out[name] = field.contents()
    return out


def special_strings(reader: GGUFFile) -> dict[str, str]:
    """bos_token / eos_token as text, as a tokenizer_config.json would give them to a chat template."""
    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields:
        return {}
    tokens = fields["tokenizer.ggml.tokens"].contents()
    out = {}
    for key in ("bos", "eos"):
        index = fields.get(f"tokenizer.ggml.{key}_token_id")
        if index is not None and 0 <= int(index.contents()) < len(tokens):
            out[f"{key}_token"] = tokens[int(index.contents())]
    return out
