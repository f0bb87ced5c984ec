"""Weight-only int8 / int4: modules against the float reference, the fast kernels against the portable
path, and whole quantized models decoding exactly like their own reference path."""

from __future__ import annotations

import pytest
import torch

import glmkit
from conftest import LLAMA_CONFIGS, make_hf_model
from glmkit.quant import Int4Linear, Int8Linear, cpu_kernels, quantize_model
from test_engine import naive_greedy


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("cls,kw,bound", [(Int8Linear, {}, 0.01), (Int4Linear, {"group_size": 32}, 0.12),
                                          (Int4Linear, {"group_size": 128}, 0.15)])
def test_module_against_float(cls, kw, bound):
    torch.manual_seed(0)
    w, b, x = torch.randn(384, 256), torch.randn(384), torch.randn(5, 70, 256)
    m = cls.from_float(w, b, **kw)
    ref = torch.nn.functional.linear(x, w, b)
    assert rel(m(x), ref) < bound  # float32 activations: the portable dequantize-then-matmul path
    fast = m(x.bfloat16())  # bfloat16 activations, 350 rows: a bf16 GEMM on the dequantized weights (prefill)
    assert fast.dtype == torch.bfloat16 and fast.shape == (5, 70, 384)
    exact = torch.nn.functional.linear(x, m.dequantize(), b)
    assert rel(fast, exact) < 0.01  # exactly the stored weights, up to bfloat16
    few = m(x[:1, :3].bfloat16())  # 3 rows (decode): torch's packed CPU kernel
    assert rel(few, exact[:1, :3]) < 0.01
    assert rel(m.dequantize(), w) < bound


def test_int4_nibbles_read_torch_cpu_packing(monkeypatch):
    """nibbles() reads torch's CPU int4 packing directly (blocks of 64 rows with AVX-512, 32 with AVX2); it must
    equal what the packed kernel itself computes on the identity matrix (scale 1, zero 8)."""
    from glmkit.quant.int4_packing import cpu_block_rows

    monkeypatch.setitem(cpu_kernels._state, "ops", False)  # torch's layout, not glmkit's kernels' one
    m = Int4Linear.from_float(torch.randn(192, 96), group_size=32)
    assert m.layout == "cpu" and cpu_block_rows(192, 96) in (64, 32)
    eye = torch.eye(96, dtype=torch.bfloat16)
    unit = torch.empty_like(m.scales_zeros)
    unit[..., 0], unit[..., 1] = 1.0, 8.0
    by_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, m.packed, 32, unit).T.round().to(torch.uint8)
    assert torch.equal(m.nibbles(), by_kernel)


def tinygemm_pack_by_the_kernels_loop(q: torch.Tensor, t: int) -> torch.Tensor:
    """torch's CUDA int4 packing (aten/src/ATen/native/cuda/int4mm.cu, matrix_to_m16n8k16_Bint4_layout for
    NVIDIA) transcribed loop for loop: each of 32 lanes of block (k_outer, n_tile) writes one int32 per pair of
    inner k-tiles. Slow, independent of glmkit's vectorised reader, and usable without a GPU."""
    N, K = q.shape
    pairs = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.int64)  # the op's input: even column in the high nibble
    out = torch.zeros(N // 8, K // (16 * t), 32, t // 2, dtype=torch.int64)
    for n_tile in range(N // 8):
        for k_outer in range(K // (16 * t)):
            for lane in range(32):
                for inner in range(0, t, 2):
                    n0 = n_tile * 8 + lane // 4
                    base0 = (k_outer * t + inner) * 16 // 2
                    base1 = base0 + 16 // 2
                    ks = [base0 + lane % 4, base0 + lane % 4 + 4, base1 + lane % 4, base1 + lane % 4 + 4]
                    v = [int(pairs[n0, k]) for k in ks]
                    out[n_tile, k_outer, lane, inner // 2] = (
                        ((v[3] & 0xF) << 28) | ((v[2] & 0xF) << 24) | ((v[1] & 0xF) << 20) | ((v[0] & 0xF) << 16)
                        | ((v[3] & 0xF0) << 8) | ((v[2] & 0xF0) << 4) | (v[1] & 0xF0) | ((v[0] & 0xF0) >> 4))
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # the kernel's int32 words


@pytest.mark.parametrize("N,K", [(16, 64), (8, 128), (24, 96)])
def test_cuda_int4_layout_reader(N, K):
    """cuda_values (which turns the GPU's tinygemm packing back into values, for dequantized prefill, saving
    and moving back to the CPU) against the packing kernel's own loop, for each inner k-tile count."""
    from glmkit.quant.int4_packing import cuda_inner_k_tiles, cuda_values

    q = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(N + K), dtype=torch.uint8)
    t = cuda_inner_k_tiles(K)
    assert t == {64: 4, 128: 8, 96: 2}[K]
    assert torch.equal(cuda_values(tinygemm_pack_by_the_kernels_loop(q, t), N, K), q)


def test_int4_bytes_layout_is_the_portable_path():
    """Devices without an int4 kernel keep two values per byte and dequantize: same outputs as the CPU
    kernel's layout, exactly in float32."""
    from glmkit.quant.int4_packing import to_bytes

    torch.manual_seed(0)
    m = Int4Linear.from_float(torch.randn(128, 96), torch.randn(128), group_size=32)
    x = torch.randn(2, 3, 96)
    expected, q = m(x), m.nibbles()
    m.packed, m.scales_zeros, m.layout = to_bytes(q), m.group_scales(), "bytes"
    assert torch.equal(m.nibbles(), q)
    assert torch.equal(m(x), expected)
    assert rel(m(x.bfloat16()), expected) < 0.01


def test_int4_group_size_must_divide():
    with pytest.raises(glmkit.GlmkitError, match="group size"):
        Int4Linear.from_float(torch.randn(8, 96), group_size=64)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_close_to_float_and_tied_head(tmp_path, random_ids, bits):
    hf = make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], hidden_size=96, intermediate_size=128, seed=1)
    hf.save_pretrained(tmp_path)
    ref = glmkit.load(tmp_path, dtype="float32")
    q = glmkit.load(tmp_path, quantize=f"int{bits}")
    assert q.dtype == torch.bfloat16
    assert isinstance(q.model.layers[0].mlp.in_proj, Int4Linear if bits == 4 else Int8Linear)
    assert q.model.lm_head is not None  # the tied head got its own quantized copy; the embedding is unchanged
    ids = random_ids(2, 16, hf.config.vocab_size)
    assert rel(q.logits(ids), ref.logits(ids)) < (0.05 if bits == 8 else 0.25)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cached_greedy_equals_reference_path(tmp_path, random_ids, bits):
    """In float32 the quantized model runs its portable path: cached decoding must equal the cache-free loop."""
    hf = make_hf_model("llama", LLAMA_CONFIGS["gqa-bias"], intermediate_size=64, seed=2)
    hf.save_pretrained(tmp_path)
    llm = glmkit.load(tmp_path, quantize=f"int{bits}", dtype="float32")
    ids = random_ids(1, 9, hf.config.vocab_size, seed=5)[0].tolist()
    assert llm.generate(ids, max_tokens=16, temperature=0, ignore_eos=True).token_ids == naive_greedy(llm, ids, 16)


def test_quantize_model_rejects_other_widths():
    with pytest.raises(glmkit.GlmkitError, match="4 or 8 bits"):
        quantize_model(torch.nn.Linear(4, 4), bits=3)


def gguf_blocks(qtype: str, w):
    """w (N, K) as GGUF `qtype` bytes: gguf's own quantizer, or for Q4_K (which gguf cannot quantize)
    random blocks with sensible float16 super-block scales."""
    import gguf
    import numpy as np
    from gguf import quants

    if qtype != "Q4_K":
        return quants.quantize(w, getattr(gguf.GGMLQuantizationType, qtype))
    rng = np.random.default_rng(1)
    N, K = w.shape
    raw = rng.integers(0, 256, (N, K // 256, 144), dtype=np.uint8)
    raw[..., 0:4] = rng.uniform(0.001, 0.05, (N, K // 256, 2)).astype(np.float16).view(np.uint8)  # d, dmin
    return raw.reshape(N, -1)


def write_one_tensor(path, name: str, raw, qtype: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor(name, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_int4_blocks_repack_exactly(tmp_path, qtype):
    """GGUF 4-bit blocks become int4 modules without a float detour, equal to their dequantized values
    (Q4_K's 6-bit group scales and mins included)."""
    import gguf
    import numpy as np
    from gguf import quants

    from glmkit.loaders.gguf import dequantize, int4_blocks, open_gguf

    w = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)
    write_one_tensor(tmp_path / "w.gguf", "blk.0.ffn_up.weight", gguf_blocks(qtype, w), qtype)
    theirs = gguf.GGUFReader(str(tmp_path / "w.gguf")).tensors[0]
    reference = torch.from_numpy(quants.dequantize(np.asarray(theirs.data), theirs.tensor_type))  # gguf's own
    tensor = open_gguf(tmp_path / "w.gguf").tensors[0]
    assert torch.equal(dequantize(tensor), reference)
    blocks = int4_blocks(tensor)
    formula = ((blocks.q.float().view(64, 16, 32) - 8) * blocks.scales[..., None] + blocks.zeros[..., None]).view(64, 512)
    torch.testing.assert_close(formula, reference, rtol=1e-6, atol=1e-6)  # float32 rounding of the rewritten zero
    torch.testing.assert_close(blocks.rows(10, 20), reference[10:20], rtol=1e-6, atol=1e-6)
    module = Int4Linear(blocks.q, blocks.scales, blocks.zeros, 32, None)
    assert rel(module.dequantize(), reference) < 5e-3  # scales are stored in bfloat16


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_save_load_round_trip(tmp_path, random_ids, vocab_dirs, bits):
    """glmkit quantize -> directory -> glmkit.load rebuilds the same modules and gives identical outputs."""
    import shutil
    import subprocess
    import sys

    src = tmp_path / "src"
    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], hidden_size=96, intermediate_size=128, vocab_size=500,
                  seed=4).save_pretrained(src)
    for f in vocab_dirs["chatml"].iterdir():
        shutil.copy(f, src / f.name)
    out = subprocess.run([sys.executable, "-m", "glmkit", "quantize", str(src), str(tmp_path / "q"), "--bits",
                          str(bits)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    direct = quantize_model(glmkit.load(src, dtype="bfloat16").model, bits=bits)
    loaded = glmkit.load(tmp_path / "q")
    kinds = {n: type(m).__name__ for n, m in loaded.model.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    assert kinds == {n: type(m).__name__ for n, m in direct.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    ids = random_ids(2, 12, 500)
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids, positions), direct(ids, positions))
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}])  # the tokenizer came along
    # tied embeddings: no float table is kept; the embedding is read from the int8 head, within int8 rounding
    from glmkit.quant import TiedInt8Embedding

    assert isinstance(loaded.model.embed, TiedInt8Embedding) and "embed.weight" not in loaded.model.state_dict()
    table = glmkit.load(src, dtype="float32").model.embed.weight
    assert rel(loaded.model.embed(ids).float(), table[ids]) < 0.01
    again = subprocess.run([sys.executable, "-m", "glmkit", "quantize", str(src), str(tmp_path / "q"), "--bits", "8"],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "not empty" in again.stderr
    # an already quantized source is refused, with the reason and the way out; --requantize does it
    twice = [sys.executable, "-m", "glmkit", "quantize", str(tmp_path / "q"), str(tmp_path / "q2"), "--bits", "8"]
    refused = subprocess.run(twice, capture_output=True, text=True)
    assert refused.returncode == 1 and "already stored quantized" in refused.stderr and "--requantize" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "q2").exists()
    done = subprocess.run(twice + ["--requantize"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert glmkit.load(tmp_path / "q2").generate([1, 2, 3], max_tokens=3, temperature=0).token_ids


def test_int8_odd_width_takes_the_portable_path():
    """torch 2.13's int8 kernel segfaults for K % 16 != 0 with 8+ rows; glmkit must not call it there."""
    torch.manual_seed(0)
    w, x = torch.randn(48, 40), torch.randn(91, 40, dtype=torch.bfloat16)
    m = Int8Linear.from_float(w)
    assert rel(m(x), torch.nn.functional.linear(x.float(), m.dequantize())) < 0.01


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("bits", [8, 4])
def test_official_chatglm_quantized_checkpoint(tmp_path, random_ids, bits, device):
    """An official-format ChatGLM -int8 / -int4 checkpoint (per-row absmax; int4 two values a byte, the first in
    the high nibble) loads into glmkit's modules and matches the float model of its dequantized weights."""
    import json

    from safetensors.torch import load_file, save_file

    from conftest import GLM_CONFIGS, write_thudm_glm

    hf = make_hf_model("glm", GLM_CONFIGS["mqa-untied"], hidden_size=64, intermediate_size=64, seed=8)
    write_thudm_glm(hf, tmp_path / "float")
    tensors = load_file(tmp_path / "float" / "model.safetensors")
    dequantized = dict(tensors)
    for name in [n for n in tensors if n.endswith(("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight",
                                                   "dense_4h_to_h.weight"))]:
        w = tensors[name].half().float()
        scale = (w.abs().amax(dim=1) / (2 ** (bits - 1) - 1)).half()
        q = torch.round(w / scale.float()[:, None]).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int8)
        dequantized[name] = q.float() * scale.float()[:, None]
        if bits == 4:  # the official compress_int4_weight: byte j = (q[2j] << 4) | (q[2j + 1] & 15)
            u = q.to(torch.int16) & 15
            q = ((u[:, 0::2] << 4) | u[:, 1::2]).to(torch.uint8).view(torch.int8)
        tensors[name], tensors[name + "_scale"] = q.contiguous(), scale
    (tmp_path / "q").mkdir()
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    raw = json.loads((tmp_path / "float" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**raw, "quantization_bit": bits}))
    save_file({k: v.contiguous() for k, v in dequantized.items()}, tmp_path / "float" / "model.safetensors")
    reference = glmkit.load(tmp_path / "float", dtype="float32")
    # on CUDA in bfloat16: the GPU kernels (int4: torch's tinygemm) against the CPU's float32 reference
    quantized = glmkit.load(tmp_path / "q", device=device, dtype="float32" if device == "cpu" else "bfloat16")
    qkv = quantized.model.layers[0].attn.qkv
    assert isinstance(qkv, Int4Linear if bits == 4 else Int8Linear)
    kernel_layout = "vnni" if device == "cpu" and cpu_kernels.available() else device  # glmkit's own, or torch's
    assert bits == 8 or qkv.layout == kernel_layout
    ids = random_ids(2, 10, hf.config.vocab_size)
    bound = 5e-3 if device == "cpu" else 3e-2  # scales kept in bfloat16 for int4; bfloat16 activations on CUDA
    assert rel(quantized.logits(ids).cpu(), reference.logits(ids)) < bound
