"""A lean reader of the GGUF container: header key/values and tensor descriptors, tensor bytes on demand.

gguf's GGUFReader keeps a numpy view per string of the vocabulary (about 160 MB of Python objects for a
49k-token file, plus 2 s to build them); this reader decodes the header once into plain Python values
and reads a tensor's bytes (or a range of its rows) with ordinary file reads only when asked, so nothing
of the file stays mapped. The quantization tables and dequantizers stay gguf's. The interface follows
GGUFReader where glmkit uses it (fields[key].contents(), tensors[i].name / tensor_type / shape / data).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
            GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
            GGUFValueType.FLOAT32: "f", GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
            GGUFValueType.FLOAT64: "d", GGUFValueType.BOOL: "?"}
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64}


class Field:
    """One header value, already decoded (str, number, bool or list)."""

    def __init__(self, value: Any):
        self.value = value

    def contents(self) -> Any:
        return self.value


@dataclass
class TensorInfo:
    path: Path
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    data_offset: int
    n_bytes: int

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.tensor_type]
        return self.shape[0] * size // block

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64))

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of the tensor seen as (rows, fastest dimension): elements for plain types, the
        row's bytes (blocks) for quantized ones."""
        with open(self.path, "rb") as f:
            f.seek(self.data_offset + lo * self.row_bytes)
            raw = np.fromfile(f, dtype=np.uint8, count=(hi - lo) * self.row_bytes)
        plain = _PLAIN.get(self.tensor_type)
        return raw.view(plain).reshape(hi - lo, -1) if plain is not None else raw.reshape(hi - lo, self.row_bytes)

    @property
    def data(self) -> np.ndarray:
        """The whole tensor as GGUFReader shapes it: elements (reversed shape) or bytes per row."""
        rows = self.rows(0, self.n_rows)
        return rows.reshape(*reversed(self.shape[1:]), rows.shape[-1])


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fields: dict[str, Field] = {}
        self.tensors: list[TensorInfo] = []
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            self._parse(buf, len(buf))

    def _parse(self, buf, size: int) -> None:
        if buf[:4] != b"GGUF":
            raise ValueError("no GGUF magic at the start of the file")
        version, n_tensors, n_fields = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (big-endian, or newer than glmkit reads)")
        self._off = 24
        for _ in range(n_fields):
            key = self._string(buf)
            self.fields[key] = Field(self._value(buf, GGUFValueType(self._unpack(buf, "I"))))
        infos = []
        for _ in range(n_tensors):
            name = self._string(buf)
            dims = struct.unpack_from(f"<{self._unpack(buf, 'I')}Q", buf, self._off)
            self._off += 8 * len(dims)
            kind, offset = GGMLQuantizationType(self._unpack(buf, "I")), self._unpack(buf, "Q")
            infos.append((name, kind, tuple(int(d) for d in dims), offset))
        align = int(self.fields.get("general.alignment", Field(32)).value)
        start = -(-self._off // align) * align
        for name, kind, dims, offset in infos:
            block, type_size = GGML_QUANT_SIZES[kind]
            n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block
            if start + offset + n_bytes > size:
                raise ValueError(f"tensor {name!r} runs past the end of the file ({size} bytes)")
            self.tensors.append(TensorInfo(self.path, name, kind, dims, start + offset, n_bytes))
        del self._off

    def _unpack(self, buf, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, buf, self._off)
        self._off += struct.calcsize(fmt)
        return value

    def _string(self, buf) -> str:
        n = self._unpack(buf, "Q")
        text = bytes(buf[self._off: self._off + n]).decode("utf-8", errors="replace")
        self._off += n
        return text

    def _value(self, buf, kind: GGUFValueType) -> Any:
        if kind == GGUFValueType.STRING:
            return self._string(buf)
        if kind in _SCALARS:
            return self._unpack(buf, _SCALARS[kind])
        if kind == GGUFValueType.ARRAY:
            item, n = GGUFValueType(self._unpack(buf, "I")), self._unpack(buf, "Q")
            if item in _SCALARS:  # one read for the whole array
                fmt = f"<{n}{_SCALARS[item]}"
                values = list(struct.unpack_from(fmt, buf, self._off))
                self._off += struct.calcsize(fmt)
                return values
            return [self._value(buf, item) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {kind}")
