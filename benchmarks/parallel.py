# torchrun --nproc-per-node 2 benchmarks/parallel.py --out benchmarks/results/parallel_h200.json   (repository root)
"""Multi-card decode speed: one card vs tensor parallel (tp = all ranks) at batch 1, and vs pipeline parallel
(pp = all ranks) at a large batch, for each weight format, on a random-weight model of a published shape
(default Llama-3-8B). Smoke test on the CPU over gloo:

    torchrun --nproc-per-node 2 benchmarks/parallel.py --shape tiny --out /tmp/parallel_tiny.json

Weights: each rank builds its shard on the meta device, then materialises only its own slices with random
values (and quantizes them), so no rank ever holds the full float model. Every mode generates greedily from
the same random prompt ids, never stopping early.

Measured (per mode, format and batch; best of --repeats after one warm-up generation):
- decode tokens/s = (new tokens - batch) / (time from all rows' first token to the last token), all rows counted
  (the first token of each row comes out of the prefill), as GenerationStats reports it;
- end-to-end tokens/s = new tokens / (prefill + decode), which is where a pipeline's overlap of micro-batches
  in the compute-bound prefill shows;
- per-card peak memory (the device's max_memory_allocated; the process's peak RSS on the CPU).
The one-card rows run on rank 0 alone while the other ranks wait. `--graphs` replays each decode step from a
captured accelerator graph (experimental; without it, eager PyTorch's per-op launch cost dominates decode).
Output: JSON (settings, device, rows, speed-ups) at --out, a markdown table beside it (.md), both printed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_atomic  # noqa: E402

from xpu_llm.config import ModelConfig  # noqa: E402
from xpu_llm.device import describe, device_module, max_memory_allocated, peak_rss, reset_peak_memory  # noqa: E402
from xpu_llm.generate import SamplingParams  # noqa: E402
from xpu_llm.loading import meta_model  # noqa: E402
from xpu_llm.lowbit.formats import get_format  # noqa: E402
from xpu_llm.lowbit.linear import LowBitLinear  # noqa: E402
from xpu_llm.model import RMSNorm  # noqa: E402
from xpu_llm.parallel.dist import Grid, init_distributed, make_grid  # noqa: E402
from xpu_llm.parallel.pipeline import StageRunner  # noqa: E402
from xpu_llm.parallel.plan import PRESETS, Budget, estimate  # noqa: E402
from xpu_llm.parallel.tensor import TPLayout, install_comm, shard_modules  # noqa: E402
from xpu_llm.shard_io import Shard  # noqa: E402

TINY = {"model_type": "llama", "hidden_act": "silu", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1024,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5}
DENSE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def shape_config(name: str) -> ModelConfig:
    return ModelConfig.from_hf(TINY if name == "tiny" else PRESETS[name])


# ---------------------------------------------------------------------------------------------- random shards

def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def materialise(model: nn.Module, low_bit: str, group: int, dtype: torch.dtype, device: torch.device,
                gen: torch.Generator) -> None:
    """Give every meta module of this rank's shard random weights on `device`, one matrix at a time (quantized
    right away for a low-bit format)."""
    fmt = get_format(low_bit)
    for path, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            w = torch.randn(mod.out_features, mod.in_features, generator=gen, device=device) * 0.02
            if fmt.dense:
                lin = nn.Linear(mod.in_features, mod.out_features, bias=False, device="meta")
                lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
            else:
                lin = LowBitLinear.from_quantized(fmt.quantize(w, group), mod.in_features, mod.out_features,
                                                  fmt.name, group)
            del w
            _set(model, path, lin)
        elif isinstance(mod, nn.Embedding):
            mod.weight = nn.Parameter(torch.randn(mod.weight.shape, generator=gen, device=device).to(dtype),
                                      requires_grad=False)
        elif isinstance(mod, RMSNorm):
            mod.weight = nn.Parameter(torch.ones(mod.weight.shape, device=device, dtype=dtype), requires_grad=False)


def build(cfg: ModelConfig, grid: Grid, low_bit: str, group: int, dtype: torch.dtype, device: torch.device,
          max_seq_len: int, graphs: bool) -> StageRunner:
    """This rank's shard of a random model, with its collectives, ready to generate."""
    fmt = get_format(low_bit)
    budget = Budget(None if fmt.dense else fmt.name, group, max_seq_len, act_bytes=dtype.itemsize)
    stages = estimate(cfg, grid.tp, grid.pp, budget).stages
    layout = TPLayout.build(cfg, grid.tp, grid.tp_rank, budget.unit)
    model = meta_model(cfg, Shard(stages[grid.stage], embed=grid.first, head=grid.last))
    shard_modules(model, layout)
    gen = torch.Generator(device=device).manual_seed(1234 + grid.world.rank)
    materialise(model, low_bit, group, dtype, device, gen)
    install_comm(model, layout, grid.tp_group)
    model.eval()
    return StageRunner(model, grid, max_seq_len, dtype, device, graphs=graphs)


def weight_bytes(model: nn.Module) -> int:
    seen = {id(t): t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())}
    for name, t in model.named_buffers():
        if "rope" in name or "cache" in name:
            seen.pop(id(t), None)
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------- measuring

def measure(runner: StageRunner, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """Best of `repeats` greedy generations after a short warm-up."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    runner.generate(prompts, SamplingParams(max_new_tokens=min(4, new_tokens), temperature=0.0), 0)
    best = None
    for _ in range(repeats):
        ids, stats = runner.generate(prompts, params, 0)
        row = {"batch": len(prompts), "new_tokens": stats.new_tokens, "prefill_s": round(stats.prefill_s, 4),
               "decode_s": round(stats.decode_s, 4), "decode_tok_s": round(stats.decode_tokens_per_s, 2),
               "e2e_tok_s": round(stats.new_tokens / max(stats.prefill_s + stats.decode_s, 1e-9), 2),
               "first_tokens": ids[0][:8]}
        if best is None or row["decode_tok_s"] > best["decode_tok_s"]:
            best = row
    return best


def free(device: torch.device) -> None:
    gc.collect()
    mod = device_module(device)
    if mod is not None:
        mod.empty_cache()
    reset_peak_memory(device)


def peak_gib(device: torch.device) -> float:
    return round((max_memory_allocated(device) if device_module(device) else peak_rss()) / 2**30, 3)


def run_mode(name: str, grid: Grid | None, cfg, fmt: str, args, device, dtype, batches: list[int]) -> list[dict]:
    """Build the mode's shard on the ranks of `grid` (None: this rank is not part of it) and measure."""
    rows = []
    if grid is not None:
        free(device)
        t0 = time.perf_counter()
        runner = build(cfg, grid, fmt, args.group_size, dtype, device, args.prompt_len + args.new_tokens + 8,
                       args.graphs)
        built = time.perf_counter() - t0
        g = torch.Generator().manual_seed(0)
        for b in batches:
            prompts = torch.randint(0, cfg.vocab_size, (b, args.prompt_len), generator=g).tolist()
            row = measure(runner, prompts, args.new_tokens, args.repeats)
            rows.append({"mode": name, "format": fmt, "tp": grid.tp, "pp": grid.pp, **row,
                         "weights_gib_per_card": round(weight_bytes(runner.model) / 2**30, 3),
                         "peak_gib_per_card": peak_gib(device), "build_s": round(built, 2)})
        del runner
        free(device)
    return rows


def gather_peaks(rows: list[dict]) -> list[dict]:
    """Per-card peaks of every rank into rank 0's rows (the max over ranks)."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows)
    if dist.get_rank() != 0:
        return rows
    for i, row in enumerate(rows):
        row["peak_gib_per_card"] = max(r[i]["peak_gib_per_card"] for r in everyone if len(r) > i)
        row["weights_gib_per_card"] = max(r[i]["weights_gib_per_card"] for r in everyone if len(r) > i)
    return rows


def table(rows: list[dict], speedups: list[dict]) -> str:
    out = ["| mode | format | batch | decode tok/s | end-to-end tok/s | prefill s | weights GiB/card | "
           "peak GiB/card |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['mode']} | {r['format']} | {r['batch']} | {r['decode_tok_s']} | {r['e2e_tok_s']} | "
                   f"{r['prefill_s']} | {r['weights_gib_per_card']} | {r['peak_gib_per_card']} |")
    out += ["", "| speed-up | format | decode | end-to-end | target |", "|---|---|---:|---:|---|"]
    for s in speedups:
        out.append(f"| {s['what']} | {s['format']} | {s['decode']}x | {s['e2e']}x | {s.get('target', '')} |")
    return "\n".join(out)


def speedups(rows: list[dict], world: int) -> list[dict]:
    by = {(r["mode"], r["format"], r["batch"]): r for r in rows}
    targets = {("bf16", "tp"): ">= 1.6x", ("sym_int4", "tp"): ">= 1.4x", ("bf16", "pp"): ">= 1.5x",
               ("sym_int4", "pp"): ">= 1.5x"}
    out = []
    for (mode, fmt, b), r in by.items():
        one = by.get(("1 card", fmt, b))
        if mode == "1 card" or one is None:
            continue
        kind = mode.split()[0]
        out.append({"what": f"{mode} vs 1 card, batch {b}", "format": fmt,
                    "decode": round(r["decode_tok_s"] / max(one["decode_tok_s"], 1e-9), 2),
                    "e2e": round(r["e2e_tok_s"] / max(one["e2e_tok_s"], 1e-9), 2),
                    "target": targets.get((fmt, kind), "") if (kind == "tp") == (b == 1) else ""})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3-8b", choices=["tiny", *PRESETS])
    ap.add_argument("--formats", default="bf16,sym_int4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (tiny: 16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (tiny: 8)")
    ap.add_argument("--pp-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--graphs", action="store_true", help="replay decode steps from captured graphs (GPUs)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="JSON path (a .md table is written beside it)")
    args = ap.parse_args()
    tiny = args.shape == "tiny"
    args.prompt_len = args.prompt_len or (16 if tiny else 128)
    args.new_tokens = args.new_tokens or (8 if tiny else 128)
    world = init_distributed(args.device)
    n = world.world_size
    assert n >= 2, "run under torchrun with at least 2 processes"
    device = world.device
    cfg = shape_config(args.shape)
    rows: list[dict] = []
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        dense = get_format(fmt).dense
        dtype = DENSE[fmt] if dense else (torch.float32 if device.type == "cpu" else torch.bfloat16)
        solo = Grid(world, 1, 1, 0, 0, None) if world.rank == 0 else None
        with world.guard(f"the {fmt} runs"):
            rows += run_mode("1 card", solo, cfg, fmt, args, device, dtype, [1, args.pp_batch])
            dist.barrier()
            tp_rows = run_mode(f"tp {n}", make_grid(world, n, 1), cfg, fmt, args, device, dtype, [1])
            pp_rows = run_mode(f"pp {n}", make_grid(world, 1, n), cfg, fmt, args, device, dtype, [args.pp_batch])
            rows += gather_peaks(tp_rows) + gather_peaks(pp_rows)
    if world.rank != 0:
        return
    ups = speedups(rows, n)
    report = {"settings": {**vars(args), "world": n, "backend": world.backend}, "device": describe(device),
              "torch": torch.__version__, "rows": rows, "speedups": ups}
    md = table(rows, ups)
    print(json.dumps(report, indent=1))
    print(md)
    if args.out:
        write_atomic(args.out, json.dumps(report, indent=1) + "\n")
        write_atomic(os.path.splitext(args.out)[0] + ".md", md + "\n")


if __name__ == "__main__":
    main()
