"""xpu_llm.launch: multi-card runs placed by Ray. `RayLLM` (ray_llm.py) is xpu_llm.LLM with its tp x pp ranks as
Ray actors in one placement group (cluster.py places them, workers.py is a rank); `python -m xpu_llm.launch.job`
is the entry point for `ray job submit` (generate, bench, finetune). Ray is imported only when used."""
from __future__ import annotations

from typing import Any

__all__ = ["RayLLM"]


def __getattr__(name: str) -> Any:
    if name == "RayLLM":
        from .ray_llm import RayLLM
        return RayLLM
    raise AttributeError(f"module 'xpu_llm.launch' has no attribute {name!r}")
