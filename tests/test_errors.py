"""Every bad input raises one clear error type (an XpuLLMError) whose message says what to do; the CLI turns
it into one line on stderr and exit code 2; an interrupted convert leaves no folder that loads."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import xpu_llm
from xpu_llm import LLM
from xpu_llm.errors import (CorruptCheckpointError, GenerationInputError, ModelNotFoundError, UnknownFormatError,
                            UnsupportedModelError, XpuLLMError)


@pytest.fixture(scope="module")
def tiny_llm(tiny_checkpoints):
    return LLM(tiny_checkpoints["llama"][0], low_bit=None, dtype=torch.float32, device="cpu", max_seq_len=32)


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        LLM(str(tmp_path))


def test_unsupported_architecture_names_supported_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                       "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 50}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2"):
        LLM(str(tmp_path))


def test_unknown_format_lists_valid_names(tiny_checkpoints):
    with pytest.raises(UnknownFormatError) as e:
        LLM(tiny_checkpoints["llama"][0], low_bit="int3")
    for name in ("sym_int4", "asym_int4", "nf4", "fp4", "sym_int8", "fp8_e4m3", "fp8_e5m2"):
        assert name in str(e.value)


def test_bad_group_size(tiny_checkpoints):
    with pytest.raises(XpuLLMError, match="32, 64, 128"):
        LLM(tiny_checkpoints["llama"][0], low_bit="sym_int4", group_size=48)


def test_truncated_safetensors(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["llama"][0]
    dst = tmp_path / "trunc"
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        LLM(str(dst), low_bit=None)


def test_truncated_gguf(smollm2_path, tmp_path):
    dst = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        dst.write_bytes(f.read(20 * 2**20))
    with pytest.raises(CorruptCheckpointError):
        LLM(str(dst))


def test_prompt_longer_than_max_seq_len(tiny_llm):
    with pytest.raises(GenerationInputError, match="max_seq_len"):
        tiny_llm.generate_ids(torch.arange(40).unsqueeze(0) % 100, max_new_tokens=4)
    with pytest.raises(GenerationInputError, match="max_seq_len"):
        tiny_llm.generate_ids(torch.arange(30).unsqueeze(0) % 100, max_new_tokens=8)
    with pytest.raises(GenerationInputError, match="max_seq_len"):
        tiny_llm.logits(torch.arange(40).unsqueeze(0) % 100)


@pytest.mark.parametrize("n", [0, -3])
def test_max_new_tokens_not_positive(tiny_llm, n):
    with pytest.raises(GenerationInputError, match="max_new_tokens"):
        tiny_llm.generate_ids(torch.tensor([[1, 2, 3]]), max_new_tokens=n)


def test_errors_are_one_family():
    for cls in (ModelNotFoundError, UnsupportedModelError, UnknownFormatError, CorruptCheckpointError,
                GenerationInputError):
        assert issubclass(cls, xpu_llm.XpuLLMError)


def test_interrupted_convert_leaves_nothing_that_loads(tiny_checkpoints, tmp_path, monkeypatch):
    llm = LLM(tiny_checkpoints["llama"][0], low_bit="sym_int4", dtype=torch.float32, device="cpu")
    out = tmp_path / "out"
    import safetensors.torch as st
    real = st.save_file

    def crash(state, path, metadata=None):
        real(dict(list(state.items())[:3]), path, metadata=metadata)  # a partial file, then the "crash"
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        llm.save_low_bit(str(out))
    assert not out.exists(), "a half-written folder was left at the destination"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".xpu-llm-tmp")], "temp folder not cleaned"
    with pytest.raises(ModelNotFoundError):
        LLM(str(out))


def test_cli_error_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "xpu_llm.cli", "generate", "hi", "--model", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "xpu-llm: error:" in r.stderr and "does not exist" in r.stderr
