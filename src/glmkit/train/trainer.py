"""The training loop: one function for GLM pretraining, causal LM, chat SFT, LoRA and P-tuning v2,
in one process or many (torchrun: gloo on CPU, NCCL on GPUs; DDP, or FSDP sharding with --fsdp).

A step takes a global batch of batch_size x grad_accum x world_size samples in a fixed order; the loss
is the mean over every target token of that global batch, so any split over processes and
micro-batches gives the same update. Checkpoints hold model (trainable part), optimizer, scheduler,
step and RNG state; resuming continues the exact run. The final model goes to OUTPUT/final: a full
HF-layout checkpoint, a PEFT LoRA adapter, or a P-tuning prefix. No HTTP, no sampling here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.config import ModelConfig
from glmkit.errors import GlmkitError
from glmkit.model import Transformer
from glmkit.train.data import (SENTENCE_END, Dataset, chunk_documents, collate, glm_chunk_size, read_conversations,
                               read_documents)
from glmkit.train.glm_objective import IGNORE, GLMTokens, Mixture
from glmkit.train.ptuning import forward_with_prefix


@dataclass
class TrainConfig:
    output: str
    data: list[str]
    objective: str = "causal"  # "glm" (blank infilling), "causal" or "sft" (chat JSONL)
    model: str | None = None  # checkpoint to start from (directory, .gguf or alias)
    init: str | None = None  # or: a config.json (THUDM or transformers spelling) to train from scratch
    tokenizer: str | None = None  # tokenizer directory, with --init
    chat_format: str | None = None
    max_len: int = 256
    batch_size: int = 8  # samples per process per micro-step
    grad_accum: int = 1
    steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup: int = 10
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    autocast: str = "none"  # "bfloat16": bf16 autocast, float32 master weights
    gradient_checkpointing: bool = False
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    log_every: int = 10
    eval_data: list[str] = field(default_factory=list)
    lora_r: int = 0  # > 0: train a LoRA adapter instead of the weights
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "query_key_value", "dense"])
    ptuning: int = 0  # > 0: P-tuning v2, this many prefix positions
    mixture: list[float] = field(default_factory=lambda: [0.5, 0.3, 0.2])  # [MASK], [sMASK], [gMASK]
    fsdp: bool = False
    progress: bool = True

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "TrainConfig":
        """A TOML or JSON file of TrainConfig fields; keyword overrides win."""
        path = Path(path)
        raw = _read_settings(path)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise GlmkitError(f"{path}: unknown training setting(s) {unknown}; known: {sorted(names)}.")
        return cls(**{**raw, **overrides})


def _read_settings(path: Path) -> dict:
    """A TOML (.toml) or JSON file of settings, with one clear error for a missing or malformed file."""
    import tomllib

    if not path.is_file():
        raise GlmkitError(f"{path} does not exist; pass a TOML or JSON file.")
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise GlmkitError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e}).") from None
    if not isinstance(raw, dict):
        raise GlmkitError(f"{path} must hold an object of settings.")
    return raw


# ----------------------------------------------------------------------------------------------- setup
def _distributed() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def init_weights(model: Transformer, seed: int) -> None:
    """GPT-style initialisation for a model trained from scratch: N(0, 0.02), zero biases, unit norms."""
    from glmkit.model import Norm

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, Norm):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _base(cfg: TrainConfig, device: torch.device):
    """(model, tokenizer, chat format, config.json dict for the final checkpoint, tokenizer dir, the layout whose
    names adapters use)."""
    from glmkit.chat import pick
    from glmkit.loaders import hf
    from glmkit.tokenizer import load_tokenizer

    if (cfg.model is None) == (cfg.init is None):
        raise GlmkitError("give exactly one of --model (a checkpoint to fine-tune) and --init (a config.json to "
                          "train from scratch).")
    if cfg.init is not None:
        raw = _read_settings(Path(cfg.init))
        config = ModelConfig.from_dict(raw["glmkit_config"]) if "glmkit_config" in raw else ModelConfig.from_hf_dict(raw)
        if cfg.tokenizer is None:
            raise GlmkitError("--init needs --tokenizer DIR (the directory with the tokenizer files).")
        tokenizer = load_tokenizer(cfg.tokenizer)
        if tokenizer is None:
            raise GlmkitError(f"{cfg.tokenizer} holds no tokenizer files.")
        tok_config = hf.tokenizer_config(Path(cfg.tokenizer))
        fmt = pick(tokenizer, hf.template_source(Path(cfg.tokenizer), tok_config), tok_config, config.eos_token_ids,
                   cfg.chat_format)
        with torch.device(device):
            model = Transformer(config)
        init_weights(model, cfg.seed)
        return model, tokenizer, fmt, raw, cfg.tokenizer, "transformers"
    from glmkit import loaders
    from glmkit.chat import tokenizer_and_format

    checkpoint = loaders.open(cfg.model)
    tokenizer, fmt = tokenizer_and_format(checkpoint, cfg.chat_format)
    model = loaders.assemble(checkpoint, Transformer.skeleton, device.type, "float32")
    raw = checkpoint.raw_config or None  # a directory's config.json, kept for the final checkpoint
    return (model, tokenizer, fmt, raw, checkpoint.source if raw is not None else None,
            checkpoint.layout.adapter_names)


def build_dataset(cfg: TrainConfig, tokenizer, fmt, config: ModelConfig) -> Dataset:
    if cfg.objective not in ("glm", "causal", "sft"):
        raise GlmkitError(f"objective {cfg.objective!r} is unknown; use 'glm', 'causal' or 'sft'.")
    if cfg.objective == "causal" and config.positions == "2d":
        raise GlmkitError("ChatGLM-6B-architecture models train with --objective glm (or sft), not causal.")
    if cfg.objective == "glm" and (config.positions != "2d" or None in (config.mask_token_id, config.gmask_token_id,
                                                                        config.sop_token_id, config.eop_token_id)):
        raise GlmkitError("the GLM objective needs a ChatGLM-6B-architecture model (2D positions, [MASK], [gMASK], "
                          "<sop>, <eop>); use --objective causal for other models.")
    if cfg.objective == "sft":
        if fmt is None:
            raise GlmkitError("chat fine-tuning needs a chat format; this model has none (pass --chat-format).")
        items, cut = [], 0
        for row in read_conversations(cfg.data):
            ids, mask = fmt.render(row["messages"], tools=row.get("tools"), add_generation_prompt=False)
            if any(mask[1: cfg.max_len + 1]):
                items.append((ids, mask))
            cut += any(mask) and not any(mask[1: cfg.max_len + 1])
        if cut:
            import warnings

            warnings.warn(f"{cut} conversation(s) have no assistant token within --max-len {cfg.max_len} and are "
                          "skipped; raise --max-len to train on them.", stacklevel=2)
        return Dataset("sft", items, seed=cfg.seed, max_len=cfg.max_len)
    docs = [tokenizer.encode(d) for d in read_documents(cfg.data)]
    if cfg.objective == "causal":
        bos = [config.bos_token_id] if config.bos_token_id is not None else []
        return Dataset("causal", chunk_documents([bos + d for d in docs], cfg.max_len + 1), seed=cfg.seed)
    smask = getattr(tokenizer, "special", {}).get("[sMASK]", config.mask_token_id)
    ids = GLMTokens(config.mask_token_id, smask, config.gmask_token_id, config.sop_token_id, config.eop_token_id)
    ends = frozenset(i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]).rstrip(" ").endswith(SENTENCE_END))
    mix = Mixture(*cfg.mixture)
    return Dataset("glm", chunk_documents(docs, glm_chunk_size(cfg.max_len)), seed=cfg.seed, glm_tokens=ids,
                   mixture=mix, sentence_ends=ends)


# ------------------------------------------------------------------------------------------------ loss
def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], prefix=None,
                 autocast: str = "none") -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens (float32)."""
    dev = batch["input_ids"].device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast == "bfloat16"):
        if prefix is not None:
            logits = forward_with_prefix(model, prefix(), batch["input_ids"], batch["positions"], batch.get("prefix_len"))
        else:
            logits = model(batch["input_ids"], batch["positions"], prefix_len=batch.get("prefix_len"))  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE,
                           reduction="sum")


def schedule(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return factor


# ------------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run; returns {"losses": [...per step], "final": path, ...}."""
    rank, world = _distributed()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, tokenizer, fmt, raw, tok_dir, layout = _base(cfg, device)
    config: ModelConfig = model.config
    if tokenizer is None:
        raise GlmkitError(f"{cfg.model} has no tokenizer; training needs one to read the data.")
    dataset = build_dataset(cfg, tokenizer, fmt, config)
    if len(dataset) == 0:
        raise GlmkitError("the training data gave no samples (conversations need an assistant reply).")
    model, trainable, prefix = _trainable(cfg, model, layout)
    model.train()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    wrapped = _wrap(model, cfg, world)
    sharded = cfg.fsdp and world > 1
    manual_sync = world > 1 and prefix is not None  # nothing wraps the prefix: average its gradients here
    if sharded:  # fully_shard turned the parameters into sharded DTensors
        trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer(cfg, trainable)
    out = Path(cfg.output)
    step = _resume(out, model, prefix, optimizer, scheduler, cfg, sharded)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    per_step = cfg.batch_size * cfg.grad_accum * world
    losses: list[float] = []
    bar = _progress(cfg, rank, step)
    t0, tokens_seen = time.perf_counter(), 0
    while step < cfg.steps:
        micro = []
        for a in range(cfg.grad_accum):
            first = step * per_step + (a * world + rank) * cfg.batch_size
            samples = [_sample(dataset, first + j) for j in range(cfg.batch_size)]
            micro.append({k: v.to(device) for k, v in collate(samples, pad, config).items()})
        count = torch.tensor(float(sum(int((b["labels"] != IGNORE).sum()) for b in micro)), device=device)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(count)
        total = torch.zeros((), device=device)
        for b in micro:
            loss = forward_loss(wrapped, b, prefix, cfg.autocast)
            (loss * world / count).backward()  # DDP / FSDP average gradients over processes
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)
            if manual_sync:
                for p in trainable:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(float(total / count))
        tokens_seen += sum(int((b["input_ids"] != pad).sum()) for b in micro) * world  # inputs, not targets
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            tok_s=f"{tokens_seen / (time.perf_counter() - t0):.0f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            _save_state(out, step, model, prefix, optimizer, scheduler, cfg, rank, sharded)
    if bar is not None:
        bar.close()
    model.eval()
    result = {"losses": losses, "steps": step, "samples": len(dataset)}
    state = _model_state(model, sharded)  # collective under FSDP: every process takes part
    if rank == 0:
        result["final"] = str(_save_final(out, cfg, model, state, prefix, layout, raw, tok_dir))
        if cfg.eval_data:
            result["eval"] = evaluate(model, cfg, tokenizer, fmt, prefix)
        (out / "train_result.json").write_text(json.dumps(result, indent=2))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return result


def _sample(dataset: Dataset, position: int):
    epoch, i = divmod(position, len(dataset))
    return dataset.sample(dataset.order(epoch)[i], epoch)


def _optimizer(cfg: TrainConfig, trainable: list):
    """AdamW (no weight decay on vectors) and the learning-rate schedule."""
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg))


def _trainable(cfg: TrainConfig, model: Transformer, layout: str):
    """Freeze what is not trained; add LoRA layers (named as in `layout`) or a prefix encoder.
    -> (model, params, prefix)."""
    from glmkit.adapters import LoRASettings, add_lora
    from glmkit.train.ptuning import PrefixEncoder

    if cfg.lora_r and cfg.ptuning:
        raise GlmkitError("choose LoRA (--lora-r) or P-tuning (--ptuning), not both.")
    if cfg.lora_r:
        model.requires_grad_(False)
        settings = LoRASettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        add_lora(model, layout, settings)
        model.lora_settings = settings
        return model, [p for n, p in model.named_parameters() if ".lora_" in n], None
    if cfg.ptuning:
        model.requires_grad_(False)
        prefix = PrefixEncoder(model.config, cfg.ptuning).to(next(model.parameters()).device)
        return model, list(prefix.parameters()), prefix
    model.requires_grad_(True)
    return model, list(model.parameters()), None


def _wrap(model: nn.Module, cfg: TrainConfig, world: int) -> nn.Module:
    if world <= 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    if not any(p.requires_grad for p in model.parameters()):
        return model  # P-tuning: only the prefix trains; its gradients are averaged by hand
    return DistributedDataParallel(model)


def _progress(cfg: TrainConfig, rank: int, step: int):
    if rank != 0 or not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.objective}", unit="step", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------ checkpoints
def _model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _trainable_state(model: nn.Module, prefix, sharded: bool) -> dict[str, torch.Tensor]:
    if prefix is not None:
        return {k: v.detach().clone() for k, v in prefix.state_dict().items()}
    state = _model_state(model, sharded)
    if any(".lora_" in k for k in state):
        state = {k: v for k, v in state.items() if ".lora_" in k}
    return {k: v.detach().clone() for k, v in state.items()}


def _save_state(out: Path, step: int, model, prefix, optimizer, scheduler, cfg: TrainConfig, rank: int,
                sharded: bool) -> None:
    model_state = _trainable_state(model, prefix, sharded)
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optim_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                         cpu_offload=True))
    else:
        optim_state = optimizer.state_dict()
    if rank != 0:
        return
    target = out / "checkpoints" / f"step-{step:07d}"
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "model": model_state, "optimizer": optim_state,
                "scheduler": scheduler.state_dict(), "config": dataclasses.asdict(cfg),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}, tmp / "state.pt")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)  # a checkpoint is complete or absent, never half-written


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp")) \
        if (out / "checkpoints").is_dir() else []
    return found[-1] if found else None


def _resume(out: Path, model, prefix, optimizer, scheduler, cfg: TrainConfig, sharded: bool) -> int:
    path = latest_checkpoint(out)
    if path is None:
        return 0
    try:  # plain tensors and Python values only: a crafted run directory cannot run code here
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors of every kind
        raise GlmkitError(f"{path / 'state.pt'} cannot be resumed from ({type(e).__name__}); it is damaged or holds "
                          "more than tensors and plain values. Remove it or choose a new --output.") from None
    if sharded:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, strict=not cfg.lora_r)
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    else:
        (prefix or model).load_state_dict(state["model"], strict=prefix is not None or not cfg.lora_r)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])


def _save_final(out: Path, cfg: TrainConfig, model, state: dict, prefix, layout: str, raw: dict | None,
                tok_dir) -> Path:
    final = out / "final"
    if prefix is not None:
        prefix.save(final)
    elif cfg.lora_r:
        from glmkit.train.lora import save_adapter

        save_adapter(model, final, layout, model.lora_settings, base_model=str(cfg.model or ""), state=state)
    else:
        from glmkit.train.export import save_checkpoint

        if raw is None:
            raise GlmkitError(f"{cfg.model} is not an HF-style directory; full fine-tuning writes the base's layout, so "
                              "start from a checkpoint directory (or train a LoRA adapter with --lora-r).")
        save_checkpoint(model, final, raw, tok_dir, state=state)
    return final


# ------------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate(model: nn.Module, cfg: TrainConfig, tokenizer, fmt, prefix=None) -> dict:
    """Mean loss and perplexity of cfg.eval_data under the training objective (GLM: whole documents as
    [gMASK] continuations, the way the model generates)."""
    from glmkit.train.data import Sample
    from glmkit.train.glm_objective import build_sample

    c = model.config
    data = build_dataset(dataclasses.replace(cfg, data=cfg.eval_data), tokenizer, fmt, c)
    if cfg.objective == "glm":  # each piece whole after [gMASK] <sop>, as generation reads it
        pieces = [build_sample(t, [(0, len(t))], [0], c.gmask_token_id, c.sop_token_id, c.eop_token_id)
                  for t in data.items]
        samples_all = [Sample(s.input_ids, s.labels, s.position_ids, s.prefix_len) for s in pieces]
    else:
        samples_all = [data.sample(i) for i in range(len(data))]
    pad = c.pad_token_id or 0
    total, count = 0.0, 0
    for lo in range(0, len(samples_all), cfg.batch_size):
        samples = samples_all[lo: lo + cfg.batch_size]
        batch = {k: v.to(next(model.parameters()).device) for k, v in collate(samples, pad, model.config).items()}
        total += float(forward_loss(model, batch, prefix))
        count += int((batch["labels"] != IGNORE).sum())
    return {"loss": total / max(1, count), "ppl": math.exp(total / max(1, count)), "tokens": count}
