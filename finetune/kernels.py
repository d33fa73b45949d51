"""Triton kernels for training, forward and backward, each input read once per pass in float32 registers:
- RMSNorm, one row per program, with the Llama family's semantics: y = w * cast_x_dtype(x * rsqrt(mean(x^2) +
  eps)), the output in promote(x dtype, w dtype). Backward treats the cast as identity (as autograd does) and
  computes dx in float32; dw, for the rare trainable norm, is left to torch by the caller.
- SwiGLU, h = silu(g) * u elementwise, rounded once (Hugging Face rounds silu(g), then the product).
- Rotary embedding of q or k ([batch, heads, tokens, head_dim], any strides with contiguous head_dim) in HF's
  rotate_half convention, one token's heads per program, rounded once (HF rounds each of its five ops).
- Cross-entropy of a chunk of logits, one row per program: the row's loss (log-sum-exp in float32) and, in
  place of the logits, their gradient softmax - one-hot (finetune/loss.py).
Portable Triton only: the same source runs on NVIDIA and Intel GPUs, and on CPU tensors under TRITON_INTERPRET=1
(the tests)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..lowbit.kernels.triton_common import cast
from ..lowbit.kernels.triton_gemv import soft_bf16 as interpreting  # Triton runs interpreted (cached)

MAX_COLS = 65536  # one row per program, held in registers


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    xn = cast(x * rstd, x_ptr.dtype.element_ty, SOFT_BF16).to(tl.float32)  # HF rounds to x's dtype before w
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, cast(w * xn, y_ptr.dtype.element_ty, SOFT_BF16), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, n_cols, BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    xn = x * rstd
    g = dy * w
    dx = rstd * (g - xn * (tl.sum(g * xn, axis=0) / n_cols))
    tl.store(dx_ptr + row * n_cols + cols, cast(dx, dx_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


@triton.jit
def _swiglu_fwd(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, cast(g / (1.0 + tl.exp(-g)) * u, h_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


@triton.jit
def _swiglu_bwd(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(du_ptr + offs, cast(dh * g * sig, du_ptr.dtype.element_ty, SOFT_BF16), mask=mask)
    tl.store(dg_ptr + offs, cast(dh * u * sig * (1.0 + g * (1.0 - sig)), dg_ptr.dtype.element_ty, SOFT_BF16),
             mask=mask)


@triton.jit
def _rope(x_ptr, cos_ptr, sin_ptr, y_ptr, T, H, sx_b, sx_h, sx_t, sc_b, sc_t, sy_b, sy_h, sy_t,
          HALF: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr, SOFT_BF16: tl.constexpr):
    # y = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2.
    # Backward is the transpose: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1.
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // T, pid % T
    d = tl.arange(0, HALF)
    c = cos_ptr + b * sc_b + t * sc_t + d
    s = sin_ptr + b * sc_b + t * sc_t + d
    c1, c2 = tl.load(c).to(tl.float32)[None, :], tl.load(c + HALF).to(tl.float32)[None, :]
    s1, s2 = tl.load(s).to(tl.float32)[None, :], tl.load(s + HALF).to(tl.float32)[None, :]
    h = tl.arange(0, BLOCK_H)[:, None]
    mask = h < H
    xp = x_ptr + b * sx_b + t * sx_t + h * sx_h + d[None, :]
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    yp = y_ptr + b * sy_b + t * sy_t + h * sy_h + d[None, :]
    tl.store(yp, cast(y1, y_ptr.dtype.element_ty, SOFT_BF16), mask=mask)
    tl.store(yp + HALF, cast(y2, y_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


def rope_supported(x: Tensor, cos: Tensor) -> bool:
    """Whether the kernel takes x [B, H, T, D] with cos/sin [B or 1, T, D]: D even, D / 2 a power of two."""
    if x.dim() != 4 or cos.dim() != 3 or x.stride(-1) != 1 or cos.stride(-1) != 1:
        return False
    b, _, t, d = x.shape
    half = d // 2
    return (d % 2 == 0 and half >= 1 and half & (half - 1) == 0 and cos.shape[1:] == (t, d)
            and cos.shape[0] in (1, b))


def rope(x: Tensor, cos: Tensor, sin: Tensor, backward: bool = False, out: Tensor | None = None) -> Tensor:
    """x * cos + rotate_half(x) * sin (or, with backward=True, the gradient of that for an incoming gradient x),
    in x's dtype and layout, for x [B, H, T, D] and cos, sin [B or 1, T, D] (rope_supported)."""
    assert rope_supported(x, cos) and sin.shape == cos.shape and sin.stride() == cos.stride(), \
        f"rope: x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)} are not [B, H, T, D], [B, T, D]"
    b, h, t, d = x.shape
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.stride(-1) == 1, "out must be shaped like x, with contiguous head_dim"
    sc_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    if x.numel():
        _rope[(b * t,)](x, cos, sin, out, t, h, x.stride(0), x.stride(1), x.stride(2), sc_b, cos.stride(1),
                        out.stride(0), out.stride(1), out.stride(2), HALF=d // 2,
                        BLOCK_H=triton.next_power_of_2(h), BACKWARD=backward, SOFT_BF16=interpreting(),
                        num_warps=4)
    return out


SWIGLU_BLOCK = 1024


def swiglu_forward(g: Tensor, u: Tensor, out: Tensor | None = None) -> Tensor:
    """silu(g) * u for contiguous g, u of one shape, in promote(g dtype, u dtype)."""
    assert g.shape == u.shape and g.is_contiguous() and u.is_contiguous(), \
        f"gate {tuple(g.shape)} and up {tuple(u.shape)} must be contiguous and of one shape"
    if out is None:
        out = torch.empty_like(g, dtype=torch.promote_types(g.dtype, u.dtype))
    n = g.numel()
    if n:
        _swiglu_fwd[(triton.cdiv(n, SWIGLU_BLOCK),)](g, u, out, n, BLOCK=SWIGLU_BLOCK, num_warps=4,
                                                       SOFT_BF16=interpreting())
    return out


def swiglu_backward(dh: Tensor, g: Tensor, u: Tensor,
                    out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(dg, du) of h = silu(g) * u, in g's and u's dtypes."""
    dh = dh.contiguous()
    dg, du = out if out is not None else (torch.empty_like(g), torch.empty_like(u))
    n = g.numel()
    if n:
        _swiglu_bwd[(triton.cdiv(n, SWIGLU_BLOCK),)](dh, g, u, dg, du, n, BLOCK=SWIGLU_BLOCK, num_warps=4,
                                                       SOFT_BF16=interpreting())
    return dg, du


def _launch(n_cols: int) -> dict:
    block = triton.next_power_of_2(n_cols)
    return dict(BLOCK=block, num_warps=min(16, max(1, block // 512)), SOFT_BF16=interpreting())


def rms_norm_forward(x2d: Tensor, weight: Tensor, eps: float, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """y [rows, n] and the float32 rstd [rows] of contiguous x2d [rows, n]."""
    rows, n = x2d.shape
    assert x2d.is_contiguous() and weight.shape == (n,), f"x {tuple(x2d.shape)} and weight {tuple(weight.shape)}"
    assert n <= MAX_COLS, f"RMSNorm over {n} features: the fused kernel holds a row in registers (<= {MAX_COLS})"
    if out is None:
        out = torch.empty_like(x2d, dtype=torch.promote_types(x2d.dtype, weight.dtype))
    rstd = torch.empty(rows, device=x2d.device, dtype=torch.float32)
    if rows:
        _rms_norm_fwd[(rows,)](x2d, weight, out, rstd, n, eps, **_launch(n))
    return out, rstd


def rms_norm_backward(dy2d: Tensor, x2d: Tensor, weight: Tensor, rstd: Tensor, out: Tensor | None = None) -> Tensor:
    """dx [rows, n] (x's dtype) from dy [rows, n] and the forward's rstd."""
    rows, n = x2d.shape
    dy2d = dy2d.contiguous()
    if out is None:
        out = torch.empty_like(x2d)
    if rows:
        _rms_norm_bwd[(rows,)](dy2d, x2d, weight, rstd, out, n, **_launch(n))
    return out


CE_BLOCK = 4096


@triton.jit
def _cross_entropy_rows(z_ptr, t_ptr, loss_ptr, n_cols, GRAD: tl.constexpr, BLOCK: tl.constexpr,
                        SOFT_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * n_cols
    m = tl.full([BLOCK], -1e30, tl.float32)  # finite: masked lanes (-inf) add exp(-inf) = 0, never NaN
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):  # online log-sum-exp, lane by lane
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    top = tl.max(m, axis=0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
    t = tl.load(t_ptr + row)
    tl.store(loss_ptr + row, lse - tl.load(base + t).to(tl.float32))
    if GRAD:
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(z - lse) - tl.where(cols == t, 1.0, 0.0)
            tl.store(base + cols, cast(p, z_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


def cross_entropy_rows_(logits: Tensor, targets: Tensor, grad: bool = True) -> Tensor:
    """Per-row cross-entropy (float32 [rows]) of contiguous logits [rows, vocab] against targets [rows] (each in
    range); with grad, the logits are overwritten by d loss_row / d logits = softmax - one-hot, rounded once to
    their dtype (what autograd's gradient of a float32 cross-entropy rounds to before the head's matmul)."""
    rows, n = logits.shape
    assert logits.is_contiguous() and targets.shape == (rows,), \
        f"logits {tuple(logits.shape)} must be contiguous and targets {tuple(targets.shape)} one per row"
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows:
        _cross_entropy_rows[(rows,)](logits, targets, loss, n, GRAD=grad,
                                     BLOCK=min(CE_BLOCK, triton.next_power_of_2(n)), num_warps=8,
                                     SOFT_BF16=interpreting())
    return loss
