"""ModelConfig: validation, and the THUDM / transformers spellings of the real GLM configs."""

from __future__ import annotations

import math

import pytest

from glmkit.config import ModelConfig
from glmkit.errors import ConfigError

# The real config.json files (values from the reference notes), reduced to what matters.
CHATGLM_6B = {"architectures": ["ChatGLMModel"], "bos_token_id": 130004, "eos_token_id": 130005,
              "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3, "hidden_size": 4096,
              "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05, "max_sequence_length": 2048,
              "model_type": "chatglm", "num_attention_heads": 32, "num_layers": 28, "position_encoding_2d": True,
              "torch_dtype": "float16", "transformers_version": "4.27.1", "use_cache": True, "vocab_size": 130528}
GLM_4_9B_CHAT = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "add_bias_linear": False,
                 "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
                 "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
                 "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": 13696,
                 "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 4096, "kv_channels": 128,
                 "layernorm_epsilon": 1.5625e-07, "multi_query_attention": True, "multi_query_group_num": 2,
                 "num_attention_heads": 32, "num_layers": 40, "original_rope": True, "padded_vocab_size": 151552,
                 "post_layer_norm": True, "rmsnorm": True, "rope_ratio": 500, "seq_length": 131072,
                 "use_cache": True, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
                 "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329}


def test_chatglm_6b_v1():
    c = ModelConfig.from_hf_dict(CHATGLM_6B)
    assert (c.norm, c.mlp, c.residual, c.positions, c.attention_mask) == (
        "layernorm", "gelu_tanh", "deepnorm", "2d", "prefix")
    assert c.residual_alpha == math.sqrt(56) and c.tie_embeddings and c.rope_freq_dtype == "float16"
    assert (c.sop_token_id, c.eop_token_id, c.mask_token_id, c.gmask_token_id) == (130004, 130005, 130000, 130001)
    assert c.rotary_dim == 64 and c.head_dim == 128 and c.num_kv_heads == 32


def test_glm_4_9b_chat():
    c = ModelConfig.from_hf_dict(GLM_4_9B_CHAT)
    assert c.rope_theta == 5e6 and c.rope_layout == "interleaved" and c.rotary_dim == 64
    assert (c.num_kv_heads, c.qkv_size, c.vocab_size, c.max_seq_len) == (2, 4608, 151552, 131072)
    assert c.eos_token_ids == (151329, 151336, 151338) and not c.out_bias and c.qkv_bias


def test_transformers_5_and_4_spellings_agree():
    base = {"model_type": "glm", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "rms_norm_eps": 1e-5, "attention_bias": True}
    v5 = ModelConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                                               "partial_rotary_factor": 0.5}})
    v4 = ModelConfig.from_hf_dict({**base, "rope_theta": 5e6, "partial_rotary_factor": 0.5})
    assert v4 == v5 and v5.rope_theta == 5e6 and v5.rotary_dim == 8


def test_linear_rope_scaling_is_read():
    c = ModelConfig.from_hf_dict({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                                  "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 10000.0})
    assert c.rope_linear_factor == 4.0 and c.head_dim == 4


@pytest.mark.parametrize("key,value,message", [
    ("apply_residual_connection_post_layernorm", True, "apply_residual_connection_post_layernorm=True"),
    ("original_rope", False, "original_rope=False"),
    ("pre_seq_len", 128, "pre_seq_len=128"),
    ("some_new_switch", 1, r"\['some_new_switch'\] are not understood"),
])
def test_thudm_keys_that_change_the_maths_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict({**GLM_4_9B_CHAT, key: value})


def test_hidden_act_other_than_silu_is_refused():
    with pytest.raises(ConfigError, match=r"hidden_act='gelu'"):
        ModelConfig.from_hf_dict({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "hidden_act": "gelu"})


@pytest.mark.parametrize("changes,field", [
    ({"norm": "batchnorm"}, "norm"), ({"mlp": "relu"}, "mlp"), ({"rope_layout": "spiral"}, "rope_layout"),
    ({"positions": "3d"}, "positions"), ({"residual": "post"}, "residual"), ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"num_layers": 0}, "num_layers"), ({"rope_fraction": 1.5}, "rope_fraction"),
    ({"attention_mask": "prefix"}, "sop_token_id"),
])
def test_validation_names_the_field(changes, field):
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=2,
                head_dim=2)
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**base, **changes})


def test_dict_round_trip():
    c = ModelConfig.from_hf_dict(CHATGLM_6B)
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({**c.to_dict(), "colour": "red"})


@pytest.mark.parametrize("key,value,what", [
    ("vision_config", {"depth": 24, "hidden_size": 1536}, "a vision tower"),
    ("n_routed_experts", 128, "Mixture-of-Experts"),
    ("num_experts_per_tok", 8, "Mixture-of-Experts"),
    ("kv_lora_rank", 512, "latent attention"),
    ("index_topk", 2048, "a sparse-attention indexer"),
    ("sliding_window", 4096, "sliding-window"),
])
def test_unsupported_architecture_features_are_refused_by_name(key, value, what):
    """A GLM-4-shaped config carrying a key of a feature glmkit does not run yet is refused naming the key,
    never read as a plainer model."""
    from glmkit.errors import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match=rf"unsupported architecture feature '{key}' \({what}"):
        ModelConfig.from_hf_dict({**GLM_4_9B_CHAT, key: value})
    transformers_glm4 = {"model_type": "glm4", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, key: value}
    with pytest.raises(UnsupportedArchitectureError, match=f"'{key}'"):
        ModelConfig.from_hf_dict(transformers_glm4)
    ModelConfig.from_hf_dict({**transformers_glm4, key: None})  # switched off: nothing to refuse


def test_switched_off_sliding_window_is_accepted():
    c = ModelConfig.from_hf_dict({"model_type": "llama", "vocab_size": 100, "hidden_size": 32,
                                  "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "sliding_window": 4096, "use_sliding_window": False})
    assert c.num_layers == 2


def test_sub_configs_round_trip_and_the_model_refuses_what_it_does_not_run():
    from glmkit.config import MLAConfig, MoEConfig
    from glmkit.errors import ConfigError
    from glmkit.model import Transformer

    base = ModelConfig.from_hf_dict(GLM_4_9B_CHAT).to_dict()
    assert "moe" not in base  # absent sub-configs stay out of glmkit's spelling
    moe = ModelConfig.from_dict({**base, "num_layers": 1, "moe": {"num_experts": 8, "experts_per_token": 2,
                                                                  "expert_size": 64}})
    assert isinstance(moe.moe, MoEConfig) and ModelConfig.from_dict(moe.to_dict()) == moe
    assert Transformer.skeleton(moe).layers[0].mlp.experts.gate_up_proj.shape == (8, 128, base["hidden_size"])
    with pytest.raises(ConfigError, match="num_experts must be a multiple of groups"):
        ModelConfig.from_dict({**base, "moe": {"num_experts": 8, "experts_per_token": 2, "expert_size": 64,
                                               "groups": 3}})
    mla = ModelConfig.from_dict({**base, "num_layers": 1, "head_dim": 8, "mla": MLAConfig(16, 16, 8, 16).__dict__})
    assert ModelConfig.from_dict(mla.to_dict()) == mla
    assert Transformer.skeleton(mla).layers[0].attn.kv_b.weight.shape == (base["num_heads"] * 32, 16)
    with pytest.raises(ConfigError, match="an indexer reads the q_lora_rank latent"):
        ModelConfig.from_dict({**base, "mla": {**MLAConfig(16, 16, 8, 16).__dict__, "index_topk": 4,
                                               "index_heads": 2, "index_head_dim": 16}})
    tower = {"depth": 1, "hidden_size": 8, "num_heads": 2, "patch_size": 14, "out_hidden_size": base["hidden_size"],
             "intermediate_size": 16}
    vision = ModelConfig.from_dict({**base, "num_layers": 1, "vision": tower, "positions": "mrope",
                                    "mrope_section": [16, 8, 8]})
    assert ModelConfig.from_dict(vision.to_dict()) == vision
    assert Transformer.skeleton(vision).visual.merger.gate_proj.weight.shape == (16, base["hidden_size"])
    with pytest.raises(ConfigError, match="out_hidden_size"):
        ModelConfig.from_dict({**base, "vision": {**tower, "out_hidden_size": 8}})
    with pytest.raises(ConfigError, match="mrope_section"):
        ModelConfig.from_dict({**base, "positions": "mrope", "mrope_section": [8, 8, 8]})
