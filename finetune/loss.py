"""Causal-LM cross-entropy for training, with the output head fused into the loss.

A Hugging Face model's loss materialises logits for every position: [tokens, vocab] in bf16, then a float32
copy, float32 log-probabilities kept for backward, and float32 and bf16 gradients in backward: 1-2 GiB each
for Llama-3's 128256-token vocabulary and 4096 tokens. `head_cross_entropy` runs the frozen output head and the
loss a chunk of rows at a time and computes the hidden states' gradient as it goes (the loss is the graph's
last node, so d loss / d logits = softmax - one-hot is known in the forward), holding one chunk's logits (on
GPUs in the compute dtype only: a Triton kernel turns them into their gradient in place; in torch, a float32
copy too), plus the dequantized head while it runs, and no logits at all for backward. Measured on an H200 (8B
QLoRA step, benchmarks/results/qlora_h200_fused_loss.md): peak 15.3 -> 11.6 GiB. Same numbers as the unfused
path: logits in the head's compute dtype (bf16 under autocast), log-sum-exp in float32, the logits' gradient
rounded to the compute dtype before its matmul, as autograd does.

`loss_sum(model, batch)` calls the model as usual (so DDP and DeepSpeed see their forward), takes the head's
input through a forward pre-hook that also shrinks the head's own work to one position, and applies the fused
loss to the positions that predict an answer token. It falls back to the model's logits when the head is
trainable (LoRA on the head, modules_to_save), partitioned by ZeRO-3, not a plain or low-bit linear, or when
XPU_LLM_FUSED_LOSS=0 (an A/B switch)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import IGNORE
from .fused import triton_module, use_kernels

# A chunk's rows: their float32 logits would take 512 MiB (1046 rows of a 128256-token vocabulary). The torch
# path makes that float32 copy; the Triton one (GPUs) holds only the logits in the compute dtype (256 MiB in bf16).
CHUNK_BYTES = 1 << 29


def fused_enabled() -> bool:
    """False when XPU_LLM_FUSED_LOSS=0: the model's own logits and torch's cross-entropy (an A/B switch)."""
    return os.environ.get("XPU_LLM_FUSED_LOSS", "1") != "0"


def output_head(model: nn.Module) -> nn.Module | None:
    """The output head (the module that maps hidden states to logits) of a HF causal LM, through DDP /
    DeepSpeed (`.module`) and PEFT wrappers; None when the model does not name one."""
    inner = getattr(model, "module", model)
    get = getattr(inner, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def fusable(head: nn.Module | None) -> bool:
    """Whether `head` can run inside the fused loss: a frozen plain or low-bit linear whose weight is whole
    here (not partitioned by ZeRO-3, which gathers it only inside its own forward)."""
    if head is None or not (type(head) is nn.Linear or callable(getattr(head, "dequantize_weight", None))):
        return False
    params = list(head.parameters())
    return not any(p.requires_grad or hasattr(p, "ds_id") for p in params)


def head_weight(head: nn.Module, dtype: torch.dtype) -> Tensor:
    """The head's [vocab, hidden] weight in `dtype` (dequantized once for a low-bit head)."""
    if type(head) is nn.Linear:
        return head.weight.detach().to(dtype)
    return head.dequantize_weight(dtype)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear layer computes in for input `x`: autocast's where it is on for x's device."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class HeadCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(h @ W.T + b, targets), chunk by chunk; the gradient of h is computed in
    forward (when h needs one) and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, h: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None, rows: int) -> Tensor:
        grad = torch.empty_like(h, dtype=weight.dtype) if ctx.needs_input_grad[0] else None
        kernel = use_kernels(h)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], rows):
            t = targets[s:s + rows]
            logits = F.linear(h[s:s + rows].to(weight.dtype), weight, bias)
            if kernel:  # one pass: the rows' losses, and softmax - one-hot in place of the logits
                total += triton_module("kernels").cross_entropy_rows_(logits, t, grad=grad is not None).sum()
                p = logits
            else:
                lf = logits.float()
                del logits
                lse = torch.logsumexp(lf, dim=-1)
                total += (lse - lf.gather(1, t[:, None]).squeeze(1)).sum()
                if grad is None:
                    continue
                p = lf.sub_(lse[:, None]).exp_()  # softmax, in place of the float32 logits
                p[torch.arange(p.shape[0], device=p.device), t] -= 1.0
                p = p.to(weight.dtype)
                del lf
            if grad is not None:
                torch.mm(p, weight, out=grad[s:s + rows])
            del p
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.h_dtype = h.dtype
        return total

    @staticmethod
    def backward(ctx, dloss: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * dloss.to(grad.dtype)).to(ctx.h_dtype), None, None, None, None


def head_cross_entropy(h: Tensor, head: nn.Module, targets: Tensor, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """Summed cross-entropy of `head(h)` [N, vocab] against `targets` [N] (every target a real token), in
    chunks of rows whose float32 logits take at most `chunk_bytes`. The head must be `fusable`."""
    assert h.dim() == 2 and targets.shape == h.shape[:1], (
        f"h must be [N, hidden] and targets [N], got {tuple(h.shape)} and {tuple(targets.shape)}")
    assert fusable(head), "the head is trainable, partitioned or not a linear: use its logits instead"
    dtype = compute_dtype(h)
    weight = head_weight(head, dtype)
    bias = None if head.bias is None else head.bias.detach().to(dtype)
    rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    with torch.autocast(h.device.type, enabled=False):  # dtypes are explicit inside
        return HeadCrossEntropy.apply(h, targets, weight, bias, rows)


@contextlib.contextmanager
def head_input(head: nn.Module) -> Iterator[list[Tensor]]:
    """Record the head's input during a forward of the model, and let the head itself compute one position
    only (its logits are not used): yields a list that holds the input after the forward."""
    seen: list[Tensor] = []

    def pre_hook(module: nn.Module, args: tuple) -> tuple:
        seen.append(args[0])
        return (args[0][..., -1:, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield seen
    finally:
        handle.remove()


def answer_index(labels: Tensor) -> Tensor:
    """Flattened positions b * T + t of labels [B, T] whose next token labels[b, t + 1] is an answer token (the
    hidden state there predicts it). Made on the host from the collated CPU batch and moved with it, it spares
    loss_sum a device sync mid-step (selecting rows by a boolean mask on the device waits for the whole forward)."""
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE
    return predicts.flatten().nonzero().squeeze(1)


def loss_sum(model: Any, batch: dict[str, Tensor], fused: bool | None = None,
             answer_rows: Tensor | None = None) -> Tensor:
    """Summed cross-entropy over the answer tokens of a batch (labels == IGNORE elsewhere), the labels shifted by
    one (position i predicts token i + 1). Fused with the output head where `fused` (None: XPU_LLM_FUSED_LOSS)
    and the head allows (see the module docstring); otherwise the LM head runs only at positions that predict
    a token (logits_to_keep). `answer_rows`: answer_index(labels) on the batch's device; None finds them from
    the labels there (a device sync)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    head = output_head(model)
    if (fused_enabled() if fused is None else fused) and fusable(head) and targets.numel():
        with head_input(head) as seen:
            model(**inputs, use_cache=False)
        assert len(seen) == 1, f"the output head ran {len(seen)} times in one forward, expected once"
        h = seen[0]
        assert h.shape[:2] == labels.shape, (
            f"the head's input {tuple(h.shape)} does not match the labels {tuple(labels.shape)}")
        rows = answer_index(labels) if answer_rows is None else answer_rows
        return head_cross_entropy(h.reshape(-1, h.shape[-1]).index_select(0, rows), head,
                                  labels.reshape(-1).index_select(0, rows + 1))
    keep = (targets != IGNORE).any(0).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE,
                           reduction="sum")


def mean_loss(model: Any, input_ids: Tensor, fused: bool | None = None) -> Tensor:
    """Mean next-token cross-entropy over every position of `input_ids` (what a HF model's `labels=input_ids`
    loss computes), through `loss_sum`; every position is a target, so no device sync."""
    b, t = input_ids.shape
    rows = torch.arange(b * t, device=input_ids.device).view(b, t)[:, :-1].flatten()
    return loss_sum(model, {"input_ids": input_ids, "labels": input_ids}, fused, answer_rows=rows) / rows.numel()
