"""A lean GGUF (v2/v3) header parser: metadata as plain Python values and tensor descriptors over one
memmap. gguf's own reader builds numpy objects for every vocabulary string (~3 s for a 49k vocabulary);
here long string arrays are skipped and only their length is kept, so opening takes milliseconds."""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
       10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16}
KEEP_STRINGS = 64  # string arrays longer than this are skipped (vocabularies, merges); their length is kept


class SkippedArray:
    """Stands for a long string array that was not decoded; only its length is known."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@dataclass
class TensorDesc:
    name: str
    shape: np.ndarray          # GGUF order: ne0 (the contiguous, input dimension) first
    tensor_type: GGMLQuantizationType
    data_offset: int           # absolute byte offset
    n_elements: int
    n_bytes: int
    _mm: Any = None

    @property
    def data(self) -> np.ndarray:
        """Rows view into the memmap: quantized and bf16 as uint8 [rows, row_bytes], f32/f16 typed [.., ne0]."""
        raw = self._mm[self.data_offset:self.data_offset + self.n_bytes]
        ne0 = int(self.shape[0])
        rows = self.n_elements // ne0
        dt = _FLOAT_DTYPES.get(self.tensor_type.name)
        if dt is not None:
            arr = raw.view(dt)
            return arr if len(self.shape) == 1 else arr.reshape(rows, ne0)
        return raw.reshape(rows, -1)


class GGUFHeader:
    """Parsed header of one GGUF file: `fields` (key -> value), `tensors` (TensorDesc list), `end` (bytes)."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf, self._pos = buf, 0
        if self._take(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        (version,) = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._unpack("<QQ")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = np.array(self._unpack(f"<{n_dims}Q"), dtype=np.int64)
            qtype, offset = self._unpack("<IQ")
            infos.append((name, dims, GGMLQuantizationType(qtype), offset))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        self.tensors: list[TensorDesc] = []
        for name, dims, qtype, offset in infos:
            n = int(np.prod(dims))
            block, type_size = GGML_QUANT_SIZES[qtype]
            self.tensors.append(TensorDesc(name, dims, qtype, start + offset, n, n // block * type_size, mm))
        self.end = max((t.data_offset + t.n_bytes for t in self.tensors), default=start)

    def _take(self, n: int) -> bytes:
        b = self._buf[self._pos:self._pos + n]
        if len(b) != n:
            raise ValueError("unexpected end of file inside the GGUF header")
        self._pos += n
        return b

    def _unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self._take(size))

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        return self._take(n).decode("utf-8")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self._unpack(_SCALAR[vtype])[0]
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype}")
        etype, count = self._unpack("<IQ")
        if etype in _NP:
            width = np.dtype(_NP[etype]).itemsize
            return np.frombuffer(self._take(width * count), dtype=_NP[etype]).tolist()
        if etype == _STRING:
            if count <= KEEP_STRINGS:
                return [self._string() for _ in range(count)]
            buf, pos, unpack = self._buf, self._pos, struct.unpack_from
            for _ in range(count):
                (n,) = unpack("<Q", buf, pos)
                pos += 8 + n
            if pos > len(buf):
                raise ValueError("unexpected end of file inside the GGUF header")
            self._pos = pos
            return SkippedArray(count)
        return [self._value(etype) for _ in range(count)]
