# python benchmarks/decode_attention.py --out benchmarks/results/decode_attention_gpu.json   (from the repository root)
"""Decode-step attention of a Llama-3-8B-shaped model (32 layers, 32 query heads over 8 KV heads of 128) over a
static cache of S slots: the Triton kernel over the cache as stored (xpu_llm/attention_kernels.py) against
PyTorch's SDPA, which for a compressed cache first dequantizes it to bf16, side by side in one run, for a bf16,
int8 and fp8 (e4m3) cache. CPU smoke run (no kernel there: both columns are SDPA):

    python benchmarks/decode_attention.py --device cpu --slots 256 --layers 2 --out /tmp/da.json

Per row: each of the 32 layers' caches gets one new key and value at the last slot and one query row per head
attends to all S slots (the mask of the model's own `attention_mask`), as in a decode step; the 32 calls are
captured once into a device graph (CUDA / XPU) and replayed, so launch costs are what a captured decode step
pays. us/layer = the best of --rounds timings of --reps replays, divided by the layers; GB/s = the cache bytes
one layer's attention must read (keys and values of every slot as stored, int8 scales included) / that time;
"rel. err" = the kernel's output against SDPA's over the same stored values (float64 difference norm / norm).
Output: JSON (machine, settings, rows) and a markdown table next to it (.md), also printed."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, sig, write_atomic, write_report  # noqa: E402

KV_HEADS, HEADS, HEAD_DIM = 8, 32, 128


def cache_bytes(kind: str | None, batch: int, slots: int) -> int:
    """Bytes of keys and values (and int8 scales) one layer's attention reads over `slots` slots."""
    per_slot = KV_HEADS * (HEAD_DIM * (2 if kind is None else 1) + (4 if kind == "int8" else 0))
    return 2 * batch * slots * per_slot


def time_row(kind: str | None, slots: int, batch: int, layers: int, kernel: bool, reps: int, rounds: int,
             device) -> dict[str, Any]:
    import torch

    from xpu_llm.device import capture_graph, synchronize
    from xpu_llm.kv_cache import cache_factory
    from xpu_llm.model import attention_mask

    os.environ["XPU_LLM_FUSED_ATTENTION"] = "1" if kernel else "0"
    g = torch.Generator(device=device).manual_seed(0)
    caches = []
    for _ in range(layers):
        c = cache_factory(kind)(batch, KV_HEADS, slots, HEAD_DIM, torch.bfloat16, device)
        k, v = (torch.randn(batch, KV_HEADS, slots, HEAD_DIM, generator=g, device=device, dtype=torch.bfloat16)
                for _ in range(2))
        c.update(torch.arange(slots, device=device), k, v, slots)
        caches.append(c)
    pos = torch.tensor([slots - 1], device=device)
    mask = attention_mask(pos, slots)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, generator=g, device=device, dtype=torch.bfloat16)
    k1, v1 = (torch.randn(batch, KV_HEADS, 1, HEAD_DIM, generator=g, device=device, dtype=torch.bfloat16)
              for _ in range(2))
    outs: list = []

    def step() -> None:
        outs.clear()
        outs.extend(c.attend(q, k1, v1, pos, slots, mask) for c in caches)

    step()  # compile the kernel before the capture
    replay = capture_graph(step, device) or step
    best = float("inf")
    for _ in range(rounds):
        replay()
        synchronize(device)
        t = time.perf_counter()
        for _ in range(reps):
            replay()
        synchronize(device)
        best = min(best, (time.perf_counter() - t) / reps)
    us = best / layers * 1e6
    return {"kind": kind or "bf16", "slots": slots, "batch": batch, "attention": "kernel" if kernel else "sdpa",
            "us_per_layer": sig(us, 5), "gb_s": sig(cache_bytes(kind, batch, slots) / (us * 1e3), 4),
            "out": outs[0].double().cpu()}


def markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    lines = [f"## Decode attention, 8B layer shape ({HEADS} heads / {KV_HEADS} KV heads of {HEAD_DIM}) — "
             f"{report['device']}", "",
             f"torch {m['torch']}; xpu-llm {m.get('xpu_llm_commit')}"
             f"{' (uncommitted changes)' if m.get('xpu_llm_dirty') else ''}; {report['date']}. {s['layers']} layers "
             f"captured in one graph, best of {s['rounds']} x {s['reps']} replays.", "",
             "| cache | slots | batch | SDPA us/layer | kernel us/layer | speed-up | SDPA GB/s | kernel GB/s "
             "| rel. err |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['kind']} | {r['slots']} | {r['batch']} | {r['sdpa_us']} | {r['kernel_us']} | "
                     f"{r['speedup']:.2f}x | {r['sdpa_gb_s']} | {r['kernel_gb_s']} | {r['rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from xpu_llm.device import describe, device_module, get_device
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", default="256,2048,8192", help="cache lengths, comma list")
    ap.add_argument("--batches", default="1,16", help="comma list")
    ap.add_argument("--kinds", default="bf16,int8,fp8_e4m3", help="KV cache kinds, comma list")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default=None, help="default: xpu > cuda > cpu")
    ap.add_argument("--out", required=True, help="JSON path (a .md table is written next to it)")
    args = ap.parse_args(argv)
    device = get_device(args.device)
    mod = device_module(device)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    report: dict[str, Any] = {"benchmark": "decode_attention", "date": datetime.datetime.now().isoformat(
        timespec="seconds"), "machine": machine_info(threads=0, peers=False), "device": describe(device),
        "settings": settings, "rows": []}
    for kind in args.kinds.split(","):
        for slots in (int(x) for x in args.slots.split(",")):
            for batch in (int(x) for x in args.batches.split(",")):
                cache_kind = None if kind == "bf16" else kind
                a, b = (time_row(cache_kind, slots, batch, args.layers, kernel, args.reps, args.rounds, device)
                        for kernel in (False, True))
                err = ((b["out"] - a["out"]).norm() / a["out"].norm()).item()
                row = {"kind": kind, "slots": slots, "batch": batch, "sdpa_us": a["us_per_layer"],
                       "kernel_us": b["us_per_layer"], "speedup": a["us_per_layer"] / b["us_per_layer"],
                       "sdpa_gb_s": a["gb_s"], "kernel_gb_s": b["gb_s"], "rel_err": err}
                report["rows"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if mod is not None:
                    mod.empty_cache()  # the next row's caches in memory this row's held
                write_atomic(args.out, json.dumps(report, indent=1) + "\n")
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
