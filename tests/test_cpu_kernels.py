"""glmkit's own CPU kernels (quant/cpu_kernels.py: int4 weights on int8-quantized activations, AVX-512 VNNI or AVX2):
against the same arithmetic written in torch, against the float product, and inside the MoE model (eager and
with torch's kernels in their place)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmkit.quant import StackedInt4, cpu_kernels, int4_groups
from glmkit.quant import int4_packing as packing

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX2 / AVX-512 VNNI or no C++ compiler here")


def random_int4(E: int, N: int, K: int, gs: int, seed: int = 0):
    """Stacked int4 weights: q (E, N, K) 0..15 and scales / zeros (E, K / gs, N, 2) bfloat16, as StackedInt4 keeps."""
    w = torch.randn(E, N, K, generator=torch.Generator().manual_seed(seed))
    parts = [int4_groups(w[e], gs) for e in range(E)]
    q = torch.stack([p[0] for p in parts]).to(torch.uint8)
    sz = torch.stack([torch.stack([p[1].T, p[2].T], dim=-1) for p in parts]).to(torch.bfloat16)
    return q, sz


def reference_int4_linear(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, gs: int) -> torch.Tensor:
    """What the kernel computes, in float64: x quantized to int8 per block of 32 (scale max|x| / 127, rounded half
    to even), integer sums of q * xq per block, scaled by the weight group's scale and the block's; zeros times
    the float sum of x."""
    M, K = x.shape
    xb = x.float().view(M, K // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)  # (M, K/32, 1)
    xq = torch.where(amax > 0, torch.round(xb * (127 / amax)), 0).double()  # (M, K/32, 32), float32 as the kernel
    xs, xb = (amax / 127).double(), xb.double()
    s, z = (sz[..., i].double().T.repeat_interleave(gs // 32, dim=1) for i in (0, 1))  # (N, K/32)
    qb = q.double().view(q.shape[0], K // 32, 32)  # (N, K/32, 32)
    dots = torch.einsum("mbk,nbk->mnb", xq, qb - 8)  # (M, N, K/32): exact integers
    return (dots * s[None] * xs[:, None, :, 0]).sum(-1) + (z[None] * xb.sum(-1)[:, None]).sum(-1)


def dequantized(q: torch.Tensor, sz: torch.Tensor, gs: int) -> torch.Tensor:
    N, K = q.shape
    return ((q.float().view(N, K // gs, gs) - 8) * sz[..., 0].float().T[..., None]
            + sz[..., 1].float().T[..., None]).view(N, K)


def test_vnni_packing_round_trips():
    q, sz = random_int4(3, 48, 128, 64)
    packed = packing.to_vnni(q)
    assert packed.shape == (3, 3, 16, 16, 4)
    assert torch.equal(packing.from_vnni(packed), q)
    assert int(packed[1, 2, 3, 5, 2]) == int(q[1, 37, 26]) | int(q[1, 37, 30]) << 4  # tile 2, chunk 3, row 5, byte 2
    tiles = packing.scales_to_vnni(sz)
    assert tiles.shape == (3, 3, 2, 2, 16) and torch.equal(packing.scales_from_vnni(tiles), sz)
    assert torch.equal(tiles[2, 1, 1, :, 4], sz[2, 1, 20])  # expert 2, tile 1, group 1, row 20: (scale, zero)


@needs_kernels
@pytest.mark.parametrize("M,N,K,gs,dtype", [(1, 32, 64, 32, torch.bfloat16), (3, 48, 256, 64, torch.float32),
                                            (5, 16, 512, 128, torch.bfloat16), (2, 64, 256, 256, torch.float32)])
def test_int4_linear_computes_the_int8_activation_product(M, N, K, gs, dtype):
    q, sz = random_int4(3, N, K, gs, seed=M)
    x = (torch.randn(M, K, generator=torch.Generator().manual_seed(7)) * 3).to(dtype)
    x[0, :32] = 0  # an all-zero block (scale 0)
    packed, tiles = packing.to_vnni(q), packing.scales_to_vnni(sz)
    for e in range(3):
        got = torch.ops.glmkit.int4_linear(x, packed, tiles, e, gs)
        assert got.dtype == torch.float32 and got.shape == (M, N)
        want = reference_int4_linear(x.float(), q[e], sz[e], gs)
        torch.testing.assert_close(got.double(), want, atol=2e-5 * float(want.abs().max()), rtol=0)
        exact = x.float() @ dequantized(q[e], sz[e], gs).T  # the float product: within int8 rounding of x
        assert float((got - exact).norm() / exact.norm()) < 0.02


def reference_int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8_linear in float64: x's int8 blocks of 32 as above, exact integer sums with q per block, scaled by the
    block's scale and the row's."""
    M, K = x.shape
    xb = x.float().view(M, K // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)  # (M, K/32, 1)
    xq = torch.where(amax > 0, torch.round(xb * (127 / amax)), 0).double()  # (M, K/32, 32)
    dots = torch.einsum("mbk,nbk->mnb", xq, q.double().view(-1, K // 32, 32))  # (M, N, K/32)
    return (dots * (amax / 127).double()[:, None, :, 0]).sum(-1) * scales.double()


@needs_kernels
@pytest.mark.parametrize("M,N,K", [(1, 16, 32), (3, 48, 256), (6, 64, 576)])
def test_int8_linear_computes_the_int8_activation_product(M, N, K):
    from glmkit.quant import Int8Linear, int8_tiles

    w = torch.randn(N, K, generator=torch.Generator().manual_seed(M))
    w[0, :7] = 127 / 10  # the largest weights and (below) activations: pairs of products near int16's limit
    layer = Int8Linear.from_float(w)
    q = layer.rows()
    assert layer.layout == "vnni" and torch.equal(int8_tiles(q), layer.q) and q.abs().max() == 127
    x = (torch.randn(M, K, generator=torch.Generator().manual_seed(9)) * 2).to(torch.bfloat16)
    x[0, :32] = 0
    x[-1, :8] = -5  # the block's extreme: -127
    got = torch.ops.glmkit.int8_linear(x, layer.q, layer.scales)
    want = reference_int8_linear(x.float(), q, layer.scales)
    torch.testing.assert_close(got.double(), want, atol=2e-5 * float(want.abs().max()), rtol=0)
    exact = x.float() @ layer.dequantize().T
    assert float((layer(x).float() - exact).norm() / exact.norm()) < 0.02


ISAS_HERE = [name for name, (needed, _) in cpu_kernels.BUILDS.items() if needed <= cpu_kernels.cpu_flags()]


@needs_kernels
@pytest.mark.parametrize("isa", ISAS_HERE)
def test_each_instruction_set_this_cpu_has_computes_the_same_product(isa):
    """GLMKIT_KERNELS=<isa> builds that variant (an AVX-512 machine checks its AVX2 build too) and it gives the
    reference products, int4 and int8."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from glmkit.quant import cpu_kernels, int4_packing as packing
from test_cpu_kernels import random_int4, reference_int4_linear
assert cpu_kernels.instruction_set() == {isa!r} and cpu_kernels.available()
q, sz = random_int4(2, 48, 256, 64)
x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
got = torch.ops.glmkit.int4_linear(x, packing.to_vnni(q), packing.scales_to_vnni(sz), 1, 64).double()
want = reference_int4_linear(x.float(), q[1], sz[1], 64)
torch.testing.assert_close(got, want, atol=2e-5 * float(want.abs().max()), rtol=0)
from glmkit.quant import Int8Linear
from test_cpu_kernels import reference_int8_linear
layer = Int8Linear.from_float(torch.randn(48, 256))
want = reference_int8_linear(x.float(), layer.rows(), layer.scales)
got = torch.ops.glmkit.int8_linear(x, layer.q, layer.scales).double()
torch.testing.assert_close(got, want, atol=2e-5 * float(want.abs().max()), rtol=0)
print("ok")
"""
    env = {**os.environ, "GLMKIT_KERNELS": isa}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@needs_kernels
def test_moe_int4_token_sums_its_weighted_swiglu_experts():
    C, I, E, gs = 128, 64, 6, 32
    q_gu, sz_gu = random_int4(E, 2 * I, C, gs, seed=1)
    q_d, sz_d = random_int4(E, C, I, gs, seed=2)
    x = torch.randn(1, C, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ids, weights = torch.tensor([4, 0, 5]), torch.tensor([[0.5, 1.25, -0.75]])
    got = torch.ops.glmkit.moe_int4_token(x, ids, weights, packing.to_vnni(q_gu), packing.scales_to_vnni(sz_gu),
                                          packing.to_vnni(q_d), packing.scales_to_vnni(sz_d), gs, gs)
    want = torch.zeros(1, C, dtype=torch.float64)
    for e, w in zip(ids.tolist(), weights[0].tolist()):
        gate, up = reference_int4_linear(x.float(), q_gu[e], sz_gu[e], gs).chunk(2, dim=-1)
        act = (torch.nn.functional.silu(gate) * up).float()
        want += w * reference_int4_linear(act, q_d[e], sz_d[e], gs)
    torch.testing.assert_close(got.double(), want, atol=1e-4 * float(want.abs().max()), rtol=0)
    with pytest.raises(RuntimeError, match="expert id out of range"):
        torch.ops.glmkit.moe_int4_token(x, torch.tensor([E]), weights[:, :1], packing.to_vnni(q_gu),
                                        packing.scales_to_vnni(sz_gu), packing.to_vnni(q_d),
                                        packing.scales_to_vnni(sz_d), gs, gs)


@needs_kernels
def test_stacked_int4_in_either_layout_holds_the_same_experts(monkeypatch):
    q, sz = random_int4(4, 32, 64, 32)
    scales, zeros = sz[..., 0].float().transpose(1, 2), sz[..., 1].float().transpose(1, 2)
    ours = StackedInt4(q, scales, zeros, 32)
    monkeypatch.setitem(cpu_kernels._state, "ops", False)
    torchs = StackedInt4(q, scales, zeros, 32)
    assert (ours.layout, torchs.layout) == ("vnni", "cpu")
    assert torch.equal(ours.all_nibbles(), torchs.all_nibbles()) and torch.equal(ours.group_scales(), sz)
    assert torch.equal(ours.dequantize(2), torchs.dequantize(2))
    x = torch.randn(3, 64).to(torch.bfloat16)
    a, b = ours.linear(1, x).float(), torchs.linear(1, x).float()
    assert float((a - b).norm() / b.norm()) < 0.02  # int8 activations against torch's bfloat16 ones


@needs_kernels
def test_int8_modules_in_either_layout_hold_the_same_weights(monkeypatch):
    """Int8Linear and StackedInt8 in glmkit's tiles and in rows: the same int8 values and scales, rows gathered
    from the tiles as the tied embedding reads them, and products within int8 activation rounding."""
    from glmkit.quant import Int8Linear, StackedInt8

    w = torch.randn(3, 32, 64, generator=torch.Generator().manual_seed(2))
    ours, linear = StackedInt8.from_float(w), Int8Linear.from_float(w[0])
    monkeypatch.setitem(cpu_kernels._state, "ops", False)
    torchs, linear_rows = StackedInt8.from_float(w), Int8Linear.from_float(w[0])
    assert (ours.layout, linear.layout, torchs.layout, linear_rows.layout) == ("vnni", "vnni", "rows", "rows")
    assert torch.equal(ours.rows(), torchs.q) and torch.equal(ours.rows(2), torchs.q[2])
    assert torch.equal(ours.dequantize(1), torchs.dequantize(1)) and torch.equal(linear.rows(), linear_rows.q)
    tokens = torch.tensor([[0, 17, 31], [5, 5, 16]])
    assert torch.equal(linear.rows(tokens), linear_rows.q[tokens])
    x = torch.randn(3, 64).to(torch.bfloat16)
    for a, b in [(ours.linear(1, x), torchs.linear(1, x)), (linear(x), linear_rows(x))]:
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 0.02


def test_a_failed_build_leaves_torchs_kernels_with_one_warning(tmp_path, monkeypatch):
    """No compiler, no ninja or (here) no writable home: one warning naming the cause, and no kernels."""
    monkeypatch.setenv("GLMKIT_HOME", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: cpu_kernels.BUILDS["avx2"][0])
    with pytest.warns(UserWarning, match="could not build its CPU kernels .*GLMKIT_KERNELS=0"):
        assert cpu_kernels._load() is False
    monkeypatch.setenv("GLMKIT_KERNELS", "0")
    assert cpu_kernels._load() is False  # switched off: not even tried



@needs_kernels
def test_a_quantized_moe_decodes_through_the_fused_kernel(tmp_path, monkeypatch):
    """An int4 MoE model in bfloat16 runs each decode token's experts in one fused call (one per MoE layer and
    token), and its logits stay within int8 rounding of the same model with the experts run one by one."""
    import glmkit
    from test_moe import make_moe

    make_moe(tmp_path / "m", "groups", seed=5)
    llm = glmkit.load(tmp_path / "m", dtype="bfloat16", quantize="int4")
    assert llm.model.layers[1].mlp.experts.gate_up_proj.layout == "vnni"
    calls, fused = [], StackedInt4.swiglu_token

    def counted(self, *args):
        calls.append(1)
        return fused(self, *args)

    monkeypatch.setattr(StackedInt4, "swiglu_token", counted)
    ids = [5, 9, 13, 2, 40, 7]
    out = llm.generate(ids, max_tokens=4, temperature=0, ignore_eos=True)
    moe_layers = sum(layer.mlp.__class__.__name__ == "MoE" for layer in llm.model.layers)
    assert len(calls) == 3 * moe_layers  # the three one-token steps after the prompt's (prefill groups by expert)
    with torch.no_grad():
        x = torch.randn(1, 1, llm.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        moe = llm.model.layers[1].mlp
        got = moe(x.to(torch.bfloat16)).float()
        monkeypatch.setattr(StackedInt4, "swiglu_token", lambda self, *args: None)  # expert by expert
        want = moe(x.to(torch.bfloat16)).float()
    assert float((got - want).norm() / want.norm()) < 0.03
    assert len(out.token_ids) == 4
