"""Small real vocabularies built inside the tests (real ones cannot be downloaded here).

A made-up bilingual corpus trains: a SentencePiece model in ChatGLM-6B's `ice_text.model` style (its
specials and whitespace pieces inside the vocabulary), one in ChatGLM2/3's style (specials appended
by the tokenizer), a GLM-4-style tiktoken rank file, and `tokenizer.json` files (byte-level BPE).
"""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

ZH = ["你好", "世界", "我们", "今天", "天气", "很好", "北京", "上海", "学习", "语言", "模型", "中文", "英文", "朋友",
      "喜欢", "吃饭", "公园", "时间", "问题", "答案", "电脑", "手机", "音乐", "电影", "工作", "的", "是", "了", "在",
      "回答", "天安门", "长城", "咖啡", "谢谢", "请问", "首都", "法国", "巴黎"]
EN = ["hello", "world", "the", "quick", "brown", "fox", "model", "language", "weather", "today", "is", "good",
      "Paris", "capital", "of", "France", "what", "answer", "question", "tool", "call", "json", "python", "we", "like"]
EXTRA = ["😀", "🎉", "👍🏽", "123", "4.5", "，", "。", "？", "！", ",", ".", "?", "!", ":", "(", ")", '"', "{", "}",
         "[", "]", "_", "=", "`"]


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(ZH + EN + EXTRA) for _ in range(rng.randint(3, 14))]
        sep = rng.choice(["", " ", "  ", "\t", "\n", " "])
        out.append(sep.join(words) if rng.random() < 0.5 else " ".join(words))
    return out


V1_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]


def train_sentencepiece(path: Path, *, chatglm1: bool = False, vocab_size: int = 600) -> Path:
    import sentencepiece as spm

    user = (["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)] + V1_SPECIALS) if chatglm1 else []
    text = corpus()
    if chatglm1:  # ChatGLM-6B's tokenizer sees pre-processed text
        from glmkit.tokenizer import ChatGLM1Tokenizer
        text = [ChatGLM1Tokenizer.preprocess(t) for t in text]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=vocab_size + len(user), model_type="bpe",
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_by_whitespace=True, user_defined_symbols=user,
        allow_whitespace_only_pieces=True, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def write_tiktoken_ranks(path: Path, vocab_size: int = 400) -> Path:
    """A GLM-4-format tokenizer.model: one 'base64(token bytes) rank' line per token."""
    from tiktoken._educational import bpe_train

    ranks = bpe_train("\n".join(corpus()), vocab_size, GLM4_PATTERN, visualise=None)
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("\n".join(lines) + "\n")
    return path


GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer_json(specials: list[str], vocab_size: int = 500):
    """A byte-level BPE `tokenizers.Tokenizer` with the given special tokens (ids 0..n-1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


def save_hf_tokenizer(directory: Path, specials: list[str], template: str, **special_tokens) -> Path:
    """Save a transformers fast tokenizer with a chat template; return the directory."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer_json(specials), **special_tokens)
    hf.chat_template = template
    directory.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(directory)
    return directory


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

GLM4_TEMPLATE = (  # glm-4-9b-chat's template, with the function-tool branch only
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。"
    "\n\n# 可用工具{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n"
    "## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。{% endif %}{% endfor %}{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_chatglm_config(directory: Path) -> None:
    """A ChatGLM2/3-style config.json next to a tokenizer.model, so the tokenizer knows its family."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"num_layers": 1, "padded_vocab_size": 700}))


def build_vocab_dirs(root: Path) -> dict[str, Path]:
    """One directory per tokenizer kind: v1 (ice_text), v3 (ChatGLM2/3 SentencePiece), glm4 (tiktoken),
    chatml and glm4-hf (tokenizer.json with the SmolLM2 and glm-4-9b-chat templates)."""
    (root / "v1").mkdir(parents=True)
    train_sentencepiece(root / "v1" / "ice_text.model", chatglm1=True)
    write_chatglm_config(root / "v3")
    train_sentencepiece(root / "v3" / "tokenizer.model")
    (root / "glm4").mkdir()
    write_tiktoken_ranks(root / "glm4" / "tokenizer.model")
    save_hf_tokenizer(root / "chatml", CHATML_SPECIALS, SMOLLM2_TEMPLATE, eos_token="<|im_end|>")
    save_hf_tokenizer(root / "glm4-hf", GLM4_SPECIALS, GLM4_TEMPLATE, eos_token="<|endoftext|>")
    return {p.name: p for p in root.iterdir()}
