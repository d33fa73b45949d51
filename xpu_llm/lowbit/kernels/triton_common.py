"""Triton device functions shared by the GPU kernels: load one tile of a format's canonical tensors and turn the
codes into float32 values. Every kernel reads the canonical layout (rows = output features, K contiguous, two
nibbles per byte with the even element low) with 16-byte row loads, so no re-layout is needed.

Codes become floats without integer->float conversions (a quarter-rate instruction on most GPUs): a code c
OR-ed into the bits of the float 2**23 reads as 2**23 + c, fp8 and fp4 codes are placed into float16 bit
fields (exact, subnormals included), and the power of two that this leaves is folded into the group scale.
Only portable Triton is used (no inline assembly), so the same source compiles for NVIDIA and Intel GPUs."""
from __future__ import annotations

import triton
import triton.language as tl

# Format ids (constexpr in the kernels).
SYM_INT4 = tl.constexpr(0)
ASYM_INT4 = tl.constexpr(1)
NF4 = tl.constexpr(2)
FP4 = tl.constexpr(3)
SYM_INT8 = tl.constexpr(4)
FP8_E4M3 = tl.constexpr(5)
FP8_E5M2 = tl.constexpr(6)

FORMAT_IDS: dict[str, int] = {"sym_int4": 0, "asym_int4": 1, "nf4": 2, "fp4": 3, "sym_int8": 4, "fp8_e4m3": 5,
                              "fp8_e5m2": 6}
FOUR_BIT = frozenset(("sym_int4", "asym_int4", "nf4", "fp4"))
# Powers of two left in the values by the float16 bit tricks, multiplied into the scale instead (exact).
SCALE_MUL: dict[str, float] = {"fp4": 2.0 ** 14, "fp8_e4m3": 2.0 ** 8}

_MAGIC = tl.constexpr(0x4B000000)  # bits of float32 2**23: (c | _MAGIC) reads as 2**23 + c for 0 <= c < 2**23
_TWO23 = tl.constexpr(8388608.0)


@triton.jit
def _as_float(c):
    """int32 codes in [0, 2**23) -> exact float32, by bits (no int->float conversion instruction)."""
    return (c | _MAGIC).to(tl.float32, bitcast=True) - _TWO23


@triton.jit
def _f16_bits(bits):
    """int32 holding float16 bits in its low 16 bits -> float32 value."""
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def cast(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """float32 -> `dtype`, rounding to nearest even. SOFT_BF16 rounds to bfloat16 by integer arithmetic: Triton's
    interpreter truncates float32 -> bfloat16 (GPUs round), so the CPU test run would otherwise disagree."""
    if SOFT_BF16 and dtype == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
        return b.to(tl.float32, bitcast=True).to(dtype)
    return x.to(dtype)


@triton.jit
def _nibble_plane(w, SHIFT: tl.constexpr, lut_ptr, FMT: tl.constexpr):
    """Nibble SHIFT/4 of every uint32 word -> float32 values before the scale (asym_int4: the code itself)."""
    if FMT == SYM_INT4 or FMT == ASYM_INT4:
        bits = ((w >> SHIFT) | _MAGIC) & (_MAGIC | 15)  # one LOP3: 2**23 + nibble
        if FMT == SYM_INT4:
            v = bits.to(tl.float32, bitcast=True) - (_TWO23 + 8.0)
        else:
            v = bits.to(tl.float32, bitcast=True) - _TWO23
    else:
        c = (w >> SHIFT) & 15
        if FMT == NF4:
            v = tl.load(lut_ptr + c)  # 16 floats: one cache line that every lane of a warp hits
        else:  # FP4 = E2M1: sign bit 3, exponent bits 2..1, mantissa bit 0 -> float16 fields, times 2**14 (scale)
            v = _f16_bits(((c & 7) << 9) | ((c & 8) << 12))
    return v


@triton.jit
def _fp4_pair(w):
    """FP4 (E2M1) codes in bits 0..3 and 16..19 of every word -> their two float32 values (times 2**-14, which the
    scale carries): both placed into float16 fields by the same three integer ops."""
    bits = ((w & 0x00070007) << 9) | ((w & 0x00080008) << 12)
    return tl.join(_f16_bits(bits), _f16_bits(bits >> 16))


@triton.jit
def _nf4_byte(w, SHIFT: tl.constexpr, lut_ptr):
    """Byte SHIFT/8 of every word -> the NF4 values of its (low, high) nibble, from one 64-bit load of the 256-entry
    pair table (triton_ops.nf4_pair_table: entry b holds the float32 bits of NF4[b & 15] low, NF4[b >> 4] high):
    half the table reads and fewer instructions than a per-nibble lookup (GEMV loop on sm_90: 4.5 per weight
    instead of 7.6), but a 2 KB table spreads a warp's reads over many cache lines where the 16-entry one is a
    single line, so which is faster is left to the tuner (GemvConfig.pairs)."""
    pair = tl.load(lut_ptr + ((w >> SHIFT) & 255))
    lo = pair.to(tl.uint32).to(tl.float32, bitcast=True)
    hi = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _byte_plane(w, SHIFT: tl.constexpr, FMT: tl.constexpr):
    """Byte SHIFT/8 of every uint32 word -> float32 values before the scale."""
    b = (w >> SHIFT) & 255
    if FMT == SYM_INT8:  # two's complement: b ^ 0x80 = value + 128
        v = ((b ^ 0x80) | _MAGIC).to(tl.float32, bitcast=True) - (_TWO23 + 128.0)
    elif FMT == FP8_E4M3:  # sign, then 4+3 bits into float16's 5+10: the value / 2**8 (scale carries 2**8)
        v = _f16_bits(((b & 0x80) << 8) | ((b & 0x7F) << 7))
    else:  # FP8_E5M2 is the high byte of a float16
        v = _f16_bits(b << 8)
    return v


@triton.jit
def load_raw(q_ptr, s_ptr, z_ptr, rn, gi, n_mask, g_mask, stride_qn, stride_sn,
             FMT: tl.constexpr, G: tl.constexpr, SCALE_MUL: tl.constexpr):
    """Rows `rn` [BN] x groups `gi` [NG] of the weight, undecoded: (uint32 code words [BN, NG, G/8 or G/4],
    scales [BN, NG] float32, mins [BN, NG] float32, zeros unless asym_int4). Masked rows/groups read 0.
    q_ptr is the qweight bytes viewed as int32 and stride_qn its row stride in words."""
    mask2 = n_mask[:, None] & g_mask[None, :]
    s_off = rn[:, None] * stride_sn + gi[None, :]
    s = tl.load(s_ptr + s_off, mask=mask2, other=0.0).to(tl.float32)
    if SCALE_MUL != 1.0:
        s = s * SCALE_MUL
    if FMT == ASYM_INT4:
        z = tl.load(z_ptr + s_off, mask=mask2, other=0.0).to(tl.float32)
    else:
        z = tl.zeros_like(s)
    if FMT < SYM_INT8:
        WPG: tl.constexpr = G // 8  # words per group and row
    else:
        WPG: tl.constexpr = G // 4
    rw = tl.arange(0, WPG)
    off = rn[:, None, None] * stride_qn + gi[None, :, None] * WPG + rw[None, None, :]
    w = tl.load(q_ptr + off, mask=mask2[:, :, None], other=0).to(tl.uint32, bitcast=True)
    return w, s, z


@triton.jit
def _inplace_plane(w, SHIFT: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr, magic):
    """The field of BITS bits at SHIFT of every word as exact float32 code - OFFSET, read in place: one masked OR
    gives 2**23 + code * 2**SHIFT (the field must end below bit 23), one FMA scales by 2**-SHIFT and subtracts
    (exact: a power-of-two product, an integer result). `magic` is _MAGIC passed at run time: in a register it
    lets the mask and the OR fuse into one LOP3 (two immediates cannot)."""
    bits = (w & (((1 << BITS) - 1) << SHIFT)) | magic
    return bits.to(tl.float32, bitcast=True) * (1.0 / (1 << SHIFT)) - (_TWO23 / (1 << SHIFT) + OFFSET)


@triton.jit
def decode_inplace(w, FMT: tl.constexpr, G: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr, magic):
    """decode() for sym/asym int4 and sym_int8 (the same values) in fewer instructions: fields below bit 20 (int4)
    or 16 (int8) are read in place, the others after one shift per word, so a value costs one logic op and one
    FMA (the GEMV is bound by the instructions per weight, not by bytes). `magic`: _MAGIC as a run-time value."""
    if FMT == SYM_INT8:
        w = w ^ 0x80808080  # two's complement -> value + 128 in every byte
        hi = w >> 16
        v = tl.join(tl.join(_inplace_plane(w, 0, 8, 128, magic), _inplace_plane(hi, 0, 8, 128, magic)),
                    tl.join(_inplace_plane(w, 8, 8, 128, magic), _inplace_plane(hi, 8, 8, 128, magic)))
    else:
        OFF: tl.constexpr = 8 if FMT == SYM_INT4 else 0
        hi = w >> 20
        v = tl.join(tl.join(tl.join(_inplace_plane(w, 0, 4, OFF, magic), _inplace_plane(w, 16, 4, OFF, magic)),
                            tl.join(_inplace_plane(w, 8, 4, OFF, magic), _inplace_plane(hi, 4, 4, OFF, magic))),
                    tl.join(tl.join(_inplace_plane(w, 4, 4, OFF, magic), _inplace_plane(hi, 0, 4, OFF, magic)),
                            tl.join(_inplace_plane(w, 12, 4, OFF, magic), _inplace_plane(hi, 8, 4, OFF, magic))))
    return tl.reshape(v, (BN, NG, G))


@triton.jit
def decode(w, lut_ptr, FMT: tl.constexpr, G: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr,
           NF4_PAIRS: tl.constexpr):
    """Code words [BN, NG, G/8 or G/4] -> values [BN, NG, G] float32 before the scale, in element order. nf4:
    `lut_ptr` is the 16-entry float32 table, or with NF4_PAIRS the 256-entry pair table (one read per byte).

    Decoded one nibble/byte plane at a time in the words' own register layout (a table lookup stays a plain
    gather there), then interleaved back into element order by a tree of joins, which keeps every element in
    the thread that loaded it (no shuffles, no shared memory)."""
    if FMT == NF4 and NF4_PAIRS:  # byte j of a word holds elements 2j (low nibble), 2j + 1: [j // 2, j % 2, nibble]
        lo0, hi0 = _nf4_byte(w, 0, lut_ptr)
        lo1, hi1 = _nf4_byte(w, 8, lut_ptr)
        lo2, hi2 = _nf4_byte(w, 16, lut_ptr)
        lo3, hi3 = _nf4_byte(w, 24, lut_ptr)
        v = tl.join(tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3)), tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3)))
    elif FMT == FP4:  # nibbles i and i + 4 (bits 4i, 4i + 16) in the two float16 halves of one word: one pass
        v = tl.join(tl.join(_fp4_pair(w), _fp4_pair(w >> 8)), tl.join(_fp4_pair(w >> 4), _fp4_pair(w >> 12)))
    elif FMT == FP8_E4M3 or FMT == FP8_E5M2:  # bytes 0, 2 and 1, 3 as float16 pairs, two values per integer pass
        if FMT == FP8_E4M3:  # sign to bit 15, the 4+3 bits to float16's 5+10 below it (the value / 2**8)
            even = ((w << 8) & 0x80008000) | ((w << 7) & 0x3F803F80)
            odd = (w & 0x80008000) | ((w >> 1) & 0x3F803F80)
        else:  # FP8_E5M2 is the high byte of a float16
            even = (w << 8) & 0xFF00FF00
            odd = w & 0xFF00FF00
        v = tl.join(tl.join(_f16_bits(even), _f16_bits(even >> 16)), tl.join(_f16_bits(odd), _f16_bits(odd >> 16)))
    elif FMT < SYM_INT8:  # element 2j of a byte is its low nibble, so nibble i of a word is element i
        v = tl.join(tl.join(tl.join(_nibble_plane(w, 0, lut_ptr, FMT), _nibble_plane(w, 16, lut_ptr, FMT)),
                            tl.join(_nibble_plane(w, 8, lut_ptr, FMT), _nibble_plane(w, 24, lut_ptr, FMT))),
                    tl.join(tl.join(_nibble_plane(w, 4, lut_ptr, FMT), _nibble_plane(w, 20, lut_ptr, FMT)),
                            tl.join(_nibble_plane(w, 12, lut_ptr, FMT), _nibble_plane(w, 28, lut_ptr, FMT))))
    else:
        v = tl.join(tl.join(_byte_plane(w, 0, FMT), _byte_plane(w, 16, FMT)),
                    tl.join(_byte_plane(w, 8, FMT), _byte_plane(w, 24, FMT)))
    return tl.reshape(v, (BN, NG, G))


@triton.jit
def decode_codes(w, lut_ptr, magic, FMT: tl.constexpr, G: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr,
                 INPLACE: tl.constexpr, NF4_PAIRS: tl.constexpr):
    """decode_inplace where the format has it (sym/asym int4, sym_int8) and INPLACE is set, else decode: the same
    values either way."""
    if INPLACE and (FMT == SYM_INT4 or FMT == ASYM_INT4 or FMT == SYM_INT8):
        v = decode_inplace(w, FMT, G, BN, NG, magic)
    else:
        v = decode(w, lut_ptr, FMT, G, BN, NG, NF4_PAIRS)
    return v


@triton.jit
def load_tile(q_ptr, s_ptr, z_ptr, lut_ptr, rn, gi, n_mask, g_mask, stride_qn, stride_sn, magic,
              FMT: tl.constexpr, G: tl.constexpr, SCALE_MUL: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr,
              INPLACE: tl.constexpr):
    """load_raw + decode: (values [BN, NG, G] before the scale, scales [BN, NG], mins [BN, NG]). INPLACE: sym/asym
    int4 and sym_int8 through decode_inplace (the same values in fewer instructions; `magic` is _MAGIC)."""
    w, s, z = load_raw(q_ptr, s_ptr, z_ptr, rn, gi, n_mask, g_mask, stride_qn, stride_sn, FMT, G, SCALE_MUL)
    return decode_codes(w, lut_ptr, magic, FMT, G, BN, NG, INPLACE, False), s, z
