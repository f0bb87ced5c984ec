"""Every way a checkpoint can be wrong gets a glmkit error naming the file or tensor and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmkit
from glmkit.errors import CheckpointError, ConfigError, GlmkitError, UnsupportedArchitectureError
from conftest import GLM_CONFIGS, LLAMA_CONFIGS, CodeOnUnpickle, make_hf_model


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    make_hf_model("glm", GLM_CONFIGS["mqa-untied"]).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_config(directory: Path, **changes) -> None:
    raw = json.loads((directory / "config.json").read_text())
    raw.update(changes)
    (directory / "config.json").write_text(json.dumps(raw))


def _edit_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist.*checkpoint directory"):
        glmkit.load(tmp_path / "nope")


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        glmkit.load(tmp_path / "weights.txt")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        glmkit.load(tmp_path)


def test_invalid_json_config(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        glmkit.load(checkpoint)


def test_unknown_architecture(checkpoint):
    _edit_config(checkpoint, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type='gpt2'.*GPT2LMHeadModel"):
        glmkit.load(checkpoint)


def test_no_weight_files(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no weights"):
        glmkit.load(checkpoint)


def test_missing_tensor(checkpoint):
    _edit_weights(checkpoint, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"no tensor for 'layers.1.mlp.out_proj.weight'"):
        glmkit.load(checkpoint)


def test_unexpected_tensor(checkpoint):
    _edit_weights(checkpoint, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.mystery.weight' in "
                                              r"model.safetensors"):
        glmkit.load(checkpoint)


def test_tensor_the_config_does_not_want(checkpoint):
    _edit_weights(checkpoint, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(48)}))
    with pytest.raises(CheckpointError, match=r"o_proj.bias has no place in this model"):
        glmkit.load(checkpoint)


def test_shape_mismatch(checkpoint):
    _edit_config(checkpoint, intermediate_size=32)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.gate_up_proj.weight has shape \(80, 48\) but "
                                              r"config.json implies \(64, 48\)"):
        glmkit.load(checkpoint)


def test_truncated_safetensors(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated or corrupt.*re-download"):
        glmkit.load(checkpoint)


def test_corrupt_safetensors_header(checkpoint):
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated or corrupt"):
        glmkit.load(checkpoint)


def test_missing_shard_listed_in_index(tmp_path):
    make_hf_model("glm", GLM_CONFIGS["mqa-untied"]).save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard\(s\) \['{shard.name}'\].*incomplete"):
        glmkit.load(tmp_path)


def test_bin_with_pickled_code_is_refused(tmp_path, checkpoint):
    """weights_only=True: a .bin that would run code on unpickling is refused, and the code never runs."""
    (checkpoint / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "evil": CodeOnUnpickle(str(marker))},
               checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin cannot be read as a PyTorch weights file"):
        glmkit.load(checkpoint)
    assert not marker.exists()





def test_python_shipped_with_checkpoint_is_never_run(tmp_path, checkpoint):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\n"
    for name in ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py", "__init__.py"):
        (checkpoint / name).write_text(code)
    _edit_config(checkpoint, auto_map={"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"})
    glmkit.load(checkpoint).logits([1, 2, 3])
    assert not marker.exists()


def test_odd_quantization_bit_is_refused(checkpoint):
    _edit_config(checkpoint, quantization_bit=3)
    with pytest.raises(ConfigError, match=r"quantization_bit=3"):
        glmkit.load(checkpoint)


def test_unknown_maths_key_is_an_error(checkpoint):
    _edit_config(checkpoint, attn_logit_softcapping=30.0)
    with pytest.raises(ConfigError, match=r"\['attn_logit_softcapping'\] are not understood"):
        glmkit.load(checkpoint)


def test_unsupported_rope_scaling_is_an_error(checkpoint):
    _edit_config(checkpoint, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match=r"rope_type 'yarn'"):
        glmkit.load(checkpoint)


def test_bad_token_ids_and_overlong_input(checkpoint):
    llm = glmkit.load(checkpoint)
    with pytest.raises(GlmkitError, match=r"token id 97 is outside this model's vocabulary \(0..96\)"):
        llm.logits([1, 97])
    with pytest.raises(GlmkitError, match=r"has 257 tokens but this model's context is 256"):
        llm.logits([1] * 257)
    with pytest.raises(GlmkitError, match=r"non-empty list of ints"):
        llm.logits([])


def test_bad_device_and_dtype(checkpoint):
    with pytest.raises(GlmkitError, match=r"dtype 'float8' is not supported"):
        glmkit.load(checkpoint, dtype="float8")
    with pytest.raises(GlmkitError, match=r"device 'tpu' is not supported"):
        glmkit.load(checkpoint, device="tpu")


# ---------------------------------------------------------------------------- hostile checkpoints
def test_huge_layer_count_fails_fast(checkpoint):
    """A config claiming far more layers than the weights hold is refused before anything is built."""
    import time

    _edit_config(checkpoint, num_hidden_layers=1_000_000)
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"says 1000000 layers but the weights .* hold 2"):
        glmkit.load(checkpoint)
    assert time.perf_counter() - t < 5


def test_integer_weights_are_refused(checkpoint):
    _edit_weights(checkpoint, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight holds torch.int32 values where a floating-point"):
        glmkit.load(checkpoint)


def test_shard_index_cannot_point_outside_the_checkpoint(tmp_path, checkpoint):
    (tmp_path / "elsewhere").mkdir()
    (checkpoint / "model.safetensors").rename(tmp_path / "elsewhere" / "model.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "../elsewhere/model.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"names shard '../elsewhere/model.safetensors' outside"):
        glmkit.load(checkpoint)


def test_non_utf8_config_is_one_clear_line(checkpoint):
    (checkpoint / "config.json").write_bytes(b'{"model_type": "gl\xff"}')
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        glmkit.load(checkpoint)


def test_legacy_bin_loads(tmp_path, checkpoint):
    """A pre-zip (legacy serialization) pytorch_model.bin cannot be memory-mapped; it is read whole."""
    reference = glmkit.load(checkpoint)
    state = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    torch.save(state, checkpoint / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(glmkit.load(checkpoint).logits(ids), reference.logits(ids))


def test_gguf_without_its_architecture_keys(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"metadata lacks llama.embedding_length"):
        glmkit.load(tmp_path / "bare.gguf")


def test_misshaped_fused_piece_names_that_piece(tmp_path):
    hf = make_hf_model("llama", LLAMA_CONFIGS["gqa-bias"])
    hf.save_pretrained(tmp_path)
    _edit_weights(tmp_path, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight":
                                                t["model.layers.1.self_attn.k_proj.weight"][:-2]}))
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.k_proj.weight has 14 rows but the config "
                                              r"implies 16"):
        glmkit.load(tmp_path)
