"""The engine's own checkpoint: `model.safetensors` (packed low-bit tensors as the registry stores them) plus
a JSON manifest (config, each layer's format) and the tokenizer, written atomically: a folder either loads
completely or is not there."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .errors import CorruptCheckpointError, XpuLLMError
from .lowbit.embedding import LowBitEmbedding
from .lowbit.linear import LowBitLinear
from .loading import meta_model
from .model import Transformer
from .sources import MANIFEST

WEIGHTS = "model.safetensors"
FORMAT_TAG = "xpu-llm-lowbit"
VERSION = 1


def _manifest(model: Transformer, extra: dict[str, Any]) -> dict[str, Any]:
    modules = {}
    for name, m in model.named_modules():
        if isinstance(m, LowBitLinear):
            modules[name] = {"low_bit": m.low_bit, "group_size": m.group_size, "in_features": m.in_features,
                             "out_features": m.out_features, "bias": m.bias is not None}
    emb = model.tok_embeddings
    if isinstance(emb, LowBitEmbedding):
        embedding = {"kind": "tied" if emb.tied else "lowbit", "low_bit": emb.low_bit, "group_size": emb.group_size}
    else:
        tied = getattr(model.output, "weight", None) is emb.weight
        embedding = {"kind": "tied" if tied else "dense"}
    return {"format": FORMAT_TAG, "version": VERSION, "config": model.config.to_dict(), "modules": modules,
            "embedding": embedding, "dtype": str(model.norm.weight.dtype).replace("torch.", ""), **extra}


def save_low_bit(model: Transformer, tokenizer: Any, out_dir: str, extra: dict[str, Any] | None = None) -> str:
    """Write `out_dir` atomically (temp folder beside it, then rename). `tokenizer`: a tokenizer object, the
    list of its files (copied; no tokenizer is built), or None. Refuses to overwrite a folder that is not an
    xpu-llm checkpoint."""
    from safetensors.torch import save_file

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        raise XpuLLMError(f"{out_dir} exists and is not an xpu-llm checkpoint; choose an empty or new folder")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    manifest = _manifest(model, extra or {})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if manifest["embedding"]["kind"] == "tied" and "output.weight" in state and "tok_embeddings.weight" in state:
        del state["output.weight"]  # one tensor on disk for a tied float embedding
    tmp = tempfile.mkdtemp(prefix=".xpu-llm-tmp-", dir=parent)
    try:
        save_file(state, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT_TAG})
        if isinstance(tokenizer, list):  # the tokenizer's files (tokenizer.tokenizer_files): copied as they are
            for path in tokenizer:
                shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:  # last: marks the folder complete
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=".xpu-llm-old-", dir=parent)
            os.replace(out_dir, os.path.join(old, "x"))
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_manifest(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except ValueError as e:
        raise CorruptCheckpointError(f"{path}/{MANIFEST} is unreadable ({e}); convert the model again") from e
    if manifest.get("format") != FORMAT_TAG or manifest.get("version", 0) > VERSION:
        raise CorruptCheckpointError(f"{path} was written by an unknown or newer xpu-llm; upgrade xpu-llm")
    return manifest


def load_low_bit(path: str, dtype: torch.dtype, device: torch.device,
                 progress: bool = True) -> tuple[Transformer, dict[str, Any]]:
    """Build from the manifest on meta, then stream each tensor in with assign=True."""
    from tqdm.auto import tqdm

    from .safetensors_io import read_header, read_tensor

    manifest = read_manifest(path)
    cfg = ModelConfig.from_dict(manifest["config"])
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        raise CorruptCheckpointError(f"{path} has no {WEIGHTS}; convert the model again")
    entries = read_header(weights)
    model = meta_model(cfg)
    with torch.device("meta"):
        for name, m in manifest["modules"].items():
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr,
                    LowBitLinear(m["in_features"], m["out_features"], m["bias"], m["low_bit"], m["group_size"],
                                 device="meta", dtype=dtype))
    emb = manifest["embedding"]
    for name, entry in tqdm(entries.items(), desc=f"loading {os.path.basename(path)}", unit="tensor",
                            disable=not progress, leave=False):
        t = read_tensor(entry)
        if t.is_floating_point() and name.rsplit(".", 1)[-1] in ("weight", "bias"):
            t = t.to(dtype)
        model.load_state_dict({name: t.to(device)}, strict=False, assign=True)
    if emb["kind"] == "tied" and isinstance(model.output, LowBitLinear):
        model.tok_embeddings = LowBitEmbedding(emb["low_bit"], emb["group_size"], dtype, tied_to=model.output)
    elif emb["kind"] == "tied":
        model.output.weight = model.tok_embeddings.weight
    elif emb["kind"] == "lowbit":
        tensors = {k.split(".", 1)[1]: read_tensor(e).to(device) for k, e in entries.items()
                   if k.startswith("tok_embeddings.")}
        model.tok_embeddings = LowBitEmbedding(emb["low_bit"], emb["group_size"], dtype, tensors=tensors)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise CorruptCheckpointError(f"{path} is incomplete: no data for {missing[:6]}; convert the model again")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, {"low_bit": manifest.get("low_bit"), "group_size": manifest.get("group_size"),
                   "config": cfg, "manifest": manifest, "dtype": dtype}
