"""Tokenizers: choice from files, exact round trips, specials never injected from text, parity with
the transformers tokenizer on the same tokenizer.json."""

from __future__ import annotations

import pytest

from glmkit.tokenizer import (ChatGLM1Tokenizer, HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer,
                              load_tokenizer)
from vocab import GLM4_SPECIALS

TEXTS = ["你好", "Hello, world!", "中文和English混合 123 😀🎉", "  leading spaces\tand\ttabs\n\nnew lines  ",
         "天安门 in 北京 👍🏽 is a place", "a" * 3 + " " * 85 + "b", "", "emoji only 🎉🎉🎉"]


@pytest.fixture(scope="module")
def tokenizers(vocab_dirs):
    toks = {name: load_tokenizer(vocab_dirs[name]) for name in ("v1", "v3", "glm4", "chatml")}
    return toks | {"hf": toks["chatml"], "dirs": {"hf": vocab_dirs["chatml"]}}


def test_choice_from_files(tokenizers):
    assert isinstance(tokenizers["v1"], ChatGLM1Tokenizer)
    assert isinstance(tokenizers["v3"], SentencePieceTokenizer) and "[gMASK]" in tokenizers["v3"].special
    assert isinstance(tokenizers["glm4"], TiktokenTokenizer)
    assert isinstance(tokenizers["hf"], HFTokenizer)


def test_directory_without_tokenizer(tmp_path):
    assert load_tokenizer(tmp_path) is None


@pytest.mark.parametrize("name", ["v1", "v3", "glm4", "hf"])
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizers, name, text):
    tok = tokenizers[name]
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("name", ["v1", "v3", "glm4", "hf"])
def test_special_text_never_becomes_special(tokenizers, name):
    tok = tokenizers[name]
    specials = set(tok.special.values())
    for text in tok.special:
        ids = tok.encode(f"before {text} after")
        assert not specials & set(ids), f"{text!r} was encoded as a special token"
        assert tok.decode(ids) == f"before {text} after"
        if not text.isalnum():  # specials spelled as plain words ('sop') are never parsed from text
            assert tok.special[text] in tok.encode(f"before {text} after", allow_special=True)


def test_chatglm_specials_follow_the_sentencepiece_vocabulary(tokenizers):
    tok = tokenizers["v3"]
    n = tok.sp.vocab_size()
    assert [tok.special[t] for t in SentencePieceTokenizer.CHATGLM_SPECIALS] == list(range(n, n + 9))


def test_glm4_specials_follow_the_ranks(tokenizers):
    tok = tokenizers["glm4"]
    n = tok.vocab_size - len(GLM4_SPECIALS)
    assert [tok.special[t] for t in GLM4_SPECIALS] == list(range(n, n + len(GLM4_SPECIALS)))


def test_chatglm1_preprocessing(tokenizers):
    tok = tokenizers["v1"]
    assert ChatGLM1Tokenizer.preprocess("a\nb\tc   d") == "a<n>b<|tab|>c<|blank_3|>d"
    newline, tab, blank = (tok.sp.piece_to_id(p) for p in ("<n>", "<|tab|>", "<|blank_3|>"))
    ids = tok.encode("a\nb\tc   d")
    assert newline in ids and tab in ids and blank in ids


def test_hf_tokenizer_matches_transformers(tokenizers):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tokenizers["dirs"]["hf"])
    for text in TEXTS:
        assert tokenizers["hf"].encode(text) == ref.encode(text, add_special_tokens=False)
        assert tokenizers["hf"].encode(text, allow_special=True) == ref.encode(text, add_special_tokens=False)


def test_corrupt_rank_file(tmp_path):
    from glmkit.errors import CheckpointError

    (tmp_path / "tokenizer.model").write_text("YQ== 0\nnot a rank line\n")
    with pytest.raises(CheckpointError, match=r"tokenizer.model:2 is not a 'base64 rank' line"):
        load_tokenizer(tmp_path)


def test_plain_word_specials_are_not_parsed_from_text(tokenizers):
    tok = tokenizers["v3"]  # ChatGLM2/3 name two specials 'sop' and 'eop'
    ids = tok.encode("Aesop and the sop eop <|user|>", allow_special=True)
    assert tok.special["sop"] not in ids and tok.special["eop"] not in ids and tok.special["<|user|>"] in ids
