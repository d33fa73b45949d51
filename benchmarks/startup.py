# python benchmarks/startup.py --runs 3 --out benchmarks/results/startup_cpu.json
"""Time from launching `xpu-llm generate` to its first printed character, cold (xpu-llm's caches empty and,
when run as root on Linux, the OS page cache dropped) and warm (everything cached), plus peak RSS."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def first_output(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Seconds to the first stdout byte and to exit; peak RSS of the child (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return {"first_token_s": round(t_first, 2), "total_s": round(time.perf_counter() - t0, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "text": (first + rest).decode(errors="replace").strip(),
            "exit": os.waitstatus_to_exitcode(status)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--low-bit", default="sym_int4")
    ap.add_argument("--out", default="benchmarks/results/startup_cpu.json")
    args = ap.parse_args()
    exe = shutil.which("xpu-llm") or sys.executable
    base = [exe] if exe.endswith("xpu-llm") else [exe, "-m", "xpu_llm.cli"]
    cmd = base + ["generate", args.prompt, "-n", "16", "--low-bit", args.low_bit]
    rows = []
    for run in range(args.runs):
        cache = tempfile.mkdtemp(prefix="xpu-llm-cold-")
        env = {**os.environ, "XPU_LLM_CACHE": cache}
        dropped = drop_page_cache()
        cold = first_output(cmd, env)
        warm = first_output(cmd, env)
        shutil.rmtree(cache, ignore_errors=True)
        rows.append({"run": run, "page_cache_dropped": dropped, "cold": cold, "warm": warm})
        print(f"run {run}: cold first token {cold['first_token_s']} s, warm {warm['first_token_s']} s, "
              f"peak RSS {cold['peak_rss_mib']} / {warm['peak_rss_mib']} MiB: {warm['text'][:60]!r}")
    summary = {"command": " ".join(["xpu-llm"] + cmd[len(base):]), "runs": rows,
               "cold_first_token_s_max": max(r["cold"]["first_token_s"] for r in rows),
               "warm_first_token_s_max": max(r["warm"]["first_token_s"] for r in rows)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))


if __name__ == "__main__":
    main()
