"""Run a test file again in a child pytest with TRITON_INTERPRET=1: Triton reads that variable when a kernel is
defined, its own library's helpers included, i.e. when triton is first imported, and torch._dynamo (any test
that compiles) imports it. So on a machine without a GPU, Triton kernel tests run on CPU tensors in that child
and are skipped in the parent."""
from __future__ import annotations

import os
import subprocess
import sys

IN_CHILD = os.environ.get("TRITON_INTERPRET") == "1"


def run_interpreted(test_file: str, timeout: float = 900) -> str:
    """Run `test_file` under the interpreter; assert it passed; return pytest's summary line."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "XPU_LLM_TRITON_AUTOTUNE": "0", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(test_file)],
                       cwd=os.path.dirname(os.path.abspath(test_file)), env=env, capture_output=True, text=True,
                       timeout=timeout, check=False)
    tail = (p.stdout + p.stderr)[-6000:]
    assert p.returncode == 0, f"interpreter run of {os.path.basename(test_file)} failed:\n{tail}"
    return tail.strip().splitlines()[-1]
