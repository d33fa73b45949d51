"""Graph-captured decode steps for accelerators: `decoder(model, batch)` returns the function that computes one
decode step's logits; on a GPU it is captured once per batch size into an accelerator graph (CUDA / XPU graphs,
through xpu_llm.device) and replayed, which removes the per-kernel launch cost that bounds eager decoding of
small batches. The captured step has static shapes: the token, its cache slot and the rows' left padding live in
fixed buffers, attention reads every cache slot with the mask built from the slot on the device, so one graph
serves every position. `graphed_forward` does the same for any repeating shape of tokens and slots (the
verification passes and draft steps of speculative decoding). CPUs (and XPU_LLM_GRAPHS=0) run eagerly.

`compile_decode(model)` (LLM(compile=True), `--compile`) also runs the step through torch.compile before the
capture: inductor fuses RMSNorm, RoPE, SwiGLU, the residual adds and the mask into a few kernels, which matters
because in a replayed graph each small kernel still costs a few microseconds (about 45 of them per layer
eagerly). The low-bit matmuls stay the project's Triton kernels (an opaque custom op to the compiler). It costs
a compilation per batch size (tens of seconds for an 8B model), so it is off by default."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from .device import capture_graph, is_cpu
from .model import Transformer

Step = Callable[[Tensor, int], Tensor]  # (token [B], slot) -> logits [B, V]


class GraphedForward:
    """`model.forward` for one shape of (tokens [B, T], slots [T] or [B, T]) with left padding `pad` [B], captured
    and replayed: the decode step (GraphedStep) and the verification passes and draft steps of speculative
    decoding, whose shapes repeat (B rows, k + 1 positions). Attention reads the whole cache (kv_len=None) with
    the mask built on the device, so one graph serves every position. `compile`: torch.compile the forward
    before the capture. The returned logits are the graph's output buffer: use them before the next call."""

    def __init__(self, model: Transformer, tokens_shape: tuple[int, ...], slots_shape: tuple[int, ...],
                 last_only: bool, layers: tuple[int, ...] | None = None, compile: bool = False) -> None:
        dev = model.norm.weight.device
        self.model, self.last_only, self.layers, self.compile = model, last_only, layers, compile
        self.tokens = torch.zeros(tokens_shape, dtype=torch.long, device=dev)
        self.slots = torch.zeros(slots_shape, dtype=torch.long, device=dev)
        self.pad = torch.zeros(tokens_shape[0], dtype=torch.long, device=dev)
        self.logits: Tensor | None = None
        self.replay = None
        self.cache = model.layers[0].attention.kv_cache  # a new cache (setup_caches) needs a new graph
        self.forward = model.forward

    def _run(self) -> None:
        self.logits = self.forward(self.tokens, self.slots, pad=self.pad, kv_len=None, last_only=self.last_only,
                                   layers=self.layers)

    def run(self, pad: Tensor | None) -> Tensor:
        """Replay on the tokens and slots already in place (capturing on the first call)."""
        if pad is None:
            self.pad.zero_()
        else:
            self.pad.copy_(pad)
        if self.replay is None:
            # Warm up eagerly on this very call (the same cache writes the replay will make: lazy kernel packing
            # and autotuning happen here), compile if asked (a second identical call), then capture.
            self._run()
            if self.compile:
                self.forward = torch.compile(self.model.forward, dynamic=False)
                self._run()
            self.replay = capture_graph(self._run, self.tokens.device)
        self.replay()
        return self.logits

    @torch.inference_mode()
    def __call__(self, tokens: Tensor, slots: Tensor, pad: Tensor | None) -> Tensor:
        self.tokens.copy_(tokens)
        self.slots.copy_(slots)
        return self.run(pad)


class GraphedStep(GraphedForward):
    """One decode step of `model` for `batch` rows at one shared slot: (token [B], slot) -> logits [B, V]."""

    def __init__(self, model: Transformer, batch: int) -> None:
        super().__init__(model, (batch, 1), (1,), True, compile=bool(model.__dict__.get("_compile_decode")))
        self.batch = batch

    @torch.inference_mode()
    def __call__(self, token: Tensor, slot: int, pad: Tensor | None) -> Tensor:
        self.tokens.copy_(token.view(-1, 1))
        self.slots.fill_(slot)
        return self.run(pad)[:, -1]


def graphed_forward(model: Transformer, tokens: Tensor, slots: Tensor, pad: Tensor | None, kv_len: int,
                    last_only: bool = False, layers: tuple[int, ...] | None = None) -> Tensor:
    """model(tokens, slots, pad=pad, kv_len=kv_len, last_only=last_only, layers=layers), through a captured graph
    per shape on accelerators (see GraphedForward; kv_len is then the whole cache), eagerly elsewhere."""
    if not graphs_enabled(model):
        return model(tokens, slots, pad=pad, kv_len=kv_len, last_only=last_only, layers=layers)
    graphs: dict = model.__dict__.setdefault("_forward_graphs", {})
    key = (tuple(tokens.shape), tuple(slots.shape), last_only, layers)
    g = graphs.get(key)
    if g is None or g.cache is not model.layers[0].attention.kv_cache:
        g = graphs[key] = GraphedForward(model, tuple(tokens.shape), tuple(slots.shape), last_only, layers)
    return g(tokens, slots, pad)


def compile_decode(model: Transformer, on: bool = True) -> None:
    """Run `model`'s graph-captured decode steps through torch.compile (see the module docstring); no effect
    where steps are not captured (CPUs, XPU_LLM_GRAPHS=0)."""
    model.__dict__["_compile_decode"] = bool(on)
    model.__dict__.pop("_decode_graphs", None)  # steps captured before are stale


def graphs_enabled(model: Transformer) -> bool:
    return not is_cpu(model.norm.weight.device) and os.environ.get("XPU_LLM_GRAPHS", "1") != "0"


def decoder(model: Transformer, batch: int, pad: Tensor | None) -> Callable[[Tensor, int], Tensor]:
    """The decode step for this batch: a replayed graph on accelerators, the eager step elsewhere."""
    from .generate import decode_one_token
    if not graphs_enabled(model):
        return lambda token, slot: decode_one_token(model, token, slot, pad)
    graphs: dict = model.__dict__.setdefault("_decode_graphs", {})
    step = graphs.get(batch)
    if step is None or step.cache is not model.layers[0].attention.kv_cache:
        step = graphs[batch] = GraphedStep(model, batch)
    return lambda token, slot: step(token, slot, pad)
