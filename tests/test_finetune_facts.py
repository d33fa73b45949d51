"""The issue's end-to-end check on real weights: SmolLM2 with an nf4 base learns ten made-up facts in 40 steps
(training loss at least halved), and after `xpu-llm export` the served model answers held-out paraphrased
questions about them that the base model gets wrong. The adapter also loads onto the plain float HF model
with the training logits."""
from __future__ import annotations

import json
import os

import pytest
import torch

from finetune_fixtures import FACTS_HELDOUT, FACTS_TRAIN, losses
from xpu_llm import cli

pytestmark = pytest.mark.slow
STEPS = 40


def answered(llm) -> tuple[int, list[str]]:
    """(correct answers, texts) of the served model on the ten held-out paraphrased questions."""
    with open(FACTS_HELDOUT, encoding="utf-8") as f:
        qs = [json.loads(line) for line in f if line.strip()]
    outs = llm.generate([[{"role": "user", "content": q["instruction"]}] for q in qs], max_new_tokens=24)
    return sum(q["answer"].lower() in o.text.lower() for q, o in zip(qs, outs)), [o.text for o in outs]


@pytest.fixture(scope="module")
def trained(smollm2_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("facts"))
    rc = cli.main(["finetune", "--model", smollm2_path, "--data", FACTS_TRAIN, "--eval-data", FACTS_HELDOUT,
                   "--low-bit", "nf4", "--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0",
                   "--no-gradient-checkpointing", "--seq-len", "128", "--batch-size", "4", "--lr", "1e-3",
                   "--max-steps", str(STEPS), "--save-every", "0", "--eval-every", "20", "--no-progress",
                   "--output", out])
    assert rc == 0
    return out


def test_forty_steps_halve_the_loss_and_the_served_export_knows_the_facts(smollm2_path, trained, tmp_path):
    import xpu_llm

    curve = losses(trained)
    assert len(curve) == STEPS
    first, last = curve[0], sum(curve[-5:]) / 5
    assert last <= first / 2, f"training loss {first:.3f} -> {last:.3f} (mean of the last 5 steps)"
    with open(os.path.join(trained, "metrics.jsonl"), encoding="utf-8") as f:
        evals = [r["eval_loss"] for r in map(json.loads, f) if "eval_loss" in r]
    assert len(evals) == 2 and all(e == e for e in evals)

    before, _ = answered(xpu_llm.LLM(smollm2_path))
    served = str(tmp_path / "served")
    assert cli.main(["export", "--adapter", os.path.join(trained, "adapter"), "-o", served]) == 0
    llm = xpu_llm.LLM(served)
    assert llm.low_bit == "nf4"  # the training format by default, merged into the float weights
    after, texts = answered(llm)
    print(f"held-out facts answered: before {before}/10, after export {after}/10")
    assert before <= 2 and after >= 6 and after >= before + 5, texts


def test_adapter_on_the_plain_float_model_gives_the_training_logits(smollm2_path, trained):
    import peft

    from xpu_llm.finetune import dequantize_linears, load_adapter, load_base

    adapter = os.path.join(trained, "adapter")
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 2, 504, 3458]])
    training = load_adapter(load_base(smollm2_path, "nf4", gradient_checkpointing=False), adapter).eval()
    with torch.no_grad():
        want = training(input_ids=ids).logits
    float_base = dequantize_linears(load_base(smollm2_path, "nf4", gradient_checkpointing=False))
    assert not any("LowBit" in type(m).__name__ for m in float_base.modules())
    plain = peft.PeftModel.from_pretrained(float_base, adapter).eval()  # PEFT's stock loader, nn.Linear layers
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-3
