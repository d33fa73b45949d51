"""xpu_llm.parallel: multi-card runs. Process groups and the 2-D grid (dist.py), tensor-parallel sharding applied
from outside the model (tensor.py), pipeline stages and the multi-card generation loop (pipeline.py), placement
plans (plan.py), and what LLM(..., tp=, pp=) runs on each rank (engine.py)."""
from __future__ import annotations

from .dist import DistributedError, Grid, World, detect_launch, init_distributed, make_grid, shutdown
from .plan import Budget, Placement, best_for_cards, choose, estimate, parse_bytes, preset_config, stage_layers
from .tensor import TPLayout, apply_tp, check_tp, valid_tp_sizes

__all__ = ["DistributedError", "Grid", "World", "detect_launch", "init_distributed", "make_grid", "shutdown",
           "Budget", "Placement", "best_for_cards", "choose", "estimate", "parse_bytes", "preset_config",
           "stage_layers", "TPLayout", "apply_tp", "check_tp", "valid_tp_sizes"]
