"""Compressed KV caches, swapped in from outside the model (`apply_kv_cache_dtype`), so long contexts fit on
small cards: `int8` (one scale per token and KV head, absmax / 127) or `fp8` (e4m3, a saturating cast; `fp8_e5m2`
for a wider range). Keys are stored after RoPE; attention reads the cache dequantized to the compute dtype.

    python -c "import xpu_llm; print(xpu_llm.LLM(kv_cache_dtype='int8').generate('Hi')[0].text)"

Chosen here: no calibration and no per-tensor scale (vLLM's default), because a per-token scale needs no
calibration data and cannot overflow; fp8 values beyond the format's range are clamped, never inf. The cache is
dequantized one layer at a time into a transient buffer, so memory is the compressed cache plus one layer's
float copy; speed is unchanged on CPUs (no fused dequantizing attention kernel yet)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .errors import XpuLLMError

_STORE = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
ALIASES = {"fp8": "fp8_e4m3", "int8": "int8", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}
KV_CACHE_DTYPES = tuple(ALIASES)


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
        x = x.float()
        if self.kind == "int8":
            scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
            return (x / scale).round_().clamp_(-127, 127).to(torch.int8), scale
        fmax = torch.finfo(_STORE[self.kind]).max
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

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int | None) -> tuple[Tensor, Tensor]:
        """As KVCache.update: store k, v [B, H, T, D] at `input_pos`, return the (dequantized) cache to kv_len."""
        b = k.shape[0]
        end = self.k_q.shape[2] if kv_len is None else kv_len
        out = []
        for x, q_buf, s_buf in ((k, self.k_q, self.k_scale), (v, self.v_q, self.v_scale)):
            q, s = self._quantize(x)
            self._write(q_buf, input_pos, q)
            if s_buf is not None:
                self._write(s_buf, input_pos, s)
            out.append(self._dequantize(q_buf[:b, :, :end], None if s_buf is None else s_buf[:b, :, :end]))
        return out[0], out[1]


def apply_kv_cache_dtype(model: nn.Module, kv_cache_dtype: str | None) -> str | None:
    """Make `model` allocate compressed caches from now on (the next setup_caches); returns the canonical kind."""
    kind = check_kv_cache_dtype(kv_cache_dtype)
    if kind is None:
        return None
    model.cache_factory = functools.partial(QuantizedKVCache, kind=kind)
    model.max_batch_size = -1  # the next setup_caches allocates the new caches
    model.max_seq_len = -1
    return kind
