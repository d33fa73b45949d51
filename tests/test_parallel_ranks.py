"""Multi-card runs on the CPU over gloo, one subprocess per rank: tensor parallel (tp 2, 3 on SmolLM2, 4 with
replicated KV heads), pipeline parallel (pp 2, pp 4 with an uneven split) and tp 2 x pp 2, dense and sym_int4.
Each rank's logits must match the single-process run to 1e-4 (float32) and its 32-token greedy continuations
must be identical, batch 1 and 3 (left-padded). A rank that raises ends every rank with its error; a tp 4 rank
loads with well under half the single-process peak memory."""
from __future__ import annotations

import time

import pytest
import torch

from conftest import make_hf_model
from parallel_ranks import check_ok, run_ranks
from parallel_worker import padded
from xpu_llm import LLM

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11, 3, 64], [99, 98, 1, 4, 8]]
SMOL_PROMPTS = [[1, 504, 3458, 282, 4657, 314, 253], [1, 28120, 30], [1, 14961, 1390, 260, 3465]]
# 8 heads over 2 KV heads (tp 4 replicates them), 5 layers (pp 4 is uneven), features that split on groups of 32.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=5, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=256)
MODELS = {
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),  # o / down biases: added once
    "qwen2": ("qwen2", {}),                                               # tied embeddings, q/k/v biases
    "llama": ("llama", {}),
    "llama3_rope": ("llama3_rope", {}),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("par")
    out = {}
    for name, (family, extra) in MODELS.items():
        model = make_hf_model(family, seed=1, **SHAPE, **extra)
        with torch.no_grad():  # random biases everywhere, so that a bias added twice (or never) shows
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and m.bias is not None:
                    m.bias.normal_(0, 0.2)
        model.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def reference(path: str, low_bit: str | None, prompts: list[list[int]], batches=(1, 3)) -> dict:
    llm = LLM(path, low_bit=low_bit, group_size=32, dtype=torch.float32, device="cpu", max_seq_len=64)
    out = {}
    for b in batches:
        ids, mask = padded(prompts[:b])
        out[f"logits{b}"] = llm.logits(ids, attention_mask=mask)
        out[f"greedy{b}"] = llm.generate_ids(ids, max_new_tokens=32, attention_mask=mask, ignore_eos=True)
    return out


def compare(ranks: list[dict], name: str, ref: dict, prompts: list[list[int]], batches=(1, 3)) -> None:
    for rank, res in enumerate(ranks):
        got = res[name]
        for b in batches:
            valid = padded(prompts[:b])[1].bool()
            a, r = got[f"logits{b}"][valid].double(), ref[f"logits{b}"][valid].double()
            err = ((a - r).norm() / r.norm()).item()
            assert err < 1e-4, f"{name} rank {rank} batch {b}: logits differ from one process by {err:.2e}"
            assert got[f"greedy{b}"].tolist() == ref[f"greedy{b}"].tolist(), (
                f"{name} rank {rank} batch {b}: greedy continuation differs from one process")


def run_jobs(world: int, jobs: list[dict], out_dir, timeout_s: float = 240, launcher: str = "torchrun") -> list[dict]:
    results = run_ranks(world, {"jobs": jobs}, str(out_dir), timeout_s=timeout_s, launcher=launcher)
    check_ok(results)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def job(name: str, model: str, tp: int, pp: int, low_bit: str | None, **kw) -> dict:
    return {"name": name, "model": model, "tp": tp, "pp": pp, "low_bit": low_bit, "prompts": PROMPTS, **kw}


LOW_BITS = [None, "sym_int4"]


def test_two_ranks_tp2_and_pp2(tiny, tmp_path):
    """Started the way Intel MPI's mpirun starts ranks (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID)."""
    jobs = [job(f"tp2-{lb}", tiny["llama_bias"], 2, 1, lb) for lb in LOW_BITS]
    jobs += [job(f"pp2-{lb}", tiny["qwen2"], 1, 2, lb) for lb in LOW_BITS]
    jobs.append(job("apply_tp", tiny["qwen2"], 2, 1, "sym_int4", apply_tp=True))  # shard a loaded model
    ranks = run_jobs(2, jobs, tmp_path, launcher="mpi")
    for lb in LOW_BITS:
        compare(ranks, f"tp2-{lb}", reference(tiny["llama_bias"], lb, PROMPTS), PROMPTS)
        compare(ranks, f"pp2-{lb}", reference(tiny["qwen2"], lb, PROMPTS), PROMPTS)
    compare(ranks, "apply_tp", reference(tiny["qwen2"], "sym_int4", PROMPTS), PROMPTS)
    assert ranks[0]["apply_tp"]["info"]["tp"] == 2
    stages = [list(r) for r in ranks[0]["pp2-None"]["info"]["stage_layers"]]
    assert stages in ([[0, 3], [3, 5]], [[0, 2], [2, 5]]), stages


def test_four_ranks_tp4_pp4_and_tp2_pp2(tiny, tmp_path):
    jobs = []
    for lb in LOW_BITS:
        jobs += [job(f"tp4-{lb}", tiny["qwen2"], 4, 1, lb),           # 2 KV heads on 4 ranks: replicated
                 job(f"pp4-{lb}", tiny["llama"], 1, 4, lb),           # 5 layers over 4 stages
                 job(f"tp2pp2-{lb}", tiny["llama3_rope"], 2, 2, lb)]
    jobs.append(job("sampled", tiny["llama"], 2, 2, None, batches=[], sample=True))
    jobs.append(job("auto", tiny["llama"], "auto", "auto", None, batches=[3]))  # the plan for 4 ranks
    ranks = run_jobs(4, jobs, tmp_path)
    for lb in LOW_BITS:
        compare(ranks, f"tp4-{lb}", reference(tiny["qwen2"], lb, PROMPTS), PROMPTS)
        compare(ranks, f"pp4-{lb}", reference(tiny["llama"], lb, PROMPTS), PROMPTS)
        compare(ranks, f"tp2pp2-{lb}", reference(tiny["llama3_rope"], lb, PROMPTS), PROMPTS)
    stages = ranks[0]["pp4-None"]["info"]["stage_layers"]
    assert len(stages) == 4 and sorted(b - a for a, b in stages) == [1, 1, 1, 2], stages
    compare(ranks, "auto", reference(tiny["llama"], None, PROMPTS, batches=[3]), PROMPTS, batches=[3])
    assert (ranks[0]["auto"]["info"]["tp"], ranks[0]["auto"]["info"]["pp"]) == (4, 1)  # tp first, within a host
    sampled = [r["sampled"]["sampled"].tolist() for r in ranks]
    assert all(s == sampled[0] for s in sampled), "ranks sampled different tokens"


@pytest.mark.slow
def test_smollm2_tp3(smollm2_path, tmp_path):
    """SmolLM2: 9 heads over 3 KV heads, GGUF Q4_1 blocks kept as asym_int4 (group 32), tied Q8_0 embedding."""
    jobs = [{"name": "smol", "model": smollm2_path, "tp": 3, "pp": 1, "low_bit": "auto", "prompts": SMOL_PROMPTS}]
    ranks = run_jobs(3, jobs, tmp_path, timeout_s=300)
    compare(ranks, "smol", reference(smollm2_path, "auto", SMOL_PROMPTS), SMOL_PROMPTS)


@pytest.mark.parametrize("how", ["raises", "dies"])
def test_failed_rank_ends_every_rank(tiny, tmp_path, how):
    """Rank 1 of a 3-stage pipeline fails mid-generation: the others end with its error (or, when it dies
    without a word, with 'lost contact') long before the 60 s timeout, and no process is left."""
    spec = job("fail", tiny["llama"], 1, 3, None, fail_rank=1, fail_after=4, fail_how=how)
    t0 = time.monotonic()
    results = run_ranks(3, {"jobs": [spec]}, str(tmp_path), timeout_s=90, dist_timeout_s=60)
    elapsed = time.monotonic() - t0
    assert all(r.returncode not in (0, None) for r in results), [(r.rank, r.returncode) for r in results]
    expect = "injected failure on rank 1" if how == "raises" else "lost contact"
    for r in results:
        if how == "dies" and r.rank == 1:
            continue
        assert expect in r.stderr, f"rank {r.rank} did not report the failure:\n{r.stderr[-2000:]}"
    assert elapsed < 45, f"the ranks took {elapsed:.0f} s to end"


def test_missing_rank_is_a_timeout_error(tiny, tmp_path):
    """Only rank 0 of 2 starts: it gives up after the rendezvous timeout with a message, not a hang."""
    spec = job("alone", tiny["llama"], 2, 1, None)
    (r,) = run_ranks(2, {"jobs": [spec]}, str(tmp_path), timeout_s=60, dist_timeout_s=3, start=[0])
    assert r.returncode not in (0, None), r.stderr[-2000:]
    assert "could not join the 2-rank group" in r.stderr, r.stderr[-2000:]


def test_tp4_load_memory_per_rank(tmp_path):
    """Each rank of tp 4 reads only its slices: its peak while loading stays under 40% of one process's."""
    import json

    from safetensors.torch import save_file
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 512,
           "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
           "vocab_size": 4096, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "hidden_act": "silu"}
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    d, f, v = 512, 2048, 4096
    tensors = {"model.embed_tokens.weight": torch.randn(v, d, generator=g), "model.norm.weight": torch.ones(d),
               "lm_head.weight": torch.randn(v, d, generator=g)}
    for i in range(8):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            tensors[p + f"self_attn.{n}_proj.weight"] = torch.randn(d, d, generator=g)
        tensors[p + "mlp.gate_proj.weight"] = torch.randn(f, d, generator=g)
        tensors[p + "mlp.up_proj.weight"] = torch.randn(f, d, generator=g)
        tensors[p + "mlp.down_proj.weight"] = torch.randn(d, f, generator=g)
        tensors[p + "input_layernorm.weight"] = torch.ones(d)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(d)
    save_file(tensors, str(folder / "model.safetensors"))
    weights_kib = sum(t.numel() * t.element_size() for t in tensors.values()) // 1024
    del tensors
    spec = lambda tp: {"jobs": [{"name": "mem", "model": str(folder), "tp": tp, "pp": 1, "memory": True}]}  # noqa
    single = run_ranks(1, spec(1), str(tmp_path / "one"))
    check_ok(single)
    four = run_ranks(4, spec(4), str(tmp_path / "four"))
    check_ok(four)
    one_peak = torch.load(tmp_path / "one" / "rank0.pt")["mem"]["peak_kib"]
    peaks = [torch.load(tmp_path / "four" / f"rank{r}.pt")["mem"]["peak_kib"] for r in range(4)]
    assert one_peak > 0.9 * weights_kib, f"single-process peak {one_peak} KiB is below the weights' size"
    print(f"load peak: one process {one_peak} KiB, tp 4 ranks {peaks} KiB, weights {weights_kib} KiB")
    assert max(peaks) < 0.4 * one_peak, f"tp 4 rank peaks {peaks} KiB vs single process {one_peak} KiB"


@pytest.mark.slow
def test_torchrun_cli_generate_pp2_prints_the_single_process_text(smollm2_path, tmp_path):
    """`torchrun --nproc-per-node 2 -m xpu_llm.cli generate --pp 2 PROMPT`: rank 0 prints exactly what one
    process prints, the other rank nothing."""
    import os
    import subprocess
    import sys

    from parallel_ranks import free_port
    args = ["generate", "-n", "12", "--device", "cpu", "--dtype", "float32", "The capital of France is"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XPU_LLM_DIST_TIMEOUT": "60"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port()), "-m", "xpu_llm.cli"]
    multi = subprocess.run(torchrun + args + ["--pp", "2"], env=env, capture_output=True, text=True, timeout=240)
    assert multi.returncode == 0, multi.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "xpu_llm.cli"] + args, env=env, capture_output=True, text=True,
                            timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    assert single.stdout.strip() and multi.stdout == single.stdout


@pytest.mark.slow
def test_parallel_benchmark_smoke(tmp_path):
    """benchmarks/parallel.py on two CPU ranks, tiny shape: it runs every mode and writes JSON + markdown."""
    import json
    import math
    import os
    import subprocess
    import sys
    from pathlib import Path

    from parallel_ranks import free_port
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "parallel.py"
    out = tmp_path / "parallel.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(script), "--shape", "tiny", "--formats", "sym_int4", "--repeats", "1", "--new-tokens", "4",
           "--prompt-len", "8", "--pp-batch", "4", "--out", str(out)]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "XPU_LLM_DIST_TIMEOUT": "60"},
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    modes = {(r["mode"], r["batch"]) for r in report["rows"]}
    assert modes == {("1 card", 1), ("1 card", 4), ("tp 2", 1), ("pp 2", 4)}
    for r in report["rows"]:
        assert math.isfinite(r["decode_tok_s"]) and r["decode_tok_s"] > 0 and r["new_tokens"] == 4 * r["batch"]
    assert len(report["speedups"]) == 2 and (tmp_path / "parallel.md").read_text() in p.stdout
