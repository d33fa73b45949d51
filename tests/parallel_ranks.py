"""Spawn the ranks of a multi-card test run on the CPU (gloo): one subprocess per rank with torchrun's
environment, a free port, OMP_NUM_THREADS=1 and a bounded timeout, after which every child still running is
killed (and the test fails). The children run tests/parallel_worker.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_worker.py")


@dataclass
class RankResult:
    rank: int
    returncode: int | None  # None: it had to be killed
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(launcher: str, rank: int, world: int) -> dict[str, str]:
    """The variables a launcher gives each rank: torchrun's, or Intel MPI's (PMI_*; MASTER_* set by the user)."""
    if launcher == "mpi":
        return {"PMI_RANK": str(rank), "PMI_SIZE": str(world), "MPI_LOCALRANKID": str(rank),
                "MPI_LOCALNRANKS": str(world)}
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}


def run_ranks(world: int, spec: dict, out_dir: str, timeout_s: float = 240.0, dist_timeout_s: float = 60.0,
              launcher: str = "torchrun", start: list[int] | None = None) -> list[RankResult]:
    """Run parallel_worker.py on `world` ranks (or only those in `start`) with `spec` (written to
    out_dir/spec.json); wait for all of them at most `timeout_s` in total, then kill what is left."""
    os.makedirs(out_dir, exist_ok=True)
    spec_path = os.path.join(out_dir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    port = free_port()
    procs = []
    for rank in range(world) if start is None else start:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE")}
        env.update(launch_env(launcher, rank, world))
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                    "XPU_LLM_DEVICE": "cpu", "XPU_LLM_DIST_TIMEOUT": str(dist_timeout_s), "PYTHONUNBUFFERED": "1"})
        procs.append(subprocess.Popen([sys.executable, WORKER, spec_path, out_dir], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    deadline = time.monotonic() + timeout_s
    results = []
    for rank, p in zip(range(world) if start is None else start, procs):
        try:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            results.append(RankResult(rank, p.returncode, out, err))
        except subprocess.TimeoutExpired:
            results.append(RankResult(rank, None, "", ""))
    for r, p in zip(results, procs):
        if r.returncode is None:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            r.stdout, r.stderr = out, err + f"\n[killed after {timeout_s:.0f} s]"
    return results


def check_ok(results: list[RankResult]) -> None:
    bad = [r for r in results if r.returncode != 0]
    assert not bad, "\n".join(f"rank {r.rank} exited {r.returncode}:\n{r.stderr[-3000:]}" for r in bad)
