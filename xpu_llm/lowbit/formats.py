"""The registry of weight formats: name -> storage layout, quantize and the reference dequantize in plain torch.

Every tensor is row-major with rows = output features N, so any row subset dequantizes on its own (quantized
embeddings, tensor-parallel slices). A group is `group_size` consecutive input elements of one row."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..device import is_cpu
from ..errors import UnknownFormatError
from .packing import lookup_bytes, lookup_nibbles, nibbles_to_float, pack_nibbles

GROUP_SIZES = (32, 64, 128)

Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]

_FP16_MAX = torch.finfo(torch.float16).max

# The 16 NF4 levels of QLoRA / bitsandbytes (quantiles of N(0, 1) scaled to [-1, 1], with an exact 0).
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
# E2M1 magnitudes; bit 3 of the nibble is the sign.
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_CODE = FP4_MAGNITUDES + tuple(-v for v in FP4_MAGNITUDES)


def _groups(weight: Tensor, group_size: int) -> Tensor:
    """[N, K] float -> float32 [N, K/g, g], checking the shape on the way."""
    assert weight.dim() == 2, f"expected a 2-D [out_features, in_features] weight, got shape {tuple(weight.shape)}"
    assert weight.is_floating_point(), f"expected a float weight, got {weight.dtype}"
    n, k = weight.shape
    assert group_size > 0 and k % group_size == 0, f"in_features {k} is not a multiple of group_size {group_size}"
    return weight.detach().to(torch.float32).reshape(n, k // group_size, group_size)


def _div(t: Tensor, c: float) -> Tensor:
    """t / c correctly rounded on every device (GPUs turn a division by a Python scalar into a multiplication by
    its inexact reciprocal, so float32 scales would differ by an ulp from the CPU's)."""
    return t / torch.full_like(t, c)


def _to_scale16(s: Tensor) -> Tensor:
    """float32 scale -> float16 (clamped to the fp16 range so that it never becomes inf)."""
    return s.clamp(max=_FP16_MAX).to(torch.float16)


def _safe(s: Tensor) -> Tensor:
    """Divisor for x / s: a zero scale (all-zero group) divides by 1, so the codes come out 0, never NaN."""
    return torch.where(s == 0, torch.ones_like(s), s)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class LowBitFormat:
    """One storage format: its buffers (`tensor_names`), quantize, reference dequantize and sizes."""

    name: str
    bits: int
    dense: bool
    tensor_names: tuple[str, ...]

    def quantize(self, weight: Tensor, group_size: int) -> dict[str, Tensor]:
        """[N, K] float weight -> the format's tensors (computed in float32)."""
        raise NotImplementedError

    def dequantize(self, q: dict[str, Tensor], group_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """The format's tensors (or any row subset of them) -> [N, K] weight in `dtype`."""
        raise NotImplementedError

    def shapes(self, out_features: int, in_features: int, group_size: int) -> Shapes:
        """Shape and dtype of each buffer, to allocate on the meta device."""
        raise NotImplementedError

    def nbytes(self, out_features: int, in_features: int, group_size: int) -> int:
        """Storage bytes of one [out_features, in_features] weight, for memory plans."""
        return sum(math.prod(shape) * dtype.itemsize
                   for shape, dtype in self.shapes(out_features, in_features, group_size).values())

    def _check(self, in_features: int, group_size: int) -> None:
        assert group_size > 0 and in_features % group_size == 0, \
            f"{self.name}: in_features {in_features} is not a multiple of group_size {group_size}"


@dataclass(frozen=True)
class _Int4(LowBitFormat):
    """sym_int4 (w = (nibble - 8) * scale) and asym_int4 (w = nibble * scale + min)."""

    def shapes(self, out_features: int, in_features: int, group_size: int) -> Shapes:
        self._check(in_features, group_size)
        assert group_size % 2 == 0, f"{self.name}: group_size must be even, got {group_size}"
        g = in_features // group_size
        out: Shapes = {"qweight": ((out_features, in_features // 2), torch.uint8),
                       "scales": ((out_features, g), torch.float16)}
        if "mins" in self.tensor_names:
            out["mins"] = ((out_features, g), torch.float16)
        return out

    def quantize(self, weight: Tensor, group_size: int) -> dict[str, Tensor]:
        x = _groups(weight, group_size)
        n, k = weight.shape
        if "mins" not in self.tensor_names:
            s16 = _to_scale16(_div(x.abs().amax(-1, keepdim=True), 7))
            q = torch.round(x / _safe(s16.float())).clamp_(-8, 7).add_(8)
            return {"qweight": pack_nibbles(q.to(torch.uint8).view(n, k)), "scales": s16.squeeze(-1)}
        mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        s16 = _to_scale16(_div(mx - mn, 15))
        m16 = mn.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
        q = torch.round((x - m16.float()) / _safe(s16.float())).clamp_(0, 15)
        return {"qweight": pack_nibbles(q.to(torch.uint8).view(n, k)), "scales": s16.squeeze(-1),
                "mins": m16.squeeze(-1)}

    def dequantize(self, q: dict[str, Tensor], group_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
        ct = _compute_dtype(dtype)
        n = q["qweight"].shape[0]
        w = nibbles_to_float(q["qweight"], ct).view(n, -1, group_size)
        s = q["scales"].to(ct).unsqueeze(-1)
        if "mins" not in self.tensor_names:
            w.sub_(8).mul_(s)
        else:  # q * s is exact in float32 (4 x 11 bits): one rounding, as in a fused q * s + m
            w.mul_(s).add_(q["mins"].to(ct).unsqueeze(-1))
        return w.view(n, -1).to(dtype)


    def dequantize_halves(self, q: dict[str, Tensor], group_size: int,
                          dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """(even, odd) input columns of the weight, each [N, K/2]: a matmul can split x into its even and odd
        columns instead of interleaving W, which costs more than the rest of the dequantization on CPUs."""
        ct = _compute_dtype(dtype)
        qw = q["qweight"]
        n = qw.shape[0]
        s = q["scales"].to(ct).unsqueeze(-1)
        m = q["mins"].to(ct).unsqueeze(-1) if "mins" in self.tensor_names else None
        out = []
        for codes in (qw & 0x0F, qw >> 4):
            w = codes.to(ct).view(n, -1, group_size // 2)
            w = w.sub_(8).mul_(s) if m is None else w.mul_(s).add_(m)
            out.append(w.view(n, -1).to(dtype))
        return out[0], out[1]


@dataclass(frozen=True)
class _Codebook4(LowBitFormat):
    """nf4 and fp4: a nibble indexes a 16-value codebook, scaled by a per-group fp16 scale."""

    code: tuple[float, ...] = ()
    absmax_div: float = 1.0  # scale = absmax / absmax_div (1 for nf4, 6 for fp4)

    def shapes(self, out_features: int, in_features: int, group_size: int) -> Shapes:
        self._check(in_features, group_size)
        assert group_size % 2 == 0, f"{self.name}: group_size must be even, got {group_size}"
        return {"qweight": ((out_features, in_features // 2), torch.uint8),
                "scales": ((out_features, in_features // group_size), torch.float16)}

    def quantize(self, weight: Tensor, group_size: int) -> dict[str, Tensor]:
        x = _groups(weight, group_size)
        n, k = weight.shape
        s16 = _to_scale16(_div(x.abs().amax(-1, keepdim=True), self.absmax_div))
        y = x / _safe(s16.float())
        if self.name == "fp4":
            mags = torch.tensor(FP4_MAGNITUDES, dtype=torch.float32, device=x.device)
            idx = torch.bucketize(y.abs(), (mags[1:] + mags[:-1]) / 2)
            idx = idx | ((y < 0) & (idx > 0)).to(idx.dtype) << 3
        else:  # sorted codebook: nearest level by midpoints
            code = torch.tensor(self.code, dtype=torch.float32, device=x.device)
            idx = torch.bucketize(y, (code[1:] + code[:-1]) / 2)
        return {"qweight": pack_nibbles(idx.to(torch.uint8).view(n, k)), "scales": s16.squeeze(-1)}

    def dequantize(self, q: dict[str, Tensor], group_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
        ct = _compute_dtype(dtype)
        n = q["qweight"].shape[0]
        w = lookup_nibbles(q["qweight"], self.code, ct).view(n, -1, group_size)
        return w.mul_(q["scales"].to(ct).unsqueeze(-1)).view(n, -1).to(dtype)


@dataclass(frozen=True)
class _SymInt8(LowBitFormat):
    """sym_int8: int8 codes in [-127, 127] times a per-group fp16 scale (GGUF Q8_0 at group 32)."""

    def shapes(self, out_features: int, in_features: int, group_size: int) -> Shapes:
        self._check(in_features, group_size)
        return {"qweight": ((out_features, in_features), torch.int8),
                "scales": ((out_features, in_features // group_size), torch.float16)}

    def quantize(self, weight: Tensor, group_size: int) -> dict[str, Tensor]:
        x = _groups(weight, group_size)
        s16 = _to_scale16(_div(x.abs().amax(-1, keepdim=True), 127))
        q = torch.round(x / _safe(s16.float())).clamp_(-127, 127)
        return {"qweight": q.to(torch.int8).view(weight.shape), "scales": s16.squeeze(-1)}

    def dequantize(self, q: dict[str, Tensor], group_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
        ct = _compute_dtype(dtype)
        n, k = q["qweight"].shape
        w = q["qweight"].view(n, k // group_size, group_size).to(ct).mul_(q["scales"].to(ct).unsqueeze(-1))
        return w.view(n, k).to(dtype)


@dataclass(frozen=True)
class _Fp8(LowBitFormat):
    """fp8_e4m3 / fp8_e5m2: fp8 codes times a per-group float32 scale (absmax / finfo.max)."""

    fp8: torch.dtype = torch.float8_e4m3fn

    def shapes(self, out_features: int, in_features: int, group_size: int) -> Shapes:
        self._check(in_features, group_size)
        return {"qweight": ((out_features, in_features), self.fp8),
                "scales": ((out_features, in_features // group_size), torch.float32)}

    def quantize(self, weight: Tensor, group_size: int) -> dict[str, Tensor]:
        x = _groups(weight, group_size)
        fmax = torch.finfo(self.fp8).max
        s = _div(x.abs().amax(-1, keepdim=True), fmax)
        q = (x / _safe(s)).clamp_(-fmax, fmax).to(self.fp8)
        return {"qweight": q.view(weight.shape), "scales": s.squeeze(-1)}

    def dequantize(self, q: dict[str, Tensor], group_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
        ct = _compute_dtype(dtype)
        qw = q["qweight"]
        n, k = qw.shape
        # fp8 -> float is a software conversion on CPUs: a 2-bytes-per-lookup table is ~2x faster there
        w = lookup_bytes(qw, fp8_values(self.fp8), ct) if is_cpu(qw.device) else qw.to(ct)
        w = w.view(n, k // group_size, group_size).mul_(q["scales"].to(ct).unsqueeze(-1))
        return w.view(n, k).to(dtype)


@functools.cache
def fp8_values(fp8: torch.dtype) -> tuple[float, ...]:
    """The 256 values of an fp8 dtype by bit pattern (one tuple object per dtype, so table caches hit)."""
    return tuple(torch.arange(256, dtype=torch.uint8).view(fp8).to(torch.float32).tolist())


@dataclass(frozen=True)
class _Dense(LowBitFormat):
    """bf16 / fp16 / fp32: a plain weight in that dtype (no LowBitLinear; quantize = cast)."""

    dtype: torch.dtype = torch.float32

    def shapes(self, out_features: int, in_features: int, group_size: int) -> Shapes:
        return {"weight": ((out_features, in_features), self.dtype)}

    def quantize(self, weight: Tensor, group_size: int) -> dict[str, Tensor]:
        assert weight.dim() == 2, f"expected a 2-D weight, got shape {tuple(weight.shape)}"
        return {"weight": weight.detach().to(self.dtype)}

    def dequantize(self, q: dict[str, Tensor], group_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return q["weight"].to(dtype)


_I4 = ("qweight", "scales")
FORMATS: dict[str, LowBitFormat] = {f.name: f for f in (
    _Int4("sym_int4", 4, False, _I4),
    _Int4("asym_int4", 4, False, ("qweight", "scales", "mins")),
    _Codebook4("nf4", 4, False, _I4, code=NF4_CODE, absmax_div=1.0),
    _Codebook4("fp4", 4, False, _I4, code=FP4_CODE, absmax_div=6.0),
    _SymInt8("sym_int8", 8, False, _I4),
    _Fp8("fp8_e4m3", 8, False, _I4, fp8=torch.float8_e4m3fn),
    _Fp8("fp8_e5m2", 8, False, _I4, fp8=torch.float8_e5m2),
    _Dense("bf16", 16, True, ("weight",), dtype=torch.bfloat16),
    _Dense("fp16", 16, True, ("weight",), dtype=torch.float16),
    _Dense("fp32", 32, True, ("weight",), dtype=torch.float32),
)}

LOW_BIT_NAMES: tuple[str, ...] = tuple(n for n, f in FORMATS.items() if not f.dense)


def get_format(name: str) -> LowBitFormat:
    """The registered format called `name` (case-insensitive); UnknownFormatError lists the valid names."""
    fmt = FORMATS.get(str(name).strip().lower()) if name is not None else None
    if fmt is None:
        raise UnknownFormatError(f"unknown low-bit format {name!r}; valid formats: {', '.join(FORMATS)}")
    return fmt
