"""What a model argument points at (an HF folder, a GGUF file, an xpu-llm low-bit folder, or nothing: the embedded
SmolLM2), classified before anything is read, with errors that say what a valid argument looks like."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ModelNotFoundError, XpuLLMError
from .lowbit.formats import GROUP_SIZES, get_format

MANIFEST = "xpu_llm.json"  # the file that marks an `xpu-llm convert` output folder


@dataclass
class Source:
    """What a model argument points at."""
    kind: str  # "hf", "gguf" or "lowbit"
    path: str  # the folder, or the .gguf file


def resolve_source(model: str | os.PathLike | None) -> Source:
    """Classify a model argument; None is the embedded SmolLM2 GGUF."""
    if model is None:
        from .default_model import default_model_path
        return Source("gguf", default_model_path())
    path = os.fspath(model)
    if not os.path.exists(path):
        raise ModelNotFoundError(
            f"model path {path!r} does not exist. Give a local Hugging Face model folder (config.json + "
            "*.safetensors), a .gguf file, a folder written by `xpu-llm convert`, or nothing for the embedded SmolLM2")
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return Source("gguf", path)
        raise ModelNotFoundError(f"{path!r} is a file but not a .gguf file; give a GGUF file or a model folder")
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return Source("lowbit", path)
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    has_st = any(f.endswith(".safetensors") for f in os.listdir(path))
    if os.path.isfile(os.path.join(path, "config.json")) and has_st:
        return Source("hf", path)
    if len(ggufs) == 1 and not has_st:
        return Source("gguf", os.path.join(path, ggufs[0]))
    raise ModelNotFoundError(
        f"{path!r} is not a model folder: expected config.json with *.safetensors (Hugging Face), one .gguf file, "
        f"or an `xpu-llm convert` output ({MANIFEST}). PyTorch .bin checkpoints are not loaded (unsafe pickle): "
        "convert them to safetensors first")


def check_format(low_bit: str | None, group_size: int) -> None:
    """Fail early, with the valid choices, on an unknown format or group size."""
    if low_bit is not None:
        get_format(low_bit)
    if group_size not in GROUP_SIZES:
        raise XpuLLMError(f"group_size {group_size} is not supported; choose one of {GROUP_SIZES}")
