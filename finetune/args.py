"""Command-line options of the training entry (kept import-light: the `xpu-llm` CLI builds its parser from
this module on every start)."""
from __future__ import annotations

import argparse


def add_train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of `python -m xpu_llm.finetune.train` / `xpu-llm finetune` to `p`."""
    m = p.add_argument_group("model")
    m.add_argument("--model", "-m", default=None,
                   help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    m.add_argument("--low-bit", default="nf4",
                   help="format of the frozen base: nf4 (default), sym_int4, fp4, sym_int8, fp8_e4m3, or none")
    m.add_argument("--group-size", type=int, default=64, help="quantization group size: 32, 64 or 128")
    m.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the base's float weights and activations (auto: the mixed-precision dtype, "
                        "else bfloat16 on GPUs and float32 on CPUs)")
    m.add_argument("--chat-template", default=None, help="Jinja chat template file (default: the tokenizer's)")
    m.add_argument("--quant-storage", default="uint8", choices=("uint8", "bfloat16", "float16", "float32"),
                   help="under DeepSpeed, dtype of the parameter holding the packed base weights "
                        "(bitsandbytes' quant_storage)")

    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora-r", type=int, default=16)
    lo.add_argument("--lora-alpha", type=float, default=32)
    lo.add_argument("--lora-dropout", type=float, default=0.05)
    lo.add_argument("--target-modules", default="all-linear",
                    help="all-linear, or comma-separated module names (e.g. q_proj,v_proj)")

    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="training JSONL (alpaca, dolly, chat messages)")
    d.add_argument("--eval-data", default=None, help="held-out JSONL (default: --eval-fraction of --data)")
    d.add_argument("--eval-fraction", type=float, default=0.05, help="share of --data held out (0: none)")
    d.add_argument("--seq-len", type=int, default=1024, help="longest sequence; longer examples are truncated")
    d.add_argument("--packing", action="store_true", help="pack several examples per row (no cross-attention)")

    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=int, default=4, help="micro-batch per process")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--lr-scheduler", default="cosine", choices=("cosine", "linear", "constant"))
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs worth)")
    t.add_argument("--epochs", type=float, default=1.0, help="used when --max-steps is not given")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in backward (less memory, ~30%% more compute)")
    t.add_argument("--uncheckpointed-layers", type=int, default=0, metavar="N",
                   help="the last N decoder layers keep their activations instead of recomputing them (speed for "
                        "memory: ~0.34 GiB per layer at Llama-3-8B, seq 1024, batch 4, LoRA dropout on)")
    t.add_argument("--fused-layers", action=argparse.BooleanOptionalAction, default=True,
                   help="Triton RMSNorm, SwiGLU and rotary embedding on GPUs (xpu_llm.finetune.fuse_layers; "
                        "no effect on CPUs)")
    t.add_argument("--seed", type=int, default=0)

    o = p.add_argument_group("output")
    o.add_argument("--output", "-o", required=True, help="output folder (adapter/, checkpoints/, metrics.jsonl)")
    o.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    o.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (0: all)")
    o.add_argument("--eval-every", type=int, default=None, help="eval loss every N steps (default: --save-every)")
    o.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in --output (or from the given checkpoint folder)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xpu_llm.finetune.train",
                                description="QLoRA fine-tuning on a low-bit base (run under `accelerate launch` "
                                            "for several processes or DeepSpeed)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return add_train_args(p)
