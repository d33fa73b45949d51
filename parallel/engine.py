"""What `LLM(..., tp=, pp=)` runs on each rank: resolve the sizes (or "auto" through the plan), join the process
group, read and quantize only this rank's part of the checkpoint, add the collectives, and serve generation and
logits through the pipeline ring. Every rank runs the same program and gets the same results."""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..device import get_device, total_memory
from ..errors import XpuLLMError
from ..generate import GenerationStats, SamplingParams
from ..loading import Source, load_model, open_checkpoint
from ..model import Transformer
from ..shard_io import Shard
from .dist import Grid, detect_launch, init_distributed, launch_world_size, make_grid
from .pipeline import StageRunner
from .plan import Budget, best_for_cards, estimate, layer_bytes
from .tensor import TPLayout, check_tp, install_comm, shard_modules

log = logging.getLogger(__name__)


def _size(v: int | str, name: str) -> int | str:
    if v == "auto":
        return v
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise XpuLLMError(f"{name} must be a positive integer or 'auto', got {v!r}") from None
    if n < 1:
        raise XpuLLMError(f"{name} must be at least 1, got {n}")
    return n


def resolve_sizes(cfg, tp: int | str, pp: int | str, budget: Budget, device: str | torch.device | None = None
                  ) -> tuple[int, int]:
    """Concrete (tp, pp): 'auto' fills in from the launch's world size (tp as large as a host allows, the rest
    pipeline stages), checked against the card's memory."""
    tp, pp = _size(tp, "tp"), _size(pp, "pp")
    if tp != "auto" and pp != "auto":
        return tp, pp
    world = launch_world_size()
    if tp != "auto":
        return tp, max(world // tp, 1)
    if pp != "auto":
        return max(world // pp, 1), pp
    if world == 1:
        return 1, 1
    launch = detect_launch()
    host = launch.local_world_size if launch else world
    card = total_memory(get_device(device))
    p = best_for_cards(cfg, world, card, budget, host)
    if p is None:
        raise XpuLLMError(f"no tp x pp split of this model uses {world} ranks ({host} per host); start a number of "
                          "processes that its head count divides, or pass tp= and pp=")
    if not p.fits:
        log.warning("the plan tp %d x pp %d may not fit %.1f GiB cards:\n%s", p.tp, p.pp, card / 2**30, p.describe())
    return p.tp, p.pp


class ParallelModel:
    """One rank's shard of the model and the machinery to run it with the other ranks."""

    def __init__(self, model: Transformer, grid: Grid, info: dict[str, Any], layout: TPLayout) -> None:
        self.model, self.grid, self.info, self.layout = model, grid, info, layout
        self.world = grid.world
        self.device = self.world.device
        self._runner: StageRunner | None = None

    @property
    def rank(self) -> int:
        return self.world.rank

    def runner(self, max_seq_len: int) -> StageRunner:
        if self._runner is None or self._runner.max_seq_len != max_seq_len:
            self._runner = StageRunner(self.model, self.grid, max_seq_len, self.info["dtype"], self.device)
        return self._runner

    def generate(self, prompts: list[list[int]], params: SamplingParams, pad_id: int, on_step, max_seq_len: int
                 ) -> tuple[list[list[int]], GenerationStats]:
        with self.world.guard("generation"):
            return self.runner(max_seq_len).generate(prompts, params, pad_id, on_step)

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None, max_seq_len: int) -> Tensor:
        b, t = input_ids.shape
        pad = None
        if attention_mask is not None:
            pad = (t - attention_mask.sum(-1)).to(self.device)
            pad = pad if bool(pad.any()) else None
        with self.world.guard("the forward pass"):
            return self.runner(max_seq_len).logits(input_ids, pad)

    def __repr__(self) -> str:
        g = self.grid
        return f"ParallelModel(rank {self.rank}: stage {g.stage}/{g.pp}, tp rank {g.tp_rank}/{g.tp})"


def load_parallel(source: Source, low_bit: str | None | object, group_size: int, dtype: torch.dtype,
                  device: str | torch.device | None, tp: int | str, pp: int | str, max_seq_len: int | None,
                  progress: bool = True, timeout_s: float | None = None) -> ParallelModel | None:
    """This rank's part of the model (None when the sizes resolve to one card: load as usual)."""
    op = open_checkpoint(source, low_bit, group_size)
    cfg = op.config
    unit = op.cut_unit(group_size)
    act_bytes = torch.tensor([], dtype=op.dtype or dtype).element_size()
    budget = Budget(op.low_bit, group_size if not op.keep_native else 32,
                    max_seq_len or min(cfg.max_position_embeddings, 2048), act_bytes=act_bytes)
    tp, pp = resolve_sizes(cfg, tp, pp, budget, device)
    if tp * pp == 1:
        return None
    check_tp(cfg, tp, unit)  # before joining, so that every rank fails alike with the valid sizes
    if not 1 <= pp <= cfg.n_layers:
        raise XpuLLMError(f"pp={pp} pipeline stages need between 1 and {cfg.n_layers} (the model's layer count)")
    world = init_distributed(device, timeout_s=timeout_s)
    grid = make_grid(world, tp, pp)
    stages = estimate(cfg, tp, pp, budget).stages
    layout = TPLayout.build(cfg, tp, grid.tp_rank, unit)
    shard = Shard(stages[grid.stage], embed=grid.first, head=grid.last, slice_of=layout.slice_of)
    with world.guard("loading the model"):
        model, info = load_model(source, low_bit, group_size, dtype, world.device, progress and world.rank == 0,
                                 shard=shard, prepare=lambda m: shard_modules(m, layout))
        install_comm(model, layout, grid.tp_group)
        model.eval()
        dist.barrier()  # every rank loaded (a rank that failed to load fails the others here)
    info.update(tp=tp, pp=pp, stage_layers=[(r.start, r.stop) for r in stages], shard_layers=stages[grid.stage])
    log.info("rank %d: stage %d (layers %d-%d), tp rank %d of %d, %.2f GiB of weights", world.rank, grid.stage,
             stages[grid.stage].start, stages[grid.stage].stop - 1, grid.tp_rank, tp,
             len(stages[grid.stage]) * layer_bytes(cfg, tp, budget) / 2**30)
    return ParallelModel(model, grid, info, layout)
