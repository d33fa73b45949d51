"""Drafts for self-speculative decoding (speculative.py verifies what they propose):

- `LowBitDraft`   ("lowbit"): the target's linears re-quantized to 4 bits, with its own KV cache. By default
  ("auto") a layer read from GGUF Q4_0 / Q4_1 blocks goes back into that grid (sym_int4 / asym_int4, group 32),
  which reproduces a dequantized target's weights exactly (more drafts accepted); the others go to sym_int4;
- `LayerSkipDraft` ("layer_skip"): the target itself running a subset of its layers; no second copy of the
  weights, and no second KV cache either (it writes draft keys/values into the target's cache at the slots the
  verification pass overwrites next);
- `LookupDraft`   ("lookup"): continuations of n-gram matches in the prompt and the text so far (no model).

A draft proposes up to k tokens per row; a model draft stops early once its top probability falls under the
threshold (speculative.py adapts it). Everything is per row: rows sit at different cache slots."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .errors import XpuLLMError
from .generate import Batch, SamplingParams, sampling_probs
from .graphs import graphed_forward
from .model import Transformer

log = logging.getLogger(__name__)

DRAFT_KINDS = ("lowbit", "layer_skip", "lookup")


@dataclass
class DecodeState:
    """Where each row of the batch stands between verification passes.

    Slots [0, pos) of the target's cache hold committed tokens; `pending` (sampled, not yet in the cache) goes at
    slot `pos`; `prev` is the token at slot pos - 1. `hist` is each row's prompt (unpadded) plus its output."""
    pending: Tensor  # [B] long
    prev: Tensor  # [B] long
    pos: Tensor  # [B] long
    pad: Tensor | None  # [B] left padding, or None
    live: Tensor  # [B] bool: rows still generating
    hist: list[list[int]]
    max_seq_len: int
    # The same as host lists, so that a round reads them without waiting for the device.
    pending_host: list[int] = field(default_factory=list)
    prev_host: list[int] = field(default_factory=list)
    pos_host: list[int] = field(default_factory=list)
    live_host: list[bool] = field(default_factory=list)

    def live_max_pos(self) -> int:
        """The largest slot among live rows (attention spans up to it)."""
        return max((p for p, alive in zip(self.pos_host, self.live_host) if alive), default=max(self.pos_host))


def slots_arg(slots: Tensor) -> Tensor:
    """Cache slots [B, T] as the model takes them: one row's slots as [T] (the shared-slot path, which fast
    single-token kernels handle), else per row."""
    return slots.view(-1) if slots.shape[0] == 1 else slots


@dataclass
class Proposal:
    """Draft tokens [B, k] (row r proposes its first counts[r]; the rest is filler), the draft distributions
    q [B, k, V] they were sampled from (None: deterministic drafts, q one-hot at the token; and greedy), and
    the number of draft model forwards spent."""
    tokens: Tensor
    counts: Tensor
    q: Tensor | None = None
    steps: int = 0


class ModelDraft:
    """A draft that runs a model: k forwards of one position (the first may catch up a second), each proposing
    the argmax (greedy) or a sample of the draft distribution q (sampling)."""

    kind = "model"

    def prepare(self, batch: Batch, max_seq_len: int) -> None:
        """Called once per generate call, after the target's prefill."""

    def first_input(self, st: DecodeState) -> tuple[Tensor, Tensor]:
        """Tokens and slots [B, T] of the first draft forward of a round."""
        return st.pending.view(-1, 1), st.pos.view(-1, 1)

    def forward(self, tokens: Tensor, input_pos: Tensor, pad: Tensor | None, kv_len: int) -> Tensor:
        """Logits [B, V] of the last of `tokens` [B, T] at slots `input_pos` [B, T]."""
        raise NotImplementedError

    @torch.inference_mode()
    def propose(self, st: DecodeState, k: int, params: SamplingParams, gen: torch.Generator | None,
                threshold: float, k_min: int) -> Proposal:
        """Up to k drafts per row; row r stops after the first draft whose top probability is under `threshold`
        (never before k_min drafts); the batch stops when every live row has stopped."""
        b = st.pending.shape[0]
        last = st.max_seq_len - 1
        tokens, input_pos = self.first_input(st)
        drafting = st.live.clone()
        counts = torch.zeros(b, dtype=torch.long, device=st.pos.device)
        out: list[Tensor] = []
        qs: list[Tensor] = []
        base = st.live_max_pos()
        for j in range(k):
            logits = self.forward(tokens, slots_arg(input_pos.clamp(max=last)), st.pad, min(base + j + 1, last + 1))
            if params.temperature == 0:
                conf, d = logits.float().softmax(-1).max(-1)
            else:
                q = sampling_probs(logits, params)
                d = torch.multinomial(q, 1, generator=gen).squeeze(-1)
                conf = q.max(-1).values
                qs.append(q)
            out.append(d)
            counts += drafting
            drafting &= ~((conf < threshold) & (j + 1 >= k_min))
            if j + 1 == k or not bool(drafting.any()):
                break
            tokens, input_pos = d.view(-1, 1), (st.pos + j + 1).view(-1, 1)
        return Proposal(torch.stack(out, 1), counts, torch.stack(qs, 1) if qs else None, steps=len(out))


class LayerSkipDraft(ModelDraft):
    """The target running only `layers` (indices into model.layers) over the target's own KV cache.

    The skipped layers' cache slots are left alone; the kept layers get draft keys/values at slots pos.. that
    the target's verification pass (which writes slots pos..pos+k in every layer) overwrites. Earlier slots hold
    the target's own keys/values, so each draft step attends to the exact target context."""

    kind = "layer_skip"

    def __init__(self, model: Transformer, layers: Sequence[int]) -> None:
        n = len(model.layers)
        layers = sorted(set(int(i) for i in layers))
        if not layers or layers[0] < 0 or layers[-1] >= n:
            raise XpuLLMError(f"layer_skip layers must be a non-empty subset of 0..{n - 1}, got {layers}")
        if len(layers) == n:
            log.warning("layer_skip keeps all %d layers: the draft costs as much as the target", n)
        self.model, self.layers = model, tuple(layers)

    def forward(self, tokens: Tensor, input_pos: Tensor, pad: Tensor | None, kv_len: int) -> Tensor:
        return graphed_forward(self.model, tokens, input_pos, pad, kv_len, True, self.layers)[:, -1]


class LowBitDraft(ModelDraft):
    """A second copy of the target with its linear layers in a 4-bit format and its own KV cache; embeddings and
    norms are shared with the target, linears already in a ≤ 4-bit format too."""

    kind = "lowbit"

    def __init__(self, model: Transformer, low_bit: str = "auto", group_size: int = 64,
                 kernel_dtype: torch.dtype | None = None) -> None:
        self.target = model
        self.model, share = lowbit_copy(model, low_bit, group_size, kernel_dtype)
        if share < 0.5:
            raise XpuLLMError(
                f"the target's linear layers are already in a format of at most 4 bits (all but {share:.0%} of "
                f"their weights), so a lowbit draft ({low_bit}) would cost about as much as the target; use "
                "speculative='layer_skip' or 'lookup' instead, or load the target in a wider format "
                "(low_bit=None, 'bf16', 'sym_int8', 'fp8_e4m3')")

    def prepare(self, batch: Batch, max_seq_len: int) -> None:
        """Allocate the draft's cache like the target's and prefill the prompts into it."""
        t = self.target
        dtype = t.layers[0].attention.kv_cache.dtype
        self.model.setup_caches(max(t.max_batch_size, batch.tokens.shape[0]), max_seq_len, dtype=dtype,
                                device=t.norm.weight.device)
        with torch.inference_mode():
            n = batch.tokens.shape[1]
            self.model(batch.tokens, torch.arange(n, device=batch.tokens.device), pad=batch.pad, kv_len=n,
                       last_only=True)
        # What the draft's own cache holds past the committed context: tokens [B, m] at slots start.. [B].
        self._written = (torch.full_like(batch.tokens[:, 0], n - 1), batch.tokens[:, -1:])

    def first_input(self, st: DecodeState) -> tuple[Tensor, Tensor]:
        # The draft's cache lacks slot pos - 1 when the last round accepted every draft (the draft never ran on
        # its own last proposal) or the token there is the target's correction: then recompute that slot in the
        # same forward. Otherwise one position, which the CPU runs through its fused one-token step.
        start, toks = self._written
        i = (st.pos - 1 - start).view(-1, 1)
        inside = (i >= 0) & (i < toks.shape[1])
        held = inside.squeeze(1) & (toks.gather(1, i.clamp(0, toks.shape[1] - 1)).squeeze(1) == st.prev)
        if bool((held | ~st.live).all()):
            return st.pending.view(-1, 1), st.pos.view(-1, 1)
        return torch.stack([st.prev, st.pending], 1), torch.stack([st.pos - 1, st.pos], 1)

    def propose(self, st: DecodeState, k: int, params: SamplingParams, gen: torch.Generator | None,
                threshold: float, k_min: int) -> Proposal:
        prop = super().propose(st, k, params, gen, threshold, k_min)
        # The draft ran on pending (slot pos) and on every draft but the last (slots pos + 1 ..).
        self._written = (st.pos.clone(), torch.cat([st.pending.view(-1, 1), prop.tokens[:, :-1]], 1))
        return prop

    def forward(self, tokens: Tensor, input_pos: Tensor, pad: Tensor | None, kv_len: int) -> Tensor:
        return graphed_forward(self.model, tokens, input_pos, pad, kv_len, True)[:, -1]


def draft_format(low_bit: str) -> str:
    """`low_bit` as the lowbit draft takes it (normalised): "auto" or a registry format of at most 4 bits."""
    from .lowbit.formats import FORMATS

    name = str(low_bit).strip().lower()
    if name == "auto":
        return name
    four_bit = [n for n, f in FORMATS.items() if not f.dense and f.bits <= 4]
    if name not in four_bit:
        raise XpuLLMError(f"the lowbit draft needs low_bit='auto' or a 4-bit format ({', '.join(four_bit)}), "
                          f"got {low_bit!r}")
    return name


def draft_grid(model: Transformer, name: str, low_bit: str, group_size: int,
               in_features: int) -> tuple[str, int | None, bool]:
    """(format, group, exact) of the draft's copy of linear `name`. "auto": the 4-bit grid its weight was read in
    (model.source_grid), which should give the weight back exactly, else sym_int4. Other groups are `group_size`,
    else 64 or 32 where it does not divide in_features (None: neither does)."""
    from .lowbit.exact import EXACT_FORMATS

    if low_bit == "auto":
        fmt, g = getattr(model, "source_grid", {}).get(name, (None, 0))
        if fmt in EXACT_FORMATS and in_features % g == 0:
            return fmt, g, True
        low_bit = "sym_int4"
    return low_bit, next((s for s in (group_size, 64, 32) if in_features % s == 0), None), False


def lowbit_copy(model: Transformer, low_bit: str, group_size: int,
                kernel_dtype: torch.dtype | None = None) -> tuple[Transformer, float]:
    """A Transformer sharing `model`'s embeddings and norms, with every linear re-quantized to `low_bit` ("auto":
    see draft_grid; wider low-bit formats are dequantized first; ≤ 4-bit ones are shared); returns it and the
    share of the linear weights that were re-quantized (the rest the draft reads just as the target does)."""
    from .loading import meta_model, quantize_rows
    from .lowbit.exact import exact_quantize
    from .lowbit.linear import LowBitLinear

    low_bit = draft_format(low_bit)
    draft = meta_model(model.config)
    draft.tok_embeddings, draft.norm = model.tok_embeddings, model.norm
    made, total = 0, 0
    off_grid: list[str] = []

    def convert(src: nn.Module, name: str) -> nn.Module:
        nonlocal made, total
        total += src.in_features * src.out_features
        if isinstance(src, LowBitLinear):
            if src.fmt.bits <= 4:
                return src
            weight, bias = src.dequantize_weight(torch.float32), src.bias
        elif isinstance(src, nn.Linear):
            weight, bias = src.weight.detach().float(), src.bias
        else:
            raise XpuLLMError(f"{name} is a {type(src).__name__}; the lowbit draft handles nn.Linear and "
                              "LowBitLinear layers only (use layer_skip or lookup with this model)")
        in_f, out_f = src.in_features, src.out_features
        fmt, g, exact = draft_grid(model, name, low_bit, group_size, in_f)
        if g is None:
            log.warning("%s: in_features %d fits no group size; the draft shares the target's layer", name, in_f)
            return src
        q = exact_quantize(fmt, weight, g) if exact else None
        if exact and q is None:
            off_grid.append(name)
        if q is None:
            q = quantize_rows(fmt, weight, g)
        layer = LowBitLinear.from_quantized(q, in_f, out_f, fmt, g, bias=None if bias is None else bias.detach())
        layer.kernel_dtype = kernel_dtype
        made += in_f * out_f
        return layer

    for i, (src, dst) in enumerate(zip(model.layers, draft.layers)):
        dst.attention_norm, dst.ffn_norm = src.attention_norm, src.ffn_norm
        dst.attention.wqkv = convert(src.attention.wqkv, f"layers.{i}.attention.wqkv")
        dst.attention.wo = convert(src.attention.wo, f"layers.{i}.attention.wo")
        dst.feed_forward.w13 = convert(src.feed_forward.w13, f"layers.{i}.feed_forward.w13")
        dst.feed_forward.w2 = convert(src.feed_forward.w2, f"layers.{i}.feed_forward.w2")
    draft.output = convert(model.output, "output")
    if off_grid:
        log.info("lowbit draft: %d layers read from 4-bit GGUF blocks (%s ...) are no longer exactly on that grid "
                 "(the target holds them in another dtype or format); quantized into it anyway", len(off_grid),
                 off_grid[0])
    left = [n for n, t in list(draft.named_parameters()) + list(draft.named_buffers()) if t.is_meta]
    assert not left, f"lowbit draft: tensors left on meta: {left[:4]}"
    return draft.eval(), made / max(total, 1)


class LookupDraft:
    """Prompt lookup: the longest (≤ ngram_max) suffix of a row's tokens that occurred before, most recent
    occurrence first; the tokens that followed it are the drafts. Deterministic, so q is one-hot."""

    kind = "lookup"

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise XpuLLMError(f"lookup needs 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self._index: list[dict[tuple[int, ...], int]] = []
        self._seen: list[int] = []

    def prepare(self, batch: Batch, max_seq_len: int) -> None:
        b = batch.tokens.shape[0]
        self._index, self._seen = [{} for _ in range(b)], [0] * b

    def _extend(self, r: int, h: list[int]) -> None:
        """Index n-grams of h whose continuation exists: key h[j-n:j] -> j (latest j wins)."""
        idx = self._index[r]
        for j in range(max(self._seen[r], 1), len(h)):
            for n in range(self.ngram_min, min(self.ngram_max, j) + 1):
                idx[tuple(h[j - n:j])] = j
        self._seen[r] = max(self._seen[r], len(h))

    def continuation(self, r: int, h: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the longest matching suffix."""
        self._extend(r, h)
        idx = self._index[r]
        for n in range(min(self.ngram_max, len(h) - 1), self.ngram_min - 1, -1):
            start = idx.get(tuple(h[len(h) - n:]))
            if start is not None:
                return h[start:start + k]
        return []

    def propose(self, st: DecodeState, k: int, params: SamplingParams, gen: torch.Generator | None,
                threshold: float, k_min: int) -> Proposal:
        conts = [self.continuation(r, h, k) if alive else []
                 for r, (h, alive) in enumerate(zip(st.hist, st.live_host))]
        width = max((len(c) for c in conts), default=0)
        rows = [c + [st.pending_host[r]] * (width - len(c)) + [len(c)] for r, c in enumerate(conts)]
        both = torch.tensor(rows, dtype=torch.long, device=st.pos.device).view(len(rows), width + 1)  # one copy
        return Proposal(both[:, :width], both[:, width])


def default_skip_layers(n_layers: int) -> tuple[int, ...]:
    """The layer_skip draft's default subset: every layer but each 4th one (i % 4 == 2), so the first two and the
    last layer always run. Of the subsets benchmarks/speculative_layers.py measured on SmolLM2 (30 layers) it had
    the best first-draft agreement for its cost; layers near the ends matter most, and dropping a contiguous block
    or every other layer lost most of the agreement (see README, "Speculative decoding")."""
    drop = {i for i in range(1, n_layers - 1) if i % 4 == 2} or ({n_layers - 1} if n_layers > 1 else set())
    return tuple(i for i in range(n_layers) if i not in drop)


def build_draft(kind: str, model: Transformer, layers: Sequence[int] | None = None, low_bit: str = "auto",
                group_size: int = 64, kernel_dtype: torch.dtype | None = None, ngram_max: int = 3,
                ngram_min: int = 1):
    """The draft object for `kind` over `model`."""
    if kind == "lookup":
        return LookupDraft(ngram_max, ngram_min)
    if kind == "layer_skip":
        return LayerSkipDraft(model, default_skip_layers(len(model.layers)) if layers is None else layers)
    if kind == "lowbit":
        return LowBitDraft(model, low_bit, group_size, kernel_dtype)
    raise XpuLLMError(f"unknown speculative draft kind {kind!r}; choose one of {', '.join(DRAFT_KINDS)}")
