"""The streaming detokenizer: pieces concatenate to decode(all), and never show half a character."""

from __future__ import annotations

import random

import pytest

from glmkit.engine.detokenize import StreamingDetokenizer
from glmkit.tokenizer import load_tokenizer

TEXTS = ["你好，世界！", "Hello world, the quick brown fox.", "中文和English混合 123 😀🎉👍🏽 end",
         "  spaced\tout\n\nlines  with 天安门 and 长城 ", "🎉" * 7 + "巴黎"]


@pytest.fixture(scope="module")
def toks(vocab_dirs):
    return {name: load_tokenizer(vocab_dirs[name]) for name in ("v1", "v3", "glm4", "chatml")}


def stream(tok, ids):
    detok = StreamingDetokenizer(tok.decode)
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.flush()


@pytest.mark.parametrize("name", ["v1", "v3", "glm4", "chatml"])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_decode_on_text(toks, name, text):
    tok = toks[name]
    ids = tok.encode(text)
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces), "a partial character was shown mid-stream"


@pytest.mark.parametrize("name", ["v1", "v3", "glm4", "chatml"])
def test_stream_equals_decode_on_random_ids(toks, name):
    tok = toks[name]
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        pieces, tail = stream(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids), ids


def test_multibyte_character_is_held_back(toks):
    tok = toks["glm4"]  # byte-level BPE: an emoji often spans several tokens
    ids = tok.encode("😀")
    assert len(ids) > 1
    pieces, tail = stream(tok, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "😀" and tail == ""
