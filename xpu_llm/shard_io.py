"""What one rank of a tensor/pipeline-parallel run reads from a checkpoint (`Shard`: its layers, embedding, head
and the slice of each tensor) and the readers that fetch only those bytes: row blocks, or column blocks of
safetensors matrices and of low-bit payloads cut on quantization-group boundaries."""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import CorruptCheckpointError

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Slice:
    """Part of a checkpoint tensor: rows (dim 0: output features, vocabulary) or columns (dim 1: input
    features) [start, stop)."""
    dim: int
    start: int
    stop: int


@dataclass
class Shard:
    """The part of a checkpoint one rank holds: a contiguous block of layers, the embedding (first pipeline
    stage), the lm_head (last stage; the final norm is on every stage, it is tiny), and the slice of each tensor
    (`slice_of(hf_name)`, None for the whole tensor). Tensors outside it are never read."""
    layers: range
    embed: bool = True
    head: bool = True
    slice_of: Callable[[str], Slice | None] | None = None

    def wants(self, hf_name: str, tied: bool) -> bool:
        """Whether this rank reads the tensor at all (`tied`: the lm_head is the embedding)."""
        if hf_name == "model.embed_tokens.weight":
            return self.embed or (self.head and tied)
        if hf_name == "lm_head.weight":
            return self.head and not tied
        m = _LAYER.match(hf_name)
        return m is None or int(m.group(1)) in self.layers

    def slice(self, hf_name: str) -> Slice | None:
        return None if self.slice_of is None else self.slice_of(hf_name)


def slice_columns(q: dict[str, Tensor], in_features: int, start: int, stop: int) -> dict[str, Tensor]:
    """Columns [start, stop) of a low-bit payload (each tensor's width is proportional to in_features: packed
    codes, per-group scales); the cut must fall on group boundaries, so the groups are the very same ones."""
    out = {}
    for name, t in q.items():
        width = t.shape[1]
        a, b = start * width, stop * width
        assert a % in_features == 0 and b % in_features == 0, (
            f"columns [{start}, {stop}) of a {in_features}-wide low-bit weight do not fall on block boundaries")
        out[name] = t[:, a // in_features:b // in_features].contiguous()
    return out


def slice_rows(q: dict[str, Tensor], ranges: list[tuple[int, int]]) -> dict[str, Tensor]:
    """The rows in `ranges` of a payload (rows are independent in every format), concatenated."""
    return {k: torch.cat([t[a:b] for a, b in ranges]) for k, t in q.items()}


def read_columns(entry: Any, start: int, stop: int, chunk_bytes: int = 1 << 24) -> Tensor:
    """Columns [start, stop) of a 2-D safetensors tensor (a safetensors_io.TensorEntry), read a block of rows at a
    time: a tensor-parallel rank never holds the whole matrix, only its columns and one ~16 MiB block."""
    n, k = entry.shape[0], math.prod(entry.shape[1:])
    size = entry.dtype.itemsize
    row_bytes = k * size
    out = torch.empty((n, stop - start), dtype=entry.dtype)
    out_bytes = out.view(torch.uint8).view(n, (stop - start) * size)
    step = max(1, chunk_bytes // max(row_bytes, 1))
    with open(entry.file, "rb") as f:
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            buf = bytearray((r1 - r0) * row_bytes)
            f.seek(entry.start + r0 * row_bytes)
            if f.readinto(buf) != len(buf):
                raise CorruptCheckpointError(f"{entry.file} is truncated; re-download or re-convert it")
            block = torch.frombuffer(buf, dtype=torch.uint8).view(r1 - r0, row_bytes)
            out_bytes[r0:r1] = block[:, start * size:stop * size]
    return out
