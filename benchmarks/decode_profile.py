# python benchmarks/decode_profile.py --formats sym_int4,bf16      (from the repository root, on a GPU)
"""Where one decode step of the Llama-3-8B shape (random weights, batch 1, prompt 128) spends its time: the
captured step (graphs, `--compile` by default as in LLM(compile=True)) replayed back to back, against the same
step inside `generate_tokens` (host work between steps included), then one profiled replay: device kernels by
name, their total, and the idle gaps between them. Prints a report; nothing is written."""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parallel import materialise, shape_config  # noqa: E402

from xpu_llm.device import device_module, get_device, is_cpu, synchronize  # noqa: E402
from xpu_llm.generate import SamplingParams, generate_tokens  # noqa: E402
from xpu_llm.graphs import compile_decode  # noqa: E402
from xpu_llm.loading import meta_model  # noqa: E402


def profile_format(dev: torch.device, fmt: str, compiled: bool, new_tokens: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    model = meta_model(shape_config("llama-3-8b"))
    materialise(model, fmt, 64, torch.bfloat16, dev, torch.Generator(device=dev).manual_seed(1))
    model.eval()
    model.setup_caches(1, 128 + new_tokens + 8, dtype=torch.bfloat16, device=dev)
    if compiled:
        compile_decode(model)
    ids = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0)).tolist()

    def run(n: int):
        return generate_tokens(model, ids, SamplingParams(max_new_tokens=n, temperature=0.0), pad_id=0)[1]

    run(4)  # warm-up: kernels, tuning, capture (and compilation)
    stats = run(new_tokens)
    step = list(model.__dict__["_decode_graphs"].values())[-1]  # batch 1, the bucket of the last position
    for _ in range(5):
        step.replay()
    synchronize(dev)
    t = time.perf_counter()
    for _ in range(50):
        step.replay()
    synchronize(dev)
    replay_ms = (time.perf_counter() - t) / 50 * 1e3
    print(f"== {fmt}{' (compiled)' if compiled else ''}: generate_tokens {1e3 / stats.decode_tokens_per_s:.3f} ms "
          f"per token; back-to-back replays {replay_ms:.3f} ms per step")
    reps = 3
    with profile(activities=[getattr(ProfilerActivity, dev.type.upper())]) as prof:
        for _ in range(reps):
            step.replay()
        synchronize(dev)
    kind = getattr(torch.autograd.DeviceType, dev.type.upper())
    events = sorted((e for e in prof.events() if e.device_type == kind),
                    key=lambda e: e.time_range.start)
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        by_name[e.name[:90]][0] += 1
        by_name[e.name[:90]][1] += e.device_time
    busy_ms = sum(v[1] for v in by_name.values()) / reps / 1e3
    per = len(events) // reps
    span_ms = (events[2 * per - 1].time_range.end - events[per].time_range.start) / 1e3  # the middle replay
    print(f"{per} kernels per step, {busy_ms:.3f} ms of kernels, device span {span_ms:.3f} ms "
          f"(gaps {span_ms - busy_ms:.3f} ms)")
    for name, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{us / reps / 1e3:8.3f} ms {n / reps:6.0f}x  {name}")
    del model, step
    device_module(dev).empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--formats", default="sym_int4,bf16")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=15, help="kernel names listed per format")
    ap.add_argument("--device", default=None, help="default: xpu > cuda")
    args = ap.parse_args()
    dev = get_device(args.device)
    if is_cpu(dev):
        sys.exit("decode_profile.py profiles captured device graphs: it needs a GPU (CUDA or XPU)")
    for fmt in args.formats.split(","):
        profile_format(dev, fmt.strip(), args.compile, args.new_tokens, args.top)


if __name__ == "__main__":
    main()
