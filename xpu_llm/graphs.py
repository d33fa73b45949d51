"""Graph-captured decode steps for accelerators: `decoder(model, batch)` returns the function that computes one
decode step's logits; on a GPU it is captured once per batch size into an accelerator graph (CUDA / XPU graphs,
through xpu_llm.device) and replayed, which removes the per-kernel launch cost that bounds eager decoding of
small batches. The captured step has static shapes: the token, its cache slot and the rows' left padding live in
fixed buffers, and attention reads the cache slots up to a bucket length with the mask built from the slot on the
device, so one graph serves every position of its bucket. Buckets are powers of two from 256 slots up to the
cache's length (`kv_bucket`): a step near the start of a 2048-slot cache reads 256 slots, not 2048 (attention over
the whole cache was ~9% of an 8B 4-bit step at 200 slots on an H200, and grows with the cache), at the cost of
one graph per bucket reached. `graphed_forward` does the same for any repeating shape of tokens and slots (the
verification passes and draft steps of speculative decoding). CPUs (and XPU_LLM_GRAPHS=0) run eagerly.

`compile_decode(model)` (LLM(compile=True), `--compile`) also runs the step through torch.compile before the
capture: inductor fuses RMSNorm, RoPE, SwiGLU, the residual adds and the mask into a few kernels, which matters
because in a replayed graph each small kernel still costs a few microseconds (about 45 of them per layer
eagerly). The low-bit matmuls stay the project's Triton kernels (an opaque custom op to the compiler). It costs
a compilation per batch size (tens of seconds for an 8B model), so it is off by default, and a compiled step
reads the whole cache (one bucket: a compilation per bucket would cost more than it saves)."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from .device import capture_graph, is_cpu
from .model import Transformer

Step = Callable[[Tensor, int], Tensor]  # (token [B], slot) -> logits [B, V]
MIN_BUCKET = 256


def kv_bucket(slots: int, max_seq_len: int) -> int:
    """How many cache slots a captured step attends to when `slots` are needed: the smallest power of two from
    MIN_BUCKET up that holds them, at most the whole cache."""
    assert 0 < slots <= max_seq_len, f"{slots} cache slots needed, the cache holds {max_seq_len}"
    return min(max(MIN_BUCKET, 1 << (slots - 1).bit_length()), max_seq_len)


class GraphedForward:
    """`model.forward` for one shape of (tokens [B, T], slots [T] or [B, T]) with left padding `pad` [B], captured
    and replayed: the decode step (GraphedStep) and the verification passes and draft steps of speculative
    decoding, whose shapes repeat (B rows, k + 1 positions). Attention reads the first `kv_len` cache slots (None:
    all) with the mask built on the device, so one graph serves every position below kv_len. `compile`:
    torch.compile the forward before the capture. The returned logits are the graph's output buffer: use them
    before the next call. Where the device has no graphs (CPUs) it runs eagerly with the same buffers."""

    def __init__(self, model: Transformer, tokens_shape: tuple[int, ...], slots_shape: tuple[int, ...],
                 last_only: bool, layers: tuple[int, ...] | None = None, compile: bool = False,
                 kv_len: int | None = None) -> None:
        dev = model.norm.weight.device
        self.model, self.last_only, self.layers, self.compile = model, last_only, layers, compile
        self.kv_len = kv_len
        self.tokens = torch.zeros(tokens_shape, dtype=torch.long, device=dev)
        self.slots = torch.zeros(slots_shape, dtype=torch.long, device=dev)
        self.pad = torch.zeros(tokens_shape[0], dtype=torch.long, device=dev)
        self.logits: Tensor | None = None
        self.replay = None
        self.cache = model.layers[0].attention.kv_cache  # a new cache (setup_caches) needs a new graph
        self.forward = model.forward

    def _run(self) -> None:
        self.logits = self.forward(self.tokens, self.slots, pad=self.pad, kv_len=self.kv_len,
                                   last_only=self.last_only, layers=self.layers)

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
            self.replay = capture_graph(self._run, self.tokens.device) or self._run
        self.replay()
        return self.logits

    @torch.inference_mode()
    def __call__(self, tokens: Tensor, slots: Tensor, pad: Tensor | None) -> Tensor:
        self.tokens.copy_(tokens)
        self.slots.copy_(slots)
        return self.run(pad)


class GraphedStep(GraphedForward):
    """One decode step of `model` for `batch` rows at one shared slot below `kv_len` (None: any slot):
    (token [B], slot) -> logits [B, V]."""

    def __init__(self, model: Transformer, batch: int, kv_len: int | None = None) -> None:
        super().__init__(model, (batch, 1), (1,), True, compile=bool(model.__dict__.get("_compile_decode")),
                         kv_len=kv_len)
        self.batch = batch

    @torch.inference_mode()
    def __call__(self, token: Tensor, slot: int, pad: Tensor | None) -> Tensor:
        self.tokens.copy_(token.view(-1, 1))
        self.slots.fill_(slot)
        return self.run(pad)[:, -1]


def graphed_forward(model: Transformer, tokens: Tensor, slots: Tensor, pad: Tensor | None, kv_len: int,
                    last_only: bool = False, layers: tuple[int, ...] | None = None) -> Tensor:
    """model(tokens, slots, pad=pad, kv_len=kv_len, last_only=last_only, layers=layers), through a captured graph
    per shape and kv_bucket(kv_len) on accelerators (see GraphedForward), eagerly elsewhere."""
    if not graphs_enabled(model):
        return model(tokens, slots, pad=pad, kv_len=kv_len, last_only=last_only, layers=layers)
    graphs = _graphs(model, "_forward_graphs")
    bucket = kv_bucket(kv_len, model.max_seq_len)
    key = (tuple(tokens.shape), tuple(slots.shape), last_only, layers, bucket)
    g = graphs.get(key)
    if g is None:
        g = graphs[key] = GraphedForward(model, tuple(tokens.shape), tuple(slots.shape), last_only, layers,
                                         kv_len=bucket)
    return g(tokens, slots, pad)


def compile_decode(model: Transformer, on: bool = True) -> None:
    """Run `model`'s graph-captured decode steps through torch.compile (see the module docstring); no effect
    where steps are not captured (CPUs, XPU_LLM_GRAPHS=0)."""
    model.__dict__["_compile_decode"] = bool(on)
    model.__dict__.pop("_decode_graphs", None)  # steps captured before are stale


def graphs_enabled(model: Transformer) -> bool:
    return not is_cpu(model.norm.weight.device) and os.environ.get("XPU_LLM_GRAPHS", "1") != "0"


def decoder(model: Transformer, batch: int, pad: Tensor | None) -> Callable[[Tensor, int], Tensor]:
    """The decode step for this batch: a replayed graph per kv_bucket of the slot on accelerators (one bucket,
    the whole cache, when compiled), the eager step elsewhere."""
    from .generate import decode_one_token
    if not graphs_enabled(model):
        return lambda token, slot: decode_one_token(model, token, slot, pad)
    graphs = _graphs(model, "_decode_graphs")
    whole = bool(model.__dict__.get("_compile_decode"))

    def step(token: Tensor, slot: int) -> Tensor:
        key = (batch, model.max_seq_len if whole else kv_bucket(slot + 1, model.max_seq_len))
        g = graphs.get(key)
        if g is None:
            g = graphs[key] = GraphedStep(model, batch, key[1])
        return g(token, slot, pad)
    return step


def _graphs(model: Transformer, name: str) -> dict:
    """The model's graphs of one kind, without those captured on caches that setup_caches has since replaced
    (they hold the old cache's memory)."""
    graphs: dict = model.__dict__.setdefault(name, {})
    cache = model.layers[0].attention.kv_cache
    for key in [k for k, g in graphs.items() if g.cache is not cache]:
        del graphs[key]
    return graphs
