# python benchmarks/speculative.py --out benchmarks/results/speculative_cpu.json   (from the repository root)
"""Self-speculative decoding against plain greedy decoding, per draft kind, on 20 fixed instruction prompts
(SmolLM2-135M-Instruct by default, chat template, greedy, EOS on, up to --new-tokens each, batch 1).

For every kind: acceptance rate (drafts accepted / proposed), tokens per target pass (tokens the verification
passes produced / passes; plain decoding = 1), draft and verification cost per step, `agree` (prompts whose
tokens equal plain greedy's), and the speedup: plain decode time / speculative decode time over the same prompts
(decode = after the first token, which the prefill produces in both). Each prompt runs plain and then each kind;
the best of --repeats runs counts. A warm-up pass (every config on one prompt) runs first.

How the layer_skip default subset was chosen: benchmarks/speculative_layers.py. Other mode:
  --shape 8b             Llama-3-8B shape with random bf16 weights on --device: time of one target step, of
                         verification over k+1 positions, of one draft step (layer_skip subsets, lowbit sym_int4);
                         random weights make acceptance meaningless, so only costs (and projected speedups at
                         given acceptance rates) are reported. --shape tiny: the same on a small shape (a smoke
                         test of this mode on a CPU).
Outputs JSON at --out and a markdown table next to it (.md), also printed. GPU: --device cuda (or xpu), any
name xpu_llm.device accepts; --low-bit bf16 for the bf16 target the issue's GPU target refers to."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_atomic  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Write a haiku about autumn leaves.", "Explain photosynthesis in two sentences.",
    "List three benefits of regular exercise.", "Translate 'Where is the train station?' into French.",
    "What is 15 multiplied by 12?", "Give three synonyms for 'quick'.", "Describe the water cycle briefly.",
    "Write a Python function that returns the square of a number.", "What causes the seasons on Earth?",
    "Summarise the story of Little Red Riding Hood in three sentences.", "How do vaccines work?",
    "Suggest a name for a bakery and explain why.", "What is the difference between weather and climate?",
    "Write a short email asking a colleague for a meeting tomorrow.", "Why do cats purr?",
    "Explain what a binary search is.", "Name the planets of the solar system in order.",
    "Rewrite this sentence in the passive voice: The chef cooked the meal.", "What are the primary colors?",
]

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--low-bit", default="auto", help="target format: auto, none (dense), or a registry name")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None, help="cpu, cuda, xpu (xpu_llm.device names; default: the first there)")
    ap.add_argument("--kinds", default="lookup,layer_skip,lowbit")
    ap.add_argument("--layers", default=None, help="layer_skip subset, e.g. 0,2,4 (default: the engine's default)")
    ap.add_argument("--k-max", type=int, default=None, help="most drafts per round (default: the engine's)")
    ap.add_argument("--threshold", type=float, default=None, help="initial draft threshold (default: the engine's)")
    ap.add_argument("--target-acceptance", type=float, default=None,
                    help="acceptance rate the adaptive threshold steers toward (default: the engine's)")
    ap.add_argument("--draft-low-bit", default=None, help="lowbit draft format (default: the engine's, auto)")
    ap.add_argument("--draft-group-size", type=int, default=None, help="lowbit draft group size (default: 64)")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shape", choices=["8b", "tiny"], default=None,
                    help="random-weight cost mode: 8b (GPU), tiny (a CPU smoke test of the mode)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/speculative_<device>.json)")
    return ap.parse_args(argv)


def spec_options(args: argparse.Namespace, kind: str, layers: list[int] | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = {"kind": kind}
    if args.k_max:
        opts["k_max"] = args.k_max
    if args.threshold is not None and kind != "lookup":
        opts["threshold"] = args.threshold
    if args.target_acceptance is not None and kind != "lookup":
        opts["target_acceptance"] = args.target_acceptance
    if kind == "lowbit" and args.draft_low_bit:
        opts["low_bit"] = args.draft_low_bit
    if kind == "lowbit" and args.draft_group_size:
        opts["group_size"] = args.draft_group_size
    if kind == "layer_skip" and (layers is not None or args.layers):
        opts["layers"] = tuple(layers if layers is not None else (int(x) for x in args.layers.split(",")))
    return opts


def run_config(llm, prompts: list[str], args: argparse.Namespace, spec: Any) -> list[dict[str, Any]]:
    """One generation per prompt (best of --repeats by decode time): tokens and the call's stats."""
    rows = []
    for p in prompts:
        best = None
        for _ in range(args.repeats):
            r = llm.generate(p, max_new_tokens=args.new_tokens, chat=True, ignore_eos=args.ignore_eos,
                             speculative=spec)[0]
            if best is None or r.stats["decode_s"] < best.stats["decode_s"]:
                best = r
        rows.append({"tokens": best.token_ids, **best.stats})
    return rows


def summarise(name: str, runs: list[dict[str, Any]], plain: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-prompt runs of one config against the plain runs."""
    dec = sum(r["decode_s"] for r in runs)
    steps = sum(max(len(r["tokens"]) - 1, 0) for r in runs)
    plain_dec = sum(r["decode_s"] for r in plain)
    plain_steps = sum(max(len(r["tokens"]) - 1, 0) for r in plain)
    row: dict[str, Any] = {
        "config": name, "prompts": len(runs), "new_tokens": sum(len(r["tokens"]) for r in runs),
        "decode_s": round(dec, 3), "decode_tokens_per_s": round(steps / dec, 2) if dec else None,
        "agree": sum(a["tokens"] == b["tokens"] for a, b in zip(runs, plain)),
        "speedup": round((steps / dec) / (plain_steps / plain_dec), 3) if dec and plain_dec else None,
        "target_step_ms": round(1000 * plain_dec / plain_steps, 2) if plain_steps else None,
    }
    if "speculative" in runs[0]:
        prop = sum(r["drafts_proposed"] for r in runs)
        acc = sum(r["drafts_accepted"] for r in runs)
        rounds = sum(r["rounds"] for r in runs)
        dsteps = sum(r["draft_steps"] for r in runs)
        row.update(acceptance_rate=round(acc / prop, 4) if prop else 0.0,
                   tokens_per_target_pass=round(steps / rounds, 3) if rounds else None,
                   drafts_per_round=round(prop / rounds, 2) if rounds else None,
                   draft_step_ms=round(1000 * sum(r["draft_s"] for r in runs) / dsteps, 2) if dsteps else None,
                   verify_pass_ms=round(1000 * sum(r["verify_s"] for r in runs) / rounds, 2) if rounds else None)
        if row["draft_step_ms"] and row["target_step_ms"]:
            row["draft_cost_ratio"] = round(row["draft_step_ms"] / row["target_step_ms"], 3)
    return row


def bench_prompts(args: argparse.Namespace) -> dict[str, Any]:
    from xpu_llm import LLM
    from xpu_llm.drafts import default_skip_layers
    low_bit = None if args.low_bit.lower() in ("none", "dense") else args.low_bit
    llm = LLM(args.model, low_bit=low_bit, dtype=args.dtype, device=args.device, max_seq_len=512)
    prompts = PROMPTS[:args.prompts]
    n_layers = len(llm.model.layers)
    configs: list[tuple[str, Any]] = [("plain", False)] + [(k, spec_options(args, k))
                                                            for k in args.kinds.split(",") if k]
    usable, skipped = [], []
    for name, spec in configs:  # warm-up: builds drafts, packs kernels; a kind that cannot run is reported
        try:
            llm.generate(prompts[0], max_new_tokens=8, chat=True, speculative=spec)
            usable.append((name, spec))
        except Exception as e:  # noqa: BLE001 - e.g. a lowbit draft for an already 4-bit target
            skipped.append({"config": name, "error": str(e)})
    runs = {name: [] for name, _ in usable}
    for i in range(len(prompts)):  # interleaved per prompt, so slow drifts of the machine hit every config alike
        for name, spec in usable:
            runs[name] += run_config(llm, prompts[i:i + 1], args, spec)
        print(f"prompt {i + 1}/{len(prompts)}", file=sys.stderr)
    rows = [summarise(name, runs[name], runs["plain"]) for name, _ in usable]
    for (name, spec), row in zip(usable, rows):
        if isinstance(spec, dict) and spec.get("kind") == "layer_skip":
            row["layers"] = list(spec.get("layers") or default_skip_layers(n_layers))
    return {"model": os.path.basename(llm.source.path), "target": llm.low_bit or "dense",
            "dtype": str(llm.dtype).split(".")[-1], "n_layers": n_layers, "rows": rows, "skipped": skipped,
            "tokens": {name: [r["tokens"] for r in runs[name]] for name in runs}}


# ---------------------------------------------------------------------------------------------- 8B shape

SHAPES = {  # Llama-3-8B (GQA 32/8, vocab 128256), and a small one that smoke-tests this mode on a CPU
    "8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
               head_dim=128, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=512,
                 head_dim=64, max_position_embeddings=1024),
}


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A model of `shape` with N(0, 0.02) weights (norms 1), built on meta then materialised on `device`."""
    from xpu_llm.config import ModelConfig
    from xpu_llm.loading import meta_model
    cfg = ModelConfig(**SHAPES[shape])
    model = meta_model(cfg).to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    return model.eval()


def time_forward(model, tokens: int, pos: int, reps: int, device, layers=None) -> float:
    """Median ms of one forward of `tokens` positions at slot `pos` (last_only when tokens == 1), through
    graphed_forward as the engine runs verification passes and draft steps (a captured graph on GPUs)."""
    from xpu_llm.device import synchronize
    from xpu_llm.graphs import graphed_forward
    ids = torch.randint(0, 1000, (1, tokens), device=device)
    slots = torch.arange(pos, pos + tokens, device=device)
    times = []
    with torch.inference_mode():
        for i in range(reps + 2):
            synchronize(device)
            t0 = time.perf_counter()
            graphed_forward(model, ids, slots, None, pos + tokens, tokens == 1,
                            None if layers is None else tuple(layers))
            synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def bench_shape(args: argparse.Namespace) -> dict[str, Any]:
    from xpu_llm.device import get_device
    from xpu_llm.drafts import default_skip_layers, lowbit_copy
    device = get_device(args.device)
    dtype = torch.bfloat16 if device.type != "cpu" else torch.float32
    model = random_model(args.shape, device, dtype)
    n_layers = len(model.layers)
    ctx, reps = 256, 10 if device.type != "cpu" else 3
    model.setup_caches(1, ctx + 16, dtype=dtype, device=device)
    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, ctx), device=device), torch.arange(ctx, device=device), kv_len=ctx)
    step = time_forward(model, 1, ctx, reps, device)
    rows: list[dict[str, Any]] = [{"what": "target step (1 position)", "ms": round(step, 3), "ratio": 1.0}]
    for k in (1, 2, 4, 6, 8):
        ms = time_forward(model, k + 1, ctx, reps, device)
        rows.append({"what": f"verification, k={k} ({k + 1} positions)", "ms": round(ms, 3),
                     "ratio": round(ms / step, 3)})
    subsets = {"layer_skip default": list(default_skip_layers(n_layers)),
               "layer_skip every 2nd": list(range(0, n_layers, 2)),
               "layer_skip first half": list(range(max(1, n_layers // 2)))}
    for name, layers in subsets.items():
        ms = time_forward(model, 1, ctx, reps, device, layers=layers)
        rows.append({"what": f"{name} ({len(layers)}/{n_layers} layers)", "ms": round(ms, 3),
                     "ratio": round(ms / step, 3)})
    draft, share = lowbit_copy(model, "sym_int4", 64)
    draft.setup_caches(1, ctx + 16, dtype=dtype, device=device)
    ms = time_forward(draft, 1, ctx, reps, device)
    rows.append({"what": f"lowbit sym_int4 draft step ({share:.0%} of weights re-quantized)", "ms": round(ms, 3),
                 "ratio": round(ms / step, 3)})
    verify = {int(r["what"].split("k=")[1].split(" ")[0]): r["ratio"] for r in rows if "k=" in r["what"]}
    rows.append({"what": "lookup (no draft model)", "ms": 0.0, "ratio": 0.0})
    for r in rows:
        if not r["what"].startswith(("target", "verification")):
            r["projected"] = {a: projected(a, r["ratio"], verify) for a in ACCEPTANCE}
    return {"model": f"random-weight {args.shape} shape ({n_layers} layers)",
            "target": "dense", "dtype": str(dtype).replace("torch.", ""), "context": ctx, "rows": rows}


ACCEPTANCE = (0.5, 0.6, 0.7, 0.8, 0.9)


def projected(a: float, cost: float, verify: dict[int, float]) -> str:
    """Projected speedup at the best k for i.i.d. acceptance a: (1 - a^(k+1)) / (1 - a) tokens per round over
    (verify(k+1) + k · cost) target steps; "speedup (k)"."""
    sp, k = max(((1 - a ** (k + 1)) / (1 - a) / (v + k * cost), k) for k, v in verify.items())
    return f"{sp:.2f} (k={k})"


# ---------------------------------------------------------------------------------------------- output

def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    head = (f"## Self-speculative decoding — {report['model']}, target {report['target']} ({report.get('dtype', '')})"
            f"\n\n{m['cpu'] if report['device'] == 'cpu' else report['device_name']}, {m['threads']} threads; torch "
            f"{m['torch']}; xpu-llm {m['xpu_llm_commit']}{' (uncommitted changes)' if m['xpu_llm_dirty'] else ''}; "
            f"{report['date']}\n\n")
    if s.get("shape"):
        head += (f"Context {report['context']} tokens, batch 1, median of the timed forwards. Projected speedup at "
                 "acceptance a, best k: (1 - a^(k+1)) / (1 - a) tokens per round over (verify(k+1) + k × draft "
                 "step) target steps.\n\n")
        lines = ["| forward | ms | × target step | " + " | ".join(f"a={a}" for a in ACCEPTANCE) + " |",
                 "|---|---:|---:|" + "---:|" * len(ACCEPTANCE)]
        for r in report["rows"]:
            proj = r.get("projected")
            cells = " | ".join(proj[a] for a in ACCEPTANCE) if proj else " | ".join("" for _ in ACCEPTANCE)
            lines.append(f"| {r['what']} | {r['ms']} | {r['ratio']} | {cells} |")
        return head + "\n".join(lines) + "\n"
    head += (f"{s['prompts']} instruction prompts (chat template), greedy, up to {s['new_tokens']} new tokens"
             f"{' (EOS ignored)' if s['ignore_eos'] else ''}, batch 1, best of {s['repeats']}. speedup = plain decode "
             "time / speculative decode time (prefill excluded). tokens/pass: plain = 1.\n\n")
    lines = ["| config | acceptance | tokens/pass | drafts/round | draft step ms | verify pass ms | target step ms "
             "| decode tok/s | speedup | agree |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        g = r.get
        lines.append(f"| {r['config']} | {g('acceptance_rate', '—')} | {g('tokens_per_target_pass', 1.0)} | "
                     f"{g('drafts_per_round', '—')} | {g('draft_step_ms') or '—'} | {g('verify_pass_ms', '—')} | "
                     f"{r['target_step_ms']} | {r['decode_tokens_per_s']} | {r['speedup']} | "
                     f"{r['agree']}/{r['prompts']} |")
    for sk in report.get("skipped", []):
        lines.append(f"| {sk['config']} | not run: {sk['error'][:120]} |||||||||")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from xpu_llm.device import describe, get_device
    device = get_device(args.device)
    report = bench_shape(args) if args.shape else bench_prompts(args)
    report.update(machine=machine_info(torch.get_num_threads(), peers=False), device=device.type,
                  device_name=describe(device), date=datetime.datetime.now().isoformat(timespec="seconds"),
                  settings={k: v for k, v in vars(args).items() if k != "out"} | {"prompts": min(args.prompts, 20)})
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"speculative_{device.type}{'_' + args.shape if args.shape else ''}.json")
    write_atomic(out, json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    write_atomic(os.path.splitext(out)[0] + ".md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
