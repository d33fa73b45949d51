# python benchmarks/ppl.py --resume   (from the repository root; full sweep ~1 min per row on 2 cores)
"""WikiText-2 perplexity of each weight format on one model (default: the embedded SmolLM2-135M-Instruct GGUF).

Every row loads `xpu_llm.LLM(model, low_bit=fmt, group_size=g, dtype=torch.float32)` and runs
`xpu_llm.perplexity.perplexity(llm, text, window, max_windows)` (disjoint windows, every target scored). Compute
is float32 so the table measures the format, not the kernels' rounding. Rows:

- `dense`: the GGUF dequantized to float32, no quantization — the reference every delta is taken against;
- `bf16`, `fp16`: dense weights rounded to 16 bits (these rows compute in their own dtype);
- `auto`: the GGUF's own format kept as it is (Q4_1 = asym_int4, group 32 from the file, no re-quantization);
- every low-bit format at each group size: the dequantized GGUF weights re-quantized to that format
  (a second quantization on top of Q4_1, so all of them are bounded below by `auto`'s loss).

The JSON (rows + settings) is rewritten atomically after each row; `--resume` skips the rows it already holds
(only when the settings match). A markdown table is written next to it and printed.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
import os
import sys
import time
from typing import Any

from common import REPO, machine_info, model_groups, write_atomic

DEFAULT_FORMATS = "dense,bf16,fp16,auto,sym_int4,asym_int4,nf4,fp4,sym_int8,fp8_e4m3,fp8_e5m2"
DENSE = ("dense", "none", "fp32", "bf16", "fp16")
LABELS = {"dense": "dense (dequantized GGUF, fp32)", "fp32": "dense (dequantized GGUF, fp32)",
          "bf16": "bf16 dense", "fp16": "fp16 dense"}
HERE = os.path.dirname(os.path.abspath(__file__))


def row_key(fmt: str, group: int | None) -> str:
    return fmt if group is None else f"{fmt}/g{group}"


def plan(formats: list[str], groups: list[int]) -> list[tuple[str, int | None]]:
    """(format, group) per row: dense and auto rows once (the group is not theirs to choose), others per group."""
    rows: list[tuple[str, int | None]] = []
    for fmt in formats:
        fmt = "dense" if fmt in ("none", "fp32") else fmt
        if fmt in DENSE or fmt == "auto":
            rows.append((fmt, None))
        else:
            rows.extend((fmt, g) for g in groups)
    return rows


def measure(model: str | None, fmt: str, group: int | None, text: str, window: int,
            max_windows: int) -> dict[str, Any]:
    import torch
    from xpu_llm import LLM
    from xpu_llm.perplexity import perplexity
    low_bit = None if fmt == "dense" else fmt
    t0 = time.perf_counter()
    llm = LLM(model, low_bit=low_bit, group_size=group or 64, dtype=torch.float32, max_seq_len=max(window, 64),
              progress=False)
    load_s = time.perf_counter() - t0
    res = perplexity(llm, text, window=window, max_windows=max_windows, progress=False)
    real_group = model_groups(llm.model)
    label = LABELS.get(fmt, fmt)
    if fmt == "auto":
        label = f"auto = GGUF-native {llm.low_bit} (group {real_group} from the file, no re-quantization)"
    row = {"key": row_key(fmt, group), "format": fmt, "label": label, "low_bit": llm.low_bit or "dense",
           "group": real_group, "dtype": str(llm.dtype).removeprefix("torch."),
           "perplexity": round(res["perplexity"], 4), "tokens_scored": res["tokens_scored"],
           "windows": res["windows"], "seconds": round(res["seconds"], 1), "load_s": round(load_s, 1)}
    del llm
    gc.collect()
    return row


def with_deltas(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ref = next((r["perplexity"] for r in rows if r["format"] == "dense"), None)
    for r in rows:
        r["delta_vs_dense"] = round(r["perplexity"] - ref, 4) if ref is not None else None
    return rows


def markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    lines = [f"## WikiText-2 perplexity — {os.path.basename(s['model'])}", "",
             f"{s['windows_max']} windows of {s['window']} tokens (disjoint, all targets scored) from "
             f"`{os.path.basename(s['text'])}`; float32 compute (bf16/fp16 rows: their own dtype). "
             f"Δ = perplexity − dense fp32. {m['cpu']}, {s['threads']} threads, xpu-llm {m.get('xpu_llm_commit')}; "
             f"{report['date']}.", "",
             "| format | group | perplexity | Δ vs dense | tokens scored | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    order = {f: i for i, f in enumerate(DEFAULT_FORMATS.split(","))}
    rows = sorted(report["rows"], key=lambda r: (order.get(r["format"], len(order)), -(r["group"] or 0)
                                                 if isinstance(r["group"], int) else 0))
    for r in rows:
        d = r.get("delta_vs_dense")
        delta = "—" if d is None else ("0 (reference)" if r["format"] == "dense" else f"{d:+.4f}")
        lines.append(f"| {r['label']} | {r['group'] or '—'} | {r['perplexity']:.4f} | {delta} | "
                     f"{r['tokens_scored']} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--text", default=os.path.join(REPO, "..", "shared", "data", "wikitext-2-raw-test.txt"))
    ap.add_argument("--formats", default=DEFAULT_FORMATS, help="comma-separated (dense = fp32 dense, auto = GGUF's)")
    ap.add_argument("--groups", default="64,32", help="group sizes of the re-quantized formats")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out and skip them")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ppl_wikitext2.json"))
    args = ap.parse_args(argv)

    import torch
    from xpu_llm.default_model import default_model_path
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isfile(args.text):
        ap.error(f"text file {args.text} not found (WikiText-2 raw test split; see ../shared/data/README.md)")
    with open(args.text, encoding="utf-8", newline="") as f:  # newline="": keep the CRLF bytes
        text = f.read()
    model = os.path.abspath(args.model) if args.model else default_model_path()
    settings = {"model": model, "text": os.path.abspath(args.text),
                "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "window": args.window,
                "windows_max": args.max_windows, "compute_dtype": "float32", "threads": torch.get_num_threads()}
    same = ("model", "text_sha256", "window", "windows_max")
    report: dict[str, Any] = {"benchmark": "perplexity", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                              "machine": machine_info(torch.get_num_threads(), peers=False),
                              "settings": settings, "rows": []}
    if args.resume and os.path.isfile(args.out):
        with open(args.out, encoding="utf-8") as f:
            old = json.load(f)
        diff = [k for k in same if old.get("settings", {}).get(k) != settings[k]]
        if diff:
            ap.error(f"--resume: {args.out} was made with other settings ({', '.join(diff)}); "
                     f"use another --out or drop --resume")
        report["rows"] = old.get("rows", [])
    done = {r["key"] for r in report["rows"]}
    todo = [(f, g) for f, g in plan([f.strip() for f in args.formats.split(",") if f.strip()],
                                     [int(g) for g in args.groups.split(",") if g.strip()])
            if row_key(f, g) not in done]
    print(f"perplexity: {len(todo)} rows to run, {len(done)} kept", file=sys.stderr, flush=True)
    for fmt, group in todo:
        t0 = time.perf_counter()
        row = measure(args.model, fmt, group, text, args.window, args.max_windows)
        if not math.isfinite(row["perplexity"]):
            print(f"  warning: {row['key']} perplexity is {row['perplexity']}", file=sys.stderr)
        report["rows"].append(row)
        with_deltas(report["rows"])
        report["date"] = datetime.datetime.now().isoformat(timespec="seconds")
        write_atomic(args.out, json.dumps(report, indent=1) + "\n")
        print(f"  {row['key']}: {row['perplexity']:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
              flush=True)
    with_deltas(report["rows"])
    md = markdown(report)
    write_atomic(args.out, json.dumps(report, indent=1) + "\n")
    write_atomic(os.path.splitext(args.out)[0] + ".md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
