"""The Triton kernel objects behind kernels.select_kernel on GPUs (same interface as cpu.py: pack / unpack /
droppable / mm), and the one dispatch by batch shape and dtype:

  M == 1                -> triton_gemv (float32 CUDA-core matrix-vector kernel, split-K)
  2 <= M <= 16          -> triton_gemm.dot with BLOCK_M = 16 and split-K ("skinny"; float32 activations take
                           an exact float32 dot), or dequantize + vendor matmul where the tuner measures it faster
  M > 16                -> PREFILL: "auto" (tuned between the two below), "fused" (triton_gemm.dot) or "dequant"
                           (triton_gemm.dequantize into a workspace, then torch.matmul); float32 always takes
                           "dequant" (an exact float32 matmul).

The kernels read the canonical tensors (no re-layout), so pack is a view and nothing is duplicated. Tile
configurations come from triton_tune (autotuned per shape and cached in memory and on disk)."""
from __future__ import annotations

import functools
import logging
import os

import torch
from torch import Tensor

from ..formats import NF4_CODE
from . import triton_gemm, triton_gemv, triton_tune
from .triton_common import FORMAT_IDS, FOUR_BIT, SCALE_MUL

log = logging.getLogger(__name__)

State = dict[str, Tensor]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Groups the kernels take: a power of two, so a group is one tl.arange (the registry uses 32, 64 and 128).
GROUPS = (16, 32, 64, 128, 256)
SKINNY_MAX_M = 16
# Prefill / training path (M > 16): "auto" (tuned per shape between the two below; untuned: dequant), "fused"
# (dequantize inside the Triton GEMM) or "dequant" (dequantize to a workspace, then the vendor matmul).
PREFILL = os.environ.get("XPU_LLM_TRITON_PREFILL", "auto")


def is_interpreting() -> bool:
    """True when the kernels were built under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return triton_gemv.soft_bf16()


@functools.lru_cache(maxsize=16)
def _nf4_table(device: torch.device) -> Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=16)
def nf4_pair_table(device: torch.device) -> Tensor:
    """[256] int64: entry b = the float32 bits of NF4[b & 15] in the low half, of NF4[b >> 4] in the high half, so
    the kernels decode a byte (two NF4 codes) with one 64-bit table read."""
    bits = torch.tensor(NF4_CODE, dtype=torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = torch.arange(256)
    return (bits[b & 15] | (bits[b >> 4] << 32)).to(device)


def format_args(low_bit: str, qweight: Tensor, scales: Tensor, mins: Tensor | None, n: int, group_size: int) -> dict:
    """Kernel arguments for one weight: raw bytes of the codes (fp8/int8 viewed as uint8), scales, mins, table."""
    src = scales
    qweight, scales = qweight.contiguous(), scales.contiguous()
    mins = mins.contiguous() if mins is not None else scales  # any valid pointer when unused
    q = qweight.view(torch.uint8).view(torch.int32)  # 32-bit words: 8 nibbles or 4 bytes, little-endian
    nf4 = low_bit == "nf4"
    lut = _nf4_table(q.device) if nf4 else scales
    lut2 = nf4_pair_table(q.device) if nf4 else scales
    return {"q": q, "s": scales, "z": mins, "lut": lut, "lut2": lut2, "n": n, "group_size": group_size, "src": src,
            "fmt_id": FORMAT_IDS[low_bit], "scale_mul": SCALE_MUL.get(low_bit, 1.0)}


def supports(low_bit: str, n: int, k: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels take this layer and activation dtype (else the reference path runs)."""
    return (low_bit in FORMAT_IDS and dtype in DTYPES and group_size in GROUPS and k % group_size == 0
            and n > 0 and k > 0)


def path(m: int, dtype: torch.dtype) -> str:
    """Which kernel runs for M activation rows of `dtype`: "gemv", "auto" (the tuner picks a fused GEMM tile or
    dequantize + vendor matmul per shape), "skinny"/"fused" (fused GEMM only) or "dequant"."""
    if m == 1:
        return "gemv"
    if m <= SKINNY_MAX_M:
        return "auto"
    return "dequant" if dtype == torch.float32 else PREFILL


def matmul(x2d: Tensor, args: dict, kind: str | None = None, out: Tensor | None = None) -> Tensor:
    """x2d [M, K] @ W.T -> [M, N] in x2d's dtype through the kernel `kind` (default: the dispatch's choice)."""
    m, n = x2d.shape[0], args["n"]
    assert x2d.dtype in DTYPES, f"the Triton kernels take {DTYPES} activations, got {x2d.dtype}"
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    kind = kind or path(m, x2d.dtype)
    if out is None:
        out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return out
    if kind == "gemv":
        cfg = triton_tune.gemv_config(x2d, args)
        return triton_gemv.gemv(x2d, args, cfg, out)
    if kind == "dequant":
        return triton_gemm.dequant_matmul(x2d, args, out)
    dot_f32 = x2d.dtype == torch.float32 or (x2d.dtype == torch.bfloat16 and is_interpreting())
    cfg = triton_tune.dot_config(x2d, args, dot_f32, with_dequant=kind == "auto")
    return triton_gemm.run(x2d, args, cfg, out, dot_f32=dot_f32)


def dequantize(low_bit: str, q: State, n: int, k: int, group_size: int, dtype: torch.dtype) -> Tensor:
    """The [N, K] weight of the canonical tensors `q` in `dtype`, in one kernel; the same bits as the format's
    reference dequantize (kernel tests check it)."""
    args = format_args(low_bit, q["qweight"], q["scales"], q.get("mins"), n, group_size)
    return triton_gemm.dequantize(args, torch.empty((n, k), dtype=dtype, device=args["q"].device))


@torch.library.custom_op("xpu_llm::triton_lowbit_mm", mutates_args=())
def _compiled_mm(x2d: Tensor, q: Tensor, s: Tensor, z: Tensor, lut: Tensor, n: int, group_size: int, fmt_id: int,
                 scale_mul: float) -> Tensor:
    """matmul as an opaque custom op, so that torch.compile keeps the call in its graph instead of tracing it."""
    lut2 = nf4_pair_table(q.device) if fmt_id == FORMAT_IDS["nf4"] else lut
    args = {"q": q, "s": s, "z": z, "lut": lut, "lut2": lut2, "n": n, "group_size": group_size, "fmt_id": fmt_id,
            "scale_mul": scale_mul, "src": s}
    return matmul(x2d, args)


@_compiled_mm.register_fake
def _(x2d, q, s, z, lut, n, group_size, fmt_id, scale_mul):
    return x2d.new_empty((x2d.shape[0], n))


class TritonKernel:
    """One low-bit format through the Triton kernels; the state is a view of the canonical tensors."""

    name = "triton"

    def __init__(self, low_bit: str) -> None:
        self.low_bit = low_bit

    def __repr__(self) -> str:
        return f"TritonKernel({self.low_bit})"

    @staticmethod
    def droppable() -> bool:
        return False  # the state is the canonical qweight itself: nothing to drop, nothing duplicated

    def pack(self, q: State, n: int, k: int, group_size: int) -> State:
        qw = q["qweight"].contiguous()
        return {"qweight": qw if qw.dtype == torch.uint8 else qw.view(torch.uint8)}

    def unpack(self, state: State, n: int, k: int, group_size: int) -> Tensor:
        from ..formats import get_format
        dtype = get_format(self.low_bit).shapes(n, k, group_size)["qweight"][1]
        qw = state["qweight"]
        return qw if dtype == torch.uint8 else qw.view(dtype)

    def mm(self, x2d: Tensor, state: State, q: State, group_size: int) -> Tensor:
        args = state.get("args")  # built once per layer (views and lookups cost microseconds per call)
        if args is None or args["src"] is not q["scales"] or args["group_size"] != group_size:
            args = format_args(self.low_bit, state["qweight"], q["scales"], q.get("mins"), q["scales"].shape[0],
                               group_size)
            state["args"] = args
        if torch.compiler.is_compiling():
            return _compiled_mm(x2d, args["q"], args["s"], args["z"], args["lut"], args["n"], group_size,
                                args["fmt_id"], args["scale_mul"])
        return matmul(x2d, args)  # eager: straight to the launch (a custom op call costs microseconds)


KERNELS = {name: TritonKernel(name) for name in FORMAT_IDS}


def select(low_bit: str, n: int, k: int, group_size: int, dtype: torch.dtype, m: int = 1):
    """The Triton kernel object for this layer and activation dtype, or None (reference path)."""
    return KERNELS[low_bit] if supports(low_bit, n, k, group_size, dtype) else None


__all__ = ["FOUR_BIT", "KERNELS", "PREFILL", "TritonKernel", "dequantize", "format_args", "matmul", "path",
           "select", "supports"]
