"""Launch a @triton.jit kernel with less host work: a call whose arguments are of the same kinds as an earlier
call's goes straight to the compiled kernel's launcher.

`kernel[grid](*args)` costs ~21 us of host time in Triton 3.6 on an H200 host (argument binding, cache key, knobs,
stream lookup), the compiled kernel's own launcher ~6 us (.dev-style microbenchmark, 3,000 launches of a small
kernel). An 8B QLoRA step launches ~1,540 kernels and waits on the host, so this is ~23 ms of a ~390 ms step.

The reuse key is at least as fine as Triton's specialization, so a reused kernel is the one Triton itself would
pick: each tensor's dtype and 16-byte alignment; each int's class (1, a multiple of 16, other) and width (int32,
int64, uint64); bools by value; floats; None; the keyword arguments (constexprs and launch options) by value; the
kernel and the current device. The first call of each key, and everything the launcher was not checked for (CPU
tensors under Triton's interpreter, XPU and ROCm devices, a launch hook set, other Triton versions), takes
Triton's own path. XPU_LLM_TRITON_FAST_LAUNCH=0 turns the shortcut off."""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, NamedTuple

import torch

log = logging.getLogger(__name__)

# Triton versions whose JITFunction.run calls `kernel.run(g0, g1, g2, stream, function, packed_metadata,
# launch_metadata, enter_hook, exit_hook, *every bound argument)` (constexprs included): 3.6 run on an H200,
# 3.9 read in its source.
CHECKED_VERSIONS = ("3.6", "3.7", "3.8", "3.9")


class _Entry(NamedTuple):
    run: Any  # the compiled kernel's launcher
    function: Any
    metadata: Any
    tail: tuple  # values of the parameters after the positional ones (constexprs, defaults), in order


_SLOW = object()  # a key whose calls keep Triton's own path
_cache: dict[tuple, Any] = {}


@functools.cache
def enabled() -> bool:
    """Whether the shortcut may be taken at all: a checked Triton version on CUDA (not ROCm), not switched off."""
    if os.environ.get("XPU_LLM_TRITON_FAST_LAUNCH", "1") == "0" or torch.version.hip is not None:
        return False
    try:
        import triton
        from triton import knobs
    except ImportError:
        return False
    ok = ".".join(triton.__version__.split(".")[:2]) in CHECKED_VERSIONS and hasattr(knobs, "runtime")
    log.debug("fast Triton launch %s (Triton %s)", "on" if ok else "off", triton.__version__)
    return ok


def arg_key(args: tuple, kwargs: dict) -> tuple | None:
    """The specialization-kind key of a call's arguments (see the module docstring); None for an argument of
    another type, which then takes Triton's own path."""
    sig: list = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sig.append(a.dtype)
            sig.append(a.data_ptr() % 16 == 0)
        elif type(a) is int:
            if a == 1:
                sig.append("one")
            else:
                width = "i32" if -(1 << 31) <= a < (1 << 31) else "u64" if a >= (1 << 63) else "i64"
                sig.append(width + ("/16" if a % 16 == 0 else ""))
        elif type(a) is bool:
            sig.append("true" if a else "false")
        elif type(a) is float:
            sig.append("f")
        elif a is None:
            sig.append(None)
        else:
            return None
    if kwargs:
        sig.append(tuple(kwargs.items()))
    return tuple(sig)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)`, through the compiled kernel's launcher when an earlier call had arguments
    of the same kinds. Runtime arguments must be positional; keyword arguments are constexprs and launch options
    (num_warps, num_stages)."""
    if not enabled() or not _on_cuda(args):
        kernel[grid](*args, **kwargs)
        return
    dev = torch.cuda.current_device()
    kinds = arg_key(args, kwargs)
    key = None if kinds is None else (id(kernel), dev, kinds)
    entry = _cache.get(key, None) if key is not None else _SLOW
    if entry is None or entry is _SLOW or _hooks_set():
        compiled = kernel[grid](*args, **kwargs)
        if entry is None:
            _cache[key] = _entry(kernel, compiled, len(args), kwargs)
        return
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    entry.run(grid[0], g1, g2, torch._C._cuda_getCurrentRawStream(dev), entry.function, entry.metadata, None,
              None, None, *args, *entry.tail)


def _on_cuda(args: tuple) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.is_cuda
    return False


def _hooks_set() -> bool:
    from triton import knobs
    return knobs.runtime.launch_enter_hook is not None or knobs.runtime.launch_exit_hook is not None


def _entry(kernel: Any, compiled: Any, n_args: int, kwargs: dict) -> Any:
    """What reusing `compiled` needs, or _SLOW where the kernel or the call is not of the checked form."""
    try:
        params = kernel.params
        by_name = {p.name: p for p in params}
        for p in params[:n_args]:
            assert not p.is_constexpr, (
                f"{kernel}: pass constexpr {p.name!r} by keyword (positional arguments are keyed by kind, not value)")
        for name in kwargs:
            assert name not in by_name or by_name[name].is_constexpr, (
                f"{kernel}: pass runtime argument {name!r} positionally (keywords are constexprs and options)")
        tail = []
        for p in params[n_args:]:
            if p.name in kwargs:
                tail.append(kwargs[p.name])
            elif p.has_default:
                tail.append(p.default)
            else:
                return _SLOW
        run = compiled.run
        return _Entry(run, compiled.function, compiled.packed_metadata, tuple(tail))
    except AssertionError:
        raise
    except Exception as e:  # another Triton's objects: keep its own path
        log.debug("fast Triton launch off for %s: %s", kernel, e)
        return _SLOW
