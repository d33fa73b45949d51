"""The training entry on a tiny model: a kill and a Ctrl-C followed by --resume give the uninterrupted loss
curve bit for bit; two gloo processes under `accelerate launch` (DDP, DeepSpeed ZeRO-2, ZeRO-3) reach the
single-process losses for the same global batch; bad input is one clear error."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from finetune_fixtures import (FACTS_TRAIN, losses, run_train, smollm2_tokenizer, tiny_chat_model,  # noqa: F401
                               train_args)
from xpu_llm import cli
from xpu_llm.finetune import config_path

STEPS = 24
RESUME_ARGS = ("--save-every", "4", "--save-total-limit", "0", "--lora-dropout", "0.1")


@pytest.fixture(scope="module")
def reference(tiny_chat_model, tmp_path_factory):
    """Uninterrupted runs: (resume-test run dir, single-process 5-step run dir with global batch 4)."""
    resume_ref = str(tmp_path_factory.mktemp("ref_resume"))
    r = run_train(train_args(tiny_chat_model, resume_ref, *RESUME_ARGS, steps=STEPS))
    assert r.returncode == 0, r.stderr[-3000:]
    single = str(tmp_path_factory.mktemp("ref_single"))
    r = run_train(train_args(tiny_chat_model, single, "--save-every", "0"))
    assert r.returncode == 0, r.stderr[-3000:]
    return resume_ref, single


def _start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "xpu_llm.finetune.train", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, out: str, after: int, timeout: float = 300) -> int:
    """Poll metrics.jsonl until a step > `after` is logged; returns it (fails if the run ends first)."""
    path, t0 = os.path.join(out, "metrics.jsonl"), time.monotonic()
    while time.monotonic() - t0 < timeout:
        if os.path.isfile(path):
            steps = [json.loads(line)["step"] for line in open(path, encoding="utf-8") if line.strip()]
            if steps and steps[-1] > after:
                return steps[-1]
        assert proc.poll() is None, f"the run ended before step {after + 1}: {proc.communicate()[1][-2000:]}"
        time.sleep(0.01)
    raise AssertionError("timed out waiting for training steps")


def test_kill_and_ctrl_c_then_resume_give_the_same_loss_curve(tiny_chat_model, reference, tmp_path):
    resume_ref, _ = reference
    out = str(tmp_path / "run")
    argv = train_args(tiny_chat_model, out, *RESUME_ARGS, steps=STEPS)

    proc = _start(argv)  # 1. killed hard once a checkpoint exists
    _wait_for_step(proc, out, 5)
    proc.kill()
    proc.wait()
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts and all(c.startswith("step-") for c in ckpts), ckpts  # no half-written folder is visible
    killed_at = int(ckpts[-1].split("-")[1])
    assert 4 <= killed_at < STEPS

    logged = len(losses(out))  # the killed run logged steps past its checkpoint; the resumed run redoes them
    proc = _start([*argv, "--resume"])  # 2. resumed, then Ctrl-C: finishes the step, saves, exits 130
    stopped = _wait_for_step(proc, out, logged)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "continue with --resume" in err
    last = max(int(c.split("-")[1]) for c in os.listdir(os.path.join(out, "checkpoints")) if c.startswith("step-"))
    assert stopped <= last < STEPS

    r = run_train([*argv, "--resume"])  # 3. resumed to the end
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(out) == losses(resume_ref)  # bit-identical, all STEPS of them
    assert len(losses(out)) == STEPS
    a = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(resume_ref, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


LAUNCHES = {"ddp": ("multi_cpu.yaml", None), "zero2": ("deepspeed_zero2.yaml", "ds_zero2.json"),
            "zero3": ("deepspeed_zero3.yaml", "ds_zero3.json")}
# Against the single process without checkpointing: DDP recomputes both layers (reentrant checkpointing, the
# default), ZeRO-2 and ZeRO-3 recompute layer 0 (under ZeRO-3 its packed, partitioned weights dequantized in the
# recompute and kept for its backward) while layer 1 keeps its activations. The losses must not change.
KEEP_LAST = ("--gradient-checkpointing", "--uncheckpointed-layers", "1")
EXTRA = {"ddp": ("--gradient-checkpointing",), "zero2": KEEP_LAST, "zero3": KEEP_LAST}


@pytest.mark.parametrize("kind", list(LAUNCHES))
def test_two_processes_match_one_process(tiny_chat_model, reference, tmp_path, kind):
    """accelerate launch, 2 gloo processes with micro-batch 2 = one process with batch 4: same losses."""
    yaml, ds_json = LAUNCHES[kind]
    if ds_json and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    _, single = reference
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_path(yaml),
                "--num_processes", "2", "--mixed_precision", "no"]
    if ds_json:
        launcher += ["--deepspeed_config_file", config_path(ds_json)]
    out = str(tmp_path / kind)
    r = run_train(train_args(tiny_chat_model, out, "--save-every", "0", *EXTRA.get(kind, ()), batch=2),
                  launcher=launcher,
                  cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    with open(os.path.join(out, "checkpoints", "step-00000005", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["world_size"] == 2 and state["global_batch"] == 4
    assert ("deepspeed" in os.listdir(os.path.join(out, "checkpoints", "step-00000005"))) == bool(ds_json)
    mine, ref = losses(out), losses(single)
    assert len(mine) == len(ref) == 5
    assert max(abs(a - b) for a, b in zip(mine, ref)) < 1e-3, (mine, ref)
    a = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))  # gathered full-size under ZeRO-3
    b = load_file(os.path.join(single, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and (a[k] - b[k]).abs().max() < 1e-3 for k in a)


# ---------------------------------------------------------------------------------------------- bad input

def _cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(["finetune", *argv])
    return rc, capsys.readouterr().err


def test_bad_data_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": \n', encoding="utf-8")
    rc, err = _cli(["--data", str(bad), "--output", str(tmp_path / "o")], capsys)
    assert rc == 2 and f"{bad}:2: not valid JSON" in err and "Traceback" not in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    rc, err = _cli(["--data", str(empty), "--output", str(tmp_path / "o")], capsys)
    assert rc == 2 and "holds no records" in err
    rc, err = _cli(["--data", FACTS_TRAIN, "--output", str(tmp_path / "o"), "--batch-size", "0"], capsys)
    assert rc == 2 and "--batch-size must be positive" in err


def test_output_with_checkpoints_needs_resume(tiny_chat_model, reference, tmp_path, capsys):
    resume_ref, _ = reference
    rc, err = _cli(train_args(tiny_chat_model, resume_ref, steps=2), capsys)
    assert rc == 2 and "already holds checkpoints; pass --resume" in err
    rc, err = _cli(train_args(tiny_chat_model, str(tmp_path / "fresh"), "--resume", steps=2), capsys)
    assert rc == 2 and "no checkpoint" in err
    rc, err = _cli(train_args(tiny_chat_model, resume_ref, "--resume", "--batch-size", "2", steps=STEPS), capsys)
    assert rc == 2 and "global_batch=4, this run has 2" in err
