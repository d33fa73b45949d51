"""Perplexity over sliding windows of a text file (WikiText-2 style): each window is one forward; with a
stride shorter than the window only the last `stride` targets of a window are scored (the rest is context)."""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F


def tokenize_prefix(tokenizer, text: str, n_tokens: int) -> list[int]:
    """Token ids of the shortest prefix of `text` holding at least n_tokens (or all of it)."""
    chars = max(4096, n_tokens * 6)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > n_tokens or chars >= len(text):
            return ids
        chars *= 2


@torch.inference_mode()
def perplexity(llm, text: str, window: int = 512, stride: int | None = None, max_windows: int | None = 40,
               progress: bool = True) -> dict[str, Any]:
    """exp(mean NLL) over up to `max_windows` windows of `window` tokens."""
    from tqdm.auto import tqdm

    stride = stride or window
    assert 0 < stride <= window, "stride must be in (0, window]"
    need = window + stride * ((max_windows or 10**9) - 1) + 1
    ids = tokenize_prefix(llm.tokenizer, text, need)
    starts = list(range(0, max(len(ids) - window, 0) + 1, stride))
    if max_windows:
        starts = starts[:max_windows]
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for k, s in enumerate(tqdm(starts, desc="perplexity", unit="window", disable=not progress, leave=False)):
        chunk = torch.tensor(ids[s:s + window]).unsqueeze(0)
        logits = llm.logits(chunk)[0, :-1]
        targets = chunk[0, 1:].to(logits.device)
        # targets[j] is token j+1 of the window; with overlapping windows the first window-stride tokens were
        # scored by the previous window, so score targets j >= window-stride-1 (all of them when disjoint).
        scored = slice(0, None) if k == 0 else slice(max(window - stride - 1, 0), None)
        losses = F.cross_entropy(logits[scored], targets[scored], reduction="sum")
        nll += float(losses)
        count += int(targets[scored].numel())
    return {"perplexity": math.exp(nll / count), "tokens_scored": count, "windows": len(starts),
            "window": window, "stride": stride, "seconds": round(time.perf_counter() - t0, 1)}
