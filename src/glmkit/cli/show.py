"""`glmkit show NAME`: what a model is, read from its config and headers without loading its weights: source,
layout, architecture, parameters, context, quantization, chat format, chat template, licence (when declared).
NAME is a model in glmkit's cache (as `glmkit list` names it), a checkpoint directory, a .gguf file or an alias."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None,
                        help="a cached model, checkpoint directory, .gguf file or alias (default: smollm2-135m-instruct)")
    parser.add_argument("--template", action="store_true", help="print the whole chat template")


def main(args: argparse.Namespace) -> int:
    from glmkit import loaders
    from glmkit.chat import tokenizer_and_format
    from glmkit.errors import GlmkitError
    from glmkit.loaders.cache import cached_models, licence, parameter_count

    source = next((str(m.path) for m in cached_models() if m.name == args.name), args.name)
    checkpoint = loaders.open(source)
    c = checkpoint.config
    try:
        _, fmt = tokenizer_and_format(checkpoint, None)
    except GlmkitError as e:
        fmt, why = None, str(e)
    else:
        why = "no chat template and no GLM role tokens"
    n = parameter_count(checkpoint)
    arch = checkpoint.raw_config.get("model_type") or (checkpoint.gguf.fields["general.architecture"].contents()
                                                        if checkpoint.gguf is not None else "?")
    parts = [f"{c.num_layers} layers", f"hidden {c.hidden_size}", f"{c.num_heads} heads / {c.num_kv_heads} kv heads"]
    if c.moe is not None:
        parts.append(f"{c.moe.num_experts} experts, {c.moe.experts_per_token} per token")
    if c.mla is not None:
        parts.append(f"latent attention (rank {c.mla.kv_lora_rank})" + (", sparse indexer" if c.mla.index_topk else ""))
    if c.vision is not None:
        parts.append(f"vision tower ({c.vision.depth} blocks)")
    rows = [("source", checkpoint.source), ("layout", checkpoint.layout.name), ("architecture", arch),
            ("shape", ", ".join(parts)), ("parameters", f"{n / 1e9:.3f} B" if n and n >= 1e8 else
                                         f"{n / 1e6:.1f} M" if n else "? (pickled weights)"),
            ("context", f"{c.max_seq_len} tokens"), ("vocabulary", str(c.vocab_size)),
            ("quantization", checkpoint.quantization or "none (float weights)"),
            ("chat format", fmt.name if fmt is not None else f"none ({why})"),
            ("licence", licence(checkpoint) or "not declared")]
    for key, value in rows:
        print(f"{key:<13} {value}")
    template = checkpoint.chat_template
    if template:
        lines = template.strip().splitlines()
        print(f"{'template':<13} {len(template)} characters, {len(lines)} lines" + ("" if args.template else
                                                                                  " (--template prints it)"))
        if args.template:
            print(template)
    return 0
