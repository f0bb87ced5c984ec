"""Arguments and helpers shared by the CLI commands: which model to load and how to sample."""

from __future__ import annotations

import argparse
import sys

def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="checkpoint directory, .gguf file or alias (default: smollm2-135m-instruct)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="activation dtype (default: float32 on CPU, bfloat16 on CUDA and for quantized models)")
    parser.add_argument("--chat-format", default=None,
                        help="force a chat format: chatglm1, chatglm2, chatglm3, glm4, glm45 or jinja")
    parser.add_argument("--lora", default=None, metavar="ADAPTER_DIR",
                        help="apply a LoRA adapter (PEFT format, e.g. written by glmkit train --lora-r)")
    parser.add_argument("--ptuning", default=None, metavar="PREFIX_DIR",
                        help="use a P-tuning v2 prefix written by glmkit train --ptuning N")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="weight-only quantization after loading (a quantized GGUF stays int4/int8 by itself)")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--compile", action="store_true",
                       help="build the compiled decode steps in the background if none is on disk (what "
                            "chat and serve do by default; glmkit compile builds one ahead of time); a package "
                            "already on disk is always used")
    speed.add_argument("--eager", action="store_true", help="never use a compiled decode step")


def add_sampling_args(parser: argparse.ArgumentParser, *, max_tokens: int | None) -> None:
    """Sampling flags; those left out take the model's defaults (its generation_config.json, else llama-server's:
    temperature 0.8, top-k 40, top-p 0.95, min-p 0.05)."""
    parser.add_argument("--max-tokens", type=int, default=max_tokens,
                        help=f"most tokens to generate (default {max_tokens or 'the model default'})")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's)")
    parser.add_argument("--top-p", type=float, default=None, help="default: the model's")
    parser.add_argument("--top-k", type=int, default=None, help="0 = off (default: the model's)")
    parser.add_argument("--min-p", type=float, default=None, help="default: the model's")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="default: the model's (1 = off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable output (default: none)")


def sampling(args: argparse.Namespace) -> dict:
    """The sampling flags given (None ones are left to the model's defaults)."""
    given = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                 min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    return {k: v for k, v in given.items() if v is not None}


def template_kwargs(args: argparse.Namespace) -> dict:
    """What the chat template is told: --no-think is enable_thinking=false (GLM-4.5 and later templates)."""
    return {"enable_thinking": False} if getattr(args, "no_think", False) else {}


def load_model(args: argparse.Namespace, build: bool = False, batched: bool = False):
    """The model the arguments name. Decoding starts eagerly; a compiled step on disk is loaded in the background
    and used once ready; build=True (chat, serve), or --compile, also builds one there when none is on disk
    (at low priority; a line on stderr says when decoding switches to it). --eager, or GLMKIT_BUILD=0 in the
    environment (the tests set it), builds none. batched (serve): the batched step too."""
    import os

    import glmkit
    from glmkit.loaders.hub import DEFAULT_MODEL

    args.model = args.model or DEFAULT_MODEL
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    llm = glmkit.load(args.model, device=args.device, dtype=args.dtype, chat_format=args.chat_format,
                       quantize=args.quantize, lora=args.lora, ptuning=args.ptuning)
    if not getattr(args, "eager", False):  # decoding stays eager until the package is loaded (or built)
        build = args.compile or (build and os.environ.get("GLMKIT_BUILD", "1") != "0")
        args.compiled = llm.compile(background=True, build=build, on_ready=_switched if build else None,
                                    batched=batched)
    return llm


def _switched(decoder) -> None:
    if not decoder.cached:
        print(f"\n(the compiled decode step is ready after {decoder.seconds:.0f} s; decoding switches to it)",
              file=sys.stderr, flush=True)
