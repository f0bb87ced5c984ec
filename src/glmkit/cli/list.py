"""`glmkit list`: the models in glmkit's cache ($GLMKIT_HOME/models: packaged pulls and `glmkit pull` downloads)
with size, format and stored quantization, then the compiled decode steps ($GLMKIT_HOME/compiled)."""

from __future__ import annotations

import argparse
import time


def add_args(parser: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    from glmkit.engine.packages import list_packages
    from glmkit.llm import compiled_dir
    from glmkit.loaders.cache import cached_models, models_dir

    models = cached_models()
    rows = [(m.name, f"{m.bytes / 2**20:.0f} MiB", m.format, m.quantization) for m in models]
    print(f"models ({models_dir()}):" if rows else f"no models in {models_dir()} yet (glmkit pull NAME)")
    _table(("NAME", "SIZE", "FORMAT", "QUANTIZATION"), rows)
    packages = list_packages(compiled_dir())
    if packages:
        print(f"\ncompiled decode steps ({compiled_dir()}; glmkit rm --compiled KEY, glmkit compile --clear):")
        _table(("KEY", "SIZE", "MODEL", "LAST USED"),
               [(p["path"].stem.removeprefix("decode-")[:16], f"{p['mb']:.0f} MiB", p["model"],
                 time.strftime("%Y-%m-%d %H:%M", time.localtime(p["used"]))) for p in packages])
    return 0


def _table(head: tuple, rows: list[tuple]) -> None:
    if not rows:
        return
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
