"""A LoRA-adapted low-bit linear as one autograd node: y = base(x) + scaling * dropout(x) @ A^T @ B^T.

Built from separate pieces (FrozenMatmul, the dropout-A product, a cast of B, an in-place addmm), one adapted
linear makes five autograd nodes, and its backward two input gradients that autograd then adds (a [tokens,
in_features] pass each). An 8B QLoRA step runs 224 such linears forward, again in recompute and backward, and
waits on the host on most lent H200 machines (a one-off cProfile: ~1,500 Triton launches a step). Here
the forward makes the same kernels under one node; the backward computes the base's input gradient and lets the
dropout-A backward kernel add its own into it (no separate add, no second [tokens, in_features] tensor).

Numerics are those of the pieces: A and B rounded to x's dtype (as autocast casts them), the LoRA update added
to the base output by one addmm, B's gradient rounded to x's dtype before float32 (as through autocast's cast);
x's gradient is rounded once instead of twice. Linears that read the same input (q/k/v, gate/up) can share one
node (`lora_linears`): one dropout-A launch for all of them each way, and one input gradient for the group; a
single linear is the group of one. `LowBitLoraLinear` uses it for a plain LoRA adapter on a LowBitLinear without
bias when Triton's kernels take the input (see `applies`); everything else keeps the pieces.

Measured on an H200 (benchmarks/qlora.py, 8B shape, 8 layers not recomputed, two machines of the same host
speed): device time per step 335 -> 327 ms, 9596 -> 10038 tokens/s."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lowbit.linear import LowBitLinear, keeps_weight
from . import lora_dropout as kd


def applies(base: nn.Module, a: nn.Module, b: nn.Module, dropout: nn.Module, x2d: Tensor) -> bool:
    """Whether `lora_linear` computes this adapter: a LowBitLinear base without bias, plain nn.Linear A and B without
    bias and not partitioned (ZeRO-3), dropout off or an active nn.Dropout with 0 < p < 1, and an input the
    kernels take (bf16 / fp16, contiguous 2-D), with autograd recording."""
    return (type(base) is LowBitLinear and base.bias is None and type(a) is nn.Linear and type(b) is nn.Linear
            and a.bias is None and b.bias is None and not hasattr(a.weight, "ds_id")
            and not hasattr(b.weight, "ds_id") and dropout_p(dropout) is not None and kd.supported(x2d, a.weight)
            and torch.is_grad_enabled())


def dropout_p(dropout: nn.Module) -> float | None:
    """The dropout probability that `dropout` applies now: 0 for nn.Identity or an inactive nn.Dropout, p for an
    active nn.Dropout with 0 < p < 1, None for anything else (p = 1, other modules)."""
    if type(dropout) is nn.Identity:
        return 0.0
    if type(dropout) is nn.Dropout:
        if not dropout.training or dropout.p == 0:
            return 0.0
        return dropout.p if 0 < dropout.p < 1 else None
    return None


def lora_linear(x2d: Tensor, base: nn.Module, matmul: Callable[[Tensor, nn.Module], Tensor], a_weight: Tensor,
                b_weight: Tensor, p: float, scaling: float) -> Tensor:
    """base(x2d) + scaling * dropout(x2d, p) @ a_weight^T @ b_weight^T as one autograd node (see the module
    docstring); `matmul(x2d, base)` is the base's product. Call it when `applies` holds."""
    return lora_linears(x2d, (base,), matmul, (a_weight,), (b_weight,), p, (scaling,))[0]


def lora_linears(x2d: Tensor, bases: Sequence[nn.Module], matmul: Callable[[Tensor, nn.Module], Tensor],
                 a_weights: Sequence[Tensor], b_weights: Sequence[Tensor], p: float,
                 scalings: Sequence[float]) -> tuple[Tensor, ...]:
    """`lora_linear` for up to three adapted linears that read the same x2d (q/k/v, gate/up) as one autograd node:
    their products as one call each would give them, each adapter under its own dropout mask, but one dropout-A
    launch for all of them forward and one backward, and their input gradients summed into one tensor (the base
    products by addmm, the adapters' inside the dropout kernel) instead of by autograd's adds. Each adapter needs
    `applies` to hold, and all of them the same rank and p."""
    n = len(bases)
    assert 1 <= n <= kd.MAX_ADAPTERS and len(a_weights) == len(b_weights) == len(scalings) == n, (
        f"1 to {kd.MAX_ADAPTERS} linears with an A, a B and a scaling each")
    assert len({a.shape[0] for a in a_weights}) == 1, "the adapters must have the same rank"
    return LoraLinearFunction.apply(x2d, tuple(bases), matmul, p, tuple(scalings),
                                    tuple(keeps_weight(b) for b in bases), *a_weights, *b_weights)


def _cat(parts: list[Tensor], dim: int = 0) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


class LoraLinearFunction(torch.autograd.Function):
    """See lora_linears. Saves x2d, the As stacked, the Bs in x's dtype, the [tokens, n*r] product h and, in a
    checkpointed block, the dequantized base weights."""

    @staticmethod
    def forward(ctx, x2d: Tensor, bases: tuple[nn.Module, ...], matmul, p: float, scalings: tuple[float, ...],
                keep_w: tuple[bool, ...], *weights: Tensor) -> tuple[Tensor, ...]:
        n, dtype = len(bases), x2d.dtype
        ws = [base.dequantize_weight(dtype) if keep else None for base, keep in zip(bases, keep_w)]
        outs = [F.linear(x2d, w) if w is not None else matmul(x2d, base) for base, w in zip(bases, ws)]
        a = _cat([w.detach() for w in weights[:n]]).contiguous()
        r = a.shape[0] // n
        seeds = tuple(kd.draw_seed() for _ in range(n)) if p > 0 else ()  # in order: the masks of n calls
        h = kd.forward(x2d, a, seeds, p) if p > 0 else x2d @ a.to(dtype).t()
        bs = [w.detach().to(dtype) for w in weights[n:]]
        for i, (out, b, s) in enumerate(zip(outs, bs, scalings)):
            out.addmm_(h[:, i * r:(i + 1) * r], b.t(), alpha=s)
        ctx.save_for_backward(x2d, a, h, *bs, *ws)
        ctx.n, ctx.bases, ctx.seeds, ctx.p, ctx.scalings = n, bases, seeds, p, scalings
        ctx.dtypes = [w.dtype for w in weights]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *douts: Tensor):
        n = ctx.n
        x2d, a, h, *rest = ctx.saved_tensors
        bs, ws = rest[:n], rest[n:]
        want_dx, want_a, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[6:6 + n], ctx.needs_input_grad[6 + n:]
        r = a.shape[0] // n
        douts = [d.contiguous() for d in douts]
        dh = _cat([torch.mm(d, b).mul_(s) for d, b, s in zip(douts, bs, ctx.scalings)], 1)
        dbs = [torch.mm(h[:, i * r:(i + 1) * r].t(), d).mul_(s).t().to(dt) if want else None
               for i, (d, s, dt, want) in enumerate(zip(douts, ctx.scalings, ctx.dtypes[n:], want_b))]
        dx = da = None
        if want_dx:
            for d, w, base in zip(douts, ws, ctx.bases):
                w = (w if w is not None else base.dequantize_weight(d.dtype)).to(d.dtype)
                dx = torch.mm(d, w) if dx is None else dx.addmm_(d, w)
                del w  # before the next one is dequantized
        if ctx.p > 0:
            if want_dx or any(want_a):
                dx, da = kd.backward(dh, x2d, a, ctx.seeds, ctx.p, want_dx, any(want_a), dx=dx)
        else:
            if want_dx:
                dx.addmm_(dh, a.to(dh.dtype))
            if any(want_a):
                da = torch.mm(dh.t(), x2d)
        das = [da[i * r:(i + 1) * r].to(dt) if want else None
               for i, (dt, want) in enumerate(zip(ctx.dtypes[:n], want_a))]
        return dx, None, None, None, None, None, *das, *dbs
