"""CUDA paths of the weight-only modules: torch's int4 tinygemm packing read back exactly, the kernels against
the dequantized weights, and moves between CPU and GPU that repack without changing a value. Marked gpu:
deselected where torch sees no CUDA GPU; run them on one with `python -m pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

import glmkit
from conftest import LLAMA_CONFIGS, make_hf_model
from glmkit.quant import Int4Linear, Int8Linear
from glmkit.quant import int4_packing as packing

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


@pytest.mark.parametrize("N,K", [(64, 576), (1536, 576), (576, 1536), (4608, 4096), (4096, 13696)])
def test_tinygemm_packing_read_back(N, K):
    """cuda_values reads torch's own CUDA packing back exactly, for the default model's and GLM's widths."""
    dev = torch.device("cuda")
    assert packing.cuda_kernel_works(dev)
    assert packing.cuda_layout_known(dev, N, K)
    q = torch.randint(0, 16, (N, K), device=dev, dtype=torch.uint8)
    assert torch.equal(packing.cuda_values(packing.pack_cuda(q), N, K), q)


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_module_on_cuda(group_size):
    torch.manual_seed(0)
    w, b = torch.randn(1536, 576), torch.randn(1536)
    cpu = Int4Linear.from_float(w, b, group_size=group_size)
    gpu = Int4Linear.from_float(w, b, group_size=group_size).to("cuda")
    assert gpu.layout == "cuda" and gpu.packed.dtype == torch.int32
    assert torch.equal(gpu.nibbles().cpu(), cpu.nibbles())
    exact = cpu.dequantize()
    for rows in (1, 5, 300):  # decode (the tinygemm kernel) and prefill (dequantized GEMM)
        x = torch.randn(rows, 576)
        y = gpu(x.to("cuda", torch.bfloat16))
        assert y.dtype == torch.bfloat16 and y.shape == (rows, 1536)
        assert rel(y, torch.nn.functional.linear(x, exact, b)) < 0.01
    back = gpu.to("cpu")  # repacked for the CPU kernel, values unchanged
    assert back.layout == "cpu" and torch.equal(back.nibbles(), cpu.nibbles())


def test_int8_module_on_cuda():
    torch.manual_seed(0)
    w, x = torch.randn(1536, 576), torch.randn(3, 576)
    m = Int8Linear.from_float(w).to("cuda")
    y = m(x.to("cuda", torch.bfloat16))
    assert rel(y, torch.nn.functional.linear(x, Int8Linear.from_float(w).dequantize())) < 0.01


@pytest.mark.parametrize("quantize", ["int4", "int8", None])
def test_model_on_cuda_matches_cpu(tmp_path, random_ids, quantize):
    """A whole model loaded onto the GPU gives the CPU's logits (bfloat16 both) and greedy tokens."""
    hf = make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], hidden_size=576, intermediate_size=1536, vocab_size=512,
                       seed=3)
    hf.save_pretrained(tmp_path)
    cpu = glmkit.load(tmp_path, device="cpu", dtype="bfloat16", quantize=quantize)
    gpu = glmkit.load(tmp_path, device="cuda", dtype="bfloat16", quantize=quantize)
    ids = random_ids(2, 12, 512)
    assert rel(gpu.logits(ids.cuda()), cpu.logits(ids)) < 0.03
