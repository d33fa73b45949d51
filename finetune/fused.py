"""Fused training layers swapped into a Hugging Face model from outside (module swap on this model only; no
transformers class or global is patched). `fuse_layers(model)` replaces
- Llama-style RMSNorm modules by `FusedRMSNorm` (the same `weight` parameter), and
- SiLU-gated MLPs (`down(silu(gate(x)) * up(x))`) by `FusedSwiGLUMLP` (the same gate/up/down submodules),
- Llama attention modules by a subclass whose forward applies the rotary embedding in one kernel per tensor
  (the same instance and submodules, only its class changes; the rest of the forward is HF's),
so state dicts, PEFT targets and ZeRO-3 see the same names. On XPU and CUDA tensors they run the Triton kernels
of finetune/kernels.py; elsewhere the Hugging Face formula, so a CPU run is unchanged.

Why: an 8B QLoRA step at 4096 tokens runs 65 norms and 32 MLP gates forward, again in recompute, and backward;
unfused, a norm is about seven elementwise passes over a float32 copy of the activations, a gate five, the
rotary embedding of q and k five each (over non-contiguous heads), with three more in backward."""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary

from ..device import is_gpu

log = logging.getLogger(__name__)

# HF RMSNorm classes with the Llama formula: w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype). Gemma's (1 + w) and
# OLMo-2's cast-after-multiply differ, so they are not listed (and are left alone).
LLAMA_STYLE_NORMS = frozenset(("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
                               "Qwen3MoeRMSNorm", "Phi3RMSNorm", "GraniteRMSNorm"))
# HF MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)); fused when act_fn is SiLU.
GATED_MLPS = frozenset(("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GraniteMLP"))
SILU = ("SiLUActivation", "SiLU")
# HF attention classes whose forward is q/k/v projections, apply_rotary_pos_emb (rotate_half), the KV cache, the
# attention interface and o_proj, with nothing else in between (Mistral/Qwen2 add a sliding window, Qwen3 q/k
# norms: not listed).
ROPE_ATTENTIONS = {"LlamaAttention": "transformers.models.llama.modeling_llama"}  # class -> its module


@functools.cache
def triton_module(name: str):
    """xpu_llm.finetune.<name>, a module of Triton kernels, or None where Triton is not importable."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError as e:  # CPU-only installs without Triton
        log.debug("Triton not importable (%s): %s is not used, the plain formulas run", e, name)
        return None


def _kernels():
    return triton_module("kernels")


def use_kernels(x: Tensor) -> bool:
    """Triton kernels for GPU tensors, and for CPU tensors when Triton interprets (the tests)."""
    k = _kernels()
    return k is not None and (is_gpu(x.device) or x.device.type == "cpu" and k.interpreting())


def reference_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The Hugging Face Llama formula in plain torch."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, recomputable: bool) -> Tensor:
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = _kernels().rms_norm_forward(x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.shape = x.shape
        out = y.view(x.shape)
        if recomputable:  # the output again from what this node keeps anyway (same kernel: bit for bit)
            RECOMPUTABLE[out] = Recompute(functools.partial(_norm_output, x2d, weight, eps, x.shape))
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx = _kernels().rms_norm_backward(dy2d, x2d, weight, rstd) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:  # a trainable norm (modules_to_save): rare, so plain torch
            xn = (x2d.float() * rstd[:, None]).to(x2d.dtype)
            dw = (dy2d.float() * xn.float()).sum(0).to(weight.dtype)
        return (None if dx is None else dx.view(ctx.shape)), dw, None, None


def _norm_output(x2d: Tensor, weight: Tensor, eps: float, shape: torch.Size) -> Tensor:
    return _kernels().rms_norm_forward(x2d, weight, eps)[0].view(shape)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor) -> Tensor:
        g, u = g.contiguous(), u.contiguous()
        ctx.save_for_backward(g, u)
        return _kernels().swiglu_forward(g, u)

    @staticmethod
    def backward(ctx, dh: Tensor):
        g, u = ctx.saved_tensors
        return _kernels().swiglu_backward(dh, g, u)


class FusedRMSNorm(nn.Module):
    """Llama-style RMSNorm: Triton forward and backward on GPU tensors, the HF formula elsewhere."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        if use_kernels(x) and x.shape[-1] <= _kernels().MAX_COLS:
            # A ZeRO-3-partitioned weight is gathered only around this module's own forward and backward.
            recomputable = torch.is_grad_enabled() and not hasattr(self.weight, "ds_id")
            return _RMSNormFunction.apply(x, self.weight, self.variance_epsilon, recomputable)
        return reference_rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class FusedSwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with the gate fused (Triton on GPU tensors): the same three submodules, so
    LoRA on gate/up/down and the state dict are unchanged."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: Tensor) -> Tensor:
        with saved_as_recomputed(x, RECOMPUTABLE.get(x)):  # x: a fused norm's output, saved by LoRA A of gate/up
            g, u = project(x, (self.gate_proj, self.up_proj))
        h = swiglu(g, u)
        with saved_as_recomputed(h, Recompute(lambda: swiglu(g.detach(), u.detach()))):
            return self.down_proj(h)


def project(x: Tensor, layers: tuple[nn.Module, ...]) -> list[Tensor]:
    """[layer(x) for layer in layers], through the layers' class's `forward_group(layers, x)` when it has one and
    it takes them (LoRA on low-bit linears: one autograd node for linears that share their input)."""
    group = getattr(type(layers[0]), "forward_group", None)
    out = group(layers, x) if group is not None else None
    return list(out) if out is not None else [layer(x) for layer in layers]


def swiglu(g: Tensor, u: Tensor) -> Tensor:
    """silu(g) * u: the Triton kernel on GPU tensors, the formula elsewhere (deterministic either way)."""
    return _SwiGLUFunction.apply(g, u) if use_kernels(g) else F.silu(g) * u


# Outputs that can be made again in backward from what their own node keeps (fused norms register theirs): a
# consumer that would save one as memory saves the way to make it instead (saved_as_recomputed). Weak keys: an
# entry goes with its tensor.
RECOMPUTABLE: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


class Recompute:
    """Makes a tensor again, without autograd, the first time a backward asks for it; later askers (q, k and v
    all saved the same norm output) get that copy, which lives until the last of them has run its backward."""

    def __init__(self, make: Callable[[], Tensor]) -> None:
        self.make, self.value = make, None

    def __call__(self) -> Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.make()
        return self.value


def saved_as_recomputed(x: Tensor, recompute: Recompute | None) -> contextlib.AbstractContextManager:
    """A context in which autograd saves `x` (or a view of it) as `recompute` rather than as memory; a no-op
    where there is no recompute, no autograd, an empty x, torch.compile tracing, or an outer saved-tensor hook
    (ours would replace it for what it wraps)."""
    if (recompute is None or not torch.is_grad_enabled() or x.numel() == 0 or torch.compiler.is_compiling()
            or not _no_outer_saved_tensor_hooks()):
        return contextlib.nullcontext()
    return _SavedAsRecomputed(x, recompute)


def _no_outer_saved_tensor_hooks() -> bool:
    """True when no saved-tensor hooks are active (non-reentrant checkpointing, save_on_cpu, DeepSpeed's
    offload install some)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is None


class _SavedAsRecomputed(torch.autograd.graph.saved_tensors_hooks):
    """While active, a tensor that autograd saves and that is `x` or a view of it is kept as the way to make x
    again (a `Recompute`) plus the view's geometry, not as x's memory. Other saved tensors pass through unchanged.
    Why: LoRA A saves its input for A's gradient. At the 8B shape (sequence 1024, batch 4) that is, a layer, the
    two norm outputs (32 MiB each; a norm remakes its output in one pass from the input its own backward keeps)
    and the MLP's down input h = silu(g) * u (112 MiB; one elementwise pass from g and u, which the gate's
    backward keeps)."""

    def __init__(self, x: Tensor, recompute: Recompute) -> None:
        ptr, dtype = x.untyped_storage().data_ptr(), x.dtype

        def pack(t: Tensor):
            if t.dtype != dtype or t.layout != torch.strided or t.untyped_storage().data_ptr() != ptr:
                return t
            return recompute, tuple(t.shape), t.stride(), t.storage_offset()

        def unpack(saved):
            if isinstance(saved, Tensor):
                return saved
            make, shape, stride, offset = saved
            return make().as_strided(shape, stride, offset)

        super().__init__(pack, unpack)


class _RoPEFunction(torch.autograd.Function):
    """(q, k) rotated by (cos, sin); cos and sin are constants (no gradient), so backward saves only them."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(cos, sin)
        return _kernels().rope(q, cos, sin), _kernels().rope(k, cos, sin)

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor):
        cos, sin = ctx.saved_tensors

        def rope_t(d: Tensor) -> Tensor:  # the kernel takes any layout with contiguous head_dim: no copy
            return _kernels().rope(d if d.stride(-1) == 1 else d.contiguous(), cos, sin, backward=True)

        dq = rope_t(dq) if ctx.needs_input_grad[0] else None
        dk = rope_t(dk) if ctx.needs_input_grad[1] else None
        return dq, dk, None, None


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, hf_rope) -> tuple[Tensor, Tensor]:
    """HF's apply_rotary_pos_emb(q, k, cos, sin) (passed as `hf_rope`), through the Triton kernel on GPU tensors
    of the shapes it takes (q, k [B, heads, T, D]; cos, sin [B or 1, T, D], without gradient)."""
    if (use_kernels(q) and not (cos.requires_grad or sin.requires_grad) and q.dtype == k.dtype
            and _kernels().rope_supported(q, cos) and _kernels().rope_supported(k, cos)
            and sin.shape == cos.shape and sin.stride() == cos.stride()):
        return _RoPEFunction.apply(q, k, cos, sin)
    return hf_rope(q, k, cos, sin)


def _rope_attention_forward(self, hidden_states: Tensor, position_embeddings=None, attention_mask=None, *args,
                            **kwargs):
    """HF's Llama attention forward (transformers 5.x) with apply_rope; anything else (a KV cache, positional
    extras) goes to HF's own forward."""
    hf_cls = type(self).__mro__[1]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if args or cache is not None or position_embeddings is None:
        return hf_cls.forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
    hf = sys.modules[hf_cls.__module__]
    hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    with saved_as_recomputed(hidden_states, RECOMPUTABLE.get(hidden_states)):  # a fused norm's output
        q, k, v = (t.view(hidden_shape).transpose(1, 2)
                   for t in project(hidden_states, (self.q_proj, self.k_proj, self.v_proj)))
    q, k = apply_rope(q, k, *position_embeddings, hf.apply_rotary_pos_emb)
    attention = hf.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                         hf.eager_attention_forward)
    out, weights = attention(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                             scaling=self.scaling, **kwargs)
    out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return self.o_proj(out), weights


@functools.cache
def _rope_attention_class(hf_cls: type) -> type:
    """A subclass of the HF attention class with the fused-rope forward (one per HF class), findable by name in
    this module (module __getattr__), so models holding it pickle and deep-copy."""
    return type(f"FusedRoPE{hf_cls.__name__}", (hf_cls,), {"forward": _rope_attention_forward,
                                                           "__module__": __name__})


def __getattr__(name: str) -> type:
    # FusedRoPE<HF class>, built on first lookup (unpickling in a fresh process looks it up here).
    hf_name = name.removeprefix("FusedRoPE")
    if name.startswith("FusedRoPE") and hf_name in ROPE_ATTENTIONS:
        import importlib

        return _rope_attention_class(getattr(importlib.import_module(ROPE_ATTENTIONS[hf_name]), hf_name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def fuse_layers(model: nn.Module, norms: bool = True, mlps: bool = True, rope: bool = True) -> dict[str, int]:
    """Swap the Llama-style RMSNorms, SiLU-gated MLPs and Llama attentions (their rotary embedding) under `model`
    for their fused versions, in place (call it before adding LoRA or after: the linears are kept as they are).
    Other layers are left alone. Returns how many of each were swapped."""
    counts = {"norms": 0, "mlps": 0, "attentions": 0}
    for name, mod in list(model.named_modules()):
        kind = type(mod).__name__
        if rope and type(mod).__module__ == ROPE_ATTENTIONS.get(kind):
            hf = sys.modules[type(mod).__module__]
            if all(hasattr(hf, a) for a in ("apply_rotary_pos_emb", "ALL_ATTENTION_FUNCTIONS",
                                            "eager_attention_forward")):
                mod.__class__ = _rope_attention_class(type(mod))
                counts["attentions"] += 1
        elif norms and kind in LLAMA_STYLE_NORMS and hasattr(mod, "variance_epsilon"):
            _swap(model, name, FusedRMSNorm(mod.weight, mod.variance_epsilon))
            counts["norms"] += 1
        elif mlps and kind in GATED_MLPS and type(getattr(mod, "act_fn", None)).__name__ in SILU:
            _swap(model, name, FusedSwiGLUMLP(mod.gate_proj, mod.up_proj, mod.down_proj))
            counts["mlps"] += 1
    log.info("fused layers: %s", counts)
    return counts
