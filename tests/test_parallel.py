"""Single-process parts of multi-card support: launcher detection, tensor-parallel sizes and layouts, column /
row slicing of checkpoints and low-bit payloads (exactly the single-card groups), balanced pipeline cuts, and the
placement plan (its byte counts against a loaded model, its choices and its explanations)."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from conftest import make_hf_model
from xpu_llm import LLM, XpuLLMError
from xpu_llm.config import ModelConfig
from xpu_llm.lowbit.formats import LOW_BIT_NAMES, get_format
from xpu_llm.parallel import detect_launch
from xpu_llm.parallel.plan import (GiB, Budget, best_for_cards, choose, estimate, parse_bytes, plan_report,
                                   preset_config, stage_layers, total_bytes)
from xpu_llm.parallel.tensor import TPLayout, split, valid_tp_sizes
from xpu_llm.shard_io import read_columns, slice_columns, slice_rows


def tiny_config(**kw) -> ModelConfig:
    base = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=5,
                num_attention_heads=8, num_key_value_heads=2, vocab_size=250)
    return ModelConfig.from_hf({**base, **kw})


# ---------------------------------------------------------------------------------------------- launchers

def test_detect_launch_from_each_launcher():
    torchrun = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                              "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.local_world_size,
            torchrun.master_addr, torchrun.master_port) == (3, 8, 1, 2, "10.0.0.1", 1234)
    impi = detect_launch({"PMI_RANK": "5", "PMI_SIZE": "6", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"})
    assert (impi.rank, impi.world_size, impi.local_rank, impi.local_world_size, impi.launcher) == (5, 6, 2, 3, "mpi")
    assert impi.master_addr == "127.0.0.1" and impi.master_port == 29500
    ompi = detect_launch({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                          "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert (ompi.rank, ompi.world_size, ompi.local_rank) == (1, 2, 1)
    assert detect_launch({}) is None


def test_tp_without_a_launch_says_how_to_start(tmp_path):
    make_hf_model("llama", **{"num_hidden_layers": 2}).save_pretrained(tmp_path)
    with pytest.raises(XpuLLMError, match="torchrun --nproc-per-node"):
        LLM(str(tmp_path), low_bit=None, device="cpu", tp=2)


# ---------------------------------------------------------------------------------------------- tensor parallel

def test_smollm2_tp2_fails_listing_valid_sizes(smollm2_path):
    with pytest.raises(XpuLLMError, match=r"tp=2 .*9 attention heads.*Valid tensor-parallel sizes: 1, 3, 9"):
        LLM(smollm2_path, device="cpu", tp=2)


def test_valid_sizes_follow_heads_kv_heads_and_groups():
    cfg = tiny_config()                                   # 8 heads, 2 KV heads, head_dim 16
    assert valid_tp_sizes(cfg) == [1, 2, 4, 8]
    assert valid_tp_sizes(cfg, unit=32) == [1, 2, 4]      # tp 8: 16 attention columns per rank < one group
    assert valid_tp_sizes(tiny_config(num_attention_heads=6, num_key_value_heads=6, hidden_size=96)) == [1, 2, 3, 6]


@pytest.mark.parametrize("tp", [2, 3, 6, 12])
def test_layout_covers_everything_once(tp):
    cfg = tiny_config(num_attention_heads=24, num_key_value_heads=6, hidden_size=384, intermediate_size=352)
    unit = 16
    layouts = [TPLayout.build(cfg, tp, r, unit) for r in range(tp)]
    assert [x for lay in layouts for x in range(*lay.heads)] == list(range(24))
    ffn = [x for lay in layouts for x in range(*lay.ffn)]
    assert ffn == list(range(352)) and all(lay.ffn[0] % unit == 0 for lay in layouts)
    assert [x for lay in layouts for x in range(*lay.vocab)] == list(range(cfg.vocab_size))
    for lay in layouts:  # every query head of a rank uses a KV head that rank holds
        group = cfg.n_heads // cfg.n_kv_heads
        assert {h // group for h in range(*lay.heads)} <= set(range(*lay.kv_heads))
    if tp > cfg.n_kv_heads:
        assert all(lay.kv_heads[1] - lay.kv_heads[0] == 1 for lay in layouts)


def test_split_is_balanced():
    assert [split(10, 4, i) for i in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_column_slices_of_payloads_are_the_single_card_groups():
    """A group-aligned column cut of any format's payload equals quantizing those columns on their own."""
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    for name in LOW_BIT_NAMES:
        fmt = get_format(name)
        for g in (32, 64):
            q = fmt.quantize(w, g)
            for a, b in [(0, 64), (64, 192), (192, 256)]:
                got = slice_columns(q, 256, a, b)
                want = fmt.quantize(w[:, a:b], g)
                assert all(torch.equal(got[k], want[k]) for k in want), (name, g, a, b)
            rows = slice_rows(q, [(0, 8), (40, 48)])
            want = fmt.quantize(torch.cat([w[0:8], w[40:48]]), g)
            assert all(torch.equal(rows[k], want[k]) for k in want), (name, g)


def test_read_columns_reads_only_the_asked_columns(tmp_path):
    from safetensors.torch import save_file

    from xpu_llm.safetensors_io import read_header
    tensors = {"a": torch.randn(37, 53), "b": torch.randn(64, 30).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    entries = read_header(str(tmp_path / "x.safetensors"))
    for name, t in tensors.items():
        for a, b in [(0, 5), (7, 30)]:
            got = read_columns(entries[name], a, b, chunk_bytes=200)  # many row blocks
            assert torch.equal(got, t[:, a:b]), name


# ---------------------------------------------------------------------------------------------- pipeline cuts

def test_stage_layers_minimise_the_largest_stage():
    for costs, pp, first, last in [([1.0] * 5, 4, 0.0, 0.0), ([1.0] * 7, 3, 2.0, 0.5), ([3, 1, 1, 1, 3, 2], 3, 0, 1)]:
        cut = stage_layers([float(c) for c in costs], pp, first, last)
        assert [x for r in cut for x in r] == list(range(len(costs))) and all(len(r) for r in cut)

        def worst(bounds, costs=costs, pp=pp, first=first, last=last):
            stages = [costs[a:b] for a, b in zip((0, *bounds), (*bounds, len(costs)))]
            return max(sum(s) + (first if i == 0 else 0) + (last if i == pp - 1 else 0) for i, s in enumerate(stages))
        best = min(worst(b) for b in itertools.combinations(range(1, len(costs)), pp - 1))
        assert worst([r.start for r in cut[1:]]) == pytest.approx(best)
    with pytest.raises(XpuLLMError, match="between 1 and 5"):
        stage_layers([1.0] * 5, 6)


# ---------------------------------------------------------------------------------------------- plans

@pytest.mark.parametrize("family,low_bit", [("llama", "sym_int4"), ("qwen2", "fp8_e4m3"), ("llama", None)])
def test_plan_counts_the_bytes_a_loaded_model_holds(tmp_path, family, low_bit):
    """The plan's weight bytes equal the tensors of the model LLM actually loads (float32, group 32)."""
    make_hf_model(family, intermediate_size=128).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), low_bit=low_bit, group_size=32, dtype=torch.float32, device="cpu")
    held = {id(t): t.numel() * t.element_size() for t in list(llm.model.parameters()) + list(llm.model.buffers())}
    # rope tables and caches are not weights
    for name, t in llm.model.named_buffers():
        if "rope" in name or "cache" in name:
            held.pop(id(t), None)
    assert total_bytes(llm.config, Budget(low_bit, 32, act_bytes=4)) == sum(held.values())


def test_plan_choices_for_the_readme_shapes():
    a770 = parse_bytes("16GB")
    assert a770 == 16 * GiB and parse_bytes("512MiB") == 512 * 2**20
    p = choose(preset_config("llama-2-70b"), 8, a770, Budget("fp8"))
    assert (p.tp, p.pp) == (2, 3) and p.fits and p.peak.total <= 0.9 * a770
    assert choose(preset_config("llama-3-8b"), 8, a770, Budget("sym_int4")).cards == 1
    full = best_for_cards(preset_config("qwen2-72b"), 8, a770, Budget("sym_int4"))
    assert (full.tp, full.pp) == (8, 1)  # 29568 MLP features split unevenly on group boundaries
    with pytest.raises(XpuLLMError, match=r"does not fit 4 card.*It fits 6 cards.*In sym_int4 it fits"):
        choose(preset_config("llama-2-70b"), 4, a770, Budget("fp8"))
    # KV cache: batch and length are counted
    small, big = (estimate(preset_config("llama-3-8b"), 1, 1, Budget("sym_int4", batch=n)) for n in (1, 16))
    assert big.peak.kv_cache == 16 * small.peak.kv_cache > 0


def test_plan_command(capsys):
    from xpu_llm.cli import main
    assert main(["plan", "llama-2-70b", "--cards", "8", "--card-memory", "16GB", "--low-bit", "sym_int4",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["fits"] and rep["tp"] * rep["pp"] == rep["cards_used"] <= 8
    assert main(["plan", "llama-2-70b", "--cards", "2", "--card-memory", "16GB", "--low-bit", "fp8"]) == 1
    assert "does not fit" in capsys.readouterr().out
    rep = plan_report(None, 2, "16GB")  # the embedded SmolLM2 by its own file's format
    assert rep["low_bit"] == "asym_int4" and rep["fits"] and rep["cards_used"] == 1
