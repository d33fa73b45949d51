"""Training data: JSONL records (alpaca, dolly, chat messages, prompt/completion) rendered with the model's chat
template, labels on the answer tokens only, optional packing, a held-out split, and a deterministic order of
global batches, so that any number of processes sees the same examples per optimizer step and a resumed run
continues exactly where it stopped (the data position is just the step number)."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import XpuLLMError

log = logging.getLogger(__name__)

IGNORE = -100
ROLES = ("system", "user", "assistant")


class DataError(XpuLLMError):
    """A training data file that cannot be used (with the file and line it is about)."""


@dataclass
class Example:
    """One tokenized sequence: `labels` is IGNORE outside answers; `position_ids` is set for packed rows."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        """Tokens that are predicted (label set, and not the first token, which nothing predicts)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


# ---------------------------------------------------------------------------------------------- reading

def _text(rec: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    v = rec.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or (required and not v.strip()):
        raise DataError(f"{where}: field {key!r} must be a non-empty string, got {v!r:.60}")
    return v


def to_messages(rec: Any, where: str) -> list[dict[str, str]]:
    """One JSONL record -> chat messages. Forms: {"messages": [{"role", "content"}, ...]};
    alpaca {"instruction", "input"?, "output"}; dolly {"instruction", "context"?, "response"};
    {"prompt", "completion"}."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, "
                                f"got {m!r:.80}")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
            raise DataError(f"{where}: the conversation has no non-empty assistant message to learn from")
        return out
    if "instruction" in rec and ("output" in rec or "response" in rec):
        answer_key, extra_key = ("output", "input") if "output" in rec else ("response", "context")
        user = _text(rec, "instruction", where)
        extra = _text(rec, extra_key, where, required=False)
        if extra.strip():
            user = f"{user}\n\n{extra}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(rec, answer_key, where)}]
    if "prompt" in rec and "completion" in rec:
        return [{"role": "user", "content": _text(rec, "prompt", where)},
                {"role": "assistant", "content": _text(rec, "completion", where)}]
    raise DataError(f"{where}: unknown record form with keys {sorted(rec)[:8]}; expected 'messages' (chat), "
                    "'instruction'+'output' (alpaca), 'instruction'+'response' (dolly) or 'prompt'+'completion'")


def read_jsonl(path: str) -> list[list[dict[str, str]]]:
    """All conversations of a JSONL file; a bad line is a DataError naming its line number."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            out.append(to_messages(rec, where))
    if not out:
        raise DataError(f"{path} holds no records; give a JSONL file with one example per line")
    return out


# ---------------------------------------------------------------------------------------------- tokenizing

def _render(tok: Any, messages: list[dict[str, str]], gen_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)


def answer_spans(tok: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant answer (with its end-of-turn
    marker), found by rendering the conversation prefix by prefix."""
    full = _render(tok, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], True) if i else ""
        upto = _render(tok, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError("the chat template does not render a conversation prefix by prefix, so the answer "
                            "tokens cannot be located; pass --chat-template with a template that does")
        spans.append((len(before), len(upto)))
    return full, spans


def tokenize(tok: Any, messages: list[dict[str, str]], max_len: int) -> tuple[Example | None, bool]:
    """(token ids with labels on the answer tokens, truncated to max_len, or None if no answer token is
    left; whether it was truncated)."""
    text, spans = answer_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    j = 0
    for t, (s, e) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j < len(spans) and spans[j][0] <= s < spans[j][1] and e > s:
            labels[t] = ids[t]
    ex = Example(ids[:max_len], labels[:max_len])
    return (ex if ex.n_targets else None), len(ids) > max_len


def build_examples(tok: Any, conversations: Sequence[list[dict[str, str]]], max_len: int,
                   source: str) -> list[Example]:
    """Tokenize every conversation; those left without answer tokens by truncation are dropped (logged)."""
    if not getattr(tok, "chat_template", None):
        raise DataError("the tokenizer has no chat template; pass --chat-template FILE (a Jinja template)")
    if not getattr(tok, "is_fast", False):
        raise DataError("a fast (Rust) tokenizer is needed to map answers to tokens; this one is slow")
    out, dropped, cut = [], 0, 0
    for conv in conversations:
        ex, truncated = tokenize(tok, conv, max_len)
        if ex is None:
            dropped += 1
            continue
        cut += truncated
        out.append(ex)
    if dropped:
        log.warning("%s: %d examples dropped (no answer token within --seq-len %d)", source, dropped, max_len)
    if cut:
        log.info("%s: %d examples truncated to %d tokens", source, cut, max_len)
    if not out:
        raise DataError(f"{source}: no usable example (all answers lie beyond --seq-len {max_len})")
    return out


def split_heldout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded random `fraction` of the examples is held out (at least one when > 0)."""
    if fraction <= 0:
        return examples, []
    if not 0 < fraction < 1:
        raise DataError(f"--eval-fraction must be in [0, 1), got {fraction}")
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise DataError(f"{len(examples)} examples are too few to hold out {fraction:.0%} for evaluation; "
                        "add data, lower --eval-fraction or pass --eval-fraction 0")
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Pack whole examples into rows of at most seq_len tokens (first fit, in order). Position ids restart
    at each example, which transformers turns into a block-diagonal attention mask, so packed examples do not
    see each other; the first token of each example carries no label."""
    rows: list[Example] = []
    for ex in examples:
        labels = [IGNORE] + ex.labels[1:]
        pos = list(range(len(ex)))
        for row in rows:
            if len(row) + len(ex) <= seq_len:
                row.input_ids += ex.input_ids
                row.labels += labels
                row.position_ids += pos
                break
        else:
            rows.append(Example(list(ex.input_ids), labels, pos))
    return rows


# ---------------------------------------------------------------------------------------------- batching

class GlobalBatches:
    """A deterministic stream of examples: epoch e is a permutation seeded by (seed, e); optimizer step s
    takes stream items [s*G, (s+1)*G) with G = micro_batch * grad_accum * world. Micro-batch m of rank r is
    the slice m*world + r of that window, so 1 process with micro_batch*world sees the same examples per
    step as `world` processes with micro_batch."""

    def __init__(self, n: int, micro_batch: int, grad_accum: int, world: int, seed: int) -> None:
        assert n > 0 and micro_batch > 0 and grad_accum > 0 and world > 0
        self.n, self.micro, self.accum, self.world, self.seed = n, micro_batch, grad_accum, world, seed
        self._perms: dict[int, list[int]] = {}

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def _item(self, i: int) -> int:
        epoch, k = divmod(i, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch)).tolist()}
        return self._perms[epoch][k]

    def micro_batch(self, step: int, micro: int, rank: int) -> list[int]:
        """Example indices of micro-batch `micro` of rank `rank` at optimizer step `step` (0-based)."""
        start = step * self.global_batch + (micro * self.world + rank) * self.micro
        return [self._item(i) for i in range(start, start + self.micro)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n


def collate(examples: list[Example], pad_id: int, pad_to: int | None = None) -> dict[str, Tensor]:
    """Right-padded tensors: input_ids, labels, and attention_mask (plain rows) or position_ids (packed)."""
    n = max(len(e) for e in examples) if pad_to is None else pad_to
    packed = examples[0].position_ids is not None
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    extra = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        if packed:  # the padding forms one more sequence of its own (positions restart at 0)
            extra[i, :k] = torch.tensor(e.position_ids)
            extra[i, k:] = torch.arange(n - k)
        else:
            extra[i, :k] = 1
    return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}


def count_targets(batch: dict[str, Tensor]) -> int:
    """Predicted tokens of a collated batch (labels shifted by one)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
