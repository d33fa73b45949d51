"""LoRA's input dropout fused into its A product: h = (dropout(x) @ A^T), forward and backward, without writing
the dropped-out input or its mask.

PEFT computes lora_A(dropout(x)) for every adapted linear: a pass that writes x * mask / (1 - p) and a boolean
mask over the whole [tokens, in_features] input, which autograd then keeps for the backward of A (and, with
gradient checkpointing, recomputes). At the Llama-3-8B shape with r 16 that is 7 such tensors per layer (the
q/k/v and gate/up projections each draw their own mask over the same input): on an H200 a layer that is not
recomputed kept 0.74 GiB with them and 0.46 GiB without, and writing and reading them took ~25 ms of a 0.4 s
step. Here the mask is a pure function of (seed, row, column): each kernel that needs it draws it again in
registers (Philox-4x32 with 7 rounds, the fewest that Salmon et al. 2011 report passing BigCrush; PyTorch uses
10; 16 bits per element, 8 elements per Philox call), so the forward reads x once and the backward keeps only x,
which the caller holds anyway, and one integer seed.

The seed is drawn from torch's CPU generator when the forward runs, so `torch.manual_seed` fixes the masks, and
activation checkpointing (which restores the RNG states before it recomputes) replays them. p is rounded to a
multiple of 2^-16 (at most 7.6e-6 off) and the kept values are scaled by 1 / (1 - that p), so the expectation is
exactly x. The masks are not PEFT's (another random stream), only distributed like them.

Measured on an H200 (8B shape, benchmarks/qlora.py, 4 layers not recomputed): device time per step 368 -> 344
ms, peak 15.26 -> 14.32 GiB; but its launches cost host time, which bounds that step on those machines, so the
wall time of that configuration got worse; the memory saved buys more layers not recomputed instead (8 at
16.17 GiB), the fastest configuration within bitsandbytes' peak. XPU_LLM_FUSED_LORA_DROPOUT=0 restores PEFT's
own dropout and A.

The forward splits K into column ranges (forward_splits) when its BT-row programs alone are too few to keep loads
in flight (T 4096: 256 programs on 132 SMs); each writes a float32 partial and the last program of a row block to
arrive (an atomic counter, reset by that program) adds them in split order, so there is no extra launch and the
result is deterministic. On an H200 at T 4096, r 16 (a one-off timing with triton.testing.do_bench): K 4096 47.0
-> 29.6 us, K 14336 111.5 -> 79.9 us; an 8B QLoRA step's dropout kernels ~29 -> 25 ms (20 layers not recomputed).

Adapters of linears that read the same input (q/k/v, gate/up) can share a launch: their As stacked, a seed each
(`forward(x, a, seeds, p)`). The forward gives each its own program along the grid's third axis, with the values
of one call each; the backward reads x once, draws every adapter's mask in registers and writes the sum of their
input gradients once. lora_linear.lora_linears uses it.

Portable Triton: the same source runs on NVIDIA and Intel GPUs and, under TRITON_INTERPRET=1, on CPU tensors
(the tests)."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..lowbit.kernels.triton_common import cast
from ..lowbit.kernels.triton_gemv import soft_bf16 as interpreting

COLS = 64  # the mask is drawn per block of 64 columns of one row; every kernel tiles the input's columns by it
ROUNDS = 7  # Philox rounds
DTYPES = (torch.bfloat16, torch.float16)
# (rows per program or step, warps) of the forward and the backward; the backward's software-pipeline stages
# and programs per SM (row splits x column blocks). An H200 sweep (8B shapes, T 4096, r 16): the forward's best
# tile was this one within 2%; the backward's took 54 -> 45 us (K 4096) and 138 -> 130 us (K 14336).
FWD, BWD = (16, 4), (64, 8)
FWD_PROGRAMS_PER_SM = 8  # the forward's column splits aim at this many programs per SM (forward_splits)
BWD_STAGES, BWD_PROGRAMS_PER_SM = 2, 8


def threshold(p: float) -> int:
    """p in 16-bit units: an element is kept when its 16 random bits are >= this."""
    assert 0.0 <= p < 1.0, f"dropout probability must be in [0, 1), got {p}"
    return min(round(p * 65536), 65535)


def keep_scale(p: float) -> float:
    """1 / (1 - p as the kernels apply it)."""
    return 65536.0 / (65536 - threshold(p))


@triton.jit
def _keep(seed, rows, kb, n_kb, p16, BT: tl.constexpr, ROUNDS: tl.constexpr):
    """Keep mask [BT, 64] (64 = COLS) of rows `rows` [BT] (int64) in column block kb: one Philox call per 8
    elements, its four 32-bit words split into 16-bit halves. The joins below define which bits feed which
    column; every kernel draws a block the same way, whatever its tile of rows."""
    lane = tl.arange(0, 8)
    off = (rows[:, None] * n_kb + kb) * 8 + lane[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, off, ROUNDS)
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BT, 32))
    h = tl.reshape(tl.join(r & 0xFFFF, r >> 16), (BT, 64)).to(tl.int32)
    return h >= p16


@triton.jit
def _dot(a, b, acc, SOFT_BF16: tl.constexpr):
    if SOFT_BF16:  # the interpreter multiplies in float32 (numpy has no bfloat16)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit(do_not_specialize=["seed0", "seed1", "seed2"])
def _lora_dropout_fwd(x_ptr, a_ptr, seed0, seed1, seed2, h_ptr, part_ptr, count_ptr, T, K, R, n_kb, kb_per_split,
                      p16, scale, BT: tl.constexpr, RP: tl.constexpr, ROUNDS: tl.constexpr,
                      SOFT_BF16: tl.constexpr, SPLIT: tl.constexpr):
    """h [T, G*R] = (x * keep_g) [T, K] @ a_g^T [K, R] * scale for each adapter g < G (grid axis 2, G <= 3: a is
    the adapters' A stacked [G*R, K], seed_g draws adapter g's mask), with a rounded to x's dtype (as autocast
    casts A for its matmul); a program owns BT rows, one adapter and `kb_per_split` column blocks. SPLIT: each
    program stores its float32 partial sum in part [G, splits, T, R] and counts itself in count[adapter, row
    block]; the last of a row block to arrive adds the partials in split order (deterministic), writes h and
    resets its counter to 0 for the next call."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BT + tl.arange(0, BT)
    split = tl.program_id(1)
    g = tl.program_id(2)
    seed = tl.where(g == 0, seed0, tl.where(g == 1, seed1, seed2))
    rs = R * tl.num_programs(2)  # h's row stride
    cols = tl.arange(0, 64)
    rr = tl.arange(0, RP)
    acc = tl.zeros((BT, RP), tl.float32)
    for kb in range(split * kb_per_split, tl.minimum((split + 1) * kb_per_split, n_kb)):
        k = kb * 64 + cols
        x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=(rows < T)[:, None] & (k < K)[None, :], other=0.0)
        x = tl.where(_keep(seed, rows, kb, n_kb, p16, BT, ROUNDS), x, 0.0)
        at = tl.load(a_ptr + (g * R + rr[None, :]) * K + k[:, None], mask=(rr < R)[None, :] & (k < K)[:, None],
                     other=0.0)
        acc = _dot(x, cast(at.to(tl.float32), x_ptr.dtype.element_ty, SOFT_BF16), acc, SOFT_BF16)
    out = (rows < T)[:, None] & (rr < R)[None, :]
    h_at = h_ptr + rows[:, None] * rs + g * R + rr[None, :]
    if SPLIT:
        n_split = tl.num_programs(1)
        part_at = part_ptr + ((g * n_split + split) * T + rows[:, None]) * R + rr[None, :]
        tl.store(part_at, acc, mask=out)
        counter = count_ptr + g * tl.num_programs(0) + pid
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == n_split - 1:
            acc = tl.zeros((BT, RP), tl.float32)
            for j in range(0, n_split):
                acc += tl.load(part_at + (j - split) * T * R, mask=out, other=0.0)
            tl.store(h_at, cast(acc * scale, h_ptr.dtype.element_ty, SOFT_BF16), mask=out)
            tl.atomic_xchg(counter, 0)
    else:
        tl.store(h_at, cast(acc * scale, h_ptr.dtype.element_ty, SOFT_BF16), mask=out)


@triton.jit
def _a_tile(a_ptr, g, R, K, k, RP: tl.constexpr, dtype: tl.constexpr, SOFT_BF16: tl.constexpr, WANT: tl.constexpr):
    """Adapter g's A [RP, 64] at columns k in `dtype` (zeros when not WANT: a placeholder never read)."""
    rr = tl.arange(0, RP)
    if WANT:
        a = tl.load(a_ptr + (g * R + rr[:, None]) * K + k[None, :], mask=(rr < R)[:, None] & (k < K)[None, :],
                    other=0.0)
        a = cast(a.to(tl.float32), dtype, SOFT_BF16)
    else:
        a = tl.zeros((RP, 64), dtype)
    return a


@triton.jit
def _bwd_adapter(dh_ptr, x, a, seed, g, rows, rm, kb, n_kb, p16, scale, R, dx, da, BT: tl.constexpr,
                 RP: tl.constexpr, ROUNDS: tl.constexpr, SOFT_BF16: tl.constexpr, WANT_DX: tl.constexpr,
                 WANT_DA: tl.constexpr, G: tl.constexpr):
    """Adapter g's share of a row block: dx += (dh_g @ a_g) * keep_g * scale, da += dh_g^T @ (x * keep_g)."""
    rr = tl.arange(0, RP)
    keep = _keep(seed, rows, kb, n_kb, p16, BT, ROUNDS)
    dh = tl.load(dh_ptr + rows[:, None] * (G * R) + g * R + rr[None, :], mask=rm[:, None] & (rr < R)[None, :],
                 other=0.0)
    if WANT_DX:
        dx += tl.where(keep, _dot(dh, a, tl.zeros((BT, 64), tl.float32), SOFT_BF16) * scale, 0.0)
    if WANT_DA:
        da = _dot(tl.trans(dh), tl.where(keep, x, 0.0), da, SOFT_BF16)
    return dx, da


@triton.jit(do_not_specialize=["seed0", "seed1", "seed2"])
def _lora_dropout_bwd(dh_ptr, x_ptr, a_ptr, seed0, seed1, seed2, dx_ptr, part_ptr, T, K, R, n_kb, rows_per_split,
                      p16, scale, BT: tl.constexpr, RP: tl.constexpr, ROUNDS: tl.constexpr,
                      SOFT_BF16: tl.constexpr, WANT_DX: tl.constexpr, WANT_DA: tl.constexpr, ACCUM: tl.constexpr,
                      G: tl.constexpr):
    """The gradients of _lora_dropout_fwd for its G adapters in one pass over x: dx [T, K] = sum over g of
    (dh_g @ a_g) * keep_g * scale (added to what dx holds when ACCUM, e.g. the base layers' input gradient, in
    float32 before one rounding), and part[s, g*R:(g+1)*R, block] = scale * dh_g[rows of s]^T @ (x *
    keep_g)[rows of s, block] (float32 partial sums of each A's gradient). dh is [T, G*R]. A program owns one
    split of the rows and one column block."""
    s = tl.program_id(0)
    kb = tl.program_id(1)
    k = kb * 64 + tl.arange(0, 64)
    rr = tl.arange(0, RP)
    dt = dh_ptr.dtype.element_ty
    a0 = _a_tile(a_ptr, 0, R, K, k, RP, dt, SOFT_BF16, WANT_DX)
    a1 = _a_tile(a_ptr, 1, R, K, k, RP, dt, SOFT_BF16, WANT_DX and G >= 2)
    a2 = _a_tile(a_ptr, 2, R, K, k, RP, dt, SOFT_BF16, WANT_DX and G >= 3)
    da0 = tl.zeros((RP, 64), tl.float32)
    da1 = tl.zeros((RP, 64), tl.float32)
    da2 = tl.zeros((RP, 64), tl.float32)
    r_begin = s.to(tl.int64) * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, T)
    for r0 in range(r_begin, r_end, BT):
        rows = r0 + tl.arange(0, BT)
        rm = rows < r_end
        xm = rm[:, None] & (k < K)[None, :]
        if WANT_DA:
            x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=xm, other=0.0)
        else:
            x = tl.zeros((BT, 64), x_ptr.dtype.element_ty)
        dx = tl.zeros((BT, 64), tl.float32)
        dx, da0 = _bwd_adapter(dh_ptr, x, a0, seed0, 0, rows, rm, kb, n_kb, p16, scale, R, dx, da0, BT, RP, ROUNDS,
                               SOFT_BF16, WANT_DX, WANT_DA, G)
        if G >= 2:
            dx, da1 = _bwd_adapter(dh_ptr, x, a1, seed1, 1, rows, rm, kb, n_kb, p16, scale, R, dx, da1, BT, RP,
                                   ROUNDS, SOFT_BF16, WANT_DX, WANT_DA, G)
        if G >= 3:
            dx, da2 = _bwd_adapter(dh_ptr, x, a2, seed2, 2, rows, rm, kb, n_kb, p16, scale, R, dx, da2, BT, RP,
                                   ROUNDS, SOFT_BF16, WANT_DX, WANT_DA, G)
        if WANT_DX:
            if ACCUM:
                dx += tl.load(dx_ptr + rows[:, None] * K + k[None, :], mask=xm, other=0.0).to(tl.float32)
            tl.store(dx_ptr + rows[:, None] * K + k[None, :], cast(dx, dx_ptr.dtype.element_ty, SOFT_BF16), mask=xm)
    if WANT_DA:
        part = part_ptr + (s * G * R + rr[:, None]) * K + k[None, :]
        pm = (rr < R)[:, None] & (k < K)[None, :]
        tl.store(part, da0 * scale, mask=pm)
        if G >= 2:
            tl.store(part + R * K, da1 * scale, mask=pm)
        if G >= 3:
            tl.store(part + 2 * R * K, da2 * scale, mask=pm)


@triton.jit(do_not_specialize=["seed"])
def _lora_dropout_mask(seed, out_ptr, T, K, n_kb, p16, BT: tl.constexpr, ROUNDS: tl.constexpr):
    """The keep mask itself as uint8 [T, K] (tests and inspection; training never writes it)."""
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    kb = tl.program_id(1)
    k = kb * 64 + tl.arange(0, 64)
    keep = _keep(seed, rows, kb, n_kb, p16, BT, ROUNDS)
    tl.store(out_ptr + rows[:, None] * K + k[None, :], keep.to(tl.uint8), mask=(rows < T)[:, None] & (k < K)[None, :])


def _rank_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


@functools.cache
def _sm_count(device: torch.device) -> int:
    from ..device import device_module
    mod = device_module(device)
    props = getattr(mod, "get_device_properties", None) if mod is not None else None
    if props is None:
        return 4
    p = props(device)
    return getattr(p, "multi_processor_count", None) or getattr(p, "gpu_subslice_count", None) or 64


def supported(x2d: Tensor, a: Tensor) -> bool:
    """Shapes and dtypes the kernels take: a contiguous 2-D bf16 / fp16 input, A [R <= 128, K] of the same K."""
    return (x2d.dim() == 2 and x2d.is_contiguous() and x2d.dtype in DTYPES and a.dim() == 2
            and a.shape[1] == x2d.shape[1] and a.shape[0] <= 128 and x2d.shape[0] > 0)


def forward_splits(t: int, k: int, device: torch.device) -> int:
    """How many ranges of columns the forward splits K into: enough programs (FWD_PROGRAMS_PER_SM per SM) that
    the device has loads in flight to hide memory latency, which BT-row programs alone do not give at T 4096."""
    n_kb, programs = triton.cdiv(k, COLS), triton.cdiv(t, FWD[0])
    return max(1, min(n_kb, triton.cdiv(FWD_PROGRAMS_PER_SM * _sm_count(device), programs)))


MAX_ADAPTERS = 3  # adapters one launch serves (q/k/v, gate/up): the kernels hold one set of registers for each


def _seeds(seed: int | Sequence[int], a: Tensor) -> tuple[tuple[int, int, int], int, int]:
    """(three seed arguments, adapters G, rank R) for one seed or one seed per adapter of a stacked [G*R, K]."""
    seeds = (seed,) if isinstance(seed, int) else tuple(seed)
    g = len(seeds)
    assert 1 <= g <= MAX_ADAPTERS and a.shape[0] % g == 0, (
        f"{g} seeds for A of {a.shape[0]} rows: give 1 to {MAX_ADAPTERS} seeds, one per adapter of equal rank")
    return (*seeds, *seeds[:1] * (MAX_ADAPTERS - g)), g, a.shape[0] // g  # unused seeds: int64 like the rest


def forward(x2d: Tensor, a: Tensor, seed: int | Sequence[int], p: float, splits: int | None = None) -> Tensor:
    """dropout(x2d) @ a^T with the mask of `seed` (see draw_seed); a contiguous, any float dtype. With a seed per
    adapter, a is the adapters' A stacked [G*R, K] and the result [T, G*R] holds each adapter's product, under its
    own mask, in its R columns: one launch, the same values as one call per adapter. The columns are split `splits`
    ways (None: forward_splits) into float32 partial sums added in a fixed order."""
    (s0, s1, s2), n, r = _seeds(seed, a)
    t, k = x2d.shape
    bt, warps = FWD
    n_kb = triton.cdiv(k, COLS)
    per = triton.cdiv(n_kb, splits or forward_splits(t, k, x2d.device))
    splits, programs = triton.cdiv(n_kb, per), triton.cdiv(t, bt)
    h = torch.empty((t, n * r), dtype=x2d.dtype, device=x2d.device)
    part = torch.empty((n, splits, t, r), dtype=torch.float32, device=x2d.device) if splits > 1 else h
    count = _counters(x2d.device, n * programs) if splits > 1 else h
    _lora_dropout_fwd[(programs, splits, n)](x2d, a, s0, s1, s2, h, part, count, t, k, r, n_kb, per, threshold(p),
                                             keep_scale(p), BT=bt, RP=_rank_pad(r), ROUNDS=ROUNDS,
                                             SOFT_BF16=interpreting(), SPLIT=splits > 1, num_warps=warps)
    return h


_COUNTERS: dict[torch.device, Tensor] = {}


def _counters(device: torch.device, n: int) -> Tensor:
    """n int32 arrival counters on `device`, zero between calls (each forward's last program resets its own);
    allocated once per device and grown when needed, so a call launches no zeroing kernel. One stream at a time
    (the training step's)."""
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        c = _COUNTERS[device] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return c


def backward(dh: Tensor, x2d: Tensor, a: Tensor, seed: int | Sequence[int], p: float, want_dx: bool = True,
             want_da: bool = True, dx: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of h = forward(x2d, a, seed, p) for the incoming dh [T, G*R] (contiguous): x2d's, the sum over
    adapters of (dh_g @ a_g) * keep_g / (1 - p) in x2d's dtype (added into `dx` in place when given: contiguous,
    x2d's shape and dtype), and a's [G*R, K], dh_g^T @ (x2d * keep_g) / (1 - p) in float32. x is read once for
    all adapters. The rows are split over enough programs to fill the device; a's float32 partial sums are added
    in a fixed order (deterministic)."""
    (s0, s1, s2), n, r = _seeds(seed, a)
    t = dh.shape[0]
    k = x2d.shape[1]
    assert dh.shape == (t, n * r) and dh.is_contiguous(), f"dh must be a contiguous [{t}, {n * r}] tensor"
    (bt, warps), n_kb = BWD, triton.cdiv(k, COLS)
    splits = max(1, min(triton.cdiv(BWD_PROGRAMS_PER_SM * _sm_count(x2d.device), n_kb), triton.cdiv(t, 4 * bt)))
    per = triton.cdiv(triton.cdiv(t, splits), bt) * bt
    splits = triton.cdiv(t, per)
    accum = dx is not None
    if accum:
        assert want_dx and dx.shape == x2d.shape and dx.dtype == x2d.dtype and dx.is_contiguous(), (
            f"dx to add into must be contiguous {tuple(x2d.shape)} {x2d.dtype}, got {tuple(dx.shape)} {dx.dtype}")
    elif want_dx:
        dx = torch.empty((t, k), dtype=x2d.dtype, device=x2d.device)
    part = torch.empty((splits, n * r, k), dtype=torch.float32, device=x2d.device) if want_da else None
    _lora_dropout_bwd[(splits, n_kb)](dh, x2d, a, s0, s1, s2, dx, part, t, k, r, n_kb, per, threshold(p),
                                      keep_scale(p), BT=bt, RP=_rank_pad(r), ROUNDS=ROUNDS, SOFT_BF16=interpreting(),
                                      WANT_DX=want_dx, WANT_DA=want_da, ACCUM=accum, G=n, num_warps=warps,
                                      num_stages=BWD_STAGES)
    return dx, None if part is None else part[0] if splits == 1 else part.sum(0)


def keep_mask(seed: int, rows: int, cols: int, p: float, device: torch.device) -> Tensor:
    """The keep mask [rows, cols] (bool) that `seed` gives the kernels above."""
    out = torch.empty((rows, cols), dtype=torch.uint8, device=device)
    bt, n_kb = 16, triton.cdiv(cols, COLS)
    _lora_dropout_mask[(triton.cdiv(rows, bt), n_kb)](seed, out, rows, cols, n_kb, threshold(p), BT=bt,
                                                      ROUNDS=ROUNDS)
    return out.bool()


def draw_seed() -> int:
    """A seed from torch's CPU generator: fixed by torch.manual_seed and replayed by checkpoint recomputation
    (which restores the CPU RNG state too); no device work, no sync. In [2^32, 2^62), so the kernels always take it
    as one int64 argument (no recompilation per value)."""
    return int(torch.randint(1 << 32, 1 << 62, (1,)).item())


def dropout_lora_a(x2d: Tensor, a_weight: Tensor, p: float) -> Tensor:
    """dropout(x2d, p) @ a_weight^T (see DropoutLoraA); without autograd (the first forward of a reentrant
    checkpoint, evaluation under no_grad) the kernel alone, drawing its seed the same way."""
    if torch.is_grad_enabled() and (x2d.requires_grad or a_weight.requires_grad):
        return DropoutLoraA.apply(x2d, a_weight, p)
    return forward(x2d, a_weight.detach().contiguous(), draw_seed(), p)


class DropoutLoraA(torch.autograd.Function):
    """h = dropout(x2d, p) @ a_weight^T in x2d's dtype (a_weight rounded to it in the kernels, as autocast casts A
    for its matmul); the backward gives x2d's and a_weight's gradients (each in its own dtype)."""

    @staticmethod
    def forward(ctx, x2d: Tensor, a_weight: Tensor, p: float) -> Tensor:
        a = a_weight.detach()
        a = a if a.is_contiguous() else a.contiguous()
        ctx.seed, ctx.p = draw_seed(), p
        ctx.save_for_backward(x2d, a)
        return forward(x2d, a, ctx.seed, p)

    @staticmethod
    def backward(ctx, dh: Tensor):
        x2d, a = ctx.saved_tensors
        dx, da = backward(dh.contiguous(), x2d, a, ctx.seed, ctx.p, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, None if da is None else da.to(a.dtype), None
