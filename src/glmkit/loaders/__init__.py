"""Checkpoint loaders: a source path -> (ModelConfig, our tensors, where each tensor came from).

Directories in the Hugging Face layout (THUDM remote-code names or transformers-native names) today;
GGUF files arrive with their own module. Nothing here builds a model or runs code from a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glmkit.config import ModelConfig
from glmkit.loaders.hf import load_directory


def load(source: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    return load_directory(source)


__all__ = ["load"]
