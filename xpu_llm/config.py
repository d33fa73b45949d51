"""Model configuration for the Llama family, read from a Hugging Face `config.json` (transformers 4
or 5 layout) or from GGUF metadata (through gguf_io, which speaks the same dict form)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ModelNotFoundError, UnsupportedModelError

# model_type -> family notes. Everything here is the same decoder: RMSNorm, RoPE, GQA, SwiGLU.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False          # q/k/v bias (Qwen2; Llama's attention_bias also covers o)
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: list[int | None] = field(default_factory=list)  # per layer; None = full attention
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if not self.sliding_window:
            self.sliding_window = [None] * self.n_layers
        assert self.n_heads % self.n_kv_heads == 0, (
            f"num_attention_heads ({self.n_heads}) must be a multiple of num_key_value_heads ({self.n_kv_heads})")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from a config.json dict as transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters) writes it."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures") or [model_type]
            raise UnsupportedModelError(
                f"model type {model_type!r} ({', '.join(map(str, archs))}) is not supported; xpu-llm runs the Llama "
                f"family: {', '.join(SUPPORTED_MODEL_TYPES)} (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama ...)")
        rope = dict(cfg.get("rope_parameters") or {})
        if isinstance(rope.get("full_attention"), dict):  # per-layer-type form
            rope = dict(rope["full_attention"])
        legacy = cfg.get("rope_scaling") or {}
        rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {**legacy, **{k: v for k, v in rope.items() if k != "rope_theta"}}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"RoPE scaling type {rope_type!r} is not supported; "
                                        f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        scaling = None if rope_type == "default" else {**scaling, "rope_type": rope_type}
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
        n_layers = int(cfg["num_hidden_layers"])
        n_heads = int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        is_qwen = model_type == "qwen2"
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            dim=int(cfg["hidden_size"]),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            intermediate_size=int(cfg["intermediate_size"]),
            head_dim=int(cfg.get("head_dim") or 0),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=True if is_qwen else bool(cfg.get("attention_bias", False)),
            o_bias=False if is_qwen else bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=_sliding_windows(cfg, model_type, n_layers),
            model_type=model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=cfg.get("pad_token_id"),
        )

    @classmethod
    def from_json_file(cls, path: str) -> "ModelConfig":
        if not os.path.isfile(path):
            raise ModelNotFoundError(f"no config.json at {path}")
        with open(path, encoding="utf-8") as f:
            return cls.from_hf(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**d)

    def param_count(self) -> int:
        """Number of weights (embeddings counted once when tied)."""
        hd = self.head_dim
        attn = self.dim * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * self.dim * self.intermediate_size
        emb = self.vocab_size * self.dim * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * self.dim) + emb + self.dim


def _sliding_windows(cfg: dict[str, Any], model_type: str, n_layers: int) -> list[int | None]:
    window = cfg.get("sliding_window")
    if model_type == "mistral":
        return [int(window) if window else None] * n_layers
    if model_type == "qwen2" and cfg.get("use_sliding_window") and window:
        types = cfg.get("layer_types") or [
            "sliding_attention" if i >= int(cfg.get("max_window_layers", n_layers)) else "full_attention"
            for i in range(n_layers)]
        return [int(window) if t == "sliding_attention" else None for t in types]
    return [None] * n_layers


def rope_inv_freq(cfg: ModelConfig) -> "torch.Tensor":  # noqa: F821
    """Inverse RoPE frequencies (float32), with linear or Llama-3 scaling as the config asks."""
    import torch

    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    if sc["rope_type"] == "linear":
        return inv / float(sc["factor"])
    # llama3: keep high frequencies, divide low ones by `factor`, smooth in between.
    factor = float(sc["factor"])
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", cfg.max_position_embeddings))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
