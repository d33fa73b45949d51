"""Tensor parallelism applied from outside the model (as gpt-fast does): q/k/v and gate/up are split by output
rows (column-parallel), o and down by input columns (row-parallel, then one all-reduce), KV heads are replicated
when tp exceeds their count, and the embedding and lm_head are split by vocabulary rows. Cuts of input columns
fall on quantization-group boundaries, so a rank's low-bit blocks are exactly the single-card ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import XpuLLMError
from ..lowbit.embedding import LowBitEmbedding
from ..lowbit.linear import LowBitLinear
from ..model import Transformer
from ..shard_io import Slice, slice_columns, slice_rows

_ROW_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


def split(n: int, parts: int, i: int) -> tuple[int, int]:
    """Part i of [0, n) cut into `parts` near-equal contiguous pieces (the first ones one larger)."""
    base, extra = divmod(n, parts)
    start = i * base + min(i, extra)
    return start, start + base + (i < extra)


def tp_problem(cfg: ModelConfig, tp: int, unit: int = 1) -> str | None:
    """Why `tp` ranks cannot split this model (None if they can). `unit`: the quantization group that input-
    column cuts must respect (1 for dense weights)."""
    h, kv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if tp < 1:
        return f"tp must be at least 1, got {tp}"
    if h % tp:
        return f"{tp} does not divide the {h} attention heads"
    if kv % tp and tp % kv:
        return f"{tp} neither divides the {kv} KV heads nor is a multiple of them"
    if (h // tp * hd) % unit:
        return f"each rank's {h // tp * hd} attention columns are not a multiple of the quantization group {unit}"
    if cfg.intermediate_size // unit < tp:
        return f"the {cfg.intermediate_size} MLP features are fewer than {tp} groups of {unit}"
    return None


def valid_tp_sizes(cfg: ModelConfig, unit: int = 1) -> list[int]:
    """Every tensor-parallel size that splits this model."""
    return [t for t in range(1, cfg.n_heads + 1) if tp_problem(cfg, t, unit) is None]


def check_tp(cfg: ModelConfig, tp: int, unit: int = 1) -> None:
    """Fail with the valid sizes when `tp` does not split the model."""
    why = tp_problem(cfg, tp, unit)
    if why is not None:
        sizes = ", ".join(map(str, valid_tp_sizes(cfg, unit)))
        raise XpuLLMError(f"tensor-parallel size tp={tp} does not fit this model ({cfg.n_heads} heads, "
                          f"{cfg.n_kv_heads} KV heads): {why}. Valid tensor-parallel sizes: {sizes}")


@dataclass(frozen=True)
class TPLayout:
    """What rank `rank` of `tp` holds: query heads, KV heads, MLP features and vocabulary rows, each [a, b)."""
    tp: int
    rank: int
    head_dim: int
    n_heads: int
    n_kv_heads: int
    intermediate: int
    vocab_size: int
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]
    vocab: tuple[int, int]
    vocab_parallel: bool = True

    @classmethod
    def build(cls, cfg: ModelConfig, tp: int, rank: int, unit: int = 1, vocab_parallel: bool = True) -> "TPLayout":
        check_tp(cfg, tp, unit)
        h, kv = cfg.n_heads, cfg.n_kv_heads
        heads = split(h, tp, rank)
        kv_heads = split(kv, tp, rank) if kv % tp == 0 else (rank // (tp // kv), rank // (tp // kv) + 1)
        units = cfg.intermediate_size // unit
        a, b = split(units, tp, rank)
        ffn = (a * unit, cfg.intermediate_size if rank == tp - 1 else b * unit)
        per = -(-cfg.vocab_size // tp)
        vocab = (min(rank * per, cfg.vocab_size), min((rank + 1) * per, cfg.vocab_size)) if vocab_parallel \
            else (0, cfg.vocab_size)
        return cls(tp, rank, cfg.head_dim, h, kv, cfg.intermediate_size, cfg.vocab_size, heads, kv_heads, ffn,
                   vocab, vocab_parallel)

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.vocab_size // self.tp)

    def qkv_rows(self) -> list[tuple[int, int]]:
        """Rows of the fused [q | k | v] weight this rank keeps."""
        hd, h, kv = self.head_dim, self.n_heads, self.n_kv_heads
        (h0, h1), (k0, k1) = self.heads, self.kv_heads
        return [(h0 * hd, h1 * hd), ((h + k0) * hd, (h + k1) * hd), ((h + kv + k0) * hd, (h + kv + k1) * hd)]

    def slice_of(self, hf_name: str) -> Slice | None:
        """The slice of a checkpoint tensor (HF name) this rank reads; None: all of it."""
        if self.tp == 1:
            return None
        hd = self.head_dim
        if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
            return Slice(0, *self.vocab) if self.vocab_parallel else None
        part = hf_name.rsplit(".", 1)[0].split(".", 3)[-1]  # model.layers.7.self_attn.q_proj -> self_attn.q_proj
        if part == "self_attn.q_proj":
            return Slice(0, self.heads[0] * hd, self.heads[1] * hd)
        if part in ("self_attn.k_proj", "self_attn.v_proj"):
            return Slice(0, self.kv_heads[0] * hd, self.kv_heads[1] * hd)
        if part in ("mlp.gate_proj", "mlp.up_proj"):
            return Slice(0, *self.ffn)
        if hf_name.endswith("self_attn.o_proj.weight"):
            return Slice(1, self.heads[0] * hd, self.heads[1] * hd)
        if hf_name.endswith("mlp.down_proj.weight"):
            return Slice(1, *self.ffn)
        return None  # norms, o / down biases (added once, on tp rank 0)


# ---------------------------------------------------------------------------------------------- module surgery

def take_rows(lin: nn.Module, ranges: list[tuple[int, int]]) -> nn.Module:
    """A linear with only the output rows in `ranges` (nn.Linear, on meta or not, or LowBitLinear)."""
    n = sum(b - a for a, b in ranges)
    bias = None if lin.bias is None else _rows(lin.bias, ranges)
    if isinstance(lin, LowBitLinear):
        return LowBitLinear.from_quantized(slice_rows(lin.tensors(), ranges), lin.in_features, n, lin.low_bit,
                                           lin.group_size, bias=bias)
    return _linear(_rows(lin.weight, ranges), bias)


def _rows(t: Tensor, ranges: list[tuple[int, int]]) -> Tensor:
    if t.is_meta:  # a new meta tensor: torch.cat on meta pulls in ~150 MB of decomposition modules
        return torch.empty((sum(b - a for a, b in ranges), *t.shape[1:]), dtype=t.dtype, device="meta")
    return torch.cat([t[a:b] for a, b in ranges])


def take_cols(lin: nn.Module, start: int, stop: int) -> nn.Module:
    """A linear with only the input columns [start, stop) (the bias kept whole)."""
    if isinstance(lin, LowBitLinear):
        return LowBitLinear.from_quantized(slice_columns(lin.tensors(), lin.in_features, start, stop),
                                           stop - start, lin.out_features, lin.low_bit, lin.group_size,
                                           bias=lin.bias)
    return _linear(lin.weight[:, start:stop], lin.bias)


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return lin


def shard_modules(model: Transformer, layout: TPLayout) -> Transformer:
    """Cut every layer (and the vocabulary) down to this rank's part, in place; works on the meta model the
    loader fills and on a loaded one alike. Attention and MLP get their local head / feature counts."""
    if layout.tp == 1:
        return model
    hd = layout.head_dim
    for layer in model.layers:
        attn, ff = layer.attention, layer.feed_forward
        assert (attn.n_heads, attn.n_kv_heads) == (layout.n_heads, layout.n_kv_heads), "layer already sharded"
        attn.wqkv = take_rows(attn.wqkv, layout.qkv_rows())
        attn.wo = take_cols(attn.wo, layout.heads[0] * hd, layout.heads[1] * hd)
        attn.n_heads = layout.heads[1] - layout.heads[0]
        attn.n_kv_heads = layout.kv_heads[1] - layout.kv_heads[0]
        f0, f1 = layout.ffn
        ff.w13 = take_rows(ff.w13, [(f0, f1), (ff.hidden + f0, ff.hidden + f1)])
        ff.w2 = take_cols(ff.w2, f0, f1)
        ff.hidden = f1 - f0
    if layout.vocab_parallel:
        _shard_vocab(model, layout.vocab)
    return model


def _shard_vocab(model: Transformer, vocab: tuple[int, int]) -> None:
    emb, head = model.tok_embeddings, model.output
    tied_lowbit = isinstance(emb, LowBitEmbedding) and emb.tied
    tied_dense = isinstance(emb, nn.Embedding) and head is not None and head.weight is emb.weight
    if head is not None:
        model.output = take_rows(head, [vocab])
    if emb is None:
        return
    if tied_lowbit:
        model.tok_embeddings = LowBitEmbedding(emb.low_bit, emb.group_size, emb.dtype, tied_to=model.output)
    elif isinstance(emb, LowBitEmbedding):
        tensors = slice_rows({k: getattr(emb, k) for k in emb.fmt.tensor_names}, [vocab])
        model.tok_embeddings = LowBitEmbedding(emb.low_bit, emb.group_size, emb.dtype, tensors=tensors)
    else:
        emb.weight = model.output.weight if tied_dense else nn.Parameter(
            emb.weight[vocab[0]:vocab[1]].contiguous(), requires_grad=False)
        emb.num_embeddings = vocab[1] - vocab[0]


# ---------------------------------------------------------------------------------------------- communication

class VocabParallelEmbedding(nn.Module):
    """Lookup in this rank's vocabulary rows; other ids give zeros; one all-reduce sums the ranks (exactly one
    rank contributes each row, so the result equals the unsplit lookup)."""

    def __init__(self, inner: nn.Module, start: int, stop: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.inner, self.start, self.stop, self.group = inner, start, stop, group

    def forward(self, ids: Tensor) -> Tensor:
        mine = (ids >= self.start) & (ids < self.stop)
        y = self.inner(torch.where(mine, ids - self.start, torch.zeros_like(ids)))
        y = torch.where(mine.unsqueeze(-1), y, torch.zeros((), dtype=y.dtype, device=y.device))
        dist.all_reduce(y, group=self.group)
        return y


class RowParallelLinear(nn.Module):
    """A row-parallel linear (o, down): this rank's input columns, then the sum over the ranks (one all-reduce).
    A module rather than a forward hook, so that fast paths which call a linear's kernel directly (cpu_decode)
    still go through the collective: they see a module that is not a LowBitLinear and call it."""

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.inner, self.group = inner, group
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x)
        dist.all_reduce(y, group=self.group)
        return y


class VocabParallelHead(nn.Module):
    """The lm_head over this rank's vocabulary rows, then an all-gather of the logits (padded to a common width
    on the last ranks of an uneven split, trimmed after)."""

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup | None, tp: int, per_rank: int,
                 vocab_size: int) -> None:
        super().__init__()
        self.inner, self.group, self.tp, self.per_rank, self.vocab_size = inner, group, tp, per_rank, vocab_size
        self.in_features, self.out_features = inner.in_features, vocab_size

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        if out.shape[-1] < self.per_rank:
            out = torch.nn.functional.pad(out, (0, self.per_rank - out.shape[-1]))
        parts = [torch.empty_like(out) for _ in range(self.tp)]
        dist.all_gather(parts, out.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]


def install_comm(model: Transformer, layout: TPLayout, group: dist.ProcessGroup | None) -> Transformer:
    """Add the collectives to a sharded model: all-reduce after o and down (their biases kept on rank 0 only),
    vocab-parallel embedding, all-gather of the lm_head's logits."""
    if layout.tp == 1:
        return model
    for layer in model.layers:
        attn, ff = layer.attention, layer.feed_forward
        for lin in (attn.wo, ff.w2):
            if layout.rank != 0 and lin.bias is not None:
                lin.bias = None
        attn.wo, ff.w2 = RowParallelLinear(attn.wo, group), RowParallelLinear(ff.w2, group)
    if layout.vocab_parallel:
        if model.tok_embeddings is not None:
            model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, *layout.vocab, group)
        if model.output is not None:
            model.output = VocabParallelHead(model.output, group, layout.tp, layout.vocab_per_rank,
                                             layout.vocab_size)
    model.tp_layout = layout
    return model


def apply_tp(model: Transformer, group: dist.ProcessGroup | None = None, vocab_parallel: bool = True) -> Transformer:
    """Shard a loaded single-card model over the ranks of `group` (default: the world) in place and add the
    collectives. Every rank must hold the same model. (LLM(tp=...) instead reads only each rank's slices.)"""
    tp = dist.get_world_size(group)
    rank = dist.get_rank(group)
    unit = max([m.group_size for m in model.modules() if isinstance(m, LowBitLinear)], default=1)
    layout = TPLayout.build(model.config, tp, rank, unit, vocab_parallel)
    shard_modules(model, layout)
    return install_comm(model, layout, group)
