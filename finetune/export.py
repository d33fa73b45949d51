"""Export a fine-tune to serving: merge a LoRA adapter into its base and write the engine's low-bit folder
(`xpu_llm.LLM(OUT)` serves it). The base streams in tensor by tensor, each adapted weight is merged and
quantized on arrival (the float model is never held), as `xpu-llm convert` does.

By default the adapter is merged into the *dequantized training base* (e.g. nf4 of the original weights):
that is the weight the adapter learned to correct. `merge_into="float"` adds it to the original weights."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import XpuLLMError

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FINETUNE_INFO = "xpu_llm_finetune.json"


@dataclass
class LoraDelta:
    a: Tensor  # [r, K]
    b: Tensor  # [N, r]
    scaling: float

    def delta(self) -> Tensor:
        return (self.b.double() @ self.a.double()).mul_(self.scaling).float()


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_adapter(adapter_dir: str) -> tuple[dict[str, LoraDelta], dict[str, Any], dict[str, Any]]:
    """({HF module name: LoRA factors}, adapter_config, xpu_llm_finetune.json or {}) of a PEFT LoRA adapter."""
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(adapter_dir, ADAPTER_CONFIG), os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
        raise XpuLLMError(f"{adapter_dir} is not a PEFT adapter folder ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg = _read_json(cfg_path)
    if cfg.get("peft_type") != "LORA":
        raise XpuLLMError(f"{adapter_dir} holds a {cfg.get('peft_type')} adapter; only LoRA can be exported")
    unsupported = [k for k in ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
                   if cfg.get(k)]
    if unsupported:
        raise XpuLLMError(f"{adapter_dir}: LoRA options {unsupported} are not supported by export; merge with PEFT "
                          "(merge_and_unload) on the float model, save it and run `xpu-llm convert`")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    info_path = os.path.join(adapter_dir, FINETUNE_INFO)
    info = _read_json(info_path) if os.path.isfile(info_path) else {}
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in load_file(w_path).items():
        name = key.removeprefix("base_model.model.")
        for tag in (".lora_A.weight", ".lora_B.weight"):
            if name.endswith(tag):
                parts.setdefault(name[: -len(tag)], {})[tag[6]] = t
                break
        else:
            raise XpuLLMError(f"{adapter_dir}: unexpected tensor {key} (embedding adapters or trained modules "
                              "are not supported by export)")
    deltas = {}
    for mod, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise XpuLLMError(f"{adapter_dir}: {mod} lacks lora_{'A' if 'A' not in ab else 'B'}")
        deltas[mod] = LoraDelta(ab["A"].float(), ab["B"].float(), scaling)
    if not deltas:
        raise XpuLLMError(f"{adapter_dir} holds no LoRA weights")
    return deltas, cfg, info


def _base_items(path: str) -> tuple[Any, Iterator[tuple[str, Tensor]], int]:
    """(engine ModelConfig, (HF name, float32 tensor) stream, tensor count) of an HF folder or GGUF file."""
    from ..config import ModelConfig
    from ..lowbit.formats import get_format
    from ..loading import resolve_source

    source = resolve_source(path)
    if source.kind == "gguf":
        from ..gguf_io import open_gguf

        gf = open_gguf(source.path)

        def gguf_items() -> Iterator[tuple[str, Tensor]]:
            for name, kind, payload in gf.tensors():
                yield name, payload if kind == "dense" else get_format(kind).dequantize(payload, 32, torch.float32)

        return ModelConfig.from_hf(gf.hf_config()), gguf_items(), len(gf.tensor_info())
    if source.kind == "hf":
        from ..safetensors_io import checkpoint_index, read_tensor

        index = checkpoint_index(source.path)
        ordered = sorted(index.items(), key=lambda kv: (kv[1].file, kv[1].start))
        items = ((name, read_tensor(entry)) for name, entry in ordered)
        return ModelConfig.from_json_file(os.path.join(source.path, "config.json")), items, len(index)
    raise XpuLLMError(f"{path} is an xpu-llm low-bit folder; export needs the original base (HF folder or GGUF) "
                      "that the adapter was trained on")


def _dense(name: str | None) -> bool:
    return name is None or str(name).lower() in ("none", "dense")


def resolve_merge(merge_into: str, fmt: str | None) -> str:
    """'auto' -> 'float' for a 4-bit target, else 'quantized'. Adding the adapter to weights that already lie
    on a 4-bit grid and rounding back to that grid undoes most of it (the delta is smaller than half a step:
    measured 0/10 facts kept vs 9/10 merging into the float weights, tests/test_finetune_facts.py); an 8-bit
    or dense target keeps the trained function (training base + delta) exactly."""
    from ..lowbit.formats import get_format

    if merge_into not in ("auto", "quantized", "float"):
        raise XpuLLMError(f"merge_into must be auto, float or quantized, got {merge_into!r}")
    if merge_into != "auto":
        return merge_into
    return "float" if fmt is not None and get_format(fmt).bits <= 4 else "quantized"


def export(adapter_dir: str, out_dir: str, base: str | None = None, low_bit: str | None = "auto",
           group_size: int | None = None, merge_into: str = "auto", dtype: torch.dtype = torch.float32,
           progress: bool = True) -> str:
    """Merge `adapter_dir` into `base` (default: the base recorded at training) and write the engine's
    low-bit folder `out_dir` atomically, in `low_bit` ("auto": the training format; None / "none": dense) with
    `group_size` (None: the training group size). Returns out_dir."""
    from tqdm.auto import tqdm

    from ..loading import Item, Loader, check_format
    from ..lowbit.formats import get_format
    from ..lowbit_folder import save_low_bit
    from ..tokenizer import load_tokenizer

    deltas, cfg, info = read_adapter(adapter_dir)
    base = base or info.get("base_model") or cfg.get("base_model_name_or_path")
    if not base:
        raise XpuLLMError(f"{adapter_dir} does not record its base model; pass --base")
    trained = None if _dense(info.get("low_bit")) else info["low_bit"]
    train_group = int(info.get("group_size", 64))
    if low_bit == "auto":
        low_bit = trained if info else "sym_int4"
    fmt = None if _dense(low_bit) or get_format(low_bit).dense else get_format(low_bit).name
    group_size = group_size or train_group
    check_format(fmt, group_size)
    merge_into = resolve_merge(merge_into, fmt)
    train_fmt = trained if merge_into == "quantized" else None
    if merge_into == "quantized" and not info:
        log.warning("%s has no %s: merging into the float base", adapter_dir, FINETUNE_INFO)

    mcfg, items, total = _base_items(base)
    loader = Loader(mcfg, fmt, group_size, dtype, torch.device("cpu"), keep_native=False)
    pending = dict(deltas)
    for name, w in tqdm(items, total=total, desc="merging", unit="tensor", disable=not progress, leave=False):
        mod = name.removesuffix(".weight")
        if mod in pending:
            d = pending.pop(mod)
            w = w.float()
            if tuple(w.shape) != (d.b.shape[0], d.a.shape[1]):
                raise XpuLLMError(f"{mod}: base weight {tuple(w.shape)} does not match the adapter "
                                  f"({d.b.shape[0]}x{d.a.shape[1]}); is --base the model it was trained on?")
            if train_fmt and w.shape[1] % train_group == 0:  # else the layer stayed dense in training
                tf = get_format(train_fmt)
                w = tf.dequantize(tf.quantize(w, train_group), train_group)
            w = w + d.delta()
        loader.add(name, Item(weight=w))
    if pending:
        raise XpuLLMError(f"the adapter targets modules the base lacks: {sorted(pending)[:4]}; is --base the model "
                          "it was trained on?")
    model = loader.finish()
    tok = load_tokenizer(base)
    if info.get("chat_template"):
        tok.chat_template = info["chat_template"]
    extra = {"low_bit": fmt, "group_size": group_size,
             "finetune": {"adapter": os.path.abspath(adapter_dir), "base": base, "merge_into": merge_into,
                          "train_low_bit": info.get("low_bit")}}
    return save_low_bit(model, tok, out_dir, extra)
