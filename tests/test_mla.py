"""GLM-4.7-Flash (glm4_moe_lite: latent attention, MLA) and GLM-5 (glm_moe_dsa: MLA + the DSA sparse-attention
indexer, IndexShare) against transformers' Glm4MoeLiteForCausalLM and GlmMoeDsaForCausalLM on tiny random models:
logits, greedy generation, batching, the compressed cache, the absorbed one-token step, quantization, and the
variants that are refused."""

from __future__ import annotations

import json

import pytest
import torch

import glmkit
from glmkit.errors import UnsupportedArchitectureError

COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
              topk_group=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
              max_position_embeddings=512, bos_token_id=0, eos_token_id=1)
DSA = dict(index_topk=5, index_head_dim=16, index_n_heads=2, first_k_dense_replace=1)


def hf_model(kind: str, seed: int = 0, **overrides):
    """A tiny random Glm4MoeLiteForCausalLM ('lite') or GlmMoeDsaForCausalLM ('dsa'), every weight randomised
    (the router with a larger spread and a non-zero correction bias, so expert choices are distinct)."""
    import transformers

    kw = {**COMMON, **(DSA if kind == "dsa" else {}), **overrides}
    config, cls = ((transformers.Glm4MoeLiteConfig, transformers.Glm4MoeLiteForCausalLM) if kind == "lite" else
                   (transformers.GlmMoeDsaConfig, transformers.GlmMoeDsaForCausalLM))
    torch.manual_seed(seed)
    model = cls(config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (1.0 if name.endswith(("gate.weight", "e_score_correction_bias")) else 0.3))
    return model


def saved(model, directory) -> str:
    model.save_pretrained(directory)
    return str(directory)


CASES = [("lite", {}), ("lite", {"q_lora_rank": None}), ("lite", {"rope_interleave": False}),
         ("lite", {"attention_bias": True}), ("lite", {"mlp_layer_types": ["sparse", "dense", "sparse"]}),
         ("dsa", {}), ("dsa", {"index_topk_freq": 2, "index_skip_topk_offset": 1, "num_hidden_layers": 4}),
         ("dsa", {"indexer_types": ["full", "shared", "shared", "full"], "num_hidden_layers": 4}),
         ("dsa", {"q_lora_rank": 40, "index_head_dim": 8, "index_n_heads": 3})]


@pytest.mark.parametrize("kind, overrides", CASES, ids=[f"{k}-{'-'.join(o) or 'base'}" for k, o in CASES])
def test_logits_equal_transformers(tmp_path, kind, overrides):
    model = hf_model(kind, **overrides)
    llm = glmkit.load(saved(model, tmp_path), dtype="float32")
    ids = torch.randint(0, 101, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    assert (llm.logits(ids) - ref).abs().max() < 1e-5


def test_the_indexer_matters(tmp_path):
    """The same weights with an index_topk covering the whole prompt give other logits: the sparse choice in
    the parity tests is real, not a no-op."""
    model = hf_model("dsa")
    directory = saved(model, tmp_path)
    sparse = glmkit.load(directory, dtype="float32")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "index_topk": 1000}))
    dense = glmkit.load(directory, dtype="float32")
    ids = torch.randint(0, 101, (1, 19), generator=torch.Generator().manual_seed(1))
    assert (sparse.logits(ids) - dense.logits(ids))[:, 5:].abs().max() > 1e-3
    assert (sparse.logits(ids) - dense.logits(ids))[:, :5].abs().max() < 1e-6  # the first topk queries see all


@pytest.mark.parametrize("kind, overrides", [("lite", {}), ("dsa", {"index_topk_freq": 2, "index_skip_topk_offset": 1,
                                                                    "num_hidden_layers": 4})])
def test_greedy_generation_equals_transformers_and_batching_changes_nothing(tmp_path, kind, overrides):
    """Prompts longer than index_topk; transformers' generate with its own cache is the reference; several
    prompts decoded together (continuous batching, rows of different lengths) give each one's own tokens."""
    model = hf_model(kind, **overrides)
    llm = glmkit.load(saved(model, tmp_path), dtype="float32")
    prompts = [torch.randint(2, 101, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (12, 7, 9)]
    alone = []
    for prompt in prompts:
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
        ours = llm.generate(prompt, max_tokens=16, temperature=0, ignore_eos=True).token_ids
        assert ours == ref[0, len(prompt):].tolist()
        alone.append(ours)
    together = llm.generate_batch(prompts, max_tokens=16, temperature=0, ignore_eos=True)
    assert [c.token_ids for c in together] == alone


def test_the_cache_holds_the_latent_not_keys_and_values(tmp_path):
    """Per token and layer the cache keeps kv_lora_rank + qk_rope_head_dim numbers (plus the indexer key on
    layers that run one), not heads x (key + value) dims."""
    from glmkit.kv_cache import KVCache

    c = COMMON
    for kind, overrides in (("lite", {}), ("dsa", {"indexer_types": ["full", "shared", "full"]})):
        llm = glmkit.load(saved(hf_model(kind, **overrides), tmp_path / kind), dtype="float32")
        cache = KVCache(llm.config, batch_size=1, max_len=10)
        per_layer = [(k[0, :, 0].numel() + v[0, :, 0].numel()) for k, v in zip(cache.k, cache.v)]
        latent = c["kv_lora_rank"] + c["qk_rope_head_dim"]
        index = [DSA["index_head_dim"], 0, DSA["index_head_dim"]] if kind == "dsa" else [0, 0, 0]
        assert per_layer == [latent + i for i in index]
        expanded = c["num_attention_heads"] * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"] + c["v_head_dim"])
        assert latent * 4 <= expanded  # 24 against 144 here; 576 against 40960 for GLM-4.7-Flash


@pytest.mark.parametrize("kind", ["lite", "dsa"])
def test_absorbed_one_token_steps_equal_the_expanded_reference(tmp_path, kind):
    """Decode steps attend in the latent space over the compressed cache; their logits equal the expanded
    computation (llm.logits, no cache) of the same prefix at every position. Eight indexer heads: with two, many
    keys score exactly 0 after the ReLU, and which of those top-k keeps depends on the shape it runs on (a
    prefix's last row against a one-token step), in transformers as here."""
    from glmkit.engine.runner import ModelRunner, StepInputs

    llm = glmkit.load(saved(hf_model(kind, **({"index_n_heads": 8} if kind == "dsa" else {})), tmp_path),
                      dtype="float32")
    ids = torch.randint(2, 101, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = torch.stack([llm.logits(ids[: t + 1])[0, -1] for t in range(7, 20)])  # (13, V)
    runner = ModelRunner(llm.model)
    got = [runner.step(StepInputs([0], [ids[:8]], [0], prompt=ids[:8], reserve=20))[0]]
    for t in range(8, 20):
        got.append(runner.step(StepInputs([0], [[ids[t]]], [t]))[0])
    assert (torch.stack(got) - reference).abs().max() < 1e-5


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized_latent_attention(tmp_path, bits):
    """int8 / int4 weight-only for every projection, the latent ones included; kv_b (multiplied from both sides
    by the absorbed step) keeps the activation dtype, and GLM-5's indexer stays at 8 bits (its top-k choice is
    discrete). Logits stay close to the float model's where no discrete choice flips (MLA without the indexer;
    with one, a tiny random model's choices flip under any rounding)."""
    from glmkit.mla import LatentUp
    from glmkit.quant import Int4Linear, Int8Linear

    kinds = (Int4Linear,) if bits == "int4" else (Int8Linear,)
    dsa = glmkit.load(saved(hf_model("dsa", q_lora_rank=32, kv_lora_rank=24, v_head_dim=16), tmp_path / "dsa"), quantize=bits,
                      dtype="float32")
    attn = dsa.model.layers[1].attn
    for module in (attn.q_a, attn.q_b, attn.kv_a, attn.out):
        assert isinstance(module, kinds)
    assert isinstance(attn.indexer.wq_b, Int8Linear) and isinstance(attn.indexer.wk, Int8Linear)
    assert isinstance(attn.kv_b, LatentUp) and attn.kv_b.weight.dtype == torch.float32
    assert len(dsa.generate([5, 6, 7, 8, 9, 10, 11], max_tokens=8, temperature=0, ignore_eos=True).token_ids) == 8
    from glmkit.loaders.quantized import save_quantized

    save_quantized(dsa.model, tmp_path / "q", 4 if bits == "int4" else 8, 32)  # what glmkit quantize writes
    again = glmkit.load(tmp_path / "q", dtype="float32")
    for (name, a), (_, b) in zip(dsa.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    directory = saved(hf_model("lite", q_lora_rank=32, kv_lora_rank=32), tmp_path / "lite")
    ids = torch.randint(2, 101, (1, 12), generator=torch.Generator().manual_seed(4))
    ref = glmkit.load(directory, dtype="float32").logits(ids)
    err = (glmkit.load(directory, quantize=bits, dtype="float32").logits(ids) - ref).norm() / ref.norm()
    assert err < (0.03 if bits == "int8" else 0.15)


def test_unsupported_variants_are_named(tmp_path):
    import transformers

    from glmkit.config import ModelConfig

    with pytest.raises(UnsupportedArchitectureError, match="glm5_next.*not supported yet.*linear-attention"):
        ModelConfig.from_hf_dict(transformers.Glm5NextConfig().to_dict())
    config = hf_model("lite").config.to_dict()
    with pytest.raises(UnsupportedArchitectureError, match="qk_rope_head_dim"):
        ModelConfig.from_hf_dict({**config, "qk_rope_head_dim": 0})
    with pytest.raises(UnsupportedArchitectureError, match="linear-attention"):
        ModelConfig.from_hf_dict({**config, "layer_types": ["full_attention", "linear_attention", "full_attention"]})


# ------------------------------------------------------------------------------ GGUF, as llama.cpp writes it
GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
              "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
              "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.o_proj": "attn_output",
              "self_attn.indexer.wq_b": "indexer.attn_q_b", "self_attn.indexer.wk": "indexer.attn_k",
              "self_attn.indexer.k_norm": "indexer.k_norm", "self_attn.indexer.weights_proj": "indexer.proj",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
              "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp"}


def write_mla_gguf(hf, path, qtype: str = "F32", gating: int | None = 2, split_kv_b: bool = True) -> None:
    """The model as llama.cpp's converter writes GLM-4.7-Flash (arch deepseek2: DeepseekV2Model) and GLM-5
    (glm-dsa, with the indexer keys): one kv head of kv_lora_rank + rope dims, the per-head sizes in *_mla keys,
    kv_b split into attn_k_b (transposed) and attn_v_b (or whole, as older files have it), experts stacked, the
    correction bias as exp_probs_b; 2-D weights stored in `qtype` and written back into `hf`, so both hold the
    same rounded values. gating None: no expert_gating_func key (the early GLM-4.7-Flash files)."""
    import gguf
    from test_gguf import finish, gguf_writer, roundtrip

    c = hf.config
    dsa = c.model_type == "glm_moe_dsa"
    w = gguf_writer(path, "glm-dsa" if dsa else "deepseek2", c, rope_dims=c.qk_rope_head_dim)
    w.add_head_count_kv(1)
    w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    w.add_value_length(c.kv_lora_rank)
    w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    w.add_value_length_mla(c.v_head_dim)
    w.add_kv_lora_rank(c.kv_lora_rank)
    if c.q_lora_rank is not None:
        w.add_q_lora_rank(c.q_lora_rank)
    w.add_leading_dense_block_count(c.mlp_layer_types.index("sparse"))
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_expert_group_count(c.n_group)
    w.add_expert_group_used_count(c.topk_group)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    w.add_expert_weights_norm(c.norm_topk_prob)
    if gating is not None:
        w.add_expert_gating_func(gguf.ExpertGatingFuncType(gating))
    if dsa:
        w.add_indexer_head_count(c.index_n_heads)
        w.add_indexer_key_length(c.index_head_dim)
        w.add_indexer_top_k(c.index_topk)
        w.add_array("glm-dsa.attention.indexer.types", [t == "full" for t in c.indexer_types])
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    stored = {}
    for key, value in hf.state_dict().items():
        value = value.detach().float()
        if key in top:
            raw, values, t = roundtrip(value.numpy(), qtype if value.dim() == 2 else "F32")
            w.add_tensor(top[key], raw, raw_dtype=t)
            stored[key] = values
            continue
        i, rest = key[len("model.layers."):].split(".", 1)
        module, kind = rest.rsplit(".", 1)
        if module == "mlp.experts":
            I = c.moe_intermediate_size
            parts = ({"ffn_gate_exps": value[:, :I], "ffn_up_exps": value[:, I:]} if kind == "gate_up_proj" else
                     {"ffn_down_exps": value})
            for name, part in parts.items():
                w.add_tensor(f"blk.{i}.{name}.weight", part.contiguous().numpy())
            continue
        if module == "self_attn.kv_b_proj" and split_kv_b:
            kv_b = value.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, -1)
            k_b, v_b = kv_b.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
            w.add_tensor(f"blk.{i}.attn_k_b.weight", k_b.transpose(1, 2).contiguous().numpy())
            w.add_tensor(f"blk.{i}.attn_v_b.weight", v_b.contiguous().numpy())
            continue
        name = ("exp_probs_b.bias" if kind == "e_score_correction_bias" else
                f"{GGUF_NAMES.get(module, 'attn_kv_b')}.{kind}")
        linear = value.dim() == 2 and module not in ("mlp.gate", "self_attn.kv_b_proj")
        raw, values, t = roundtrip(value.numpy(), qtype if linear else "F32")
        w.add_tensor(f"blk.{i}.{name}", raw, raw_dtype=t)
        stored[key] = values
    finish(w)
    hf.load_state_dict({**hf.state_dict(), **{k: torch.from_numpy(v).reshape(hf.state_dict()[k].shape)
                                              for k, v in stored.items()}})


@pytest.mark.parametrize("kind, qtype, split", [("lite", "F32", True), ("lite", "Q8_0", False), ("dsa", "F32", True),
                                                ("dsa", "Q8_0", True)])
def test_gguf_equals_transformers_on_the_same_rounded_weights(tmp_path, kind, qtype, split):
    overrides = {"hidden_size": 64, "q_lora_rank": 32, "kv_lora_rank": 32, "v_head_dim": 16}
    if kind == "dsa":
        overrides.update(index_topk_freq=2, index_skip_topk_offset=1, num_hidden_layers=4)
    model = hf_model(kind, **overrides)
    write_mla_gguf(model, tmp_path / "m.gguf", qtype, split_kv_b=split)
    llm = glmkit.load(tmp_path / "m.gguf", dtype="float32")
    assert llm.config.mla == glmkit.load(saved(model, tmp_path / "hf"), dtype="float32").config.mla
    ids = torch.randint(0, 101, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    assert (llm.logits(ids) - ref).abs().max() < 1e-4


def test_gguf_gating_is_read_from_the_file(tmp_path):
    """GLM-4.7-Flash's first community GGUFs declared no gating function (softmax, for llama.cpp's deepseek2):
    glmkit reads what the file says (and says why the answers may be worse); a file saying sigmoid runs sigmoid."""
    model = hf_model("lite")
    write_mla_gguf(model, tmp_path / "sigmoid.gguf", gating=2)
    assert glmkit.load(tmp_path / "sigmoid.gguf", dtype="float32").config.moe.scoring == "sigmoid"
    write_mla_gguf(model, tmp_path / "old.gguf", gating=None)
    with pytest.warns(UserWarning, match="softmax.*GLM-4.7-Flash"):
        old = glmkit.load(tmp_path / "old.gguf", dtype="float32")
    assert old.config.moe.scoring == "softmax"
    router = old.model.layers[1].mlp.router  # llama.cpp's build_moe_ffn with softmax gating, written out
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    probs = torch.nn.functional.linear(x, router.weight).softmax(dim=-1)
    groups = (probs + router.e_score_correction_bias).view(5, 2, 4)
    best = groups.topk(2, dim=-1).values.sum(-1).argmax(-1)  # topk_group 1 of n_group 2
    choice = torch.stack([groups[n, best[n]] for n in range(5)])  # (5, 4): the kept group's biased scores
    chosen = choice.topk(2, dim=-1).indices + 4 * best[:, None]
    weights = probs.gather(1, chosen)
    experts, got = router(x)
    assert torch.equal(experts.sort(-1).values, chosen.sort(-1).values)
    want = weights / weights.sum(-1, keepdim=True) * 1.8
    torch.testing.assert_close(got.gather(1, experts.argsort(-1)), want.gather(1, chosen.argsort(-1)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lite", "dsa"])
def test_the_compiled_step_covers_latent_attention(tmp_path, monkeypatch, kind):
    """The compiled one-token step (AOTInductor) runs the absorbed latent attention and the indexer; greedy tokens
    equal eager ones (eight indexer heads: few exactly equal scores for top-k to pick among)."""
    monkeypatch.setenv("GLMKIT_HOME", str(tmp_path / "home"))
    overrides = {"index_topk_freq": 2, "index_skip_topk_offset": 1, "num_hidden_layers": 4,
                 "index_n_heads": 8} if kind == "dsa" else {}
    llm = glmkit.load(saved(hf_model(kind, **overrides), tmp_path / "m"), dtype="float32")
    prompt = list(range(2, 14))
    eager = llm.generate(prompt, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    decoder = llm.compile()
    assert decoder.ready, decoder.error
    assert llm.generate(prompt, max_tokens=16, temperature=0, ignore_eos=True).token_ids == eager
