# python examples/finetune_qlora.py --out /tmp/facts      (from the repository root; a few minutes on 2 CPU cores)
"""QLoRA end to end on the embedded SmolLM2: teach it ten made-up facts (tests/data/facts_train.jsonl) with an
nf4 base, export the merged model to the engine's low-bit folder and ask held-out paraphrased questions
before and after. The same steps from the shell:

    xpu-llm finetune --data tests/data/facts_train.jsonl --eval-data tests/data/facts_heldout.jsonl \\
        --low-bit nf4 --lr 1e-3 --max-steps 40 --seq-len 128 --no-gradient-checkpointing --output /tmp/facts
    xpu-llm export --adapter /tmp/facts/adapter -o /tmp/facts/served
    xpu-llm generate "Which peak rises above all others in Ustravia?" --model /tmp/facts/served

On several processes or GPUs the training line becomes
    accelerate launch --config_file finetune/configs/deepspeed_zero3.yaml -m xpu_llm.finetune.train ..."""
from __future__ import annotations

import argparse
import json
import os

import xpu_llm
from xpu_llm import cli

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data")


def ask(llm: xpu_llm.LLM, questions: list[dict]) -> int:
    outs = llm.generate([[{"role": "user", "content": q["instruction"]}] for q in questions], max_new_tokens=24)
    for q, o in zip(questions, outs):
        mark = "+" if q["answer"].lower() in o.text.lower() else "-"
        print(f"  {mark} {q['instruction']}\n      {o.text.strip()}")
    return sum(q["answer"].lower() in o.text.lower() for q, o in zip(questions, outs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/facts", help="output folder (adapter/, checkpoints/, served/)")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    train, held = os.path.join(DATA, "facts_train.jsonl"), os.path.join(DATA, "facts_heldout.jsonl")
    with open(held, encoding="utf-8") as f:
        questions = [json.loads(line) for line in f if line.strip()]

    print("base model:")
    before = ask(xpu_llm.LLM(), questions)
    resume = ["--resume"] if os.path.isdir(os.path.join(args.out, "checkpoints")) else []
    rc = cli.main(["finetune", "--data", train, "--eval-data", held, "--low-bit", "nf4", "--lr", "1e-3",
                   "--lora-dropout", "0", "--max-steps", str(args.steps), "--seq-len", "128",
                   "--no-gradient-checkpointing", "--save-every", "10", "--output", args.out, *resume])
    if rc != 0:
        raise SystemExit(rc)
    served = os.path.join(args.out, "served")
    cli.main(["export", "--adapter", os.path.join(args.out, "adapter"), "-o", served])
    print("fine-tuned, exported and served:")
    after = ask(xpu_llm.LLM(served), questions)
    print(f"held-out questions answered: {before}/10 before, {after}/10 after")


if __name__ == "__main__":
    main()
