# python benchmarks/decode.py --out benchmarks/results/decode_cpu.json   (from the repository root)
"""Decode speed at batch 1 on one GGUF model (default: the embedded SmolLM2-135M-Instruct Q4_1), side by side:
xpu-llm in each weight format, Hugging Face transformers (float32 and bfloat16) and llama.cpp on the same file.

Every engine gets the same prompt token ids (P tokens of a fixed English paragraph, tokenized by the model's
tokenizer) and decodes N new tokens greedily, never stopping at EOS. Each engine/format runs in its own child
process (so RSS is that engine's alone and a crash costs one row): load, one warm-up generation, then R timed
generations; the row keeps the fastest.

How decode speed is measured (the same definition for every engine): the first new token comes out of the
prefill, so a run of N new tokens holds N-1 decode steps, and

    decode tokens/s = (N - 1) / (time the last new token is ready - time the first new token is ready)

- xpu-llm: the engine's own GenerationStats (perf_counter after prefill + first sample, device synchronised,
  until the loop ends); prefill = prompt forward + first sample.
- transformers: a LogitsProcessor stamps perf_counter each time `generate` hands it the scores, i.e. right after
  each forward; the first stamp follows the prefill, so N stamps hold N-1 decode iterations of HF's loop
  (forward, argmax, bookkeeping). Prefill = first stamp - call start (includes generate's setup). Torch eager
  mode (no torch.compile), HF's default attention (recorded in the row).
- llama.cpp (llama-cpp-python): wall clock between the first and the last token yielded by `Llama.generate`
  (temperature 0, top_k 1), Python sampling loop included, like the two above. llama.cpp's own counters
  (llama_perf_context: t_eval_ms / n_eval, t_p_eval_ms) are kept in the row as `internal_*` for reference.

Outputs: JSON (machine, settings, rows, ratios) at --out and a markdown table next to it (.md), also printed.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any

from common import hf_generate_timed, machine_info, model_groups, rss_mib, write_atomic

DEFAULT_FORMATS = "auto,sym_int4,asym_int4,nf4,fp4,sym_int8,fp8_e4m3,fp8_e5m2,bf16,fp32"
HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
    "quickly and cheaply. Within fifty years, presses were running in more than two hundred cities across "
    "Europe, and the number of books in circulation grew from thousands to millions. Scholars could now "
    "compare identical copies of a text, merchants printed price lists and maps, and pamphlets carried news "
    "and arguments to readers who had never owned a book before. ")


def prompt_ids(model: str, n: int) -> list[int]:
    """The first n token ids of the fixed paragraph (repeated as needed), by the model's tokenizer."""
    from xpu_llm.tokenizer import load_tokenizer
    tok = load_tokenizer(model)
    text = PROMPT_TEXT
    while True:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            return list(ids[:n])
        text += PROMPT_TEXT


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Fastest run's decode figures; prefill is the fastest prefill over all runs."""
    best = max(runs, key=lambda r: r["decode_tokens_per_s"])
    out = dict(best)
    out["prefill_ms"] = round(min(r["prefill_ms"] for r in runs), 2)
    out["runs_tokens_per_s"] = [round(r["decode_tokens_per_s"], 2) for r in runs]
    return out


def speed(n_new: int, decode_s: float, prefill_s: float, tokens: list[int]) -> dict[str, Any]:
    tps = (n_new - 1) / decode_s if decode_s > 0 and n_new > 1 else 0.0
    return {"decode_tokens_per_s": tps, "ms_per_token": 1000 / tps if tps else None,
            "prefill_ms": 1000 * prefill_s, "tokens": tokens}


# ------------------------------------------------------------------------------------------------ workers
def work_xpu(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from xpu_llm import LLM
    from xpu_llm.bench import weight_bytes
    fmt, ids, n = job["format"], job["ids"], job["new_tokens"]
    low_bit = None if fmt in ("dense", "none") else fmt
    t0 = time.perf_counter()
    llm = LLM(job["model"], low_bit=low_bit, group_size=job["group_size"], dtype=job["dtype"],
              max_seq_len=len(ids) + n + 8, progress=False)
    load_s = time.perf_counter() - t0
    # Stored size, taken before the first forward: the CPU kernels repack weights into their own state then,
    # which the module's buffers no longer show (RSS does).
    weights = weight_bytes(llm.model)

    def once(new: int) -> dict[str, Any]:
        # Same path as xpu_llm.bench.bench_llm: the engine's own timed loop (GenerationStats).
        params = llm._params(new, 0.0, None, None, None, None, ignore_eos=True)
        out, stats = llm._run([list(ids)], params)
        return speed(stats.new_tokens, stats.decode_s, stats.prefill_s, out[0])

    once(min(n, 16))  # warm-up: KV cache, kernels, allocator
    row = best_of([once(n) for _ in range(job["repeats"])])
    row.update(format=fmt, low_bit=llm.low_bit or "dense", group_size=model_groups(llm.model),
               dtype=str(llm.dtype).removeprefix("torch."), load_s=round(load_s, 2),
               weights_mib=round(weights / 2**20, 1))
    del llm
    gc.collect()
    assert torch.get_num_threads() == job["threads"]
    return row


def work_hf(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job["format"]]
    ids, n = job["ids"], job["new_tokens"]
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(job["model"]), gguf_file=os.path.basename(job["model"]), dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids])
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else model.config.eos_token_id

    def once(new: int) -> dict[str, Any]:
        out, t, stamps = hf_generate_timed(model, x, new, pad)  # a stamp right after each forward
        return speed(len(stamps), stamps[-1] - stamps[0], stamps[0] - t, out[0, len(ids):].tolist())

    once(min(n, 16))
    row = best_of([once(n) for _ in range(job["repeats"])])
    weights = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    row.update(format=job["format"], low_bit="dense", group_size=None, dtype=job["format"], load_s=round(load_s, 2),
               weights_mib=round(weights / 2**20, 1), attn=model.config._attn_implementation)
    return row


def work_llama(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    ids, n = job["ids"], job["new_tokens"]
    t0 = time.perf_counter()
    llama = llama_cpp.Llama(model_path=job["model"], n_ctx=max(512, len(ids) + n + 8), n_threads=job["threads"],
                            n_threads_batch=job["threads"], verbose=False)
    load_s = time.perf_counter() - t0

    def once(new: int) -> dict[str, Any]:
        llama.reset()  # no prompt-prefix reuse between runs: every run evaluates the whole prompt
        llama_cpp.llama_perf_context_reset(llama._ctx.ctx)
        toks, stamps = [], []
        t = time.perf_counter()
        for tok in llama.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            toks.append(int(tok))
            if len(toks) >= new:
                break
        perf = llama_cpp.llama_perf_context(llama._ctx.ctx)
        row = speed(len(toks), stamps[-1] - stamps[0], stamps[0] - t, toks)
        row["internal_decode_tokens_per_s"] = round(1000 * perf.n_eval / perf.t_eval_ms, 2) if perf.t_eval_ms else None
        row["internal_prefill_ms"] = round(perf.t_p_eval_ms, 2)
        return row

    once(min(n, 16))
    row = best_of([once(n) for _ in range(job["repeats"])])
    row.update(format="gguf (native)", low_bit="Q4_1" if "Q4_1" in job["model"] else "gguf", group_size=32,
               dtype="ggml", load_s=round(load_s, 2), weights_mib=round(os.path.getsize(job["model"]) / 2**20, 1),
               llama_cpp=llama_cpp.__version__)
    return row


WORKERS = {"xpu-llm": work_xpu, "transformers": work_hf, "llama.cpp": work_llama}


def worker_main(job: dict[str, Any]) -> None:
    import torch
    torch.set_num_threads(job["threads"])
    row = WORKERS[job["engine"]](job)
    cur, peak = rss_mib()
    row.update(engine=job["engine"], rss_mib=cur, peak_rss_mib=peak, new_tokens=job["new_tokens"],
               prompt_tokens=len(job["ids"]))
    for k in ("decode_tokens_per_s", "ms_per_token"):
        row[k] = round(row[k], 2) if row[k] is not None else None
    print("RESULT " + json.dumps(row), flush=True)


def run_job(job: dict[str, Any], timeout: int) -> dict[str, Any]:
    """Run one engine/format in a child process; a failure becomes a row with an error."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(job["threads"])}
    label = f"{job['engine']} {job['format']}"
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_job", json.dumps(job)], env=env,
                           capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode == 0 and lines:
            row = json.loads(lines[-1][len("RESULT "):])
        else:
            tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
            row = {"engine": job["engine"], "format": job["format"], "error": f"exit {p.returncode}: {tail}"}
    except subprocess.TimeoutExpired:
        row = {"engine": job["engine"], "format": job["format"], "error": f"timed out after {timeout} s"}
    print(f"  {label}: " + (f"{row['decode_tokens_per_s']} tok/s" if "error" not in row else row["error"])
          + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return row


# ------------------------------------------------------------------------------------------------ report
def ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    def tps(engine: str, fmt: str) -> float | None:
        for r in rows:
            if r.get("engine") == engine and r.get("format") == fmt and r.get("decode_tokens_per_s"):
                return r["decode_tokens_per_s"]
        return None

    auto = tps("xpu-llm", "auto")
    out: dict[str, float | None] = {}
    for key, ref in (("auto_over_hf_float32", tps("transformers", "float32")),
                     ("auto_over_hf_bfloat16", tps("transformers", "bfloat16")),
                     ("auto_over_llama_cpp", tps("llama.cpp", "gguf (native)"))):
        out[key] = round(auto / ref, 3) if auto and ref else None
    return out


def agreement(rows: list[dict[str, Any]]) -> None:
    """Per row: how many leading generated tokens equal the reference's (HF float32, else xpu-llm fp32)."""
    ref = next((r["tokens"] for r in rows if r.get("engine") == "transformers" and r.get("format") == "float32"
                and r.get("tokens")), None)
    ref = ref or next((r["tokens"] for r in rows if r.get("engine") == "xpu-llm" and r.get("low_bit") == "dense"
                       and r.get("dtype") == "float32" and r.get("tokens")), None)
    for r in rows:
        if ref and r.get("tokens"):
            k = 0
            while k < min(len(ref), len(r["tokens"])) and ref[k] == r["tokens"][k]:
                k += 1
            r["same_tokens_as_ref"] = k


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    names = {"torch": "torch", "transformers": "transformers", "llama_cpp": "llama-cpp-python"}
    versions = ", ".join(f"{name} {m[k]}" for k, name in names.items() if m.get(k))
    lines = [f"## Decode speed, batch 1 — {os.path.basename(s['model'])}", "",
             f"{m['cpu']}, {m['cores']} cores, {s['threads']} threads; {versions}; xpu-llm "
             f"{m.get('xpu_llm_commit')}{' (uncommitted changes)' if m.get('xpu_llm_dirty') else ''}; "
             f"{report['date']}", "",
             f"Prompt {s['prompt_len']} tokens, {s['new_tokens']} new tokens (greedy, EOS ignored), best of "
             f"{s['repeats']} after a warm-up. tok/s = (N-1) / (last token - first token); prefill = prompt "
             f"forward + first token. `agree` = leading tokens equal to the reference (HF float32).", "",
             "| engine | format | group | dtype | decode tok/s | ms/tok | prefill ms | weights MiB | RSS MiB "
             "| load s | agree |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['format']} | | | error: {r['error'][:80]} | | | | | | |")
            continue
        fmt = r["format"] if r["format"] != "auto" else f"auto ({r['low_bit']}, GGUF-native)"
        vals = [r["engine"], fmt, r.get("group_size") or "—", r["dtype"], r["decode_tokens_per_s"],
                r["ms_per_token"], r["prefill_ms"], r["weights_mib"], r["rss_mib"], r["load_s"],
                r.get("same_tokens_as_ref", "—")]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    for r in report["rows"]:
        if r.get("internal_decode_tokens_per_s"):
            lines.append(f"\nllama.cpp's own counters: {r['internal_decode_tokens_per_s']} tok/s decode "
                         f"(llama_decode only), prompt eval {r['internal_prefill_ms']} ms.")
    rt = report["ratios"]
    lines += ["", "| ratio (decode tok/s) | value |", "|---|---:|",
              f"| xpu-llm auto ÷ HF float32 | {rt['auto_over_hf_float32'] or '—'} |",
              f"| xpu-llm auto ÷ HF bfloat16 | {rt['auto_over_hf_bfloat16'] or '—'} |",
              f"| xpu-llm auto ÷ llama.cpp | {rt['auto_over_llama_cpp'] or '—'} |"]
    for note in report.get("notes", []):
        lines.append(f"\n_{note}_")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2 Q4_1)")
    ap.add_argument("--formats", default=DEFAULT_FORMATS,
                    help="xpu-llm formats, comma-separated (auto = the file's own; dense/none = dense, dtype auto)")
    ap.add_argument("--group-size", type=int, default=64, help="group of re-quantized formats (auto keeps 32)")
    ap.add_argument("--dtype", default="auto", help="xpu-llm compute dtype: auto, float32, bfloat16")
    ap.add_argument("--hf-dtypes", default="float32,bfloat16", help="transformers rows (empty: none)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    ap.add_argument("--no-peers", action="store_true", help="skip transformers and llama.cpp")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per engine/format child process")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "decode_cpu.json"))
    ap.add_argument("--_job", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._job:
        worker_main(json.loads(args._job))
        return 0
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (one prefill token + decode steps)")

    import torch
    from xpu_llm.default_model import default_model_path
    model = os.path.abspath(args.model or default_model_path())
    threads = args.threads or torch.get_num_threads()
    ids = prompt_ids(model, args.prompt_len)
    base = {"model": model, "ids": ids, "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": threads}
    jobs = [{**base, "engine": "xpu-llm", "format": f.strip(), "group_size": args.group_size, "dtype": args.dtype}
            for f in args.formats.split(",") if f.strip()]
    notes: list[str] = []
    if not args.no_peers:
        jobs += [{**base, "engine": "transformers", "format": d.strip()} for d in args.hf_dtypes.split(",")
                 if d.strip()]
        try:
            import llama_cpp  # noqa: F401
            jobs.append({**base, "engine": "llama.cpp", "format": "gguf (native)"})
        except Exception as e:  # noqa: BLE001
            notes.append(f"llama.cpp skipped: llama_cpp is not importable ({type(e).__name__}: {e})")
    else:
        notes.append("transformers and llama.cpp skipped (--no-peers)")

    report: dict[str, Any] = {
        "benchmark": "decode", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(threads, peers=not args.no_peers),
        "settings": {"model": model, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "threads": threads, "group_size": args.group_size,
                     "dtype": args.dtype, "batch": 1, "prompt_ids": ids},
        "rows": [], "ratios": {}, "notes": notes}
    print(f"decode benchmark: {len(jobs)} rows, {threads} threads", file=sys.stderr, flush=True)
    for job in jobs:
        report["rows"].append(run_job(job, args.timeout))
        agreement(report["rows"])
        report["ratios"] = ratios(report["rows"])
        write_atomic(args.out, json.dumps(report, indent=1) + "\n")  # partial results survive a kill
    md = markdown(report)
    write_atomic(os.path.splitext(args.out)[0] + ".md", md)
    print(md)
    return 1 if any("error" in r for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
