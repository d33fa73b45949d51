"""On a GPU (XPU or CUDA, whichever xpu_llm.device picks), the engine gives the CPU's float32 results for every
format: logits to 1e-4 and identical greedy tokens; bf16 runs and agrees loosely. Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from xpu_llm import LLM
from xpu_llm.device import get_device, is_gpu
from xpu_llm.lowbit.formats import LOW_BIT_NAMES

GPU = get_device()
pytestmark = pytest.mark.skipif(not is_gpu(GPU), reason="no GPU (XPU or CUDA) here")

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [0, 0, 0, 23, 84, 62, 64, 33]])
MASK = (IDS != 0).long()


@pytest.mark.parametrize("low_bit", [None, *LOW_BIT_NAMES], ids=lambda f: str(f))
def test_gpu_matches_cpu_float32(tiny_checkpoints, low_bit):
    path = tiny_checkpoints["llama"][0]
    cpu = LLM(path, low_bit=low_bit, group_size=32, dtype=torch.float32, device="cpu", max_seq_len=64)
    gpu = LLM(path, low_bit=low_bit, group_size=32, dtype=torch.float32, device=GPU, max_seq_len=64)
    a, b = cpu.logits(IDS, MASK), gpu.logits(IDS, MASK).cpu()
    valid = MASK.bool()
    err = ((a[valid] - b[valid]).norm() / a[valid].norm()).item()
    assert err < 1e-4, f"{low_bit}: GPU logits differ from CPU by {err:.2e}"
    out_a = cpu.generate_ids(IDS, max_new_tokens=16, attention_mask=MASK, ignore_eos=True)
    out_b = gpu.generate_ids(IDS, max_new_tokens=16, attention_mask=MASK, ignore_eos=True)
    assert out_a.tolist() == out_b.tolist()


@pytest.mark.parametrize("low_bit", ["sym_int4", "nf4", "fp8_e4m3"])
def test_gpu_bf16_close(tiny_checkpoints, low_bit):
    path = tiny_checkpoints["llama"][0]
    ref = LLM(path, low_bit=low_bit, group_size=32, dtype=torch.float32, device="cpu", max_seq_len=64)
    fast = LLM(path, low_bit=low_bit, group_size=32, device=GPU, max_seq_len=64)  # auto: bf16 on GPUs
    assert fast.dtype == torch.bfloat16
    a, b = ref.logits(IDS[:1]), fast.logits(IDS[:1]).cpu()
    assert ((a - b).norm() / a.norm()).item() < 3e-2


@pytest.mark.parametrize("low_bit", [None, "sym_int4", "nf4"], ids=lambda f: str(f))
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_graphed_decode_equals_eager(tiny_checkpoints, low_bit, family, monkeypatch):
    """The graph-captured decode step (one graph per batch size and cache bucket, replayed at every position)
    gives the eager step's tokens, batch 1 and 2 (left-padded), twice in a row (the second call replays the
    first's graph). Batch 2 sets up new caches, which drops batch 1's graph (it holds the old cache's memory)."""
    from xpu_llm.graphs import GraphedStep
    path = tiny_checkpoints[family][0]
    llm = LLM(path, low_bit=low_bit, group_size=32, dtype=torch.float32, device=GPU, max_seq_len=64)
    for ids, mask in ((IDS[:1], MASK[:1]), (IDS, MASK)):
        monkeypatch.setenv("XPU_LLM_GRAPHS", "0")
        eager = llm.generate_ids(ids, max_new_tokens=24, attention_mask=mask, ignore_eos=True).tolist()
        monkeypatch.setenv("XPU_LLM_GRAPHS", "1")
        for _ in range(2):
            assert llm.generate_ids(ids, max_new_tokens=24, attention_mask=mask, ignore_eos=True).tolist() == eager
        graphs = llm.model.__dict__["_decode_graphs"]
        # (batch, cache slots read): one bucket, the whole 64-slot cache
        assert set(graphs) == {(len(ids), 64)}, set(graphs)
        assert all(isinstance(g, GraphedStep) and g.replay and g.kv_len == 64 for g in graphs.values())


@pytest.mark.parametrize("low_bit", [None, "sym_int4"], ids=lambda f: str(f))
def test_compiled_decode_equals_eager(tiny_checkpoints, low_bit, monkeypatch):
    """compile=True (torch.compile'd step inside the captured graph) gives the eager step's tokens, batch 1 and 2."""
    path = tiny_checkpoints["llama"][0]
    llm = LLM(path, low_bit=low_bit, group_size=32, dtype=torch.float32, device=GPU, max_seq_len=64, compile=True)
    for ids, mask in ((IDS[:1], MASK[:1]), (IDS, MASK)):
        monkeypatch.setenv("XPU_LLM_GRAPHS", "0")
        eager = llm.generate_ids(ids, max_new_tokens=24, attention_mask=mask, ignore_eos=True).tolist()
        monkeypatch.setenv("XPU_LLM_GRAPHS", "1")
        assert llm.generate_ids(ids, max_new_tokens=24, attention_mask=mask, ignore_eos=True).tolist() == eager


@pytest.mark.parametrize("kind", ["lookup", "layer_skip", "lowbit"])
def test_graphed_speculative_equals_plain(tiny_checkpoints, kind):
    """Speculative decoding with graph-captured verification passes and draft steps (one graph per batch and
    number of positions) gives plain greedy's tokens, batch 1 and 2 (left-padded), twice in a row (replays)."""
    from xpu_llm.graphs import GraphedForward
    path = tiny_checkpoints["llama"][0]
    llm = LLM(path, low_bit=None, dtype=torch.float32, device=GPU, max_seq_len=64)  # dense: lowbit applies
    for ids, mask in ((IDS[:1], MASK[:1]), (IDS, MASK)):
        plain = llm.generate_ids(ids, max_new_tokens=24, attention_mask=mask, ignore_eos=True).tolist()
        for _ in range(2):
            got = llm.generate_ids(ids, max_new_tokens=24, attention_mask=mask, ignore_eos=True, speculative=kind)
            assert got.tolist() == plain, f"{kind}: speculative tokens differ from plain greedy"
    graphs = llm.model.__dict__["_forward_graphs"]
    assert graphs and all(isinstance(g, GraphedForward) and g.replay for g in graphs.values())


@pytest.mark.parametrize("low_bit", ["sym_int4", "asym_int4", "nf4", "fp4", "sym_int8", "fp8_e4m3"])
def test_lowbit_backward_uses_exact_weight(low_bit):
    """The QLoRA backward (grad @ W, W dequantized by one Triton kernel on GPUs) equals grad @ the reference
    dequantized weight, in bf16 and float32, and the forward/backward pair gives the dense layer's input grad."""
    from xpu_llm.lowbit.formats import get_format
    from xpu_llm.lowbit.linear import LowBitLinear
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=gen) * 0.05
    fmt = get_format(low_bit)
    layer = LowBitLinear.from_quantized(fmt.quantize(w, 32), 128, 96, low_bit, 32).to(GPU)
    for dtype in (torch.bfloat16, torch.float32):
        ref_w = fmt.dequantize({k: v.cpu() for k, v in layer.tensors().items()}, 32, dtype)
        assert torch.equal(layer.dequantize_weight(dtype).cpu(), ref_w), f"{low_bit} {dtype}: dequantize differs"
        x = torch.randn(5, 128, generator=gen).to(GPU, dtype).requires_grad_()
        g = torch.randn(5, 96, generator=gen).to(GPU, dtype)
        layer(x).backward(g)
        torch.testing.assert_close(x.grad.cpu(), g.cpu() @ ref_w, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-3 if dtype == torch.bfloat16 else 1e-6)


def test_fused_head_loss_under_bf16_autocast():
    """The training loss with the nf4 output head fused into the cross-entropy (finetune/loss.py), over several
    chunks under bf16 autocast, against the float64 loss and input gradient on the same dequantized weight."""
    import torch.nn.functional as F

    from xpu_llm.finetune.loss import head_cross_entropy
    from xpu_llm.lowbit.formats import get_format
    from xpu_llm.lowbit.linear import LowBitLinear
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 256, generator=gen) * 0.05
    head = LowBitLinear.from_quantized(get_format("nf4").quantize(w, 64), 256, 1000, "nf4", 64).to(GPU)
    h = torch.randn(300, 256, generator=gen).to(GPU, torch.bfloat16).requires_grad_()
    t = torch.randint(0, 1000, (300,), generator=gen).to(GPU)
    with torch.autocast(GPU.type, dtype=torch.bfloat16):
        loss = head_cross_entropy(h, head, t, chunk_bytes=4 * 1000 * 128)  # 3 chunks, the last partial
    loss.backward()
    hd = h.detach().double().requires_grad_()
    ref = F.cross_entropy(hd @ head.dequantize_weight(torch.float32).double().T, t, reduction="sum")
    ref.backward()
    assert abs(loss.item() - ref.item()) < 2e-3 * abs(ref.item())  # bf16 logits
    assert ((h.grad.double() - hd.grad).norm() / hd.grad.norm()).item() < 2e-2


@pytest.mark.parametrize("low_bit", [None, "auto", "sym_int4", "asym_int4", "nf4", "fp4", "sym_int8", "fp8_e4m3",
                                     "fp8_e5m2"], ids=lambda f: str(f))
def test_smollm2_gpu_greedy_equals_cpu(smollm2_path, low_bit):
    """SmolLM2 (the real weights) on the GPU kernels, float32 accumulation, gives the CPU reference path's greedy
    tokens for 32 new tokens on two prompts."""
    kw = dict(low_bit=low_bit, dtype=torch.float32, max_seq_len=128)
    cpu, gpu = LLM(smollm2_path, device="cpu", **kw), LLM(smollm2_path, device=GPU, **kw)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    ids = [cpu.encode(p) for p in prompts]
    for row in ids:
        t = torch.tensor([row])
        a = cpu.generate_ids(t, max_new_tokens=32, ignore_eos=True).tolist()
        b = gpu.generate_ids(t, max_new_tokens=32, ignore_eos=True).tolist()
        assert a == b, f"{low_bit}: GPU greedy tokens differ from the CPU reference"
