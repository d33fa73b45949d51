"""LoRA on low-bit layers through PEFT's own extension point for custom layers
(`LoraConfig._register_custom_module`): PEFT itself is not patched, so `peft.get_peft_model`, HF `Trainer`
and TRL's `SFTTrainer` work on a model whose linears are `LowBitLinear`, and adapters save in standard PEFT
format that loads onto the plain float model."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..errors import XpuLLMError
from ..lowbit.kernels import lowbit_matmul
from ..lowbit.linear import LowBitLinear
from .fused import triton_module, use_kernels
from .storage import PackedLowBitLinear

log = logging.getLogger(__name__)

LOW_BIT_LAYERS: tuple[type[nn.Module], ...] = (LowBitLinear, PackedLowBitLinear)


def requantized_like(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A new layer of `layer`'s class and format holding `weight` (float [N, K]) quantized again."""
    q = layer.fmt.quantize(weight, layer.group_size)
    new = LowBitLinear.from_quantized(q, layer.in_features, layer.out_features, layer.low_bit, layer.group_size,
                                      bias=bias)
    new.kernel_dtype = getattr(layer, "kernel_dtype", None)
    if isinstance(layer, PackedLowBitLinear):
        new = PackedLowBitLinear.from_lowbit(new, layer.storage_dtype)
    return new.to(layer_device(layer))


def layer_device(layer: nn.Module) -> torch.device:
    """The device a layer's tensors live on."""
    t = next(iter(layer.buffers()), None)
    if t is None:
        t = next(iter(layer.parameters()))
    return t.device


def fused_lora_on() -> bool:
    """False when XPU_LLM_FUSED_LORA_DROPOUT=0: PEFT's own dropout, A and B modules for every LoRA layer (an A/B
    switch; the fused kernels and the one-node layer are the default)."""
    return os.environ.get("XPU_LLM_FUSED_LORA_DROPOUT", "1") != "0"


def grouped_lora_on() -> bool:
    """False when XPU_LLM_GROUPED_LORA=0: q/k/v and gate/up take one autograd node each (an A/B switch; one node
    per group of linears that share their input is the default, see LowBitLoraLinear.forward_group)."""
    return os.environ.get("XPU_LLM_GROUPED_LORA", "1") != "0"


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks (its own or global ones: DeepSpeed, accelerate, user hooks)."""
    from torch.nn.modules import module as m

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks)


def lora_a(a: nn.Module, dropout: nn.Module, x2d: torch.Tensor) -> torch.Tensor:
    """a(dropout(x2d)): through lora_dropout's fused kernels when dropout is active and the kernels take the
    input (a GPU tensor, or a CPU one under Triton's interpreter), so neither the dropped-out input nor its mask
    is written or kept for backward; PEFT's modules otherwise, or when XPU_LLM_FUSED_LORA_DROPOUT=0."""
    k = triton_module("lora_dropout")
    if (k is not None and fused_lora_on() and type(dropout) is nn.Dropout
            and dropout.training and 0 < dropout.p < 1 and type(a) is nn.Linear and a.bias is None
            and not hasattr(a.weight, "ds_id") and use_kernels(x2d) and k.supported(x2d, a.weight)):
        return k.dropout_lora_a(x2d, a.weight, dropout.p)
    return a(dropout(x2d))


class LowBitLoraLinear(PeftLoraLinear):
    """PEFT's `lora.Linear` around a frozen low-bit base: y = base(x) + B(A(dropout(x))) * scaling. The base's
    backward gives only the input gradient (from the dequantized weight); merging dequantizes, adds B @ A *
    scaling and quantizes again in the base's own format."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, None]:
        # The adapter lives on the base's device in float32 (no float dtype to copy from a packed weight).
        return layer_device(base_layer), None

    def _cast_input_dtype(self, x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """PEFT casts the input to the adapter's dtype (float32) before dropout and A. Under autocast, A's matmul
        casts it straight back to the autocast dtype, so an input already in that dtype is left as it is: the
        same matmul inputs without two copies of x per layer and pass (and their backward), and dropout on
        half the bytes (an 8B QLoRA step on an H200: 0.61 -> 0.51 s)."""
        if x is not None and x.is_floating_point():
            kind = x.device.type
            if torch.is_autocast_enabled(kind) and x.dtype == torch.get_autocast_dtype(kind):
                return x
        return super()._cast_input_dtype(x, dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """PEFT's forward, with each plain-LoRA update folded into one GEMM: y = base(x) + scaling * A(dropout(x))
        @ B^T is `base(x).addmm_(h, B^T, alpha=scaling)`, so neither the B product nor `* scaling` is written out
        as a separate [tokens, out] tensor, in forward or backward; active dropout is fused into A's product
        (`lora_a`). Everything else (merged or disabled
        adapters, mixed batches, lora_bias, B partitioned by ZeRO-3) takes PEFT's own path."""
        if args or kwargs or self.disable_adapters or self.merged or not self._fused_ok():
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x)
        x2d = x.reshape(-1, x.shape[-1])
        names = [n for n in self.active_adapters if n in self.lora_A]
        if len(names) == 1 and (out := self._one_node(x2d, names[0])) is not None:
            return out.view(*x.shape[:-1], out.shape[-1])
        out = self.base_layer(x2d)  # a new [M, N] tensor (frozen_forward), nobody's saved tensor: add into it
        dtype, shape = out.dtype, (*x.shape[:-1], out.shape[-1])
        for name in names:
            a, b = self.lora_A[name], self.lora_B[name]
            h = lora_a(a, self.lora_dropout[name], self._cast_input_dtype(x2d, a.weight.dtype))
            if out.dtype == h.dtype and out._base is None:
                # In place: an out-of-place addmm first copies `out` (a [tokens, out] memcpy per layer and pass).
                # In-place ops skip autocast, so B is cast here as autocast would cast it.
                out.addmm_(h, b.weight.t().to(h.dtype), alpha=self.scaling[name])
            else:
                out = torch.addmm(out.to(h.dtype), h, b.weight.t(), alpha=self.scaling[name])
        return out.view(shape).to(dtype)

    def _one_node(self, x2d: torch.Tensor, name: str) -> torch.Tensor | None:
        """The whole layer (base and adapter `name`) as one autograd node (lora_linear.py) where it applies, with
        Triton's kernels on this input and XPU_LLM_FUSED_LORA_DROPOUT not 0; None otherwise."""
        lin = triton_module("lora_linear")
        a, b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if (lin is None or not fused_lora_on() or not use_kernels(x2d)
                or self._cast_input_dtype(x2d, a.weight.dtype) is not x2d  # A in x's dtype, as under autocast
                or not lin.applies(self.base_layer, a, b, dropout, x2d)):
            return None
        return lin.lora_linear(x2d, self.base_layer, lowbit_matmul, a.weight, b.weight, lin.dropout_p(dropout),
                               self.scaling[name])

    @staticmethod
    def forward_group(layers: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor] | None:
        """[layer(x) for layer in layers] as one autograd node (lora_linear.lora_linears) when they are 2-3
        LowBitLoraLinear layers that would each take the one-node path (`_one_node`) with one adapter of the same
        rank and dropout p, and calling them runs no hooks; None otherwise (call them one by one). Each adapter
        keeps its own dropout mask, drawn in the order of the calls it replaces."""
        lin = triton_module("lora_linear")
        if (lin is None or not 2 <= len(layers) <= 3 or not grouped_lora_on() or not fused_lora_on()
                or not use_kernels(x) or not all(type(m) is LowBitLoraLinear and not _hooked(m) for m in layers)):
            return None
        x2d = x.reshape(-1, x.shape[-1])
        parts = []
        for m in layers:
            names = [n for n in m.active_adapters if n in m.lora_A]
            if m.disable_adapters or m.merged or len(names) != 1 or not m._fused_ok():
                return None
            a, b, dropout = m.lora_A[names[0]], m.lora_B[names[0]], m.lora_dropout[names[0]]
            if (m._cast_input_dtype(x2d, a.weight.dtype) is not x2d
                    or not lin.applies(m.base_layer, a, b, dropout, x2d)):
                return None
            parts.append((m.base_layer, a.weight, b.weight, lin.dropout_p(dropout), m.scaling[names[0]]))
        bases, a_weights, b_weights, ps, scalings = zip(*parts)
        if len({w.shape[0] for w in a_weights}) != 1 or len(set(ps)) != 1:
            return None
        for m in layers:
            m._check_forward_args(x)
        outs = lin.lora_linears(x2d, bases, lowbit_matmul, a_weights, b_weights, ps[0], scalings)
        return [out.view(*x.shape[:-1], out.shape[-1]) for out in outs]

    def _fused_ok(self) -> bool:
        """True when every active adapter is plain LoRA whose B is an ordinary local weight without a bias."""
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            b = self.lora_B[name]
            if (name in self.lora_variant or b.bias is not None or hasattr(b.weight, "ds_id")
                    or type(b) is not nn.Linear):
                return False
        return True

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise XpuLLMError(f"{type(variant).__name__} is not supported on low-bit layers; use plain LoRA "
                              "(use_dora=False and no other LoRA variant)")
        return None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the active adapters into the base: dequantize, add, quantize again (same format and group)."""
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not names:
            return
        self._set_base(lambda w: w + sum(self.get_delta_weight(a).float() for a in names), names, safe_merge)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract the merged adapters again (the base is re-quantized, so this is not bit-exact)."""
        if not self.merged:
            return
        names = [a for a in self.merged_adapters if a in self.lora_A]
        self._set_base(lambda w: w - sum(self.get_delta_weight(a).float() for a in names), names, False,
                       sign=-1.0)
        self.merged_adapters.clear()

    def _set_base(self, update, names: list[str], safe: bool, sign: float = 1.0) -> None:
        base = self.get_base_layer()
        weight = update(base.dequantize_weight(torch.float32))
        bias = None if base.bias is None else base.bias.detach().float()
        for a in names:
            if self.lora_bias.get(a):
                if bias is None:
                    raise XpuLLMError("cannot merge lora_bias=True into a base layer without a bias")
                bias = bias + sign * self.lora_B[a].bias.detach().float() * self.scaling[a]
        if safe and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise XpuLLMError(f"NaN or inf in the merged weight of adapters {names}; the adapter is broken")
        new = requantized_like(base, weight, None if bias is None else bias.to(base.bias.dtype))
        holder = self
        while isinstance(holder.base_layer, PeftLoraLinear):  # nested tuner layers
            holder = holder.base_layer
        holder.base_layer = new

    def __repr__(self) -> str:
        return "lowbit_lora." + nn.Module.__repr__(self)


def is_linear(module: nn.Module) -> bool:
    """True for the layers 'all-linear' means: nn.Linear and the low-bit linears."""
    return isinstance(module, (nn.Linear, *LOW_BIT_LAYERS))


def linear_targets(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """What 'all-linear' means here, as PEFT defines it (every linear but the output embedding), including
    low-bit layers, which PEFT's own shorthand does not see. Short names (q_proj, ...) when each one only
    names linears, so adapter_config.json stays readable; full module names otherwise."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = set(exclude)
    names = [n for n, m in model.named_modules() if n and is_linear(m) and m is not out_emb
             and n.rsplit(".", 1)[-1] not in skip and n not in skip]
    if not names:
        raise XpuLLMError("the model has no linear layer to put LoRA on")
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    chosen = set(names)
    covered = [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in short]
    return short if set(covered) == chosen else sorted(names)


def lora_config(model: nn.Module, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
                target_modules: str | list[str] = "all-linear", **kwargs: Any) -> LoraConfig:
    """A causal-LM LoraConfig whose low-bit layers take `LowBitLoraLinear` (registered on this config only),
    with 'all-linear' resolved to the model's linear layers, low-bit ones included."""
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        targets: str | list[str] = linear_targets(model)
    elif isinstance(target_modules, str):
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    else:
        targets = list(target_modules)
    if r <= 0:
        raise XpuLLMError(f"LoRA rank must be positive, got {r}")
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                     task_type="CAUSAL_LM", bias="none", **kwargs)
    return register_low_bit_layers(cfg)


def register_low_bit_layers(cfg: LoraConfig) -> LoraConfig:
    """Teach this LoraConfig (only it) to wrap low-bit layers with LowBitLoraLinear; returns it."""
    cfg._register_custom_module({cls: LowBitLoraLinear for cls in LOW_BIT_LAYERS})
    return cfg


def add_lora(model: nn.Module, cfg: LoraConfig | None = None, **kwargs: Any) -> nn.Module:
    """`peft.get_peft_model(model, cfg)` with the low-bit layers registered; kwargs build a config when none
    is given (see lora_config). Returns the PeftModel with only the adapter trainable."""
    import peft

    cfg = register_low_bit_layers(cfg) if cfg is not None else lora_config(model, **kwargs)
    try:
        peft_model = peft.get_peft_model(model, cfg)
    except ValueError as e:
        raise XpuLLMError(f"cannot add LoRA to this model: {e}") from e
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if n_train == 0:
        raise XpuLLMError(f"no layer matched target_modules={cfg.target_modules}; pass names of linear layers "
                          "(e.g. q_proj,v_proj) or all-linear")
    log.info("LoRA r=%d on %s: %d trainable parameters", cfg.r, cfg.target_modules, n_train)
    return peft_model


def load_adapter(model: nn.Module, adapter_dir: str, is_trainable: bool = False) -> nn.Module:
    """`PeftModel.from_pretrained` for a model with low-bit layers (the saved config, registered here)."""
    import peft

    cfg = LoraConfig.from_pretrained(adapter_dir)
    return peft.PeftModel.from_pretrained(model, adapter_dir, config=register_low_bit_layers(cfg),
                                          is_trainable=is_trainable)
