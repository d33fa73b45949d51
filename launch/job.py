"""Entry point for `ray job submit`: multi-card generation, a decode benchmark, and fine-tuning on a Ray cluster.

    ray job submit -- python -m xpu_llm.launch.job generate --model M --tp 2 --pp 2 --prompt "Hello"
    ray job submit -- python -m xpu_llm.launch.job bench --model M --tp 2 --batch 1,16 --out bench.json
    ray job submit -- python -m xpu_llm.launch.job finetune --workers 2 -- --model M --data train.jsonl --output out/

Inside a job RAY_ADDRESS names the cluster; run directly (`python -m xpu_llm.launch.job ...`) it starts a local
Ray, or joins the one given with --address."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from ..cli import _kv_args, _low_bit, _model_args, _sampling, _sampling_args
from ..errors import XpuLLMError


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray this job starts")
    p.add_argument("--use-gpu", default=None, action=argparse.BooleanOptionalAction,
                   help="one GPU per rank (default: when the cluster has GPUs)")


def _engine_args(p: argparse.ArgumentParser) -> None:
    _model_args(p, positional=False)
    _kv_args(p)
    _ray_args(p)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (within a node)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (may span nodes)")
    p.add_argument("--cpus-per-rank", type=float, default=1.0, help="CPUs each rank reserves")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m xpu_llm.launch.job", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="count", default=0)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete one prompt on tp x pp ranks, streaming the text")
    g.add_argument("--prompt", "-p", required=True)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    _engine_args(g)
    _sampling_args(g)
    b = sub.add_parser("bench", help="decode tokens/s at the given batch sizes on tp x pp ranks")
    _engine_args(b)
    b.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    b.add_argument("--prompt-len", type=int, default=32, help="prompt words (about as many tokens)")
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--out", default=None, help="write the results as JSON (and a .md table) here")
    f = sub.add_parser("finetune", help="QLoRA fine-tuning on Ray Train workers; training arguments after --")
    f.add_argument("--workers", type=int, required=True, help="training processes (one card each on GPUs)")
    f.add_argument("--cpus-per-worker", type=float, default=1.0)
    _ray_args(f)
    f.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of `xpu-llm finetune`")
    return ap


def _rayllm(args: Any):
    from .ray_llm import RayLLM
    return RayLLM(args.model, tp=args.tp, pp=args.pp, low_bit=_low_bit(args.low_bit), address=args.address,
                  use_gpu=args.use_gpu, cpus_per_rank=args.cpus_per_rank, group_size=args.group_size,
                  device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                  kv_cache_dtype=args.kv_cache_dtype, compile=args.compile,
                  ray_init={"num_cpus": args.num_cpus} if args.num_cpus else None)


def cmd_generate(args: Any) -> int:
    llm = _rayllm(args)
    try:
        chat = not args.raw and llm.info["chat_template"]
        for piece in llm.stream(args.prompt, chat=chat, **_sampling(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        llm.shutdown()
    return 0


def cmd_bench(args: Any) -> int:
    """Greedy decode of `new_tokens` tokens after a `prompt_len`-token prompt, per batch size, after a warm-up."""
    llm = _rayllm(args)
    rows = []
    try:
        for b in [int(x) for x in args.batch.split(",") if x]:
            prompts = [" ".join(["hello"] * args.prompt_len)] * b
            llm.generate(prompts, max_new_tokens=4, ignore_eos=True)  # warm-up (graphs, caches)
            t0 = time.perf_counter()
            res = llm.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True)
            wall = time.perf_counter() - t0
            st = res[0].stats
            rows.append({"batch": b, "decode_tokens_per_s": st.get("decode_tokens_per_s"),
                         "prefill_s": st.get("prefill_s"), "end_to_end_tokens_per_s": b * args.new_tokens / wall})
    finally:
        llm.shutdown()
    report = {"tp": args.tp, "pp": args.pp, "model": args.model, "low_bit": args.low_bit, "rows": rows}
    table = ["| batch | decode tok/s | end-to-end tok/s |", "|---|---|---|"]
    table += [f"| {r['batch']} | {r['decode_tokens_per_s']:.1f} | {r['end_to_end_tokens_per_s']:.1f} |" for r in rows]
    print("\n".join(table))
    if args.out:
        _write_atomic(args.out, json.dumps(report, indent=1) + "\n")
        _write_atomic(os.path.splitext(args.out)[0] + ".md", "\n".join(table) + "\n")
    return 0


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def cmd_finetune(args: Any) -> int:
    from .train import run_finetune
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    return run_finetune(train_args, workers=args.workers, use_gpu=args.use_gpu, address=args.address,
                        num_cpus_per_worker=args.cpus_per_worker)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"generate": cmd_generate, "bench": cmd_bench, "finetune": cmd_finetune}[args.command](args)
    except XpuLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
