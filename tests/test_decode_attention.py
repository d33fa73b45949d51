"""The decode-attention kernel (xpu_llm.attention_kernels) against float64 attention over the values the cache
holds: float, int8 and fp8 caches, grouped-query heads, one and several query positions, a head size that is not a
power of two, left padding, per-row slots and a sliding window, one split and several; the store kernel against
PyTorch's writes; then the caches' `attend` and a model's greedy decoding through them against the SDPA path. On a GPU the compiled kernel runs; without one,
the same kernel runs on CPU tensors through Triton's interpreter (a child process)."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import interpreter  # noqa: E402
from interpreter import DEV, here  # noqa: E402

test_interpreter_suite = interpreter.suite(__file__)

KINDS = [None, "int8", "fp8_e4m3", "fp8_e5m2"]


def _cache(kind, b, n_kv, s, d, dtype):
    from xpu_llm.kv_cache import FusedKVCache, QuantizedKVCache
    if kind is None:
        return FusedKVCache(b, n_kv, s, d, dtype, device=DEV)
    return QuantizedKVCache(b, n_kv, s, d, dtype, device=DEV, kind=kind)


def _stored(cache, b, end):
    """The keys and values the cache holds, exactly, in float64 [B, KV heads, end, D]."""
    from xpu_llm.kv_cache import _STORE
    if not hasattr(cache, "k_q"):
        return cache.k_cache[:b, :, :end].double(), cache.v_cache[:b, :, :end].double()
    out = []
    for q, s in ((cache.k_q, cache.k_scale), (cache.v_q, cache.v_scale)):
        q = q[:b, :, :end]
        out.append(q.double() * s[:b, :, :end].double() if cache.kind == "int8"
                   else q.view(_STORE[cache.kind]).double())
    return out


def _reference(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def _fill(cache, b, n_kv, slots, d, dtype, seed):
    """Random keys (with an outlier channel, as real keys have) and values at slots [0, slots)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, n_kv, slots, d, generator=g) * 2
    k[..., 3] *= 8
    v = torch.randn(b, n_kv, slots, d, generator=g)
    cache.update(torch.arange(slots, device=DEV), k.to(DEV, dtype), v.to(DEV, dtype), slots)


CASES = [  # batch, heads, KV heads, positions, head size, cache slots, kv_len
    (2, 6, 2, 1, 64, 320, 300),  # a decode step, GQA 3, several splits
    (1, 8, 2, 3, 80, 200, 160),  # a verification of 3 positions, head size 80 (tile 128, masked)
    (3, 4, 4, 2, 32, 64, 40),  # no GQA, one split
    (1, 32, 8, 1, 128, 1100, 1024),  # the 8B layer's heads, 16 splits
]


@here
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_kernel_matches_float64_over_what_the_cache_holds(kind, dtype, case):
    from xpu_llm.attention_kernels import decode_attention
    from xpu_llm.model import attention_mask

    b, h, n_kv, t, d, s, kv_len = case
    if d == 128 and dtype != torch.bfloat16:
        pytest.skip("the 8B shape once, in bf16")
    cache = _cache(kind, b, n_kv, s, d, dtype)
    _fill(cache, b, n_kv, kv_len, d, dtype, seed=sum(case))
    pad = torch.tensor([0, 7, 30][:b], device=DEV)
    mask = attention_mask(torch.arange(kv_len - t, kv_len, device=DEV), kv_len, pad)
    q = (torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(1)) * 1.5).to(DEV, dtype)
    bufs = ((cache.k_cache, cache.v_cache, None, None) if kind is None
            else (cache.k_q, cache.v_q, cache.k_scale, cache.v_scale))
    got = decode_attention(q, *bufs, kind, mask, kv_len, soft_bf16=not interpreter.ON_GPU)
    want = _reference(q, *_stored(cache, b, kv_len), mask)
    assert got.shape == q.shape and got.dtype == dtype and torch.isfinite(got).all()
    err = ((got.double() - want).norm() / want.norm()).item()
    # float32: summation order only; 16 bits: the output's rounding (2**-9 relative for bf16) and, on GPUs, the
    # probabilities rounded to 16 bits before their product with the values
    assert err <= (1e-5 if dtype == torch.float32 else 4e-3), err


@here
@pytest.mark.parametrize("kind", KINDS)
def test_per_row_slots_and_a_sliding_window(kind):
    """Speculative verification writes each row at its own slots; a sliding-window layer masks old slots."""
    from xpu_llm.attention_kernels import decode_attention
    from xpu_llm.model import attention_mask

    b, h, n_kv, t, d, kv_len = 2, 4, 2, 3, 64, 150
    cache = _cache(kind, b, n_kv, 160, d, torch.float32)
    _fill(cache, b, n_kv, kv_len, d, torch.float32, seed=5)
    pos = torch.tensor([[90, 91, 92], [140, 141, 142]], device=DEV)
    mask = attention_mask(pos, kv_len, torch.tensor([0, 12], device=DEV), window=40)
    q = torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(2)).to(DEV)
    bufs = ((cache.k_cache, cache.v_cache, None, None) if kind is None
            else (cache.k_q, cache.v_q, cache.k_scale, cache.v_scale))
    got = decode_attention(q, *bufs, kind, mask, kv_len, soft_bf16=not interpreter.ON_GPU)
    want = _reference(q, *_stored(cache, b, kv_len), mask)
    assert ((got.double() - want).norm() / want.norm()).item() <= 1e-5


@here
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_store_kernel_writes_what_pytorch_writes(kind, dtype, per_row, monkeypatch):
    """One launch writes the same cache bytes (int8: codes and scales; fp8: rounded to nearest even, saturated,
    subnormals and signed zeros) as the PyTorch ops, from strided k / v."""
    from xpu_llm import kv_cache

    monkeypatch.setattr(kv_cache, "KERNEL_ON_CPU", True)
    b, n_kv, t, d = 3, 4, 5, 48
    g = torch.Generator().manual_seed(9)
    k, v = ((torch.randn(b, t, n_kv, d, generator=g) * 4).to(DEV, dtype).transpose(1, 2) for _ in range(2))
    k[0, 1, 2] = 0.0  # an all-zero row: scale clamped, codes 0
    k[1, 0, 1] *= torch.logspace(-24, 6, d, base=2.0).to(DEV, dtype)  # fp8 subnormals, underflow, saturation
    v[2, 3, 0, :8] = torch.tensor([-0.0, 1.0625, 1.1875, -3.25, 2.0 ** -9 * 1.5, -(2.0 ** -17), 464.0, 3e5])
    pos = (torch.tensor([[3, 4, 5, 6, 7], [10, 11, 12, 13, 14], [0, 1, 2, 3, 4]]) if per_row
           else torch.tensor([20, 21, 22, 23, 24])).to(DEV)
    caches = []
    for fused in ("1", "0"):
        monkeypatch.setenv("XPU_LLM_FUSED_ATTENTION", fused)
        cache = _cache(kind, b + 1, n_kv, 32, d, dtype)
        assert kv_cache.kernel_store(k) == (fused == "1")
        cache.store(pos, k, v)
        caches.append(cache)
    for a, c in zip(caches[0].buffers(), caches[1].buffers()):
        assert torch.equal(a, c)
    assert torch.count_nonzero(next(caches[0].buffers())) > 0


@here
def test_store_kernel_skips_slots_outside_the_cache():
    """A slot past the cache's end is not written (PyTorch's index write would fail; a captured graph cannot), and
    the in-range rows of the same call are."""
    from xpu_llm.attention_kernels import store_kv

    cache = _cache("int8", 1, 2, 8, 16, torch.float32)
    k, v = (torch.randn(1, 2, 3, 16, generator=torch.Generator().manual_seed(s)).to(DEV) for s in (1, 2))
    store_kv(k, v, torch.tensor([6, 7, 8], device=DEV), cache.k_q, cache.v_q, "int8", cache.k_scale, cache.v_scale)
    assert torch.count_nonzero(cache.k_scale[0, :, 6:8]) == 4 and torch.count_nonzero(cache.k_scale[0, :, :6]) == 0
    assert torch.count_nonzero(cache.v_q[0, :, :6]) == 0


@here
@pytest.mark.parametrize("kind", KINDS)
def test_cache_attend_equals_its_sdpa_path(kind, monkeypatch):
    """`attend` through the kernel stores the same cache and returns what the dequantize + SDPA path returns."""
    from xpu_llm import kv_cache
    from xpu_llm.model import attention_mask

    monkeypatch.setattr(kv_cache, "KERNEL_ON_CPU", True)
    b, h, n_kv, d, s = 2, 6, 2, 64, 96
    caches = [_cache(kind, b, n_kv, s, d, torch.float32) for _ in range(2)]
    g = torch.Generator().manual_seed(3)
    outs = []
    for cache, fused in zip(caches, ("1", "0")):
        monkeypatch.setenv("XPU_LLM_FUSED_ATTENTION", fused)
        _fill(cache, b, n_kv, 50, d, torch.float32, seed=4)
        k, v, q = (torch.randn(b, n, 1, d, generator=g.manual_seed(6)).to(DEV) for n in (n_kv, n_kv, h))
        pos = torch.tensor([50], device=DEV)
        assert kv_cache.fused_attention(q, n_kv) == (fused == "1")
        outs.append(cache.attend(q, k, v, pos, 64, attention_mask(pos, 64)))
    for a, c in zip(caches[0].buffers(), caches[1].buffers()):
        assert torch.equal(a, c)
    assert ((outs[0] - outs[1]).norm() / outs[1].norm()).item() <= 1e-5


@here
@pytest.mark.parametrize("kind", [None, "int8"])
def test_greedy_decoding_through_the_kernel_equals_sdpa(kind, tiny_checkpoints, monkeypatch):
    """A tiny Llama decodes the same greedy tokens, plainly and with self-speculative verification
    passes, with its attention in the kernel as through SDPA (small enough that prefills take it too)."""
    from xpu_llm import LLM, attention_kernels, kv_cache

    monkeypatch.setattr(kv_cache, "KERNEL_ON_CPU", True)
    positions = []  # query positions of each kernel call

    def counted(q, *args, **kwargs):
        positions.append(q.shape[2])
        return kernel(q, *args, **kwargs)

    kernel = attention_kernels.decode_attention
    monkeypatch.setattr(attention_kernels, "decode_attention", counted)
    llm = LLM(tiny_checkpoints["llama"][0], low_bit=None, dtype=torch.float32, device=str(DEV), max_seq_len=64,
              kv_cache_dtype=kind)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3], [1, 8, 64, 12, 30, 2]])
    runs = []
    for fused in ("1", "0"):
        monkeypatch.setenv("XPU_LLM_FUSED_ATTENTION", fused)
        runs.append(llm.generate_ids(ids, max_new_tokens=12, ignore_eos=True))
        runs.append(llm.generate_ids(ids, max_new_tokens=12, ignore_eos=True, speculative="layer_skip"))
        if fused == "1":
            # prefills (6 positions), decode steps (1) and verification passes (k + 1) took the kernel
            assert {1, 6} < set(positions), positions
            calls = len(positions)
    assert len(positions) == calls  # and none with XPU_LLM_FUSED_ATTENTION=0
    assert all(torch.equal(r, runs[2]) for r in runs), runs
