"""Generic nibble packing for the 4-bit formats: two 4-bit codes per byte along the last dimension,
element 2j in the low nibble of byte j and 2j+1 in the high nibble (the canonical storage)."""
from __future__ import annotations

import torch
from torch import Tensor


def pack_nibbles(codes: Tensor) -> Tensor:
    """[..., K] integer codes in [0, 15] -> uint8 [..., K/2] (even element low, odd element high)."""
    assert codes.shape[-1] % 2 == 0, f"last dimension must be even to pack nibbles, got {codes.shape[-1]}"
    assert not codes.is_floating_point(), f"nibble codes must be integers, got {codes.dtype}"
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """uint8 [..., K/2] -> uint8 [..., K] codes in [0, 15]; the exact inverse of pack_nibbles."""
    assert packed.dtype == torch.uint8, f"packed nibbles must be uint8, got {packed.dtype}"
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def unpack_nibbles_grouped(packed: Tensor, group_size: int) -> Tensor:
    """uint8 [N, K/2] -> uint8 [N, K/g, g] codes, ready to broadcast against per-group [N, K/g, 1] scales."""
    n, half = packed.shape
    return unpack_nibbles(packed).view(n, 2 * half // group_size, group_size)


def pack_int4_signed(q: Tensor) -> Tensor:
    """Signed [..., K] values in [-8, 7] -> uint8 [..., K/2] with nibble = q + 8 (sym_int4 storage)."""
    return pack_nibbles((q.to(torch.int16) + 8).to(torch.uint8))
