"""Shared helpers: tiny random transformers models saved to disk, their THUDM-layout twins, and a live server."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

# `glmkit chat` / `serve` build a compiled decode step in the background by default; the commands the tests
# run would each start one (minutes of compiler processes) and exit before it finishes
os.environ.setdefault("GLMKIT_BUILD", "0")

# Tiny configurations that differ where the architectures differ: KV groups (1 and 2+), tied and
# untied embeddings, rope bases, odd head counts, biases.
GLM_CONFIGS = {
    "mqa-untied": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, rope_theta=10000.0),
    "gqa-tied": dict(num_attention_heads=6, num_key_value_heads=2, head_dim=8, rope_theta=5e6,
                     tie_word_embeddings=True),
    "odd-heads": dict(num_attention_heads=3, num_key_value_heads=3, head_dim=12, rope_theta=500000.0),
}
LLAMA_CONFIGS = {
    "mqa-tied": dict(num_attention_heads=3, num_key_value_heads=1, head_dim=16, rope_theta=100000.0,
                     tie_word_embeddings=True),
    "gqa-bias": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
                     attention_bias=True, mlp_bias=True),
    "mha-odd": dict(num_attention_heads=5, num_key_value_heads=5, head_dim=8, hidden_size=40, rope_theta=500000.0),
}


def make_hf_model(kind: str, overrides: dict, seed: int = 0, **extra):
    """A tiny random transformers model (GlmForCausalLM, Glm4ForCausalLM or LlamaForCausalLM) in float32."""
    import transformers

    cls_config, cls_model = {
        "glm": (transformers.GlmConfig, transformers.GlmForCausalLM),
        "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[kind]
    kw = dict(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    kw.update(overrides)
    kw.update(extra)
    theta = kw.pop("rope_theta")
    fraction = kw.pop("partial_rotary_factor", None)
    config = cls_config(**kw)
    _set_rope(config, theta, fraction)
    torch.manual_seed(seed)
    model = cls_model(config).eval()
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: randomise everything
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def assert_greedy_agrees(reference, tokens: list[int], margin: float) -> None:
    """Greedy `tokens` equal `reference`'s (a Completion generated with logprobs=2) up to the first step where
    the reference's top two log-probabilities lie within `margin` (rounding of a bfloat16 model may then pick
    either, and the texts may part there); a difference at any clearer step fails."""
    for step, (want, got, (_, top)) in enumerate(zip(reference.token_ids, tokens, reference.logprobs)):
        first, second = sorted(top.values(), reverse=True)[:2]
        if first - second < margin:
            return
        assert got == want, f"greedy token {step} differs ({got} != {want}) where the reference's margin is {first - second:.3f}"
    assert len(tokens) == len(reference.token_ids)


def _set_rope(config, theta: float, fraction: float | None) -> None:
    if getattr(config, "rope_parameters", None) is not None:  # transformers 5.x
        config.rope_parameters["rope_theta"] = theta
        if fraction is not None:
            config.rope_parameters["partial_rotary_factor"] = fraction
    else:  # transformers 4.x
        config.rope_theta = theta
        if fraction is not None:
            config.partial_rotary_factor = fraction


def write_thudm_glm(hf_model, directory: Path, *, as_bin: bool = False) -> Path:
    """Write a transformers Glm model in the THUDM remote-code layout (names and config.json keys),
    the inverse of transformers' convert_glm_weights_to_hf.py. Optionally as sharded .bin files."""
    c = hf_model.config
    sd = hf_model.state_dict()
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
           "transformer.rotary_pos_emb.inv_freq": torch.ones(4)}  # present in real files, must be dropped
    if not c.tie_word_embeddings:
        out["transformer.output_layer.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        out[dst + "self_attention.dense.weight"] = sd[src + "self_attn.o_proj.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.dense_h_to_4h.weight"] = sd[src + "mlp.gate_up_proj.weight"]
        out[dst + "mlp.dense_4h_to_h.weight"] = sd[src + "mlp.down_proj.weight"]
    theta = (c.rope_parameters or {}).get("rope_theta") if hasattr(c, "rope_parameters") else c.rope_theta
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
              "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
              "num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "ffn_hidden_size": c.intermediate_size,
              "kv_channels": c.head_dim, "num_attention_heads": c.num_attention_heads,
              "multi_query_attention": c.num_key_value_heads != c.num_attention_heads,
              "multi_query_group_num": c.num_key_value_heads, "padded_vocab_size": c.vocab_size,
              "rope_ratio": theta / 10000.0, "layernorm_epsilon": c.rms_norm_eps, "rmsnorm": True,
              "add_qkv_bias": True, "add_bias_linear": False, "apply_residual_connection_post_layernorm": False,
              "post_layer_norm": True, "original_rope": True, "seq_length": c.max_position_embeddings,
              "tie_word_embeddings": bool(c.tie_word_embeddings), "eos_token_id": c.eos_token_id,
              "pad_token_id": c.pad_token_id, "torch_dtype": "float32", "apply_query_key_layer_scaling": True,
              "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "fp32_residual_connection": False,
              "hidden_dropout": 0.0, "attention_dropout": 0.0, "use_cache": True, "classifier_dropout": None}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if as_bin:
        names = sorted(out)
        shards = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for k, shard in enumerate(shards, 1):
            fname = f"pytorch_model-{k:05d}-of-00002.bin"
            torch.save({n: out[n].clone() for n in shard}, directory / fname)
            weight_map.update({n: fname for n in shard})
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in out.items()}, directory / "model.safetensors")
    return directory


@pytest.fixture
def random_ids():
    def make(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (batch, length), generator=g)
    return make


@pytest.fixture(scope="session")
def vocab_dirs(tmp_path_factory):
    """Tokenizer directories of every kind, built once per test session (see vocab.py)."""
    from vocab import build_vocab_dirs

    return build_vocab_dirs(tmp_path_factory.mktemp("vocab"))


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are deselected (reported as such, never as passed) where torch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if "gpu" not in item.keywords]


class CodeOnUnpickle:
    """Pickled, it would create a marker file when unpickled: what a hostile checkpoint or run state carries."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class LiveServer:
    """uvicorn serving a glmkit app on a free loopback port, in a background thread, on the HTTP protocol glmkit
    serve runs."""

    def __init__(self, llm, **kw):
        import uvicorn

        from glmkit.server.app import create_app
        from glmkit.server.protocol import http_protocol

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = create_app(llm, model_name="tiny", **kw)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error",
                                                    http=http_protocol()))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="k1"):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
