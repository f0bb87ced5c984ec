"""GGUF: files written here with the `gguf` package the way llama.cpp's converter writes them (q/k rows
permuted), and the real packaged default model, against transformers' LlamaForCausalLM."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import glmkit
from conftest import LLAMA_CONFIGS, make_hf_model
from glmkit.errors import CheckpointError

QTYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's q/k row permutation (half-split pairs -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def roundtrip(w: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, object]:
    """-> (stored array, its dequantized float32 values, raw GGUF type) for one weight."""
    import gguf
    from gguf import quants

    t = getattr(gguf.GGMLQuantizationType, qtype)
    if qtype == "F32" or w.ndim == 1 or w.shape[-1] % 32:
        return w.astype(np.float32), w.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == "F16":
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32), t
    q = quants.quantize(w.astype(np.float32), t)
    return q, quants.dequantize(q, t), t


def write_gguf(hf, path, qtype: str, sampling: dict | None = None):
    """Write a transformers Llama model as llama.cpp would (with general.sampling.* keys when given, through
    gguf's own add_sampling_* writers); return the state dict of the values stored."""
    c, sd = hf.config, {k: v.float().numpy() for k, v in hf.state_dict().items()}
    w = gguf_writer(path, "llama", c, rope_dims=c.head_dim)
    for key, value in (sampling or {}).items():
        getattr(w, f"add_sampling_{key}")(value)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    stored = {}
    for key, value in sd.items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if key.startswith("model.layers."):
            i, rest = key[len("model.layers."):].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{per_layer[module]}.{kind}"
        else:
            name = names[key]
        heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(name.split(".")[-2])
        data = converter_permute(value, heads) if heads else value
        raw, values, t = roundtrip(data, qtype)
        w.add_tensor(name, raw, raw_dtype=t)
        stored[key] = torch.from_numpy(converter_permute_inverse(values, heads) if heads else values)
    finish(w)
    return stored


def gguf_writer(path, arch: str, c, rope_dims: int):
    """A GGUFWriter with the hyperparameters every architecture's converter writes."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    return w


def finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def converter_permute_inverse(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("name", ["mqa-tied", "gqa-bias"])
def test_gguf_matches_transformers(tmp_path, random_ids, qtype, name):
    hf = make_hf_model("llama", LLAMA_CONFIGS[name], hidden_size=96 if name == "mqa-tied" else 32,
                       intermediate_size=64, seed=21)
    stored = write_gguf(hf, tmp_path / "m.gguf", qtype)
    if qtype != "F32":  # the reference holds exactly the values the file stores (the format's rounding)
        hf.load_state_dict({**hf.state_dict(), **stored})
    ids = random_ids(2, 13, hf.config.vocab_size)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    got = glmkit.load(tmp_path / "m.gguf", dtype="float32").logits(ids)  # the float reference path
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_gguf_sampling_settings_become_the_defaults(tmp_path):
    """A GGUF's general.sampling.* keys (the authors' settings, as llama.cpp reads them) are the model's defaults;
    keys it leaves out are neutral, and a request's own values still win."""
    hf = make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], vocab_size=64, hidden_size=48, intermediate_size=64)
    write_gguf(hf, tmp_path / "s.gguf", "F32", sampling={"temp": 0.6, "top_k": 20, "penalty_repeat": 1.1})
    llm = glmkit.load(tmp_path / "s.gguf")
    assert llm.defaults == pytest.approx({"temperature": 0.6, "top_k": 20, "top_p": 1.0, "min_p": 0.0,
                                          "repetition_penalty": 1.1})
    params = llm.sampling_params(temperature=0.2)
    assert (params.temperature, params.top_k, params.repetition_penalty) == (0.2, 20, pytest.approx(1.1))
    write_gguf(hf, tmp_path / "plain.gguf", "F32")
    assert glmkit.load(tmp_path / "plain.gguf").defaults == {"temperature": 0.8, "top_k": 40, "top_p": 0.95,
                                                              "min_p": 0.05}  # llama-server's


def test_gguf_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        glmkit.load(tmp_path / "missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        glmkit.load(tmp_path / "bad.gguf")


# ------------------------------------------------------------------------------ the default model
@pytest.fixture(scope="module")
def default_model():
    from glmkit.loaders.hub import DEFAULT_MODEL, pull

    return pull(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def default_llm(default_model):
    return glmkit.load(default_model, dtype="float32")


def test_lean_reader_equals_gguf_reader(default_model, monkeypatch):
    """glmkit's header reader gives gguf's GGUFReader's values for every field and tensor of the default
    model, and dequantizing a few rows at a time gives gguf's own dequantization."""
    import numpy as np
    from gguf import quants

    from glmkit.loaders import gguf as loader

    theirs, ours = gguf.GGUFReader(str(default_model)), loader.open_gguf(default_model)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert keys == list(ours.fields)
    for key in keys:
        assert theirs.fields[key].contents() == ours.fields[key].contents(), key
    assert [(t.name, t.tensor_type, tuple(int(n) for n in t.shape)) for t in theirs.tensors] == \
        [(t.name, t.tensor_type, t.shape) for t in ours.tensors]
    monkeypatch.setattr(loader, "CHUNK", 5000)  # many chunks, one of them partial
    for i in (0, 1, len(ours.tensors) - 1):  # the Q8_0 embedding, a Q4_1 matrix, the F32 norm
        a, b = theirs.tensors[i], ours.tensors[i]
        assert np.array_equal(np.asarray(a.data), b.data)
        expected = quants.dequantize(np.asarray(a.data), a.tensor_type).reshape(tuple(reversed(b.shape)))
        assert torch.equal(loader.dequantize(b), torch.from_numpy(np.ascontiguousarray(expected, np.float32)))


def test_truncated_gguf_names_the_tensor(tmp_path, default_model):
    data = default_model.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*runs past the end|runs past the end"):
        glmkit.load(tmp_path / "cut.gguf")


@pytest.mark.slow
def test_default_model_logits_match_transformers(default_model, default_llm):
    from transformers import LlamaConfig, LlamaForCausalLM

    from glmkit.loaders.gguf import dequantize, metadata, open_gguf

    llm = default_llm
    reader, c = open_gguf(default_model), llm.config
    meta = metadata(reader)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"], tie_word_embeddings=True,
        rope_theta=meta["llama.rope.freq_base"], max_position_embeddings=8192)).eval()
    hf.config.rope_parameters["rope_theta"] = meta["llama.rope.freq_base"]
    hf = LlamaForCausalLM(hf.config).eval()
    back = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
            "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    sd = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        values = dequantize(t).numpy()
        if parts[0] == "blk":
            heads = {"attn_q": c.num_heads, "attn_k": c.num_kv_heads}.get(parts[2])
            values = converter_permute_inverse(values, heads) if heads else values
            sd[f"model.layers.{parts[1]}.{back[parts[2]]}.{parts[3]}"] = torch.from_numpy(values.copy())
        else:
            sd[f"{back[parts[0]]}.{parts[1]}"] = torch.from_numpy(values.copy())
    hf.load_state_dict(sd, strict=False)
    hf.tie_weights()
    ids = llm.tokenizer.encode("The capital of France is Paris. 北京是中国的首都。 Emoji 😀!")
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(llm.logits(ids), want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_default_model_tokenizer_matches_transformers(default_model, default_llm):
    from transformers import AutoTokenizer

    llm = default_llm
    ref = AutoTokenizer.from_pretrained(default_model.parent, gguf_file=default_model.name)
    for text in ["Hello world, 你好世界! 😀🎉", "中文和English混合 in one line\n\n  spaced  ", "tabs\tand émojis 👍🏽",
                 "<|im_start|>user\nnot a special token"]:
        assert llm.tokenizer.encode(text) == ref.encode(text, add_special_tokens=False, split_special_tokens=True)


@pytest.mark.slow
def test_default_model_knows_paris(default_llm):
    reply = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                                            temperature=0, max_tokens=30)
    assert "Paris" in reply["content"]


def write_glm_gguf(hf, path, qtype: str, arch: str):
    """A transformers Glm model as llama.cpp's 'chatglm' arch (fused qkv, as THUDM) or a Glm4 model as 'glm4'."""
    c, sd = hf.config, {k: v.float().numpy() for k, v in hf.state_dict().items()}
    w = gguf_writer(path, arch, c, rope_dims=int(c.head_dim * c.rope_parameters["partial_rotary_factor"]))
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"]
            if arch == "chatglm":
                out[b + f"attn_qkv.{kind}"] = np.concatenate(qkv)
            else:
                out.update({b + f"attn_{x}.{kind}": t for x, t in zip("qkv", qkv)})
        out |= {b + "attn_output.weight": sd[p + "self_attn.o_proj.weight"],
                b + "ffn_up.weight": sd[p + "mlp.gate_up_proj.weight"],
                b + "ffn_down.weight": sd[p + "mlp.down_proj.weight"],
                b + "attn_norm.weight": sd[p + "input_layernorm.weight"],
                b + "ffn_norm.weight": sd[p + "post_attention_layernorm.weight"]}
        if arch == "glm4":
            out |= {b + "post_attention_norm.weight": sd[p + "post_self_attn_layernorm.weight"],
                    b + "post_ffw_norm.weight": sd[p + "post_mlp_layernorm.weight"]}
    values = {}
    for name, data in out.items():
        raw, values[name], t = roundtrip(data, qtype)
        w.add_tensor(name, raw, raw_dtype=t)
    finish(w)
    return values


def glm_reference_state(hf, values, arch):
    """The transformers state dict holding exactly the values the GGUF stores."""
    c, sd = hf.config, dict(hf.state_dict())
    sd["model.embed_tokens.weight"] = torch.from_numpy(values["token_embd.weight"])
    sd["model.norm.weight"] = torch.from_numpy(values["output_norm.weight"])
    if "output.weight" in values:
        sd["lm_head.weight"] = torch.from_numpy(values["output.weight"])
    sizes = [c.num_attention_heads * c.head_dim] + [c.num_key_value_heads * c.head_dim] * 2
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for kind in ("weight", "bias"):
            parts = (np.split(values[b + f"attn_qkv.{kind}"], np.cumsum(sizes)[:2]) if arch == "chatglm"
                     else [values[b + f"attn_{x}.{kind}"] for x in "qkv"])
            sd |= {p + f"self_attn.{x}_proj.{kind}": torch.from_numpy(np.ascontiguousarray(t))
                   for x, t in zip("qkv", parts)}
        pairs = {"self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                 "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
        if arch == "glm4":
            pairs |= {"post_self_attn_layernorm": "post_attention_norm", "post_mlp_layernorm": "post_ffw_norm"}
        sd |= {p + k + ".weight": torch.from_numpy(values[b + v + ".weight"]) for k, v in pairs.items()}
    return sd


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("kind,arch", [("glm", "chatglm"), ("glm4", "glm4")])
def test_glm_gguf_matches_transformers(tmp_path, random_ids, qtype, kind, arch):
    from conftest import GLM_CONFIGS

    hf = make_hf_model(kind, GLM_CONFIGS["gqa-tied" if kind == "glm" else "mqa-untied"], hidden_size=64,
                       head_dim=16, num_attention_heads=4, intermediate_size=64, seed=31)
    values = write_glm_gguf(hf, tmp_path / "m.gguf", qtype, arch)
    hf.load_state_dict(glm_reference_state(hf, values, arch))
    ids = random_ids(2, 11, hf.config.vocab_size)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    llm = glmkit.load(tmp_path / "m.gguf", dtype="float32")  # the float reference path
    assert llm.config.extra_norms == ("sandwich" if arch == "glm4" else "none") and llm.config.rotary_dim == 8
    torch.testing.assert_close(llm.logits(ids), want, atol=1e-5, rtol=0)


def test_gguf_with_unsupported_tokenizer_loads_without_one(tmp_path, random_ids):
    import gguf

    hf = make_hf_model("llama", LLAMA_CONFIGS["gqa-bias"], seed=5)
    write_gguf(hf, tmp_path / "m.gguf", "F32")
    reader_path = tmp_path / "m.gguf"
    src = gguf.GGUFReader(str(reader_path))
    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    for key, field in src.fields.items():
        if key.startswith("llama.") and not key.endswith("vocab_size"):
            value = field.contents()
            w.add_key_value(key, value, field.types[0])
    w.add_tokenizer_model("rwkv")  # a vocabulary type glmkit does not read
    for t in src.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    finish(w)
    with pytest.warns(UserWarning, match="tokenizers of type 'rwkv' are not supported yet"):
        llm = glmkit.load(tmp_path / "sp.gguf")
    ids = random_ids(1, 5, hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(llm.logits(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(glmkit.GlmkitError, match="ships no tokenizer"):
        llm.tokenizer


def test_chatglm3_gguf_sentencepiece_vocabulary(tmp_path, vocab_dirs):
    """A ChatGLM3-style GGUF vocabulary, written as llama.cpp's converter writes one from a SentencePiece
    model, rebuilds a tokenizer that encodes exactly like the original."""
    import gguf
    import sentencepiece

    from glmkit.tokenizer import SentencePieceTokenizer, gguf_tokenizer, load_tokenizer

    original = load_tokenizer(vocab_dirs["v3"])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(vocab_dirs["v3"] / "tokenizer.model"))
    n = sp.vocab_size()
    tokens = ["<unk>", "<bos>", "<eos>"] + [sp.id_to_piece(i) for i in range(3, n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    specials = SentencePieceTokenizer.CHATGLM_SPECIALS
    tokens += specials + [f"[PAD{i}]" for i in range(n + len(specials), 700)]
    types += [3] * len(specials) + [5] * (700 - n - len(specials))
    scores += [0.0] * (700 - n)
    w = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "chatglm")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("chatglm-spm")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_eos_token_id(2)
    finish(w)
    rebuilt = gguf_tokenizer(gguf.GGUFReader(str(tmp_path / "vocab.gguf")))
    assert rebuilt.special == original.special
    for text in ["你好", "中文和English混合 123 😀🎉", "  spaced\tout\n\nlines  ", "Aesop [gMASK] <|user|>"]:
        assert rebuilt.encode(text) == original.encode(text)
        assert rebuilt.encode(text, allow_special=True) == original.encode(text, allow_special=True)
        assert rebuilt.decode(rebuilt.encode(text)) == text


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    import gguf

    hf = make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], hidden_size=96, intermediate_size=256, seed=3)
    write_gguf(hf, tmp_path / "ok.gguf", "F32")
    src = gguf.GGUFReader(str(tmp_path / "ok.gguf"))
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for key, field in src.fields.items():
        if key.startswith("llama."):
            w.add_key_value(key, field.contents(), field.types[0])
    for t in src.tensors:
        if t.name == "blk.0.ffn_down.weight":  # stored as an i-quant glmkit cannot read
            rows, cols = (int(n) for n in reversed(t.shape))
            w.add_tensor(t.name, np.zeros((rows, cols // 256 * 66), dtype=np.uint8),
                         raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    finish(w)
    with pytest.raises(CheckpointError, match=r"'blk.0.ffn_down.weight' has GGUF type IQ2_XXS"):
        glmkit.load(tmp_path / "iq.gguf")


def test_quantized_gguf_stays_compact_by_default(tmp_path, random_ids):
    from glmkit.quant import Int4Linear, Int8Linear

    hf = make_hf_model("llama", LLAMA_CONFIGS["gqa-bias"], hidden_size=64, num_attention_heads=4, head_dim=16,
                       intermediate_size=64, seed=21)
    for qtype, cls in (("Q4_1", Int4Linear), ("Q8_0", Int8Linear)):
        write_gguf(hf, tmp_path / f"{qtype}.gguf", qtype)
        llm = glmkit.load(tmp_path / f"{qtype}.gguf")
        assert isinstance(llm.model.layers[0].mlp.out_proj, cls) and llm.dtype == torch.bfloat16
        reference = glmkit.load(tmp_path / f"{qtype}.gguf", dtype="float32")
        ids = random_ids(1, 12, hf.config.vocab_size)
        a, b = llm.logits(ids), reference.logits(ids)
        assert float((a - b).norm() / b.norm()) < 0.2


def test_q8_0_tied_table_becomes_the_int8_head(tmp_path, random_ids):
    """A tied Q8_0 embedding (as in the default model) goes straight from the file's blocks to the int8 head,
    which also serves the embedding: no float table on the way, values within one per-row int8 step."""
    from glmkit.quant import Int8Linear, TiedInt8Embedding

    hf = make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], hidden_size=96, intermediate_size=64, seed=21)
    write_gguf(hf, tmp_path / "q8.gguf", "Q8_0")
    from glmkit.loaders import open as open_checkpoint
    from glmkit.loaders.gguf import Int8Rows

    tensors, _ = open_checkpoint(tmp_path / "q8.gguf").tensors(keep_int8=True)
    assert isinstance(tensors["embed.weight"], Int8Rows) and isinstance(tensors["layers.0.attn.qkv.weight"], Int8Rows)
    llm = glmkit.load(tmp_path / "q8.gguf", quantize="int8")
    assert isinstance(llm.model.lm_head, Int8Linear) and isinstance(llm.model.embed, TiedInt8Embedding)
    reference = glmkit.load(tmp_path / "q8.gguf", dtype="float32")
    table = reference.model.embed.weight  # the file's Q8_0 values
    step = llm.model.lm_head.scales[:, None]  # (V, 1): one int8 step of each row
    assert float(((llm.model.lm_head.dequantize() - table).abs() / step).max()) <= 0.5 + 1e-3
    ids = random_ids(1, 12, hf.config.vocab_size)
    a, b = llm.logits(ids).float(), reference.logits(ids)
    assert float((a - b).norm() / b.norm()) < 0.05


def test_q_k_v_pieces_of_different_gguf_types_load_as_float(tmp_path):
    """llama.cpp's mixed quantizations (Q4_K_M) store some of q / k / v in other types: the pieces of one
    weight then join as float, equal to each piece's dequantized values."""
    from gguf import GGMLQuantizationType
    from gguf import quants

    from glmkit.loaders.gguf import Int4Blocks, Int8Rows
    from glmkit.loaders.layouts import GGUF_LLAMA
    from glmkit.loaders.keymap import map_tensors

    rng = np.random.default_rng(3)
    q_raw = quants.quantize(rng.standard_normal((32, 64)).astype(np.float32), GGMLQuantizationType.Q4_1)
    k_raw = quants.quantize(rng.standard_normal((16, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    v = torch.randn(16, 64)
    q = Int4Blocks(q_raw.reshape(32, 2, 20))
    k = Int8Rows(k_raw, GGMLQuantizationType.Q8_0, 64)
    named = [("blk.0.attn_q.weight", "f", lambda: q), ("blk.0.attn_k.weight", "f", lambda: k),
             ("blk.0.attn_v.weight", "f", lambda: v)]
    tensors, _ = map_tensors(GGUF_LLAMA.table, named, config=None)
    expected = torch.cat([torch.from_numpy(quants.dequantize(q_raw, GGMLQuantizationType.Q4_1)),
                          torch.from_numpy(quants.dequantize(k_raw, GGMLQuantizationType.Q8_0)), v])
    torch.testing.assert_close(tensors["layers.0.attn.qkv.weight"], expected, rtol=1e-6, atol=1e-6)
    same = [("blk.0.attn_q.weight", "f", lambda: q), ("blk.0.attn_k.weight", "f", lambda: q),
            ("blk.0.attn_v.weight", "f", lambda: q)]
    joined = map_tensors(GGUF_LLAMA.table, same, config=None)[0]["layers.0.attn.qkv.weight"]
    assert isinstance(joined, Int4Blocks) and joined.shape == (96, 64)  # one kind: stays packed


def test_q4_k_model_loads_as_exact_int4(tmp_path, random_ids):
    """A llama GGUF whose 256-wide linear weights are Q4_K (llama.cpp's most used 4-bit type): loaded by
    default, those layers are int4 holding exactly the file's values (up to bfloat16 group scales), the rest
    int8, and the model's logits follow the dequantized float model."""
    from gguf import GGMLQuantizationType

    from glmkit.quant import Int4Linear

    hf = make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], hidden_size=256, intermediate_size=256, num_attention_heads=4,
                       seed=5)
    c = hf.config
    w = gguf_writer(tmp_path / "k.gguf", "llama", c, rope_dims=c.head_dim)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    rng = np.random.default_rng(5)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, value in hf.state_dict().items():
        if key == "lm_head.weight":
            continue
        if key.startswith("model.layers."):
            i, rest = key[len("model.layers."):].split(".", 1)
            name = f"blk.{i}.{names[rest.rsplit('.', 1)[0]]}.weight"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[key]
        if name.startswith("blk.") and value.ndim == 2 and value.shape[1] % 256 == 0:
            N, K = value.shape  # random Q4_K blocks (gguf cannot quantize to Q4_K), finite float16 d and dmin
            raw = rng.integers(0, 256, (N, K // 256, 144), dtype=np.uint8)
            raw[..., 0:4] = rng.uniform(0.001, 0.01, (N, K // 256, 2)).astype(np.float16).view(np.uint8)
            w.add_tensor(name, raw.reshape(N, -1), raw_dtype=GGMLQuantizationType.Q4_K)
        else:
            w.add_tensor(name, value.float().numpy())
    finish(w)
    from glmkit.loaders import open as open_checkpoint
    from glmkit.loaders.gguf import Q4KBlocks

    tensors = open_checkpoint(tmp_path / "k.gguf").tensors(keep_int4=True)[0]
    assert all(isinstance(tensors[f"layers.0.{n}.weight"], Q4KBlocks) for n in ("attn.qkv", "mlp.in_proj", "mlp.out_proj"))
    llm = glmkit.load(tmp_path / "k.gguf")  # a 4-bit file stays 4-bit
    reference = glmkit.load(tmp_path / "k.gguf", dtype="float32")  # gguf's own dequantization
    layer, ref_layer = llm.model.layers[0], reference.model.layers[0]
    assert isinstance(layer.mlp.in_proj, Int4Linear) and isinstance(layer.mlp.out_proj, Int4Linear)
    assert isinstance(layer.attn.out, Int4Linear)  # 64 inputs: float in the file, quantized like any float layer
    for ours, theirs in ((layer.mlp.in_proj, ref_layer.mlp.in_proj), (layer.mlp.out_proj, ref_layer.mlp.out_proj)):
        assert float((ours.dequantize() - theirs.weight).norm() / theirs.weight.norm()) < 5e-3
    ids = random_ids(1, 12, c.vocab_size)
    a, b = llm.logits(ids).float(), reference.logits(ids)
    assert float((a - b).norm() / b.norm()) < 0.05
