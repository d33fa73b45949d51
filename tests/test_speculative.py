"""Self-speculative decoding: greedy output equals plain greedy (every draft kind, tiny configs of each family and
SmolLM2, batch 1 and 3), the pieces (verification, rollback, adaptive k, lookup) behave, bad options fail clearly.
The sampling distribution test is in test_speculative_sampling.py."""
from __future__ import annotations

import pytest
import torch

from xpu_llm import LLM, XpuLLMError
from xpu_llm.drafts import LookupDraft, Proposal, default_skip_layers
from xpu_llm.speculative import DraftController, SpeculativeConfig, verify_greedy

KINDS = ("lookup", "layer_skip", "lowbit")


def _padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.fixture(scope="module")
def tiny_llms(tiny_checkpoints):
    return {fam: LLM(path, low_bit=None, dtype=torch.float32, device="cpu", max_seq_len=96)
            for fam, (path, _) in tiny_checkpoints.items()}


TINY_PROMPTS = [[5, 9, 14, 5, 9, 14, 5, 9], [77, 3, 3, 60, 121], [1, 2]]  # repeats give lookup something to find


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_identical_tiny(tiny_llms, kind):
    for fam, llm in tiny_llms.items():
        for rows in (TINY_PROMPTS[:1], TINY_PROMPTS):
            ids, mask = _padded(rows)
            ref = llm.generate_ids(ids, max_new_tokens=24, attention_mask=mask, ignore_eos=True)
            got = llm.generate_ids(ids, max_new_tokens=24, attention_mask=mask, ignore_eos=True, speculative=kind)
            assert torch.equal(ref, got), f"{fam}, {kind}, batch {len(rows)}"


def test_full_acceptance_paths(tiny_llms):
    """A layer_skip draft of all layers proposes what the target would say: every round accepts everything, so
    the all-accepted path (next token from p, the cache moving by k + 1) carries the whole output."""
    llm = tiny_llms["llama"]
    ids, mask = _padded(TINY_PROMPTS)
    ref = llm.generate_ids(ids, max_new_tokens=30, attention_mask=mask, ignore_eos=True)
    spec = {"kind": "layer_skip", "layers": (0, 1), "threshold": 0.05, "threshold_bounds": (0.0, 1.0),
            "adaptive": False, "k_max": 5}
    out, stats = llm._run(TINY_PROMPTS, llm._params(30, 0.0, None, None, None, None, True), speculative=spec)
    assert torch.equal(ref[:, ids.shape[1]:], torch.tensor(out))
    assert stats.acceptance_rate > 0.95 and stats.tokens_per_pass > 4, stats.as_dict()


def test_verify_greedy_rollback_counts():
    """n = longest prefix agreeing with the target's argmax, limited to each row's proposed count."""
    v = 10
    tgt = torch.tensor([[3, 4, 5, 6], [3, 4, 5, 6], [3, 4, 5, 6]])
    logits = torch.nn.functional.one_hot(tgt, v).float()
    drafts = torch.tensor([[3, 4, 9], [3, 4, 5], [3, 4, 5]])
    n, nxt = verify_greedy(logits, Proposal(drafts, torch.tensor([3, 3, 1])))
    assert n.tolist() == [2, 3, 1] and nxt.tolist() == [5, 6, 4]


def test_lookup_continuation():
    d = LookupDraft(ngram_max=3)
    d._index, d._seen = [{}], [0]
    h = [1, 2, 3, 4, 9, 1, 2, 3]
    assert d.continuation(0, h, 3) == [4, 9, 1]  # the trigram 1 2 3 occurred at the start
    h += [7, 2, 3]
    assert d.continuation(0, h, 2) == [7, 2]  # the most recent occurrence of "2 3" wins over the first
    assert d.continuation(0, [5, 6], 4) == []


def test_controller_moves_threshold_and_k():
    cfg = SpeculativeConfig(threshold=0.4, target_acceptance=0.7)
    c = DraftController(cfg, lookup=False)
    c.update(10, 1)  # acceptance far below target: stop drafting sooner
    assert c.threshold > 0.4
    for _ in range(50):
        c.update(10, 10)
    assert c.threshold == cfg.threshold_bounds[0]
    look = DraftController(cfg, lookup=True)
    k0 = look.k_limit
    look.update(4, 4)
    assert look.k_limit == k0 + 1
    for _ in range(20):
        look.update(4, 0)
    assert look.k_limit == cfg.k_min


def test_bad_options(tiny_llms, smollm2_path):
    llm = tiny_llms["llama"]
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(XpuLLMError, match="unknown speculative draft kind"):
        llm.generate_ids(ids, max_new_tokens=4, speculative="medusa")
    with pytest.raises(XpuLLMError, match="k_min"):
        llm.generate_ids(ids, max_new_tokens=4, speculative={"kind": "lookup", "k_min": 3, "k_max": 2})
    with pytest.raises(XpuLLMError, match="unknown speculative options"):
        llm.generate_ids(ids, max_new_tokens=4, speculative={"kind": "lookup", "depth": 3})
    with pytest.raises(XpuLLMError, match="subset of 0..1"):
        llm.generate_ids(ids, max_new_tokens=4, speculative={"kind": "layer_skip", "layers": (0, 5)})
    with pytest.raises(XpuLLMError, match="4-bit format"):
        llm.generate_ids(ids, max_new_tokens=4, speculative={"kind": "lowbit", "low_bit": "sym_int8"})
    four_bit = LLM(smollm2_path, device="cpu", max_seq_len=64)  # the GGUF's own asym_int4
    with pytest.raises(XpuLLMError, match="already in a format of at most 4 bits"):
        four_bit.generate("Hi", max_new_tokens=4, speculative="lowbit")


def test_default_layer_subset():
    for n in (2, 12, 30, 32, 80):
        keep = default_skip_layers(n)
        assert 0 < len(keep) < n
        assert list(keep) == sorted(set(keep)) and keep[0] >= 0 and keep[-1] < n


# ---------------------------------------------------------------------------------------------- SmolLM2

INSTRUCTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one sentence.",
    "List three primary colors.", "Translate 'good morning' into Spanish.", "What is 12 times 7?",
    "Give me a synonym for 'happy'.", "Name the largest planet in the solar system.",
    "Write a Python function that adds two numbers.", "What does a thermometer measure?",
    "Summarise the plot of Cinderella in two sentences.", "How many days are in a leap year?",
    "Suggest a name for a pet goldfish.", "What is the boiling point of water in Celsius?",
    "Describe a rainbow to a child.", "Why is the sky blue?", "Write a short thank-you note to a teacher.",
    "What are the three states of matter?", "Repeat the word 'hello' five times.",
    "Convert 5 kilometres to metres.",
]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return LLM(smollm2_path, low_bit=None, dtype=torch.float32, device="cpu", max_seq_len=192)


GROUPS = [INSTRUCTIONS[i:i + 5] for i in range(0, len(INSTRUCTIONS), 5)]  # batches of 5: rows go their own way


@pytest.fixture(scope="module")
def smol_reference(smol):
    """Plain greedy, 20 chat prompts × 64 tokens (EOS ignored, so every row runs 64 tokens), in batches of 5."""
    return [r.token_ids for g in GROUPS for r in smol.generate(g, max_new_tokens=64, chat=True, ignore_eos=True)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_identical_smollm2(smol, smol_reference, kind):
    """20 prompts × 64 tokens in batches of 5 (each row accepts its own number of tokens per pass), then batch 1
    and batch 3 with EOS on (rows end in different rounds), against plain greedy at the same batch."""
    spec = {"kind": kind, "k_max": 4}
    got = [r for g in GROUPS for r in smol.generate(g, max_new_tokens=64, chat=True, ignore_eos=True,
                                                      speculative=spec)]
    for i, (a, b) in enumerate(zip(smol_reference, got)):
        assert a == b.token_ids, f"{kind}: prompt {i} differs"
    assert sum(r.stats["drafts_accepted"] for r in got[::5]) > 0, got[0].stats
    for rows in (INSTRUCTIONS[:1], INSTRUCTIONS[5:8]):
        ref = smol.generate(rows, max_new_tokens=32, chat=True)
        got = smol.generate(rows, max_new_tokens=32, chat=True, speculative=spec)
        assert [r.token_ids for r in ref] == [g.token_ids for g in got], f"{kind}, batch {len(rows)}"
        assert [r.text for r in ref] == [g.text for g in got]


@pytest.mark.slow
def test_stream_and_stop_string_smollm2(smol):
    plain = smol.generate("Count from 1 to 20.", max_new_tokens=48, chat=True, stop=["7"])[0]
    spec = smol.generate("Count from 1 to 20.", max_new_tokens=48, chat=True, stop=["7"], speculative="lookup")[0]
    assert plain.text == spec.text and plain.finish_reason == spec.finish_reason == "stop"
    pieces = list(smol.stream("Count from 1 to 20.", max_new_tokens=32, chat=True, speculative="lookup"))
    assert "".join(pieces) == smol.generate("Count from 1 to 20.", max_new_tokens=32, chat=True)[0].text


@pytest.mark.slow
def test_llm_default_speculative(smollm2_path):
    llm = LLM(smollm2_path, low_bit=None, dtype=torch.float32, device="cpu", max_seq_len=128, speculative="lookup")
    r = llm.generate("Repeat after me: the cat sat on the mat.", max_new_tokens=24, chat=True)[0]
    assert r.stats["speculative"] == "lookup"
    plain = llm.generate("Repeat after me: the cat sat on the mat.", max_new_tokens=24, chat=True,
                         speculative=False)[0]
    assert "speculative" not in plain.stats and plain.token_ids == r.token_ids


@pytest.mark.slow
def test_benchmark_smoke(smollm2_path, tmp_path, monkeypatch):
    """benchmarks/speculative.py runs (prompt mode on the default 4-bit target, where lowbit is reported as not
    applicable; the random-weight shape mode on its small CPU shape) and writes JSON + markdown."""
    import json
    import sys
    from pathlib import Path
    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    sys.modules.pop("speculative", None)
    import speculative as bench_spec
    out = tmp_path / "spec.json"
    assert bench_spec.main(["--prompts", "1", "--new-tokens", "6", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["rows"]}
    assert set(rows) == {"plain", "lookup", "layer_skip"} and rows["plain"]["speedup"] == 1.0
    assert rows["layer_skip"]["layers"] == list(default_skip_layers(30))
    assert [s["config"] for s in report["skipped"]] == ["lowbit"]
    assert (tmp_path / "spec.md").read_text().count("\n|") >= 4
    shape = tmp_path / "shape.json"
    assert bench_spec.main(["--shape", "tiny", "--out", str(shape)]) == 0
    what = [r["what"] for r in json.loads(shape.read_text())["rows"]]
    assert what[0].startswith("target step") and any(w.startswith("lowbit") for w in what)
