"""Float32 parity with Hugging Face transformers: logits to 1e-4 relative and identical 32-token greedy
continuations, batch 1 and batch 3 (left-padded), on tiny random configs of every family and on SmolLM2."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES
from xpu_llm import LLM

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11, 3, 64], [99, 98, 1, 4, 8]]


def padded(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (t - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_parity(llm: LLM, hf_model, prompts: list[list[int]], new_tokens: int = 32) -> None:
    ids, mask = padded(prompts)
    ours = llm.logits(ids, attention_mask=mask)
    ref = hf_logits(hf_model, ids, mask)
    valid = mask.bool()
    err = rel_err(ours[valid], ref[valid])
    assert err < 1e-4, f"logits differ from transformers: relative error {err:.2e}"
    out = llm.generate_ids(ids, max_new_tokens=new_tokens, attention_mask=mask, ignore_eos=True)
    hf_model.generation_config.pad_token_id = 0
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref_out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    assert out.tolist() == ref_out.tolist(), "greedy continuation differs from transformers"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_family_matches_transformers(tiny_checkpoints, family, batch):
    path, hf_model = tiny_checkpoints[family]
    llm = LLM(path, low_bit=None, dtype=torch.float32, device="cpu", max_seq_len=64)
    check_parity(llm, hf_model, PROMPTS[:batch])


def test_mistral_sliding_window_matches_transformers(tmp_path):
    from conftest import make_hf_model
    hf_model = make_hf_model("mistral", sliding_window=4)
    hf_model.config._attn_implementation = "eager"
    hf_model.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), low_bit=None, dtype=torch.float32, device="cpu", max_seq_len=64)
    ids, mask = padded(PROMPTS[:1])
    err = rel_err(llm.logits(ids)[0], hf_logits(hf_model, ids, mask)[0])
    assert err < 1e-4, f"sliding-window logits differ: {err:.2e}"


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path):
    import os

    from transformers import AutoModelForCausalLM
    folder, name = os.path.split(smollm2_path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("low_bit", [None, "auto"], ids=["dense", "gguf_native_asym_int4"])
def test_smollm2_matches_transformers_dequantized_gguf(smollm2_path, hf_smollm2, low_bit):
    """Dense (dequantized on load) and native Q4_1-as-asym_int4 (float32 compute) both equal transformers'
    dequantized GGUF load: the Q4_1 blocks are copied without a second rounding."""
    llm = LLM(smollm2_path, low_bit=low_bit, dtype=torch.float32, device="cpu", max_seq_len=128)
    assert llm.low_bit == (None if low_bit is None else "asym_int4")
    tok = llm.tokenizer
    prompts = [tok("The capital of France is")["input_ids"], tok("def fibonacci(n):")["input_ids"],
               tok("Once upon a time, in a small village near the mountains, there lived")["input_ids"]]
    for batch in (1, 3):
        check_parity(llm, hf_smollm2, prompts[:batch])
