# python benchmarks/speculative_layers.py --out benchmarks/results/speculative_layers_cpu.json   (repository root)
"""How the layer_skip draft's default layer subset was chosen: for each candidate subset, on the 20 prompts of
benchmarks/speculative.py (chat template, 64 greedy tokens each),

- agreement: how often the draft's first proposal of a round equals the target's greedy token, at every
  generated position. Measured exactly as the draft runs (drafts.LayerSkipDraft): the kept layers attend to the
  target's own keys/values for all earlier slots and to their own key/value at the current slot; all positions
  are evaluated in one pass per prompt.
- cost: one draft step (1 position, kept layers, norm + head) over one target step, timed on this machine;
  verification cost over k + 1 positions, over one target step.
- projected speedup at the best k with i.i.d. acceptance a: (1 - a^(k+1)) / (1 - a) tokens per round over
  (verify(k+1) + k · cost) target steps. Later drafts of a round see draft keys/values, so the real acceptance
  is lower: benchmarks/speculative.py --layers ... measures the real thing for the finalists.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_atomic  # noqa: E402
from speculative import PROMPTS  # noqa: E402

CANDIDATES = {
    "first half": lambda n: range(n // 2),
    "first 2/3": lambda n: range(2 * n // 3),
    "drop last 1/4": lambda n: range(n - n // 4),
    "every 2nd": lambda n: range(0, n, 2),
    "every 2nd + last": lambda n: sorted(set(range(0, n, 2)) | {n - 1}),
    "drop middle third": lambda n: [i for i in range(n) if not n // 3 <= i < 2 * n // 3],
    "drop middle half": lambda n: [i for i in range(n) if not n // 4 <= i < 3 * n // 4],
    "drop every 3rd": lambda n: [i for i in range(n) if i % 3 != 1],
    "drop every 4th": lambda n: [i for i in range(n) if i % 4 != 2],
    "drop every 5th": lambda n: [i for i in range(n) if i % 5 != 2],
    "drop every 6th": lambda n: [i for i in range(n) if i % 6 != 3],
    "drop every 3rd of middle 2/3": lambda n: [i for i in range(n) if not (n // 6 <= i < 5 * n // 6 and i % 3 == 1)],
    "drop odd of middle half": lambda n: [i for i in range(n) if not (n // 4 <= i < 3 * n // 4 and i % 2)],
    "drop odd of middle 2/3": lambda n: [i for i in range(n) if not (n // 6 <= i < 5 * n // 6 and i % 2)],
    "drop 2 of 3 of middle half": lambda n: [i for i in range(n) if not (n // 4 <= i < 3 * n // 4 and i % 3)],
}


def draft_block(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One kept layer at every position at once, as a draft step sees it: queries attend to the target's cached
    keys/values at earlier slots (strictly causal) and to their own fresh key/value at their own slot."""
    from xpu_llm.model import apply_rope
    attn = layer.attention
    b, t, _ = x.shape
    hd, nh, nkv = attn.head_dim, attn.n_heads, attn.n_kv_heads
    q, k, v = attn.wqkv(layer.attention_norm(x)).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    q = apply_rope(q.view(b, t, nh, hd).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(b, t, nkv, hd).transpose(1, 2), cos, sin)
    v = v.view(b, t, nkv, hd).transpose(1, 2)
    rep = nh // nkv
    kt = attn.kv_cache.k_cache[:b, :, :t].repeat_interleave(rep, 1)
    vt = attn.kv_cache.v_cache[:b, :, :t].repeat_interleave(rep, 1)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ kt.transpose(-1, -2) / math.sqrt(hd)  # [b, h, t, t]
    eye = torch.eye(t, dtype=torch.bool)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(-1), float("-inf"))
    scores = torch.where(eye, ((q * k).sum(-1) / math.sqrt(hd)).unsqueeze(-1).expand_as(scores), scores)
    a = scores.softmax(-1)
    y = a.masked_fill(eye, 0) @ vt + a.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * v
    h = x + attn.wo(y.transpose(1, 2).reshape(b, t, nh * hd))
    return h + layer.feed_forward(layer.ffn_norm(h))


@torch.inference_mode()
def agreement(model, seq: list[int], start: int, subsets: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    """(agreeing, positions) per subset over the generated positions start..len(seq)-2 of one sequence."""
    t = len(seq)
    ids = torch.tensor([seq])
    target = model(ids, torch.arange(t), kv_len=t).argmax(-1)[0]  # fills every layer's cache with target K/V
    cos, sin = model.rope_cos[:t].view(1, 1, t, -1), model.rope_sin[:t].view(1, 1, t, -1)
    out = {}
    for name, layers in subsets.items():
        x = model.tok_embeddings(ids)
        for i in layers:
            x = draft_block(model.layers[i], x, cos, sin)
        draft = model.output(model.norm(x)).argmax(-1)[0]
        sl = slice(start, t - 1)
        out[name] = (int((draft[sl] == target[sl]).sum()), t - 1 - start)
    return out


def step_ms(model, layers, reps: int, tokens: int = 1, ctx: int = 96) -> float:
    ids, slots = torch.randint(0, 1000, (1, tokens)), torch.arange(ctx, ctx + tokens)
    ts = []
    with torch.inference_mode():
        for i in range(reps + 2):
            t0 = time.perf_counter()
            model(ids, slots, kv_len=ctx + tokens, last_only=tokens == 1, layers=layers)
            if i >= 2:
                ts.append(time.perf_counter() - t0)
    return 1000 * sorted(ts)[len(ts) // 2]


def projected(a: float, cost: float, verify: dict[int, float]) -> tuple[float, int]:
    """Best projected speedup over k and its k."""
    best = (0.0, 0)
    for k, v in verify.items():
        tokens = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
        best = max(best, (tokens / (v + k * cost), k))
    return round(best[0], 3), best[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="layer_skip subset selection")
    ap.add_argument("--model", default=None)
    ap.add_argument("--low-bit", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "speculative_layers_cpu.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from xpu_llm import LLM
    from xpu_llm.drafts import default_skip_layers
    low_bit = None if args.low_bit.lower() in ("none", "dense") else args.low_bit
    llm = LLM(args.model, low_bit=low_bit, dtype=args.dtype, device="cpu", max_seq_len=512)
    n = len(llm.model.layers)
    subsets = {"all layers (= target)": list(range(n)), "default": list(default_skip_layers(n)),
               **{name: list(fn(n)) for name, fn in CANDIDATES.items()}}
    counts = {name: [0, 0] for name in subsets}
    for p in PROMPTS[:args.prompts]:
        prompt = llm.encode(p, chat=True)
        gen = llm.generate(p, max_new_tokens=args.new_tokens, chat=True, ignore_eos=True)[0].token_ids
        for name, (a, m) in agreement(llm.model, prompt + gen, len(prompt), subsets).items():
            counts[name][0] += a
            counts[name][1] += m
    full = step_ms(llm.model, None, args.reps)
    verify = {k: step_ms(llm.model, None, args.reps, tokens=k + 1) / full for k in range(1, 9)}
    rows = []
    for name, layers in subsets.items():
        cost = step_ms(llm.model, layers, args.reps) / full
        a = counts[name][0] / counts[name][1]
        sp, k = projected(a, cost, verify)
        rows.append({"subset": name, "layers": layers, "kept": len(layers), "agreement": round(a, 4),
                     "cost": round(cost, 3), "projected_speedup": sp, "best_k": k})
    report = {"model": os.path.basename(llm.source.path), "target": llm.low_bit or "dense",
              "dtype": str(llm.dtype).split(".")[-1], "n_layers": n, "target_step_ms": round(full, 2),
              "verify_cost": {k: round(v, 3) for k, v in verify.items()}, "rows": rows,
              "machine": machine_info(torch.get_num_threads(), peers=False),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "settings": vars(args)}
    write_atomic(args.out, json.dumps(report, indent=1) + "\n")
    lines = [f"## layer_skip subsets — {report['model']}, target {report['target']}, {n} layers; target step "
             f"{report['target_step_ms']} ms; verify(k+1)/step: "
             + ", ".join(f"k={k}: {v}" for k, v in report["verify_cost"].items()), "",
             "| subset | kept | first-draft agreement | draft step / target step | projected speedup | best k |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['subset']} | {r['kept']} | {r['agreement']} | {r['cost']} | {r['projected_speedup']} | "
              f"{r['best_k']} |" for r in sorted(rows, key=lambda r: -r["projected_speedup"])]
    md = "\n".join(lines) + "\n"
    write_atomic(os.path.splitext(args.out)[0] + ".md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
