"""Read a Hugging Face style checkpoint directory: config.json + *.safetensors or *.bin (single or sharded).

Safetensors are memory-mapped; .bin files go through torch.load(weights_only=True). Python files that
ship with a checkpoint are never imported or executed. Returns our config and our tensors; building
the model and checking it is filled completely is the caller's job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from glmkit.config import ModelConfig
from glmkit.errors import CheckpointError, GlmkitError
from glmkit.loaders.keymap import GLMKIT, THUDM_V1, THUDM_V2, TRANSFORMERS, Rule, map_tensors

Named = Iterator[tuple[str, str, Callable[[], torch.Tensor]]]


def read_config(directory: Path) -> tuple[ModelConfig, list[Rule]]:
    """config.json -> (ModelConfig, the name table for this layout)."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; point glmkit at the checkpoint directory that "
                              "holds config.json and the weight files.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or repair it.") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object.")
    if "glmkit_config" in raw:  # glmkit's own spelling (e.g. a model trained from scratch by glmkit train)
        return ModelConfig.from_dict(raw["glmkit_config"]), GLMKIT
    config = ModelConfig.from_hf_dict(raw)
    if "num_layers" not in raw:
        return config, TRANSFORMERS
    return config, THUDM_V1 if config.positions == "2d" else THUDM_V2


def load_directory(directory: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    """-> (config, our tensors, where each came from)."""
    directory = Path(directory).expanduser()
    if not directory.exists():
        raise CheckpointError(f"{directory} does not exist; pass the path of a checkpoint directory.")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; pass the directory that holds config.json "
                              "and the weights.")
    config, rules = read_config(directory)
    try:
        tensors, sources = map_tensors(rules, _named_tensors(directory), config)
    except GlmkitError:
        raise
    except (RuntimeError, ValueError) as e:  # a layout fix that does not fit the stored shape
        raise CheckpointError(f"a tensor in {directory} does not fit config.json ({e}).") from None
    return config, tensors, sources


def _weight_files(directory: Path) -> list[Path]:
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "*.bin")):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (KeyError, TypeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e}); re-download it.") from None
            files = [directory / name for name in sorted(set(weight_map.values()))]
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


def _named_tensors(directory: Path) -> Named:
    for file in _weight_files(directory):
        if file.suffix == ".safetensors":
            yield from _safetensors(file)
        else:
            yield from _torch_bin(file)


def _safetensors(file: Path) -> Named:
    try:
        handle = safe_open(str(file), framework="pt")
        names = list(handle.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is truncated or corrupt ({e}); re-download it.") from None

    def loader(name: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            try:
                return handle.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({e}); the file is truncated "
                                      "or corrupt, re-download it.") from None
        return load

    for name in names:
        yield name, file.name, loader(name)


def _torch_bin(file: Path) -> Named:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
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
