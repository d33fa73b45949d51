"""cd tests && OMP_NUM_THREADS=1 python -m pytest -q test_launch_finetune.py

xpu_llm.launch.train.run_finetune on a local Ray (2 CPUs, one instance for the module): two Ray Train workers
with micro-batch 2 reach the one-process losses of global batch 4 and write the adapter; bad training
arguments fail on the driver before Ray is touched; a failing worker is one short XpuLLMError naming its rank."""
from __future__ import annotations

import json
import os
import re

import pytest
from safetensors.torch import load_file

ray = pytest.importorskip("ray")
pytest.importorskip("ray.train.torch")

from finetune_fixtures import losses, run_train, smollm2_tokenizer, tiny_chat_model, train_args  # noqa: E402,F401
from xpu_llm.errors import XpuLLMError  # noqa: E402
from xpu_llm.launch.train import card_index, parse_train_args, run_finetune  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray for the module (start-up is ~10 s); workers get one BLAS thread each."""
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    ray.init(address="local", num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def single(tiny_chat_model, tmp_path_factory):
    """One process, global batch 4, 5 steps: the reference losses."""
    out = str(tmp_path_factory.mktemp("launch_single"))
    r = run_train(train_args(tiny_chat_model, out, "--save-every", "0"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_two_ray_workers_match_one_process(tiny_chat_model, single, local_ray, tmp_path):
    out = str(tmp_path / "ray2")
    rc = run_finetune(train_args(tiny_chat_model, out, "--save-every", "0", batch=2), workers=2, use_gpu=None)
    assert rc == 0
    with open(os.path.join(out, "checkpoints", "step-00000005", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["world_size"] == 2 and state["global_batch"] == 4
    mine, ref = losses(out), losses(single)
    assert len(mine) == len(ref) == 5
    assert max(abs(a - b) for a, b in zip(mine, ref)) < 1e-3, (mine, ref)
    a = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(single, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-3 for k in a)
    assert os.path.isdir(os.path.join(out, "ray_train"))  # Ray's run state under --output, not ~/ray_results


def test_a_failing_worker_is_one_error_naming_its_rank(tiny_chat_model, local_ray, tmp_path):
    argv = train_args(tiny_chat_model, str(tmp_path / "out"))
    argv[argv.index("--data") + 1] = str(tmp_path / "missing.jsonl")  # every worker fails in setup
    with pytest.raises(XpuLLMError) as e:
        run_finetune(argv, workers=2, use_gpu=False)
    msg = str(e.value)
    # Both workers fail; Ray may report either first or both ("worker rank 1 (of 2)" / "worker ranks 0, 1 (of 2)").
    assert re.search(r"worker ranks? (0, 1|0|1) \(of 2\) failed", msg), msg
    assert "missing.jsonl" in msg and "does not exist" in msg, msg
    assert "Traceback" not in msg and len(msg) < 600, msg
    assert ray.is_initialized()  # the caller's Ray is left running


@pytest.mark.parametrize("argv, expect", [
    (["--output", "x"], "the following arguments are required: --data"),
    (["--data", "d.jsonl", "--output", "x", "--batch-size", "two"], "--batch-size: invalid int value"),
    (["--data", "d.jsonl", "--output", "x", "--lr", "0"], "--lr must be positive"),
])
def test_bad_training_arguments_fail_on_the_driver(argv, expect, monkeypatch):
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started for bad arguments"))
    with pytest.raises(XpuLLMError) as e:
        run_finetune(argv, workers=2)
    assert expect in str(e.value), str(e.value)


def test_paths_become_absolute_and_worker_cards():
    args = parse_train_args(["--data", "d.jsonl", "--output", "out", "--resume"])
    assert args.data == os.path.abspath("d.jsonl") and args.output == os.path.abspath("out")
    assert args.resume == "latest"
    assert card_index(1, 3, ["3"]) == 0  # Ray masked the other cards
    assert card_index(4, 0, ["2"]) == 2  # all visible: the card Ray assigned
    assert card_index(4, 1, []) == 1  # no assignment known: the local rank
    with pytest.raises(XpuLLMError, match="sees none"):
        card_index(0, 0, ["0"])


def test_failure_message_puts_the_cause_first():
    from ray.train import WorkerGroupError

    from xpu_llm.launch.train import failure_message

    err = WorkerGroupError("long Ray text", {0: RuntimeError("Connection closed by peer [127.0.0.1]:7062.\ntrace..."),
                                             1: XpuLLMError("data file 'x.jsonl' does not exist")})
    msg = str(failure_message(err, 2))
    assert msg.startswith("worker rank 1 (of 2) failed: data file 'x.jsonl' does not exist; "
                          "worker rank 0 (of 2) failed: RuntimeError: Connection closed by peer"), msg
    assert "trace..." not in msg
