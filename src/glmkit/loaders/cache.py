"""What glmkit's cache ($GLMKIT_HOME) holds, read without loading anything: the models under models/ (packaged
pulls and Hugging Face downloads, a GGUF file or a checkpoint directory each) with their size, format and stored
quantization, and the servers glmkit runs on this machine (servers/<pid>.json, written by `glmkit serve`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from glmkit.errors import GlmkitError
from glmkit.loaders.hub import home, models_dir


@dataclass
class Model:
    name: str  # as `glmkit rm` / `show` take it: the packaged alias, or org/repo for a Hugging Face download
    path: Path  # the GGUF file, or the checkpoint directory
    bytes: int
    format: str  # "gguf", "safetensors" or "bin"
    quantization: str  # e.g. "Q4_1", "int4 (glmkit)", "bfloat16"


def cached_models() -> list[Model]:
    out = []
    for folder in sorted(p for p in models_dir().glob("*") if p.is_dir() and not p.name.startswith(".")):
        name = folder.name.replace("--", "/")
        ggufs = sorted(folder.glob("*.gguf"))
        if (folder / "config.json").is_file():
            out.append(_directory(name, folder))
        for gguf in ggufs:
            label = name if len(ggufs) == 1 else f"{name}:{gguf.stem}"
            out.append(Model(label, gguf, gguf.stat().st_size, "gguf", gguf_type(gguf)))
    return out


def _directory(name: str, folder: Path) -> Model:
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    kind = "safetensors" if any(folder.glob("*.safetensors")) else "bin"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    spec = config.get("quantization") if isinstance(config.get("quantization"), dict) else None
    if spec:
        quant = f"int{spec.get('bits')} (glmkit)"
    elif config.get("quantization_bit"):
        quant = f"int{config['quantization_bit']} (ChatGLM)"
    else:
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        quant = str(config.get("torch_dtype") or config.get("dtype") or text.get("dtype") or "float")
    return Model(name, folder, size, kind, quant)


def gguf_type(path: Path) -> str:
    """The tensor type most of a GGUF's matrices are stored in (e.g. Q4_1), or '?' for an unreadable file."""
    from glmkit.loaders.gguf_file import GGUFFile

    try:
        reader = GGUFFile(path)
    except Exception:  # noqa: BLE001 - a damaged file is listed, not fatal
        return "?"
    kinds = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    return kinds.most_common(1)[0][0] if kinds else "?"


def find(name: str) -> Model:
    """A cached model by its listed name (or its folder's name)."""
    for model in cached_models():
        if name in (model.name, model.path.name, model.path.parent.name if model.format == "gguf" else ""):
            return model
    known = ", ".join(m.name for m in cached_models()) or "none"
    raise GlmkitError(f"no model {name!r} in glmkit's cache ({models_dir()}); cached: {known}.")


def remove(model: Model) -> None:
    folder = model.path if model.path.is_dir() else model.path.parent
    if model.path.is_file() and len(list(folder.glob("*.gguf"))) > 1:
        model.path.unlink()  # one quantization of several
        return
    shutil.rmtree(folder)


def servers_dir() -> Path:
    return home() / "servers"


def register_server(info: dict) -> Path:
    """`glmkit serve`: note this server (pid, address, model) until it ends."""
    servers_dir().mkdir(parents=True, exist_ok=True)
    path = servers_dir() / f"{os.getpid()}.json"
    path.write_text(json.dumps({"pid": os.getpid(), **info}))
    return path


def running_servers() -> list[dict]:
    """The servers noted whose process still runs (notes of ended ones are dropped)."""
    out = []
    for path in sorted(servers_dir().glob("*.json")):
        try:
            info = json.loads(path.read_text())
            os.kill(int(info["pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        out.append(info)
    return out


def parameter_count(checkpoint) -> int | None:
    """The parameters a checkpoint stores, from its headers alone (None for pickled .bin files)."""
    import math

    if checkpoint.gguf is not None:
        return sum(math.prod(t.shape) for t in checkpoint.gguf.tensors)
    from glmkit.loaders.hf import open_safetensors, weight_files

    total = 0
    for file in weight_files(checkpoint.directory):
        if file.suffix != ".safetensors":
            return None
        handle = open_safetensors(file)
        total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


def licence(checkpoint) -> str | None:
    """What licence a checkpoint declares: GGUF general.license, or the model card's `license:` line."""
    if checkpoint.gguf is not None:
        field = checkpoint.gguf.fields.get("general.license")
        return str(field.contents()) if field is not None else None
    card = checkpoint.directory / "README.md"
    if card.is_file():
        for line in card.read_text(encoding="utf-8", errors="replace").splitlines()[:40]:
            if line.strip().lower().startswith("license:"):
                return line.split(":", 1)[1].strip()
    return None
