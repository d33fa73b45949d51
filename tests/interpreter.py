"""Run a test file again in a child pytest with TRITON_INTERPRET=1: Triton reads that variable when a kernel is
defined, its own library's helpers included, i.e. when triton is first imported, and torch._dynamo (any test
that compiles) imports it. So on a machine without a GPU, Triton kernel tests run on CPU tensors in that child
and are skipped in the parent."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from xpu_llm.device import get_device, is_gpu

IN_CHILD = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = get_device()
ON_GPU = is_gpu(DEVICE)
RUN_HERE = ON_GPU or IN_CHILD  # kernel tests run in this process: compiled on a GPU, or interpreted in the child
DEV = DEVICE if ON_GPU else torch.device("cpu")  # where the kernel tests put their tensors
here = pytest.mark.skipif(not RUN_HERE, reason="runs in the TRITON_INTERPRET=1 child (test_interpreter_suite)")


def suite(test_file: str):
    """The test that runs `test_file` again in the interpreter child where kernels cannot run in this process;
    a test file binds it as `test_interpreter_suite = interpreter.suite(__file__)`."""
    @pytest.mark.skipif(RUN_HERE, reason="kernels run in this process")
    def test_interpreter_suite():
        print(run_interpreted(test_file))
    return test_interpreter_suite


def run_interpreted(test_file: str, timeout: float = 900) -> str:
    """Run `test_file` under the interpreter; assert it passed; return pytest's summary line."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "XPU_LLM_TRITON_AUTOTUNE": "0", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(test_file)],
                       cwd=os.path.dirname(os.path.abspath(test_file)), env=env, capture_output=True, text=True,
                       timeout=timeout, check=False)
    tail = (p.stdout + p.stderr)[-6000:]
    assert p.returncode == 0, f"interpreter run of {os.path.basename(test_file)} failed:\n{tail}"
    return tail.strip().splitlines()[-1]
