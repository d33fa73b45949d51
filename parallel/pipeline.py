"""Pipeline stages and the multi-card generation loop. Each stage holds a contiguous block of layers (embedding on
the first, lm_head on the last) and passes hidden states on with send/recv. A batch is cut into as many
micro-batches as there are stages and they circulate around the ring of stages, so that every stage works on a
different micro-batch at once: the last stage samples, and the tokens travel back to the first stage (and, with
each micro-batch's next step, on to every stage, so every rank ends with the same results).

Every tick, each stage processes what it holds and then swaps with its neighbours in two batched exchanges: a
fixed-size control message (what comes next: a prefill, a decode step, a finished micro-batch, sampled tokens),
then the hidden states it announced. Batched isend/irecv pairs on every rank make the ring deadlock-free on
gloo, NCCL and oneCCL alike."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from ..device import capture_graph
from ..generate import GenerationStats, SamplingParams, make_batch, sample
from ..graphs import kv_bucket
from ..model import KVCache, Transformer, attention_mask
from .dist import Grid
from .tensor import split

EMPTY, PREFILL, DECODE, FINISHED, TOKENS = range(5)
_HEADER = 3  # kind, micro-batch, count


class StageRunner:
    """One rank's part of the model with a KV cache per micro-batch slot."""

    def __init__(self, model: Transformer, grid: Grid, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device, graphs: bool = False) -> None:
        self.model, self.grid, self.dtype, self.device = model, grid, dtype, device
        self.max_seq_len = max_seq_len
        model.setup_caches(1, max_seq_len, dtype=dtype, device=device)  # RoPE tables (+ a batch-1 cache)
        self.caches: dict[int, list[KVCache]] = {}
        # Experimental (GPUs): replay each micro-batch slot's decode step from a captured accelerator graph.
        self.graphs = graphs and device.type != "cpu"
        self.graphed: dict[tuple[int, int], _GraphedStep] = {}  # (micro-batch slot, cache slots read) -> step

    # ------------------------------------------------------------------------------------------ caches
    def use_slot(self, slot: int, batch: int) -> None:
        """Point every layer at micro-batch slot `slot`'s caches (made or grown to `batch` rows on first use)."""
        caches = self.caches.get(slot)
        if caches is None or caches[0].batch_size < batch:
            self.caches.pop(slot, None)
            for key in [k for k in self.graphed if k[0] == slot]:
                del self.graphed[key]
            caches = [self.model.cache_factory(batch, layer.attention.n_kv_heads, self.max_seq_len,
                                               layer.attention.head_dim, self.dtype, self.device)
                      for layer in self.model.layers]
            self.caches[slot] = caches
        for layer, cache in zip(self.model.layers, caches):
            layer.attention.kv_cache = cache
        self.model.max_batch_size = caches[0].batch_size

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor, input_pos: Tensor, pad: Tensor | None, kv_len: int | None,
                last_only: bool) -> Tensor:
        """This stage's part of Transformer.forward: token ids in on the first stage, hidden states otherwise;
        logits out of the last stage, hidden states otherwise."""
        m, grid = self.model, self.grid
        if grid.pp == 1:
            return m(x, input_pos, pad=pad, kv_len=kv_len, last_only=last_only)
        # The same steps as Transformer.forward, over this stage's layers only.
        b, t = x.shape[:2]
        kv = m.max_seq_len if kv_len is None else kv_len
        pos = input_pos.view(1, t) if pad is None else (input_pos.view(1, t) - pad.view(b, 1)).clamp_min(0)
        cos, sin = m.rope_cos[pos].unsqueeze(1), m.rope_sin[pos].unsqueeze(1)
        h = m.tok_embeddings(x) if grid.first else x
        masks: dict[int | None, Tensor] = {}
        for layer in m.layers:
            w = layer.attention.window
            if w not in masks:
                masks[w] = attention_mask(input_pos, kv, pad, w)
            h = layer(h, cos, sin, masks[w], input_pos, kv_len)
        if not grid.last:
            return h
        if last_only:
            h = h[:, -1:]
        return m.output(m.norm(h))

    def decode(self, slot: int, x: Tensor, pos: int, pad: Tensor | None) -> Tensor:
        """One decode step of micro-batch slot `slot` at cache position `pos` (after use_slot(slot, ...))."""
        if not self.graphs:
            return self.forward(x, torch.tensor([pos], device=self.device), pad, pos + 1, last_only=True)
        key = (slot, kv_bucket(pos + 1, self.max_seq_len))
        step = self.graphed.get(key)
        if step is None or not step.matches(x, pad):
            step = self.graphed[key] = _GraphedStep(self, x, pos, pad, key[1])
        return step(x, pos)

    @torch.inference_mode()
    def logits(self, ids: Tensor, pad: Tensor | None) -> Tensor:
        """One full forward of [B, T] ids through all stages; [B, T, V] float32 on every rank."""
        grid, m = self.grid, self.model
        b, t = ids.shape
        self.use_slot(0, b)
        pos = torch.arange(t, device=self.device)
        x = ids.to(self.device)
        if not grid.first:
            x = torch.empty(b, t, m.config.dim, dtype=self.dtype, device=self.device)
            dist.recv(x, src=grid.rank_of(grid.stage - 1, grid.tp_rank))
        out = self.forward(x, pos, pad, t, last_only=False)
        if grid.pp == 1:
            return out.float()
        if not grid.last:
            dist.send(out.contiguous(), dst=grid.rank_of(grid.stage + 1, grid.tp_rank))
            out = torch.empty(b, t, m.config.vocab_size, dtype=torch.float32, device=self.device)
        else:
            out = out.float().contiguous()
        dist.broadcast(out, src=grid.rank_of(grid.pp - 1, 0))
        return out

    def generate(self, prompts: list[list[int]], params: SamplingParams, pad_id: int,
                 on_step: Callable[[int, list[int]], bool] | None = None) -> tuple[list[list[int]], GenerationStats]:
        """New token ids per prompt and timings, the same on every rank (see the module docstring)."""
        with torch.inference_mode():
            return _Ring(self, prompts, params, pad_id, on_step).run()


@dataclass
class _MicroBatch:
    rows: range
    pad: Tensor | None      # left padding of its rows (one tensor for the whole generation)
    count: int = 0          # tokens recorded so far (each row's, finished rows included)
    finished: bool = False


@dataclass
class _Ring:
    runner: StageRunner
    prompts: list[list[int]]
    params: SamplingParams
    pad_id: int
    on_step: Callable[[int, list[int]], bool] | None
    out: list[list[int]] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        r, grid = self.runner, self.runner.grid
        self.grid = grid
        self.batch = make_batch(self.prompts, self.pad_id, r.device)
        b, self.t = self.batch.tokens.shape
        n_mb = min(b, grid.pp)
        rows = [range(*split(b, n_mb, i)) for i in range(n_mb)]
        pad = self.batch.pad
        self.mbs = [_MicroBatch(r, None if pad is None else pad[r.start:r.stop]) for r in rows]
        self.width = max(len(mb.rows) for mb in self.mbs)
        self.out, self.done = [[] for _ in range(b)], [False] * b
        self.stops = set(self.params.stop_token_ids)
        self.gen = self._generator()
        self.stats = GenerationStats(batch=b, prompt_tokens=sum(self.batch.lengths))

    def _generator(self) -> torch.Generator | None:
        """The sampler's generator: seeded alike on every rank (a drawn seed is broadcast), so that the last
        stage's tensor-parallel ranks, which hold identical logits, draw identical tokens."""
        if self.params.temperature == 0:
            return None
        seed = self.params.seed
        if seed is None:
            t = torch.randint(0, 2**62, (1,), device=self.runner.device)
            if self.grid.world.world_size > 1:
                dist.broadcast(t, src=0)
            seed = int(t.item())
        return torch.Generator(device=self.runner.device).manual_seed(seed)

    # ------------------------------------------------------------------------------------------ messages
    def _ctrl(self, kind: int, mb: int = 0, tokens: list[int] | None = None,
              flags: list[bool] | None = None) -> Tensor:
        c = torch.zeros(_HEADER + 2 * self.width, dtype=torch.long)
        c[0], c[1] = kind, mb
        if tokens is not None:
            c[2] = len(tokens)
            c[_HEADER:_HEADER + len(tokens)] = torch.tensor(tokens)
            c[_HEADER + self.width:_HEADER + self.width + len(tokens)] = torch.tensor([int(f) for f in flags])
        return c.to(self.runner.device)

    def _record(self, mb: int, tokens: list[int], flags: list[bool] | None) -> list[bool]:
        """Append a step's tokens to the rows still running; decide which rows end (stop token, on_step) unless
        the flags decided on the first stage are given."""
        micro = self.mbs[mb]
        micro.count += 1
        for r, tok in zip(micro.rows, tokens):
            if self.done[r]:
                continue
            self.out[r].append(tok)
            self.stats.new_tokens += 1
            if flags is None:
                self.done[r] = tok in self.stops or (self.on_step is not None and self.on_step(r, self.out[r]))
        if flags is not None:
            for r, f in zip(micro.rows, flags):
                self.done[r] = bool(f)
        return [self.done[r] for r in micro.rows]

    # ------------------------------------------------------------------------------------------ one tick
    def _compute(self, kind: int, mb: int, x: Tensor, tokens: list[int] | None,
                 flags: list[bool] | None) -> tuple[Tensor, Tensor | None]:
        r, micro = self.runner, self.mbs[mb]
        r.use_slot(mb, len(micro.rows))
        pad = micro.pad
        if kind == PREFILL:
            y = r.forward(x, torch.arange(self.t, device=r.device), pad, self.t, last_only=True)
        else:
            y = r.decode(mb, x, self.t + micro.count - 1, pad)
        if self.grid.last:
            new = sample(y[:, -1], self.params, self.gen).tolist()
            return self._ctrl(TOKENS, mb, new, [False] * len(new)), None
        return self._ctrl(kind, mb, tokens, flags), y

    def _process(self, tick: int, ctrl: list[int], payload: Tensor | None) -> tuple[Tensor, Tensor | None]:
        kind, mb, n = ctrl[0], ctrl[1], ctrl[2]
        tokens = ctrl[_HEADER:_HEADER + n]
        flags = [bool(f) for f in ctrl[_HEADER + self.width:_HEADER + self.width + n]]
        if self.grid.first and tick < len(self.mbs):
            assert kind == EMPTY, "a micro-batch came back before all were started"
            rows = self.mbs[tick].rows
            return self._compute(PREFILL, tick, self.batch.tokens[rows.start:rows.stop], None, None)
        if self.grid.first and kind == TOKENS:
            flags = self._record(mb, tokens, None)
            micro = self.mbs[mb]
            if all(flags) or micro.count >= self.params.max_new_tokens:
                micro.finished = True
                return self._ctrl(FINISHED, mb, tokens, flags), None
            x = torch.tensor(tokens, device=self.runner.device).view(-1, 1)
            return self._compute(DECODE, mb, x, tokens, flags)
        if kind == FINISHED:
            self._record(mb, tokens, flags)
            self.mbs[mb].finished = True
            return (self._ctrl(EMPTY), None) if self.grid.last else (self._ctrl(FINISHED, mb, tokens, flags), None)
        if kind in (PREFILL, DECODE):
            if kind == DECODE:
                self._record(mb, tokens, flags)
            return self._compute(kind, mb, payload, tokens if kind == DECODE else None, flags)
        return self._ctrl(EMPTY), None

    def _exchange(self, ctrl: Tensor, payload: Tensor | None) -> tuple[list[int], Tensor | None]:
        """Send what this stage produced to the next stage and receive the previous stage's: control first,
        then the hidden states it announced (shapes follow from the control message)."""
        grid = self.grid
        if grid.pp == 1:
            return ctrl.tolist(), payload
        incoming = torch.empty_like(ctrl)
        _swap([(ctrl, grid.next_rank)], [(incoming, grid.prev_rank)])
        c = incoming.tolist()
        sends = [(payload.contiguous(), grid.next_rank)] if payload is not None else []
        recvs = []
        if c[0] in (PREFILL, DECODE):
            b = len(self.mbs[c[1]].rows)
            t = self.t if c[0] == PREFILL else 1
            buf = torch.empty(b, t, self.runner.model.config.dim, dtype=self.runner.dtype, device=self.runner.device)
            recvs.append((buf, grid.prev_rank))
        if sends or recvs:
            _swap(sends, recvs)
        return c, (recvs[0][0] if recvs else None)

    def run(self) -> tuple[list[list[int]], GenerationStats]:
        grid = self.grid
        t0 = time.perf_counter()
        t_first = None
        ctrl, payload = [EMPTY, 0, 0], None
        tick, end_tick = 0, None
        while True:
            out_ctrl, out_payload = self._process(tick, ctrl, payload)
            if t_first is None and all(mb.count > 0 for mb in self.mbs):
                t_first = time.perf_counter()
            if end_tick is None and all(mb.finished for mb in self.mbs):
                # The last micro-batch finished at the first stage at tick - stage; that news reaches the last
                # stage pp - 1 ticks after it, and every stage exchanges until then.
                end_tick = tick - grid.stage + grid.pp - 1
            if end_tick is not None and tick >= end_tick:
                break
            ctrl, payload = self._exchange(out_ctrl, out_payload)
            tick += 1
        t_end = time.perf_counter()
        t_first = t_first or t_end
        self.stats.prefill_s, self.stats.decode_s = t_first - t0, t_end - t_first
        return self.out, self.stats


class _GraphedStep:
    """A decode step captured once into an accelerator graph (xpu_llm.device.capture_graph) and replayed: static
    input, position and output buffers; attention runs over the first `kv_len` cache slots (a kv_bucket, as in
    xpu_llm.graphs) with the causal mask, so one graph serves every position below it. Tensor-parallel
    collectives are captured with it (every rank of a stage reaches a new bucket at the same step)."""

    def __init__(self, runner: StageRunner, x: Tensor, pos: int, pad: Tensor | None, kv_len: int) -> None:
        # The warm-up and the capture run the real step (same input, same position): they rewrite the very cache
        # entries that the first replay writes again.
        self.x, self.pad = x.clone(), pad
        self.pos = torch.full((1,), pos, dtype=torch.long, device=runner.device)

        def step() -> Tensor:
            return runner.forward(self.x, self.pos, self.pad, kv_len, last_only=True)

        step()  # warm-up outside the graph (lazy initialisations, kernel autotuning)
        out: list[Tensor] = []
        self.replay = capture_graph(lambda: out.append(step()), runner.device)
        assert self.replay is not None, f"{runner.device} has no accelerator graphs; run without graphs"
        self.out = out[0]

    def matches(self, x: Tensor, pad: Tensor | None) -> bool:
        return x.shape == self.x.shape and x.dtype == self.x.dtype and pad is self.pad

    def __call__(self, x: Tensor, pos: int) -> Tensor:
        self.x.copy_(x)
        self.pos.fill_(pos)
        self.replay()
        return self.out


def _swap(sends: list[tuple[Tensor, int]], recvs: list[tuple[Tensor, int]]) -> None:
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends] + \
          [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
