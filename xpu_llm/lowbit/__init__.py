"""Low-bit weights: the format registry (formats.py), nibble packing (packing.py), LowBitLinear and
quantize_linears (linear.py), and the per-device matmul kernels behind one dispatch (kernels/)."""
from __future__ import annotations

from .formats import FORMATS, GROUP_SIZES, LOW_BIT_NAMES, LowBitFormat, get_format
from .linear import LowBitLinear, quantize_linears

__all__ = ["FORMATS", "GROUP_SIZES", "LOW_BIT_NAMES", "LowBitFormat", "get_format", "LowBitLinear",
           "quantize_linears"]
