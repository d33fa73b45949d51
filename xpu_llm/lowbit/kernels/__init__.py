"""One dispatch for the low-bit matmul: the fastest kernel for the activation's device, dtype and the layer's
format, falling back to the reference (dequantize + F.linear) wherever no faster kernel applies."""
from __future__ import annotations

from torch import Tensor

from ...device import is_cpu
from . import cpu, reference


def select_kernel(layer, x2d: Tensor):
    """The kernel object (see cpu.py) that `layer` should use for `x2d`, or None for the reference path."""
    if is_cpu(x2d.device):
        return cpu.select(layer.low_bit, layer.out_features, layer.in_features, layer.group_size, x2d.dtype)
    return None  # GPUs: Triton kernels are a later issue


def lowbit_matmul(x2d: Tensor, layer) -> Tensor:
    """x2d [M, K] @ W.T -> [M, N] (no bias) for a LowBitLinear `layer`."""
    kernel = select_kernel(layer, x2d)
    if kernel is not None:
        state, q = layer.kernel_state(kernel)
        return kernel.mm(x2d, state, q, layer.group_size)
    return reference.matmul(x2d, layer.fmt, layer.tensors(), layer.group_size)


__all__ = ["lowbit_matmul", "select_kernel", "cpu", "reference"]
