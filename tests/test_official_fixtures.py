"""Parity with the official ChatGLM remote code (golden files in tests/fixtures, see their READMEs).

chatglm-official-rich/: THUDM checkpoint directories (v1, v1 with [MASK], v3, GLM-4-like v3) with the
official full-sequence logits, positions, masks and cached greedy steps. chatglm-official/: head-dim-4
models (from chatglm.cpp's test suite) with three KV-cache steps of final hidden states.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import glmkit
from glmkit.config import ModelConfig
from glmkit.kv_cache import KVCache
from glmkit.loaders import fill
from glmkit.loaders.keymap import map_tensors
from glmkit.loaders.layouts import THUDM_V1, THUDM_V2
from glmkit.model import Transformer
from glmkit.model import attention_mask
from glmkit.positions import prompt_positions

FIXTURES = Path(__file__).parent / "fixtures"
RICH = FIXTURES / "chatglm-official-rich"
CASES = [("v1", ""), ("v1", "long_"), ("v1-mask", ""), ("v1-mask", "with_gmask_"),
         ("v3", ""), ("v3", "long_"), ("v3-glm4like", ""), ("v3-glm4like", "long_")]


@pytest.fixture(scope="module")
def rich():
    return {name: (glmkit.load(RICH / name), load_file(RICH / name / "expected.safetensors"))
            for name in ("v1", "v1-mask", "v3", "v3-glm4like")}


@pytest.mark.parametrize("folder,prefix", CASES)
def test_full_logits_match_official(rich, folder, prefix):
    llm, exp = rich[folder]
    for ids, logits in ((exp[prefix + "input_ids"], exp[prefix + "logits"]),
                        (exp[prefix + "full_ids"], exp[prefix + "full_logits"])):
        torch.testing.assert_close(llm.logits(ids), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("folder,prefix", CASES)
def test_positions_and_mask_match_official(rich, folder, prefix):
    llm, exp = rich[folder]
    for ids_key, pos_key, mask_key in (("input_ids", "position_ids", "attention_mask"),
                                       ("full_ids", "full_position_ids", "full_attention_mask")):
        ids = exp[prefix + ids_key]
        positions, prefix_len = prompt_positions(ids, llm.config)
        assert torch.equal(positions, exp[prefix + pos_key])
        T = ids.shape[1]
        allowed = attention_mask(T, T, 0, prefix_len, ids.device).expand(1, 1, T, T)
        assert torch.equal(~allowed, exp[prefix + mask_key])  # official convention: True = masked out


@pytest.mark.parametrize("folder,prefix", CASES)
def test_cached_steps_match_official_step_logits(rich, folder, prefix):
    """Prompt pass then one-token KV-cache steps, fed the official greedy tokens (teacher forcing)."""
    llm, exp = rich[folder]
    ids, greedy, step_logits = exp[prefix + "input_ids"], exp[prefix + "greedy_ids"], exp[prefix + "step_logits"]
    full_positions = exp[prefix + "full_position_ids"]
    T = ids.shape[1]
    cache = KVCache(llm.config, 1, T + greedy.shape[1])
    positions, prefix_len = prompt_positions(ids, llm.config)
    with torch.inference_mode():
        out = [llm.model(ids, positions, cache, 0, prefix_len)[:, -1]]
        for k in range(greedy.shape[1] - 1):
            step_pos = full_positions[..., T + k: T + k + 1]  # official decode-step positions
            out.append(llm.model(greedy[:, k: k + 1], step_pos, cache, T + k, prefix_len)[:, -1])
    got = torch.cat(out)
    torch.testing.assert_close(got, step_logits, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax(-1), greedy[0])


# ------------------------------------------------------------------ chatglm.cpp head-dim-4 files
V1_KEYS = dict(hidden_size=32, num_attention_heads=8, num_layers=1, inner_hidden_size=128, vocab_size=5,
               position_encoding_2d=True, layernorm_epsilon=1e-5, bos_token_id=3, eos_token_id=4,
               mask_token_id=1, gmask_token_id=2, max_sequence_length=64)
V2_KEYS = dict(hidden_size=32, num_attention_heads=8, num_layers=1, kv_channels=4, ffn_hidden_size=48,
               padded_vocab_size=5, multi_query_attention=True, multi_query_group_num=2, rmsnorm=True,
               add_qkv_bias=True, add_bias_linear=False, seq_length=64,
               tie_word_embeddings=True)  # these files have no output layer; only hidden states are compared
V1_WEIGHTS = [("word_embeddings.weight", (5, 32)), ("layers.0.input_layernorm.weight", (32,)),
              ("layers.0.input_layernorm.bias", (32,)), ("layers.0.attention.query_key_value.weight", (96, 32)),
              ("layers.0.attention.query_key_value.bias", (96,)), ("layers.0.attention.dense.weight", (32, 32)),
              ("layers.0.attention.dense.bias", (32,)), ("layers.0.post_attention_layernorm.weight", (32,)),
              ("layers.0.post_attention_layernorm.bias", (32,)), ("layers.0.mlp.dense_h_to_4h.weight", (128, 32)),
              ("layers.0.mlp.dense_h_to_4h.bias", (128,)), ("layers.0.mlp.dense_4h_to_h.weight", (32, 128)),
              ("layers.0.mlp.dense_4h_to_h.bias", (32,)), ("final_layernorm.weight", (32,)),
              ("final_layernorm.bias", (32,))]
V2_WEIGHTS = [("embedding.word_embeddings.weight", (5, 32)), ("encoder.layers.0.input_layernorm.weight", (32,)),
              ("encoder.layers.0.self_attention.query_key_value.weight", (48, 32)),
              ("encoder.layers.0.self_attention.query_key_value.bias", (48,)),
              ("encoder.layers.0.self_attention.dense.weight", (32, 32)),
              ("encoder.layers.0.post_attention_layernorm.weight", (32,)),
              ("encoder.layers.0.mlp.dense_h_to_4h.weight", (96, 32)),
              ("encoder.layers.0.mlp.dense_4h_to_h.weight", (32, 48)), ("encoder.final_layernorm.weight", (32,))]
STEPS = [("x1", (1, 3), "y1", (3, 32)), ("x2", (1, 1), "y2", (1, 32)), ("x3", (1, 1), "y3", (1, 32))]


def _read_data(path: Path, weights, prefix_shape=None):
    raw, offset, out = path.read_bytes(), 0, {}
    for name, shape, dtype in ([("prefix", prefix_shape, np.float16)] * (prefix_shape is not None)
                               + [(n, s, np.float32) for n, s in weights]
                               + [(n, s, dt) for x, xs, y, ys in STEPS for n, s, dt in
                                  ((x, xs, np.int32), (y, ys, np.float32))]):
        count = int(np.prod(shape))
        out[name] = torch.from_numpy(np.frombuffer(raw, dtype, count, offset).reshape(shape).copy())
        offset += count * np.dtype(dtype).itemsize
    assert offset == len(raw), "the file layout differs from the README"
    return out


@pytest.mark.parametrize("file,keys,rope_ratio,eps,prefix_shape,atol", [
    ("glm_model.data", V1_KEYS, None, 1e-5, None, 1e-5),
    ("glm3_model.data", V2_KEYS, None, 1e-5, None, 1e-5),
    ("glm4_model.data", V2_KEYS, 500, 1.5625e-07, None, 1e-5),
    # P-tuning v2: a float16 prefix of 5 past positions; the README's float16 limits are 2e-5 and 2e-4
    ("glm_ptuning_v2_model.data", V1_KEYS, None, 1e-5, (2, 8, 5, 4), 2e-5),
    ("glm3_ptuning_v2_model.data", V2_KEYS, None, 1e-5, (2, 2, 5, 4), 2e-4),
])
def test_chatglm_cpp_kv_cache_steps(file, keys, rope_ratio, eps, prefix_shape, atol):
    v1 = keys is V1_KEYS
    raw = {**keys, "layernorm_epsilon": eps, **({"rope_ratio": rope_ratio} if rope_ratio else {})}
    config = ModelConfig.from_hf_dict(raw)  # the production config path
    data = _read_data(FIXTURES / "chatglm-official" / file, V1_WEIGHTS if v1 else V2_WEIGHTS, prefix_shape)
    named = [(f"transformer.{n}", file, (lambda t=data[n]: t)) for n, _ in (V1_WEIGHTS if v1 else V2_WEIGHTS)]
    tensors, sources = map_tensors((THUDM_V1 if v1 else THUDM_V2).table, named, config)  # the production name table
    model = fill(Transformer.skeleton(config), tensors, sources, torch.device("cpu"), torch.float32)
    P = 0 if prefix_shape is None else prefix_shape[2]
    cache = KVCache(config, 1, P + 8)
    if P:  # layer 0 key, layer 0 value, layer 1 key, ...: extra past positions every token sees, no rotary
        cache.write_prefix(data["prefix"][0::2].float(), data["prefix"][1::2].float())
    if v1:  # positions and prefix from the README: tokens 0 and 1 see each other, token 2 sees all three
        steps = [(torch.tensor([[[0, 1, 1], [0, 0, 1]]]), 0), (torch.tensor([[[1], [2]]]), 3),
                 (torch.tensor([[[1], [3]]]), 4)]
        prefix_len = torch.tensor([P + 2])
    else:
        steps = [(torch.arange(3)[None], 0), (torch.tensor([[3]]), 3), (torch.tensor([[4]]), 4)]
        prefix_len = None
    with torch.inference_mode():
        for (x, _, y, _), (positions, start) in zip(STEPS, steps):  # real tokens keep their own positions
            h = model.hidden_states(data[x].long(), positions, cache, P + start, prefix_len)
            torch.testing.assert_close(h[0], data[y], atol=atol, rtol=0)
