"""The captured decode steps' bookkeeping, run on the CPU: with xpu_llm.graphs switched on there, each step runs
eagerly through the same buffers and cache-slot buckets it is captured with on a GPU (tests/test_gpu.py replays
real graphs). Bucketed steps give the tokens of the eager step that reads exactly the slots it needs."""
from __future__ import annotations

import pytest
import torch

from xpu_llm import LLM
from xpu_llm import graphs as graphs_mod
from xpu_llm.graphs import GraphedForward, GraphedStep, kv_bucket


def test_kv_bucket():
    assert [kv_bucket(n, 2048) for n in (1, 255, 256, 257, 512, 513, 1500, 2048)] == \
        [256, 256, 256, 512, 512, 1024, 2048, 2048]
    assert kv_bucket(5, 64) == 64 and kv_bucket(300, 300) == 300 and kv_bucket(257, 300) == 300
    for bad in (0, 2049):
        with pytest.raises(AssertionError, match="cache slots"):
            kv_bucket(bad, 2048)


@pytest.mark.parametrize("speculative", [None, "lookup", "layer_skip", "lowbit"])
def test_bucketed_steps_equal_the_exact_eager_steps(tiny_checkpoints, monkeypatch, speculative):
    """Left-padded batch of 2 whose decode crosses the 256-slot bucket: the same tokens as the eager loop (which
    attends to exactly pos + 1 slots), with one step per (batch, bucket) reached, on a 600-slot cache."""
    path = tiny_checkpoints["llama"][0]
    llm = LLM(path, low_bit=None, dtype=torch.float32, device="cpu", max_seq_len=600)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (2, 250), generator=gen)
    ids[1, :7] = 0
    mask = (ids != 0).long()
    want = llm.generate_ids(ids, max_new_tokens=20, attention_mask=mask, ignore_eos=True).tolist()
    monkeypatch.setattr(graphs_mod, "graphs_enabled", lambda model: True)
    for _ in range(2):  # the second call reuses the first call's steps
        got = llm.generate_ids(ids, max_new_tokens=20, attention_mask=mask, ignore_eos=True,
                               speculative=speculative)
        assert got.tolist() == want
    if speculative is None:
        steps = llm.model.__dict__["_decode_graphs"]
        assert set(steps) == {(2, 256), (2, 512)}
        assert all(isinstance(g, GraphedStep) and g.kv_len == key[1] for key, g in steps.items())
    else:
        passes = llm.model.__dict__["_forward_graphs"]
        assert passes and {g.kv_len for g in passes.values()} <= {256, 512}
        assert all(isinstance(g, GraphedForward) for g in passes.values())
    llm.model.setup_caches(2, 300)  # a new cache: the next call drops every step captured on the old one
    llm.max_seq_len = 300
    assert llm.generate_ids(ids, max_new_tokens=20, attention_mask=mask, ignore_eos=True).tolist() == want
    assert set(llm.model.__dict__["_decode_graphs"]) == {(2, 256), (2, 300)}


def test_bucketed_step_logits_equal_the_exact_step(tiny_checkpoints, monkeypatch):
    """Logits of the bucketed step against the eager step at every slot from 250 to 265 (the 256 boundary)."""
    from xpu_llm.generate import decode_one_token, make_batch, prefill

    llm = LLM(tiny_checkpoints["llama"][0], low_bit=None, dtype=torch.float32, device="cpu", max_seq_len=600)
    model = llm.model
    model.setup_caches(2, 600)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 100, (n,), generator=gen).tolist() for n in (250, 243)]
    batch = make_batch(prompts, 0, torch.device("cpu"))
    tok = prefill(model, batch).argmax(-1)
    monkeypatch.setattr(graphs_mod, "graphs_enabled", lambda model: True)
    step = graphs_mod.decoder(model, 2, batch.pad)
    for slot in range(250, 266):
        got = step(tok, slot).clone()
        want = decode_one_token(model, tok, slot, batch.pad)  # writes the same keys and values at `slot`
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        tok = want.argmax(-1)
    assert set(model.__dict__["_decode_graphs"]) == {(2, 256), (2, 512)}
