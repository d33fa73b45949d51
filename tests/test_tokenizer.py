"""Tokenizers: GGUF conversion matches transformers, is cached once and reused, carries the chat template."""
from __future__ import annotations

import os

import pytest

from xpu_llm import tokenizer as tk
from xpu_llm.errors import CorruptCheckpointError, ModelNotFoundError

TEXT = "Hello, world! The quick brown fox."


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tok-cache"))


@pytest.fixture(scope="module")
def tok(smollm2_path, cache):
    return tk.load_tokenizer(smollm2_path, cache_dir=cache)


@pytest.mark.slow
def test_matches_transformers_gguf_tokenizer(tok, smollm2_path):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path),
                                        local_files_only=True)
    assert tok(TEXT)["input_ids"] == ref(TEXT)["input_ids"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.padding_side == "left"


@pytest.mark.slow
def test_cache_written_once_and_reused(tok, smollm2_path, cache, monkeypatch):
    (entry,) = os.listdir(cache)  # one folder, no temp leftovers
    folder = os.path.join(cache, entry)
    mtime = os.stat(os.path.join(folder, "tokenizer.json")).st_mtime_ns

    def no_conversion(path):
        raise AssertionError("converted again instead of loading the cache")

    monkeypatch.setattr(tk, "convert_gguf_tokenizer", no_conversion)
    again = tk.load_tokenizer(smollm2_path, cache_dir=cache)
    assert again(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert again.padding_side == "left" and again.pad_token_id == 2
    assert os.listdir(cache) == [entry]
    assert os.stat(os.path.join(folder, "tokenizer.json")).st_mtime_ns == mtime
    # the cached folder is a plain HF tokenizer folder
    assert tk.load_tokenizer(folder)(TEXT)["input_ids"] == tok(TEXT)["input_ids"]


@pytest.mark.slow
def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError):
        tk.load_tokenizer(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="holds no tokenizer"):
        tk.load_tokenizer(str(tmp_path))


def test_not_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(CorruptCheckpointError):
        tk.load_tokenizer(str(bad))


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("XPU_LLM_CACHE", str(tmp_path))
    assert tk.cache_root() == os.path.join(str(tmp_path), "tokenizers")
    assert tk.cache_root(str(tmp_path / "c")) == str(tmp_path / "c")
    monkeypatch.delenv("XPU_LLM_CACHE")
    assert tk.cache_root().endswith(os.path.join(".cache", "xpu_llm", "tokenizers"))
