"""`glmkit rm NAME`: remove a model from glmkit's cache (as `glmkit list` names it); `glmkit rm --compiled KEY`
removes a compiled decode step (a KEY prefix as listed, or `all`)."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="a model as `glmkit list` names it, or with --compiled a package key (or all)")
    parser.add_argument("--compiled", action="store_true", help="remove a compiled decode step instead of a model")


def main(args: argparse.Namespace) -> int:
    from glmkit.errors import GlmkitError

    if args.compiled:
        from glmkit.engine.packages import list_packages, remove
        from glmkit.llm import compiled_dir

        chosen = [p for p in list_packages(compiled_dir())
                  if args.name == "all" or p["path"].stem.removeprefix("decode-").startswith(args.name)]
        if not chosen:
            raise GlmkitError(f"no compiled decode step {args.name!r} in {compiled_dir()} (glmkit list shows them).")
        for p in chosen:
            remove(p["path"])
        print(f"removed {len(chosen)} compiled decode step(s), {sum(p['mb'] for p in chosen):.0f} MiB")
        return 0
    from glmkit.loaders.cache import find, remove

    model = find(args.name)
    remove(model)
    print(f"removed {model.name} ({model.bytes / 2**20:.0f} MiB)")
    return 0
