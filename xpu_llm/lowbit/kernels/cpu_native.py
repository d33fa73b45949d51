"""The native CPU kernels: every low-bit format dequantized in AVX2 registers with float32 activations
(cpu_native.c), and the fused decode-step ops that cpu_decode.py swaps in (cpu_decode.c).

Compiled with the system C compiler on first use (a few seconds) into the xpu-llm cache, keyed by the source
and flags, and loaded with ctypes; the build is atomic (temp file, rename), so parallel first runs are safe.
Without a compiler, on a CPU without AVX2/FMA/F16C, or with XPU_LLM_NATIVE=0, `available()` is False and the
PyTorch paths in cpu.py run instead. It reads the canonical tensors as they are (no re-layout), so a layer never
drops its canonical weight for it; the state holds float32 copies of the scales only."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ..formats import FP4_CODE, NF4_CODE

log = logging.getLogger(__name__)

State = dict[str, Tensor]
SOURCES = (Path(__file__).with_name("cpu_native.c"), Path(__file__).with_name("cpu_decode.c"))
# -ffp-contract=off: no implicit FMA in the plain-C ops, so they round like the PyTorch ops they replace.
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c11")
# Format name -> (kernel code in cpu_native.c, codebook for the LUT4 kind)
_CODES = {"sym_int4": (0, None), "asym_int4": (1, None), "nf4": (2, NF4_CODE), "fp4": (2, FP4_CODE),
          "sym_int8": (3, None), "fp8_e4m3": (4, None), "fp8_e5m2": (5, None)}
_Q8_CODES = {"sym_int4": 0, "asym_int4": 1, "fp4": 2, "sym_int8": 3}  # formats of xl_lowbit_mm_q8
# Above this many activation rows, dequantize + one float32 GEMM (MKL) wins: the kernel decodes each weight row
# once per 4 activation rows. Measured on 2 AVX2 cores (SmolLM2 shapes, asym_int4 / nf4 / fp8_e4m3): at 32 rows
# the kernel takes 0.5-0.75x the time of dequantize + GEMM, at 64 about the same, at 128 1.3-1.7x.
MAX_M = 48
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # 16-bit activations are widened to float32


def _cache_dir() -> Path:
    base = os.environ.get("XPU_LLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "xpu_llm")
    return Path(base) / "kernels"


def _cpu_supported() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    cap = torch.backends.cpu.get_cpu_capability()  # "AVX2" / "AVX512" imply AVX2 + FMA
    if cap not in ("AVX2", "AVX512"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
        return "f16c" in flags
    except (OSError, IndexError):
        return True  # not Linux: every AVX2 CPU made has F16C


def _build() -> Path:
    """Compile cpu_native.c into the cache (once per source and flags) and return the library's path."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler found (set CC)")
    src = b"".join(p.read_bytes() for p in SOURCES)
    key = hashlib.sha256(src + " ".join((cc, *FLAGS)).encode()).hexdigest()[:16]
    out = _cache_dir() / f"xpu_llm_cpu_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True, timeout=120)
        if res.returncode:
            raise OSError(f"{cc} failed: {res.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when the native path is off or cannot be built here (logged once)."""
    if os.environ.get("XPU_LLM_NATIVE", "1") == "0":
        return None
    if not _cpu_supported():
        log.info("native CPU kernel off: needs an x86-64 CPU with AVX2, FMA and F16C")
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("native CPU kernel unavailable (%s); using PyTorch's kernels, which are slower", e)
        return None
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    signatures = {  # name: (argument types, result type)
        "xl_lowbit_mm": ([ctypes.c_int, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr], ctypes.c_int),
        "xl_lowbit_mm_q8": ([ctypes.c_int, ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ptr], ctypes.c_int),
        "xl_rmsnorm": ([ptr, ptr, ptr, ptr, i64, i64, f32], None),
        "xl_silu_mul": ([ptr, ptr, i64, i64], None),
        "xl_attn_decode": ([ptr, i64, i64, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int, i64, i64,
                            i64, ptr, i64, ptr, ptr], None),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def available() -> bool:
    return library() is not None


class NativeLowBit:
    """One format through the native library, up to MAX_M activation rows (decode, small batches): float32
    activations (xl_lowbit_mm, exact weights and float32 sums), or with `int8_activations` the integer path
    (xl_lowbit_mm_q8: activations rounded to int8 per block of 32, as llama.cpp does; sym_int4, asym_int4, fp4
    and sym_int8 only). Instances are per (format, path) (`kernel_for`)."""

    name = "native"

    def __init__(self, low_bit: str, int8_activations: bool = False) -> None:
        assert not int8_activations or low_bit in _Q8_CODES, f"no int8-activation kernel for {low_bit}"
        self.low_bit, self.int8_activations = low_bit, int8_activations
        self.code, book = (_Q8_CODES[low_bit], None) if int8_activations else _CODES[low_bit]
        self.lut = None if book is None else torch.tensor(book, dtype=torch.float32)

    @staticmethod
    def applies(low_bit: str, n: int, k: int, group_size: int, dtype: torch.dtype, m: int) -> bool:
        return (low_bit in _CODES and dtype in _DTYPES and m <= MAX_M and group_size % 32 == 0
                and k % group_size == 0 and available())

    @staticmethod
    def droppable() -> bool:
        return False  # it reads the canonical qweight itself

    def pack(self, q: State, n: int, k: int, group_size: int) -> State:
        """Float32 scales (and mins) and a reference to the canonical qweight (no copy of the weight)."""
        qw = q["qweight"]
        assert qw.is_contiguous() and qw.element_size() == 1, "the native kernel needs a contiguous 1-byte qweight"
        scales = q["scales"].to(torch.float32)
        if self.low_bit == "fp8_e4m3":
            scales = scales * 2.0 ** 8  # exact: the kernel reads e4m3 codes as value * 2^-8
        state = {"qweight": qw, "scales": scales.contiguous()}
        if "mins" in q:
            state["mins"] = q["mins"].to(torch.float32).contiguous()
        return state

    @staticmethod
    def unpack(state: State, n: int, k: int, group_size: int) -> Tensor:
        return state["qweight"]

    def mm(self, x2d: Tensor, state: State, q: State, group_size: int) -> Tensor:
        """x2d [M, K] @ W.T -> [M, N] in x2d's dtype, computed in float32 (or int8 x int-weight products)."""
        x = x2d.to(torch.float32).contiguous()
        m, k = x.shape
        qw = state["qweight"]
        n = qw.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        mins = state.get("mins")
        mins_ptr = None if mins is None else mins.data_ptr()
        lib = library()
        if self.int8_activations:
            work = torch.empty(m * (k + 4 * (k // 32) + 4 * (k // group_size)), dtype=torch.uint8)
            rc = lib.xl_lowbit_mm_q8(self.code, x.data_ptr(), m, k, qw.data_ptr(), state["scales"].data_ptr(),
                                     mins_ptr, n, group_size, y.data_ptr(), work.data_ptr())
        else:
            work = torch.empty(m, k, dtype=torch.float32) if self.code <= 2 else None
            rc = lib.xl_lowbit_mm(self.code, x.data_ptr(), m, k, qw.data_ptr(), state["scales"].data_ptr(),
                                  mins_ptr, None if self.lut is None else self.lut.data_ptr(), n, group_size,
                                  y.data_ptr(), None if work is None else work.data_ptr())
        assert rc == 0, f"native kernel refused shape M={m} K={k} N={n} group={group_size}"
        return y.to(x2d.dtype)


@functools.cache
def kernel_for(low_bit: str, int8_activations: bool = False) -> NativeLowBit:
    return NativeLowBit(low_bit, int8_activations)


def select(low_bit: str, n: int, k: int, group_size: int, dtype: torch.dtype, m: int = 1,
           int8_activations: bool = False) -> NativeLowBit | None:
    """The native kernel for this layer and activation [m, k] dtype, or None. `int8_activations` asks for the
    integer path where the format has one (else the float32 one)."""
    if not NativeLowBit.applies(low_bit, n, k, group_size, dtype, m):
        return None
    return kernel_for(low_bit, int8_activations and low_bit in _Q8_CODES)
