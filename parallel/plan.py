"""Placement plans: from a model's config, the weight format, max_seq_len and batch (KV cache included), the
number of cards and their memory, choose tensor-parallel (within a host) x pipeline-parallel (across hosts) sizes
-- the fewest cards that fit with headroom -- or explain why nothing fits and what would. Pipeline stages are
balanced by bytes (layers, plus the embedding on the first stage and the lm_head on the last)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..config import ModelConfig
from ..errors import XpuLLMError
from ..lowbit.formats import get_format
from .tensor import TPLayout, tp_problem, valid_tp_sizes

GiB = 2**30
FORMAT_ALIASES = {"fp8": "fp8_e4m3", "int4": "sym_int4", "int8": "sym_int8"}

# Published shapes (config.json fields), so that plans need no checkpoint: `xpu-llm plan llama-3-8b ...`.
_LLAMA = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5}
PRESETS: dict[str, dict] = {
    "llama-2-7b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096},
    "llama-2-70b": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                    "max_position_embeddings": 4096},
    "llama-3-8b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "llama-3-70b": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                    "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "qwen2-7b": {"model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944,
                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    "qwen2-72b": {"model_type": "qwen2", "hidden_act": "silu", "hidden_size": 8192, "intermediate_size": 29568,
                  "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                  "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
}


def preset_config(name: str) -> ModelConfig:
    key = name.strip().lower()
    if key not in PRESETS:
        raise XpuLLMError(f"unknown model shape {name!r}; presets: {', '.join(PRESETS)} (or give a model path)")
    return ModelConfig.from_hf(PRESETS[key])


def parse_bytes(text: str | int | float) -> int:
    """'16GB', '16 GiB', '15.5g', '16000MB' -> bytes (GB and GiB are both 2**30, as cards are sold)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if m is None:
        raise XpuLLMError(f"cannot read a memory size from {text!r}; write e.g. 16GB or 15.5GiB")
    return int(float(m.group(1)) * 1024 ** "bkmgt".index(m.group(2) or "b"))


@dataclass
class Budget:
    """What the plan must fit on each card."""
    low_bit: str | None = "sym_int4"   # None: dense in act_dtype_bytes
    group_size: int = 64
    max_seq_len: int = 4096
    batch: int = 1
    prompt_len: int = 512              # a prefill's activations are sized for this many tokens
    act_bytes: int = 2                 # bf16 / fp16 activations, KV cache and dense weights
    headroom: float = 0.10             # fraction of each card kept free
    runtime_bytes: int = GiB // 2      # driver context, allocator slack, kernel workspaces

    def __post_init__(self) -> None:
        if self.low_bit is not None:
            self.low_bit = FORMAT_ALIASES.get(self.low_bit.lower(), self.low_bit)
            if get_format(self.low_bit).dense:
                self.act_bytes = get_format(self.low_bit).bits // 8
                self.low_bit = None

    @property
    def unit(self) -> int:
        return 1 if self.low_bit is None else self.group_size

    def linear_bytes(self, out_f: int, in_f: int) -> int:
        if self.low_bit is None or in_f % self.group_size:
            return out_f * in_f * self.act_bytes
        return get_format(self.low_bit).nbytes(out_f, in_f, self.group_size)


@dataclass
class CardUse:
    """Bytes on the busiest card of a stage."""
    weights: int
    kv_cache: int
    activations: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime


@dataclass
class Placement:
    tp: int
    pp: int
    stages: list[range]
    per_stage: list[CardUse]
    card_memory: int | None = None
    budget: Budget = field(default_factory=Budget)

    @property
    def cards(self) -> int:
        return self.tp * self.pp

    @property
    def peak(self) -> CardUse:
        return max(self.per_stage, key=lambda u: u.total)

    @property
    def usable(self) -> int | None:
        if self.card_memory is None:
            return None
        return int(self.card_memory * (1 - self.budget.headroom))

    @property
    def fits(self) -> bool:
        return self.usable is None or self.peak.total <= self.usable

    def describe(self) -> str:
        p = self.peak
        lines = [f"tp {self.tp} x pp {self.pp} = {self.cards} card(s); per card up to {p.total / GiB:.2f} GiB "
                 f"(weights {p.weights / GiB:.2f}, KV cache {p.kv_cache / GiB:.2f}, activations "
                 f"{p.activations / GiB:.2f}, runtime {p.runtime / GiB:.2f})"
                 + (f" of {self.usable / GiB:.2f} GiB usable" if self.usable else "")]
        for s, (r, u) in enumerate(zip(self.stages, self.per_stage)):
            extra = (" + embedding" if s == 0 else "") + (" + lm_head" if s == self.pp - 1 else "")
            lines.append(f"  stage {s}: layers {r.start}-{r.stop - 1} ({len(r)}){extra}: {u.total / GiB:.2f} GiB "
                         f"per card")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- estimates

def _sizes(cfg: ModelConfig, tp: int, b: Budget) -> TPLayout:
    return TPLayout.build(cfg, tp, 0, b.unit)  # rank 0 holds the largest part of an uneven split


def layer_bytes(cfg: ModelConfig, tp: int, b: Budget) -> int:
    """Weights of one decoder layer on one card."""
    lay = _sizes(cfg, tp, b)
    hd, dim = cfg.head_dim, cfg.dim
    h, kv, f = (lay.heads[1] - lay.heads[0]), (lay.kv_heads[1] - lay.kv_heads[0]), lay.ffn[1] - lay.ffn[0]
    w = (b.linear_bytes((h + 2 * kv) * hd, dim) + b.linear_bytes(dim, h * hd)
         + b.linear_bytes(2 * f, dim) + b.linear_bytes(dim, f))
    biases = ((h + 2 * kv) * hd if cfg.attention_bias else 0) + (dim if cfg.o_bias else 0)
    return w + (biases + 2 * dim) * b.act_bytes


def kv_bytes(cfg: ModelConfig, tp: int, b: Budget) -> int:
    """KV cache of one layer on one card (a replicated KV head counts once per card)."""
    kv = max(cfg.n_kv_heads // tp, 1)
    return 2 * b.batch * b.max_seq_len * kv * cfg.head_dim * b.act_bytes


def end_bytes(cfg: ModelConfig, tp: int, b: Budget) -> tuple[int, int]:
    """(embedding, lm_head) bytes on one card: vocabulary-parallel; a tied or quantized head is low-bit (and the
    embedding reads its rows), an untied embedding stays dense."""
    rows = -(-cfg.vocab_size // tp)
    head = b.linear_bytes(rows, cfg.dim)
    emb = head if cfg.tie_word_embeddings else rows * cfg.dim * b.act_bytes
    return emb, (0 if cfg.tie_word_embeddings else head)


def activation_bytes(cfg: ModelConfig, tp: int, b: Budget) -> int:
    """A prefill of prompt_len tokens: hidden states, q/k/v, MLP, attention scores, float32 logits."""
    lay = _sizes(cfg, tp, b)
    h, kv, f = (lay.heads[1] - lay.heads[0]), (lay.kv_heads[1] - lay.kv_heads[0]), lay.ffn[1] - lay.ffn[0]
    t = min(b.prompt_len, b.max_seq_len)
    per_token = 4 * cfg.dim + (h + 2 * kv) * cfg.head_dim + 3 * f
    return b.batch * (t * per_token * b.act_bytes + h * t * t * 4 + cfg.vocab_size * 4)


def stage_layers(costs: list[float], pp: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[range]:
    """Cut layers with the given costs into pp contiguous non-empty stages minimising the largest stage cost
    (first stage + first_extra, last + last_extra). Deterministic, so every rank computes the same cut."""
    n = len(costs)
    if not 1 <= pp <= n:
        raise XpuLLMError(f"pp={pp} stages need between 1 and {n} (the model's layer count)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, a: int, z: int) -> float:
        return prefix[z] - prefix[a] + (first_extra if s == 0 else 0.0) + (last_extra if s == pp - 1 else 0.0)

    # best[s][i]: the smallest max-cost of stages 0..s covering layers [0, i); cut[s][i]: where stage s starts.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp)]
    cut = [[0] * (n + 1) for _ in range(pp)]
    for i in range(1, n + 1):
        best[0][i] = cost(0, 0, i)
    for s in range(1, pp):
        for i in range(s + 1, n + 1):
            for j in range(s, i):
                v = max(best[s - 1][j], cost(s, j, i))
                if v < best[s][i] - 1e-9:
                    best[s][i], cut[s][i] = v, j
    bounds, i = [n], n
    for s in range(pp - 1, 0, -1):
        i = cut[s][i]
        bounds.append(i)
    bounds.append(0)
    bounds.reverse()
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


def estimate(cfg: ModelConfig, tp: int, pp: int, budget: Budget, card_memory: int | None = None) -> Placement:
    """Per-card memory of a tp x pp placement, with stages balanced by bytes."""
    why = tp_problem(cfg, tp, budget.unit)
    if why is not None:
        raise XpuLLMError(f"tp={tp}: {why}")
    per_layer = layer_bytes(cfg, tp, budget) + kv_bytes(cfg, tp, budget)
    emb, head = end_bytes(cfg, tp, budget)
    norm = cfg.dim * budget.act_bytes
    stages = stage_layers([float(per_layer)] * cfg.n_layers, pp, emb, head + norm)
    act = activation_bytes(cfg, tp, budget)
    uses = []
    for s, r in enumerate(stages):
        w = len(r) * layer_bytes(cfg, tp, budget) + norm + (emb if s == 0 else 0) + (head if s == pp - 1 else 0)
        uses.append(CardUse(w, len(r) * kv_bytes(cfg, tp, budget), act, budget.runtime_bytes))
    return Placement(tp, pp, stages, uses, card_memory, budget)


def layouts_for(cfg: ModelConfig, cards: int, cards_per_host: int, budget: Budget) -> list[tuple[int, int]]:
    """Every (tp, pp) using exactly `cards` cards, tp within one host, largest tp first."""
    out = []
    for tp in sorted(valid_tp_sizes(cfg, budget.unit), reverse=True):
        if tp <= cards_per_host and cards % tp == 0 and cards // tp <= cfg.n_layers:
            out.append((tp, cards // tp))
    return out


def best_for_cards(cfg: ModelConfig, cards: int, card_memory: int | None, budget: Budget,
                   cards_per_host: int | None = None) -> Placement | None:
    """The placement over exactly `cards` cards: the largest tensor-parallel size that fits (lowest latency),
    else the one with the smallest per-card peak; None when no (tp, pp) splits the model that way."""
    options = [estimate(cfg, tp, pp, budget, card_memory)
               for tp, pp in layouts_for(cfg, cards, cards_per_host or cards, budget)]
    if not options:
        return None
    fitting = [p for p in options if p.fits]
    return fitting[0] if fitting else min(options, key=lambda p: p.peak.total)


def choose(cfg: ModelConfig, cards: int, card_memory: int, budget: Budget,
           cards_per_host: int | None = None) -> Placement:
    """The fewest cards (at most `cards`) that hold the model with headroom; an XpuLLMError saying what would
    fit otherwise."""
    host = cards_per_host or cards
    for n in range(1, cards + 1):
        p = best_for_cards(cfg, n, card_memory, budget, host)
        if p is not None and p.fits:
            return p
    raise XpuLLMError(_no_fit(cfg, cards, card_memory, budget, host))


def _no_fit(cfg: ModelConfig, cards: int, card_memory: int, budget: Budget, host: int) -> str:
    best = best_for_cards(cfg, cards, card_memory, budget, host) or estimate(cfg, 1, 1, budget, card_memory)
    msg = [f"the model does not fit {cards} card(s) of {card_memory / GiB:.1f} GiB in "
           f"{budget.low_bit or 'dense'}: at best {best.peak.total / GiB:.2f} GiB per card "
           f"(tp {best.tp} x pp {best.pp}) against {best.usable / GiB:.2f} GiB usable."]
    for n in range(cards + 1, 8 * max(cards, 8) + 1):
        p = best_for_cards(cfg, n, card_memory, budget, max(host, n) if host >= cards else host)
        if p is not None and p.fits:
            msg.append(f"It fits {n} cards (tp {p.tp} x pp {p.pp}).")
            break
    if budget.low_bit not in ("sym_int4", "asym_int4", "nf4", "fp4"):
        smaller = Budget(**{**budget.__dict__, "low_bit": "sym_int4"})
        try:
            p = choose(cfg, cards, card_memory, smaller, host)
            msg.append(f"In sym_int4 it fits {p.cards} card(s) (tp {p.tp} x pp {p.pp}).")
        except XpuLLMError:
            pass
    kv = cfg.n_layers * kv_bytes(cfg, best.tp, budget) // best.cards
    if kv > 0.2 * best.peak.total:
        msg.append(f"The KV cache for batch {budget.batch} x {budget.max_seq_len} tokens takes "
                   f"{kv / GiB:.2f} GiB per card: a shorter max_seq_len or a smaller batch frees it.")
    return " ".join(msg)


def plan_table(cfg: ModelConfig, card_counts: list[int], card_memory: int, budget: Budget) -> str:
    """Markdown rows: for each card count, the fewest-cards plan and the plan using all of them."""
    rows = ["| cards | fewest cards that fit | per card (GiB) | all cards | per card (GiB) |",
            "|---:|---|---:|---|---:|"]
    for n in card_counts:
        try:
            p = choose(cfg, n, card_memory, budget)
            few, few_mem = f"tp {p.tp} x pp {p.pp} ({p.cards})", f"{p.peak.total / GiB:.2f}"
        except XpuLLMError:
            few, few_mem = "does not fit", "-"
        a = best_for_cards(cfg, n, card_memory, budget)
        if a is None:
            all_, all_mem = "no split", "-"
        else:
            all_ = f"tp {a.tp} x pp {a.pp}" + ("" if a.fits else " (too big)")
            all_mem = f"{a.peak.total / GiB:.2f}"
        rows.append(f"| {n} | {few} | {few_mem} | {all_} | {all_mem} |")
    return "\n".join(rows)


def total_bytes(cfg: ModelConfig, budget: Budget) -> int:
    """Weights of the whole model in the budget's format (one card, no KV)."""
    emb, head = end_bytes(cfg, 1, budget)
    return cfg.n_layers * layer_bytes(cfg, 1, budget) + emb + head + cfg.dim * budget.act_bytes


__all__ = ["Budget", "Placement", "CardUse", "PRESETS", "preset_config", "parse_bytes", "estimate", "choose",
           "best_for_cards", "stage_layers", "plan_table", "total_bytes", "GiB"]


def model_config(model: str | None, low_bit: str | None, group_size: int) -> tuple[ModelConfig, str | None, int]:
    """(config, resolved format, group) for a preset name or a checkpoint path (None: the embedded SmolLM2)."""
    if model is not None and model.strip().lower() in PRESETS:
        fmt = "sym_int4" if low_bit == "auto" else low_bit
        return preset_config(model), fmt, group_size
    from ..loading import open_checkpoint, resolve_source
    op = open_checkpoint(resolve_source(model), low_bit, group_size)
    fmt = op.low_bit if op.low_bit is not None else {None: None, 2: "bf16", 4: "fp32"}.get(
        op.dtype.itemsize if op.dtype is not None else None, "bf16")
    return op.config, fmt, (32 if op.keep_native else group_size)


def plan_report(model: str | None, cards: int, card_memory: str | int, low_bit: str | None = "auto",
                group_size: int = 64, max_seq_len: int = 4096, batch: int = 1, cards_per_host: int | None = None,
                headroom: float = 0.10, prompt_len: int = 512) -> dict:
    """What `xpu-llm plan` prints: the chosen placement (or why none fits), and every card count's best."""
    cfg, fmt, group = model_config(model, low_bit, group_size)
    mem = parse_bytes(card_memory)
    budget = Budget(fmt, group, max_seq_len, batch, prompt_len, headroom=headroom)
    out: dict = {"model": model or "SmolLM2-135M (embedded)", "low_bit": budget.low_bit or "dense",
                 "group_size": group, "cards": cards, "card_memory_gib": round(mem / GiB, 2),
                 "max_seq_len": max_seq_len, "batch": batch,
                 "weights_gib": round(total_bytes(cfg, budget) / GiB, 2)}
    try:
        p = choose(cfg, cards, mem, budget, cards_per_host)
        out.update(fits=True, tp=p.tp, pp=p.pp, cards_used=p.cards, per_card_gib=round(p.peak.total / GiB, 2),
                   stages=[[r.start, r.stop] for r in p.stages], text=p.describe())
    except XpuLLMError as e:
        out.update(fits=False, text=str(e))
    return out
