"""Codes for a weight that already lies on a sym_int4 / asym_int4 grid (a dequantized GGUF Q4_0 / Q4_1 tensor), found
from its float values and checked bit for bit. The registry's quantize need not give such a weight back: sym_int4
scales by absmax / 7 where Q4_0 scales by absmax / 8 (its extreme code is -8), and rounding may move a scale by an
ulp. Here each group tries the scales its values could have come from and keeps the first that reproduces them."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .formats import _div, _safe, get_format
from .packing import pack_nibbles

EXACT_FORMATS = ("sym_int4", "asym_int4")

Candidate = tuple[Tensor, Tensor | None]  # per-group fp16 scale [N, G, 1] and fp16 min (asym) or None (sym)


def exact_quantize(low_bit: str, weight: Tensor, group_size: int, chunk: int = 4096) -> dict[str, Tensor] | None:
    """The `low_bit` tensors that dequantize (in float32) to `weight` bit for bit, or None when some group lies
    on none of the grid points tried (e.g. a bf16 copy of the weight, or a file quantized some other way)."""
    fmt = get_format(low_bit)
    if fmt.name not in EXACT_FORMATS:
        raise ValueError(f"exact_quantize handles {', '.join(EXACT_FORMATS)}, not {low_bit}")
    w = weight.detach().float()
    if w.dim() != 2 or w.shape[1] % group_size:
        return None
    parts = []
    for r in range(0, w.shape[0], chunk):  # rows are independent; chunks bound the temporaries
        q = _exact_rows(fmt.name, w[r:r + chunk], group_size)
        if q is None:
            return None
        parts.append(q)
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    back = fmt.dequantize(out, group_size, torch.float32)
    return out if torch.equal(back.view(torch.int32), w.view(torch.int32)) else None


def _exact_rows(name: str, w: Tensor, group_size: int) -> dict[str, Tensor] | None:
    """exact_quantize for a block of rows: per group, the first candidate whose codes reproduce every value."""
    n, k = w.shape
    x = w.reshape(n, k // group_size, group_size)
    bits = x.view(torch.int32)
    found = torch.zeros(n, k // group_size, 1, dtype=torch.bool, device=w.device)
    codes = torch.zeros_like(x)
    scales = torch.zeros(n, k // group_size, 1, dtype=torch.float16, device=w.device)
    mins = torch.zeros_like(scales)
    for s16, m16 in (_sym_candidates(x) if name == "sym_int4" else _asym_candidates(x)):
        q, back = _codes(x, s16, m16)
        ok = (back.view(torch.int32) == bits).all(-1, keepdim=True) & ~found
        codes = torch.where(ok, q, codes)
        scales = torch.where(ok, s16, scales)
        if m16 is not None:
            mins = torch.where(ok, m16, mins)
        found |= ok
        if bool(found.all()):
            out = {"qweight": pack_nibbles(codes.to(torch.uint8).view(n, k)), "scales": scales.view(n, -1)}
            if name == "asym_int4":
                out["mins"] = mins.view(n, -1)
            return out
    return None


def _sym_candidates(x: Tensor) -> Iterator[Candidate]:
    """w = (q - 8) * s: the value of largest magnitude is c * |s| for some c in 1..8, so s = ±a / c with a that
    value (exact division). -a / 8 first: Q4_0 (llama.cpp, gguf-py) gives that value code 0, i.e. -8."""
    a = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    for c in range(8, 0, -1):
        for t in (-a, a):
            yield _div(t, c).to(torch.float16), None


def _asym_candidates(x: Tensor) -> Iterator[Candidate]:
    """w = q * s + m with the smallest value at code 0 (m = min, as Q4_1 sets it) and the largest at some code c:
    s = (max - min) / c, rounded to fp16. c = 15 (Q4_1's top code) first."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    m16 = lo.to(torch.float16)
    for c in range(15, 0, -1):
        yield _div(hi - lo, c).to(torch.float16), m16


def _codes(x: Tensor, s16: Tensor, m16: Tensor | None) -> tuple[Tensor, Tensor]:
    """Nearest codes (as float) of x for one candidate, and the values they dequantize to, computed as
    _Int4.dequantize computes them in float32 ((q - 8) * s, or q * s + m)."""
    s = s16.float()
    if m16 is None:
        q = torch.round(x / _safe(s)).clamp_(-8, 7).add_(8)
        return q, (q - 8) * s
    m = m16.float()
    q = torch.round((x - m) / _safe(s)).clamp_(0, 15)
    return q, q * s + m
