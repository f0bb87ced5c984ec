"""Checkpoint loaders: a source path -> (ModelConfig, our tensors, where each tensor came from).

Directories in the Hugging Face layout (THUDM remote-code names or transformers-native names) and
GGUF files (llama architecture). Nothing here builds a model or runs code from a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glmkit.config import ModelConfig
from glmkit.loaders.hf import load_directory


def load(source: str | Path, keep_int4: bool = False, gguf_reader=None, dtype: torch.dtype = torch.float32,
         keep_int8: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    """keep_int4: GGUF Q4_0 / Q4_1 linear weights stay packed (loaders.gguf.Int4Blocks); keep_int8: GGUF Q8_0
    linear and head weights too (loaders.gguf.Int8Rows).
    gguf_reader: the file's GGUFFile when the caller has opened it already. dtype: what GGUF's quantized
    types dequantize to (checkpoint directories keep their stored dtypes)."""
    if str(source).lower().endswith(".gguf"):
        from glmkit.loaders.gguf import load_gguf

        return load_gguf(source, keep_int4, gguf_reader, dtype, keep_int8)
    return load_directory(source)


__all__ = ["load"]
