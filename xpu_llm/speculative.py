"""Self-speculative decoding: a cheap draft (drafts.py) proposes up to k tokens per row, the target checks them
all in one forward over k+1 positions of the static KV cache, and each row keeps its own accepted prefix.

- Greedy: accept the longest prefix on which the target's argmax agrees, then the target's own next token; the
  output is the target's greedy output.
- Sampling: accept draft d with probability min(1, p(d)/q(d)); on the first rejection draw from the normalised
  max(p - q, 0); after k acceptances draw from p. The output distribution is exactly the target's p
  (Leviathan et al. 2023, Chen et al. 2023).
- Rollback is free: a row's cache length `pos` moves past what it accepted; the rejected slots are masked by
  causality and overwritten by the next pass. Nothing is copied.
- Adaptive k: a model draft stops once its top probability is under a threshold, which moves after each round
  toward the acceptance rate `target_acceptance` (up if acceptance is lower: shorter drafts); k_min..k_max bound
  it. Lookup drafts, which have no probabilities, adapt k from whether the last round accepted everything.

`generate_speculative` mirrors `generate.generate_tokens` (same arguments, same results and stop semantics) and
runs through the same `Transformer.forward`, so whatever wraps the model (tensor parallel) wraps this too."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .device import synchronize
from .drafts import DRAFT_KINDS, DecodeState, Proposal, build_draft, draft_format, slots_arg
from .errors import GenerationInputError, XpuLLMError
from .generate import GenerationStats, SamplingParams, make_batch, prefill, sample, sampling_probs
from .graphs import graphed_forward
from .model import Transformer

AcceptRule = Callable[[Tensor, Tensor, Tensor], Tensor]


def exact_accept(p_d: Tensor, q_d: Tensor, u: Tensor) -> Tensor:
    """Accept where u < min(1, p(d) / q(d)), written without the division (q(d) > 0: d was drawn from q)."""
    return u * q_d < p_d


@dataclass
class SpeculativeConfig:
    """Which draft and how hard to push it. `kind` is one of DRAFT_KINDS.

    The lowbit draft's `low_bit` is "auto" by default: each linear read from GGUF Q4_0 / Q4_1 blocks is
    re-quantized into that same grid (sym_int4 / asym_int4, group 32), which gives a target loaded from them in
    float32 its exact weights back, so the draft agrees with it more often; every other linear goes to
    sym_int4 at `group_size`. A format name (sym_int4, asym_int4, nf4, fp4) quantizes every linear in it."""
    kind: str = "layer_skip"
    k_max: int = 8  # most drafts per round
    k_min: int = 1  # drafts per round before the threshold may stop a model draft
    threshold: float = 0.4  # initial top-probability threshold of model drafts
    adaptive: bool = True  # move the threshold (model drafts) / k (lookup) from the acceptance rate
    target_acceptance: float = 0.7  # acceptance rate the threshold steers toward
    adapt_rate: float = 1.0  # threshold *= exp(adapt_rate * (target_acceptance - round acceptance))
    threshold_bounds: tuple[float, float] = (0.05, 0.95)
    layers: tuple[int, ...] | None = None  # layer_skip: layer indices the draft runs (None: the default)
    low_bit: str = "auto"  # lowbit: the draft's format, or "auto": each layer's GGUF 4-bit grid, else sym_int4
    group_size: int = 64  # lowbit: the draft's group size (auto: where no source grid; 32 where 64 does not divide)
    ngram_max: int = 3  # lookup: longest suffix matched
    ngram_min: int = 1  # lookup: shortest suffix matched
    reference_step: bool = True  # time one plain decode step per call to estimate the speedup
    accept_rule: AcceptRule = exact_accept  # tests inject a wrong rule here to see the distribution test fail

    @classmethod
    def of(cls, spec: "str | SpeculativeConfig | dict") -> "SpeculativeConfig":
        """A config from a kind name, a dict of fields, or a config."""
        if isinstance(spec, SpeculativeConfig):
            cfg = spec
        elif isinstance(spec, str):
            cfg = cls(kind=spec)
        elif isinstance(spec, dict):
            unknown = set(spec) - set(cls.__dataclass_fields__)
            if unknown:
                raise XpuLLMError(f"unknown speculative options {sorted(unknown)}; valid: "
                                  f"{', '.join(cls.__dataclass_fields__)}")
            cfg = cls(**spec)
        else:
            raise XpuLLMError(f"speculative must be a kind ({', '.join(DRAFT_KINDS)}), a dict of options or a "
                              f"SpeculativeConfig, got {type(spec).__name__}")
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.kind not in DRAFT_KINDS:
            raise XpuLLMError(f"unknown speculative draft kind {self.kind!r}; choose one of {', '.join(DRAFT_KINDS)}")
        if not 1 <= self.k_min <= self.k_max:
            raise XpuLLMError(f"speculative needs 1 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}")
        lo, hi = self.threshold_bounds
        if not 0 <= lo <= self.threshold <= hi <= 1:
            raise XpuLLMError(f"speculative threshold {self.threshold} must lie within threshold_bounds {lo, hi} "
                              "inside [0, 1]")
        if not 0 < self.target_acceptance < 1:
            raise XpuLLMError(f"target_acceptance must be in (0, 1), got {self.target_acceptance}")
        if self.kind == "lowbit":
            draft_format(self.low_bit)

    def draft_key(self) -> tuple:
        """What identifies a built draft (a new one is built when this changes)."""
        if self.kind == "layer_skip":
            return self.kind, self.layers
        if self.kind == "lowbit":
            return self.kind, draft_format(self.low_bit), self.group_size
        return self.kind, self.ngram_max, self.ngram_min


def make_draft(cfg: SpeculativeConfig, model: Transformer, kernel_dtype: torch.dtype | None = None):
    """Build the draft `cfg` describes over `model` (the lowbit copy quantizes here, once)."""
    return build_draft(cfg.kind, model, layers=cfg.layers, low_bit=cfg.low_bit, group_size=cfg.group_size,
                       kernel_dtype=kernel_dtype, ngram_max=cfg.ngram_max, ngram_min=cfg.ngram_min)


class DraftController:
    """Draft length policy for one call: the confidence threshold (model drafts) and the k limit (lookup)."""

    def __init__(self, cfg: SpeculativeConfig, lookup: bool) -> None:
        self.cfg, self.lookup = cfg, lookup
        self.threshold = cfg.threshold
        self.k_limit = cfg.k_max if not lookup else max(cfg.k_min, (cfg.k_min + cfg.k_max) // 2)

    def update(self, proposed: int, accepted: int) -> None:
        if not self.cfg.adaptive or proposed == 0:
            return
        rate = accepted / proposed
        if self.lookup:
            self.k_limit = min(self.cfg.k_max, self.k_limit + 1) if accepted == proposed else \
                max(self.cfg.k_min, self.k_limit - 1)
        else:
            lo, hi = self.cfg.threshold_bounds
            step = math.exp(self.cfg.adapt_rate * (self.cfg.target_acceptance - rate))
            self.threshold = min(hi, max(lo, self.threshold * step))


@dataclass
class SpeculativeStats(GenerationStats):
    kind: str = ""
    rounds: int = 0  # verification passes (the reference step included)
    proposed: int = 0  # drafts proposed, summed over live rows
    accepted: int = 0  # drafts accepted
    row_passes: int = 0  # sum over verification passes of the rows still generating
    decode_tokens: int = 0  # tokens emitted by verification passes (each row's first token comes from prefill)
    draft_steps: int = 0  # draft model forwards
    draft_s: float = 0.0
    verify_s: float = 0.0
    plain_step_s: float | None = None  # timed reference step: one plain decode forward
    plain_steps: int = 0  # decode steps plain decoding would have taken (the longest row's tokens - 1)
    thresholds: list[float] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.decode_tokens / self.row_passes if self.row_passes else 0.0

    @property
    def speedup_est(self) -> float | None:
        """Plain decode time (reference step × plain steps) over this call's decode time."""
        if not self.plain_step_s or self.decode_s <= 0:
            return None
        return self.plain_step_s * self.plain_steps / self.decode_s

    def as_dict(self) -> dict:
        out = super().as_dict()
        sp = self.speedup_est
        out.update(speculative=self.kind, rounds=self.rounds, row_passes=self.row_passes,
                   decode_tokens=self.decode_tokens, drafts_proposed=self.proposed,
                   drafts_accepted=self.accepted, acceptance_rate=round(self.acceptance_rate, 4),
                   tokens_per_target_pass=round(self.tokens_per_pass, 4), draft_steps=self.draft_steps,
                   draft_s=round(self.draft_s, 4), verify_s=round(self.verify_s, 4),
                   speedup_est=None if sp is None else round(sp, 3),
                   final_threshold=round(self.thresholds[-1], 4) if self.thresholds else None)
        return out


# ---------------------------------------------------------------------------------------------- verification

def verify_greedy(logits: Tensor, prop: Proposal) -> tuple[Tensor, Tensor]:
    """(accepted count n [B], next token [B]): the longest draft prefix equal to the target's argmax, then the
    target's argmax after it. logits [B, k+1, V]."""
    tgt = logits.argmax(-1)
    k = prop.tokens.shape[1]
    ok = (prop.tokens == tgt[:, :k]) & (torch.arange(k, device=tgt.device) < prop.counts.view(-1, 1))
    n = ok.long().cumprod(-1).sum(-1)
    return n, tgt.gather(1, n.view(-1, 1)).squeeze(1)


def verify_sampling(logits: Tensor, prop: Proposal, params: SamplingParams, gen: torch.Generator | None,
                    accept_rule: AcceptRule = exact_accept) -> tuple[Tensor, Tensor]:
    """(accepted count n [B], next token [B]) by speculative sampling against the target's distribution p."""
    p = sampling_probs(logits, params)  # [B, k+1, V]
    b, k1, v = p.shape
    k = k1 - 1
    rows = torch.arange(b, device=p.device)
    d = prop.tokens
    if k == 0:
        return torch.zeros(b, dtype=torch.long, device=p.device), \
            torch.multinomial(p[:, 0], 1, generator=gen).squeeze(-1)
    p_d = p[:, :k].gather(-1, d.unsqueeze(-1)).squeeze(-1)
    q_d = torch.ones_like(p_d) if prop.q is None else prop.q.gather(-1, d.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(b, k, device=p.device, generator=gen)
    ok = accept_rule(p_d, q_d, u) & (torch.arange(k, device=p.device) < prop.counts.view(-1, 1))
    n = ok.long().cumprod(-1).sum(-1)
    p_n = p[rows, n]
    rejected = n < prop.counts  # else every proposed draft was accepted: the next token comes from p itself
    if prop.q is None:  # deterministic draft: q is one-hot at its token
        q_n = torch.zeros_like(p_n).scatter_(1, d.gather(1, n.clamp(max=k - 1).view(-1, 1)), 1.0)
    else:
        q_n = prop.q[rows, n.clamp(max=k - 1)]
    resid = torch.where(rejected.view(-1, 1), (p_n - q_n).clamp_min(0), p_n)
    z = resid.sum(-1, keepdim=True)
    resid = torch.where(z > 0, resid / z.clamp_min(1e-30), p_n)  # z == 0 only when p == q: rejection impossible
    return n, torch.multinomial(resid, 1, generator=gen).squeeze(-1)


# ---------------------------------------------------------------------------------------------- the loop

def generate_speculative(model: Transformer, draft, prompts: list[list[int]], params: SamplingParams, pad_id: int,
                         on_step: Callable[[int, list[int]], bool] | None = None,
                         cfg: SpeculativeConfig | None = None) -> tuple[list[list[int]], SpeculativeStats]:
    """New token ids per prompt, as `generate_tokens` returns them, decoded speculatively with `draft`."""
    params.check()
    cfg = cfg or SpeculativeConfig(kind=draft.kind)
    device = model.norm.weight.device
    batch = make_batch(prompts, pad_id, device)
    b, t = batch.tokens.shape
    smax = model.max_seq_len
    if t + params.max_new_tokens > smax:
        raise GenerationInputError(
            f"prompt of {t} tokens + max_new_tokens {params.max_new_tokens} exceeds max_seq_len {smax}; shorten "
            "the prompt, lower max_new_tokens or raise max_seq_len")
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    stops = set(params.stop_token_ids)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    stats = SpeculativeStats(batch=b, prompt_tokens=sum(batch.lengths), kind=draft.kind)
    ctl = DraftController(cfg, lookup=draft.kind == "lookup")

    def emit(r: int, tokens: list[int]) -> int:
        """Append tokens to row r until it ends; the number appended."""
        for i, tok in enumerate(tokens):
            out[r].append(tok)
            if tok in stops or (on_step is not None and on_step(r, out[r])) or \
                    len(out[r]) >= params.max_new_tokens:
                done[r] = True
                return i + 1
        return len(tokens)

    t0 = time.perf_counter()
    first = sample(prefill(model, batch), params, gen)
    draft.prepare(batch, smax)
    synchronize(device)
    t1 = time.perf_counter()
    stats.prefill_s = t1 - t0
    first_l = first.tolist()
    for r, tok in enumerate(first_l):
        emit(r, [tok])
    hist = [p + o for p, o in zip(prompts, out)]
    live = [not x for x in done]
    st = DecodeState(pending=first, prev=batch.tokens[:, -1].clone(), pos=torch.full((b,), t, device=device),
                     pad=batch.pad, live=torch.tensor(live, device=device), hist=hist, max_seq_len=smax,
                     pending_host=first_l, prev_host=batch.tokens[:, -1].tolist(), pos_host=[t] * b,
                     live_host=live)
    while not all(done):
        live_rows = [r for r in range(b) if not done[r]]
        room = max(params.max_new_tokens - len(out[r]) for r in live_rows) - 1  # drafts that could still count
        plain = cfg.reference_step and stats.rounds == 0
        k = 0 if plain else min(room, ctl.k_limit)
        ta = time.perf_counter()
        prop = propose(draft, st, k, params, gen, ctl, cfg)
        if prop.steps:
            synchronize(device)
        tb = time.perf_counter()
        n, nxt = verify(model, st, prop, params, gen, cfg)
        new = torch.cat([prop.tokens, nxt.view(-1, 1)], 1).scatter_(1, n.view(-1, 1), nxt.view(-1, 1))
        # one device -> host copy per round (it syncs): [new tokens | accepted n | proposed count] per row
        rows = torch.cat([new, n.view(-1, 1), prop.counts.view(-1, 1).to(new.dtype)], 1).tolist()
        new_l, n_l, cnt_l = [r[:-2] for r in rows], [r[-2] for r in rows], [r[-1] for r in rows]
        tc = time.perf_counter()
        stats.draft_s += tb - ta
        stats.verify_s += tc - tb
        if plain:
            stats.plain_step_s = tc - tb
        stats.rounds += 1
        stats.draft_steps += prop.steps
        proposed = sum(cnt_l[r] for r in live_rows)
        accepted = sum(n_l[r] for r in live_rows)
        stats.proposed += proposed
        stats.accepted += accepted
        stats.row_passes += len(live_rows)
        for r in live_rows:
            got = emit(r, new_l[r][:n_l[r] + 1])
            stats.decode_tokens += got
            hist[r].extend(new_l[r][:got])
        ctl.update(proposed, accepted)
        stats.thresholds.append(ctl.threshold)
        advance(st, new_l, n_l, done)
    synchronize(device)
    stats.decode_s = time.perf_counter() - t1
    stats.new_tokens = sum(len(o) for o in out)
    stats.plain_steps = max(len(o) for o in out) - 1
    return out, stats


def propose(draft, st: DecodeState, k: int, params: SamplingParams, gen: torch.Generator | None,
            ctl: DraftController, cfg: SpeculativeConfig) -> Proposal:
    """The draft's proposal, or an empty one for a plain step (k = 0)."""
    if k <= 0:
        b = st.pending.shape[0]
        empty = torch.zeros(b, 0, dtype=torch.long, device=st.pos.device)
        return Proposal(empty, torch.zeros(b, dtype=torch.long, device=st.pos.device))
    return draft.propose(st, k, params, gen, ctl.threshold, min(cfg.k_min, k))


@torch.inference_mode()
def verify(model: Transformer, st: DecodeState, prop: Proposal, params: SamplingParams,
           gen: torch.Generator | None, cfg: SpeculativeConfig) -> tuple[Tensor, Tensor]:
    """One target forward over [pending, drafts] at each row's slots pos..pos+k; (accepted n, next token)."""
    k = prop.tokens.shape[1]
    tokens = torch.cat([st.pending.view(-1, 1), prop.tokens], 1)
    last = st.max_seq_len - 1
    slots = (st.pos.view(-1, 1) + torch.arange(k + 1, device=st.pos.device)).clamp(max=last)
    logits = graphed_forward(model, tokens, slots_arg(slots), st.pad, min(st.live_max_pos() + k + 1, last + 1))
    if params.temperature == 0:
        return verify_greedy(logits, prop)
    return verify_sampling(logits, prop, params, gen, cfg.accept_rule)


def advance(st: DecodeState, new: list[list[int]], n: list[int], done: list[bool]) -> None:
    """Move each live row past its accepted drafts: the cache length grows by n + 1 (no copying), the token the
    target chose becomes pending, the one before it prev. Finished rows stay where they are. Works on the host
    lists the round read back (`new` [B][k + 1], the target's token at index n) and copies pending / prev / pos
    to the device in one transfer."""
    for r, finished in enumerate(done):
        if finished:
            continue
        full = [st.pending_host[r]] + new[r]  # [pending, d_1.., next]: next sits at index n + 1
        st.pending_host[r], st.prev_host[r] = full[n[r] + 1], full[n[r]]
        st.pos_host[r] += n[r] + 1
    dev = st.pos.device
    state = torch.tensor([st.pending_host, st.prev_host, st.pos_host], dtype=torch.long, device=dev)
    st.pending, st.prev, st.pos = state.unbind(0)
    live = [not x for x in done]
    if live != st.live_host:
        st.live_host, st.live = live, torch.tensor(live, device=dev)


def speculative_config(spec, default: SpeculativeConfig | None = None) -> SpeculativeConfig | None:
    """Normalise a `speculative=` argument: None keeps `default`, False / 'none' turns it off."""
    if spec is None:
        return default
    if spec is False or (isinstance(spec, str) and spec.lower() in ("none", "off", "")):
        return None
    return SpeculativeConfig.of(spec)


__all__ = ["SpeculativeConfig", "SpeculativeStats", "DraftController", "exact_accept", "generate_speculative",
           "make_draft", "speculative_config", "verify_greedy", "verify_sampling"]
