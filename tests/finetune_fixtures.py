"""Fixtures shared by the test_finetune*.py files: a tiny random Llama with the real SmolLM2 tokenizer and chat
template (so the data pipeline runs for real while training costs milliseconds), and the facts data files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

DATA = os.path.join(os.path.dirname(__file__), "data")
FACTS_TRAIN = os.path.join(DATA, "facts_train.jsonl")
FACTS_HELDOUT = os.path.join(DATA, "facts_heldout.jsonl")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from xpu_llm.tokenizer import load_tokenizer
    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_tokenizer):
    """Folder of a 2-layer, 64-wide Llama (tied embeddings) with SmolLM2's tokenizer; group 64 divides every
    linear, so all of them become low-bit."""
    import transformers
    tok = smollm2_tokenizer
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                                   tie_word_embeddings=True, initializer_range=0.05, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_chat")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def train_args(model: str, out: str, *extra: str, steps: int = 5, batch: int = 4) -> list[str]:
    """Arguments of xpu_llm.finetune.train for a short deterministic run on the facts data."""
    return ["--model", model, "--data", FACTS_TRAIN, "--eval-fraction", "0", "--no-gradient-checkpointing",
            "--lr", "1e-3", "--max-steps", str(steps), "--batch-size", str(batch), "--seq-len", "128",
            "--output", out, "--lora-dropout", "0", "--no-progress", *extra]


def run_train(argv: list[str], launcher: list[str] | None = None, timeout: float = 600,
              **popen) -> subprocess.CompletedProcess:
    """`python -m xpu_llm.finetune.train ARGV` (or under `launcher`) in a fresh process, one thread each. On a
    timeout the whole process group goes (a launcher's ranks too, which would otherwise outlive it and hold the
    rendezvous port for the next test)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*(launcher or [sys.executable]), "-m", "xpu_llm.finetune.train", *argv]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **popen) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def losses(out_dir: str) -> list[float]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]
