"""LowBitLinear: a frozen linear layer stored in a low-bit format (canonical buffers, see formats.py), with
the matmul dispatched per device and dtype (kernels/). `quantize_linears` swaps it into any module tree.

A CPU kernel may re-lay `qweight` for speed; the canonical copy is then dropped (unless `keep_canonical`),
and state_dict() rebuilds it bit-exactly, so checkpoints never depend on the machine that wrote them."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .formats import LowBitFormat, get_format
from .kernels import lowbit_dequantize, lowbit_matmul, select_kernel

log = logging.getLogger(__name__)


class FrozenMatmul(torch.autograd.Function):
    """x2d @ W.T with a frozen low-bit W, through `matmul(x2d, layer)`: the kernels have no autograd formula, so
    backward is grad @ W (for QLoRA; no weight gradient).

    A layer whose block is checkpointed right now keeps W (see keeps_weight): in training mode, with autograd
    on, its forward dequantizes W and saves it. Checkpointing saves nothing from the first forward (reentrant: it
    runs without autograd; non-reentrant: it drops what is saved) and holds the recompute's saved tensors until
    the block's backward, so W is unpacked twice a step (forward, recompute) instead of three times, for one
    layer's weights of extra memory."""

    @staticmethod
    def forward(ctx, x2d: Tensor, layer: nn.Module, matmul: Callable[[Tensor, nn.Module], Tensor]) -> Tensor:
        ctx.layer = layer
        if keeps_weight(layer):
            w = layer.dequantize_weight(x2d.dtype)
            ctx.save_for_backward(w)
            return F.linear(x2d, w)
        return matmul(x2d, layer)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (w,) = ctx.saved_tensors or (ctx.layer.dequantize_weight(grad.dtype),)
        return grad @ w.to(grad.dtype), None, None


def keeps_weight(layer: nn.Module) -> bool:
    """Whether a training low-bit `layer` keeps its dequantized W for backward: it was linked to its decoder block
    (`recompute_owner`, a weak reference; finetune's checkpoint_layers sets it) and that block checkpoints now
    (Hugging Face's `gradient_checkpointing` flag, so turning checkpointing off through HF's API stops the keeping:
    outside checkpointing every W would stay alive until backward)."""
    owner = layer.recompute_owner() if layer.recompute_owner is not None else None
    return owner is not None and layer.training and bool(getattr(owner, "gradient_checkpointing", False))


def frozen_forward(layer: nn.Module, x: Tensor, matmul: Callable[[Tensor, nn.Module], Tensor]) -> Tensor:
    """x @ W.T + bias for a frozen low-bit `layer` through `matmul` (FrozenMatmul when x needs a gradient). A 2-D x
    gives a new [M, N] tensor, not a view, which a caller may add into in place (the LoRA update does)."""
    assert x.shape[-1] == layer.in_features, f"input has {x.shape[-1]} features, layer expects {layer.in_features}"
    x2d = x.reshape(-1, layer.in_features)
    if torch.is_grad_enabled() and x2d.requires_grad:
        y = FrozenMatmul.apply(x2d, layer, matmul)
    else:
        y = matmul(x2d, layer)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], layer.out_features)


class LowBitLinear(nn.Module):
    """y = x @ W.T + bias with W in a low-bit format; W is frozen (buffers), bias a frozen parameter."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, low_bit: str = "sym_int4",
                 group_size: int = 64, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        fmt = get_format(low_bit)
        assert not fmt.dense, f"{fmt.name} is a dense format: use a plain nn.Linear in that dtype"
        assert group_size > 0 and in_features % group_size == 0, (
            f"in_features {in_features} is not a multiple of group_size {group_size}; "
            f"pick a group size that divides it or keep this layer dense")
        self.in_features, self.out_features = in_features, out_features
        self.low_bit, self.group_size, self.fmt = fmt.name, group_size, fmt
        for name, (shape, dt) in fmt.shapes(out_features, in_features, group_size).items():
            self.register_buffer(name, torch.empty(shape, dtype=dt, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel = None  # the CPU kernel whose state is prepared (kernels/cpu.py), if any
        self._state: dict[str, Tensor] | None = None
        self._keep_canonical = False
        # Activation precision for the CPU kernels when it may differ from x's dtype (None: compute in x's
        # dtype, exactly): torch.int8 = the native integer path (activations rounded to int8 per block of 32),
        # torch.bfloat16 = PyTorch's packed kernels. LLM(dtype="auto") sets one on float32 CPU models.
        self.kernel_dtype: torch.dtype | None = None
        self.recompute_owner: Callable[[], nn.Module | None] | None = None  # see keeps_weight

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(cls, tensors: dict[str, Tensor], in_features: int, out_features: int, low_bit: str,
                       group_size: int, bias: Tensor | None = None) -> "LowBitLinear":
        """Wrap already-quantized canonical tensors (GGUF import, checkpoints) without copying them."""
        layer = cls(in_features, out_features, bias is not None, low_bit, group_size, device="meta",
                    dtype=bias.dtype if bias is not None else torch.float32)
        want = layer.fmt.shapes(out_features, in_features, group_size)
        assert set(tensors) == set(want), f"{layer.low_bit} needs tensors {sorted(want)}, got {sorted(tensors)}"
        for name, (shape, dt) in want.items():
            t = tensors[name]
            assert tuple(t.shape) == shape and t.dtype == dt, (
                f"{layer.low_bit} {name}: expected {shape} {dt}, got {tuple(t.shape)} {t.dtype}")
            layer._buffers[name] = t.detach()
        if bias is not None:
            assert bias.shape == (out_features,), f"bias shape {tuple(bias.shape)} != ({out_features},)"
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, low_bit: str, group_size: int = 64) -> "LowBitLinear":
        """Quantize an nn.Linear's weight (the bias stays float, in its own dtype)."""
        fmt = get_format(low_bit)
        assert not fmt.dense, f"{fmt.name} is dense: cast the nn.Linear instead (quantize_linears does)"
        q = fmt.quantize(linear.weight, group_size)
        return cls.from_quantized(q, linear.in_features, linear.out_features, fmt.name, group_size,
                                  bias=None if linear.bias is None else linear.bias.detach())

    # ------------------------------------------------------------------------------------------ weights
    def tensors(self) -> dict[str, Tensor]:
        """The canonical tensors by name (qweight rebuilt from the kernel layout if it was dropped)."""
        out = {}
        for name in self.fmt.tensor_names:
            t = self._buffers.get(name)
            if t is None:
                assert self._kernel is not None, f"{name} is missing and no kernel state can rebuild it"
                t = self._kernel.unpack(self._state, self.out_features, self.in_features, self.group_size)
            out[name] = t
        return out

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The [N, K] weight in `dtype` (the reference dequantization's bits; one kernel on GPUs)."""
        return lowbit_dequantize(self, dtype)

    @property
    def keep_canonical(self) -> bool:
        """True keeps the canonical qweight beside a kernel's copy (needed when rows are gathered from it)."""
        return self._keep_canonical

    @keep_canonical.setter
    def keep_canonical(self, value: bool) -> None:
        self._keep_canonical = bool(value)
        if value and self._kernel is not None and self._buffers.get("qweight") is None:
            self._buffers["qweight"] = self.tensors()["qweight"]

    # ------------------------------------------------------------------------------------------ kernel state
    def kernel_state(self, kernel) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(kernel state, canonical tensors except qweight) for `kernel`, packing once on first use."""
        if self._kernel is not kernel:
            self.unprepare()
            self._state = kernel.pack(self.tensors(), self.out_features, self.in_features, self.group_size)
            self._kernel = kernel
            if not self._keep_canonical and kernel.droppable():
                self._buffers["qweight"] = None  # state_dict() rebuilds it from the kernel layout
        rest = {n: self._buffers[n] for n in self.fmt.tensor_names if n != "qweight"}
        return self._state, rest

    def prepare(self, dtype: torch.dtype = torch.bfloat16) -> "LowBitLinear":
        """Pack for the kernel that activations of `dtype` on this layer's device will use (else no-op)."""
        probe = torch.empty(0, self.in_features, dtype=dtype, device=self._buffers["scales"].device)
        kernel = select_kernel(self, probe)
        if kernel is not None:
            self.kernel_state(kernel)
        return self

    def unprepare(self) -> None:
        """Drop the kernel state, restoring the canonical qweight if it was dropped."""
        if self._kernel is not None and self._buffers.get("qweight") is None:
            self._buffers["qweight"] = self.tensors()["qweight"]
        self._kernel, self._state = None, None

    # ------------------------------------------------------------------------------------------ nn.Module
    def forward(self, x: Tensor) -> Tensor:
        return frozen_forward(self, x, lowbit_matmul)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in self.tensors().items():  # always the canonical layout
            destination[prefix + name] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if any(prefix + n in state_dict for n in self.fmt.tensor_names):
            self.unprepare()  # the kernel state would be stale
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "recompute_owner": None}  # a weak reference (see keeps_weight): not copied

    def _apply(self, fn, recurse=True):
        # Device moves apply to the format's buffers, dtype casts (model.to(bf16), .half()) never do:
        # fp8 codes and fp32 scales are part of the format.
        self.unprepare()
        fixed = {id(t) for n in self.fmt.tensor_names if (t := self._buffers.get(n)) is not None}

        def guarded(t: Tensor) -> Tensor:
            out = fn(t)
            if id(t) in fixed and out.dtype != t.dtype:
                out = t.to(out.device)
            return out

        return super()._apply(guarded, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, low_bit={self.low_bit}, group_size={self.group_size}")


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def quantize_linears(module: nn.Module, low_bit: str, group_size: int,
                     skip: Callable[[str, nn.Linear], bool] | None = None) -> nn.Module:
    """Swap every nn.Linear under `module` for a LowBitLinear, in place and one at a time (each float weight
    is released as soon as it is quantized). A dense format casts instead; a layer whose in_features is not
    a multiple of group_size stays dense (logged). Returns `module` (the new layer if it is itself a Linear)."""
    fmt: LowBitFormat = get_format(low_bit)
    targets = [(name, m) for name, m in module.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, NonDynamicallyQuantizableLinear)]
    for name, lin in targets:
        if skip is not None and skip(name, lin):
            continue
        if fmt.dense:
            lin.weight = nn.Parameter(fmt.quantize(lin.weight, group_size)["weight"],
                                      requires_grad=lin.weight.requires_grad)
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias.detach().to(lin.weight.dtype), requires_grad=lin.bias.requires_grad)
            continue
        if lin.in_features % group_size:
            log.warning("%s: in_features %d is not a multiple of group_size %d; kept dense",
                        name or type(lin).__name__, lin.in_features, group_size)
            continue
        new = LowBitLinear.from_linear(lin, fmt.name, group_size)
        if not name:
            return new
        _set_module(module, name, new)
        lin.weight = None  # free the float weight now, not after the whole tree
    return module
