"""The CPU decode fast path, applied from outside like quantization: `apply_cpu_decode(model)` turns each decoder
block into a `FastDecodeBlock`, whose one-token step runs RMSNorm (+ the skip connection), RoPE + KV-cache write +
attention, and the SwiGLU product as fused native ops (lowbit/kernels/cpu_decode.c) around the block's own linear
layers. At decode sizes a CPU spends more time dispatching the ~25 small PyTorch ops of a block than computing
them; this cuts them to 4 native calls. The KV cache may be float32 or compressed (int8 / fp8, kv_cache.py): the
native step writes the same bytes as its PyTorch quantize and reads the codes in place, where the plain forward
dequantizes the cache every step. Everything else (prefill, verification of several positions, per-row
cache slots, non-float32 models, autograd) runs the plain forward, and the weights are the same objects."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .kv_cache import _STORE, KIND_CODES, QuantizedKVCache
from .lowbit.kernels import cpu_native, select_kernel
from .lowbit.linear import LowBitLinear
from .model import KVCache, Transformer, TransformerBlock

def _cache_tensors(cache: nn.Module) -> tuple[int, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(kind, keys, values, key scales, value scales, fp8 byte -> value table) as xl_attn_decode reads them."""
    if isinstance(cache, QuantizedKVCache):
        lut = None
        if cache.kind != "int8":
            lut = torch.arange(256, dtype=torch.uint8).view(_STORE[cache.kind]).float()
        return KIND_CODES[cache.kind], cache.k_q, cache.v_q, cache.k_scale, cache.v_scale, lut
    return 0, cache.k_cache, cache.v_cache, None, None, None


class _Linear:
    """A block's linear layer at decode sizes: its native kernel bound to the prepared state (no module call, no
    dispatch), or the module itself. `valid()` turns False when the layer's kernel state changes (unprepare on
    load_state_dict, .to(), a new kernel_dtype), and the block then rebuilds its plan."""

    __slots__ = ("module", "kernel", "state", "group_size", "bias", "mode")

    def __init__(self, module: nn.Module, rows: int) -> None:
        self.module, self.kernel, self.state = module, None, None
        if isinstance(module, LowBitLinear):
            kernel = select_kernel(module, torch.empty(rows, module.in_features))
            if isinstance(kernel, cpu_native.NativeLowBit):
                self.kernel = kernel
                self.state, _ = module.kernel_state(kernel)
                self.group_size, self.bias, self.mode = module.group_size, module.bias, module.kernel_dtype

    def valid(self) -> bool:
        m = self.module.__dict__
        return self.kernel is None or (m["_state"] is self.state and m["kernel_dtype"] is self.mode)

    def __call__(self, x2d: Tensor) -> Tensor:
        if self.kernel is None:
            return self.module(x2d)
        y = self.kernel.mm(x2d, self.state, None, self.group_size)
        return y if self.bias is None else y.add_(self.bias)


class _Plan:
    """What a block's fast step needs, resolved once per (batch rows, KV cache) instead of per call."""

    __slots__ = ("rows", "cache", "kind", "k", "v", "ks", "vs", "lut", "slots", "lin", "n1", "n2", "eps1", "eps2",
                 "h", "hkv", "d", "hidden")

    def __init__(self, block: TransformerBlock, rows: int) -> None:
        attn, ff = block.attention, block.feed_forward
        self.rows, self.cache = rows, attn.kv_cache
        self.kind, self.k, self.v, self.ks, self.vs, self.lut = _cache_tensors(self.cache)
        self.slots = self.k.shape[2]
        self.lin = [_Linear(m, rows) for m in (attn.wqkv, attn.wo, ff.w13, ff.w2)]
        self.n1, self.n2 = block.attention_norm.weight, block.ffn_norm.weight
        self.eps1, self.eps2 = block.attention_norm.eps, block.ffn_norm.eps
        self.h, self.hkv, self.d, self.hidden = attn.n_heads, attn.n_kv_heads, attn.head_dim, ff.hidden

    def valid(self, block: TransformerBlock, rows: int) -> bool:
        attn = block._modules["attention"]
        keys = self.cache.k_q if self.kind else self.cache.k_cache
        return (rows == self.rows and attn._modules["kv_cache"] is self.cache and keys is self.k
                and all(lin.valid() for lin in self.lin)
                and block._modules["attention_norm"]._parameters["weight"] is self.n1
                and block._modules["ffn_norm"]._parameters["weight"] is self.n2)


class FastDecodeBlock(TransformerBlock):
    """A TransformerBlock whose single-token float32 CPU forward uses fused native ops (same numerics in float32,
    up to summation order)."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor,
                kv_len: int | None) -> Tensor:
        if not self._fast(x, cos, mask, input_pos):
            return super().forward(x, cos, sin, mask, input_pos, kv_len)
        b, _, dim = x.shape
        plan = self.__dict__.get("_plan")
        if plan is None or not plan.valid(self, b):
            plan = self.__dict__["_plan"] = _Plan(self, b)
        lib = cpu_native.library()
        wqkv, wo, w13, w2 = plan.lin
        x2 = x.reshape(b, dim).contiguous()
        xn = torch.empty_like(x2)
        lib.xl_rmsnorm(x2.data_ptr(), None, plan.n1.data_ptr(), xn.data_ptr(), b, dim, plan.eps1)
        qkv = wqkv(xn).contiguous()
        h, d = plan.h, plan.d
        kv = plan.slots if kv_len is None else kv_len
        y = torch.empty(b, h * d)
        scores = torch.empty(b * h * kv)
        ptr = [None if t is None else t.data_ptr() for t in (plan.ks, plan.vs, plan.lut)]
        lib.xl_attn_decode(qkv.data_ptr(), b, h, plan.hkv, d, cos.data_ptr(), sin.data_ptr(), cos.shape[0],
                           plan.k.data_ptr(), plan.v.data_ptr(), *ptr, plan.kind, plan.slots, int(input_pos), kv,
                           mask.data_ptr(), mask.shape[0], y.data_ptr(), scores.data_ptr())
        hres = wo(y).contiguous()  # becomes h = x + attention(x) in the next call
        hn = torch.empty_like(x2)
        lib.xl_rmsnorm(hres.data_ptr(), x2.data_ptr(), plan.n2.data_ptr(), hn.data_ptr(), b, dim, plan.eps2)
        gu = w13(hn).contiguous()
        act = torch.empty(b, plan.hidden)
        lib.xl_silu_mul(gu.data_ptr(), act.data_ptr(), b, plan.hidden)
        return w2(act).add_(hres).view(b, 1, dim)

    def _fast(self, x: Tensor, cos: Tensor, mask: Tensor, input_pos: Tensor) -> bool:
        """Whether this call is a plain one-token float32 CPU step with no autograd (else the reference path); the
        cache a float32 one (KVCache, or kv_cache.FusedKVCache: the same buffers, SDPA on CPUs) or an int8 / fp8
        one of a float32 model."""
        attn = self._modules["attention"]
        cache = attn._modules.get("kv_cache")
        if isinstance(cache, KVCache):
            ok = cache.k_cache.dtype == torch.float32 and cache.k_cache.is_contiguous()
        else:
            ok = isinstance(cache, QuantizedKVCache) and cache.dtype == torch.float32 and cache.k_q.is_contiguous()
        return (ok and x.shape[1] == 1 and x.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.is_grad_enabled() and input_pos.dim() == 1
                and attn.head_dim <= 512 and self._modules["attention_norm"].weight.dtype == torch.float32
                and mask.dtype == torch.bool and mask.is_contiguous() and cos.is_contiguous()
                and cos.dtype == torch.float32)


SKINNY_ROWS = 4


class SkinnyLinear(nn.Linear):
    """nn.Linear whose float32 CPU products of 2-4 rows run as W @ xᵀ. MKL's sgemm for a few rows is 2-3.5x
    slower than for one on the CPU measured (the 49152 x 576 output layer: 34 ms for 3 rows, 9.6 ms for 1, 5 ms as
    W @ xᵀ); speculative verification over k+1 positions is such a product (a 3-token pass of SmolLM2 in float32:
    108.9 -> 64.6 ms). Other shapes (1 row, 5 and more, autograd) are nn.Linear's own."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if (2 <= rows <= SKINNY_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.is_grad_enabled()):
            y = (self.weight @ x.reshape(rows, -1).T).T.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return super().forward(x)


def apply_cpu_decode(model: Transformer) -> int:
    """Swap every block of a CPU float32 model for FastDecodeBlock when the native library builds here, and its
    dense float32 linears for SkinnyLinear; returns the number of blocks swapped (0: the plain forward)."""
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu":
            m.__class__ = SkinnyLinear  # same module, same parameters: only forward changes
    if not cpu_native.available():
        return 0
    n = 0
    for layer in model.layers:
        if type(layer) is TransformerBlock:
            layer.__class__ = FastDecodeBlock  # same module, same parameters: only forward changes
            n += 1
    return n
