"""Training checkpoints, written atomically: every rank writes into a hidden temp folder, rank 0 writes
`state.json` last and renames the folder to `step-NNNNNNNN`, so a folder with that name is always complete.

Contents: the adapter in PEFT format (`adapter/`), the optimizer (`optimizer.pt`, or DeepSpeed's own sharded
files under `deepspeed/` with frozen weights left out), the LR scheduler, each rank's RNG states, and
`state.json` (step = the data position, tokens seen, batch geometry)."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from typing import Any

import torch

from ..errors import XpuLLMError

log = logging.getLogger(__name__)

STATE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root` as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, STATE)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def newest(root: str) -> str | None:
    found = checkpoints(root)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------------------------------- pieces

def rng_state() -> dict[str, Any]:
    from ..device import device_module, get_device

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate())}
    mod = device_module(get_device())
    if mod is not None:
        state["device"] = mod.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from ..device import device_module, get_device

    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    mod = device_module(get_device())
    if mod is not None and "device" in state:
        mod.set_rng_state(state["device"])


def trainable_state(accelerator: Any, model: Any) -> dict[str, torch.Tensor]:
    """Full-size copies (on the CPU) of the trainable parameters by name, gathered under ZeRO-3."""
    unwrapped = accelerator.unwrap_model(model)
    params = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    if is_zero3(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
    return {n: p.detach().to("cpu", copy=True) for n, p in params.items()}


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_zero3(accelerator: Any) -> bool:
    return is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def save_adapter(accelerator: Any, model: Any, out_dir: str, extra: dict[str, Any] | None = None) -> None:
    """The adapter in PEFT format (adapter_config.json + adapter_model.safetensors) plus our
    `xpu_llm_finetune.json` (base model, low-bit format), written by rank 0; every rank must call it."""
    state = trainable_state(accelerator, model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out_dir, state_dict=state)
        if extra is not None:
            _write_json(os.path.join(out_dir, "xpu_llm_finetune.json"), extra)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- save / load

def save(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, root: str, step: int,
         state: dict[str, Any], adapter_extra: dict[str, Any], keep: int | None = None) -> str:
    """Write checkpoint `step` atomically (all ranks call this); returns its path. Keeps the newest `keep`."""
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    save_adapter(accelerator, model, os.path.join(tmp, "adapter"), adapter_extra)
    if is_deepspeed(accelerator):
        model.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="state", save_latest=False,
                              exclude_frozen_parameters=True)
    elif accelerator.is_main_process:
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        _write_json(os.path.join(tmp, STATE), {**state, "step": step})  # last: marks the folder complete
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=".old-", dir=root)
            os.replace(final, os.path.join(old, "x"))
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        if keep:
            for _, path in checkpoints(root)[:-keep]:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, STATE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise XpuLLMError(f"{path} is not a complete checkpoint ({e}); resume from another one") from e


def load(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, path: str) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler and this rank's RNG from checkpoint `path`; returns state.json."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = read_state(path)
    world = accelerator.num_processes
    if is_deepspeed(accelerator):
        if state.get("world_size") != world:
            raise XpuLLMError(f"{path} was written by {state.get('world_size')} DeepSpeed processes, this run has "
                              f"{world}; ZeRO optimizer shards only load into the same number of processes")
        loaded, _ = model.load_checkpoint(os.path.join(path, "deepspeed"), tag="state", load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise XpuLLMError(f"DeepSpeed could not load the checkpoint in {path}/deepspeed")
    else:
        weights = load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))
        result = set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
        bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if bad:
            raise XpuLLMError(f"{path}: adapter tensors {bad[:4]} do not fit this model (other --lora-r or "
                              "--target-modules than the run that wrote it?)")
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    rng = os.path.join(path, f"rng-rank{accelerator.process_index}.pt")
    if os.path.isfile(rng):
        set_rng_state(torch.load(rng, weights_only=True))
    else:
        log.warning("%s has no RNG state for rank %d; dropout masks will differ from an uninterrupted run",
                    path, accelerator.process_index)
    return state
