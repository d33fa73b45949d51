# python benchmarks/kv_decode.py --out benchmarks/results/kv_decode_cpu.json      (from the repository root)
"""Decode speed with each KV cache kind (float, int8, fp8 e4m3) at a short and a long prompt, on the embedded
SmolLM2 (or --model), batch 1, greedy: how much a compressed cache costs or saves per step. On the CPU each row is
timed twice in one run, with the native decode step (xpu_llm/cpu_decode.py, which reads int8 / fp8 codes in
place) and with the plain PyTorch blocks (which dequantize the cache each step); on GPUs once, as `LLM` runs (the
Triton kernels; `XPU_LLM_FUSED_ATTENTION=0` for SDPA). Quick run:

    python benchmarks/kv_decode.py --prompts 64 --new-tokens 8 --repeats 1 --out /tmp/kv.json

Per row: prompt tokens, then --new-tokens greedy tokens, best of --repeats decode rates (tokens/s after the first
token), and the cache's bytes. Output: JSON (machine, settings, rows) and a markdown table next to it (.md)."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, sig, write_report  # noqa: E402


def decode_rate(llm, prompt: list[int], new: int, repeats: int, max_seq_len: int) -> float:
    from xpu_llm.generate import SamplingParams, generate_tokens
    llm.model.setup_caches(1, max_seq_len)
    params = SamplingParams(max_new_tokens=new, temperature=0.0)
    generate_tokens(llm.model, [prompt], SamplingParams(max_new_tokens=2, temperature=0.0), pad_id=0)  # warm-up
    return max(generate_tokens(llm.model, [prompt], params, pad_id=0)[1].decode_tokens_per_s for _ in range(repeats))


def markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    lines = [f"## Decode with each KV cache kind — {report['device']}", "",
             f"{m.get('cpu')}, torch {m['torch']}; xpu-llm {m.get('xpu_llm_commit')}"
             f"{' (uncommitted changes)' if m.get('xpu_llm_dirty') else ''}; {report['date']}. Model "
             f"{s['model'] or 'SmolLM2-135M-Instruct (embedded GGUF)'}, batch 1, {s['new_tokens']} new tokens, best "
             f"of {s['repeats']}, cache of {s['max_seq_len']} slots.", "",
             "| KV cache | prompt | cache MiB | tok/s | plain blocks tok/s | native / plain |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        plain = r.get("plain_tok_s")
        ratio = f"{r['tok_s'] / plain:.2f}x" if plain else "—"
        lines.append(f"| {r['kv']} | {r['prompt']} | {r['cache_mib']} | {r['tok_s']} | {plain or '—'} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    from xpu_llm import LLM
    from xpu_llm.device import describe, is_cpu
    from xpu_llm.model import TransformerBlock
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--kinds", default="auto,int8,fp8", help="KV cache kinds, comma list (auto: uncompressed)")
    ap.add_argument("--prompts", default="64,1024", help="prompt lengths, comma list")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", required=True, help="JSON path (a .md table is written next to it)")
    args = ap.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    rows = []
    for kind in args.kinds.split(","):
        llm = LLM(args.model, device=args.device, kv_cache_dtype=kind, max_seq_len=args.max_seq_len)
        device = llm.device
        for p in (int(x) for x in args.prompts.split(",")):
            prompt = torch.randint(100, 20000, (p,), generator=torch.Generator().manual_seed(p)).tolist()
            row = {"kv": kind if kind != "auto" else str(llm.dtype).removeprefix("torch."), "prompt": p,
                   "tok_s": sig(decode_rate(llm, prompt, args.new_tokens, args.repeats, args.max_seq_len))}
            row["cache_mib"] = sig(sum(b.numel() * b.element_size() for layer in llm.model.layers
                                       for b in layer.attention.kv_cache.buffers()) / 2 ** 20)
            if is_cpu(device):
                fast = [layer.__class__ for layer in llm.model.layers]
                for layer in llm.model.layers:
                    layer.__class__ = TransformerBlock  # the plain blocks: same modules and weights
                row["plain_tok_s"] = sig(decode_rate(llm, prompt, args.new_tokens, args.repeats, args.max_seq_len))
                for layer, cls in zip(llm.model.layers, fast):
                    layer.__class__ = cls
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    report = {"benchmark": "kv_decode", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(threads=torch.get_num_threads(), peers=False), "device": describe(device),
              "settings": settings, "rows": rows}
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
