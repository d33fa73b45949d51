"""Generic nibble packing for the 4-bit formats: two 4-bit codes per byte along the last dimension,
element 2j in the low nibble of byte j and 2j+1 in the high nibble (the canonical storage)."""
from __future__ import annotations

import functools
import sys

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


def pack_int4_signed(q: Tensor) -> Tensor:
    """Signed [..., K] values in [-8, 7] -> uint8 [..., K/2] with nibble = q + 8 (sym_int4 storage)."""
    return pack_nibbles((q.to(torch.int16) + 8).to(torch.uint8))


def nibbles_to_float(packed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 [..., K/2] -> `dtype` [..., K] nibble values 0..15, written straight into place (no interleave copy)."""
    out = torch.empty(*packed.shape, 2, dtype=dtype, device=packed.device)
    out[..., 0] = packed & 0x0F
    out[..., 1] = packed >> 4
    return out.flatten(-2)


@functools.lru_cache(maxsize=64)
def _table(values: tuple[float, ...], bits: int, per: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[2**(bits*per), per] table: row i holds the `per` codes packed in i, least significant first."""
    idx = torch.arange(1 << (bits * per), device=device)
    base = torch.tensor(values, dtype=torch.float64, device=device)
    mask = (1 << bits) - 1
    return torch.stack([base[(idx >> (bits * j)) & mask] for j in range(per)], -1).to(dtype).contiguous()


def _lookup(data: Tensor, values: tuple[float, ...], bits: int, dtype: torch.dtype) -> Tensor:
    """Codes packed in the bytes of `data` [..., B] -> `dtype` [..., B * 8 / bits] values. Two bytes per lookup
    (4 nibbles or 2 bytes: a gather is the cost, so fewer and wider ones win) when B is even."""
    data = data.contiguous()
    lead, nbytes = data.shape[:-1], data.shape[-1]
    per_byte = 8 // bits
    if nbytes % 2 == 0 and sys.byteorder == "little":
        idx = data.view(torch.int16).reshape(-1).to(torch.int32) & 0xFFFF
        table = _table(values, bits, 2 * per_byte, dtype, data.device)
    else:
        idx = data.reshape(-1).to(torch.int32)
        table = _table(values, bits, per_byte, dtype, data.device)
    return table.index_select(0, idx).view(*lead, nbytes * per_byte)


def lookup_nibbles(packed: Tensor, code: tuple[float, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 [..., K/2] nibble indices -> `dtype` [..., K] of code[index] (nf4 / fp4 codebooks)."""
    assert packed.dtype == torch.uint8 and len(code) == 16, "expects uint8 nibbles and a 16-entry codebook"
    return _lookup(packed, tuple(code), 4, dtype)


def lookup_bytes(data: Tensor, code: tuple[float, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """1-byte codes [..., K] (any 1-byte dtype, e.g. fp8) -> `dtype` [..., K] of code[byte] (256-entry code)."""
    assert data.element_size() == 1 and len(code) == 256, "expects 1-byte codes and a 256-entry table"
    return _lookup(data.view(torch.uint8), tuple(code), 8, dtype)
