"""`xpu-llm bench`: decode speed and memory for each format on one model, one format at a time."""
from __future__ import annotations

import gc
import time
from typing import Any

import torch


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights as stored (packed low-bit tensors and scales by their format, float parameters),
    each tensor once; independent of kernel repacking."""
    from .lowbit.embedding import LowBitEmbedding
    from .lowbit.linear import LowBitLinear
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, LowBitLinear):
            total += m.fmt.nbytes(m.out_features, m.in_features, m.group_size)
            total += 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
        elif isinstance(m, LowBitEmbedding) and not m.tied:
            total += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
        else:
            for t in m.parameters(recurse=False):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


def bench_llm(llm, prompt_len: int, new_tokens: int, batch: int, repeats: int = 2) -> dict[str, Any]:
    """Best of `repeats` greedy runs (the first also warms up): decode tokens/s, ms per token, prefill s."""
    from .device import current_rss, max_memory_allocated
    vocab = llm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(vocab, 20000), (batch, prompt_len), generator=g)
    llm.generate_ids(ids, max_new_tokens=4, ignore_eos=True)  # warm-up: caches, kernels, allocator
    best = None
    for _ in range(repeats):
        rows = [r.tolist() for r in ids]
        params = llm._params(new_tokens, 0.0, None, None, None, None, ignore_eos=True)
        _, stats = llm._run(rows, params)
        if best is None or stats.decode_tokens_per_s > best.decode_tokens_per_s:
            best = stats
    tps = best.decode_tokens_per_s
    return {"decode_tokens_per_s": round(tps, 2), "ms_per_token": round(1000 * batch / tps, 2) if tps else None,
            "prefill_s": round(best.prefill_s, 3), "weights_mib": round(weight_bytes(llm.model) / 2**20, 1),
            "rss_mib": round(current_rss() / 2**20), "peak_mib": round(max_memory_allocated(llm.device) / 2**20)}


def run_bench(model: str | None, formats: list[str], group_size: int, device: str | None, dtype: str,
              prompt_len: int, new_tokens: int, batch: int) -> list[dict[str, Any]]:
    from .llm import LLM
    rows = []
    for fmt in formats:
        low_bit = None if fmt in ("none", "dense") else fmt
        t0 = time.perf_counter()
        llm = LLM(model, low_bit=low_bit, group_size=group_size, device=device, dtype=dtype,
                  max_seq_len=prompt_len + new_tokens + 8, progress=False)
        load_s = time.perf_counter() - t0
        row = {"format": llm.low_bit or "dense", "requested": fmt, "dtype": str(llm.dtype).split(".")[-1],
               "load_s": round(load_s, 2), "batch": batch, **bench_llm(llm, prompt_len, new_tokens, batch)}
        rows.append(row)
        del llm
        gc.collect()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = ["format", "dtype", "batch", "decode_tokens_per_s", "ms_per_token", "prefill_s", "weights_mib", "load_s"]
    head = ["format", "dtype", "batch", "tok/s", "ms/tok", "prefill s", "weights MiB", "load s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)
