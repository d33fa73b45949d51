# python benchmarks/qlora.py --out benchmarks/results/qlora_gpu.json      (from the repository root, on a GPU)
# python benchmarks/qlora.py --shapes llama3-8b --engines xpu-llm --profile    (where a step's GPU time goes)
# python benchmarks/qlora.py --shapes llama3-8b --engines xpu-llm,bnb --uncheckpointed-layers 0,4 --profile
# python benchmarks/qlora.py --shapes llama3-8b --engines xpu-llm,bnb --uncheckpointed-layers 8,11 --rounds 2
# taskset -c 2,3 python benchmarks/qlora.py --shapes llama3-8b --engines xpu-llm --uncheckpointed-layers 8
# python benchmarks/qlora.py --shapes llama3-8b --engines xpu-llm,bnb --uncheckpointed-layers 26 --rounds 2
#   (26 of 32 layers keep their activations within bnb's peak: the README's newest H200 rows)
"""QLoRA training speed and peak memory on random weights of a real model shape, side by side in one run:
xpu-llm (HF model with LowBitLinear nf4 layers + LoRA through xpu_llm.finetune) and transformers + PEFT +
bitsandbytes NF4 (when bitsandbytes is installed).

Shapes: `llama3-8b` (Llama-3-8B: 32 layers, 4096 wide, GQA 8, vocab 128256; sequence 1024, batch 4) and
`llama2-7b` (Llama-2-7B, sequence 1024, batch 1: the does-it-fit-in-16-GB check for an Arc A770), `tiny`
(a CPU smoke run). Every engine: random weights built in bf16 on the device, then quantized layer by layer;
LoRA r 16 (alpha 32, dropout 0.05) on every linear but the output head, gradient checkpointing
(non-reentrant for the bitsandbytes rows, transformers' default), bf16 autocast, torch AdamW on the adapter,
loss on every token (random token ids), Python's garbage collector run between steps (StepGC, as the trainer
does). Each engine runs in its own child process (its peak memory is its own; a crash or OOM costs one row).

    tokens/s = batch * sequence * timed steps / their wall time (device synchronised), after warm-up steps
    peak     = the device's max_memory_allocated over the timed and warm-up steps (reset after the model is
               built; on the CPU: peak resident memory of the process)

Engines:
- `xpu-llm`: `optimize_model(model, "nf4", 64)` (the untied output head is quantized too, as xpu-llm does),
  `fuse_layers` (Triton RMSNorm, SwiGLU and rotary embedding, as `xpu_llm.finetune.load_base` applies them),
  `checkpoint_layers` (reentrant; the last --uncheckpointed-layers N layers keep their activations, one row
  per value), `xpu_llm.finetune.add_lora` (whose LoRA update is one in-place addmm, and whose dropout is fused
  into A's product and each adapted linear is one autograd node: `XPU_LLM_FUSED_LORA_DROPOUT=0` for PEFT's
  own pieces, an A/B in one machine); LoRA A's inputs (the MLP's down input, the two norm outputs) recomputed
  in backward (fused.py); the trainer's
  loss, with the output head fused into the cross-entropy chunk by chunk (finetune/loss.py: no [tokens, vocab]
  logits kept: 15.3 -> 11.6 GiB at the peak of this shape on an H200, results/qlora_h200_fused_loss.md;
  `XPU_LLM_FUSED_LOSS=0` for the HF model's own loss, an A/B); base float weights bf16.
- `bnb`: the QLoRA recipe of the PEFT/transformers docs: `bnb.nn.Linear4bit` nf4, double quantization, bf16
  compute (what `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16)` builds; the output head stays bf16), then
  `peft.prepare_model_for_kbit_training` (which upcasts the non-quantized weights to fp32) and
  `peft.get_peft_model`.
- `bnb-bf16`: the same without the fp32 upcast (a leaner, faster bitsandbytes baseline).
- `bnb-bf16-nocast`: `bnb-bf16` with PEFT's input cast to the adapter's float32 turned off on every LoRA layer
  (`cast_input_dtype_enabled = False`, what `peft.helpers.disable_input_dtype_casting` sets), which xpu-llm's
  LoRA layers skip under autocast: the same change on the bitsandbytes side, for comparison.

Rows run one after another, each in its own child process; `--rounds N` runs them all N times, every other
round in reverse order: lent machines' host speed drifts during a run, and xpu-llm's steps wait on the host where
bitsandbytes' wait on the device, so one round's order can favour a row. Pinning the process to two cores
(`taskset -c 2,3`, above) ran xpu-llm's rows ~20% faster on one H200 host (results/qlora_h200_affinity.md).

Outputs: JSON (machine, settings, rows) at --out and a markdown table next to it (.md), also printed."""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import re
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import child_row, machine_info, write_atomic  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(config=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                  rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False),
                      seq=1024, batch=4),
    "llama2-7b": dict(config=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                  max_position_embeddings=4096, tie_word_embeddings=False),
                      seq=1024, batch=1),
    "tiny": dict(config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                             tie_word_embeddings=False),
                 seq=64, batch=2),
}
ENGINES = ("xpu-llm", "bnb", "bnb-bf16", "bnb-bf16-nocast")
GIB = 2**30
A770_BYTES = 16 * GIB


# ---------------------------------------------------------------------------------------------- one engine

def _random_model(shape: str | dict[str, Any], device, dtype):
    """An HF Llama of the shape (a SHAPES name, or LlamaConfig fields) with random weights, built directly on the
    device."""
    import torch
    import transformers

    fields = SHAPES[shape]["config"] if isinstance(shape, str) else shape
    cfg = transformers.LlamaConfig(**fields, initializer_range=0.02)
    cfg.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.requires_grad_(False)
    return model


def _bnb_quantize(model, device, dtype) -> None:
    """Swap every linear but the output head for a bitsandbytes nf4 Linear4bit (double quant, bf16 compute)."""
    import bitsandbytes as bnb
    from torch import nn

    head = model.get_output_embeddings()
    for name, lin in list(model.named_modules()):
        if not isinstance(lin, nn.Linear) or lin is head:
            continue
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                                compress_statistics=True, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                       quant_type="nf4", blocksize=64).to(device)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        lin.weight = None


def build(engine: str, shape: str, args: argparse.Namespace, device):
    """The PEFT model of `engine`, ready to train."""
    import peft
    import torch

    from xpu_llm.device import is_cpu

    dtype = torch.float32 if is_cpu(device) else torch.bfloat16
    model = _random_model(shape, device, dtype)
    lora = dict(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05)
    gc_kwargs = {"use_reentrant": False}
    if engine == "xpu-llm":
        import xpu_llm
        from xpu_llm.finetune import add_lora, checkpoint_layers, fuse_layers

        xpu_llm.optimize_model(model, low_bit=args.low_bit, group_size=args.group_size)
        fuse_layers(model)
        if args.gradient_checkpointing:
            checkpoint_layers(model, int(args.uncheckpointed_layers))
        return add_lora(model, **lora)
    _bnb_quantize(model, device, dtype)
    if engine == "bnb":
        # What from_pretrained(quantization_config=BitsAndBytesConfig(...)) sets; without it PEFT's prepare step
        # skips gradient checkpointing (it checks this flag), and the row would run without recompute.
        model.is_loaded_in_4bit = True
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                     gradient_checkpointing_kwargs=gc_kwargs)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    cfg = peft.LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **lora)
    model = peft.get_peft_model(model, cfg)
    if engine == "bnb-bf16-nocast":
        from peft.tuners.tuners_utils import BaseTunerLayer
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.cast_input_dtype_enabled = False
    return model


def run_child(engine: str, shape: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from xpu_llm.device import (describe, device_module, get_device, is_cpu, max_memory_allocated,
                                memory_allocated, reset_peak_memory, synchronize)
    from xpu_llm.finetune.gc_steps import StepGC

    device = get_device(args.device)
    spec = SHAPES[shape]
    seq, batch = args.seq or spec["seq"], args.batch or spec["batch"]
    t0 = time.perf_counter()
    model = build(engine, shape, args, device)
    model.train()
    gc.collect()
    mod = device_module(device)
    if mod is not None:
        mod.empty_cache()
    synchronize(device)
    build_s = time.perf_counter() - t0
    weights = memory_allocated(device)
    reset_peak_memory(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, spec["config"]["vocab_size"], (batch, seq), device=device, generator=gen)

    from xpu_llm.finetune.loss import mean_loss

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not is_cpu(device)):
            # xpu-llm: the trainer's loss (output head fused into the cross-entropy); others: the HF model's
            loss = mean_loss(model, ids) if engine == "xpu-llm" else model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    with StepGC() as collector:  # as xpu_llm.finetune.train runs its steps, for every engine
        for i in range(args.warmup):
            step()
            collector.step(i + 1)
        synchronize(device)
        t1 = time.perf_counter()
        for i in range(args.steps):
            last = step()
            collector.step(args.warmup + i + 1)
        synchronize(device)
        dt = time.perf_counter() - t1
    peak = max_memory_allocated(device)
    extra = {"profile_ms": profile_step(step, device)} if args.profile else {}
    kept = {}
    if engine == "xpu-llm":
        from xpu_llm.finetune.loss import fused_enabled
        kept = {"uncheckpointed_layers": int(args.uncheckpointed_layers), "fused_loss": fused_enabled()}
    return {**extra, "engine": engine, **kept, "shape": shape, "seq": seq, "batch": batch, "steps": args.steps,
            "tokens_per_s": round(batch * seq * args.steps / dt, 1), "step_s": round(dt / args.steps, 4),
            "peak_gib": round(peak / GIB, 3), "weights_gib": round(weights / GIB, 3),
            "fits_16gib": peak <= A770_BYTES, "loss": round(last, 4), "finite": math.isfinite(last),
            "trainable": sum(p.numel() for p in params), "build_s": round(build_s, 1), "device": describe(device)}


# Kernel categories of --profile, first match wins (names of cuBLAS, PyTorch and Triton kernels)
CATEGORIES = (("gemm", r"gemm|cutlass|nvjet|xmma|splitK"),
              ("low-bit kernels", r"_dequant_kernel|_dot_kernel|_gemv_kernel"),
              ("attention", r"flash|fmha|sdpa|attention"), ("dropout", r"dropout|philox|bernoulli|masked_scale"),
              ("dtype casts and copies", r"copy|CatArray|Memcpy"), ("softmax / loss", r"softmax|nll"),
              ("reductions", r"reduce_kernel"), ("optimizer", r"multi_tensor"),
              ("other elementwise", r"elementwise"))


def profile_step(step, device) -> dict[str, float]:
    """Device kernel time of one more step by category (CATEGORIES; the rest is "other"), in ms: where a step's
    time goes. Empty on a CPU (no device kernels to attribute)."""
    from torch.profiler import ProfilerActivity, profile

    from xpu_llm.device import synchronize
    act = getattr(ProfilerActivity, device.type.upper(), None)
    if act is None or device.type == "cpu":
        return {}
    with profile(activities=[act]) as prof:
        step()
        synchronize(device)
    out: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name == "CPU":
            continue
        cat = next((c for c, rx in CATEGORIES if re.search(rx, e.name, re.I)), "other")
        out[cat] = out.get(cat, 0.0) + e.device_time_total / 1e3
    return {c: round(ms, 1) for c, ms in sorted(out.items(), key=lambda t: -t[1])}


# ---------------------------------------------------------------------------------------------- driver

def _child_cmd(engine: str, shape: str, args: argparse.Namespace, kept: int = 0) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", engine, "--shapes", shape,
           "--uncheckpointed-layers", str(kept),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--lora-r", str(args.lora_r),
           "--low-bit", args.low_bit, "--group-size", str(args.group_size)]
    for flag, v in (("--seq", args.seq), ("--batch", args.batch), ("--device", args.device)):
        if v:
            cmd += [flag, str(v)]
    if not args.gradient_checkpointing:
        cmd.append("--no-gradient-checkpointing")
    if args.profile:
        cmd.append("--profile")
    return cmd


def run_one(engine: str, shape: str, args: argparse.Namespace, kept: int = 0) -> dict[str, Any]:
    base = {"engine": engine, "shape": shape, **({"uncheckpointed_layers": kept} if engine == "xpu-llm" else {})}
    if engine.startswith("bnb"):
        import importlib.util
        if importlib.util.find_spec("bitsandbytes") is None:
            return {**base, "error": "bitsandbytes not installed"}
    return child_row(_child_cmd(engine, shape, args, kept), base, args.timeout)


def label(row: dict[str, Any]) -> str:
    """The engine, with the number of layers that keep their activations where there are any."""
    kept = row.get("uncheckpointed_layers", 0)
    name = row["engine"] + (", HF loss" if row.get("fused_loss") is False else "")
    return f"{name} ({kept} layers not recomputed)" if kept else name


def full_label(row: dict[str, Any]) -> str:
    """label, with the round where --rounds > 1."""
    return label(row) + (f", round {row['round']}" if "round" in row else "")


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| shape | engine | seq x batch | tokens/s | step s | peak GiB | weights GiB | fits 16 GiB | note |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['shape']} | {full_label(r)} | | | | | | | {r['error']} |")
            continue
        out.append(f"| {r['shape']} | {full_label(r)} | {r['seq']} x {r['batch']} | {r['tokens_per_s']:.0f} | "
                   f"{r['step_s']:.3f} | {r['peak_gib']:.2f} | {r['weights_gib']:.2f} | "
                   f"{'yes' if r['fits_16gib'] else 'no'} | loss {r['loss']} |")
    for r in rows:
        if r.get("profile_ms"):
            total = sum(r["profile_ms"].values())
            out.append(f"\n{full_label(r)}, one step's device kernel time: {total:.0f} ms "
                       f"({100 * total / (1000 * r['step_s']):.0f}% of the timed step; the rest the device waits "
                       "for the host); "
                       + ", ".join(f"{c} {ms:.0f} ({100 * ms / total:.0f}%)" for c, ms in r["profile_ms"].items()))
    return "\n".join(out)


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each xpu-llm row's tokens/s and peak memory over each bitsandbytes row's, per shape (and per round: rows
    of one round are compared with each other only)."""
    out = {}
    ok = [r for r in rows if "error" not in r]
    for ours in (r for r in ok if r["engine"] == "xpu-llm"):
        for other in (r for r in ok if r["engine"] != "xpu-llm" and r["shape"] == ours["shape"]
                      and r.get("round") == ours.get("round")):
            out[f"{ours['shape']}/{full_label(ours)}/{other['engine']}"] = {
                "speedup": round(ours["tokens_per_s"] / other["tokens_per_s"], 3),
                "memory_ratio": round(ours["peak_gib"] / other["peak_gib"], 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--shape", dest="shapes", help="alias of --shapes (e.g. --shape tiny for a CPU smoke run)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None, help="override the shape's sequence length")
    ap.add_argument("--batch", type=int, default=None, help="override the shape's batch")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--low-bit", default="nf4", help="xpu-llm base format")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--uncheckpointed-layers", default="0",
                    help="xpu-llm: comma list, one row each: the last N decoder layers keep their activations "
                         "(xpu_llm.finetune.checkpoint_layers)")
    ap.add_argument("--device", default=None, help="default: xpu > cuda > cpu")
    ap.add_argument("--profile", action="store_true", help="also profile one step: device kernel time by category")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every row this many times, in reverse order every other round (a machine whose host "
                         "slows down during the run then favours no row); each round's rows are compared within it")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per engine and shape")
    ap.add_argument("--out", default=None, help="JSON path (a .md table is written next to it)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        ap.error(f"unknown shape(s) {bad}; choose from {', '.join(SHAPES)}")
    if args.child:
        print("ROW " + json.dumps(run_child(args.child, shapes[0], args)), flush=True)
        return 0
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    kept = [int(v) for v in str(args.uncheckpointed_layers).split(",") if v.strip()]
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    plan = [(shape, engine, n) for shape in shapes for engine in engines
            for n in (kept if engine == "xpu-llm" else [0])]
    rows = []
    for i in range(args.rounds):
        for shape, engine, n in plan if i % 2 == 0 else plan[::-1]:
            row = run_one(engine, shape, args, n) | ({"round": i + 1} if args.rounds > 1 else {})
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    result = {"benchmark": "qlora", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(threads=0, peers=False), "settings": {k: v for k, v in vars(args).items()
                                                                             if k not in ("child", "out")},
              "rows": rows, "ratios": ratios(rows)}
    md = table(rows)
    print(md)
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=1) + "\n")
        write_atomic(os.path.splitext(args.out)[0] + ".md", md + "\n")
    return 0 if all("error" not in r or r["engine"].startswith("bnb") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
