"""Matmul kernels for skinny (decode, 5-16 rows) and prefill/training shapes, two ways:

- `dot`: a fused GEMM. Each K step dequantizes a [BLOCK_N, BK] weight tile in registers (float32, rounded to the
  activation dtype like the reference path), and feeds it as the left operand of tl.dot against the transposed
  activation tile: acc[n, m] = W x^T. With the weight on the left, a 16-row activation is the narrow side of
  the product, which matrix units take natively (a swapped-operand skinny GEMM). Split-K for few tiles.
- `dequantize`: the weight into a workspace in the activation dtype, bit-identical to formats.dequantize, for
  the vendor matmul (torch.matmul) to consume; the dispatch chooses between the two per shape."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_gemv
from .triton_common import _MAGIC, ASYM_INT4, SYM_INT8, cast, decode_codes, load_tile
from .triton_gemv import _load_step, groups_per_split, reduce_splits, soft_bf16


@dataclass(frozen=True)
class DotConfig:
    """Tile BLOCK_M x BLOCK_N with NG groups per K step, warps, pipeline stages, K splits, L2 swizzle width."""

    block_m: int
    block_n: int
    ng: int
    warps: int
    stages: int
    split: int = 1
    group_m: int = 8


@triton.jit
def _dot_kernel(x_ptr, q_ptr, s_ptr, z_ptr, lut_ptr, out_ptr,
                M, N, K, stride_xm, stride_qn, stride_sn, stride_om, stride_os, groups_per_split, magic,
                FMT: tl.constexpr, G: tl.constexpr, SCALE_MUL: tl.constexpr, SOFT_BF16: tl.constexpr,
                DOT_F32: tl.constexpr, INPLACE: tl.constexpr, EVEN_N: tl.constexpr, EVEN_G: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr, GROUP_M: tl.constexpr):
    """EVEN_N / EVEN_G as in the GEMV: N divides into BLOCK_N, every K step is whole; the weight loads then need no
    masks. Pointers advance by constants per K step."""
    WPG: tl.constexpr = G // 8 if FMT < SYM_INT8 else G // 4  # code words per group and row
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n  # programs of GROUP_M row-tiles walk N together, so weight tiles are reused in L2
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    if EVEN_N:
        n_mask = rn == rn  # all true, folded by the compiler
    rg = tl.arange(0, NG)
    rk = tl.arange(0, NG * G)
    g_begin = pid_s * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, K // G)
    gi = g_begin + rg
    q_ptrs = q_ptr + rn[:, None, None] * stride_qn + gi[None, :, None] * WPG + tl.arange(0, WPG)[None, None, :]
    s_off = rn[:, None] * stride_sn + gi[None, :]
    s_ptrs, z_ptrs = s_ptr + s_off, z_ptr + s_off
    x_ptrs = x_ptr + rm[None, :] * stride_xm + (g_begin * G + rk)[:, None]  # [BK, BM]: x transposed
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for g0 in range(g_begin, g_end, NG):
        if EVEN_G:
            g_mask = rg == rg
            k_mask = rk == rk
        else:
            g_mask = g0 + rg < g_end
            k_mask = g0 * G + rk < g_end * G
        m2 = n_mask[:, None] & g_mask[None, :]
        w, s, z = _load_step(q_ptrs, s_ptrs, z_ptrs, m2[:, :, None], m2, FMT, SCALE_MUL)
        v = decode_codes(w, lut_ptr, magic, FMT, G, BLOCK_N, NG, INPLACE, False)
        if FMT == ASYM_INT4:
            w = v * s[:, :, None] + z[:, :, None]
        else:
            w = v * s[:, :, None]
        w = tl.reshape(w, (BLOCK_N, NG * G))
        xt = tl.load(x_ptrs, mask=m_mask[None, :] & k_mask[:, None], other=0.0)
        if DOT_F32:  # float32 activations, or bf16 under the interpreter (whose bf16 dot is not implemented)
            acc = tl.dot(cast(w, xt.dtype, SOFT_BF16).to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(xt.dtype), xt, acc)
        q_ptrs += NG * WPG
        s_ptrs += NG
        z_ptrs += NG
        x_ptrs += NG * G
    out = out_ptr + pid_s * stride_os + rm[None, :] * stride_om + rn[:, None]
    tl.store(out, cast(acc, out_ptr.dtype.element_ty, SOFT_BF16), mask=n_mask[:, None] & m_mask[None, :])


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, lut_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn, magic,
                    FMT: tl.constexpr, G: tl.constexpr, SCALE_MUL: tl.constexpr, SOFT_BF16: tl.constexpr,
                    BLOCK_N: tl.constexpr, NG: tl.constexpr, INPLACE: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    gi = tl.program_id(1) * NG + tl.arange(0, NG)
    n_mask = rn < N
    g_mask = gi < K // G
    v, s, z = load_tile(q_ptr, s_ptr, z_ptr, lut_ptr, rn, gi, n_mask, g_mask, stride_qn, stride_sn, magic,
                        FMT, G, SCALE_MUL, BLOCK_N, NG, INPLACE)
    if FMT == ASYM_INT4:
        w = v * s[:, :, None] + z[:, :, None]
    else:
        w = v * s[:, :, None]
    re = tl.arange(0, G)
    off = rn[:, None, None] * stride_wn + gi[None, :, None] * G + re[None, None, :]
    mask = (n_mask[:, None] & g_mask[None, :])[:, :, None]
    tl.store(w_ptr + off, cast(w, w_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


def dot(x2d: Tensor, args: dict, cfg: DotConfig, out: Tensor, partial: Tensor | None = None,
        dot_f32: bool = False) -> Tensor:
    """out [M, N] = x2d [M, K] @ W.T through the fused dequantize + tl.dot kernel."""
    m, k = x2d.shape
    n, g = args["n"], args["group_size"]
    assert out.shape == (m, n) and out.is_contiguous(), "out must be a contiguous [M, N] tensor"
    per, split = groups_per_split(k // g, cfg.ng, cfg.split)
    if split > 1:
        if partial is None:
            partial = torch.empty((split, m, n), dtype=torch.float32, device=x2d.device)
        assert partial.shape == (split, m, n) and partial.dtype == torch.float32 and partial.is_contiguous()
        dest, stride_s = partial, m * n
    else:
        dest, stride_s = out, 0
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    _dot_kernel[grid](x2d, args["q"], args["s"], args["z"], args["lut"], dest,
                      m, n, k, x2d.stride(0), args["q"].stride(0), args["s"].stride(0), n, stride_s, per,
                      _MAGIC.value, FMT=args["fmt_id"], G=g, SCALE_MUL=args["scale_mul"], SOFT_BF16=soft_bf16(),
                      DOT_F32=dot_f32, INPLACE=triton_gemv.INPLACE, EVEN_N=n % cfg.block_n == 0,
                      EVEN_G=per % cfg.ng == 0 and (k // g) % cfg.ng == 0,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NG=cfg.ng, GROUP_M=cfg.group_m,
                      num_warps=cfg.warps, num_stages=cfg.stages)
    if split > 1:
        reduce_splits(partial, out)
    return out


# A DotConfig that stands for "dequantize into a workspace, then the vendor matmul" among tuned candidates.
DEQUANT = DotConfig(0, 0, 0, 0, 0)


def dequant_matmul(x2d: Tensor, args: dict, out: Tensor) -> Tensor:
    """out = x2d @ W.T with W dequantized into a workspace of x2d's dtype, then torch.matmul (the vendor GEMM)."""
    w = dequantize(args, torch.empty((args["n"], x2d.shape[1]), dtype=x2d.dtype, device=x2d.device))
    return torch.matmul(x2d, w.t(), out=out)


def run(x2d: Tensor, args: dict, cfg: DotConfig, out: Tensor, dot_f32: bool = False) -> Tensor:
    """`dot` under cfg, or `dequant_matmul` when cfg is DEQUANT."""
    if cfg.block_m == 0:
        return dequant_matmul(x2d, args, out)
    return dot(x2d, args, cfg, out, dot_f32=dot_f32)


def dequantize(args: dict, out: Tensor, block_n: int = 32, ng: int = 4) -> Tensor:
    """The whole [N, K] weight into `out` (its dtype), bit-identical to the format's reference dequantize."""
    n, g = args["n"], args["group_size"]
    k = out.shape[1]
    assert out.shape == (n, k) and out.stride(1) == 1, "out must be an [N, K] tensor with contiguous rows"
    ng = max(1, min(ng, triton.next_power_of_2(k // g)))
    grid = (triton.cdiv(n, block_n), triton.cdiv(k // g, ng))
    _dequant_kernel[grid](args["q"], args["s"], args["z"], args["lut"], out, n, k,
                          args["q"].stride(0), args["s"].stride(0), out.stride(0), _MAGIC.value,
                          FMT=args["fmt_id"], G=g, SCALE_MUL=args["scale_mul"], SOFT_BF16=soft_bf16(),
                          BLOCK_N=block_n, NG=ng, INPLACE=triton_gemv.INPLACE, num_warps=4)
    return out
