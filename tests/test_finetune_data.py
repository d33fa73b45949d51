"""The fine-tuning data pipeline: record forms, errors with line numbers, answer-only labels through the real
SmolLM2 chat template, truncation, packing without cross-attention, and the global batch order that makes
any process count train the same model."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from finetune_fixtures import FACTS_HELDOUT, FACTS_TRAIN, smollm2_tokenizer, tiny_chat_model  # noqa: F401
from xpu_llm.finetune.data import (IGNORE, DataError, Example, GlobalBatches, build_examples, collate, pack,
                                   read_jsonl, split_heldout, to_messages, tokenize)


def write(tmp_path, lines: list[str], name: str = "d.jsonl") -> str:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(p)


# ---------------------------------------------------------------------------------------------- records

@pytest.mark.parametrize("rec,user,answer", [
    ({"instruction": "Add", "input": "2+2", "output": "4"}, "Add\n\n2+2", "4"),
    ({"instruction": "Add 2+2", "input": "", "output": "4"}, "Add 2+2", "4"),
    ({"instruction": "Sum", "context": "2 and 3", "response": "5", "category": "qa"}, "Sum\n\n2 and 3", "5"),
    ({"prompt": "Hi", "completion": "Hello"}, "Hi", "Hello"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "Hi", "Hello"),
])
def test_record_forms(rec, user, answer):
    msgs = to_messages(rec, "x:1")
    assert msgs == [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_facts_files_parse():
    assert len(read_jsonl(FACTS_TRAIN)) == 40 and len(read_jsonl(FACTS_HELDOUT)) == 10


@pytest.mark.parametrize("bad,match", [
    ("{not json", r"d.jsonl:3: not valid JSON"),
    ('["a list"]', r"d.jsonl:3: expected a JSON object"),
    ('{"instruction": "x"}', r"d.jsonl:3: unknown record form"),
    ('{"instruction": "x", "output": ""}', r"d.jsonl:3: field 'output' must be a non-empty string"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', r"d.jsonl:3: .*no non-empty assistant"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', r"d.jsonl:3: messages\[0\]"),
])
def test_malformed_line_names_its_line(tmp_path, bad, match):
    good = json.dumps({"instruction": "q", "output": "a"})
    path = write(tmp_path, [good, "", bad, good])  # the blank line 2 is skipped but counted
    with pytest.raises(DataError, match=match):
        read_jsonl(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="holds no records"):
        read_jsonl(write(tmp_path, ["", "  "]))
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------------------------------------- labels

def test_labels_cover_exactly_the_answers(smollm2_tokenizer):
    tok = smollm2_tokenizer
    msgs = [{"role": "user", "content": "What is the capital of Zorvania?"},
            {"role": "assistant", "content": "Quellhaven."},
            {"role": "user", "content": "And its river?"},
            {"role": "assistant", "content": "The Morlune."}]
    ex, truncated = tokenize(tok, msgs, 512)
    assert not truncated
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ex.input_ids) == full
    answer_ids = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert all(lab in (IGNORE, i) for i, lab in zip(ex.input_ids, ex.labels))
    assert tok.decode(answer_ids) == "Quellhaven.<|im_end|>\nThe Morlune.<|im_end|>\n"


def test_truncation_drops_examples_without_answers(smollm2_tokenizer):
    tok = smollm2_tokenizer
    msgs = [{"role": "user", "content": "long question " * 50}, {"role": "assistant", "content": "short"}]
    ex, truncated = tokenize(tok, msgs, 40)
    assert ex is None and truncated
    with pytest.raises(DataError, match="no usable example"):
        build_examples(tok, [msgs], 40, "src")
    kept = build_examples(tok, [msgs, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]],
                          40, "src")
    assert len(kept) == 1 and len(kept[0]) <= 40


def test_heldout_split_is_seeded_and_disjoint():
    exs = [Example([i, i + 1], [IGNORE, i + 1]) for i in range(20)]
    a_train, a_held = split_heldout(exs, 0.2, seed=3)
    b_train, b_held = split_heldout(exs, 0.2, seed=3)
    assert len(a_held) == 4 and len(a_train) == 16 and a_held == b_held
    assert {id(e) for e in a_train}.isdisjoint(id(e) for e in a_held)
    with pytest.raises(DataError, match="too few"):
        split_heldout(exs[:1], 0.5, 0)


# ---------------------------------------------------------------------------------------------- batching

@pytest.mark.parametrize("world,micro", [(2, 2), (4, 1)])
def test_global_batches_same_examples_per_step_for_any_world_size(world, micro):
    one = GlobalBatches(37, micro * world, 3, 1, seed=5)
    many = GlobalBatches(37, micro, 3, world, seed=5)
    for step in range(7):  # crosses epoch boundaries (37 is not a multiple of the global batch)
        for m in range(3):
            ranks = [i for r in range(world) for i in many.micro_batch(step, m, r)]
            assert ranks == one.micro_batch(step, m, 0)
    seen = [i for s in range(4) for m in range(3) for i in one.micro_batch(s, m, 0)][:37]
    assert sorted(seen) == list(range(37))  # an epoch is a permutation


def test_packing_matches_separate_examples(tiny_chat_model, smollm2_tokenizer):
    """Packed rows (position ids restart per example) give each example the loss it has alone: transformers
    builds a block-diagonal mask from the position ids (with no KV cache), so packed examples never attend to
    each other."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float64).eval()
    exs = build_examples(smollm2_tokenizer, read_jsonl(FACTS_TRAIN)[:6], 128, "facts")
    rows = pack(exs, 128)
    assert len(rows) < len(exs) and sum(len(r) for r in rows) == sum(len(e) for e in exs)

    def summed_ce(batch):
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE, reduction="sum").item()

    pad = smollm2_tokenizer.pad_token_id
    packed = summed_ce(collate(rows, pad))
    separate = sum(summed_ce(collate([e], pad)) for e in exs)
    assert "position_ids" in collate(rows, pad) and abs(packed - separate) < 1e-8 * abs(separate)
