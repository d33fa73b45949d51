"""KV caches swapped in from outside the model (`apply_kv_cache_dtype`): compressed ones, so long contexts fit on
small cards, `int8` (one scale per token and KV head, absmax / 127) or `fp8` (e4m3, a saturating cast; `fp8_e5m2`
for a wider range), and the uncompressed `FusedKVCache`; all of them store and attend through Triton kernels on
GPUs. Keys are stored after RoPE.

    python -c "import xpu_llm; print(xpu_llm.LLM(kv_cache_dtype='int8').generate('Hi')[0].text)"

Chosen here: no calibration and no per-tensor scale (vLLM's default), because a per-token scale needs no
calibration data and cannot overflow; fp8 values beyond the format's range are clamped, never inf.

How a step attends (`attend`): on GPUs, a decode step or a short verification (at most 64 query rows per KV head)
runs one Triton flash-decoding kernel over the cache as stored (attention_kernels.py), compressed or not, so a
compressed cache is read once at its own size; CPU decode steps of float32 models do the same in the native step
(cpu_decode.py). Elsewhere (prefill, no Triton or native library, XPU_LLM_FUSED_ATTENTION=0) the cache is
dequantized one layer at a time into a transient buffer for PyTorch's SDPA: memory is then the compressed cache
plus one layer's float copy. `apply_kv_cache_dtype` installs these caches (uncompressed too:
`FusedKVCache`), which is how `LLM` builds its model."""
from __future__ import annotations

import functools
import logging
import os

import torch
from torch import Tensor, nn

from .device import is_cpu, is_gpu
from .errors import XpuLLMError
from .model import KVCache, sdpa

log = logging.getLogger(__name__)

_STORE = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
ALIASES = {"fp8": "fp8_e4m3", "int8": "int8", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}
KV_CACHE_DTYPES = tuple(ALIASES)
# Cache kind -> the code the attention kernels (attention_kernels.py) and the native CPU step (cpu_decode.c) take.
KIND_CODES = {None: 0, "int8": 1, "fp8_e4m3": 2, "fp8_e5m2": 3}


def check_kv_cache_dtype(name: str | None) -> str | None:
    """The canonical kind for a user's kv_cache_dtype (None / 'auto': the compute dtype, uncompressed)."""
    if name in (None, "auto", "none"):
        return None
    if name not in ALIASES:
        raise XpuLLMError(f"kv_cache_dtype must be one of auto, {', '.join(KV_CACHE_DTYPES)}; got {name!r}")
    return ALIASES[name]


class QuantizedKVCache(nn.Module):
    """KVCache's interface over int8 / fp8 storage: [batch, kv_heads, max_seq_len, head_dim] (+ int8 scales)."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, kind: str = "int8") -> None:
        super().__init__()
        assert kind in _STORE, f"unknown KV cache kind {kind!r}"
        self.kind, self.dtype = kind, dtype
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        # fp8 is kept as its bytes (uint8): index writes and scatters work on every backend for uint8.
        store = torch.int8 if kind == "int8" else torch.uint8
        self.register_buffer("k_q", torch.zeros(shape, dtype=store, device=device), persistent=False)
        self.register_buffer("v_q", torch.zeros(shape, dtype=store, device=device), persistent=False)
        if kind == "int8":
            sshape = shape[:3] + (1,)
            self.register_buffer("k_scale", torch.zeros(sshape, dtype=torch.float32, device=device), persistent=False)
            self.register_buffer("v_scale", torch.zeros(sshape, dtype=torch.float32, device=device), persistent=False)
        else:
            self.k_scale = self.v_scale = None

    @property
    def batch_size(self) -> int:
        return self.k_q.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.kind == "int8":
            x = x.float()
            # times float32(1/127), not / 127.0: CUDA PyTorch divides by a scalar through its reciprocal and CPU
            # PyTorch does not; one multiplication is the same everywhere, the store kernel's too
            scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) * (1 / 127)
            return (x / scale).round_().clamp_(-127, 127).to(torch.int8), scale
        fmax = torch.finfo(_STORE[self.kind]).max  # exact in bf16 / fp16 too: the same bytes as from float32
        return x.clamp(-fmax, fmax).to(_STORE[self.kind]).view(torch.uint8), None

    def _dequantize(self, q: Tensor, scale: Tensor | None) -> Tensor:
        if self.kind == "int8":
            return (q.float() * scale).to(self.dtype)
        return q.view(_STORE[self.kind]).to(self.dtype)

    @staticmethod
    def _write(buf: Tensor, input_pos: Tensor, x: Tensor) -> None:
        b = x.shape[0]
        if input_pos.dim() == 2:  # per-row slots (speculative decoding)
            buf[:b].scatter_(2, input_pos.view(b, 1, -1, 1).expand_as(x), x)
        else:
            buf[:b, :, input_pos] = x

    def store(self, input_pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Quantize k, v [B, H, T, D] and write them at `input_pos` ([T] or [B, T]); in one kernel on GPUs."""
        if kernel_store(k):
            _kernels().store_kv(k, v, input_pos, self.k_q, self.v_q, self.kind, self.k_scale, self.v_scale)
            return
        for x, q_buf, s_buf in ((k, self.k_q, self.k_scale), (v, self.v_q, self.v_scale)):
            q, s = self._quantize(x)
            self._write(q_buf, input_pos, q)
            if s_buf is not None:
                self._write(s_buf, input_pos, s)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int | None) -> tuple[Tensor, Tensor]:
        """As KVCache.update: store k, v [B, H, T, D] at `input_pos`, return the (dequantized) cache to kv_len."""
        self.store(input_pos, k, v)
        b = k.shape[0]
        end = self.k_q.shape[2] if kv_len is None else kv_len
        return tuple(self._dequantize(q_buf[:b, :, :end], None if s_buf is None else s_buf[:b, :, :end])
                     for q_buf, s_buf in ((self.k_q, self.k_scale), (self.v_q, self.v_scale)))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, kv_len: int | None,
               mask: Tensor) -> Tensor:
        """As KVCache.attend; decode steps on GPUs read the compressed cache in the attention kernel."""
        end = self.k_q.shape[2] if kv_len is None else kv_len
        if fused_attention(q, self.k_q.shape[1]):
            self.store(input_pos, k, v)
            return _kernel_attend(q, self.k_q, self.v_q, self.k_scale, self.v_scale, self.kind, mask, end)
        k, v = self.update(input_pos, k, v, kv_len)
        return sdpa(q, k, v, mask)


class FusedKVCache(KVCache):
    """KVCache whose decode steps on GPUs attend through the Triton kernel (prefill and CPUs: SDPA) and whose
    writes are one kernel (two index writes otherwise)."""

    def store(self, input_pos: Tensor, k: Tensor, v: Tensor) -> None:
        if kernel_store(k):
            _kernels().store_kv(k, v, input_pos, self.k_cache, self.v_cache)
        else:
            super().store(input_pos, k, v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, kv_len: int | None,
               mask: Tensor) -> Tensor:
        if not fused_attention(q, self.k_cache.shape[1]):
            return super().attend(q, k, v, input_pos, kv_len, mask)
        self.store(input_pos, k, v)
        end = self.k_cache.shape[2] if kv_len is None else kv_len
        return _kernel_attend(q, self.k_cache, self.v_cache, None, None, None, mask, end)


# Tests set this under Triton's interpreter to run the kernel path on CPU tensors.
KERNEL_ON_CPU = False


def fused_attention(q: Tensor, n_kv_heads: int) -> bool:
    """Whether q [B, H, T, D] attends through the Triton kernel: on a GPU (XPU_LLM_FUSED_ATTENTION=0 turns it and
    the store kernel off), Triton importable, and few enough query rows per KV head (a decode step or a
    verification, not a prefill)."""
    kernels = _kernels_for(q)
    return kernels is not None and kernels.supports(q, n_kv_heads)


def kernel_store(k: Tensor) -> bool:
    """Whether a cache write of k takes the Triton store kernel: where the attention kernel may run, outside
    torch.compile (whose own fusion of the PyTorch writes is kept)."""
    return (_kernels_for(k) is not None and k.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and not torch.compiler.is_compiling())


def _kernels_for(x: Tensor):
    """attention_kernels where the kernels run for tensors like x, else None."""
    if not (is_gpu(x.device) or (KERNEL_ON_CPU and is_cpu(x.device))):
        return None
    if os.environ.get("XPU_LLM_FUSED_ATTENTION", "1") == "0":
        return None
    return _kernels()


@functools.cache
def _kernels():
    """attention_kernels, imported on first GPU use; None without Triton (SDPA then runs)."""
    try:
        from . import attention_kernels
    except ImportError as e:
        log.warning("Triton is not importable (%s): attention runs through PyTorch's SDPA", e)
        return None
    return attention_kernels


def _kernel_attend(q: Tensor, k_buf: Tensor, v_buf: Tensor, k_scale: Tensor | None, v_scale: Tensor | None,
                   kind: str | None, mask: Tensor, kv_len: int) -> Tensor:
    kernels = _kernels()
    if torch.compiler.is_compiling():  # an opaque op to the compiler, as the low-bit matmuls are
        return kernels.decode_attention_op(q, k_buf, v_buf, k_scale, v_scale, KIND_CODES[kind], mask, kv_len)
    return kernels.decode_attention(q, k_buf, v_buf, k_scale, v_scale, kind, mask, kv_len,
                                    soft_bf16=is_cpu(q.device))


def cache_factory(kind: str | None):
    """The cache class (or partial) that `setup_caches` calls per layer for a canonical kind (None: uncompressed)."""
    return FusedKVCache if kind is None else functools.partial(QuantizedKVCache, kind=kind)


def apply_kv_cache_dtype(model: nn.Module, kv_cache_dtype: str | None) -> str | None:
    """Make `model` allocate these caches from now on (the next setup_caches): compressed to `kv_cache_dtype`, or in
    the compute dtype (None), attending through the decode kernel on GPUs either way. Returns the canonical kind."""
    kind = check_kv_cache_dtype(kv_cache_dtype)
    model.cache_factory = cache_factory(kind)
    model.max_batch_size = -1  # the next setup_caches allocates the new caches
    model.max_seq_len = -1
    return kind
