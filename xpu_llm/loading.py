"""Build a model from an HF folder (safetensors), a GGUF file or an xpu-llm low-bit folder: the module
tree is made on the meta device, then tensors stream in one at a time, each quantized on arrival and put
in place with assign=True, so loading to 4-bit never holds the float model."""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .errors import XpuLLMError
from .lowbit.embedding import LowBitEmbedding
from .lowbit.formats import get_format
from .lowbit.linear import LowBitLinear
from .model import Transformer
from .shard_io import Shard, read_columns, slice_columns
from .sources import MANIFEST, Source, check_format, resolve_source  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

# HF tensor name -> (our module path, fused part index or None, parameter name)
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_PARTS = {
    "self_attn.q_proj": ("attention.wqkv", 0), "self_attn.k_proj": ("attention.wqkv", 1),
    "self_attn.v_proj": ("attention.wqkv", 2), "self_attn.o_proj": ("attention.wo", None),
    "mlp.gate_proj": ("feed_forward.w13", 0), "mlp.up_proj": ("feed_forward.w13", 1),
    "mlp.down_proj": ("feed_forward.w2", None),
    "input_layernorm": ("attention_norm", None), "post_attention_layernorm": ("ffn_norm", None),
}
_N_PARTS = {"attention.wqkv": 3, "feed_forward.w13": 2}
_TOP = {"model.embed_tokens.weight": ("tok_embeddings", "weight"), "model.norm.weight": ("norm", "weight"),
        "lm_head.weight": ("output", "weight")}
_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


# ---------------------------------------------------------------------------------------------- placement

def meta_model(cfg: ModelConfig, shard: Shard | None = None) -> Transformer:
    """The module tree on the meta device, with no weight initialisation (it would be thrown away; and on
    meta, `normal_` goes through a path that imports torch._dynamo, ~2.5 s of start-up). With a `shard`, only
    its layers (renumbered from 0), and no embedding / lm_head where the shard has none."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            model = Transformer(cfg)
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved
    if shard is not None:
        model.layers = nn.ModuleList(model.layers[i] for i in shard.layers)
        if not shard.embed:
            model.tok_embeddings = None
        if not shard.head:
            model.output = None
    return model


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _make_linear(weight: Tensor | None, q: dict[str, Tensor] | None, bias: Tensor | None, in_f: int, out_f: int,
                 low_bit: str | None, group_size: int, dtype: torch.dtype, name: str) -> nn.Module:
    """A LowBitLinear from quantized tensors or a float weight, or a dense nn.Linear where the format is dense
    or the input size does not divide the group (logged)."""
    if q is not None:
        return LowBitLinear.from_quantized(q, in_f, out_f, low_bit, group_size, bias=bias)
    assert weight is not None
    if low_bit is None or get_format(low_bit).dense or in_f % group_size:
        if low_bit is not None and not get_format(low_bit).dense:
            log.warning("%s: in_features %d is not a multiple of group %d; kept dense", name, in_f, group_size)
        lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return lin
    q = quantize_rows(low_bit, weight, group_size)
    return LowBitLinear.from_quantized(q, in_f, out_f, low_bit, group_size,
                                       bias=None if bias is None else bias.to(dtype))


def quantize_rows(low_bit: str, weight: Tensor, group_size: int, chunk: int = 4096) -> dict[str, Tensor]:
    """Quantize `chunk` rows at a time (rows are independent, so the result is identical): the temporaries of
    quantizing stay a few MiB instead of several copies of the largest matrix (embeddings, lm_head)."""
    fmt = get_format(low_bit)
    if weight.shape[0] <= chunk:
        return fmt.quantize(weight, group_size)
    parts = [fmt.quantize(weight[r:r + chunk], group_size) for r in range(0, weight.shape[0], chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@dataclass
class Item:
    """One tensor on its way in: float (`weight`) or already low-bit (`q` with its format and group)."""
    weight: Tensor | None = None
    q: dict[str, Tensor] | None = None
    low_bit: str | None = None
    group_size: int = 32

    def rows(self) -> int:
        t = self.weight if self.weight is not None else next(iter(self.q.values()))
        return t.shape[0]

    def to_float(self, dtype: torch.dtype) -> Tensor:
        if self.weight is not None:
            return self.weight.to(dtype)
        return get_format(self.low_bit).dequantize(self.q, self.group_size, dtype)


def _fuse(parts: list[Item], low_bit: str | None, group_size: int, dtype: torch.dtype,
          keep_native: bool) -> tuple[Tensor | None, dict[str, Tensor] | None, str | None, int]:
    """Concatenate the row blocks of a fused linear (q|k|v, gate|up). Native low-bit parts of one format
    are concatenated as they are (rows are independent): no second rounding."""
    natives = {(p.low_bit, p.group_size) for p in parts if p.q is not None}
    if keep_native and len(natives) == 1 and all(p.q is not None for p in parts):
        fmt, g = natives.pop()
        names = parts[0].q.keys()
        return None, {k: torch.cat([p.q[k] for p in parts]) for k in names}, fmt, g
    return torch.cat([p.to_float(torch.float32) for p in parts]), None, low_bit, group_size


class Loader:
    """Streams (hf_name, Item) pairs into a meta-built Transformer."""

    def __init__(self, cfg: ModelConfig, low_bit: str | None, group_size: int, dtype: torch.dtype,
                 device: torch.device, keep_native: bool, shard: Shard | None = None,
                 prepare: Callable[[Transformer], None] | None = None, tied: bool | None = None) -> None:
        self.shard = shard if shard is not None else Shard(range(cfg.n_layers))
        self.model = meta_model(cfg, shard)
        if prepare is not None:  # e.g. tensor parallel: local head counts and slice sizes on the meta modules
            prepare(self.model)
        self.cfg, self.low_bit, self.group_size, self.dtype, self.device = cfg, low_bit, group_size, dtype, device
        self.keep_native = keep_native
        self.pending: dict[str, dict[str, dict[int, Item]]] = {}
        self.embed: Item | None = None
        self.head: Item | None = None
        self.done: set[str] = set()
        # Known tied (the checkpoint has no separate lm_head): the head is made from the embedding as soon as it
        # arrives, so its float copy (often the largest tensor) is not held while every other tensor streams in.
        self.tied_early = bool(tied) and (self.shard.head or self.shard.embed)
        self.tied_head: nn.Module | None = None

    def add(self, hf_name: str, item: Item) -> None:
        if item.weight is not None:
            item.weight = item.weight.to(self.device)
        if item.q is not None:
            item.q = {k: v.to(self.device) for k, v in item.q.items()}
        if hf_name in _TOP:
            path, _ = _TOP[hf_name]
            if path == "tok_embeddings":
                self.embed = item
                if self.tied_early:
                    self.tied_head = self._head(item)
                    item.weight = None  # released: the head (and a tied embedding) read the quantized rows
            elif path == "output":
                self.head = item
            else:
                self._put_param(path, "weight", item.to_float(self.dtype))
            return
        m = _LAYER.match(hf_name)
        if m is None or m.group(2) not in _LAYER_PARTS:
            if "rotary_emb" not in hf_name:
                log.debug("ignoring tensor %s", hf_name)
            return
        i, part, pname = m.groups()
        if int(i) not in self.shard.layers:
            return
        path, idx = _LAYER_PARTS[part]
        full = f"layers.{int(i) - self.shard.layers.start}.{path}"
        if path not in _LINEARS:
            self._put_param(full, "weight", item.to_float(self.dtype))
            return
        slot = self.pending.setdefault(full, {}).setdefault(pname, {})
        slot[idx or 0] = item
        self._maybe_finish(full)

    def _put_param(self, path: str, pname: str, t: Tensor) -> None:
        mod = self.model.get_submodule(path)
        setattr(mod, pname, nn.Parameter(t, requires_grad=False))
        self.done.add(f"{path}.{pname}")

    def _maybe_finish(self, full: str) -> None:
        sub = full.split(".", 2)[2]
        n = _N_PARTS.get(sub, 1)
        got = self.pending[full]
        want_bias = {"attention.wqkv": self.cfg.attention_bias, "attention.wo": self.cfg.o_bias}.get(sub, self.cfg.mlp_bias)
        if len(got.get("weight", {})) < n or (want_bias and len(got.get("bias", {})) < n):
            return
        parts = [got["weight"][j] for j in range(n)]
        bias = torch.cat([got["bias"][j].to_float(self.dtype) for j in range(n)]) if want_bias else None
        weight, q, fmt, g = _fuse(parts, self.low_bit, self.group_size, self.dtype, self.keep_native)
        if q is None:
            fmt, g = self.low_bit, self.group_size
        out_f = sum(p.rows() for p in parts)
        in_f = self.model.get_submodule(full).in_features
        _set_module(self.model, full, _make_linear(weight, q, bias, in_f, out_f, fmt, g, self.dtype, full))
        self._record_grid(full, parts)
        del self.pending[full]
        self.done.add(full)

    def finish(self) -> Transformer:
        """Place embedding and head (tied or not) and check that every tensor arrived."""
        cfg, shard = self.cfg, self.shard
        tied = cfg.tie_word_embeddings or (self.head is None and shard.head)
        if self.embed is None and (shard.embed or (shard.head and tied)):
            raise XpuLLMError("the checkpoint has no token embedding (model.embed_tokens.weight)")
        head = None
        if self.tied_head is not None:
            head = self.tied_head
        elif shard.head or (shard.embed and tied):
            head = self._head(self.embed if tied else self.head)
        if shard.head:
            self.model.output = head
            self._record_grid("output", [self.embed if tied else self.head])
        if shard.embed:
            self._place_embedding(head if tied else None)
        missing = [n for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers())
                   if t.is_meta]
        if missing or self.pending:
            raise XpuLLMError(f"the checkpoint is incomplete: no data for {(missing + list(self.pending))[:6]} ...")
        return self.model

    def _record_grid(self, path: str, parts: list[Item]) -> None:
        """Note in Transformer.source_grid the (format, group) of the blocks every part of linear `path` was read in,
        whatever format the layer is made in; nothing for a fused q|k|v or gate|up whose parts differ or are float."""
        grids = {(p.low_bit, p.group_size) if p.q is not None else None for p in parts}
        if len(grids) == 1 and None not in grids:
            self.model.source_grid[path] = grids.pop()

    def _head(self, item: Item) -> nn.Module:
        """The lm_head (also what a tied embedding reads its rows from) from its item, this rank's rows."""
        use_q = item.q is not None and self.keep_native
        weight = None if use_q else item.to_float(torch.float32)
        fmt, g = (item.low_bit, item.group_size) if use_q else (self.low_bit, self.group_size)
        return _make_linear(weight, item.q if use_q else None, None, self.cfg.dim, item.rows(), fmt, g,
                            self.dtype, "output")

    def _place_embedding(self, tied_head: nn.Module | None) -> None:
        """Tied: the head's rows (quantized or not), tied to it when the head lives here too (a pipeline's first
        stage without the head keeps its own copy of the same values)."""
        if isinstance(tied_head, LowBitLinear):
            if self.model.output is tied_head:
                self.model.tok_embeddings = LowBitEmbedding(tied_head.low_bit, tied_head.group_size, self.dtype,
                                                            tied_to=tied_head)
            else:
                self.model.tok_embeddings = LowBitEmbedding(tied_head.low_bit, tied_head.group_size, self.dtype,
                                                            tensors=tied_head.tensors())
        elif tied_head is not None:
            self._set_embedding(tied_head.weight)
        elif self.embed.q is not None and self.keep_native:
            self.model.tok_embeddings = LowBitEmbedding(self.embed.low_bit, self.embed.group_size, self.dtype,
                                                        tensors=self.embed.q)
        else:
            self._set_embedding(nn.Parameter(self.embed.to_float(self.dtype), requires_grad=False))

    def _set_embedding(self, weight: nn.Parameter) -> None:
        emb = self.model.tok_embeddings
        emb.weight = weight
        emb.num_embeddings = weight.shape[0]


# ---------------------------------------------------------------------------------------------- sources

def _hf_items(folder: str, shard: Shard, tied: bool) -> Iterator[tuple[str, Item]]:
    from .safetensors_io import checkpoint_index, read_tensor
    for name, entry in sorted(checkpoint_index(folder).items(), key=lambda kv: (kv[1].file, kv[1].start)):
        if not shard.wants(name, tied):
            continue
        sl = shard.slice(name)
        if sl is None:
            t = read_tensor(entry)
        elif sl.dim == 0:
            t = read_tensor(entry, rows=(sl.start, sl.stop))
        else:
            t = read_columns(entry, sl.start, sl.stop)
        yield name, Item(weight=t)


def _gguf_items(gf: Any, shard: Shard, tied: bool) -> Iterator[tuple[str, Item]]:
    for name, _, shape in gf.tensor_info():
        if not shard.wants(name, tied):
            continue
        sl = shard.slice(name)
        if sl is None:
            kind, payload = gf.tensor(name)
        elif sl.dim == 0:
            kind, payload = gf.rows(name, sl.start, sl.stop)
        else:  # GGUF stores whole rows of blocks: read the rows, keep the columns (one tensor at a time)
            kind, payload = gf.tensor(name)
            payload = (payload[:, sl.start:sl.stop].contiguous() if kind == "dense"
                       else slice_columns(payload, shape[1], sl.start, sl.stop))
        if kind == "dense":
            yield name, Item(weight=payload)
        else:
            yield name, Item(q=payload, low_bit=kind, group_size=32)


@dataclass
class Opened:
    """A checkpoint's config and the format it will load in, known before any tensor is read."""
    source: Source
    config: ModelConfig
    low_bit: str | None      # None: dense in `dtype`
    keep_native: bool        # GGUF blocks copied as they are
    dtype: torch.dtype | None  # set by a dense 16/32-bit format
    tied: bool               # the lm_head is the embedding
    names: list[str]

    def cut_unit(self, group_size: int) -> int:
        """Granularity of input-feature cuts that keep quantization groups whole (1 for dense weights)."""
        if self.low_bit is None:
            return 1
        return max(32, group_size) if self.keep_native else group_size  # GGUF blocks are 32 wide


def open_checkpoint(source: Source, low_bit: str | None | object, group_size: int) -> Opened:
    """Read the config and tensor names of an HF folder or GGUF file and resolve the format ('auto', dense)."""
    if source.kind == "gguf":
        from .gguf_io import open_gguf
        gf = open_gguf(source.path)
        cfg = ModelConfig.from_hf(gf.hf_config())
        native = gf.file_type_name()
        fmt = (native or "sym_int4") if low_bit == "auto" else low_bit
        keep_native = fmt == native
        names = [n for n, _, _ in gf.tensor_info()]
    elif source.kind == "hf":
        cfg = ModelConfig.from_json_file(os.path.join(source.path, "config.json"))
        fmt = "sym_int4" if low_bit == "auto" else low_bit
        keep_native = False
        from .safetensors_io import checkpoint_index
        names = list(checkpoint_index(source.path))
    else:
        raise XpuLLMError(f"{source.path} is an xpu-llm low-bit folder, which loads whole; for tensor or pipeline "
                          "parallel runs give the original Hugging Face folder or GGUF file")
    check_format(fmt, group_size)
    dtype = None
    if fmt is not None and get_format(fmt).dense:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[fmt]
        fmt = None
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in names
    return Opened(source, cfg, fmt, keep_native, dtype, tied, names)


@functools.cache
def _return_large_frees_to_os() -> None:
    """glibc raises its mmap threshold after each large free, so later tensors land on the heap, whose freed
    holes are never returned: loading many float tensors one at a time then leaves hundreds of MiB resident
    (measured: +220 MiB over a 68 MiB 4-bit SmolLM2). A fixed threshold keeps each tensor an mmap of its own."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass  # not glibc


def load_model(source: Source, low_bit: str | None | object, group_size: int, dtype: torch.dtype,
               device: torch.device, progress: bool = True, shard: Shard | None = None,
               prepare: Callable[[Transformer], None] | None = None) -> tuple[Transformer, dict[str, Any]]:
    """The model and a dict of facts about the load (format used, config source). With a `shard` (tensor /
    pipeline parallel), only that part: its layers, its slices, each quantized after slicing; `prepare` reshapes
    the meta model to the shard's sizes before the tensors stream in."""
    from tqdm.auto import tqdm

    if source.kind == "lowbit" and shard is None:
        from .lowbit_folder import load_low_bit
        return load_low_bit(source.path, dtype, device, progress)
    op = open_checkpoint(source, low_bit, group_size)
    cfg, fmt, dtype = op.config, op.low_bit, op.dtype or dtype
    part = shard if shard is not None else Shard(range(cfg.n_layers))
    if source.kind == "gguf":
        from .gguf_io import open_gguf
        items = _gguf_items(open_gguf(source.path), part, op.tied)
    else:
        items = _hf_items(source.path, part, op.tied)
    total = sum(part.wants(n, op.tied) for n in op.names)
    loader = Loader(cfg, fmt, group_size, dtype, device, op.keep_native, shard, prepare, tied=op.tied)
    _return_large_frees_to_os()
    desc = f"loading {os.path.basename(source.path.rstrip('/'))}" + (f" as {fmt}" if fmt else "")
    for name, item in tqdm(items, total=total, desc=desc, unit="tensor", disable=not progress, leave=False):
        loader.add(name, item)
    model = loader.finish()
    return model, {"low_bit": fmt, "group_size": group_size, "config": cfg, "source": source, "dtype": dtype}
