"""glmkit.load on checkpoints that ship tokenizer files: .tokenizer and .apply_chat_template, end to end."""

from __future__ import annotations

import pytest

import glmkit
from conftest import GLM_CONFIGS, LLAMA_CONFIGS, make_hf_model, write_thudm_glm
from glmkit.errors import GlmkitError
from test_chat_formats import CONVERSATIONS
from vocab import CHATML_SPECIALS, SMOLLM2_TEMPLATE, save_hf_tokenizer, train_sentencepiece


def test_jinja_checkpoint_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], vocab_size=500).save_pretrained(tmp_path)
    save_hf_tokenizer(tmp_path, CHATML_SPECIALS, SMOLLM2_TEMPLATE, eos_token="<|im_end|>")
    llm = glmkit.load(tmp_path)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    for conv in CONVERSATIONS:
        ids = llm.apply_chat_template(conv)
        assert ids == ref.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert llm.logits(ids).shape == (1, len(ids), 500)
    assert llm.chat_format.stop_ids == {ref.convert_tokens_to_ids("<|im_end|>")}


def test_thudm_checkpoint_with_chatglm_tokenizer(tmp_path):
    hf = make_hf_model("glm", GLM_CONFIGS["mqa-untied"], vocab_size=700)
    write_thudm_glm(hf, tmp_path)
    train_sentencepiece(tmp_path / "tokenizer.model")
    llm = glmkit.load(tmp_path, chat_format="chatglm3")
    ids = llm.apply_chat_template([{"role": "user", "content": "你好"}])
    tok = llm.tokenizer
    assert ids[:3] == [tok.token_id("[gMASK]"), tok.token_id("sop"), tok.token_id("<|user|>")]
    assert max(ids) < llm.config.vocab_size and llm.logits(ids).shape[1] == len(ids)


def test_checkpoint_without_tokenizer(tmp_path):
    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"]).save_pretrained(tmp_path)
    llm = glmkit.load(tmp_path)
    with pytest.raises(GlmkitError, match="ships no tokenizer"):
        llm.apply_chat_template([{"role": "user", "content": "hi"}])


def test_unknown_chat_format_is_refused(tmp_path):
    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], vocab_size=500).save_pretrained(tmp_path)
    save_hf_tokenizer(tmp_path, CHATML_SPECIALS, SMOLLM2_TEMPLATE, eos_token="<|im_end|>")
    with pytest.raises(GlmkitError, match="unknown chat format 'vicuna'"):
        glmkit.load(tmp_path, chat_format="vicuna")


IMAGE_MESSAGE = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                               {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]}]


def test_image_part_to_a_text_model_is_a_clear_error(tmp_path):
    """Never silently dropped: Jinja and native formats alike refuse it, naming the part."""
    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], vocab_size=500).save_pretrained(tmp_path / "jinja")
    save_hf_tokenizer(tmp_path / "jinja", CHATML_SPECIALS, SMOLLM2_TEMPLATE, eos_token="<|im_end|>")
    write_thudm_glm(make_hf_model("glm", GLM_CONFIGS["mqa-untied"], vocab_size=700), tmp_path / "v3")
    train_sentencepiece(tmp_path / "v3" / "tokenizer.model")
    for llm in (glmkit.load(tmp_path / "jinja"), glmkit.load(tmp_path / "v3", chat_format="chatglm3")):
        with pytest.raises(GlmkitError, match="'image_url' part, but this model reads text only"):
            llm.chat(IMAGE_MESSAGE, max_tokens=2)
        with pytest.raises(GlmkitError, match="part of type 'audio_blob'"):
            llm.apply_chat_template([{"role": "user", "content": [{"type": "audio_blob"}]}])
        text_parts = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}]}]
        assert llm.apply_chat_template(text_parts) == llm.apply_chat_template(
            [{"role": "user", "content": "what is this?"}])


@pytest.mark.parametrize("name", ["chatglm1", "chatglm2", "chatglm3", "glm4"])
def test_forced_chat_format_that_does_not_fit_the_tokenizer(tmp_path, name):
    """A tokenizer.json checkpoint has none of the ChatGLM special tokens: forcing a ChatGLM format says so."""
    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], vocab_size=500).save_pretrained(tmp_path)
    save_hf_tokenizer(tmp_path, CHATML_SPECIALS, SMOLLM2_TEMPLATE, eos_token="<|im_end|>")
    with pytest.raises(GlmkitError, match=rf"chat format '{name}' does not fit this checkpoint: its tokenizer has "
                                          r"no \[gMASK\]"):
        glmkit.load(tmp_path, chat_format=name)


def test_forced_jinja_without_a_template(tmp_path):
    write_thudm_glm(make_hf_model("glm", GLM_CONFIGS["mqa-untied"], vocab_size=700), tmp_path)
    train_sentencepiece(tmp_path / "tokenizer.model")
    with pytest.raises(GlmkitError, match="chat format 'jinja' was asked for, but this checkpoint has no chat template"):
        glmkit.load(tmp_path, chat_format="jinja")


# ---------------------------------------------------------------------------------- sampling defaults
def test_sampling_defaults_follow_generation_config():
    from glmkit.engine.sampling import FALLBACK, NEUTRAL, sampling_defaults

    assert sampling_defaults({}) == FALLBACK  # nothing said: llama-server's defaults
    assert sampling_defaults({"bos_token_id": 1, "eos_token_id": 2}) == FALLBACK  # transformers' bare file
    assert sampling_defaults({"do_sample": False})["temperature"] == 0
    glm4 = sampling_defaults({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 512})
    assert glm4 == {**NEUTRAL, "temperature": 0.6, "top_p": 0.95, "max_tokens": 512}


def test_checkpoint_generation_config_is_the_default(tmp_path, random_ids):
    """A checkpoint that asks for greedy decoding (do_sample false) gets it when no sampling argument is given;
    its generation_config eos ids stop generation too; arguments still override."""
    import json

    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], vocab_size=500).save_pretrained(tmp_path)
    save_hf_tokenizer(tmp_path, CHATML_SPECIALS, SMOLLM2_TEMPLATE, eos_token="<|im_end|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": [7, 9]}))
    llm = glmkit.load(tmp_path)
    assert llm.defaults["temperature"] == 0 and {7, 9} <= llm.engine.stop_ids
    ids = random_ids(1, 6, 500, seed=3)[0].tolist()
    greedy = llm.generate(ids, max_tokens=8, temperature=0, ignore_eos=True).token_ids
    assert llm.generate(ids, max_tokens=8, ignore_eos=True).token_ids == greedy
    assert llm.sampling_params(temperature=0.5).temperature == 0.5


def test_python_api_surface(tmp_path):
    """dir(glmkit) lists load and LLM; results read as attributes and as keys; misuse is one clear error."""
    import typing

    from glmkit.engine.sampling import Sampling, SamplingParams

    assert {"load", "LLM"} <= set(dir(glmkit))
    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], vocab_size=500).save_pretrained(tmp_path)
    save_hf_tokenizer(tmp_path, CHATML_SPECIALS, SMOLLM2_TEMPLATE, eos_token="<|im_end|>")
    llm = glmkit.load(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(GlmkitError, match="for chat messages use llm.chat"):
        llm.generate(messages)
    with pytest.raises(GlmkitError, match="unknown sampling parameter"):
        llm.generate("hi", temprature=0.5)
    done = llm.generate("hi", max_tokens=3, temperature=0, ignore_eos=True, logprobs=2)
    assert done["text"] == done.text and done["token_ids"] == done.token_ids and len(done.logprobs) == 3
    reply = llm.chat(messages, max_tokens=3, temperature=0)
    assert reply.content == reply["content"] and reply.finish_reason == reply["finish_reason"]
    assert reply.message == {"role": "assistant", "content": reply.content} and reply.usage["completion_tokens"] <= 3
    *deltas, last = llm.chat(messages, max_tokens=3, temperature=0, stream=True)
    assert "".join(d.delta for d in deltas) == last.content == reply.content
    # every Sampling keyword is a SamplingParams field (or response_format, turned into one)
    assert set(typing.get_type_hints(Sampling)) - {"response_format"} <= set(SamplingParams.__dataclass_fields__)
