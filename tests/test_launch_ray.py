"""RayLLM on a local Ray (CPU ranks over gloo): tp 3 on SmolLM2 (plain, and self-speculative with layer_skip and
lookup drafts) and tp 2 x pp 2 on a tiny Llama give the tokens (and logits) of the single-process run; a plan
larger than the cluster fails fast with the counts; bad input is the single-process error and keeps the ranks; a rank killed mid-generation ends the call naming it within 60 s
and leaves no rank process or placement group behind."""
from __future__ import annotations

import os
import time

import pytest
import torch

from conftest import make_hf_model
from xpu_llm import LLM
from xpu_llm.errors import GenerationInputError, XpuLLMError

ray = pytest.importorskip("ray")
from xpu_llm.launch import RayLLM  # noqa: E402
from xpu_llm.launch.ray_llm import RankFailure  # noqa: E402

pytestmark = pytest.mark.slow
EXACT = dict(dtype=torch.float32, group_size=32, max_seq_len=128, device="cpu")
PROMPTS = ["The capital of France is", "List three colours:"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=4, object_store_memory=100 * 2**20, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ray_tiny") / "llama"
    make_hf_model("llama", seed=3, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=256).save_pretrained(path)
    return str(path)


def _pids_gone(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.5)
    return False


def _no_placement_groups(within_s: float = 15) -> bool:
    """Every placement group removed (removal completes asynchronously)."""
    from ray.util.placement_group import placement_group_table
    deadline = time.monotonic() + within_s
    while not all(pg["state"] == "REMOVED" for pg in placement_group_table().values()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_tp3_smollm2_matches_single_process(smollm2_path):
    ref = LLM(smollm2_path, **EXACT).generate(PROMPTS, max_new_tokens=16)
    with RayLLM(smollm2_path, tp=3, **EXACT) as llm:
        assert [w["pid"] for w in llm.where] and len({w["pid"] for w in llm.where}) == 3
        got = llm.generate(PROMPTS, max_new_tokens=16)
        assert [g.token_ids for g in got] == [r.token_ids for r in ref]
        assert "".join(llm.stream(PROMPTS[0], max_new_tokens=16)) == ref[0].text
        with pytest.raises(GenerationInputError, match="max_new_tokens"):  # the single-process error, ranks kept
            llm.generate(PROMPTS[0], max_new_tokens=0)
        assert llm.generate(PROMPTS[1], max_new_tokens=16)[0].token_ids == ref[1].token_ids
        for kind in ("lookup", "layer_skip"):  # self-speculative decoding under tp 3: the plain greedy tokens
            spec = llm.generate(PROMPTS, max_new_tokens=16, speculative=kind)
            assert [g.token_ids for g in spec] == [r.token_ids for r in ref], kind
            assert spec[0].stats["speculative"] == kind, spec[0].stats
        assert spec[0].stats["tokens_per_target_pass"] > 1  # layer_skip accepted drafts
        with pytest.raises(XpuLLMError, match="lowbit draft is not available with tp"):
            llm.generate(PROMPTS[0], max_new_tokens=4, speculative="lowbit")
        pids = [w["pid"] for w in llm.where]
    assert _pids_gone(pids, 30) and _no_placement_groups()


@pytest.mark.parametrize("low_bit", [None, "sym_int4"])
def test_tp2_pp2_tiny_matches_single_process(tiny_llama, low_bit):
    single = LLM(tiny_llama, low_bit=low_bit, **EXACT)
    ids = torch.tensor([[5, 17, 33, 2, 90, 41, 7], [11, 3, 64, 8, 1, 9, 12]])
    want = single.logits(ids)
    ref = single.generate_ids(ids, max_new_tokens=24, ignore_eos=True)
    with RayLLM(tiny_llama, tp=2, pp=2, low_bit=low_bit, **EXACT) as llm:
        assert [s.stage for s in llm.placement.slots] == [0, 0, 1, 1]
        assert (llm.logits(ids) - want).abs().max().item() < 1e-4
        got = llm.generate_ids(ids, max_new_tokens=24, ignore_eos=True)
        assert torch.equal(got, ref)


def test_plan_larger_than_cluster_fails_fast(tiny_llama):
    t0 = time.monotonic()
    with pytest.raises(XpuLLMError, match=r"needs 8 CPU rank slots \(tp 4 x pp 2\), the cluster has 4"):
        RayLLM(tiny_llama, tp=4, pp=2, **EXACT)
    assert time.monotonic() - t0 < 10
    assert _no_placement_groups()
    with pytest.raises(XpuLLMError, match="tp and pp as positive integers"):
        RayLLM(tiny_llama, tp="auto")


def test_killed_rank_ends_the_call_and_leaves_nothing(smollm2_path):
    llm = RayLLM(smollm2_path, pp=2, **dict(EXACT, max_seq_len=512))
    pids = [w["pid"] for w in llm.where]
    t0 = None
    with pytest.raises(RankFailure, match=r"rank 1 .*failed while streaming: .*ray\.kill") as err:
        for i, _ in enumerate(llm.stream("Once upon a time, in a land far away,", max_new_tokens=400)):
            if i == 0:
                ray.kill(llm._actors[1])
                t0 = time.monotonic()
    assert t0 is not None and time.monotonic() - t0 < 60, "the call should end within 60 s of the rank's death"
    assert "the job was stopped" in str(err.value)
    assert _pids_gone(pids, 60) and _no_placement_groups()
    with pytest.raises(RankFailure, match="shut down"):
        llm.generate("a", max_new_tokens=2)
