"""GLM-4.5-family Mixture-of-Experts models (glm4_moe) against transformers' Glm4MoeForCausalLM: tiny random
models in both expert layouts, with and without an MTP layer, greedy decoding, batching and bad checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmkit
from glmkit.errors import CheckpointError, ConfigError

from conftest import assert_greedy_agrees

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=1.0,
            norm_topk_prob=True, use_qk_norm=False, attention_bias=True, max_position_embeddings=256,
            rope_parameters={"rope_theta": 1e6, "partial_rotary_factor": 0.5, "rope_type": "default"})
SHAPES = {  # what differs between the released models, each exercised
    "air": {},  # GLM-4.5-Air: no q/k norm, one group, scaling 1
    "full": dict(use_qk_norm=True, routed_scaling_factor=2.5, first_k_dense_replace=2, num_hidden_layers=4),
    "groups": dict(n_group=4, topk_group=2, num_experts_per_tok=3, use_qk_norm=True, routed_scaling_factor=1.7),
    "mha-unnormed": dict(num_key_value_heads=4, norm_topk_prob=False, n_shared_experts=2, attention_bias=False),
}


def make_moe(directory, shape: str = "air", seed: int = 0, fused: bool = False, mtp: bool = False, **overrides):
    """A tiny random Glm4MoeForCausalLM saved to `directory` (per-expert tensors as released, or transformers v5's
    fused 3-D experts); a random non-zero correction bias and a wide router, so that choosing with the bias and
    weighting without it matters; mtp: a next-token-prediction layer added to the file as released."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    torch.manual_seed(seed)
    config = Glm4MoeConfig(**{**BASE, **SHAPES[shape], **overrides})
    model = randomized(Glm4MoeForCausalLM(config).eval(), std=0.05, bias_std=0.2)
    model.save_pretrained(directory)
    path = directory / "model.safetensors"
    tensors = load_file(path)
    if fused:  # transformers v5's in-memory layout, as save_pretrained(save_original_format=False) writes it
        tensors = _fuse_experts(tensors, config)
    if mtp:
        tensors.update(_mtp_tensors(model, tensors, config.num_hidden_layers))
    save_file(tensors, path, metadata={"format": "pt"})
    return model


def randomized(model, std: float, bias_std: float):
    """Random weights (norms near 1), a wide router (std 0.5) and a non-zero correction bias."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.5 if name.endswith("gate.weight") else std)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, bias_std)
    return model


def _fuse_experts(tensors: dict, config) -> dict:
    out = {k: v for k, v in tensors.items() if ".experts." not in k}
    for i in range(config.first_k_dense_replace, config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        out[f"{p}.gate_up_proj"] = torch.stack([torch.cat([tensors[f"{p}.{e}.gate_proj.weight"],
                                                           tensors[f"{p}.{e}.up_proj.weight"]])
                                                for e in range(config.n_routed_experts)])
        out[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"]
                                             for e in range(config.n_routed_experts)])
    return out


def _mtp_tensors(model, tensors: dict, n: int) -> dict:
    """Layer n as released: a full decoder layer (random, the last one's names and shapes) plus eh_proj, enorm,
    hnorm, shared_head.norm, and the embed_tokens / shared_head.head copies some files carry."""
    g = torch.Generator().manual_seed(5)
    last = {k: v for k, v in tensors.items() if k.startswith(f"model.layers.{n - 1}.")}
    out = {k.replace(f"layers.{n - 1}.", f"layers.{n}."): torch.randn(v.shape, generator=g) for k, v in last.items()}
    H = model.config.hidden_size
    out.update({f"model.layers.{n}.eh_proj.weight": torch.randn(H, 2 * H, generator=g),
                f"model.layers.{n}.enorm.weight": torch.randn(H, generator=g),
                f"model.layers.{n}.hnorm.weight": torch.randn(H, generator=g),
                f"model.layers.{n}.shared_head.norm.weight": torch.randn(H, generator=g),
                f"model.layers.{n}.embed_tokens.weight": model.model.embed_tokens.weight.detach().clone(),
                f"model.layers.{n}.shared_head.head.weight": model.lm_head.weight.detach().clone()})
    return out


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
def test_logits_equal_transformers(tmp_path, random_ids, shape, fused):
    hf = make_moe(tmp_path, shape, seed=len(shape), fused=fused, mtp=shape == "full")
    llm = glmkit.load(tmp_path, dtype="float32")
    ids = random_ids(2, 13, 128, seed=3)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    torch.testing.assert_close(llm.logits(ids), want, atol=1e-5, rtol=0)


def test_mtp_layer_is_kept_and_absent_mtp_is_no_error(tmp_path):
    """A file's MTP layer lands on the model (past the layers that run), every tensor of it; a config that counts
    an MTP layer its file leaves out (what transformers writes) loads without one."""
    make_moe(tmp_path / "with", "full", mtp=True)
    stored = load_file(tmp_path / "with" / "model.safetensors")
    llm = glmkit.load(tmp_path / "with", dtype="float32")
    n = llm.config.num_layers
    mtp = llm.model.layers[n]
    assert llm.config.mtp_layers == 1 and len(llm.model.layers) == n + 1
    torch.testing.assert_close(mtp.eh_proj.weight, stored[f"model.layers.{n}.eh_proj.weight"])
    torch.testing.assert_close(mtp.head_norm.weight, stored[f"model.layers.{n}.shared_head.norm.weight"])
    torch.testing.assert_close(mtp.mlp.experts.down_proj[3], stored[f"model.layers.{n}.mlp.experts.3.down_proj.weight"])
    make_moe(tmp_path / "without", "full")
    plain = glmkit.load(tmp_path / "without", dtype="float32")
    assert plain.config.mtp_layers == 0 and len(plain.model.layers) == plain.config.num_layers


@pytest.mark.parametrize("shape", ["air", "groups"])
def test_greedy_generation_and_batching_equal_transformers(tmp_path, random_ids, shape):
    """Greedy tokens equal transformers' generate; prompts decoded together equal each decoded alone (the decode
    step's gathered experts and the prefill's grouped ones agree)."""
    hf = make_moe(tmp_path, shape, seed=9)
    llm = glmkit.load(tmp_path, dtype="float32")
    prompts = [random_ids(1, n, 128, seed=n)[0].tolist() for n in (5, 9, 12)]
    for prompt in prompts:
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
        assert llm.generate(prompt, max_tokens=10, temperature=0, ignore_eos=True).token_ids == want
    alone = [llm.generate(p, max_tokens=8, temperature=0, ignore_eos=True).token_ids for p in prompts]
    together = llm.generate_batch(prompts, max_tokens=8, temperature=0, ignore_eos=True)
    assert [c.token_ids for c in together] == alone


def test_per_token_and_grouped_experts_agree():
    from glmkit.config import MoEConfig
    from glmkit.moe import MoE

    torch.manual_seed(0)
    moe = MoE(32, MoEConfig(num_experts=8, experts_per_token=3, expert_size=16, groups=2, topk_groups=1), None)
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(1, 10, 32)
    grouped = moe(x)
    moe.experts.pairs_below = 100
    torch.testing.assert_close(moe(x), grouped, atol=1e-5, rtol=1e-5)  # float32 sums in another order


def _edit(directory, change):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_bad_moe_checkpoints_are_one_clear_sentence(tmp_path):
    make_moe(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "scoring_func": "softmax"}))
    with pytest.raises(ConfigError, match="scoring_func='softmax' is not supported"):
        glmkit.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "moe_layer_freq": 2}))
    with pytest.raises(ConfigError, match=r"\['moe_layer_freq'\] are not understood"):
        glmkit.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    _edit(tmp_path, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match="no expert 5 of 'layers.2.mlp.experts.gate_up_proj'"):
        glmkit.load(tmp_path)
    make_moe(tmp_path)
    _edit(tmp_path, lambda t: t.update({"model.layers.1.mlp.experts.2.down_proj.weight": torch.zeros(64, 31)}))
    with pytest.raises(CheckpointError, match="down_proj"):
        glmkit.load(tmp_path)
    make_moe(tmp_path)
    _edit(tmp_path, lambda t: t.update({"model.layers.1.mlp.gate.e_score_correction_bias": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"shape \(7,\) but config.json implies \(8,\)"):
        glmkit.load(tmp_path)
    make_moe(tmp_path)
    _edit(tmp_path, lambda t: t.update({"model.layers.1.mlp.experts.8.down_proj.weight": torch.zeros(64, 32)}))
    with pytest.raises(CheckpointError, match="expert 8 .* says 8 experts"):
        glmkit.load(tmp_path)


# ------------------------------------------------------------------------------ GGUF (llama.cpp's glm4moe)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
              "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp"}


def write_glm4moe_gguf(hf, path, expert_qtype: str, linear_qtype: str = "F32", vocabulary: bool = False) -> None:
    """The model as llama.cpp's converter (conversion/glm.py, Glm4MoeModel) writes it: glm4moe keys, experts
    stacked to 3-D (gate and up apart), q/k rows as they are (NeoX rotary), the correction bias as
    exp_probs_b.bias, no vocabulary; the experts stored in `expert_qtype` and written back into `hf`, so both
    hold the same rounded values; other 2-D weights in `linear_qtype` (benchmarks/moe.py: a whole-model Q4_0);
    vocabulary: a made-up SentencePiece vocabulary of the model's size (llama.cpp will not load a file without)."""
    import gguf
    import numpy as np
    from test_gguf import finish, gguf_writer, roundtrip
    from test_quant import gguf_blocks

    c = hf.config
    w = gguf_writer(path, "glm4moe", c, rope_dims=int(c.head_dim * 0.5))
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_leading_dense_block_count(c.first_k_dense_replace)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    w.add_expert_weights_norm(c.norm_topk_prob)
    if vocabulary:
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, c.vocab_size)])
        w.add_token_scores([0.0] * c.vocab_size)
        w.add_token_types([2, 3, 3] + [1] * (c.vocab_size - 3))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    if c.n_group > 1:  # GLM-4.5's releases route in one group; these keys are the ones DeepSeek-V3 files carry
        w.add_expert_group_count(c.n_group)
        w.add_expert_group_used_count(c.topk_group)
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for key, value in state.items():
        if key in top:
            raw, _, t = roundtrip(value.float().numpy(), linear_qtype if key != "model.norm.weight" else "F32")
            w.add_tensor(top[key], raw, raw_dtype=t)
            continue
        i, rest = key[len("model.layers."):].split(".", 1)
        module, kind = rest.rsplit(".", 1)
        if module == "mlp.experts":
            I = c.moe_intermediate_size
            parts = {"ffn_gate_exps": value[:, :I], "ffn_up_exps": value[:, I:]} if kind == "gate_up_proj" else \
                {"ffn_down_exps": value}
            stored = []
            for name, part in parts.items():
                E, N, K = part.shape
                flat = part.float().reshape(E * N, K).numpy()
                t = getattr(gguf.GGMLQuantizationType, expert_qtype)
                raw = gguf_blocks(expert_qtype, flat) if expert_qtype == "Q4_K" else roundtrip(flat, expert_qtype)[0]
                values = flat if expert_qtype == "F32" else gguf.quants.dequantize(raw, t)
                w.add_tensor(f"blk.{i}.{name}.weight", raw.reshape(E, N, -1),
                             raw_dtype=None if expert_qtype == "F32" else t)
                stored.append(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(E, N, K))
            with torch.no_grad():
                hf.get_parameter(key).copy_(torch.cat(stored, dim=1))
            continue
        name = "exp_probs_b.bias" if kind == "e_score_correction_bias" else f"{GGUF_NAMES[module]}.{kind}"
        linear = value.dim() == 2 and module != "mlp.gate"  # the router stays float32, as llama.cpp keeps it
        raw, _, t = roundtrip(value.float().numpy(), linear_qtype if linear else "F32")
        w.add_tensor(f"blk.{i}.{name}", raw, raw_dtype=t)
    finish(w)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_K"])
def test_gguf_glm4moe_equals_transformers(tmp_path, random_ids, qtype):
    """Experts stored F32, Q8_0 or Q4_K: glmkit on the GGUF equals transformers holding the same rounded values."""
    wide = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, head_dim=64)  # Q4_K: 256 a row
    hf = make_moe(tmp_path, "groups", seed=4, **wide)
    write_glm4moe_gguf(hf, tmp_path / "m.gguf", qtype)
    llm = glmkit.load(tmp_path / "m.gguf", dtype="float32")
    theirs = glmkit.load(tmp_path, dtype="float32").config.moe
    assert llm.config.moe.routed_scaling_factor == pytest.approx(theirs.routed_scaling_factor)  # stored as float32
    assert dataclasses.replace(llm.config.moe, routed_scaling_factor=theirs.routed_scaling_factor) == theirs
    ids = random_ids(2, 9, 128, seed=1)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    torch.testing.assert_close(llm.logits(ids), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ quantized experts
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_decode_like_their_dequantized_reference(tmp_path, random_ids, bits):
    """int8 / int4 experts (stacked, no float copy) decode exactly like a float32 model holding their dequantized
    values; `glmkit quantize` writes them and they load back bit-exact."""
    from glmkit.loaders.quantized import save_quantized
    from glmkit.quant import StackedInt4, StackedInt8, quantize_model

    make_moe(tmp_path / "m", "groups", seed=2)
    llm = glmkit.load(tmp_path / "m", dtype="float32")
    quantize_model(llm.model, bits)
    experts = llm.model.layers[1].mlp.experts
    assert isinstance(experts.gate_up_proj, StackedInt4 if bits == 4 else StackedInt8)
    assert not any(p.dim() == 3 for p in llm.model.parameters())  # no float expert weights left
    reference = glmkit.load(tmp_path / "m", dtype="float32")
    with torch.no_grad():  # the float model holding exactly what the quantized one computes with
        for name, module in llm.model.named_modules():
            if hasattr(module, "dequantize"):  # Int8Linear / Int4Linear (the head too), or stacked experts
                parent, _, child = name.rpartition(".")
                stacked = child.endswith("_proj") and parent.endswith("experts")
                owner = reference.model.get_submodule(parent if stacked else name)
                (getattr(owner, child) if stacked else owner.weight).copy_(module.dequantize())
    ids = random_ids(1, 7, 128, seed=2)[0].tolist()
    assert llm.generate(ids, max_tokens=12, temperature=0, ignore_eos=True).token_ids == \
        reference.generate(ids, max_tokens=12, temperature=0, ignore_eos=True).token_ids
    torch.testing.assert_close(llm.logits(ids), reference.logits(ids), atol=1e-5, rtol=0)
    save_quantized(llm.model, tmp_path / "q", bits, 32)
    again = glmkit.load(tmp_path / "q", dtype="float32")
    for (name, a), (_, b) in zip(llm.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
def test_gguf_int4_experts_stay_4_bit(tmp_path, qtype):
    """Q4_0 / Q4_K experts load as StackedInt4 straight from the file's blocks (no float copy, no requantization):
    the values they compute with are the file's, up to the bfloat16 scales the int4 kernel takes (as for
    dense int4 layers)."""
    from glmkit.quant import StackedInt4

    wide = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, head_dim=64)
    hf = make_moe(tmp_path, "air", seed=6, **wide)
    write_glm4moe_gguf(hf, tmp_path / "m.gguf", qtype)
    packed = glmkit.load(tmp_path / "m.gguf", quantize="int4", dtype="float32")
    exact = glmkit.load(tmp_path / "m.gguf", dtype="float32")
    for ours, theirs in zip(packed.model.layers[1:], exact.model.layers[1:]):
        for name in ("gate_up_proj", "down_proj"):
            module = getattr(ours.mlp.experts, name)
            assert isinstance(module, StackedInt4)
            want = getattr(theirs.mlp.experts, name)  # bfloat16 scale and zero: 2^-9 of their size, at most
            torch.testing.assert_close(module.dequantize(), want, atol=4e-3 * float(want.abs().max()), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_compiled_decode_step_covers_moe(tmp_path, monkeypatch, bits):
    """The compiled one-token step of a MoE model (float32, int8 and int4 experts, whose kernels run on experts
    chosen at run time): greedy tokens equal eager (in bfloat16, up to a near tie that rounding may break
    either way)."""
    monkeypatch.setenv("GLMKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "home" / "inductor"))
    make_moe(tmp_path / "m", "groups", seed=3)
    load = lambda: glmkit.load(tmp_path / "m", dtype="float32" if bits is None else "bfloat16",  # noqa: E731
                               quantize=None if bits is None else f"int{bits}")
    prompt = [5, 9, 13, 2, 40, 7]
    expected = load().generate(prompt, max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
    llm = load()
    decoder = llm.compile()
    assert decoder.ready, decoder.error
    got = llm.generate(prompt, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    if bits is None:
        assert got == expected.token_ids
    else:
        assert_greedy_agrees(expected, got, margin=0.05)


def test_gguf_q8_experts_become_int8_without_a_float_copy(tmp_path):
    """Q8_0 experts with int8 kept: StackedInt8 built row by row from the file's blocks, the same values as
    quantizing the dequantized experts."""
    from glmkit.quant import StackedInt8

    hf = make_moe(tmp_path, "air", seed=8)
    write_glm4moe_gguf(hf, tmp_path / "m.gguf", "Q8_0")
    packed = glmkit.load(tmp_path / "m.gguf", quantize="int8", dtype="float32")
    exact = glmkit.load(tmp_path / "m.gguf", dtype="float32")
    for name in ("gate_up_proj", "down_proj"):
        module = getattr(packed.model.layers[1].mlp.experts, name)
        assert isinstance(module, StackedInt8)
        want = StackedInt8.from_float(getattr(exact.model.layers[1].mlp.experts, name))
        assert torch.equal(module.q, want.q) and torch.allclose(module.scales, want.scales, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------ larger than RAM
PEAK_CHILD = r"""
import re, sys, threading, time
import torch
from glmkit import loaders
from glmkit.model import Transformer

def anon():  # private memory: what a checkpoint larger than RAM cannot afford (file pages can be dropped)
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

base, peak, done = anon(), [0], []
def watch():
    while not done:
        peak[0] = max(peak[0], anon()); time.sleep(0.0005)
threading.Thread(target=watch, daemon=True).start()
model = loaders.assemble(loaders.open(sys.argv[1]), Transformer.skeleton, "cpu", None, sys.argv[2])
done.append(1); time.sleep(0.01)
print(peak[0] - base, sum(b.numel() * b.element_size() for b in model.state_dict().values()))
"""


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_quantized_loading_holds_one_layer_of_float_weights(tmp_path, quantize):
    """A quantized load reads, fills and quantizes one layer at a time: private memory stays near the quantized
    model plus one layer, far below the bfloat16 checkpoint (read whole, stacking its experts alone would copy
    all of it), so a checkpoint larger than RAM can be quantized."""
    import subprocess
    import sys

    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    torch.manual_seed(0)
    config = Glm4MoeConfig(**{**BASE, "hidden_size": 256, "moe_intermediate_size": 256, "n_routed_experts": 32,
                              "num_hidden_layers": 16, "head_dim": 64, "vocab_size": 256})
    Glm4MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    stored = (tmp_path / "model.safetensors").stat().st_size
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(tmp_path), quantize], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    peak, resident = map(int, out.stdout.split())
    layer = stored / 16
    assert resident < (0.4 if quantize == "int4" else 0.62) * stored  # the model is quantized
    assert peak < resident + 4 * layer, (peak / 2**20, resident / 2**20, stored / 2**20)
