"""The generic path: dequantize to the activation dtype, then one F.linear. Runs on every device, for every
format and dtype (float32/float64 activations, GPUs until the Triton kernels land, nf4/fp4/fp8)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..formats import LowBitFormat


def matmul(x2d: Tensor, fmt: LowBitFormat, q: dict[str, Tensor], group_size: int) -> Tensor:
    """x2d [M, K] @ W.T -> [M, N] in x2d's dtype, W dequantized from the canonical tensors `q`."""
    return F.linear(x2d, fmt.dequantize(q, group_size, x2d.dtype))
