"""`glmkit train`: GLM pretraining, causal LM, chat SFT, LoRA and P-tuning v2 from a config file or flags.

The same command runs under torchrun (`torchrun --nproc_per_node N -m glmkit.train ...`). Flags given on
the command line override the config file's settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json


def add_args(parser: argparse.ArgumentParser) -> None:
    from glmkit.train.trainer import TrainConfig

    parser.add_argument("--config", default=None, help="TOML or JSON file of training settings")
    defaults = TrainConfig(output="", data=[])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(value, list):
            kind = float if f.name == "mixture" else str
            parser.add_argument(flag, nargs="+", type=kind, default=None, help=f"default: {value}")
        else:
            kind = type(value) if value is not None and value != "" else str
            parser.add_argument(flag, type=kind, default=None,
                                help=f"default: {value}" if value not in (None, "") else None)


def main(args: argparse.Namespace) -> int:
    from glmkit.errors import GlmkitError
    from glmkit.train.trainer import TrainConfig, train

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    if args.config:
        cfg = TrainConfig.from_file(args.config, **given)
    else:
        missing = [n for n in ("output", "data") if n not in given]
        if missing:
            raise GlmkitError(f"give --{' and --'.join(missing)} (or a --config file).")
        cfg = TrainConfig(**given)
    try:
        result = train(cfg)
    finally:  # under torchrun: end the group before exit (a gloo thread still running at exit aborted a rank)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if "final" in result:
        summary = {k: v for k, v in result.items() if k != "losses"}
        summary["last_loss"] = result["losses"][-1] if result["losses"] else None
        print(json.dumps(summary, ensure_ascii=False))
    return 0
