"""Parity with transformers' own classes: build a tiny random model, save it with save_pretrained,
load it through glmkit's production loader, compare logits on a batch (float32, atol 1e-5)."""

from __future__ import annotations

import pytest
import torch

import glmkit
from conftest import GLM_CONFIGS, LLAMA_CONFIGS, make_hf_model, write_thudm_glm

CASES = ([("glm", name, cfg) for name, cfg in GLM_CONFIGS.items()]
         + [("glm4", name, cfg) for name, cfg in GLM_CONFIGS.items()]
         + [("llama", name, cfg) for name, cfg in LLAMA_CONFIGS.items()])


def _reference_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


@pytest.mark.parametrize("kind,name,cfg", CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_logits_match_transformers(tmp_path, random_ids, kind, name, cfg):
    hf = make_hf_model(kind, cfg)
    hf.save_pretrained(tmp_path)
    llm = glmkit.load(tmp_path, device="cpu", dtype="float32")
    ids = random_ids(3, 23, hf.config.vocab_size)
    torch.testing.assert_close(llm.logits(ids), _reference_logits(hf, ids), atol=1e-5, rtol=0)
    assert llm.config.tie_embeddings == bool(hf.config.tie_word_embeddings)
    assert llm.config.num_kv_heads == hf.config.num_key_value_heads


def test_sharded_safetensors_with_index(tmp_path, random_ids):
    hf = make_hf_model("glm4", GLM_CONFIGS["gqa-tied"], seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = random_ids(2, 9, hf.config.vocab_size)
    torch.testing.assert_close(glmkit.load(tmp_path).logits(ids), _reference_logits(hf, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("as_bin", [False, True], ids=["safetensors", "sharded-bin"])
@pytest.mark.parametrize("name", list(GLM_CONFIGS))
def test_thudm_layout_gives_identical_logits(tmp_path, random_ids, name, as_bin):
    """The same random GLM weights under THUDM remote-code names and config keys load to the same logits."""
    hf = make_hf_model("glm", GLM_CONFIGS[name], seed=5)
    hf.save_pretrained(tmp_path / "hf")
    write_thudm_glm(hf, tmp_path / "thudm", as_bin=as_bin)
    ids = random_ids(2, 17, hf.config.vocab_size)
    thudm = glmkit.load(tmp_path / "thudm").logits(ids)
    assert torch.equal(thudm, glmkit.load(tmp_path / "hf").logits(ids))
    torch.testing.assert_close(thudm, _reference_logits(hf, ids), atol=1e-5, rtol=0)


def test_transformers_4x_config_spelling(tmp_path, random_ids):
    """transformers 4.x wrote rope_theta / partial_rotary_factor at the top level instead of rope_parameters."""
    import json

    hf = make_hf_model("glm", GLM_CONFIGS["mqa-untied"], seed=7)
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    rope = raw.pop("rope_parameters", None) or {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    raw["rope_theta"], raw["partial_rotary_factor"] = rope["rope_theta"], rope.get("partial_rotary_factor", 0.5)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ids = random_ids(2, 11, hf.config.vocab_size)
    torch.testing.assert_close(glmkit.load(tmp_path).logits(ids), _reference_logits(hf, ids), atol=1e-5, rtol=0)


def test_bfloat16_load_stays_close_to_float32(tmp_path, random_ids):
    hf = make_hf_model("llama", LLAMA_CONFIGS["gqa-bias"], seed=9)
    hf.save_pretrained(tmp_path)
    ids = random_ids(2, 13, hf.config.vocab_size)
    low = glmkit.load(tmp_path, dtype="bfloat16")
    assert low.model.layers[0].attn.qkv.weight.dtype == torch.bfloat16
    torch.testing.assert_close(low.logits(ids), _reference_logits(hf, ids), atol=0.15, rtol=0.05)
