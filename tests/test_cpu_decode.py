"""The CPU fast decode path (xpu_llm/cpu_decode.py): fused native RMSNorm, RoPE + cache write + attention and
SwiGLU give the same decode logits as the plain blocks (float32, up to summation order), with left padding,
GQA, q/k/v biases, Llama-3 RoPE and sliding windows; anything it does not cover falls back to the plain path."""
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
