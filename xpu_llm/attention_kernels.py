"""Decode attention over the static KV cache in Triton (flash-decoding): the few query rows of a decode step or a
speculative verification attend to the cache as it is stored, bf16 / fp16 / fp32 or compressed (int8 with a
scale per slot and KV head, fp8 e4m3 / e5m2), without the dequantized copy of the cache that SDPA would need.

One program owns one (batch row, KV head) and a range of cache slots: its query rows are the G query heads that
share that KV head times the T positions (G * T <= 64, padded to a tl.dot tile of 16+). It walks its slots
BLOCK_N at a time with an online softmax in float32 and writes either the finished rows (one split) or
unnormalised partial rows with their max and sum, which `_combine` merges (deterministically, no atomics). The
mask is the model's own boolean [B|1, 1, T, kv_len] (causal, padding, sliding window), read per tile, so every
rule of `model.attention_mask` holds as it is. int8 codes and fp8 bytes enter the dot products exactly (fp8 as
float16 bit fields, as the low-bit kernels decode them; no fp8 instructions needed): the int8 key scales multiply
the float32 scores, the value scales the probabilities. Only portable Triton: the same source for NVIDIA and
Intel GPUs, and Triton's interpreter runs it on CPU tensors in the tests.

`store_kv` writes a step's keys and values into the cache in one launch (quantized in the kernel: int8 codes with
their scale, fp8 bytes by integer rounding steps), where PyTorch takes two index writes (float caches), six small
kernels (fp8) or about a dozen (int8) per layer."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kv_cache import KIND_CODES
from .lowbit.kernels.triton_common import _f16_bits, cast

KINDS = KIND_CODES  # cache kind -> KIND in the kernels: 0 float, 1 int8, 2 fp8 e4m3, 3 fp8 e5m2
INT8, FP8_E4M3 = KINDS["int8"], KINDS["fp8_e4m3"]
MAX_ROWS = 64  # query rows (heads per KV head x positions) one program holds
BLOCK_N = 64  # cache slots per tile
TARGET_PROGRAMS = 512  # split the slots until about this many programs run (a batch-1 step has only KV-head many)
MAX_SPLITS = 64  # _combine holds every split of a row at once
_LOG2E = 1.4426950408889634


@triton.jit
def _kv_tile(ptrs, n_ok, d_ok, KIND: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] tile of keys or values as exact DOT_DTYPE values (fp8 e4m3: times 2**-8)."""
    x = tl.load(ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0)
    if KIND == 0:
        return x.to(DOT_DTYPE)
    if KIND == 1:
        return x.to(tl.float32).to(DOT_DTYPE)  # |code| <= 127: exact in every float type
    b = x.to(tl.int32) & 255
    if KIND == 2:  # sign to float16's bit 15, the 4+3 bits into its 5+10 fields below it: the value / 2**8
        v = _f16_bits(((b & 0x80) << 8) | ((b & 0x7F) << 7))
    else:  # e5m2 is the high byte of a float16
        v = _f16_bits(b << 8)
    return v.to(DOT_DTYPE)


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, m_ptr, out_ptr, po_ptr, pml_ptr,
                             L, slots_per_split, qk_scale, v_mul,
                             stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
                             stride_sb, stride_sh, stride_mb, stride_mt, stride_ob, stride_oh, stride_ot,
                             N_KV: tl.constexpr, G: tl.constexpr, T: tl.constexpr, D: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                             KIND: tl.constexpr, SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                             SOFT_BF16: tl.constexpr):
    """Program (b * N_KV + kv head, split): its G * T query rows against slots [split * slots_per_split, ...)."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // N_KV
    hkv = pid_bh % N_KV
    r = tl.arange(0, BLOCK_M)
    head = hkv * G + r // T
    t = r % T
    row_ok = r < G * T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0).to(DOT_DTYPE)
    kv_base = b * stride_kb + hkv * stride_kh
    s_base = b * stride_sb + hkv * stride_sh
    m_rows = m_ptr + b * stride_mb + t * stride_mt
    m_i = tl.full((BLOCK_M,), -1e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    start = pid_s * slots_per_split
    end = tl.minimum(start + slots_per_split, L)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        tile = kv_base + offs_n[:, None] * stride_ks + offs_d[None, :]
        k = _kv_tile(k_ptr + tile, n_ok, d_ok, KIND, DOT_DTYPE)
        if DOT_DTYPE == tl.float32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if KIND == 1:  # int8: the key's scale per slot
            s = s * (tl.load(ks_ptr + s_base + offs_n, mask=n_ok, other=0.0) * qk_scale)[None, :]
        else:
            s = s * qk_scale
        keep = tl.load(m_rows[:, None] + offs_n[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0) != 0
        s = tl.where(keep, s, -1e30)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KIND == 1:  # int8: the value's scale per slot goes on the probabilities
            p = p * tl.load(vs_ptr + s_base + offs_n, mask=n_ok, other=0.0)[None, :]
        v = _kv_tile(v_ptr + tile, n_ok, d_ok, KIND, DOT_DTYPE)
        if DOT_DTYPE == tl.float32:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(DOT_DTYPE), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if SPLIT:  # unnormalised rows with their running max and sum, for _combine
        part = (pid_bh * tl.num_programs(1) + pid_s) * BLOCK_M
        tl.store(po_ptr + (part + r[:, None]) * BLOCK_D + offs_d[None, :], acc)
        tl.store(pml_ptr + (part + r) * 2, m_i)
        tl.store(pml_ptr + (part + r) * 2 + 1, l_i)
    else:
        o = acc * (v_mul / l_i)[:, None]
        tl.store(out_ptr + b * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :],
                 cast(o, out_ptr.dtype.element_ty, SOFT_BF16), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine(po_ptr, pml_ptr, out_ptr, splits, v_mul, stride_ob, stride_oh, stride_ot,
             N_KV: tl.constexpr, G: tl.constexpr, T: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Program (b * N_KV + KV head, row): merge the row's splits, weights 2**(split max - max over splits). Every
    split is loaded at once (a loop over splits would wait on each load in turn: ~0.5 us a split)."""
    pid_bh = tl.program_id(0)
    row = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (pid_bh * splits + sp) * BLOCK_M + row  # this row in every split
    s_ok = sp < splits
    m = tl.load(pml_ptr + rows * 2, mask=s_ok, other=-1e30)
    w = tl.exp2(m - tl.max(m, axis=0))
    w = tl.where(s_ok, w, 0.0)
    l_sum = tl.sum(w * tl.load(pml_ptr + rows * 2 + 1, mask=s_ok, other=0.0), axis=0)
    o = tl.load(po_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    o = tl.sum(w[:, None] * o, axis=0) * (v_mul / l_sum)
    b = pid_bh // N_KV
    head = (pid_bh % N_KV) * G + row // T
    tl.store(out_ptr + b * stride_ob + head * stride_oh + (row % T) * stride_ot + offs_d,
             cast(o, out_ptr.dtype.element_ty, SOFT_BF16), mask=offs_d < D)


@triton.jit
def _rne(y):
    """float32 -> int32 rounded half to even, as torch.round, by integer steps (a float add-and-subtract of a
    magic constant would be the same, unless a compiler folds it away)."""
    ti = y.to(tl.int32)  # toward zero; exact below 2**31
    f = tl.abs(y - ti.to(tl.float32))
    up = (f > 0.5) | ((f == 0.5) & ((ti & 1) != 0))
    return ti + tl.where(up, tl.where(y < 0, -1, 1), 0)


@triton.jit
def _fp8_bytes(x, M: tl.constexpr, BIAS: tl.constexpr, FMAX: tl.constexpr):
    """float32 -> fp8 bytes (M mantissa bits, exponent bias BIAS) saturated to +-FMAX and rounded to nearest even:
    what torch's clamp then cast to float8_e4m3fn / float8_e5m2 gives, in integer steps on any backend."""
    a = tl.minimum(tl.abs(x), FMAX)
    bits = a.to(tl.int32, bitcast=True)
    r = bits + ((1 << (22 - M)) - 1) + ((bits >> (23 - M)) & 1)  # round the float32 mantissa to M bits
    normal = (((r >> 23) - 127 + BIAS) << M) | ((r >> (23 - M)) & ((1 << M) - 1))
    # below the smallest normal: multiples of 2**(1 - BIAS - M) (clamped so that no lane overflows int32)
    sub = _rne(tl.minimum(a, 2.0 ** (1 - BIAS)) * (2.0 ** (BIAS - 1 + M)))
    byte = tl.where(a < 2.0 ** (1 - BIAS), sub, normal)
    return byte | tl.where(x.to(tl.int32, bitcast=True) < 0, 0x80, 0)  # the sign bit: -0.0 too


@triton.jit
def _store_row(x_ptr, q_ptr, s_ptr, offs_d, d_ok, KIND: tl.constexpr):
    """One head's key or value row -> the cache: as is (float caches), fp8 bytes, or int8 codes and their scale
    absmax * float32(1 / 127) (an IEEE division by it, rounded half to even: the PyTorch path's values)."""
    x = tl.load(x_ptr + offs_d, mask=d_ok, other=0.0)
    if KIND == 0:
        tl.store(q_ptr + offs_d, x.to(q_ptr.dtype.element_ty), mask=d_ok)
    elif KIND == 1:
        x = x.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) * (1 / 127)
        c = tl.minimum(tl.maximum(_rne(tl.math.div_rn(x, scale)), -127), 127)
        tl.store(q_ptr + offs_d, c.to(tl.int8), mask=d_ok)
        tl.store(s_ptr, scale)
    elif KIND == 2:
        tl.store(q_ptr + offs_d, _fp8_bytes(x.to(tl.float32), 3, 7, 448.0).to(tl.uint8), mask=d_ok)
    else:
        tl.store(q_ptr + offs_d, _fp8_bytes(x.to(tl.float32), 2, 15, 57344.0).to(tl.uint8), mask=d_ok)


@triton.jit
def _store_kernel(k_ptr, v_ptr, pos_ptr, kq_ptr, vq_ptr, ks_ptr, vs_ptr,
                  skb, skh, skt, svb, svh, svt, spb, spt, sqb, sqh, sqs, ssb, ssh, S,
                  H: tl.constexpr, T: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, KIND: tl.constexpr):
    """Program (b, head, position): write that key and value row at its slot (pos [T] or [B, T]). A slot outside
    [0, S) is not written (PyTorch's index write would fail there; callers check lengths before a step, and a
    captured graph cannot stop)."""
    pid = tl.program_id(0)
    t = pid % T
    h = (pid // T) % H
    b = pid // (T * H)
    slot = tl.load(pos_ptr + b * spb + t * spt)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    dest = b * sqb + h * sqh + slot * sqs
    scale = b * ssb + h * ssh + slot
    if (slot >= 0) & (slot < S):
        _store_row(k_ptr + b * skb + h * skh + t * skt, kq_ptr + dest, ks_ptr + scale, offs_d, d_ok, KIND)
        _store_row(v_ptr + b * svb + h * svh + t * svt, vq_ptr + dest, vs_ptr + scale, offs_d, d_ok, KIND)


def store_kv(k: Tensor, v: Tensor, input_pos: Tensor, k_buf: Tensor, v_buf: Tensor, kind: str | None = None,
             k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> None:
    """Write k, v [B, H, T, D] at slots input_pos ([T], or [B, T]: each row its own) of k_buf / v_buf
    [B', H, S, D], in one launch: as they are for a float cache (kind None), as int8 codes with one scale per
    slot (k_scale / v_scale [B', H, S, 1] float32), or fp8 bytes. The same bytes as QuantizedKVCache's PyTorch
    quantize."""
    b, h, t, d = k.shape
    assert v.shape == k.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    k, v = (x if x.stride(3) == 1 else x.contiguous() for x in (k, v))
    assert k_buf.is_contiguous() and v_buf.is_contiguous() and k_buf.shape[1:] == v_buf.shape[1:]
    int8 = kind == "int8"
    assert not int8 or (k_scale is not None and v_scale is not None and k_scale.is_contiguous()), "int8 needs scales"
    spb, spt = (input_pos.stride(0), input_pos.stride(1)) if input_pos.dim() == 2 else (0, input_pos.stride(0))
    scales = (k_scale, v_scale) if int8 else (k_buf, v_buf)  # unread for a float cache
    ssb, ssh = (k_scale.stride(0), k_scale.stride(1)) if int8 else (0, 0)
    _store_kernel[(b * h * t,)](k, v, input_pos, k_buf, v_buf, scales[0], scales[1], k.stride(0), k.stride(1),
                                k.stride(2), v.stride(0), v.stride(1), v.stride(2), spb, spt, k_buf.stride(0),
                                k_buf.stride(1), k_buf.stride(2), ssb, ssh, k_buf.shape[2], H=h, T=t, D=d,
                                BLOCK_D=triton.next_power_of_2(d), KIND=KINDS[kind], num_warps=1)


_DOT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def supports(q: Tensor, n_kv_heads: int) -> bool:
    """Whether the kernel takes these query rows [B, H, T, D]: a decode step or a short verification."""
    b, h, t, d = q.shape
    return (q.dtype in _DOT and h % n_kv_heads == 0 and (h // n_kv_heads) * t <= MAX_ROWS and d <= 256)


def num_splits(programs: int, kv_len: int, block_n: int = BLOCK_N) -> tuple[int, int]:
    """(slots per split, a multiple of block_n; number of splits, at most MAX_SPLITS) so that about
    TARGET_PROGRAMS run."""
    want = max(1, min(triton.cdiv(TARGET_PROGRAMS, programs), triton.cdiv(kv_len, block_n), MAX_SPLITS))
    per = triton.cdiv(triton.cdiv(kv_len, want), block_n) * block_n
    return per, triton.cdiv(kv_len, per)


def decode_attention(q: Tensor, k_buf: Tensor, v_buf: Tensor, k_scale: Tensor | None, v_scale: Tensor | None,
                     kind: str | None, mask: Tensor, kv_len: int, soft_bf16: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(D) masked) v for q [B, H, T, D] over the first kv_len slots of a cache stored as
    k_buf / v_buf [B', KV heads, S, D] (B' >= B; int8 with k_scale / v_scale [B', KV heads, S, 1] float32, fp8 as
    its bytes), `mask` bool [B|1, 1, T, kv_len] (True = attend). Returns [B, H, T, D] in q's dtype."""
    b, h, t, d = q.shape
    n_kv = k_buf.shape[1]
    assert supports(q, n_kv), f"decode_attention takes up to {MAX_ROWS} rows per KV head, got q {tuple(q.shape)}"
    assert k_buf.shape == v_buf.shape and k_buf.shape[0] >= b and k_buf.shape[3] == d and kv_len <= k_buf.shape[2]
    assert k_buf.stride(3) == 1 and k_buf.stride() == v_buf.stride(), "the cache must be contiguous per slot"
    assert mask.dtype == torch.bool and mask.shape[-2:] == (t, kv_len) and mask.shape[0] in (1, b), \
        f"mask {tuple(mask.shape)} does not match {t} query positions over {kv_len} slots"
    kind_id = KINDS[kind]
    if q.stride(3) != 1:
        q = q.contiguous()
    if mask.stride(3) != 1:
        mask = mask.contiguous()
    mask_u8 = mask.view(torch.uint8)
    g = h // n_kv
    block_m = max(16, triton.next_power_of_2(g * t))
    block_d = max(16, triton.next_power_of_2(d))
    out = torch.empty((b, h, t, d), dtype=q.dtype, device=q.device)
    per, splits = num_splits(b * n_kv, kv_len)
    e4m3 = kind_id == FP8_E4M3
    qk_scale = d ** -0.5 * _LOG2E * (256.0 if e4m3 else 1.0)
    v_mul = 256.0 if e4m3 else 1.0
    scales = (k_scale, v_scale) if kind_id == INT8 else (k_buf, v_buf)  # unread unless int8
    sb, sh = (scales[0].stride(0), scales[0].stride(1)) if kind_id == INT8 else (0, 0)
    if splits > 1:
        po = torch.empty((b * n_kv, splits, block_m, block_d), dtype=torch.float32, device=q.device)
        pml = torch.empty((b * n_kv, splits, block_m, 2), dtype=torch.float32, device=q.device)
    else:
        po = pml = out
    dot = tl.float32 if (soft_bf16 and q.dtype == torch.bfloat16) else _DOT[q.dtype]
    consts = dict(N_KV=n_kv, G=g, T=t, D=d, BLOCK_M=block_m, BLOCK_D=block_d)
    _decode_attention_kernel[(b * n_kv, splits)](
        q, k_buf, v_buf, scales[0], scales[1], mask_u8, out, po, pml, kv_len, per, qk_scale, v_mul,
        q.stride(0), q.stride(1), q.stride(2), k_buf.stride(0), k_buf.stride(1), k_buf.stride(2), sb, sh,
        mask_u8.stride(0) if mask.shape[0] == b else 0, mask_u8.stride(2), out.stride(0), out.stride(1),
        out.stride(2), BLOCK_N=BLOCK_N, KIND=kind_id, SPLIT=splits > 1, DOT_DTYPE=dot, SOFT_BF16=soft_bf16,
        num_warps=4, **consts)
    if splits > 1:
        _combine[(b * n_kv, g * t)](po, pml, out, splits, v_mul, out.stride(0), out.stride(1), out.stride(2),
                                    BLOCK_S=triton.next_power_of_2(splits), SOFT_BF16=soft_bf16, num_warps=4,
                                    **consts)
    return out


@torch.library.custom_op("xpu_llm::decode_attention", mutates_args=())
def decode_attention_op(q: Tensor, k_buf: Tensor, v_buf: Tensor, k_scale: Tensor | None, v_scale: Tensor | None,
                        kind_id: int, mask: Tensor, kv_len: int) -> Tensor:
    """decode_attention as an opaque custom op, so that torch.compile keeps the launch in its graph."""
    kind = {v: k for k, v in KINDS.items()}[kind_id]
    return decode_attention(q, k_buf, v_buf, k_scale, v_scale, kind, mask, kv_len)


@decode_attention_op.register_fake
def _(q, k_buf, v_buf, k_scale, v_scale, kind_id, mask, kv_len):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
