"""`open(source) -> Checkpoint`: everything a source holds, read lazily, nothing built.

A source is a checkpoint directory, a .gguf file, a packaged alias (pulled on first use) or a Hugging Face repo
id (fetched when online). The Checkpoint says its layout, config, stored quantization, where its tokenizer
lives (a directory, or the GGUF metadata), its chat template, special-token strings and generation_config.json
(the authors' sampling settings), and reads its
tensors under our names only when `tensors()` is called. No model is built and no code from disk runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from glmkit.config import ModelConfig
from glmkit.errors import CheckpointError, GlmkitError
import glmkit.loaders.hf as hf
from glmkit.loaders.gguf_file import GGUFFile
from glmkit.loaders.keymap import NO_MATCH, layer_index, map_tensors, text_layer
from glmkit.loaders.layouts import GGUF_LAYOUTS, Layout, detect, read_config


@dataclass
class Checkpoint:
    source: str
    layout: Layout
    config: ModelConfig
    quantization: str | None = None  # 'int4' / 'int8' when the weights on disk are stored quantized
    directory: Path | None = None  # tokenizer files of a directory checkpoint
    gguf: GGUFFile | None = None  # the parsed header of a GGUF file (tokenizer metadata, tensor descriptors)
    tokenizer_config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json (GGUF: special strings)
    chat_template: str | None = None
    raw_config: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)  # the authors' sampling: generation_config.json, GGUF
    preprocessor: dict[str, Any] = field(default_factory=dict)  # preprocessor_config.json: a vision model's images

    def named(self, keep_int4: bool = False, keep_int8: bool = False, dtype: torch.dtype = torch.float32):
        """(source name, file, loader) triples under the checkpoint's own names."""
        if self.gguf is not None:
            from glmkit.loaders.gguf import named_tensors

            return named_tensors(self.gguf, self.config, keep_int4, keep_int8, dtype)
        return hf.named_tensors(self.directory)

    def tensors(self, keep_int4: bool = False, keep_int8: bool = False, dtype: torch.dtype = torch.float32,
                wrap=iter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Our tensors (name -> tensor, or GGUF blocks kept packed) and where each came from, for errors.
        keep_int4 / keep_int8: GGUF quantized weights stay as the file's blocks (loaders.gguf.Int4Blocks /
        Int8Rows); dtype: what GGUF's quantized types dequantize to (directories keep their stored dtypes);
        wrap: around the layers as they are read (a progress bar)."""
        tensors, sources = {}, {}
        for _, part, where in wrap(self.layers(keep_int4, keep_int8, dtype)):
            tensors.update(part)
            sources.update(where)
        return tensors, sources

    def layers(self, keep_int4: bool = False, keep_int8: bool = False, dtype: torch.dtype = torch.float32):
        """tensors() one layer at a time: (layer index, tensors, sources) for each layer in order, then (None, ...)
        for what belongs to no layer (embedding, final norm, head). Each group is read only when reached, so a
        model can be filled and quantized layer by layer, one layer's float weights in memory at most (a
        checkpoint larger than RAM). The layer count is checked on names before anything is read."""
        groups: dict[int, list] = {}
        ours = []
        for triple in self.named(keep_int4, keep_int8, dtype):
            name = self._our_name(triple[0])
            i = text_layer(name) if isinstance(name, str) else None
            groups.setdefault(-1 if name is NO_MATCH else i if i is not None else 1 << 62, []).append(triple)
            ours += [name] if isinstance(name, str) else []
        self._check_layers(ours)
        self._without_absent_mtp(ours)
        return ((None if key == 1 << 62 else key, *self._mapped(groups[key])) for key in sorted(groups))

    def _our_name(self, name: str):
        """Our name for a source tensor name (None: dropped on purpose, NO_MATCH: unknown)."""
        if self.layout.table is None:  # glmkit's own names
            return name
        target = self.layout.table.target(name, self.config)
        return target.name if target is not None and target is not NO_MATCH else target

    def _mapped(self, named: list) -> tuple[dict, dict[str, str]]:
        if self.layout.table is None:
            return {n: load() for n, _, load in named}, {n: f"{file}: {n}" for n, file, _ in named}
        try:
            return map_tensors(self.layout.table, named, self.config)
        except GlmkitError:
            raise
        except (RuntimeError, ValueError) as e:  # a layout fix that does not fit the stored shape
            raise CheckpointError(f"a tensor in {self.source} does not fit its config ({e}).") from None

    def _without_absent_mtp(self, names) -> None:
        """config.json counts MTP layers that files written by transformers (and many conversions) leave out:
        then the model has none (it never runs them), instead of failing on their missing weights."""
        c = self.config
        if c.mtp_layers and not any(layer_index(name) == str(c.num_layers) for name in names):
            self.config = replace(c, mtp_layers=0)

    def _check_layers(self, names) -> None:
        """config.json's layer count against the layers the weights hold (our names), before the model is built: a
        hostile or mistaken count fails at once, not after minutes of building."""
        held = {i for name in names if (i := text_layer(name)) is not None}
        n = max(held) + 1 if held else 0
        if self.config.num_layers > n:
            raise CheckpointError(f"the config says {self.config.num_layers} layers but the weights in {self.source} "
                                  f"hold {n}; the config does not belong to these weights (or files are missing).")

    def release_metadata(self) -> None:
        """Drop the GGUF header's key/values (the vocabulary) once the tokenizer is built: peak memory."""
        if self.gguf is not None:
            self.gguf.fields = {}


def file_identity(*paths: str | Path | None) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of each file given, or of every file in each directory given: what a cache of things
    derived from the weights (a compiled step) can be keyed on without reading them."""
    out = []
    for path in (Path(p).expanduser().resolve() for p in paths if p is not None):
        files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path] if path.is_file() else []
        for f in files:
            stat = f.stat()
            out.append((str(f), stat.st_size, stat.st_mtime_ns))
    return out


def open(source: str | Path | None = None) -> Checkpoint:  # noqa: A001 - the loaders' verb
    """A checkpoint directory, .gguf file, packaged alias (None: the default model) or Hugging Face repo id."""
    from glmkit.loaders.hub import resolve

    path = Path(resolve(source)).expanduser()
    if str(path).lower().endswith(".gguf"):
        return _open_gguf(path)
    raw = hf.raw_config(path)
    layout = detect(raw)
    config = read_config(layout, raw)
    quantization = None
    if layout.name == "glmkit_quantized":
        quantization = "int4" if raw["quantization"].get("bits") == 4 else "int8"
    elif raw.get("quantization_bit") in (4, 8):  # official ChatGLM -int4 / -int8
        quantization = f"int{raw['quantization_bit']}"
    tok_config = hf.tokenizer_config(path)
    preprocessor = hf.read_json(path / "preprocessor_config.json") if (path / "preprocessor_config.json").is_file() else {}
    return Checkpoint(str(path), layout, config, quantization, path, None, tok_config,
                      hf.template_source(path, tok_config), raw, hf.generation_config(path), preprocessor)


def _open_gguf(path: Path) -> Checkpoint:
    from glmkit.loaders.gguf import gguf_config, open_gguf, sampling_settings, special_strings, stored_quantization

    reader = open_gguf(path)
    config = gguf_config(reader, path)
    layout = GGUF_LAYOUTS[reader.fields["general.architecture"].contents()]
    template = reader.fields.get("tokenizer.chat_template")
    return Checkpoint(str(path), layout, config, stored_quantization(reader), None, reader, special_strings(reader),
                      template.contents() if template is not None else None, generation=sampling_settings(reader))
