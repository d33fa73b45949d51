"""Decode kernel: fused dequantize + matrix-vector product for one activation row, on CUDA cores in float32.

Each program owns BLOCK_N output features and a range of K (split-K when N alone gives too few programs) and
reads its weight words once. Values are dequantized in float32 and the group scale is applied once per group
and row (sum_k v*x, then times s), so the weights keep full float32 precision (the matmul kernels round them to
the activation dtype first, as the reference path does). Partial sums of a split go to a float32 workspace
[split, M, N] that `_splitk_reduce` adds up in a fixed order (deterministic, no atomics).

The kernel is bound by instructions per weight, not by bytes (int4 and int8 reach the same weights per second),
so the loop is kept lean: sym/asym int4 and sym_int8 decode in place (one logic op and one FMA a value), bf16
activations are widened as int32 pairs before they are spread over the rows, pointers advance by constants and
the masks vanish when the shape divides the tile (sym_int4: 4.6 SASS instructions per weight in the loop on
sm_90, from 7.2)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import ASYM_INT4, NF4, SYM_INT8, _MAGIC, cast, decode_codes


# Decode sym/asym int4 and sym_int8 with their fields in place (triton_common.decode_inplace: fewer instructions
# per weight in the loop); the results are the same bits either way.
INPLACE = True


@dataclass(frozen=True)
class GemvConfig:
    """BLOCK_N output rows per program, NG groups per K step, warps, how many K splits; nf4: decode a byte per
    read of the 256-entry pair table instead of a nibble per read of the 16-entry one."""

    block_n: int
    ng: int
    warps: int
    split: int = 1
    pairs: bool = False


@triton.jit
def _load_step(q_ptrs, s_ptrs, z_ptrs, mask3, mask2, FMT: tl.constexpr, SCALE_MUL: tl.constexpr):
    """One K step of the weight: code words [BN, NG, WPG] (uint32), scales and mins [BN, NG] float32."""
    w = tl.load(q_ptrs, mask=mask3, other=0).to(tl.uint32, bitcast=True)
    s = tl.load(s_ptrs, mask=mask2, other=0.0).to(tl.float32)
    if SCALE_MUL != 1.0:
        s = s * SCALE_MUL
    if FMT == ASYM_INT4:
        z = tl.load(z_ptrs, mask=mask2, other=0.0).to(tl.float32)
    else:
        z = tl.zeros_like(s)
    return w, s, z


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, lut_ptr, out_ptr, N, K, stride_qn, stride_sn, stride_os,
                 groups_per_split, magic, FMT: tl.constexpr, G: tl.constexpr, SCALE_MUL: tl.constexpr,
                 SOFT_BF16: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr, INPLACE: tl.constexpr,
                 X_PAIRS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_G: tl.constexpr, NF4_PAIRS: tl.constexpr):
    """EVEN_N: N is a multiple of BLOCK_N; EVEN_G: every K step is whole (groups_per_split and K // G are multiples
    of NG). Then the loads need no per-element masks, only the prefetch past the end is cut (one scalar test);
    pointers advance by a constant per step, so the loop spends its instructions on the weights."""
    WPG: tl.constexpr = G // 8 if FMT < SYM_INT8 else G // 4  # code words per group and row
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    if EVEN_N:
        n_mask = rn == rn  # all true, folded by the compiler
    rg = tl.arange(0, NG)
    re = tl.arange(0, G)
    rh = tl.arange(0, G // 2)
    rw = tl.arange(0, WPG)
    g_begin = pid_s * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, K // G)
    gi = g_begin + rg
    q_ptrs = q_ptr + rn[:, None, None] * stride_qn + gi[None, :, None] * WPG + rw[None, None, :]
    s_off = rn[:, None] * stride_sn + gi[None, :]
    s_ptrs, z_ptrs = s_ptr + s_off, z_ptr + s_off
    if X_PAIRS:  # bf16 x read as int32 pairs, each half made float32 by one integer op before the values are
        # spread over the rows (converted by Triton, it was redone for every row a thread holds)
        x_ptrs = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + gi[:, None] * (G // 2) + rh[None, :]
        X_STEP: tl.constexpr = NG * (G // 2)
    else:
        x_ptrs = x_ptr + gi[:, None] * G + re[None, :]
        X_STEP: tl.constexpr = NG * G
    acc = tl.zeros((BLOCK_N, NG), tl.float32)
    # software pipelining: the next step's words are in flight while this step is decoded
    g_mask = gi < g_end
    m2 = n_mask[:, None] & g_mask[None, :]
    w, s, z = _load_step(q_ptrs, s_ptrs, z_ptrs, m2[:, :, None], m2, FMT, SCALE_MUL)
    for g0 in range(g_begin, g_end, NG):
        q_ptrs += NG * WPG
        s_ptrs += NG
        z_ptrs += NG
        if EVEN_G:
            g_next = g0 + NG + rg * 0 < g_end  # the whole next step or none of it: one scalar test
        else:
            g_next = g0 + NG + rg < g_end
        nxt = n_mask[:, None] & g_next[None, :]
        w_next, s_next, z_next = _load_step(q_ptrs, s_ptrs, z_ptrs, nxt[:, :, None], nxt, FMT, SCALE_MUL)
        v = decode_codes(w, lut_ptr, magic, FMT, G, BLOCK_N, NG, INPLACE, NF4_PAIRS)
        if EVEN_G:
            xr = tl.load(x_ptrs)
        else:
            xr = tl.load(x_ptrs, mask=((g0 + rg) < g_end)[:, None], other=0)
        if X_PAIRS:
            x = tl.reshape(tl.join((xr << 16).to(tl.float32, bitcast=True),
                                   (xr & -65536).to(tl.float32, bitcast=True)), (NG, G))
        else:
            x = xr.to(tl.float32)
        x_ptrs += X_STEP
        acc += tl.sum(v * x[None, :, :], axis=2) * s  # [BN, NG]: the group's dot product, then its scale
        if FMT == ASYM_INT4:  # w = c * s + min: the min multiplies the group's sum of x
            acc += tl.sum(x, axis=1)[None, :] * z
        w, s, z = w_next, s_next, z_next
    y = tl.sum(acc, axis=1)
    tl.store(out_ptr + pid_s * stride_os + rn, cast(y, out_ptr.dtype.element_ty, SOFT_BF16), mask=rn < N)


@triton.jit
def _splitk_reduce(p_ptr, out_ptr, MN, SPLIT, SOFT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum over s of partial[s, i] (float32, in order), cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(SPLIT):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, cast(acc, out_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


def groups_per_split(n_groups: int, ng: int, split: int) -> tuple[int, int]:
    """(groups per split rounded up to whole K steps, number of splits that then cover K)."""
    per = triton.cdiv(triton.cdiv(n_groups, max(split, 1)), ng) * ng
    return per, triton.cdiv(n_groups, per)


@functools.cache
def soft_bf16() -> bool:
    """True under Triton's interpreter (see triton_common.cast): the kernels then run on CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_gemv_kernel, InterpretedFunction)


def reduce_splits(partial: Tensor, out: Tensor) -> Tensor:
    """Sum a [split, M, N] float32 workspace into `out` [M, N] (contiguous)."""
    mn = out.numel()
    block = 1024
    _splitk_reduce[(triton.cdiv(mn, block),)](partial, out, mn, partial.shape[0], SOFT_BF16=soft_bf16(),
                                               BLOCK=block, num_warps=4)
    return out


def gemv(x2d: Tensor, args: dict, cfg: GemvConfig, out: Tensor, partial: Tensor | None = None) -> Tensor:
    """out [1, N] = x2d [1, K] @ W.T with the weight in `args` (see triton_ops.format_args). `partial` is the
    float32 [split, 1, N] workspace when cfg.split > 1 (allocated here if None)."""
    m, k = x2d.shape
    n, g = args["n"], args["group_size"]
    assert m == 1 and x2d.stride(1) == 1, f"the decode kernel takes one contiguous row, got {tuple(x2d.shape)}"
    assert out.shape == (m, n) and out.is_contiguous(), "out must be a contiguous [M, N] tensor"
    per, split = groups_per_split(k // g, cfg.ng, cfg.split)
    if split > 1:
        if partial is None:
            partial = torch.empty((split, m, n), dtype=torch.float32, device=x2d.device)
        assert partial.shape == (split, m, n) and partial.dtype == torch.float32 and partial.is_contiguous()
        dest = partial
    else:
        dest = out
    grid = (triton.cdiv(n, cfg.block_n), split)
    pairs = cfg.pairs and args["fmt_id"] == NF4
    lut = args["lut2"] if pairs else args["lut"]
    _gemv_kernel[grid](x2d, args["q"], args["s"], args["z"], lut, dest, n, k, args["q"].stride(0), args["s"].stride(0),
                       n, per, _MAGIC.value, FMT=args["fmt_id"], G=g,
                       SCALE_MUL=args["scale_mul"], SOFT_BF16=soft_bf16(), BLOCK_N=cfg.block_n, NG=cfg.ng,
                       INPLACE=INPLACE, X_PAIRS=x2d.dtype == torch.bfloat16 and x2d.data_ptr() % 4 == 0,
                       EVEN_N=n % cfg.block_n == 0, EVEN_G=per % cfg.ng == 0 and (k // g) % cfg.ng == 0,
                       NF4_PAIRS=pairs, num_warps=cfg.warps)
    if split > 1:
        reduce_splits(partial, out)
    return out
