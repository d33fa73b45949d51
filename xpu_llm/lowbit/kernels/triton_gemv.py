"""Decode kernel: fused dequantize + matrix-vector product for one activation row, on CUDA cores in float32.

Each program owns BLOCK_N output features and a range of K (split-K when N alone gives too few programs) and
reads its weight words once. Values are dequantized in float32 and the group scale is applied once per group
and row (sum_k v*x, then times s), so the weights keep full float32 precision (the matmul kernels round them to
the activation dtype first, as the reference path does). Partial sums of a split go to a float32 workspace
[split, M, N] that `_splitk_reduce` adds up in a fixed order (deterministic, no atomics)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import ASYM_INT4, SYM_INT4, SYM_INT8, _MAGIC, cast, decode, decode_inplace, load_raw


# Decode sym/asym int4 and sym_int8 with their fields in place (triton_common.decode_inplace: one instruction per
# weight fewer in the loop, sm_90 SASS); the results are the same bits either way.
INPLACE = True


@dataclass(frozen=True)
class GemvConfig:
    """BLOCK_N output rows per program, NG groups per K step, warps, and how many K splits."""

    block_n: int
    ng: int
    warps: int
    split: int = 1


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, lut_ptr, out_ptr, N, K, stride_qn, stride_sn, stride_os,
                 groups_per_split, magic, FMT: tl.constexpr, G: tl.constexpr, SCALE_MUL: tl.constexpr,
                 SOFT_BF16: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr, INPLACE: tl.constexpr,
                 X_PAIRS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rg = tl.arange(0, NG)
    re = tl.arange(0, G)
    g_begin = pid_s * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, K // G)
    acc = tl.zeros((BLOCK_N, NG), tl.float32)
    rh = tl.arange(0, G // 2)
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    IP: tl.constexpr = INPLACE and (FMT == SYM_INT4 or FMT == ASYM_INT4 or FMT == SYM_INT8)
    # software pipelining: the next step's words are in flight while this step is decoded
    w, s, z = load_raw(q_ptr, s_ptr, z_ptr, rn, g_begin + rg, n_mask, g_begin + rg < g_end, stride_qn, stride_sn,
                       FMT, G, SCALE_MUL)
    for g0 in range(g_begin, g_end, NG):
        gi = g0 + rg
        g_mask = gi < g_end
        w_next, s_next, z_next = load_raw(q_ptr, s_ptr, z_ptr, rn, gi + NG, n_mask, gi + NG < g_end, stride_qn,
                                          stride_sn, FMT, G, SCALE_MUL)
        if IP:
            v = decode_inplace(w, FMT, G, BLOCK_N, NG, magic)
        else:
            v = decode(w, lut_ptr, FMT, G, BLOCK_N, NG)
        if X_PAIRS:  # bf16 x read as int32 pairs, each half made float32 by one integer op before the values are
            # spread over the rows (converted by Triton, it was redone for every row a thread holds: 8.3 -> 6.6
            # instructions per weight in the loop, sm_90 SASS)
            p = tl.load(xw_ptr + gi[:, None] * (G // 2) + rh[None, :], mask=g_mask[:, None], other=0)
            x = tl.reshape(tl.join((p << 16).to(tl.float32, bitcast=True),
                                   (p & -65536).to(tl.float32, bitcast=True)), (NG, G))
        else:
            x = tl.load(x_ptr + gi[:, None] * G + re[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
        acc += tl.sum(v * x[None, :, :], axis=2) * s  # [BN, NG]: the group's dot product, then its scale
        if FMT == ASYM_INT4:  # w = c * s + min: the min multiplies the group's sum of x
            acc += tl.sum(x, axis=1)[None, :] * z
        w, s, z = w_next, s_next, z_next
    y = tl.sum(acc, axis=1)
    tl.store(out_ptr + pid_s * stride_os + rn, cast(y, out_ptr.dtype.element_ty, SOFT_BF16), mask=n_mask)


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
    _gemv_kernel[grid](x2d, args["q"], args["s"], args["z"], args["lut"], dest, n, k, args["q"].stride(0),
                       args["s"].stride(0), n, per, _MAGIC.value, FMT=args["fmt_id"], G=g,
                       SCALE_MUL=args["scale_mul"], SOFT_BF16=soft_bf16(), BLOCK_N=cfg.block_n, NG=cfg.ng,
                       INPLACE=INPLACE, X_PAIRS=x2d.dtype == torch.bfloat16 and x2d.data_ptr() % 4 == 0,
                       num_warps=cfg.warps)
    if split > 1:
        reduce_splits(partial, out)
    return out
