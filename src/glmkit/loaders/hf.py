"""Read a Hugging Face style checkpoint directory: config.json, *.safetensors or *.bin (single or sharded),
tokenizer settings and chat template.

Safetensors are memory-mapped; .bin files go through torch.load(weights_only=True); shard paths from an
index must stay inside the directory. Python files that ship with a checkpoint are never imported or
executed. Tensors come back under the checkpoint's own names, read when asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from glmkit.errors import CheckpointError

Named = Iterator[tuple[str, str, Callable[[], torch.Tensor]]]


def read_json(path: Path, what: str = "") -> dict:
    """A JSON object file, or a clear error."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or repair it.") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object{what}.")
    return raw


def raw_config(directory: Path) -> dict:
    if not directory.exists():
        raise CheckpointError(f"{directory} does not exist; pass the path of a checkpoint directory.")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; pass the directory that holds config.json "
                              "and the weights.")
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; point glmkit at the checkpoint directory that "
                              "holds config.json and the weight files.")
    return read_json(path)


def tokenizer_config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    return read_json(path) if path.is_file() else {}


def generation_config(directory: Path) -> dict:
    """generation_config.json (the model authors' sampling settings), or {}."""
    path = directory / "generation_config.json"
    return read_json(path) if path.is_file() else {}


def template_source(directory: Path, tok_config: dict) -> str | None:
    """The checkpoint's Jinja chat template: chat_template.jinja, chat_template.json or tokenizer_config.json."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    source = tok_config.get("chat_template")
    if (directory / "chat_template.json").is_file():
        source = read_json(directory / "chat_template.json").get("chat_template")
    if isinstance(source, list):  # named templates: take the default one
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    return source if isinstance(source, str) and source.strip() else None


def weight_files(directory: Path) -> list[Path]:
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "*.bin")):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e}); re-download it.") from None
            files = [directory / name for name in names]
            outside = [n for n, f in zip(names, files) if f.resolve().parent != directory.resolve()]
            if outside:
                raise CheckpointError(f"{index.name} names shard {outside[0]!r} outside {directory}; refusing it.")
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index.name} lists shard(s) {missing} that are not in {directory}; "
                                      "the download is incomplete.")
            return files
        single = directory / ("model.safetensors" if pattern == "*.safetensors" else "pytorch_model.bin")
        if single.is_file():
            return [single]
        files = sorted(directory.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{directory} has no weights (*.safetensors or *.bin files); download them next to "
                          "config.json.")


def named_tensors(directory: Path) -> Named:
    for file in weight_files(directory):
        if file.suffix == ".safetensors":
            yield from _safetensors(file)
        else:
            yield from _torch_bin(file)


def open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is truncated or corrupt ({e}); re-download it.") from None


def _safetensors(file: Path) -> Named:
    handle = open_safetensors(file)

    def loader(name: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            try:
                return handle.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({e}); the file is truncated "
                                      "or corrupt, re-download it.") from None
        return load

    for name in list(handle.keys()):
        yield name, file.name, loader(name)


def _torch_bin(file: Path) -> Named:
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a legacy (pre-zip) file cannot be memory-mapped: read it whole
            if "mmap" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here: pickle, zip and unpickler errors
        raise CheckpointError(f"{file} cannot be read as a PyTorch weights file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); it is corrupt, truncated or holds "
                              "more than plain tensors. Re-download it.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a dict of tensors.")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{file}: entry {name!r} is not a tensor.")
        yield name, file.name, (lambda t=tensor: t)
