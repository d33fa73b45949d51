"""Batched generation on the static KV cache: prefill, decode one token at a time, sampling (greedy,
temperature, top-k, top-p, seeded), stop tokens. Text-level concerns (stop strings, streaming) are the
caller's, through `on_step`."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .device import synchronize
from .errors import GenerationInputError
from .model import Transformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def check(self) -> None:
        if self.max_new_tokens <= 0:
            raise GenerationInputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GenerationInputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationInputError(f"top_k must be >= 1, got {self.top_k}")


@dataclass
class GenerationStats:
    batch: int = 1
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.new_tokens - self.batch, 0)  # each row's first token comes from the prefill
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}


@dataclass
class Batch:
    """Left-padded prompts: tokens [B, T], pad [B] (slots of padding per row) or None."""
    tokens: Tensor
    pad: Tensor | None
    lengths: list[int] = field(default_factory=list)


def make_batch(prompts: list[list[int]], pad_id: int, device: torch.device) -> Batch:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationInputError("every prompt needs at least one token")
    t = max(len(p) for p in prompts)
    rows = [[pad_id] * (t - len(p)) + list(p) for p in prompts]
    pads = [t - len(p) for p in prompts]
    pad = torch.tensor(pads, device=device) if any(pads) else None
    return Batch(torch.tensor(rows, device=device, dtype=torch.long), pad, [len(p) for p in prompts])


def sample(logits: Tensor, p: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Next token per row from logits [B, V]: argmax at temperature 0, else top-k / top-p sampling."""
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, p), 1, generator=generator).squeeze(-1)


def sampling_probs(logits: Tensor, p: SamplingParams) -> Tensor:
    """The distribution `sample` draws from (temperature > 0): float32 probabilities [..., V] after temperature,
    top-k and top-p (speculative sampling needs it explicitly, for the target and the draft alike)."""
    assert p.temperature > 0, "greedy decoding has no sampling distribution"
    logits = logits.float() / p.temperature
    if p.top_k is not None and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits.softmax(-1)


@torch.inference_mode()
def prefill(model: Transformer, batch: Batch) -> Tensor:
    """Run the prompts through the model, filling cache slots [0, T); logits of the last position [B, V]."""
    t = batch.tokens.shape[1]
    input_pos = torch.arange(t, device=batch.tokens.device)
    return model(batch.tokens, input_pos, pad=batch.pad, kv_len=t, last_only=True)[:, -1]


@torch.inference_mode()
def decode_one_token(model: Transformer, token: Tensor, pos: int, pad: Tensor | None) -> Tensor:
    """One step: token [B] written at slot `pos`; logits [B, V] for the next one."""
    input_pos = torch.tensor([pos], device=token.device)
    return model(token.view(-1, 1), input_pos, pad=pad, kv_len=pos + 1, last_only=True)[:, -1]


def generate_tokens(model: Transformer, prompts: list[list[int]], params: SamplingParams, pad_id: int,
                    on_step: Callable[[int, list[int]], bool] | None = None, overlap: bool | None = None
                    ) -> tuple[list[list[int]], GenerationStats]:
    """New token ids per prompt (stop token included when hit), with timings.

    `on_step(row, ids_so_far)` is called after each new token of an unfinished row; returning True ends that
    row (stop strings, streaming consumers). `overlap` (default: on accelerators, whose work is queued) queues
    the next decode step before the host reads this step's tokens, so the device never waits for the copy,
    the stop checks and `on_step`; when every row stops early, one queued step is computed and dropped. The
    tokens are the same either way."""
    params.check()
    device = model.norm.weight.device
    batch = make_batch(prompts, pad_id, device)
    b, t = batch.tokens.shape
    if t + params.max_new_tokens > model.max_seq_len:
        raise GenerationInputError(
            f"prompt of {t} tokens + max_new_tokens {params.max_new_tokens} exceeds max_seq_len "
            f"{model.max_seq_len}; shorten the prompt, lower max_new_tokens or raise max_seq_len")
    if overlap is None:
        overlap = device.type != "cpu"
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    stops = set(params.stop_token_ids)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    stats = GenerationStats(batch=b, prompt_tokens=sum(batch.lengths))
    t0 = time.perf_counter()
    nxt = sample(prefill(model, batch), params, gen)
    synchronize(device)
    t1 = time.perf_counter()
    stats.prefill_s = t1 - t0
    from .graphs import decoder
    decode = decoder(model, b, batch.pad)  # graph-captured on accelerators
    for step in range(params.max_new_tokens):
        last = step == params.max_new_tokens - 1
        ahead = sample(decode(nxt, t + step), params, gen) if overlap and not last else None
        ids = nxt.tolist()  # waits for this step's tokens only
        for r in range(b):
            if done[r]:
                continue
            out[r].append(ids[r])
            stats.new_tokens += 1
            if ids[r] in stops or (on_step is not None and on_step(r, out[r])):
                done[r] = True
        if all(done) or last:
            break
        nxt = ahead if overlap else sample(decode(nxt, t + step), params, gen)
    synchronize(device)
    stats.decode_s = time.perf_counter() - t1
    return out, stats
