"""The compiled packages on disk ($GLMKIT_HOME/compiled/decode-<key>.pt2): each with a small JSON record of the
model it was built for; listing them, removing them, and keeping only the most recently used few per model
(the rest are stale: other weights, another torch, another thread count). No compiling here.
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
        stat = path.stat()
        out.append({"path": path, "model": label, "mb": stat.st_size / 2**20, "used": stat.st_mtime})
    return sorted(out, key=lambda p: -p["used"])


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
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
    """Remove every package; returns how many."""
    packages = list_packages(directory)
    for package in packages:
        remove(package["path"])
    return len(packages)
