"""Speculative sampling keeps the target's distribution exactly: on a tiny model with a 6-token vocabulary, the joint
distribution of 4 sampled tokens (6^4 cells) over 20,000 draws is checked by a chi-square goodness-of-fit test
against the exact distribution computed by Hugging Face transformers in float64. Plain sampling passes the same
test (the test is sound); speculative sampling passes it for every draft kind; an acceptance rule with the ratio
upside down (min(1, q/p)) fails it."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import make_hf_model
from xpu_llm import LLM

V = 6  # vocabulary
NEW = 4  # tokens per draw: the first from the prefill, the rest through draft + verification rounds
DRAWS = 20_000
TEMPERATURE = 1.0
PROMPT = [1, 2, 3, 1, 2]  # repeats, so that the lookup draft proposes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Small widths: 20,000 rows go through every forward at once.
    hf = make_hf_model("llama", seed=3, vocab_size=V, num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                       num_attention_heads=2, num_key_value_heads=1).double()
    path = tmp_path_factory.mktemp("spec_sampling") / "llama"
    hf.float().save_pretrained(path)
    llm = LLM(str(path), low_bit=None, dtype=torch.float32, device="cpu", max_seq_len=len(PROMPT) + NEW + 4)
    return hf.double(), llm


def exact_joint(hf) -> torch.Tensor:
    """P(t1..t4 | prompt) for all V^4 sequences [V]*4, from float64 conditionals of every V^3 prefix."""
    prefixes = torch.tensor(list(itertools.product(range(V), repeat=NEW - 1)))
    ids = torch.cat([torch.tensor(PROMPT).expand(len(prefixes), -1), prefixes], 1)
    with torch.no_grad():
        logp = (hf(ids).logits[:, len(PROMPT) - 1:].double() / TEMPERATURE).log_softmax(-1)  # [V^3, NEW, V]
    joint = torch.zeros([V] * NEW, dtype=torch.float64)
    for row, pre in enumerate(prefixes.tolist()):
        lp = sum(logp[row, i, pre[i]] for i in range(NEW - 1))
        joint[tuple(pre)] = (lp + logp[row, NEW - 1]).exp()
    assert abs(float(joint.sum()) - 1) < 1e-9
    return joint.flatten()


def chi2_pvalue(samples: list[list[int]], expected_p: torch.Tensor) -> float:
    """Goodness of fit of the sequences to `expected_p` (cells with expected count < 5 pooled into one)."""
    codes = torch.tensor([sum(t * V ** (NEW - 1 - i) for i, t in enumerate(s)) for s in samples])
    observed = torch.bincount(codes, minlength=V ** NEW).double()
    expected = expected_p * len(samples)
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def draw(llm, seed: int, speculative) -> list[list[int]]:
    params = llm._params(NEW, TEMPERATURE, None, None, seed, None, ignore_eos=True)
    out, stats = llm._run([PROMPT] * DRAWS, params, speculative=speculative)
    assert all(len(o) == NEW for o in out)
    if speculative:
        assert stats.proposed > DRAWS / 2, stats.as_dict()  # speculation really happened on most rows
    return out


def spec(kind: str, **kw) -> dict:
    # reference_step off: the first decode round already speculates; k_max 3 covers every token after the first
    return {"kind": kind, "reference_step": False, "k_max": 3, **kw}


def flipped_ratio(p_d, q_d, u):
    return u * p_d < q_d  # accept with min(1, q/p): a plausible bug


@pytest.fixture(scope="module")
def joint(tiny):
    return exact_joint(tiny[0])


@pytest.mark.slow
def test_plain_sampling_fits_exact(tiny, joint):
    assert chi2_pvalue(draw(tiny[1], 11, False), joint) > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["layer_skip", "lowbit", "lookup"])
def test_speculative_sampling_fits_exact(tiny, joint, kind):
    assert chi2_pvalue(draw(tiny[1], 12, spec(kind, threshold=0.05)), joint) > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["layer_skip", "lookup"])
def test_wrong_acceptance_rule_fails(tiny, joint, kind):
    assert chi2_pvalue(draw(tiny[1], 12, spec(kind, threshold=0.05, accept_rule=flipped_ratio)), joint) < 0.01
