"""xpu_llm.finetune: QLoRA on Hugging Face models with frozen low-bit linears.

    from xpu_llm.finetune import load_base, add_lora
    model = add_lora(load_base(path, "nf4"), r=16, lora_alpha=32)   # a peft.PeftModel; train it anywhere

Pieces: lora.py (PEFT's custom-layer hook for LowBitLinear), storage.py (ZeRO-3-partitionable packed weights),
data.py (JSONL -> answer-only labels, packing, global batches), train.py (the `accelerate launch` entry),
checkpoint.py (atomic resumable checkpoints), fused.py + kernels.py (Triton RMSNorm, SwiGLU and rotary embedding
for training), model.py (the frozen base, gradient checkpointing), gc_steps.py (garbage collection between steps),
export.py (adapter -> engine low-bit folder), configs/."""
from __future__ import annotations

__all__ = ["add_lora", "lora_config", "load_adapter", "LowBitLoraLinear", "load_base", "load_tokenizer",
           "dequantize_linears", "export", "PackedLowBitLinear", "pack_low_bit_layers", "config_path",
           "fuse_layers", "checkpoint_layers"]

_WHERE = {"add_lora": "lora", "lora_config": "lora", "load_adapter": "lora", "LowBitLoraLinear": "lora",
          "load_base": "model", "checkpoint_layers": "model", "load_tokenizer": "model",
          "dequantize_linears": "model", "export": "export",
          "PackedLowBitLinear": "storage", "pack_low_bit_layers": "storage", "fuse_layers": "fused"}


def config_path(name: str) -> str:
    """Path of a shipped accelerate / DeepSpeed config, e.g. config_path("deepspeed_zero3.yaml")."""
    import os

    path = os.path.join(os.path.dirname(__file__), "configs", name)
    if not os.path.isfile(path):
        from ..errors import XpuLLMError
        raise XpuLLMError(f"no config {name!r}; shipped: {', '.join(sorted(os.listdir(os.path.dirname(path))))}")
    return path


def __getattr__(name: str):
    # Lazy: `import xpu_llm.finetune` must not pull in peft / transformers (the CLI imports finetune.args).
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
