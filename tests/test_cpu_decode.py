"""The CPU fast decode path (xpu_llm/cpu_decode.py): fused native RMSNorm, RoPE + cache write + attention and
SwiGLU give the same decode logits as the plain blocks (float32, up to summation order), with left padding,
GQA, q/k/v biases, Llama-3 RoPE and sliding windows, over float32 and int8 / fp8 caches (whose bytes the native
write gives exactly as PyTorch's quantize); anything it does not cover falls back to the plain path."""
from __future__ import annotations

import pytest
import torch

from xpu_llm import LLM
from xpu_llm.cpu_decode import FastDecodeBlock
from xpu_llm.generate import make_batch
from xpu_llm.lowbit.kernels import cpu_native
from xpu_llm.model import TransformerBlock

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="the native CPU library cannot be built here")

PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [7, 1], [100, 31, 6, 6]]


def _decode_logits(model, fast: bool, steps: int = 6) -> list[torch.Tensor]:
    """Prefill three left-padded prompts, then `steps` greedy decode steps; the logits of every step."""
    for layer in model.layers:
        layer.__class__ = FastDecodeBlock if fast else TransformerBlock
    batch = make_batch(PROMPTS, 0, torch.device("cpu"))
    t = batch.tokens.shape[1]
    out = []
    with torch.inference_mode():
        logits = model(batch.tokens, torch.arange(t), pad=batch.pad, kv_len=t, last_only=True)[:, -1]
        for i in range(steps):
            out.append(logits)
            tok = logits.argmax(-1)
            logits = model(tok.view(-1, 1), torch.tensor([t + i]), pad=batch.pad, kv_len=t + i + 1,
                           last_only=True)[:, -1]
    return out


@pytest.mark.parametrize("family", ["llama", "llama_tied", "llama3_rope", "mistral", "qwen2"])
@pytest.mark.parametrize("low_bit", [None, "sym_int4"])
def test_fast_decode_matches_plain_blocks(tiny_checkpoints, family, low_bit):
    llm = LLM(tiny_checkpoints[family][0], low_bit=low_bit, group_size=32, dtype=torch.float32, max_seq_len=64)
    assert all(isinstance(layer, FastDecodeBlock) for layer in llm.model.layers)  # applied by LLM on the CPU
    llm.model.setup_caches(len(PROMPTS), 64)
    fast = _decode_logits(llm.model, fast=True)
    plain = _decode_logits(llm.model, fast=False)
    for step, (a, b) in enumerate(zip(fast, plain)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (family, low_bit, step)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fast_decode_over_a_compressed_cache(tiny_checkpoints, family, kind):
    """With an int8 / fp8 cache the native step writes what the plain path writes (to the last bits of keys that
    the fused norm sums in another order) and attends over the codes as the plain path does over its dequantized
    copy."""
    llm = LLM(tiny_checkpoints[family][0], low_bit=None, dtype=torch.float32, max_seq_len=64, kv_cache_dtype=kind)
    runs = []
    for fast in (True, False):
        llm.model.setup_caches(len(PROMPTS), 64)
        for layer in llm.model.layers:
            layer.attention.kv_cache.k_q.zero_()  # the same starting cache for both runs
            layer.attention.kv_cache.v_q.zero_()
        logits = _decode_logits(llm.model, fast=fast)
        caches = [b.clone() for layer in llm.model.layers for b in layer.attention.kv_cache.buffers()]
        runs.append((logits, caches))
    (fast, fast_cache), (plain, plain_cache) = runs
    for a, b in zip(fast_cache, plain_cache):  # the keys differ in the last bits (the norm's summation order)
        assert (a.double() - b.double()).abs().max() <= (1e-6 * b.double().abs().max() if b.is_floating_point()
                                                         else 1)
    for step, (a, b) in enumerate(zip(fast, plain)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (family, kind, step)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    # the native step ran (and counted as a fast step): a fresh plan per block over the quantized cache
    assert all(layer.__dict__["_plan"].kind > 0 for layer in llm.model.layers)


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_native_cache_write_is_pytorchs_quantize(kind):
    """xl_attn_decode's cache write gives the bytes (and int8 scales) of QuantizedKVCache's PyTorch quantize of the
    same float32 rows: ties rounded to even, saturation, subnormals, signed zeros, an all-zero row."""
    from xpu_llm.cpu_decode import _cache_tensors
    from xpu_llm.kv_cache import QuantizedKVCache

    h, d, s, pos = 2, 48, 4, 1
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 3 * h * d, generator=g) * 4  # q, k, v of 2 heads each (GQA 1)
    k, v = qkv[0, h * d:2 * h * d].view(h, d), qkv[0, 2 * h * d:].view(h, d)
    k[0] *= torch.logspace(-24, 6, d, base=2.0)
    v[1, :8] = torch.tensor([-0.0, 1.0625, 1.1875, -3.25, 2.0 ** -9 * 1.5, -(2.0 ** -17), 464.0, 3e5])
    k[1] = 0.0
    native, ref = (QuantizedKVCache(1, h, s, d, torch.float32, kind=kind) for _ in range(2))
    kind_id, kc, vc, ks, vs, lut = _cache_tensors(native)
    cos, sin = torch.ones(1, d), torch.zeros(1, d)  # RoPE is then the identity
    out, work = torch.empty(1, h * d), torch.empty(h * 2)
    ptr = [None if t is None else t.data_ptr() for t in (ks, vs, lut)]
    cpu_native.library().xl_attn_decode(qkv.data_ptr(), 1, h, h, d, cos.data_ptr(), sin.data_ptr(), 1,
                                        kc.data_ptr(), vc.data_ptr(), *ptr, kind_id, s, pos, 2,
                                        torch.ones(1, 2, dtype=torch.uint8).data_ptr(), 1, out.data_ptr(),
                                        work.data_ptr())
    ref.store(torch.tensor([pos]), k.view(1, h, 1, d), v.view(1, h, 1, d))
    for a, b in zip(native.buffers(), ref.buffers()):
        assert torch.equal(a, b)
    assert torch.count_nonzero(native.k_q[0, 0, pos]) > 0


def test_fast_decode_sliding_window(tmp_path):
    """A window shorter than the context: the mask the model builds is what the fused attention follows."""
    from conftest import make_hf_model
    make_hf_model("mistral", sliding_window=4).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), low_bit=None, dtype=torch.float32, max_seq_len=64)
    llm.model.setup_caches(len(PROMPTS), 64)
    for a, b in zip(_decode_logits(llm.model, True, steps=8), _decode_logits(llm.model, False, steps=8)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_fast_block_falls_back_outside_its_case(tiny_checkpoints):
    """Several positions (prefill, speculative verification), autograd and bfloat16 take the plain forward."""
    llm = LLM(tiny_checkpoints["llama"][0], low_bit=None, dtype=torch.float32, max_seq_len=64)
    block = llm.model.layers[0]
    assert isinstance(block, FastDecodeBlock)
    llm.model.setup_caches(1, 64)
    x = torch.randn(1, 3, llm.config.dim)
    pos = torch.arange(3)
    cos, sin = llm.model.rope_cos[pos].view(1, 1, 3, -1), llm.model.rope_sin[pos].view(1, 1, 3, -1)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    assert not block._fast(x, cos, mask, pos)
    one = x[:, :1].contiguous()
    assert block._fast(one, cos[:, :, :1].contiguous(), mask[:, :, :1].contiguous(), pos[:1]) is False  # grad on
    with torch.no_grad():
        assert block._fast(one, cos[:, :, :1].contiguous(), mask[:, :, :1].contiguous(), pos[:1])
        assert not block._fast(one.bfloat16(), cos[:, :, :1].contiguous(), mask[:, :, :1].contiguous(), pos[:1])


def test_plan_follows_kernel_changes(tiny_checkpoints):
    """The block caches its kernels; switching the layers' activation precision rebuilds that plan."""
    from xpu_llm.lowbit.linear import LowBitLinear
    llm = LLM(tiny_checkpoints["llama"][0], low_bit="sym_int4", group_size=32, max_seq_len=64)  # auto: int8 acts
    lin = [m for m in llm.model.modules() if isinstance(m, LowBitLinear)]
    assert lin and all(m.kernel_dtype == torch.int8 for m in lin)
    llm.model.setup_caches(len(PROMPTS), 64)
    int8 = _decode_logits(llm.model, fast=True)
    for m in lin:
        m.kernel_dtype = None  # exact float32 activations from now on
    exact = _decode_logits(llm.model, fast=True)
    plain = _decode_logits(llm.model, fast=False)
    assert all(layer._plan.lin[0].kernel.int8_activations is False for layer in llm.model.layers)
    for b, c in zip(exact, plain):
        assert (b - c).abs().max() <= 1e-5 * c.abs().max()
    # int8 activations: close, not equal (first step only: later ones may follow other greedy tokens)
    assert 0 < (int8[0] - plain[0]).abs().max() <= 0.05 * plain[0].abs().max()
