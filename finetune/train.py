"""QLoRA training entry, the same script under every launcher:

    accelerate launch --config_file finetune/configs/deepspeed_zero2.yaml -m xpu_llm.finetune.train \\
        --model PATH --data train.jsonl --low-bit nf4 --lora-r 16 --lora-alpha 32 --target-modules all-linear \\
        --seq-len 1024 --batch-size 4 --grad-accum 4 --lr 2e-4 --max-steps 1000 --output out/

or `xpu-llm finetune ...` for one process. The loss is the mean over all answer tokens of the global batch
(every process and micro-batch), so any process count with the same global batch trains the same model.
Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and exits; `--resume` continues."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import XpuLLMError
from . import checkpoint as ckpt
from .args import build_parser
from .data import GlobalBatches, build_examples, collate, count_targets, pack, read_jsonl, split_heldout
from .gc_steps import StepGC
from .loss import answer_index, loss_sum

log = logging.getLogger(__name__)

STOPPED = 130  # exit status after a Ctrl-C / SIGTERM that saved a checkpoint


# ---------------------------------------------------------------------------------------------- pieces

class StopFlag:
    """Set by SIGINT / SIGTERM (a second Ctrl-C interrupts at once); handlers restored on exit."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True
        log.warning("signal %d: finishing this step, then saving a checkpoint (Ctrl-C again to abort)", signum)

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak LR at step s: linear warmup, then cosine / linear decay to 0 or constant."""
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        frac = min(1.0, (s - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * frac)) if kind == "cosine" else 1.0 - frac
    return f


def all_sum(acc: Any, *values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    return acc.reduce(t, reduction="sum").tolist() if acc.num_processes > 1 else t.tolist()


def memory_gb(device: torch.device) -> float:
    from ..device import max_memory_allocated
    return max_memory_allocated(device) / 2**30


def resolve_dtype(arg: str, mixed_precision: str, device: torch.device) -> torch.dtype:
    """The base's float dtype: as asked; auto = the mixed-precision dtype, else bfloat16 on accelerators and
    float32 on CPUs (bf16 elementwise work is slow on CPUs without native bf16)."""
    from ..device import is_cpu
    from .model import DTYPES
    if arg != "auto":
        return DTYPES[arg]
    mp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mixed_precision))
    return mp or (torch.float32 if is_cpu(device) else torch.bfloat16)


def check_args(args: Any) -> None:
    for name in ("batch_size", "grad_accum", "seq_len", "lora_r"):
        if getattr(args, name) <= 0:
            raise XpuLLMError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise XpuLLMError(f"--max-steps must be positive, got {args.max_steps}")
    if args.lr <= 0:
        raise XpuLLMError(f"--lr must be positive, got {args.lr}")


# ---------------------------------------------------------------------------------------------- setup

def make_accelerator(grad_accum: int) -> Any:
    """An Accelerator that also forms a process group on hosts without an accelerator: torchrun processes
    (accelerate launch --multi_gpu) need cpu=True for that, and DeepSpeed, which must not get cpu=True, needs
    the gloo backend named (else accelerate counts one process per rank). Under DeepSpeed, a stale extension
    build lock is an error first (finetune/extensions.py), not a silent hang."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from ..device import dist_backend, get_device, is_cpu
    from .extensions import check_build_locks

    on_cpu = is_cpu(get_device())
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed:
        check_build_locks()  # DeepSpeed builds ops at start; a killed build's lock would hang every rank
    handlers = [InitProcessGroupKwargs(backend=dist_backend(get_device()))] if on_cpu and deepspeed else []
    return Accelerator(gradient_accumulation_steps=grad_accum, cpu=on_cpu and not deepspeed,
                       kwargs_handlers=handlers)


def prepare_data(args: Any, tok: Any, conversations: list) -> tuple[list, list]:
    train = build_examples(tok, conversations, args.seq_len, args.data)
    if args.eval_data:
        held = build_examples(tok, read_jsonl(args.eval_data), args.seq_len, args.eval_data)
    else:
        train, held = split_heldout(train, args.eval_fraction, args.seed)
    if args.packing:
        train, held = pack(train, args.seq_len), pack(held, args.seq_len)
    return train, held


def build_model(args: Any, acc: Any, dtype: torch.dtype, model_path: str) -> Any:
    from .lora import add_lora, lora_config
    from .model import load_base
    from .storage import pack_low_bit_layers

    low_bit = None if str(args.low_bit).lower() in ("none", "dense") else args.low_bit
    with hide_zero3_from_transformers(acc):
        model = load_base(model_path, low_bit, args.group_size, dtype, args.gradient_checkpointing,
                          fuse=args.fused_layers, uncheckpointed_layers=args.uncheckpointed_layers)
    if ckpt.is_deepspeed(acc):  # frozen packed weights as parameters: ZeRO-3 shards them, checkpoints skip them
        storage = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16,
                   "float32": torch.float32}[args.quant_storage]
        pack_low_bit_layers(model, storage)
    torch.manual_seed(args.seed)  # the same adapter init whatever ran before
    cfg = lora_config(model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.target_modules)
    return add_lora(model, cfg)


@contextlib.contextmanager
def hide_zero3_from_transformers(acc: Any):
    """Build the model as a plain one under ZeRO-3: accelerate registers the DeepSpeed config with transformers,
    whose from_config would then initialise weights through zero.Init, which fails for a model built on meta.
    The DeepSpeed engine partitions the parameters when it wraps the model."""
    if not ckpt.is_zero3(acc):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        acc.state.deepspeed_plugin.set_deepspeed_weakref()


def configure_deepspeed(acc: Any, args: Any) -> None:
    """Fill the 'auto' values of the DeepSpeed config that accelerate cannot know (we pass no DataLoader)."""
    if not ckpt.is_deepspeed(acc):
        return
    cfg = acc.state.deepspeed_plugin.deepspeed_config
    if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        cfg["train_micro_batch_size_per_gpu"] = args.batch_size
    if cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = args.max_grad_norm
    cfg.setdefault("steps_per_print", 10**9)


# ---------------------------------------------------------------------------------------------- loops

def train_step(acc: Any, model: Any, optimizer: Any, params: list, micro_batches: list[dict], local_tokens: int,
               max_grad_norm: float) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches (holding `local_tokens` real tokens); the loss is
    normalised by the global answer-token count."""
    local_targets = sum(count_targets(b) for b in micro_batches)
    total_targets, total_tokens = all_sum(acc, local_targets, local_tokens)
    scale = acc.num_processes * len(micro_batches) / total_targets
    ces, grad_norm = [], None
    for batch in micro_batches:
        rows = answer_index(batch["labels"]).to(acc.device)  # found on the host: no device sync mid-step
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        with acc.accumulate(model):
            ce = loss_sum(model, batch, answer_rows=rows)
            acc.backward(ce * scale)
            if acc.sync_gradients and max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        ces.append(ce.detach())
    (ce_total,) = all_sum(acc, sum(float(c) for c in ces))  # read after the step: one device sync, not one a batch
    out = {"loss": ce_total / total_targets, "tokens": total_tokens, "targets": total_targets}
    if grad_norm is not None:
        out["grad_norm"] = float(grad_norm)
    return out


@torch.no_grad()
def evaluate(acc: Any, model: Any, examples: list, micro: int, pad_id: int) -> float:
    """Mean answer-token loss over the held-out set; every rank runs the same number of forwards (ZeRO-3
    gathers weights collectively), padding its share with ignored repeats."""
    model.eval()
    mine = examples[acc.process_index::acc.num_processes]
    n_batches = math.ceil(math.ceil(len(examples) / acc.num_processes) / micro)
    ce, n = 0.0, 0
    for b in range(n_batches):
        chunk = mine[b * micro:(b + 1) * micro]
        batch = collate(chunk or examples[:1], pad_id)
        loss = float(loss_sum(model, {k: v.to(acc.device) for k, v in batch.items()},
                              answer_rows=answer_index(batch["labels"]).to(acc.device)))
        if chunk:
            ce, n = ce + loss, n + count_targets(batch)
    model.train()
    ce_total, n_total = all_sum(acc, ce, n)
    return ce_total / max(n_total, 1)


@dataclass
class Session:
    """Everything a training run holds between its steps."""

    acc: Any
    model: Any
    optimizer: Any
    scheduler: Any
    params: list
    train_set: list
    held: list
    batches: GlobalBatches
    max_steps: int
    pad_id: int
    metrics: Any
    ckpt_root: str
    geometry: dict[str, Any]
    adapter_extra: dict[str, Any]


def setup(args: Any) -> Session:
    """Data, model with LoRA, optimizer and schedule, prepared by accelerate (DDP or DeepSpeed)."""
    from .metrics import MetricsLog
    from .model import load_tokenizer, resolve_model_path

    check_args(args)
    conversations = read_jsonl(args.data)  # fail on bad data before anything slow
    acc = make_accelerator(args.grad_accum)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model_path = resolve_model_path(args.model)
    tok = load_tokenizer(model_path, args.chat_template)
    train_set, held = prepare_data(args, tok, conversations)
    batches = GlobalBatches(len(train_set), args.batch_size, args.grad_accum, acc.num_processes, args.seed)
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * len(train_set) / batches.global_batch))

    dtype = resolve_dtype(args.dtype, acc.mixed_precision, acc.device)
    model = build_model(args, acc, dtype, model_path)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, args.warmup_steps,
                                                                        max_steps))
    configure_deepspeed(acc, args)
    model, optimizer = acc.prepare(model, optimizer)
    model.train()
    os.makedirs(args.output, exist_ok=True)
    metrics = MetricsLog(os.path.join(args.output, "metrics.jsonl"), acc.is_main_process,
                         os.path.join(args.output, "tensorboard"))
    return Session(acc, model, optimizer, scheduler, [p for p in model.parameters() if p.requires_grad],
                   train_set, held, batches, max_steps, tok.pad_token_id if tok.pad_token_id is not None else 0,
                   metrics, os.path.join(args.output, "checkpoints"),
                   {"global_batch": batches.global_batch, "seed": args.seed, "n_train": len(train_set)},
                   {"base_model": model_path, "low_bit": args.low_bit, "group_size": args.group_size,
                    "dtype": str(dtype).replace("torch.", ""), "chat_template": tok.chat_template})


def restore(s: Session, resume: str | None, output: str) -> tuple[int, int]:
    """(first step, tokens seen): from the newest (or given) checkpoint with --resume, else 0 on a fresh output."""
    if not resume:
        if ckpt.checkpoints(s.ckpt_root):
            raise XpuLLMError(f"{output} already holds checkpoints; pass --resume to continue, or use a new --output")
        s.metrics.reset()
        return 0, 0
    path = ckpt.newest(s.ckpt_root) if resume == "latest" else resume
    if path is None:
        raise XpuLLMError(f"no checkpoint in {s.ckpt_root} to resume from; run without --resume to start")
    state = ckpt.read_state(path)
    for k, v in s.geometry.items():
        if state.get(k) != v:
            raise XpuLLMError(f"{path} was written with {k}={state.get(k)}, this run has {v}; resume with the same "
                              "data, seed and global batch (batch size x grad accum x processes)")
    ckpt.load(s.acc, s.model, s.optimizer, s.scheduler, path)
    s.metrics.truncate_after(state["step"])
    log.info("resumed from %s at step %d", path, state["step"])
    return state["step"], state.get("tokens", 0)


def loop(s: Session, args: Any, start: int, tokens_seen: int) -> int | None:
    """Train from `start` to max_steps; returns the step a signal stopped it at (checkpoint saved), or None."""
    from tqdm.auto import tqdm

    acc = s.acc
    eval_every = args.eval_every if args.eval_every is not None else args.save_every
    bar = tqdm(total=s.max_steps, initial=start, unit="step", dynamic_ncols=True, desc="finetune",
               disable=args.no_progress or not acc.is_main_process)
    t_start = time.perf_counter()
    with StopFlag() as stop, StepGC() as collector:
        for step in range(start, s.max_steps):
            t0 = time.perf_counter()
            rows = [[s.train_set[i] for i in s.batches.micro_batch(step, m, acc.process_index)]
                    for m in range(args.grad_accum)]
            out = train_step(acc, s.model, s.optimizer, s.params, [collate(r, s.pad_id) for r in rows],
                             sum(len(e) for r in rows for e in r), args.max_grad_norm)
            s.scheduler.step()
            collector.step(step + 1)
            done, dt = step + 1, time.perf_counter() - t0
            tokens_seen += int(out["tokens"])
            record = {"step": done, "loss": out["loss"], "lr": s.scheduler.get_last_lr()[0],
                      "tokens_per_s": out["tokens"] / dt, "tokens": tokens_seen,
                      "epoch": round(s.batches.epoch_of(done), 4), "memory_gb": round(memory_gb(acc.device), 3),
                      "seconds": round(time.perf_counter() - t_start, 3)}
            if "grad_norm" in out:
                record["grad_norm"] = out["grad_norm"]
            if s.held and eval_every and (done % eval_every == 0 or done == s.max_steps):
                record["eval_loss"] = evaluate(acc, s.model, s.held, args.batch_size, s.pad_id)
            s.metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            mem=f"{record['memory_gb']:.2f}GB", refresh=False)
            want_stop = all_sum(acc, float(stop.set))[0] > 0  # every rank stops after the same step
            if want_stop or done == s.max_steps or (args.save_every and done % args.save_every == 0):
                path = ckpt.save(acc, s.model, s.optimizer, s.scheduler, s.ckpt_root, done,
                                 {**s.geometry, "tokens": tokens_seen, "world_size": acc.num_processes},
                                 s.adapter_extra, args.save_total_limit or None)
                log.info("checkpoint %s", path)
            if want_stop:
                bar.close()
                return done
    bar.close()
    return None


def run(args: Any) -> int:
    """Train; returns 0, or STOPPED after a signal (a checkpoint was saved)."""
    s = setup(args)
    start, tokens_seen = restore(s, args.resume, args.output)
    stopped_at = loop(s, args, start, tokens_seen)
    s.metrics.close()
    if stopped_at is not None:
        if s.acc.is_main_process:
            print(f"stopped at step {stopped_at}/{s.max_steps}; checkpoint saved in {s.ckpt_root}; "
                  f"continue with --resume", file=sys.stderr)
        return STOPPED
    adapter_dir = os.path.join(args.output, "adapter")
    ckpt.save_adapter(s.acc, s.model, adapter_dir, s.adapter_extra)
    s.acc.wait_for_everyone()
    if s.acc.is_main_process:
        print(f"adapter saved in {adapter_dir}", file=sys.stderr)
    s.acc.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except XpuLLMError as e:
        print(f"xpu-llm finetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("\ninterrupted (no checkpoint written by this interruption)", file=sys.stderr)
        return STOPPED


if __name__ == "__main__":
    sys.exit(main())
