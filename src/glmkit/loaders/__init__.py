"""Checkpoint loaders: `open(source) -> Checkpoint` (layout, config, lazily read tensors, tokenizer files,
chat template, stored quantization) and `assemble(checkpoint, skeleton, ...)`, the strictly accounted model.

Directories in the Hugging Face layout (THUDM remote-code names, transformers-native names, glmkit's own)
and GGUF files (llama, chatglm, glm4, glm4moe, deepseek2, glm-dsa); packaged aliases and Hugging Face repo ids resolve through hub.py.
Nothing here runs code from a checkpoint.
"""

from __future__ import annotations

from glmkit.loaders.assemble import assemble, fill, lean_heap, pick_device, pick_dtype
from glmkit.loaders.checkpoint import Checkpoint, file_identity, open

__all__ = ["Checkpoint", "assemble", "file_identity", "fill", "lean_heap", "open", "pick_device", "pick_dtype"]
