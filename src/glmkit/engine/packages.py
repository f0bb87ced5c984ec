"""The compiled packages on disk ($GLMKIT_HOME/compiled/decode-<key>.pt2, with its batched-step companion
rows-<key>.pt2 where the model has one): each with a small JSON record of the model it was built for;
listing them, removing them, and keeping only the most recently used few per model (the rest are stale:
other weights, another torch, another thread count). No compiling here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

KEEP_PER_MODEL = 3  # packages kept per model label after a build: the most recently used ones


def record(package: Path, label: str | None) -> None:
    """Note which model a package was built for, beside it (`<package>.json`)."""
    package.with_suffix(".json").write_text(json.dumps({"model": label or "unknown", "built": time.time()}))


def companion(package: Path) -> Path:
    """The batched (rows) step's package that goes with the one-row package `package`."""
    return package.with_name("rows-" + package.name.removeprefix("decode-"))


def touch(package: Path) -> None:
    """Mark a package as used now (its modification time orders garbage collection)."""
    try:
        os.utime(package)
    except OSError:
        pass


def list_packages(directory: Path) -> list[dict]:
    """Every package: path, model label, size in MB and when it was last used, most recent first."""
    out = []
    for path in Path(directory).glob("decode-*.pt2"):
        try:
            label = json.loads(path.with_suffix(".json").read_text()).get("model", "unknown")
        except (OSError, ValueError, AttributeError):
            label = "unknown"
        stat, rows = path.stat(), companion(path)
        size = stat.st_size + (rows.stat().st_size if rows.exists() else 0)
        out.append({"path": path, "model": label, "mb": size / 2**20, "used": stat.st_mtime})
    return sorted(out, key=lambda p: -p["used"])


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    companion(path).unlink(missing_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)


def collect_garbage(directory: Path, keep: int = KEEP_PER_MODEL) -> list[Path]:
    """Remove all but the `keep` most recently used packages of each model; returns what was removed."""
    seen: dict[str, int] = {}
    removed = []
    for package in list_packages(directory):
        seen[package["model"]] = seen.get(package["model"], 0) + 1
        if seen[package["model"]] > keep:
            remove(package["path"])
            removed.append(package["path"])
    return removed


def clear(directory: Path) -> int:
    """Remove every package (and any batched-step package left without its one-row package); returns how many."""
    packages = list_packages(directory)
    for package in packages:
        remove(package["path"])
    for stray in Path(directory).glob("rows-*.pt2"):
        stray.unlink(missing_ok=True)
    return len(packages)
