"""Stream tensors out of (sharded) safetensors files one at a time with plain reads, so that loading a
model never holds the float checkpoint in memory, and a truncated file is caught before use."""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import CorruptCheckpointError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: str) -> dict[str, TensorEntry]:
    """Tensor entries of one safetensors file, checked against the file's size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{path} is not a safetensors file (too short); re-download or re-convert it")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise CorruptCheckpointError(f"{path} has a corrupt safetensors header; re-download or re-convert it")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CorruptCheckpointError(f"{path} has an unreadable safetensors header ({e}); re-download it") from e
    base = 8 + n
    out: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise CorruptCheckpointError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        if base + end > size:
            raise CorruptCheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {base + end} but the file has {size} bytes; "
                "re-download or re-convert the checkpoint")
        out[name] = TensorEntry(path, dtype, tuple(meta["shape"]), base + start, base + end)
    return out


def checkpoint_index(folder: str) -> dict[str, TensorEntry]:
    """All tensors of a folder's safetensors files (single file or sharded with an index)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    entries: dict[str, TensorEntry] = {}
    for f in files:
        entries.update(read_header(os.path.join(folder, f)))
    return entries


def read_tensor(entry: TensorEntry, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read one tensor (or rows [start, stop) of its first dimension) into fresh CPU memory."""
    shape = list(entry.shape)
    start, end = entry.start, entry.end
    if rows is not None:
        row_bytes = (end - start) // max(shape[0], 1)
        start, end = start + rows[0] * row_bytes, start + rows[1] * row_bytes
        shape[0] = rows[1] - rows[0]
    buf = bytearray(end - start)
    with open(entry.file, "rb") as f:
        f.seek(start)
        if f.readinto(buf) != len(buf):
            raise CorruptCheckpointError(f"{entry.file} is truncated; re-download or re-convert it")
    if not buf:
        return torch.empty(shape, dtype=entry.dtype)
    return torch.frombuffer(buf, dtype=entry.dtype).view(shape)


def iter_tensors(entries: dict[str, TensorEntry]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in file order, one at a time."""
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].file, kv[1].start)):
        yield name, read_tensor(e)
