"""The frozen base for QLoRA: a Hugging Face model whose linears are low-bit (through
`xpu_llm.AutoModelForCausalLM`), its tokenizer, and gradient checkpointing."""
from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import torch
from torch import nn

from ..errors import XpuLLMError
from .fused import fuse_layers

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str | None) -> str:
    """The model argument as a path (None: the embedded SmolLM2 GGUF), checked to exist."""
    from ..loading import resolve_source

    return resolve_source(path).path


def load_tokenizer(path: str, chat_template: str | None = None) -> Any:
    """The model's tokenizer (HF folder or GGUF), padding on the right, with an optional chat template file."""
    from ..tokenizer import load_tokenizer as _load

    tok = _load(path)
    tok.padding_side = "right"
    if chat_template:
        if not os.path.isfile(chat_template):
            raise XpuLLMError(f"chat template file {chat_template!r} does not exist")
        with open(chat_template, encoding="utf-8") as f:
            tok.chat_template = f.read()
    return tok


def load_base(path: str, low_bit: str | None = "nf4", group_size: int = 64, dtype: torch.dtype = torch.float32,
              gradient_checkpointing: bool = True, modules_to_not_convert: list[str] | None = None,
              fuse: bool = True, uncheckpointed_layers: int = 0) -> nn.Module:
    """HF model with frozen low-bit linears (None: dense), every base parameter frozen, KV cache off and,
    optionally, gradient checkpointing (see checkpoint_layers) and fused RMSNorms, SwiGLU gates and rotary
    embeddings (Triton on GPUs; the same formulas elsewhere, see fused.py)."""
    from ..hf import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit=low_bit, group_size=group_size, dtype=dtype,
                                                 modules_to_not_convert=modules_to_not_convert)
    for p in model.parameters():
        p.requires_grad_(False)
    model.name_or_path = model.config._name_or_path = path  # PEFT records it as the adapter's base model
    model.config.use_cache = False
    if fuse:
        fuse_layers(model)
    if gradient_checkpointing:
        checkpoint_layers(model, uncheckpointed_layers)
    return model


def checkpoint_layers(model: nn.Module, uncheckpointed: int = 0, reentrant: bool = True) -> int:
    """Gradient checkpointing (recompute each decoder layer in backward) on every decoder layer but the last
    `uncheckpointed`, which keep their activations: memory for speed (at the Llama-3-8B shape, sequence 1024, batch
    4, 0.33 GiB per layer with LoRA's fused dropout and LoRA A's inputs recomputed, fused.py; 0.74 with PEFT's
    dropout). The last ones, because their backward runs first and frees that memory before any recompute
    allocates. The low-bit linears of checkpointed layers keep the weight that the recompute dequantized for their
    backward, for as long as HF's flag says the block checkpoints (FrozenMatmul, lora_linear, keeps_weight).
    Returns the number of checkpointed layers.

    Reentrant by default: its first forward runs without autograd, which on the 8B shape took 5-12% less host
    time a step than the non-reentrant kind (H200, alternating runs), and QLoRA steps there wait on the host.
    It needs an input that requires grad, so the input embeddings' output is made to (PEFT does the same);
    `backward()` works, `torch.autograd.grad` does not: pass reentrant=False for that."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from .lora import LOW_BIT_LAYERS

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise XpuLLMError(f"{type(model).__name__} does not support gradient checkpointing; "
                          "pass --no-gradient-checkpointing")
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not 0 <= uncheckpointed <= len(layers):
        raise XpuLLMError(f"--uncheckpointed-layers {uncheckpointed}: the model has {len(layers)} decoder "
                          f"layers; pass 0 to {len(layers)}")
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        model.enable_input_require_grads()
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < len(layers) - uncheckpointed
        for m in layer.modules():
            if isinstance(m, LOW_BIT_LAYERS):
                m.recompute_owner = weakref.ref(layer)
    return len(layers) - uncheckpointed


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every low-bit linear under `model` by an nn.Linear holding its dequantized weight, in place:
    the plain float model whose weights are exactly the QLoRA training base (for PEFT merge_and_unload, or
    to check an adapter on a float model)."""
    from .lora import LOW_BIT_LAYERS, layer_device

    for name, mod in list(model.named_modules()):
        if not isinstance(mod, LOW_BIT_LAYERS):
            continue
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        lin.weight = nn.Parameter(mod.dequantize_weight(dtype).to(layer_device(mod)), requires_grad=False)
        if mod.bias is not None:
            lin.bias = nn.Parameter(mod.bias.detach().to(dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    return model
