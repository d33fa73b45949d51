# (helpers imported by the benchmark scripts; not run on its own)
"""Shared by the benchmark scripts: atomic writes, machine facts, memory, the group sizes a model really uses,
one row per child process, transformers generation timed per step."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (a tiny shape's rates do not round to 0, a large one's keep no
    spurious decimals)."""
    return float(f"{x:.{digits}g}")


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder + os.replace (never a half-written file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_report(out: str, report: dict, md: str) -> None:
    """The report as JSON at `out` and its markdown table next to it (.md), both atomically; the table printed."""
    write_atomic(out, json.dumps(report, indent=1) + "\n")
    write_atomic(os.path.splitext(out)[0] + ".md", md)
    print(md)


def rss_mib() -> tuple[int, int]:
    """(current, peak) resident memory of this process in MiB, from /proc (Linux) or getrusage."""
    cur = peak = 0.0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    cur = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
    except OSError:
        import resource
        peak = cur = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return round(cur), round(peak)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(threads: int, peers: bool = True) -> dict[str, Any]:
    """CPU model, cores, threads, library versions (transformers and llama_cpp only with `peers`: importing
    them takes seconds) and the xpu-llm commit (dirty = tracked files modified)."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
                            "python": platform.python_version(), "platform": platform.platform()}
    for mod in ("transformers", "llama_cpp") if peers else ():
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as missing
            info[mod] = None
    info["xpu_llm_commit"] = _git("rev-parse", "--short", "HEAD") or None
    info["xpu_llm_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return info


def model_groups(model: Any) -> int | str | None:
    """The group size the quantized layers really use (the GGUF-native formats keep the file's 32 whatever
    group was asked); 'a/b' when mixed, None when nothing is quantized."""
    groups = sorted({m.group_size for m in model.modules()
                     if getattr(m, "low_bit", None) and isinstance(getattr(m, "group_size", None), int)})
    if not groups:
        return None
    return groups[0] if len(groups) == 1 else "/".join(str(g) for g in groups)


def child_row(cmd: list[str], base: dict[str, Any], timeout: float, env: dict[str, str] | None = None
              ) -> dict[str, Any]:
    """Run one benchmark row in a child process (its peak memory is its own; a crash or OOM costs one row): the
    row is the child's last stdout line `ROW {json}`; a failure, an OOM or a timeout is `{**base, "error": ...}`."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {timeout} s"}
    rows = [line[4:] for line in r.stdout.splitlines() if line.startswith("ROW ")]
    if r.returncode != 0 or not rows:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        oom = "out of memory" in r.stderr.lower()
        return {**base, "error": "out of memory" if oom else tail[0][:300]}
    return json.loads(rows[-1])


def hf_generate_timed(model: Any, input_ids: Any, new_tokens: int, pad_id: int) -> tuple[Any, float, list[float]]:
    """transformers `generate` of exactly `new_tokens` greedy tokens per row, with a LogitsProcessor that stamps
    perf_counter right after each forward (the device synchronised first, a no-op on the CPU; generate's stopping
    check synchronises every step anyway): (output ids, call start, stamps). The first stamp follows the prefill,
    so len(stamps) - 1 decode iterations lie between the first and the last stamp."""
    import torch
    import transformers

    from xpu_llm.device import synchronize
    stamps: list[float] = []

    class Stamp(transformers.LogitsProcessor):
        def __call__(self, ids, scores):
            synchronize(scores.device)
            stamps.append(time.perf_counter())
            return scores

    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                             logits_processor=transformers.LogitsProcessorList([Stamp()]))
    return out, t, stamps
