"""A low-bit linear whose packed tensors live in one frozen `nn.Parameter` (bitsandbytes' `quant_storage`).

DeepSpeed ZeRO-3 partitions and gathers parameters only, never buffers: with `LowBitLinear`'s buffers every
rank would hold the whole 4-bit base. Here the canonical tensors of the format (qweight, scales, mins) are laid
end to end as bytes in a parameter of `storage_dtype` (uint8 by default, which no mixed-precision cast
touches; bf16 where a sharding wrapper needs one dtype for all parameters), so ZeRO-3 shards it like any
frozen weight, and checkpoints that skip frozen parameters skip it. The matmul dequantizes per call."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lowbit.formats import get_format
from ..lowbit.kernels import lowbit_dequantize
from ..lowbit.linear import LowBitLinear, frozen_forward


def _dequant_matmul(x2d: Tensor, layer: "PackedLowBitLinear") -> Tensor:
    """x2d @ W.T with W dequantized for the call and dropped."""
    return F.linear(x2d, layer.dequantize_weight(x2d.dtype))


class PackedLowBitLinear(nn.Module):
    """y = x @ W.T + bias, W in a low-bit format stored as bytes in the frozen parameter `packed`."""

    def __init__(self, in_features: int, out_features: int, low_bit: str, group_size: int, bias: bool,
                 storage_dtype: torch.dtype = torch.uint8, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.fmt = get_format(low_bit)
        self.low_bit, self.storage_dtype = self.fmt.name, storage_dtype
        self._layout: list[tuple[str, tuple[int, ...], torch.dtype, int, int]] = []
        offset = 0
        for name, (shape, dt) in self.fmt.shapes(out_features, in_features, group_size).items():
            nbytes = math.prod(shape) * dt.itemsize
            self._layout.append((name, shape, dt, offset, nbytes))
            offset += nbytes
        self._nbytes = offset
        padded = -(-offset // storage_dtype.itemsize)  # whole storage elements
        self.packed = nn.Parameter(torch.zeros(padded, dtype=storage_dtype, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.kernel_dtype = None
        self.recompute_owner: Callable[[], nn.Module | None] | None = None  # see lowbit.linear.keeps_weight

    @classmethod
    def from_lowbit(cls, layer: LowBitLinear, storage_dtype: torch.dtype = torch.uint8) -> "PackedLowBitLinear":
        """Copy a LowBitLinear's canonical tensors into packed storage (bit-exact)."""
        bias = layer.bias
        tensors = layer.tensors()
        device = next(iter(tensors.values())).device
        new = cls(layer.in_features, layer.out_features, layer.low_bit, layer.group_size, bias is not None,
                  storage_dtype, device=device, dtype=bias.dtype if bias is not None else torch.float32)
        raw = new.packed.data.view(torch.uint8)
        for name, shape, dt, off, nbytes in new._layout:
            t = tensors[name]
            assert tuple(t.shape) == shape and t.dtype == dt, f"{name}: {tuple(t.shape)} {t.dtype} != {shape} {dt}"
            raw[off:off + nbytes].copy_(t.contiguous().view(-1).view(torch.uint8))
        if bias is not None:
            new.bias.data.copy_(bias.detach())
        return new

    def tensors(self) -> dict[str, Tensor]:
        """The canonical tensors (views into `packed`)."""
        raw = self.packed.data.view(torch.uint8)
        assert raw.numel() >= self._nbytes, (
            "packed storage is not materialised (a ZeRO-3 partition outside forward); gather it first")
        return {name: raw[off:off + nbytes].view(dt).view(shape) for name, shape, dt, off, nbytes in self._layout}

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return lowbit_dequantize(self, dtype)

    def to_lowbit(self) -> LowBitLinear:
        """Back to a LowBitLinear (copies the tensors out of the shared storage)."""
        q = {k: v.clone() for k, v in self.tensors().items()}
        bias = None if self.bias is None else self.bias.detach().clone()
        return LowBitLinear.from_quantized(q, self.in_features, self.out_features, self.low_bit, self.group_size,
                                           bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return frozen_forward(self, x, _dequant_matmul)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "recompute_owner": None}  # a weak reference (see keeps_weight): not copied

    def _apply(self, fn, recurse=True):
        # Device moves apply to the storage, dtype casts never do (the bytes are a format, not numbers).
        packed = self.packed

        def guarded(t: Tensor) -> Tensor:
            out = fn(t)
            if t is packed and out.dtype != t.dtype:
                out = t.to(out.device)
            return out

        return super()._apply(guarded, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"low_bit={self.low_bit}, group_size={self.group_size}, storage={self.storage_dtype}")


def pack_low_bit_layers(model: nn.Module, storage_dtype: torch.dtype = torch.uint8) -> int:
    """Swap every LowBitLinear under `model` for a PackedLowBitLinear (before DeepSpeed sees the model);
    returns how many were swapped."""
    n = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is LowBitLinear:
            parent, _, child = name.rpartition(".")
            new = PackedLowBitLinear.from_lowbit(mod, storage_dtype)
            new.kernel_dtype, new.recompute_owner = mod.kernel_dtype, mod.recompute_owner
            setattr(model.get_submodule(parent) if parent else model, child, new)
            n += 1
    return n
