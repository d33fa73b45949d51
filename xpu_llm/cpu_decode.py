"""The CPU decode fast path, applied from outside like quantization: `apply_cpu_decode(model)` turns each decoder
block into a `FastDecodeBlock`, whose one-token step runs RMSNorm (+ the skip connection), RoPE + KV-cache write +
attention, and the SwiGLU product as fused native ops (lowbit/kernels/cpu_decode.c) around the block's own linear
layers. At decode sizes a CPU spends more time dispatching the ~25 small PyTorch ops of a block than computing
them; this cuts them to 4 native calls. Everything else (prefill, verification of several positions, per-row
cache slots, non-float32 models, autograd) runs the plain forward, and the weights are the same objects."""
from __future__ import annotations

import torch
from torch import Tensor

from .lowbit.kernels import cpu_native
from .model import Transformer, TransformerBlock


class FastDecodeBlock(TransformerBlock):
    """A TransformerBlock whose single-token float32 CPU forward uses fused native ops (same numerics in float32,
    up to summation order)."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor,
                kv_len: int | None) -> Tensor:
        if not self._fast(x, cos, mask, input_pos):
            return super().forward(x, cos, sin, mask, input_pos, kv_len)
        lib = cpu_native.library()
        attn, ff = self.attention, self.feed_forward
        cache = attn.kv_cache
        b, _, dim = x.shape
        x2 = x.reshape(b, dim).contiguous()
        xn = torch.empty_like(x2)
        lib.xl_rmsnorm(x2.data_ptr(), None, self.attention_norm.weight.data_ptr(), xn.data_ptr(), b, dim,
                       self.attention_norm.eps)
        qkv = attn.wqkv(xn).contiguous()
        h, hkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
        slots = cache.k_cache.shape[2]
        kv = slots if kv_len is None else kv_len
        y = torch.empty(b, h * d)
        scores = torch.empty(b * h * kv)
        lib.xl_attn_decode(qkv.data_ptr(), b, h, hkv, d, cos.data_ptr(), sin.data_ptr(), cos.shape[0],
                           cache.k_cache.data_ptr(), cache.v_cache.data_ptr(), slots, int(input_pos), kv,
                           mask.data_ptr(), mask.shape[0], y.data_ptr(), scores.data_ptr())
        hres = attn.wo(y).contiguous()  # becomes h = x + attention(x) in the next call
        hn = torch.empty_like(x2)
        lib.xl_rmsnorm(hres.data_ptr(), x2.data_ptr(), self.ffn_norm.weight.data_ptr(), hn.data_ptr(), b, dim,
                       self.ffn_norm.eps)
        gu = ff.w13(hn).contiguous()
        act = torch.empty(b, ff.hidden)
        lib.xl_silu_mul(gu.data_ptr(), act.data_ptr(), b, ff.hidden)
        return ff.w2(act).add_(hres).view(b, 1, dim)

    def _fast(self, x: Tensor, cos: Tensor, mask: Tensor, input_pos: Tensor) -> bool:
        """Whether this call is a plain one-token float32 CPU step with no autograd (else the reference path)."""
        cache = self.attention.kv_cache
        return (x.shape[1] == 1 and x.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.is_grad_enabled() and input_pos.dim() == 1 and cache is not None
                and cache.k_cache.dtype == torch.float32 and cache.k_cache.is_contiguous()
                and self.attention.head_dim <= 512 and self.attention_norm.weight.dtype == torch.float32
                and mask.dtype == torch.bool and mask.is_contiguous() and cos.is_contiguous()
                and cos.dtype == torch.float32)


def apply_cpu_decode(model: Transformer) -> int:
    """Swap every block of a CPU float32 model for FastDecodeBlock when the native library builds here; returns
    the number of blocks swapped (0: the plain forward everywhere)."""
    if not cpu_native.available():
        return 0
    n = 0
    for layer in model.layers:
        if type(layer) is TransformerBlock:
            layer.__class__ = FastDecodeBlock  # same module, same parameters: only forward changes
            n += 1
    return n
