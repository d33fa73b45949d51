"""One dispatch for the low-bit matmul: the fastest path for the activation's device and dtype and the layer's
format. CPU: the native AVX2 kernel (cpu_native) for up to cpu_native.MAX_M rows, dequantize-to-float32 in
cache-sized row blocks above that; where the native kernel cannot be built, PyTorch's packed int4/int8 kernels
for bf16. GPUs (XPU, CUDA): the Triton kernels (triton_ops: decode GEMV, skinny/prefill GEMMs) for bf16/fp16/fp32
activations. Elsewhere (float64, groups that are not a power of two, no Triton): dequantize + F.linear."""
from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from ...device import is_cpu, is_gpu
from . import cpu, cpu_native, reference


def select_kernel(layer, x2d: Tensor):
    """The packed kernel object (see cpu.py) that `layer` uses for `x2d`, or None when it uses none."""
    if is_cpu(x2d.device):
        if cpu_native.available():  # then only it or dequant_matmul, so a layer never thrashes between layouts
            return cpu_native.select(layer.low_bit, layer.out_features, layer.in_features, layer.group_size,
                                     x2d.dtype, x2d.shape[0], getattr(layer, "kernel_dtype", None) == torch.int8)
        return cpu.select(layer.low_bit, layer.out_features, layer.in_features, layer.group_size, x2d.dtype,
                          x2d.shape[0])
    if is_gpu(x2d.device):
        ops = _triton_ops()
        if ops is not None:
            return ops.select(layer.low_bit, layer.out_features, layer.in_features, layer.group_size, x2d.dtype,
                              x2d.shape[0])
    return None


@functools.cache
def _triton_ops():
    """kernels.triton_ops, imported on first GPU use; None without Triton (the reference path then runs)."""
    try:
        from . import triton_ops
    except ImportError as e:
        logging.getLogger(__name__).warning(
            "Triton is not importable (%s): low-bit layers on this GPU fall back to dequantize + matmul", e)
        return None
    return triton_ops


def lowbit_dequantize(layer, dtype: torch.dtype) -> Tensor:
    """The [N, K] weight of a low-bit `layer` (LowBitLinear or the finetune's packed one) in `dtype`: one Triton
    kernel on GPUs (the QLoRA backward runs this per layer and step), the format's reference dequantize
    elsewhere; the same bits either way."""
    q = layer.tensors()
    n, k = layer.out_features, layer.in_features
    if is_gpu(q["scales"].device):
        ops = _triton_ops()
        if ops is not None and ops.supports(layer.low_bit, n, k, layer.group_size, dtype):
            return ops.dequantize(layer.low_bit, q, n, k, layer.group_size, dtype)
    return layer.fmt.dequantize(q, layer.group_size, dtype)


def lowbit_matmul(x2d: Tensor, layer) -> Tensor:
    """x2d [M, K] @ W.T -> [M, N] in x2d's dtype (no bias) for a LowBitLinear `layer`."""
    kernel = select_kernel(layer, x2d)
    if kernel is not None:
        state, q = layer.kernel_state(kernel)
        return kernel.mm(x2d, state, q, layer.group_size)
    kd = getattr(layer, "kernel_dtype", None)
    if kd is not None and kd.is_floating_point and kd != x2d.dtype and is_cpu(x2d.device):
        # A float32 model may run its packed matmuls in 16 bits (LowBitLinear.kernel_dtype): the rest of the
        # network stays float32, which on CPUs without native bf16 is much faster than a bf16 model.
        xk = x2d.to(kd)
        kernel = select_kernel(layer, xk)
        if kernel is not None:
            state, q = layer.kernel_state(kernel)
            return kernel.mm(xk, state, q, layer.group_size).to(x2d.dtype)
    if is_cpu(x2d.device) and x2d.dtype != torch.float64:
        return cpu.dequant_matmul(x2d, layer.fmt, layer.tensors(), layer.group_size)
    return reference.matmul(x2d, layer.fmt, layer.tensors(), layer.group_size)


__all__ = ["lowbit_dequantize", "lowbit_matmul", "select_kernel", "cpu", "cpu_native", "reference"]
