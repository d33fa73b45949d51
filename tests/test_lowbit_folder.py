"""The engine's low-bit folder: save then load is bit-identical for every format (packed tensors, scales,
float parameters) and gives the same logits; the embedded GGUF converts and reloads with its tokenizer."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from xpu_llm import LLM
from xpu_llm.lowbit.formats import FORMATS

FORMAT_NAMES = [None] + list(FORMATS)


@pytest.mark.parametrize("low_bit", FORMAT_NAMES, ids=lambda f: str(f))
def test_round_trip_bit_identical(tiny_checkpoints, tmp_path, low_bit):
    llm = LLM(tiny_checkpoints["llama"][0], low_bit=low_bit, group_size=32, dtype=torch.float32, device="cpu",
              max_seq_len=32)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    before = llm.logits(ids)
    out = llm.save_low_bit(str(tmp_path / "q"))
    again = LLM(out, dtype=llm.dtype, device="cpu", max_seq_len=32)
    sd_a = {k: v for k, v in llm.model.state_dict().items()}
    sd_b = {k: v for k, v in again.model.state_dict().items()}
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert sd_a[k].dtype == sd_b[k].dtype, k
        assert torch.equal(sd_a[k].view(torch.uint8) if sd_a[k].dtype.itemsize == 1 else sd_a[k],
                           sd_b[k].view(torch.uint8) if sd_b[k].dtype.itemsize == 1 else sd_b[k]), k
    assert torch.equal(before, again.logits(ids))
    # and the file itself holds exactly the saved tensors
    on_disk = load_file(f"{out}/model.safetensors")
    for k, v in on_disk.items():
        assert torch.equal(v.view(torch.uint8), sd_a[k].contiguous().view(torch.uint8)), k


@pytest.mark.slow
def test_gguf_convert_and_reload(smollm2_path, tmp_path):
    llm = LLM(smollm2_path, dtype=torch.float32, device="cpu", max_seq_len=64)
    out = llm.save_low_bit(str(tmp_path / "smol"))
    again = LLM(out, dtype=torch.float32, device="cpu", max_seq_len=64)
    assert again.low_bit == "asym_int4"
    ids = torch.tensor([llm.tokenizer("The quick brown fox")["input_ids"]])
    assert torch.equal(llm.logits(ids), again.logits(ids))
    assert again.tokenizer("The quick brown fox")["input_ids"] == ids[0].tolist()
    a = llm.generate("Name a colour.", max_new_tokens=8, chat=True)[0].text
    b = again.generate("Name a colour.", max_new_tokens=8, chat=True)[0].text
    assert a == b and a


@pytest.mark.parametrize("low_bit", ["sym_int4", "asym_int4", "nf4", "sym_int8", "fp8_e4m3"])
def test_chunked_quantization_is_identical(low_bit):
    """The loader quantizes large matrices in row chunks (bounded temporaries); the codes must not change."""
    from xpu_llm.loading import quantize_rows
    from xpu_llm.lowbit.formats import get_format
    w = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0))
    whole = get_format(low_bit).quantize(w, 32)
    chunked = quantize_rows(low_bit, w, 32, chunk=96)
    for k in whole:
        assert torch.equal(whole[k].view(torch.uint8) if whole[k].element_size() == 1 else whole[k],
                           chunked[k].view(torch.uint8) if chunked[k].element_size() == 1 else chunked[k]), k
