"""The only module that knows device types: picks xpu > cuda > cpu, the matching process-group
backend, synchronises and reads memory. Everything else asks this module."""
from __future__ import annotations

import importlib.util
import logging
import os
import resource
import sys

import torch

from .errors import XpuLLMError

log = logging.getLogger(__name__)

_PREFERENCE = ("xpu", "cuda", "cpu")


def _available(kind: str) -> bool:
    if kind == "cpu":
        return True
    mod = getattr(torch, kind, None)
    return bool(mod is not None and mod.is_available())


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: `device` if given (or $XPU_LLM_DEVICE), else the first of xpu, cuda, cpu present."""
    device = device if device is not None else os.environ.get("XPU_LLM_DEVICE") or None
    if device is None:
        kind = next(k for k in _PREFERENCE if _available(k))
        return torch.device(kind)
    dev = torch.device(device)
    if not _available(dev.type):
        raise XpuLLMError(f"device {str(dev)!r} was requested but is not available here; "
                          f"available: {', '.join(k for k in _PREFERENCE if _available(k))}")
    return dev


def is_cpu(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu"


def is_gpu(device: torch.device | str) -> bool:
    """True for the accelerators the Triton kernels and graph capture target (XPU and CUDA)."""
    return torch.device(device).type in ("xpu", "cuda")


def dist_backend(device: torch.device | str | None = None) -> str:
    """Process-group backend for `device`: ccl (oneCCL bindings) or xccl on XPU, nccl on CUDA, gloo on CPU."""
    kind = get_device(device).type
    if kind == "xpu":
        if importlib.util.find_spec("oneccl_bindings_for_pytorch") is not None:
            import oneccl_bindings_for_pytorch  # noqa: F401  (registers the "ccl" backend)
            return "ccl"
        return "xccl"
    if kind == "cuda":
        return "nccl"
    return "gloo"


def device_module(device: torch.device | str):
    """torch.xpu / torch.cuda for a GPU device, None for the CPU."""
    kind = torch.device(device).type
    return None if kind == "cpu" else getattr(torch, kind)


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for all queued work on `device` (no-op on the CPU)."""
    dev = get_device(device)
    mod = device_module(dev)
    if mod is not None:
        mod.synchronize(dev)


def capture_graph(fn, device: torch.device | str):
    """Run `fn` once under graph capture on `device` (a CUDA graph, an XPU graph) and return a function that
    replays it; None where the device has no graphs (the CPU). `fn` must already have run once eagerly
    (lazy initialisations, autotuning) and must not synchronise with the host."""
    dev = torch.device(device)
    mod = device_module(dev)
    graph_cls = None if mod is None else getattr(mod, "CUDAGraph", None) or getattr(mod, "XPUGraph", None)
    if graph_cls is None or not hasattr(mod, "graph"):
        return None
    graph = graph_cls()
    with mod.graph(graph):
        fn()
    return graph.replay


def set_device(device: torch.device | str) -> None:
    """Make `device` current for its runtime (per-rank card binding)."""
    dev = torch.device(device)
    mod = device_module(dev)
    if mod is not None and dev.index is not None:
        mod.set_device(dev.index)


def local_device(local_rank: int) -> torch.device:
    """The card a rank with this local rank should use (the CPU when there is no accelerator)."""
    kind = get_device().type
    return torch.device("cpu") if kind == "cpu" else torch.device(kind, local_rank)


def memory_allocated(device: torch.device | str | None = None) -> int:
    """Bytes currently allocated by tensors on `device` (process RSS on the CPU)."""
    dev = get_device(device)
    mod = device_module(dev)
    if mod is None:
        return current_rss()
    return int(mod.memory_allocated(dev))


def max_memory_allocated(device: torch.device | str | None = None) -> int:
    """Peak bytes allocated on `device` since the last reset (peak process RSS on the CPU)."""
    dev = get_device(device)
    mod = device_module(dev)
    if mod is None:
        return peak_rss()
    return int(mod.max_memory_allocated(dev))


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    dev = get_device(device)
    mod = device_module(dev)
    if mod is not None:
        mod.reset_peak_memory_stats(dev)


def total_memory(device: torch.device | str | None = None) -> int:
    """Total memory of the card in bytes (system RAM on the CPU)."""
    dev = get_device(device)
    mod = device_module(dev)
    if mod is None:
        import psutil
        return int(psutil.virtual_memory().total)
    return int(mod.get_device_properties(dev).total_memory)


def current_rss() -> int:
    import psutil
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """Peak resident set size of this process in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def describe(device: torch.device | str | None = None) -> str:
    """A human name for the device, e.g. 'cpu (2 threads)' or 'cuda:0 NVIDIA H100'."""
    dev = get_device(device)
    mod = device_module(dev)
    if mod is None:
        return f"cpu ({torch.get_num_threads()} threads)"
    return f"{dev} {mod.get_device_name(dev)}"
