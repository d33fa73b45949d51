"""Tile configurations for the Triton kernels: a short candidate list per kernel, autotuned per shape on first
use and cached in memory and in a JSON file (keyed by device name, Triton version, format, group, N, K, row
bucket, dtype), so tuning is paid once per machine. Tuning never runs while a graph is being captured or compiled, nor under the
interpreter: the first candidate is used then. XPU_LLM_TRITON_AUTOTUNE=0 turns tuning off.

Candidates are timed on the device alone (a device graph of calls over rotating copies of the weight, so the
weights come from memory as in a decode step and Python launch overhead does not bias the choice); devices
without a graph API fall back to triton.testing.do_bench with the L2 cache flushed."""
from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import threading

import torch
import triton
from torch import Tensor

from ...device import device_module
from .triton_common import FORMAT_IDS
from .triton_gemm import DEQUANT, DotConfig
from .triton_gemv import GemvConfig

log = logging.getLogger(__name__)

_VERSION = 4  # bump when the candidate lists or kernels change, so stale cache entries are ignored
_lock = threading.Lock()
_memory: dict[str, dict] = {}
_disk_loaded = False
ROTATE_BYTES = 256 << 20  # weight copies cycled through when timing: several times any GPU's L2 cache
_fast: dict[tuple, object] = {}  # (kind, device, fmt, group, n, k, rows bucket, dtype, extra) -> config: the hot path


def autotune_enabled() -> bool:
    return os.environ.get("XPU_LLM_TRITON_AUTOTUNE", "1") != "0"


def cache_path() -> str:
    base = os.environ.get("XPU_LLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "xpu_llm")
    return os.path.join(base, "triton_tune.json")


def _load_disk() -> None:
    global _disk_loaded
    if _disk_loaded:
        return
    _disk_loaded = True
    try:
        with open(cache_path(), encoding="utf-8") as f:
            _memory.update({k: v for k, v in json.load(f).items() if k not in _memory})
    except (OSError, ValueError):
        pass


def _save_disk() -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-triton_tune-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_memory, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not break inference
        log.debug("could not write the Triton tuning cache %s: %s", path, e)


@functools.cache
def _device_name(device: torch.device) -> str:
    mod = device_module(device)
    return "cpu" if mod is None else str(mod.get_device_name(device))


@functools.cache
def _num_cores(device: torch.device) -> int:
    """Streaming multiprocessors / Xe cores: how many programs fill the device once."""
    mod = device_module(device)
    if mod is None:
        return 4
    props = mod.get_device_properties(device)
    for attr in ("multi_processor_count", "gpu_subslice_count", "max_compute_units"):
        if getattr(props, attr, None):
            return int(getattr(props, attr))
    return 64


def _can_tune(x: Tensor) -> bool:
    if not autotune_enabled() or device_module(x.device) is None:
        return False
    if torch.compiler.is_compiling():
        return False
    capturing = getattr(device_module(x.device), "is_current_stream_capturing", None)
    return not (capturing is not None and capturing())


def _bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def _auto_split(device: torch.device, n_tiles: int, n_steps: int) -> int:
    """K splits so that about four programs per core are in flight (decode shapes have few output tiles)."""
    want = 4 * _num_cores(device)
    return max(1, min(n_steps, want // max(n_tiles, 1)))


def device_time(fns: list, device: torch.device, rounds: int = 10) -> float | None:
    """Milliseconds per call of the callables in `fns`, on the device alone: all of them captured once in a device
    graph (no launch overhead) and replayed. None where the device module has no graph API."""
    from ...device import synchronize
    mod = device_module(device)
    graph_cls = None if mod is None else next(
        (getattr(mod, n) for n in dir(mod) if n.endswith("Graph") and isinstance(getattr(mod, n), type)), None)
    if graph_cls is None or not all(hasattr(mod, a) for a in ("graph", "Event", "Stream", "stream")):
        return None
    side = mod.Stream()
    side.wait_stream(mod.current_stream())
    with mod.stream(side):  # compile and warm up outside the capture
        for fn in fns:
            fn()
    mod.current_stream().wait_stream(side)
    graph = graph_cls()
    with mod.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    start, end = mod.Event(enable_timing=True), mod.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        graph.replay()
    end.record()
    synchronize(device)
    return start.elapsed_time(end) / (rounds * len(fns))


def _weight_copies(args: dict) -> list[dict]:
    """`args` plus clones of its weight tensors, ROTATE_BYTES in all, so a timed sequence reads from memory."""
    nbytes = sum(args[t].numel() * args[t].element_size() for t in ("q", "s"))
    n = max(1, min(32, -(-ROTATE_BYTES // max(nbytes, 1))))
    out = [args]
    for _ in range(n - 1):
        c = dict(args, q=args["q"].clone(), s=args["s"].clone())
        if args["fmt_id"] == 1:  # asym_int4 mins
            c["z"] = args["z"].clone()
        out.append(c)
    return out


def _time(kind: str, x: Tensor, args: dict, cfg, run) -> float:
    """Device time of one call under `cfg` over rotating weight copies; do_bench (L2 flushed) without graphs."""
    try:
        t = device_time([lambda a=a: run(cfg, a) for a in _weight_copies(args)], x.device)
        if t is None:
            t = triton.testing.do_bench(lambda: run(cfg, args), warmup=5, rep=20, return_mode="median")
        return t
    except Exception as e:  # noqa: BLE001 - a config the compiler or the device rejects (e.g. shared memory)
        log.debug("%s config %s failed: %s", kind, cfg, e)
        return float("inf")


def _pick(kind: str, x: Tensor, args: dict, candidates: list, run, extra: str = ""):
    """The cached best candidate for this shape, tuning once when allowed; the first candidate otherwise."""
    key = (f"v{_VERSION}|{kind}|{_device_name(x.device)}|triton {triton.__version__}|fmt{args['fmt_id']}"
           f"|g{args['group_size']}|n{args['n']}|k{x.shape[1]}|m{_bucket(x.shape[0])}|{x.dtype}{extra}")
    with _lock:
        _load_disk()
        hit = _memory.get(key)
    if hit is not None:
        for cfg in candidates:
            if cfg.__dict__ == hit:
                return cfg
    if not _can_tune(x) or len(candidates) == 1:
        return candidates[0]
    times = [_time(kind, x, args, cfg, run) for cfg in candidates]
    best = candidates[min(range(len(candidates)), key=times.__getitem__)]
    log.info("tuned %s: %s (%.1f us; candidates %s)", key, best, 1e3 * min(times),
             " ".join(f"{1e3 * t:.1f}" for t in times))
    with _lock:
        _memory[key] = dict(best.__dict__)
        _save_disk()
    return best


# ------------------------------------------------------------------------------------------------ candidates

def _ng(step_elems: int, group_size: int, n_groups: int) -> int:
    """Groups per K step for a step of about `step_elems` elements (a power of two, at most the groups there)."""
    ng = max(1, step_elems // group_size)
    return min(ng, triton.next_power_of_2(n_groups))


def gemv_candidates(x: Tensor, args: dict) -> list[GemvConfig]:
    g, n, k = args["group_size"], args["n"], x.shape[1]
    per_byte = 2 if args["fmt_id"] < 4 else 1  # elements per weight byte
    out = []
    # (rows per program, weight bytes per row per K step, warps); the first is the untuned default
    for block_n, step_bytes, warps in ((16, 256, 4), (32, 256, 4), (8, 512, 4), (16, 512, 4), (32, 128, 4),
                                       (64, 128, 8), (32, 512, 8), (16, 128, 2),
                                       # few rows, a K step spread over all threads: x is decoded once per
                                       # thread for all its rows and the group sums stay inside a thread
                                       (4, 2048, 8), (4, 1024, 4), (8, 512, 4), (4, 512, 4),
                                       # many rows per thread: the activation's conversion is shared by them
                                       (32, 512, 4), (64, 512, 4), (16, 1024, 4), (32, 1024, 8), (64, 256, 4)):
        ng = _ng(step_bytes * per_byte, g, k // g)
        n_tiles = triton.cdiv(n, block_n)
        split = _auto_split(x.device, n_tiles, triton.cdiv(k // g, ng))
        out.append(GemvConfig(block_n, ng, warps, split))
        if split > 1:
            out.append(GemvConfig(block_n, ng, warps, max(1, split // 4)))
    if args["fmt_id"] == FORMAT_IDS["nf4"]:  # the first tiles also with the pair table (fewer instructions, more
        # cache lines per read: not timed on a GPU yet, so the tuner decides)
        out += [GemvConfig(c.block_n, c.ng, c.warps, c.split, pairs=True) for c in out[:4]]
    return list(dict.fromkeys(out))


def dot_candidates(x: Tensor, args: dict, with_dequant: bool = True) -> list[DotConfig]:
    """Fused-GEMM tiles for x's row count; with_dequant adds the dequantize + vendor matmul path (first for
    prefill shapes, where it is the untuned default, last for skinny ones)."""
    g, n, k, m = args["group_size"], args["n"], x.shape[1], x.shape[0]
    out = [DEQUANT] if with_dequant and m > 16 else []
    if m <= 16:
        for block_n, bk, warps, stages in ((64, 128, 4, 3), (128, 128, 4, 3), (64, 256, 4, 3), (32, 256, 4, 3),
                                           (128, 64, 4, 4), (128, 256, 8, 3)):
            ng = _ng(bk, g, k // g)
            split = _auto_split(x.device, triton.cdiv(n, block_n), triton.cdiv(k // g, ng))
            out.append(DotConfig(16, block_n, ng, warps, stages, split))
    else:
        for block_m, block_n, bk, warps, stages in ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 128, 8, 3),
                                                    (128, 256, 64, 8, 3), (64, 256, 64, 8, 3),
                                                    (128, 64, 64, 4, 4), (64, 64, 128, 4, 4)):
            block_m = min(block_m, max(16, triton.next_power_of_2(m)))
            out.append(DotConfig(block_m, block_n, _ng(bk, g, k // g), warps, stages))
    if with_dequant and m <= 16:
        out.append(DEQUANT)
    return list(dict.fromkeys(out))


def _out(x: Tensor, args: dict) -> Tensor:
    return torch.empty((x.shape[0], args["n"]), dtype=x.dtype, device=x.device)


def gemv_config(x: Tensor, args: dict) -> GemvConfig:
    """The decode kernel's config for this shape (cached; tuned on first use)."""
    key = ("gemv", x.device, args["fmt_id"], args["group_size"], args["n"], x.shape[1], 1, x.dtype)
    cfg = _fast.get(key)
    if cfg is None:
        from .triton_gemv import gemv
        cfg = _pick("gemv", x, args, gemv_candidates(x, args), lambda c, a: gemv(x, a, c, _out(x, a)))
        _fast[key] = cfg
    return cfg


def dot_config(x: Tensor, args: dict, dot_f32: bool = False, with_dequant: bool = True) -> DotConfig:
    """The matmul config for this shape and row bucket (cached; tuned on first use); it may be DEQUANT."""
    key = ("dot", x.device, args["fmt_id"], args["group_size"], args["n"], x.shape[1], _bucket(x.shape[0]), x.dtype,
           dot_f32, with_dequant)
    cfg = _fast.get(key)
    if cfg is None:
        from .triton_gemm import run
        cfg = _pick("dot", x, args, dot_candidates(x, args, with_dequant),
                    lambda c, a: run(x, a, c, _out(x, a), dot_f32=dot_f32),
                    extra=("|f32dot" if dot_f32 else "") + ("|dq" if with_dequant else ""))
        _fast[key] = cfg
    return cfg
