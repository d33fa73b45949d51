"""One rank of a multi-card test (started by parallel_ranks.run_ranks): runs the jobs of a spec with
xpu_llm.LLM(..., tp=, pp=) and saves what it computed to OUT_DIR/rank{R}.pt.

    python parallel_worker.py SPEC.json OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    """Restart VmHWM at the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def padded(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (t - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def inject_failure(llm, after_calls: int, how: str) -> None:
    """Make this rank's first local layer fail on its `after_calls`-th call (mid-generation): raise, or end the
    process on the spot without a word ("dies")."""
    layer = llm.model.layers[0]
    calls = [0]
    original = layer.forward

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= after_calls:
            if how == "dies":
                os._exit(17)
            raise RuntimeError(f"injected failure on rank {llm.parallel.rank}")
        return original(*args, **kwargs)

    layer.forward = failing


def run_job(job: dict) -> dict:
    from xpu_llm import LLM
    low_bit = job.get("low_bit")
    if job.get("apply_tp"):  # a whole model on every rank, sharded afterwards by xpu_llm.parallel.apply_tp
        from xpu_llm.parallel import apply_tp, init_distributed
        init_distributed("cpu")
        llm = LLM(job["model"], low_bit=low_bit, group_size=job.get("group_size", 32), dtype=torch.float32,
                  device="cpu", max_seq_len=job.get("max_seq_len", 64), progress=False)
        apply_tp(llm.model)
        out = {"info": {"tp": llm.model.tp_layout.tp, "pp": 1}}
    else:
        llm = LLM(job["model"], low_bit=low_bit, group_size=job.get("group_size", 32), dtype=torch.float32,
                  device="cpu", max_seq_len=job.get("max_seq_len", 64), tp=job["tp"], pp=job["pp"], progress=False)
        if job.get("fail_rank") == llm.parallel.rank:
            inject_failure(llm, job.get("fail_after", 3), job.get("fail_how", "raises"))
        out = {"info": {"tp": llm.parallel.grid.tp, "pp": llm.parallel.grid.pp,
                        "stage_layers": llm.parallel.info["stage_layers"]}}
    for b in job.get("batches", [1, 3]):
        ids, mask = padded(job["prompts"][:b])
        t0 = time.perf_counter()
        out[f"logits{b}"] = llm.logits(ids, attention_mask=mask)
        t1 = time.perf_counter()
        out[f"greedy{b}"] = llm.generate_ids(ids, max_new_tokens=job.get("new_tokens", 32), attention_mask=mask,
                                             ignore_eos=True)
        print(f"  batch {b}: logits {t1 - t0:.2f} s, greedy {time.perf_counter() - t1:.2f} s", flush=True)
    if job.get("sample"):
        ids, mask = padded(job["prompts"][:3])
        out["sampled"] = llm.generate_ids(ids, max_new_tokens=8, attention_mask=mask, ignore_eos=True,
                                          temperature=0.8, top_k=20)
    return out


def load_memory(job: dict) -> dict:
    """Peak resident memory while loading (VmHWM after restarting it just before the load), in KiB."""
    from xpu_llm.loading import load_model, resolve_source
    from xpu_llm.parallel.dist import init_distributed
    from xpu_llm.parallel.engine import load_parallel
    init_distributed("cpu")
    source = resolve_source(job["model"])
    reset_peak()
    before = vm_kib("VmRSS")
    if job["tp"] * job["pp"] == 1:
        model, _ = load_model(source, job.get("low_bit"), 64, torch.float32, torch.device("cpu"), progress=False)
    else:
        model = load_parallel(source, job.get("low_bit"), 64, torch.float32, "cpu", job["tp"], job["pp"], 64,
                              progress=False)
    peak = vm_kib("VmHWM") - before
    del model
    return {"peak_kib": peak}


def main() -> None:
    spec_path, out_dir = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    results = {}
    for job in spec["jobs"]:
        t0 = time.perf_counter()
        results[job["name"]] = load_memory(job) if job.get("memory") else run_job(job)
        print(f"job {job['name']}: {time.perf_counter() - t0:.1f} s", flush=True)
    from xpu_llm.parallel.dist import detect_launch
    torch.save(results, os.path.join(out_dir, f"rank{detect_launch().rank}.pt"))


if __name__ == "__main__":
    main()
