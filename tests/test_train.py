"""Training: the loop (loss goes down, resume is exact), SFT loss masks per chat format, HF-layout export read
back by transformers, LoRA against PEFT in both directions, P-tuning v2 through the engine, and torchrun
with gloo giving the single-process loss."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import glmkit
from conftest import GLM_CONFIGS, LLAMA_CONFIGS, CodeOnUnpickle, make_hf_model
from vocab import CHATML_SPECIALS, SMOLLM2_TEMPLATE, corpus, save_hf_tokenizer, train_sentencepiece
from glmkit.tokenizer import ChatGLM1Tokenizer
from glmkit.train.data import IGNORE, collate, sft_sample
from glmkit.train.trainer import TrainConfig, train

CONVERSATIONS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！很高兴见到你。"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6"}],
]


def tiny_glm_dir(root: Path) -> Path:
    """A from-scratch ChatGLM-6B-architecture config.json next to an ice_text.model tokenizer."""
    root.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(root / "ice_text.model", chatglm1=True)
    sp = ChatGLM1Tokenizer(root / "ice_text.model").special
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": 700, "hidden_size": 32,
              "inner_hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "layernorm_epsilon": 1e-5,
              "position_encoding_2d": True, "max_sequence_length": 256, "bos_token_id": sp["<sop>"],
              "eos_token_id": sp["<eop>"], "mask_token_id": sp["[MASK]"], "gmask_token_id": sp["[gMASK]"],
              "pad_token_id": 0}
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def glm_v1(tmp_path_factory):
    return tiny_glm_dir(tmp_path_factory.mktemp("glm-v1"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n".join(line.replace("\n", " ") for line in corpus(120)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}, ensure_ascii=False) for m in CONVERSATIONS * 3))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_hf_model("llama", LLAMA_CONFIGS["gqa-bias"], vocab_size=500, seed=2).save_pretrained(d)
    save_hf_tokenizer(d, CHATML_SPECIALS, SMOLLM2_TEMPLATE, eos_token="<|im_end|>")
    return d


def run(tmp: Path, **kw) -> dict:
    settings = dict(output=str(tmp), steps=6, batch_size=4, max_len=64, lr=3e-3, warmup=1, progress=False)
    settings.update(kw)
    return train(TrainConfig(**settings))


# ----------------------------------------------------------------------------------------------- loop
def test_glm_pretraining_lowers_the_loss_on_a_repeated_batch(tmp_path, glm_v1):
    one = tmp_path / "one.txt"
    one.write_text("我们 今天 学习 语言 模型 hello world the model learns\n" * 4, encoding="utf-8")
    r = run(tmp_path / "out", data=[str(one)], objective="glm", init=str(glm_v1 / "config.json"),
            tokenizer=str(glm_v1), steps=12, lr=1e-2, mixture=[0.0, 0.0, 1.0], seed=1)
    assert r["losses"][-1] < 0.6 * r["losses"][0], r["losses"]
    llm = glmkit.load(r["final"])  # the final checkpoint is a THUDM-layout directory glmkit reads
    assert llm.config.positions == "2d" and llm.tokenizer.kind == "chatglm1"


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, glm_v1, text_file):
    common = dict(data=[str(text_file)], objective="glm", init=str(glm_v1 / "config.json"), tokenizer=str(glm_v1),
                  steps=6, save_every=3, seed=3)
    whole = run(tmp_path / "whole", **common)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-0000003", resumed_dir / "checkpoints" / "step-0000003")
    resumed = run(resumed_dir, **common)  # as if the first run had stopped after step 3
    assert resumed["losses"] == whole["losses"][3:]
    a, b = glmkit.load(whole["final"]), glmkit.load(resumed["final"])
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name


def test_gradient_accumulation_equals_the_whole_batch(tmp_path, llama_dir, text_file):
    common = dict(data=[str(text_file)], model=str(llama_dir), objective="causal", steps=3)
    whole = run(tmp_path / "whole", batch_size=4, **common)
    accumulated = run(tmp_path / "acc", batch_size=2, grad_accum=2, **common)
    assert accumulated["losses"] == pytest.approx(whole["losses"], rel=1e-5)


def test_bfloat16_autocast_and_gradient_checkpointing_train(tmp_path, llama_dir, text_file):
    plain = run(tmp_path / "a", data=[str(text_file)], model=str(llama_dir), objective="causal", steps=2)
    ckpt = run(tmp_path / "b", data=[str(text_file)], model=str(llama_dir), objective="causal", steps=2,
               gradient_checkpointing=True)
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-5)  # recomputation changes nothing
    bf16 = run(tmp_path / "c", data=[str(text_file)], model=str(llama_dir), objective="causal", steps=2,
               autocast="bfloat16")
    assert bf16["losses"][0] == pytest.approx(plain["losses"][0], rel=2e-2)


def test_full_fine_tune_writes_a_checkpoint_transformers_reads(tmp_path, llama_dir, text_file):
    import transformers

    r = run(tmp_path / "out", data=[str(text_file)], model=str(llama_dir), objective="causal", steps=3)
    ours = glmkit.load(r["final"])
    ref = transformers.AutoModelForCausalLM.from_pretrained(r["final"]).eval()
    ids = torch.randint(0, 500, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert not torch.equal(ours.logits(ids), glmkit.load(llama_dir).logits(ids))  # it did train


def test_thudm_v2_layout_round_trips(tmp_path):
    from conftest import write_thudm_glm
    from glmkit.train.export import save_checkpoint

    src = write_thudm_glm(make_hf_model("glm", GLM_CONFIGS["mqa-untied"]), tmp_path / "src")
    llm = glmkit.load(src)
    out = save_checkpoint(llm.model, tmp_path / "out", json.loads((src / "config.json").read_text()))
    ids = torch.randint(0, 97, (1, 9))
    assert torch.equal(glmkit.load(out).logits(ids), llm.logits(ids))


# ------------------------------------------------------------------------------------------------ SFT
@pytest.mark.parametrize("kind,fmt", [("v1", "chatglm1"), ("v3", "chatglm2"), ("v3", "chatglm3"), ("glm4", "glm4"),
                                      ("chatml", "jinja"), ("glm4-hf", "jinja")])
def test_sft_labels_are_the_assistant_tokens_only(vocab_dirs, kind, fmt):
    from glmkit.chat import pick
    from glmkit.loaders.hf import template_source, tokenizer_config
    from glmkit.tokenizer import load_tokenizer

    tok = load_tokenizer(vocab_dirs[kind])
    d = vocab_dirs[kind]
    f = pick(tok, template_source(d, tokenizer_config(d)), tokenizer_config(d), (), fmt)
    ids, mask = f.render(CONVERSATIONS[1], add_generation_prompt=False)
    s = sft_sample(ids, mask, max_len=1000)
    trained = "".join(tok.decode([t for t in s.labels if t != IGNORE], skip_special=True).split())
    # ChatGLM-6B/2 put earlier rounds into the prompt text (their official fine-tuning trains the last reply);
    # the role-token formats train every assistant turn
    assert trained == ("6" if fmt in ("chatglm1", "chatglm2") else "46"), repr(trained)
    for i, label in enumerate(s.labels):  # each label is the next input token exactly where it is trained
        assert label == (ids[i + 1] if mask[i + 1] else IGNORE)


def test_sft_runs_on_v1_with_its_2d_positions(tmp_path, glm_v1, chat_file):
    from glmkit.train.trainer import _base, build_dataset

    cfg = TrainConfig(output=str(tmp_path), data=[str(chat_file)], objective="sft", init=str(glm_v1 / "config.json"),
                      tokenizer=str(glm_v1))
    model, tok, fmt, *_ = _base(cfg, torch.device("cpu"))
    data = build_dataset(cfg, tok, fmt, model.config)
    batch = collate([data.sample(0), data.sample(1)], 0, model.config)
    sop = model.config.sop_token_id
    for b in range(2):
        row = batch["input_ids"][b].tolist()
        c = row.index(sop)
        assert batch["prefix_len"][b] == c  # the prompt up to <sop> is bidirectional, as at inference
        assert batch["positions"][b, 1, c] == 1 and batch["positions"][b, 1, c - 1] == 0
    r = run(tmp_path / "out", data=[str(chat_file)], objective="sft", init=str(glm_v1 / "config.json"),
            tokenizer=str(glm_v1), steps=8, lr=1e-2, max_len=128)
    assert r["losses"][-1] < r["losses"][0]


# ----------------------------------------------------------------------------------------------- LoRA
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture(scope="module")
def glm_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("glm-hf")
    make_hf_model("glm", GLM_CONFIGS["gqa-tied"], vocab_size=500).save_pretrained(d)
    save_hf_tokenizer(d, CHATML_SPECIALS, SMOLLM2_TEMPLATE, eos_token="<|im_end|>")
    return d


def test_peft_adapter_applies_in_glmkit(tmp_path, glm_hf):
    import transformers
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(glm_hf).eval()
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                 init_lora_weights=False)).eval()
    ids = torch.randint(0, 500, (2, 9))
    with torch.no_grad():
        ref = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = glmkit.load(glm_hf, lora=tmp_path / "adapter")
    torch.testing.assert_close(merged.logits(ids), ref, atol=1e-5, rtol=1e-5)
    assert (merged.logits(ids) - glmkit.load(glm_hf).logits(ids)).abs().max() > 1e-2  # the adapter matters


def test_glmkit_adapter_loads_into_peft_and_merging_equals_applying(tmp_path, glm_hf):
    import transformers
    from peft import PeftModel

    from glmkit.train.lora import LoRASettings, add_lora, merge, save_adapter

    llm = glmkit.load(glm_hf)
    settings = LoRASettings(r=3, alpha=6, target_modules=TARGETS + ["k_proj"])
    add_lora(llm.model, "transformers", settings, init="random")
    ids = torch.randint(0, 500, (2, 9))
    applied = llm.logits(ids)
    save_adapter(llm.model, tmp_path / "adapter", "transformers", settings)
    base = transformers.AutoModelForCausalLM.from_pretrained(glm_hf).eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, applied, atol=1e-5, rtol=1e-5)
    merge(llm.model)
    torch.testing.assert_close(llm.logits(ids), applied, atol=1e-5, rtol=1e-5)
    assert not any(".lora_" in n for n, _ in llm.model.named_parameters())


def test_lora_on_thudm_v1_query_key_value_round_trips(tmp_path, glm_v1):
    """ChatGLM-6B stores q, k, v rows per head; the adapter's B rows follow the same order fix."""
    from glmkit.train.lora import LoRASettings, add_lora, save_adapter

    from glmkit.train.export import save_checkpoint
    from glmkit.train.trainer import init_weights
    from glmkit.model import Transformer
    from glmkit.config import ModelConfig

    raw = json.loads((glm_v1 / "config.json").read_text())
    model = Transformer(ModelConfig.from_hf_dict(raw))
    init_weights(model, 0)
    base = save_checkpoint(model, tmp_path / "base", raw, glm_v1)
    llm = glmkit.load(base)
    settings = LoRASettings(r=2, alpha=4, target_modules=["query_key_value", "dense_h_to_4h"])
    add_lora(llm.model, "thudm_v1", settings, init="random")
    ids = torch.tensor([[5, 6, 7, llm.config.gmask_token_id, llm.config.sop_token_id, 9]])
    applied = llm.logits(ids)
    save_adapter(llm.model, tmp_path / "adapter", "thudm_v1", settings)
    names = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert names == ["dense_h_to_4h", "query_key_value"]
    torch.testing.assert_close(glmkit.load(base, lora=tmp_path / "adapter").logits(ids), applied, atol=1e-5, rtol=1e-5)


def test_lora_training_then_chat_end_to_end(tmp_path):
    """A base whose output head can express a peaked distribution (init std 0.2), taught one reply by LoRA."""
    import transformers

    torch.manual_seed(0)
    llama_dir = tmp_path / "base"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)).save_pretrained(llama_dir)
    save_hf_tokenizer(llama_dir, CHATML_SPECIALS, SMOLLM2_TEMPLATE, eos_token="<|im_end|>")
    chat = tmp_path / "chat.jsonl"
    reply = "I am Lark, a tiny assistant."
    chat.write_text("\n".join(json.dumps([{"role": "user", "content": q}, {"role": "assistant", "content": reply}])
                              for q in ("Who are you?", "who are you", "Who are you?")))
    r = run(tmp_path / "out", data=[str(chat)], model=str(llama_dir), objective="sft", lora_r=8, lora_alpha=32,
            lora_targets=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], steps=30, lr=1e-2,
            batch_size=3, max_len=160)
    assert r["losses"][-1] < 0.05, r["losses"][-5:]
    assert (Path(r["final"]) / "adapter_model.safetensors").is_file()
    out = subprocess.run([sys.executable, "-m", "glmkit", "generate", str(llama_dir), "--lora", r["final"], "--chat",
                          "--prompt", "Who are you?", "--temperature", "0", "--max-tokens", "12"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("I am Lark"), out.stdout


def test_adapter_for_another_model_is_refused_clearly(tmp_path, glm_hf, llama_dir):
    from glmkit.errors import CheckpointError
    from glmkit.train.lora import LoRASettings, add_lora, save_adapter

    llm = glmkit.load(llama_dir)
    add_lora(llm.model, "transformers", LoRASettings(r=2, target_modules=["q_proj"]), init="random")
    save_adapter(llm.model, tmp_path / "adapter", "transformers", LoRASettings(r=2, target_modules=["q_proj"]))
    with pytest.raises(CheckpointError, match="shapes|does not have"):
        glmkit.load(glm_hf, lora=tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        glmkit.load(glm_hf, lora=tmp_path)


# ------------------------------------------------------------------------------------------- P-tuning
def test_ptuning_prefix_trains_and_the_engine_uses_it(tmp_path, glm_v1, chat_file):
    from glmkit.config import ModelConfig
    from glmkit.model import Transformer
    from glmkit.positions import prompt_positions
    from glmkit.train.export import save_checkpoint
    from glmkit.train.ptuning import forward_with_prefix, load_prefix
    from glmkit.train.trainer import init_weights

    raw = json.loads((glm_v1 / "config.json").read_text())
    model = Transformer(ModelConfig.from_hf_dict(raw))
    init_weights(model, 0)
    base = save_checkpoint(model, tmp_path / "base", raw, glm_v1)
    r = run(tmp_path / "out", data=[str(chat_file)], model=str(base), objective="sft", ptuning=4, steps=10, lr=3e-2, max_len=128)
    assert r["losses"][-1] < r["losses"][0]
    llm = glmkit.load(base, ptuning=r["final"])
    prefix = load_prefix(r["final"], llm.config)
    assert prefix[0].shape == (2, 4, 4, 8)  # (L, K, P, D)
    prompt = llm.apply_chat_template([{"role": "user", "content": "你好"}])
    out = llm.generate(prompt, max_tokens=6, temperature=0, ignore_eos=True).token_ids
    ids, logprobs = list(prompt), []  # reference: full forward passes with the prefix, no cache
    for _ in range(6):
        t = torch.tensor([ids])
        positions, prefix_len = prompt_positions(t, llm.config)
        with torch.no_grad():
            last = torch.log_softmax(forward_with_prefix(llm.model, prefix, t, positions, prefix_len)[0, -1], -1)
        ids.append(int(last.argmax()))
        logprobs.append(float(last.max()))
    assert out == ids[len(prompt):]
    t = torch.tensor([prompt])
    positions, prefix_len = prompt_positions(t, llm.config)
    with torch.no_grad():  # the trained prefix changes what the model predicts
        assert (forward_with_prefix(llm.model, prefix, t, positions, prefix_len) - llm.logits(t)).abs().max() > 1e-3


def test_server_keeps_the_ptuning_prefix(tmp_path, glm_v1):
    """glmkit serve builds its own engine: it must keep the prefix (strong random values here); so must every
    row of a growing batch."""
    from test_server import LiveServer

    from glmkit.config import ModelConfig
    from glmkit.model import Transformer
    from glmkit.positions import prompt_positions
    from glmkit.train.export import save_checkpoint
    from glmkit.train.ptuning import PrefixEncoder, forward_with_prefix, load_prefix
    from glmkit.train.trainer import init_weights

    raw = json.loads((glm_v1 / "config.json").read_text())
    model = Transformer(ModelConfig.from_hf_dict(raw))
    init_weights(model, 3)
    with torch.no_grad():  # weights large enough for attention to matter
        for layer in model.layers:
            for linear in (layer.attn.qkv, layer.attn.out):
                linear.weight.normal_(std=0.5)
    base = save_checkpoint(model, tmp_path / "base", raw, glm_v1)
    encoder = PrefixEncoder(model.config, 3)
    with torch.no_grad():
        encoder.embedding.weight.normal_(std=3.0)
    encoder.save(tmp_path / "prefix")
    llm = glmkit.load(base, ptuning=tmp_path / "prefix")
    prefix = load_prefix(tmp_path / "prefix", llm.config)
    prompt = llm.apply_chat_template([{"role": "user", "content": "你好"}])
    t = torch.tensor([prompt])
    positions, prefix_len = prompt_positions(t, llm.config)
    with torch.no_grad():
        first = torch.log_softmax(forward_with_prefix(llm.model, prefix, t, positions, prefix_len)[0, -1], -1)
        plain = torch.log_softmax(llm.logits(t)[0, -1], -1)
    token = int(first.argmax())
    assert abs(float(first[token]) - float(plain[token])) > 1e-2  # the prefix matters for this token
    # two at once: the engine's cache grows a second row, which must get the prefix too (without it that row
    # would decode like the plain model, which differs here)
    out = llm.generate(prompt, max_tokens=6, temperature=0, ignore_eos=True).token_ids
    assert glmkit.load(base).generate(prompt, max_tokens=6, temperature=0, ignore_eos=True).token_ids != out
    assert [c.token_ids for c in llm.generate_batch([prompt, prompt], max_tokens=6, temperature=0,
                                                    ignore_eos=True)] == [out, out]
    server = LiveServer(llm)
    try:
        served = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0,
                                                    logprobs=0, extra_body={"ignore_eos": True})
        assert served.choices[0].logprobs.token_logprobs[0] == pytest.approx(float(first[token]), abs=1e-4)
    finally:
        server.close()


# ---------------------------------------------------------------------------------------- distributed
@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(tmp_path, llama_dir, text_file, sharding):
    common = ["--data", str(text_file), "--model", str(llama_dir), "--objective", "causal", "--steps", "3",
              "--max-len", "48", "--lr", "3e-3", "--warmup", "1", "--no-progress"] + ["--fsdp"] * (sharding == "fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29517 + (sharding == "fsdp")), "-m", "glmkit.train", "--output", str(tmp_path / "two"), "--batch-size", "2",
                          *common], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run(tmp_path / "one", data=[str(text_file)], model=str(llama_dir), objective="causal", steps=3, max_len=48,
              batch_size=4)
    losses = json.loads((tmp_path / "two" / "train_result.json").read_text())["losses"]
    assert losses == pytest.approx(one["losses"], rel=1e-5)
    a, b = glmkit.load(tmp_path / "two" / "final"), glmkit.load(one["final"])
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------ infilling served
def test_server_completions_fill_mask_prompts(tmp_path, glm_v1):
    """/v1/completions with [MASK] in a text prompt fills the blanks as llm.infill does (the reference path)."""
    from test_server import LiveServer

    from glmkit.config import ModelConfig
    from glmkit.model import Transformer
    from glmkit.train.export import save_checkpoint
    from glmkit.train.trainer import init_weights

    raw = json.loads((glm_v1 / "config.json").read_text())
    model = Transformer(ModelConfig.from_hf_dict(raw))
    init_weights(model, 7)
    with torch.no_grad():
        model.embed.weight.mul_(50)  # a random model that does not just repeat one token
    llm = glmkit.load(save_checkpoint(model, tmp_path / "glm", raw, glm_v1))
    prompt = "我们 [MASK] hello world [MASK] 模型"
    expected = llm.infill(prompt, max_tokens=5, temperature=0)
    server = LiveServer(llm)
    try:
        r = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0)
        assert r.choices[0].text == expected and "[MASK]" not in r.choices[0].text
        assert len(r.choices[0].model_extra["fills"]) == 2 and r.usage.completion_tokens > 0
        from openai import BadRequestError

        with pytest.raises(BadRequestError, match="MASK"):
            server.client().completions.create(model="tiny", prompt=prompt, max_tokens=5, stream=True)
        ok = server.client().completions.create(model="tiny", prompt="我们 hello", max_tokens=2, temperature=0)
        assert ok.choices[0].text is not None  # plain prompts still complete
    finally:
        server.close()


def test_glmkit_native_config_trains_and_reloads(tmp_path, glm_v1, text_file):
    """A configuration no published layout spells (ChatGLM-6B layers with a pre-LN residual, as the tiny GLM
    uses) is written as {"glmkit_config": ...} with glmkit's names and reads back with identical logits."""
    from glmkit.config import ModelConfig

    v1 = ModelConfig.from_hf_dict(json.loads((glm_v1 / "config.json").read_text()))
    config = {**v1.to_dict(), "residual": "pre_norm"}
    (tmp_path / "config.json").write_text(json.dumps({"glmkit_config": config}))
    r = run(tmp_path / "out", data=[str(text_file)], objective="glm", init=str(tmp_path / "config.json"),
            tokenizer=str(glm_v1), steps=2)
    llm = glmkit.load(r["final"])
    assert llm.config.residual == "pre_norm" and llm.tokenizer.kind == "chatglm1"
    from safetensors.torch import load_file

    trained = load_file(Path(r["final"]) / "model.safetensors")
    for name, p in llm.model.state_dict().items():
        assert torch.equal(p, trained[name]), name


def test_bad_training_inputs_get_one_clear_line(tmp_path, glm_v1):
    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "glmkit", "train", *argv], capture_output=True, text=True,
                              timeout=60)

    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    chat = tmp_path / "chat.jsonl"
    chat.write_text('[{"role": "user", "content": "hi"}]\nnot json\n')
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('[{"role": "user", "content": "café"}]\n'.encode("latin-1"))
    cases = [
        (["--output", str(tmp_path / "o"), "--data", str(latin), "--init", str(glm_v1 / "config.json"),
          "--tokenizer", str(glm_v1), "--objective", "sft"], "is not UTF-8 text"),
        (["--output", str(tmp_path / "o"), "--data", "x.txt", "--init", str(tmp_path / "nope.json")], "does not exist"),
        (["--config", str(bad_json)], "not valid JSON"),
        (["--output", str(tmp_path / "o"), "--data", str(tmp_path / "missing.txt"), "--init",
          str(glm_v1 / "config.json"), "--tokenizer", str(glm_v1), "--objective", "glm"], "does not exist"),
        (["--output", str(tmp_path / "o"), "--data", str(chat), "--init", str(glm_v1 / "config.json"),
          "--tokenizer", str(glm_v1), "--objective", "sft"], "line 2 is not JSON"),
        (["--output", str(tmp_path / "o"), "--data", str(chat), "--init", str(glm_v1 / "config.json"),
          "--tokenizer", str(glm_v1), "--objective", "causal"], "objective glm"),
    ]
    for argv, message in cases:
        out = cli(*argv)
        assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, (argv, out.stderr)


def test_crafted_resume_state_never_runs_code(tmp_path, glm_v1, text_file):
    """A run directory whose checkpoint state would execute code when unpickled is refused with one clear
    line, and the code never runs (training state loads with weights_only=True)."""
    marker = tmp_path / "pwned"
    state = tmp_path / "out" / "checkpoints" / "step-0000001"
    state.mkdir(parents=True)
    torch.save({"step": 1, "model": {}, "evil": CodeOnUnpickle(str(marker))}, state / "state.pt")
    with pytest.raises(glmkit.GlmkitError, match=r"state.pt cannot be resumed from .*Remove it or choose a new"):
        run(tmp_path / "out", data=[str(text_file)], objective="glm", init=str(glm_v1 / "config.json"),
            tokenizer=str(glm_v1), steps=2, save_every=1)
    assert not marker.exists()
