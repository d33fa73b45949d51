"""Embedding lookup straight from low-bit rows: gathers the packed rows of the ids and dequantizes only
those, so a quantized (often tied) embedding never needs a float copy."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .formats import get_format


class LowBitEmbedding(nn.Module):
    """Rows of a low-bit [vocab, dim] matrix: its own buffers, or (tied) the output LowBitLinear's."""

    def __init__(self, low_bit: str, group_size: int, dtype: torch.dtype,
                 tensors: dict[str, Tensor] | None = None, tied_to: nn.Module | None = None) -> None:
        super().__init__()
        assert (tensors is None) != (tied_to is None), "give either tensors or tied_to"
        self.low_bit, self.group_size, self.dtype = low_bit, group_size, dtype
        self.fmt = get_format(low_bit)
        # A list, so the head is not registered twice in the module tree (its state dict owns the tensors).
        self._tied = [tied_to] if tied_to is not None else []
        if tied_to is not None:
            tied_to.keep_canonical = True  # the kernel must not drop the row-major packed weight
        for k, t in (tensors or {}).items():
            self.register_buffer(k, t)

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    def forward(self, ids: Tensor) -> Tensor:
        src = self._tied[0] if self._tied else self
        flat = ids.reshape(-1)
        rows = {k: getattr(src, k).index_select(0, flat) for k in self.fmt.tensor_names}
        return self.fmt.dequantize(rows, self.group_size, self.dtype).view(*ids.shape, -1)

    def extra_repr(self) -> str:
        return f"low_bit={self.low_bit}, group_size={self.group_size}, tied={self.tied}"
