"""CPU kernels: PyTorch's packed int4 (tinygemm) and int8 matmuls, used where they beat dequantize + matmul.

A kernel re-lays the canonical `qweight` once (`pack`), can rebuild it exactly (`unpack`) so the layer may drop
the canonical copy, and multiplies (`mm`). Activation-dtype scales are built lazily and cached in the state."""
from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from ..packing import unpack_nibbles

log = logging.getLogger(__name__)

State = dict[str, Tensor]
# Only bf16: the x86 packed kernels vectorize bf16 alone; fp16/fp32 fall to scalar loops (10-30x slower than
# dequant_matmul, measured), so those activations take the float32 dequant path.
_KERNEL_DTYPES = (torch.bfloat16,)
# Crossovers against dequant_matmul, measured on 2 AVX2 cores (tinygemm cost grows with M in blocks of 4, the
# dequantize cost does not): int4 1536x576 bf16 M=16 kernel 398 us vs 655, M=64 1552 vs 1040.
INT4_MAX_M = 32
# int8 per-channel (group == K): one call; wins up to M=16 (1536x576: 538 us vs 657 at M=16, 2366 vs 1043 at 64).
INT8_CHANNEL_MAX_M = 16
# Grouped int8 = one call per group over an [N, g] slice: ~15 us of fixed cost per call, so it pays only when
# N * g is large (49152x576 g32, M=1: 4-6 ms vs 10-15 ms dequantizing; 1536x576: 543 us vs 366) and M small.
INT8_GROUPED_MIN_ROWS_X_GROUP = 1 << 17  # N * group_size; g32 -> N >= 4096
INT8_GROUPED_MAX_M = 8


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


HAS_INT4 = _has_op("_weight_int4pack_mm_for_cpu") and _has_op("_convert_weight_to_int4pack_for_cpu")
HAS_INT8 = _has_op("_weight_int8pack_mm")

# ------------------------------------------------------------------------------------------------ int4 layout
# _convert_weight_to_int4pack_for_cpu (aten/src/ATen/native/cpu/int4mm_kernel.cpp) cuts N into blocks of
# BLOCK_N rows (64 with AVX512, 32 with AVX2 / no vectors), each stored [K, nb/2] bytes. Full blocks on
# AVX2/AVX512 put row d in the low nibble and row d + BLOCK_N/2 in the high nibble ("split"); the tail block
# (and every block without vectors) pairs rows 2i, 2i+1 ("interleaved"). BLOCK_N follows the CPU capability
# chosen at run time, so the layout is detected once by a probe instead of assumed.

_PROBE_N, _PROBE_K = 208, 64  # 208 = 3*64 + 16 = 6*32 + 16: full blocks and a tail for every candidate


def _unpack_layout(packed: Tensor, n: int, k: int, block_n: int, split: bool) -> Tensor:
    """Kernel-packed uint8 -> uint8 [n, k] nibble codes under a given (block_n, split) layout."""
    flat = packed.reshape(-1)
    full = n // block_n
    parts = []
    if full:
        b = flat[: full * block_n * k // 2].view(full, k, block_n // 2)
        lo, hi = b & 0x0F, b >> 4
        rows = torch.cat((lo, hi), -1) if split else torch.stack((lo, hi), -1).view(full, k, block_n)
        parts.append(rows.transpose(1, 2).reshape(full * block_n, k))
    tail = n - full * block_n
    if tail:
        b = flat[full * block_n * k // 2:].view(k, tail // 2)
        parts.append(torch.stack((b & 0x0F, b >> 4), -1).view(k, tail).t())
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


@functools.cache
def int4pack_layout() -> tuple[int, bool] | None:
    """(BLOCK_N, split) of this process's int4 packing, found by packing a probe; None if no candidate fits."""
    if not HAS_INT4:
        return None
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (_PROBE_N, _PROBE_K), generator=gen, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    for block_n in (32, 64, 16, 128):
        for split in (True, False):
            if torch.equal(_unpack_layout(packed, _PROBE_N, _PROBE_K, block_n, split), codes.to(torch.uint8)):
                log.debug("int4pack layout: BLOCK_N=%d split=%s", block_n, split)
                return block_n, split
    log.warning("unknown int4pack CPU layout; int4 layers keep their canonical weight next to the packed one")
    return None


def int4_pack(qweight: Tensor, chunk_rows: int = 4096) -> Tensor:
    """Canonical uint8 [N, K/2] -> the kernel's packed uint8, in row chunks (bounds the int32 temporary)."""
    n = qweight.shape[0]
    layout = int4pack_layout()
    step = n if layout is None else max(layout[0], chunk_rows // layout[0] * layout[0])
    out = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(qweight[r:r + step]).to(torch.int32), 2)
           for r in range(0, n, step)]
    return out[0] if len(out) == 1 else torch.cat([o.reshape(-1) for o in out]).reshape(n, -1)


def int4_unpack(packed: Tensor, n: int, k: int) -> Tensor:
    """The kernel's packed uint8 -> canonical uint8 [N, K/2], bit-exact. Straight from byte pairs: with e, o the
    bytes of input columns 2j, 2j+1, a row in the low nibbles gets (e & 15) | (o << 4), one in the high nibbles
    (e >> 4) | (o & 0xF0), written into the transposed canonical rows (no code-level intermediate)."""
    layout = int4pack_layout()
    assert layout is not None, "int4pack layout unknown: cannot rebuild the canonical weight"
    block_n, split = layout
    flat = packed.reshape(-1)
    out = torch.empty(n, k // 2, dtype=torch.uint8, device=packed.device)
    full = n // block_n
    pieces = []  # (bytes [B, K/2, 2, W], canonical rows as [B, 2, W, K/2] or [B, W, 2, K/2], split?)
    if full:
        b = flat[: full * block_n * k // 2].view(full, k // 2, 2, block_n // 2)
        rows = out[: full * block_n].view(full, 2, block_n // 2, k // 2) if split else \
            out[: full * block_n].view(full, block_n // 2, 2, k // 2)
        pieces.append((b, rows, split))
    tail = n - full * block_n
    if tail:
        b = flat[full * block_n * k // 2:].view(1, k // 2, 2, tail // 2)
        pieces.append((b, out[full * block_n:].view(1, tail // 2, 2, k // 2), False))
    for b, rows, is_split in pieces:
        e, o = b[:, :, 0], b[:, :, 1]  # [B, K/2, W]
        lo_rows, hi_rows = (rows[:, 0], rows[:, 1]) if is_split else (rows[:, :, 0], rows[:, :, 1])
        torch.bitwise_or(e & 0x0F, o << 4, out=lo_rows.transpose(1, 2))
        torch.bitwise_or(e >> 4, o & 0xF0, out=hi_rows.transpose(1, 2))
    return out


class Int4Pack:
    """sym_int4 / asym_int4 through _weight_int4pack_mm_for_cpu: w = (nibble - 8) * scale + zero."""

    name = "int4pack"

    @staticmethod
    def applies(low_bit: str, n: int, k: int, group_size: int, dtype: torch.dtype, m: int) -> bool:
        return (HAS_INT4 and low_bit in ("sym_int4", "asym_int4") and dtype in _KERNEL_DTYPES and m <= INT4_MAX_M
                and n % 16 == 0 and k % group_size == 0 and group_size in (32, 64, 128, 256))

    @staticmethod
    def droppable() -> bool:
        return int4pack_layout() is not None

    @staticmethod
    def pack(q: State, n: int, k: int, group_size: int) -> State:
        return {"packed": int4_pack(q["qweight"])}

    @staticmethod
    def unpack(state: State, n: int, k: int, group_size: int) -> Tensor:
        return int4_unpack(state["packed"], n, k)

    @staticmethod
    def mm(x2d: Tensor, state: State, q: State, group_size: int) -> Tensor:
        sz = _per_dtype(state, "sz", x2d.dtype, lambda: int4_scales_and_zeros(q["scales"], q.get("mins"), x2d.dtype))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.contiguous(), state["packed"], group_size, sz)


def _per_dtype(state: State, prefix: str, dtype: torch.dtype, make) -> Tensor:
    """Scales converted for one activation dtype, cached in the kernel state (one dtype at a time)."""
    key = f"{prefix}.{dtype}"
    if key not in state:
        for other in [k for k in state if k.startswith(prefix + ".")]:
            del state[other]
        state[key] = make()
    return state[key]


def int4_scales_and_zeros(scales: Tensor, mins: Tensor | None, dtype: torch.dtype) -> Tensor:
    """[G, N, 2] (scale, zero) in `dtype`: zero = 0 for sym_int4, min + 8 * scale for asym_int4."""
    s = scales.t().to(torch.float32)
    z = torch.zeros_like(s) if mins is None else mins.t().to(torch.float32) + 8 * s
    return torch.stack((s, z), -1).to(dtype).contiguous()


# ------------------------------------------------------------------------------------------------ int8

class Int8Pack:
    """sym_int8 through _weight_int8pack_mm (per-output-channel scales): one call when group_size == K,
    else one call per group on a group-major copy [K/g, N, g] of the codes (an exact re-layout)."""

    name = "int8pack"

    @staticmethod
    def applies(low_bit: str, n: int, k: int, group_size: int, dtype: torch.dtype, m: int) -> bool:
        if not (HAS_INT8 and low_bit == "sym_int8" and dtype in _KERNEL_DTYPES and k % group_size == 0):
            return False
        if group_size == k:
            return m <= INT8_CHANNEL_MAX_M
        return m <= INT8_GROUPED_MAX_M and n * group_size >= INT8_GROUPED_MIN_ROWS_X_GROUP

    @staticmethod
    def droppable() -> bool:
        return True

    @staticmethod
    def pack(q: State, n: int, k: int, group_size: int) -> State:
        qw = q["qweight"]
        if group_size == k:
            return {"packed": qw.contiguous()}
        return {"packed": qw.view(n, k // group_size, group_size).transpose(0, 1).contiguous()}

    @staticmethod
    def unpack(state: State, n: int, k: int, group_size: int) -> Tensor:
        p = state["packed"]
        return p if p.dim() == 2 else p.transpose(0, 1).reshape(n, k)

    @staticmethod
    def mm(x2d: Tensor, state: State, q: State, group_size: int) -> Tensor:
        s = _per_dtype(state, "s", x2d.dtype, lambda: q["scales"].t().to(x2d.dtype).contiguous())  # [G, N]
        p = state["packed"]
        x2d = x2d.contiguous()
        if p.dim() == 2:
            return torch.ops.aten._weight_int8pack_mm(x2d, p, s[0])
        g = p.shape[0]
        xg = x2d.view(x2d.shape[0], g, group_size).transpose(0, 1).contiguous()  # [G, M, g]
        acc = torch.ops.aten._weight_int8pack_mm(xg[0], p[0], s[0]).float()
        for i in range(1, g):
            acc += torch.ops.aten._weight_int8pack_mm(xg[i], p[i], s[i])
        return acc.to(x2d.dtype)


# ------------------------------------------------------------------------------------------------ float32

def dequant_matmul(x2d: Tensor, fmt, q: State, group_size: int, chunk_elems: int = 1 << 20) -> Tensor:
    """x2d @ W.T in float32 whatever x's dtype (CPUs have no fast bf16/fp16 GEMM without AMX/AVX512-BF16),
    W dequantized a block of rows at a time so that each block is still in cache when the GEMM reads it.
    int4 formats dequantize even and odd columns apart and split x instead (no interleaving of W)."""
    xf = x2d.to(torch.float32)
    n, k = q["scales"].shape[0], x2d.shape[1]
    halves = getattr(fmt, "dequantize_halves", None)
    if halves is not None:
        x_even, x_odd = xf[:, 0::2].t(), xf[:, 1::2].t()
    rows = max(64, chunk_elems // k)
    out = torch.empty(n, x2d.shape[0], dtype=torch.float32, device=x2d.device)  # [N, M]: row blocks contiguous
    for r in range(0, n, rows):
        block = q if rows >= n else {name: t[r:r + rows] for name, t in q.items()}
        if halves is None:
            torch.mm(fmt.dequantize(block, group_size, torch.float32), xf.t(), out=out[r:r + rows])
        else:
            w_even, w_odd = halves(block, group_size, torch.float32)
            torch.mm(w_even, x_even, out=out[r:r + rows]).addmm_(w_odd, x_odd)
    return out.t().to(x2d.dtype).contiguous()


KERNELS = (Int4Pack, Int8Pack)


def select(low_bit: str, n: int, k: int, group_size: int, dtype: torch.dtype, m: int = 1):
    """The packed CPU kernel for this layer and activation [m, k] dtype, or None (then dequant_matmul)."""
    for kern in KERNELS:
        if kern.applies(low_bit, n, k, group_size, dtype, m):
            return kern
    return None
