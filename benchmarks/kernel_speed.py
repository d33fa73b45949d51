# python benchmarks/kernel_speed.py --out benchmarks/results/kernels_gpu.json   (from the repository root, on a GPU)
"""Microbenchmark of the Triton low-bit matmul kernels, per format x shape x rows x kernel path, on the GPU that
xpu_llm.device picks (XPU or CUDA).

First the device's copy bandwidth is measured (a 1 GiB device-to-device copy, bytes read + written over the
median time) and, for every prefill shape, the vendor bf16 matmul rate (torch.matmul on dense bf16 weights,
timed like the rows below).
Then every row times one x [M, K] @ W.T two ways: `us` from a device graph that replays the call over enough
copies of the weight to exceed the L2 cache several times (what a graph-captured decode step sees: weights from
memory, no launch overhead), and `eager us` from triton.testing.do_bench (median, L2 flushed before each run,
Python launch overhead included). From `us` it reports:

- weight GB/s: the format's weight bytes (codes + scales + mins, formats.nbytes) over the time, and that as a
  percent of the copy bandwidth: the decode figure of merit (the weights are read once per call);
- TFLOP/s: 2*M*N*K over the time, and as a percent of the bf16 vendor matmul on that shape (prefill).

Paths: `auto` (what the dispatch picks), `gemv` (CUDA-core decode kernel), `skinny`/`fused` (dequantize in the
tl.dot GEMM), `dequant` (dequantize to a bf16 workspace, then torch.matmul). Each row is checked against the
reference (formats.dequantize + float32 matmul) before it is timed; a wrong result is reported, not timed.
Kernel configs are autotuned per shape on first use (XPU_LLM_TRITON_AUTOTUNE=0 to skip), outside the timing.

Outputs: JSON (device, bandwidth, settings, rows) at --out and a markdown table next to it (.md), also printed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

from common import machine_info, write_report

# Llama-3-8B linear shapes (N out, K in): q/o, k/v, gate/up, down.
SHAPES_8B = "4096x4096,1024x4096,14336x4096,4096x14336"
FORMATS = "bf16,sym_int4,asym_int4,nf4,fp4,sym_int8,fp8_e4m3,fp8_e5m2"
ROTATE_BYTES = 256 << 20  # weight copies cycled through per timed graph: several times the L2 cache


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default=FORMATS, help=f"comma list (default {FORMATS}); bf16 = dense F.linear")
    p.add_argument("--shapes", default=SHAPES_8B, help="NxK list (default: the Llama-3-8B linears)")
    p.add_argument("--rows", default="1,4,16,2048", help="activation rows M (decode 1-16, prefill above)")
    p.add_argument("--paths", default="auto",
                   help="auto or a comma list of gemv,skinny,fused,dequant (skinny and fused = the fused GEMM "
                        "alone; auto may pick dequant per shape)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repeat time per row (ms)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "kernels_gpu.json"))
    return p.parse_args(argv)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy: (bytes read + bytes written) / median time, in GB/s."""
    import triton
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (t * 1e-3) / 1e9


def bench(fn, rep_ms: int) -> float:
    """Median milliseconds of fn() with the L2 cache flushed before each run."""
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def graph_time(fns: list, device: torch.device) -> float | None:
    """Milliseconds per call from a device graph of the calls (None where the device has no graphs)."""
    from xpu_llm.lowbit.kernels.triton_tune import device_time
    try:
        return device_time(fns, device, rounds=20)
    except Exception as e:  # noqa: BLE001 - graphs unsupported here: the eager time still stands
        print(f"graph timing unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def chosen_config(kind: str, x: torch.Tensor, args: dict) -> str:
    """The tile config (or "dequant + vendor matmul") the dispatch runs for this call, as the tuner cached it."""
    from xpu_llm.lowbit.kernels import triton_tune
    if kind == "gemv":
        return str(triton_tune.gemv_config(x, args))
    if kind == "dequant":
        return "dequant + vendor matmul"
    cfg = triton_tune.dot_config(x, args, x.dtype == torch.float32, with_dequant=kind == "auto")
    return "dequant + vendor matmul" if cfg.block_m == 0 else str(cfg)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_row(fmt_name: str, n: int, k: int, m: int, path: str, g: int, dtype: torch.dtype, device: torch.device,
            rep_ms: int, vendor_tflops: dict) -> dict:
    from xpu_llm.lowbit.formats import get_format
    from xpu_llm.lowbit.kernels import triton_ops
    fmt = get_format(fmt_name)
    gen = torch.Generator(device=device).manual_seed(n * 7 + k)
    w = torch.randn(n, k, device=device, generator=gen) * 0.02
    x = torch.randn(m, k, device=device, generator=gen).to(dtype)
    row = {"format": fmt_name, "n": n, "k": k, "m": m, "group_size": g}
    if fmt.dense:
        wd = w.to(dtype)

        def make_fn(wd=wd):
            wc = wd.clone()
            return lambda: F.linear(x, wc)
        fn = make_fn()
        row.update(path="vendor", weight_bytes=2 * n * k)
        ref_w = wd.float()
    else:
        q = fmt.quantize(w, g)
        kind = triton_ops.path(m, dtype) if path == "auto" else path
        if (kind == "gemv" and m != 1) or (kind == "skinny" and m > 16):
            return {**row, "path": kind, "skipped": "gemv takes 1 row, skinny at most 16"}

        def make_fn(q=q, kind=kind, keep=None):
            qc = {name: t.clone() for name, t in q.items()}
            args = triton_ops.format_args(fmt_name, qc["qweight"], qc["scales"], qc.get("mins"), n, g)
            if keep is not None:
                keep.append(args)
            return lambda: triton_ops.matmul(x, args, kind=kind)
        first: list = []
        fn = make_fn(keep=first)
        row.update(path=kind if path != "auto" else f"auto:{kind}", weight_bytes=fmt.nbytes(n, k, g))
        ref_w = fmt.dequantize(q, g, torch.float32 if kind == "gemv" else dtype).float()
    del w
    out = fn()  # compiles and autotunes outside the timing
    row["rel_err"] = rel_err(out, x.float() @ ref_w.t())
    if not fmt.dense:
        row["config"] = chosen_config(kind, x, first[0])
    del ref_w
    if not row["rel_err"] < 1e-2:
        row["error"] = f"wrong result: relative error {row['rel_err']:.3g}"
        return row
    t = bench(fn, rep_ms)
    row["eager_us"] = round(t * 1e3, 2)
    copies = max(1, min(64, -(-ROTATE_BYTES // row["weight_bytes"])))
    fns = [fn] + [make_fn() for _ in range(copies - 1)]
    tg = graph_time(fns, device)
    del fns
    if tg is not None:
        t = tg
    row["us"] = round(t * 1e3, 2)
    row["timing"] = f"graph x{copies} weight copies" if tg is not None else "eager"
    row["weight_gbs"] = round(row["weight_bytes"] / (t * 1e-3) / 1e9, 1)
    row["tflops"] = round(2 * m * n * k / (t * 1e-3) / 1e12, 2)
    if (m, n, k) in vendor_tflops:
        row["pct_vendor_bf16"] = round(100 * row["tflops"] / vendor_tflops[(m, n, k)], 1)
    return row


def markdown(report: dict) -> str:
    bw = report["copy_bandwidth_gbs"]
    settings = report["settings"]
    intro = (f"Device: {report['device']}; copy bandwidth {bw:.0f} GB/s; group size {settings['group_size']}, "
             f"{settings['dtype']} activations. us: per call, from a device graph replaying the calls over rotating "
             f"weight copies (weights come from memory, launch overhead excluded; eager where the device has no "
             f"graphs); eager us: triton do_bench median with L2 flushed, Python launch included.")
    header = ("| format | N x K | M | path | us | eager us | weight GB/s | % copy BW | TFLOP/s | % bf16 matmul "
              "| rel err | config |")
    lines = [intro, "", header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        shape = f"{r['n']}x{r['k']}"
        if "us" not in r:
            lines.append(f"| {r['format']} | {shape} | {r['m']} | {r.get('path', '')} | "
                         f"{r.get('error') or r.get('skipped')} | | | | | | | |")
            continue
        lines.append(f"| {r['format']} | {shape} | {r['m']} | {r['path']} | {r['us']:.1f} | {r['eager_us']:.1f} | "
                     f"{r['weight_gbs']:.0f} | "
                     f"{100 * r['weight_gbs'] / bw:.0f}% | {r['tflops']:.1f} | {r.get('pct_vendor_bf16', '')} | "
                     f"{r['rel_err']:.1e} | {r.get('config', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from xpu_llm.device import describe, get_device, is_gpu
    device = get_device()
    if not is_gpu(device):
        print("benchmarks/kernel_speed.py needs a GPU (XPU or CUDA); none found", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    rows_m = [int(v) for v in args.rows.split(",") if v]
    paths = args.paths.split(",")
    bw = copy_bandwidth(device)
    print(f"{describe(device)}: copy bandwidth {bw:.0f} GB/s", flush=True)
    vendor = {}
    for n, k in shapes:
        for m in rows_m:
            if m > 16:  # timed like the rows: a graph over rotating weight copies, eager without graphs
                a = torch.randn(m, k, device=device, dtype=dtype)
                copies = max(1, min(8, -(-ROTATE_BYTES // (2 * n * k))))
                bs = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(copies)]
                fns = [lambda a=a, b=b: torch.matmul(a, b.t()) for b in bs]
                t = graph_time(fns, device) or bench(fns[0], args.rep_ms)
                vendor[(m, n, k)] = 2 * m * n * k / (t * 1e-3) / 1e12
                del a, bs, fns
    rows = []
    for fmt_name in args.formats.split(","):
        for n, k in shapes:
            for m in rows_m:
                for path in (["auto"] if fmt_name in ("bf16", "fp16") else paths):
                    try:
                        row = run_row(fmt_name, n, k, m, path, args.group_size, dtype, device, args.rep_ms, vendor)
                    except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
                        row = {"format": fmt_name, "n": n, "k": k, "m": m, "path": path,
                               "error": f"{type(e).__name__}: {e}"[:300]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    report = {"device": describe(device), "copy_bandwidth_gbs": round(bw, 1),
              "vendor_bf16_tflops": {f"{m}x{n}x{k}": round(v, 1) for (m, n, k), v in vendor.items()},
              "settings": {"group_size": args.group_size, "dtype": args.dtype, "rep_ms": args.rep_ms,
                           "autotune": os.environ.get("XPU_LLM_TRITON_AUTOTUNE", "1") != "0"},
              "machine": machine_info(threads=torch.get_num_threads(), peers=False),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "rows": rows}
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
