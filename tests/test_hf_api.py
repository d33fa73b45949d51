"""The Hugging Face side API: `xpu_llm.AutoModelForCausalLM.from_pretrained(..., load_in_low_bit=...)` and
`xpu_llm.optimize_model` against an independent reference (HF model with dequantize(quantize(w)) weights),
against each other, against `xpu_llm.LLM`, the streaming (no float model) property and the errors."""
from __future__ import annotations

import copy
import logging
import os
import weakref

import pytest
import torch
from torch import nn

import xpu_llm
from xpu_llm import AutoModelForCausalLM, ModelNotFoundError, UnknownFormatError, optimize_model
from xpu_llm.lowbit import LowBitLinear, get_format

FORMATS = ["sym_int4", "asym_int4", "nf4", "sym_int8", "fp8_e4m3"]
TIED = {"llama_tied", "qwen2"}
IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 11], [3, 3, 64, 99, 98, 1, 4, 8]])


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def reference(hf_model: nn.Module, low_bit: str, group_size: int, family: str) -> nn.Module:
    """The HF model with every converted linear weight replaced by dequantize(quantize(w)): the tied lm_head
    (documented choice) keeps its float weight."""
    ref = copy.deepcopy(hf_model)
    fmt = get_format(low_bit)
    with torch.no_grad():
        for name in linear_names(ref):
            if name == "lm_head" and family in TIED:
                continue
            lin = ref.get_submodule(name)
            lin.weight.copy_(fmt.dequantize(fmt.quantize(lin.weight, group_size), group_size))
    return ref


def check_converted(model: nn.Module, hf_model: nn.Module, family: str) -> None:
    for name in linear_names(hf_model):
        mod = model.get_submodule(name)
        if name == "lm_head" and family in TIED:
            assert type(mod) is nn.Linear and mod.weight is model.get_input_embeddings().weight, "tied head untied"
        else:
            assert isinstance(mod, LowBitLinear), f"{name} was not converted ({type(mod).__name__})"
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def greedy(model: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("family,low_bit", [("llama", f) for f in FORMATS] + [("qwen2", f) for f in FORMATS]
                         + [(fam, "sym_int4") for fam in ("llama_tied", "llama3_rope", "mistral")])
def test_from_pretrained_matches_dequantized_reference(tiny_checkpoints, family, low_bit):
    folder, hf_model = tiny_checkpoints[family]
    model = AutoModelForCausalLM.from_pretrained(folder, load_in_low_bit=low_bit, group_size=32)
    check_converted(model, hf_model, family)
    assert model.config.xpu_llm_low_bit["low_bit"] == low_bit
    assert model.config.xpu_llm_low_bit["kept_dense"] == (["lm_head"] if family in TIED else [])
    err = rel_err(logits(model), logits(reference(hf_model, low_bit, 32, family)))
    assert err < 1e-5, f"{family}/{low_bit}: logits differ from the dequantized reference by {err:.2e}"


@pytest.mark.parametrize("family,low_bit", [("llama", "nf4"), ("qwen2", "asym_int4"), ("mistral", "fp8_e4m3")])
def test_optimize_model_equals_from_pretrained(tiny_checkpoints, family, low_bit):
    folder, hf_model = tiny_checkpoints[family]
    optimized = optimize_model(copy.deepcopy(hf_model), low_bit=low_bit, group_size=32)
    check_converted(optimized, hf_model, family)
    loaded = AutoModelForCausalLM.from_pretrained(folder, load_in_low_bit=low_bit, group_size=32)
    assert optimized.config.xpu_llm_low_bit == loaded.config.xpu_llm_low_bit
    assert torch.equal(logits(optimized), logits(loaded))


@pytest.mark.parametrize("family,low_bit", [("llama", f) for f in FORMATS] + [("mistral", "nf4"),
                                                                              ("llama3_rope", "sym_int8")])
def test_hf_generate_matches_engine(tiny_checkpoints, family, low_bit):
    """Untied heads: both sides quantize every linear, lm_head included, bit for bit the same. (For tied heads
    the engine quantizes the shared matrix while the HF API keeps it dense: compared in the next test.)"""
    folder, _ = tiny_checkpoints[family]
    model = AutoModelForCausalLM.from_pretrained(folder, load_in_low_bit=low_bit, group_size=32)
    llm = xpu_llm.LLM(folder, low_bit=low_bit, group_size=32, dtype=torch.float32, device="cpu", max_seq_len=64)
    ids = IDS[:1]
    ours = greedy(model, ids, 16)
    assert ours.shape == (1, ids.shape[1] + 16)
    assert ours.tolist() == llm.generate_ids(ids, max_new_tokens=16, ignore_eos=True).tolist()


@pytest.mark.parametrize("family", sorted(TIED))
def test_tied_generate_matches_reference(tiny_checkpoints, family):
    folder, hf_model = tiny_checkpoints[family]
    model = AutoModelForCausalLM.from_pretrained(folder, load_in_4bit=True, group_size=32)
    assert model.config.xpu_llm_low_bit["low_bit"] == "sym_int4"
    ref = reference(hf_model, "sym_int4", 32, family)
    assert greedy(model, IDS[:1], 16).tolist() == greedy(ref, IDS[:1], 16).tolist()


# ---------------------------------------------------------------------------------------------- options

def test_dense_load_equals_transformers(tiny_checkpoints):
    folder, hf_model = tiny_checkpoints["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not any(isinstance(m, LowBitLinear) for m in model.modules())
    assert torch.equal(logits(model), logits(hf_model))


def test_modules_to_not_convert_and_group_that_does_not_divide(tiny_checkpoints, caplog):
    folder, hf_model = tiny_checkpoints["llama"]
    with caplog.at_level(logging.WARNING, logger="xpu_llm"):
        model = AutoModelForCausalLM.from_pretrained(folder, load_in_4bit=True,  # group 64: 96 inputs do not divide
                                                     modules_to_not_convert=["lm_head", "layers.0.self_attn"])
    info = model.config.xpu_llm_low_bit
    assert info["group_size"] == 64 and info["modules_to_not_convert"] == ["lm_head", "layers.0.self_attn"]
    dense = {n for n in linear_names(model)}
    expected = {"lm_head"} | {f"model.layers.{i}.mlp.down_proj" for i in range(2)} | {
        f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"}
    assert dense == expected == set(info["kept_dense"])
    assert "down_proj: in_features 96 is not a multiple of group_size 64" in caplog.text
    for name in dense:  # dense layers keep the checkpoint's float weight exactly
        assert torch.equal(model.get_submodule(name).weight, hf_model.get_submodule(name).weight)


def test_loader_streams_one_float_linear_at_a_time(tiny_checkpoints, monkeypatch):
    """Deterministic peak-memory property: every float linear weight read from the checkpoint is freed (its
    weak reference is dead) before the next tensor is read, and each is read exactly once."""
    from xpu_llm import safetensors_io
    folder, hf_model = tiny_checkpoints["llama"]
    where = {(e.file, e.start): n for n, e in safetensors_io.checkpoint_index(folder).items()}
    linear_weights = {f"{n}.weight" for n in linear_names(hf_model)}
    real, alive, read = safetensors_io.read_tensor, [], []

    def spy(entry, rows=None):
        still = [name for name, ref in alive if ref() is not None]
        assert not still, f"float weights {still} still alive when the next tensor is read"
        t = real(entry, rows)
        name = where[(entry.file, entry.start)]
        read.append(name)
        if name in linear_weights:
            alive.append((name, weakref.ref(t)))
        return t

    monkeypatch.setattr(safetensors_io, "read_tensor", spy)
    model = AutoModelForCausalLM.from_pretrained(folder, load_in_low_bit="sym_int8", group_size=32)
    assert [name for name, ref in alive if ref() is not None] == []
    assert sorted(read) == sorted(where.values())  # each tensor once, no second pass
    assert {n for n, _ in alive} == linear_weights
    assert all(isinstance(model.get_submodule(n[:-len(".weight")]), LowBitLinear) for n in linear_weights)


# ---------------------------------------------------------------------------------------------- errors

def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "nope"), load_in_4bit=True)


def test_unknown_format(tiny_checkpoints):
    folder, hf_model = tiny_checkpoints["llama"]
    with pytest.raises(UnknownFormatError, match="sym_int4.*nf4"):
        AutoModelForCausalLM.from_pretrained(folder, load_in_low_bit="int3")
    with pytest.raises(UnknownFormatError, match="valid formats"):
        optimize_model(copy.deepcopy(hf_model), low_bit="q4_k")


def test_incomplete_checkpoint_names_what_is_missing(tiny_checkpoints, tmp_path):
    import shutil

    from safetensors.torch import save_file
    folder, hf_model = tiny_checkpoints["llama"]
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "model.norm.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(xpu_llm.XpuLLMError, match="no data for model.norm.weight"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path), load_in_low_bit="nf4", group_size=32)


# ---------------------------------------------------------------------------------------------- real model

@pytest.mark.slow
def test_smollm2_gguf_low_bit_matches_optimized_dense(smollm2_path):
    """The low-bit GGUF path (streamed through gguf_io) equals transformers' dense GGUF load + optimize_model.
    float32 on both sides: each then quantizes the same dequantized weights (in bf16 each would first round them
    its own way, and a near-tie token may flip)."""
    import transformers
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, load_in_low_bit="sym_int4", dtype=torch.float32)
    folder, name = os.path.split(smollm2_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                            dtype=torch.float32)
    assert isinstance(model.model.layers[0].mlp.down_proj, LowBitLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # SmolLM2 ties its embeddings
    ref = optimize_model(ref.eval(), low_bit="sym_int4")
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    out = greedy(model, ids, 8)
    assert out.shape == (1, 14) and out.tolist() == greedy(ref, ids, 8).tolist()
