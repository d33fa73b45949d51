"""The Hugging Face side API (IPEX-LLM's one-line form): `AutoModelForCausalLM.from_pretrained(path,
load_in_low_bit=...)` and `optimize_model(model)` give a transformers model whose nn.Linear layers are
LowBitLinear, so HF generate, PEFT, accelerate and LangChain keep working on it.

Choices (what a PEFT / IPEX-LLM user expects):
- An untied lm_head is quantized like every other linear (IPEX-LLM does, and the engine `xpu_llm.LLM` does:
  with a large vocabulary it is the biggest single matrix). Pass `modules_to_not_convert=["lm_head"]` to
  keep it dense, as bitsandbytes / QLoRA do.
- A tied lm_head (`tie_word_embeddings`) stays dense and tied to the input embedding: quantizing it would
  either untie it (a float embedding plus a low-bit head, more memory than the shared matrix) or need a
  low-bit embedding that HF code (resize_token_embeddings, PEFT's embedding handling) does not expect.
- `modules_to_not_convert` entries match whole dotted name parts: "lm_head", "down_proj",
  "mlp.down_proj" or "model.layers.0" (a subtree).
- Layers whose in_features is not a multiple of group_size stay dense, with a warning.
The choice is recorded on `model.config.xpu_llm_low_bit`."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from . import safetensors_io
from .errors import XpuLLMError
from .loading import check_format, quantize_rows, resolve_source
from .lowbit.formats import LowBitFormat, get_format
from .lowbit.linear import LowBitLinear, quantize_linears

log = logging.getLogger(__name__)

__all__ = ["AutoModelForCausalLM", "optimize_model"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------- planning

def _matches(name: str, patterns: list[str]) -> bool:
    """True when one pattern is a run of whole dotted parts of `name` ("lm_head", "mlp.down_proj", ...)."""
    return any(f".{p.strip('.')}." in f".{name}." for p in patterns)


def _tied_head_name(model: nn.Module) -> str | None:
    """Name of the output-embedding linear when it shares its weight with the input embedding, else None."""
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    if get_out is None or get_in is None:
        return None
    out, inp = get_out(), get_in()
    if out is None or inp is None:
        return None
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    tied = getattr(out, "weight", None) is getattr(inp, "weight", 0) or bool(
        getattr(text_cfg, "tie_word_embeddings", False))
    return next((n for n, m in model.named_modules() if m is out), None) if tied else None


def _plan(model: nn.Module, fmt: LowBitFormat, group_size: int,
          modules_to_not_convert: list[str]) -> tuple[list[str], list[str]]:
    """(linears to convert, linears kept dense) by module name."""
    tied = _tied_head_name(model)
    convert, dense = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, NonDynamicallyQuantizableLinear):
            continue
        if name == tied or _matches(name, modules_to_not_convert):
            dense.append(name)
        elif not fmt.dense and mod.in_features % group_size:
            log.warning("%s: in_features %d is not a multiple of group_size %d; kept dense",
                        name, mod.in_features, group_size)
            dense.append(name)
        else:
            convert.append(name)
    return convert, dense


def _record(model: nn.Module, fmt: LowBitFormat, group_size: int, modules_to_not_convert: list[str],
            dense: list[str]) -> None:
    info = {"low_bit": fmt.name, "group_size": group_size, "modules_to_not_convert": list(modules_to_not_convert),
            "kept_dense": dense}
    if getattr(model, "config", None) is not None:
        model.config.xpu_llm_low_bit = info
    log.info("converted to %s (group %d); kept dense: %s", fmt.name, group_size, ", ".join(dense) or "none")


def optimize_model(model: nn.Module, low_bit: str = "sym_int4", group_size: int = 64,
                   modules_to_not_convert: list[str] | None = None) -> nn.Module:
    """Swap every nn.Linear of an (HF) model for a LowBitLinear in place, one layer at a time, and return the
    model; a tied lm_head stays dense and tied (see the module docstring). A dense format casts instead."""
    check_format(low_bit, group_size)
    fmt = get_format(low_bit)
    keep = list(modules_to_not_convert or [])
    convert, dense = _plan(model, fmt, group_size, keep)
    targets = set(convert)
    quantize_linears(model, fmt.name, group_size, skip=lambda name, _lin: name not in targets)
    _record(model, fmt, group_size, keep, dense)
    return model


# ---------------------------------------------------------------------------------------------- loading

def _resolve_dtype(dtype: str | torch.dtype | None, hf_config: Any = None) -> torch.dtype:
    """A torch dtype; "auto" is the checkpoint's own dtype (config.json), float32 when it names none."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        found = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        return found if isinstance(found, torch.dtype) else _DTYPES.get(str(found), torch.float32)
    if dtype not in _DTYPES:
        raise XpuLLMError(f"dtype {dtype!r} is not supported; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _rebuild_rotary(model: nn.Module) -> None:
    """Recompute non-persistent buffers left on meta (RoPE inv_freq): they are not in checkpoints."""
    for name, mod in model.named_modules():
        if not any(b is not None and b.is_meta for b in mod.buffers(recurse=False)):
            continue
        if "RotaryEmbedding" not in type(mod).__name__ or not hasattr(mod, "config"):
            continue
        with torch.device("cpu"):
            fresh = type(mod)(mod.config)
        for bname, buf in fresh.named_buffers(recurse=False):
            mod._buffers[bname] = buf
        log.debug("recomputed the buffers of %s", name)


def _load_tensor(modules: dict[str, nn.Module], name: str, entry: safetensors_io.TensorEntry,
                 fmt: LowBitFormat, group_size: int) -> bool:
    """Read one checkpoint tensor and put it in place (quantized on arrival for a LowBitLinear weight);
    False when the model has no such tensor. The float tensor is dropped on return."""
    mod_name, _, local = name.rpartition(".")
    mod = modules.get(mod_name)
    if mod is None:
        return False
    if isinstance(mod, LowBitLinear) and local == "weight":
        if entry.shape != (mod.out_features, mod.in_features):
            raise XpuLLMError(f"{name}: checkpoint shape {entry.shape} does not match the config's "
                              f"{(mod.out_features, mod.in_features)}; is config.json from this checkpoint?")
        mod.load_state_dict(quantize_rows(fmt.name, safetensors_io.read_tensor(entry), group_size), assign=True,
                                strict=False)
        return True
    target = mod._parameters.get(local, mod._buffers.get(local))
    if target is None:
        return False
    if entry.shape != tuple(target.shape):
        raise XpuLLMError(f"{name}: checkpoint shape {entry.shape} does not match the config's "
                          f"{tuple(target.shape)}; is config.json from this checkpoint?")
    t = safetensors_io.read_tensor(entry)
    mod.load_state_dict({local: t.to(target.dtype) if t.is_floating_point() else t}, assign=True, strict=False)
    return True


def _stream_quantized(folder: str, fmt: LowBitFormat, group_size: int, dtype: str | torch.dtype,
                      trust_remote_code: bool, keep: list[str], kwargs: dict[str, Any]) -> nn.Module:
    """Build the HF model on meta, swap its linears for meta LowBitLinears, then stream the safetensors in,
    quantizing each linear weight on arrival: the float model is never held."""
    import transformers
    from tqdm.auto import tqdm

    model_kwargs = {k: kwargs.pop(k) for k in ("attn_implementation",) if k in kwargs}
    kwargs.pop("local_files_only", None)  # always local
    cfg, unused = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                          local_files_only=True, return_unused_kwargs=True,
                                                          **kwargs)
    if unused:
        log.warning("ignored arguments for a low-bit load: %s", ", ".join(sorted(unused)))
    torch_dtype = _resolve_dtype(dtype, cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype,
                                                              trust_remote_code=trust_remote_code, **model_kwargs)
    convert, dense = _plan(model, fmt, group_size, keep)
    for name in convert:
        lin = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        new = LowBitLinear(lin.in_features, lin.out_features, lin.bias is not None, fmt.name, group_size,
                           device="meta", dtype=lin.bias.dtype if lin.bias is not None else torch_dtype)
        setattr(model.get_submodule(parent) if parent else model, child, new)

    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    index = safetensors_io.checkpoint_index(folder)
    ordered = sorted(index.items(), key=lambda kv: (kv[1].file, kv[1].start))
    unexpected = []
    for name, entry in tqdm(ordered, desc=f"loading {os.path.basename(folder.rstrip('/'))} as {fmt.name}",
                            unit="tensor", leave=False, disable=None):
        if not _load_tensor(modules, name, entry, fmt, group_size) and not (
                prefix and _load_tensor(modules, f"{prefix}.{name}", entry, fmt, group_size)):
            unexpected.append(name)
    if unexpected:
        log.warning("checkpoint tensors with no place in the model (ignored): %s", ", ".join(unexpected[:8]))

    _rebuild_rotary(model)
    if _tied_head_name(model) is not None:
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise XpuLLMError(f"{folder}: the checkpoint has no data for {', '.join(missing[:8])}{more}; "
                          "check that config.json and the *.safetensors files belong together")
    if os.path.isfile(os.path.join(folder, "generation_config.json")):
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder, local_files_only=True)
    _record(model, fmt, group_size, keep, dense)
    return model.eval()


def _stream_gguf_quantized(path: str, fmt: LowBitFormat, group_size: int, dtype: str | torch.dtype,
                           keep: list[str], kwargs: dict[str, Any]) -> nn.Module:
    """A GGUF file straight to an HF model with low-bit linears: the module tree is built on meta from the file's
    metadata and each tensor streams in through gguf_io (native blocks dequantized to float32, then quantized
    to `fmt`). Seconds, where transformers' GGUF loader first dequantizes the whole file (~20 s for SmolLM2)."""
    import transformers
    from tqdm.auto import tqdm

    from .gguf_io import open_gguf

    model_kwargs = {k: kwargs.pop(k) for k in ("attn_implementation",) if k in kwargs}
    for k in ("local_files_only", "gguf_file", "quantization_config"):
        kwargs.pop(k, None)
    if kwargs:
        log.warning("ignored arguments for a low-bit GGUF load: %s", ", ".join(sorted(kwargs)))
    gf = open_gguf(path)
    hf_cfg = {k: v for k, v in gf.hf_config().items() if v is not None}
    cfg = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    torch_dtype = _resolve_dtype(dtype, cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype, **model_kwargs)
    convert, dense = _plan(model, fmt, group_size, keep)
    for name in convert:
        lin = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        new = LowBitLinear(lin.in_features, lin.out_features, lin.bias is not None, fmt.name, group_size,
                           device="meta", dtype=lin.bias.dtype if lin.bias is not None else torch_dtype)
        setattr(model.get_submodule(parent) if parent else model, child, new)
    modules = dict(model.named_modules())
    unexpected = []
    for name, kind, payload in tqdm(gf.tensors(), total=len(gf.tensor_info()), unit="tensor", leave=False,
                                    desc=f"loading {os.path.basename(path)} as {fmt.name}", disable=None):
        weight = payload if kind == "dense" else get_format(kind).dequantize(payload, 32, torch.float32)
        mod_name, _, local = name.rpartition(".")
        mod = modules.get(mod_name)
        if isinstance(mod, LowBitLinear) and local == "weight":
            mod.load_state_dict(quantize_rows(fmt.name, weight, group_size), assign=True, strict=False)
        elif mod is not None and isinstance(mod._parameters.get(local, mod._buffers.get(local)), torch.Tensor):
            target = mod._parameters.get(local, mod._buffers.get(local))
            if tuple(weight.shape) != tuple(target.shape):
                raise XpuLLMError(f"{path}: tensor {name} has shape {tuple(weight.shape)}, the model expects "
                                  f"{tuple(target.shape)}; the GGUF file is inconsistent")
            mod.load_state_dict({local: weight.to(target.dtype)}, assign=True, strict=False)
        else:
            unexpected.append(name)
    if unexpected:
        log.warning("GGUF tensors with no place in the model (ignored): %s", ", ".join(unexpected[:8]))
    _rebuild_rotary(model)
    if _tied_head_name(model) is not None:
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise XpuLLMError(f"{path}: the GGUF file has no data for {', '.join(missing[:8])}")
    _record(model, fmt, group_size, keep, dense)
    return model.eval()


class AutoModelForCausalLM:
    """`transformers.AutoModelForCausalLM` with IPEX-LLM's low-bit loading options; returns an HF model."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None,
                        load_in_low_bit: str | None = None, load_in_4bit: bool = False, group_size: int = 64,
                        dtype: str | torch.dtype = torch.float32, trust_remote_code: bool = False,
                        modules_to_not_convert: list[str] | None = None, **kwargs: Any) -> nn.Module:
        """Load a local HF folder (config.json + safetensors, streamed and quantized tensor by tensor) or a
        .gguf file (low-bit: streamed from the file through gguf_io; dense: transformers' GGUF loader).
        `load_in_4bit=True` means sym_int4; neither option loads dense. `dtype="auto"` is the checkpoint's
        dtype; None as the path is the embedded SmolLM2. Never downloads; the model stays on the CPU
        (move it with `.to(device)`)."""
        dtype = kwargs.pop("torch_dtype", dtype)
        low_bit = load_in_low_bit if load_in_low_bit is not None else ("sym_int4" if load_in_4bit else None)
        if low_bit is not None:
            check_format(low_bit, group_size)
        source = resolve_source(pretrained_model_name_or_path)
        if source.kind == "lowbit":
            raise XpuLLMError(f"{source.path} is an `xpu-llm convert` folder, which only xpu_llm.LLM loads; "
                              "give the original Hugging Face folder or GGUF file here")
        fmt = get_format(low_bit) if low_bit is not None else None
        keep = list(modules_to_not_convert or [])
        if fmt is not None and fmt.dense:  # bf16 / fp16 / fp32: a dense load in that dtype
            dtype, fmt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[fmt.name], None
        if source.kind == "hf" and fmt is not None:
            return _stream_quantized(source.path, fmt, group_size, dtype, trust_remote_code, keep, kwargs)
        if source.kind == "gguf" and fmt is not None:
            return _stream_gguf_quantized(source.path, fmt, group_size, dtype, keep, kwargs)

        import transformers
        kwargs.setdefault("local_files_only", True)
        if source.kind == "gguf":
            folder, name = os.path.split(source.path)
            kwargs["gguf_file"] = name
            if hasattr(transformers, "GgufConfig"):  # newer transformers may keep GGUF blocks packed: unpack
                kwargs.setdefault("quantization_config", transformers.GgufConfig(dequantize=True))
        else:
            folder = source.path
        torch_dtype = dtype if dtype == "auto" else _resolve_dtype(dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype,
                                                                  trust_remote_code=trust_remote_code, **kwargs)
        if fmt is not None:
            optimize_model(model, fmt.name, group_size, keep)
            if not any(isinstance(m, LowBitLinear) for m in model.modules()):
                log.warning("%s: no nn.Linear layer was converted to %s", source.path, fmt.name)
        return model.eval()
