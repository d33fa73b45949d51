"""The output head fused into the cross-entropy (finetune/loss.py): loss and input gradient against a float64
reference for dense and low-bit heads over several chunks, the bf16 autocast numbers against the unfused path,
and through a PEFT model (answer-only labels, padding) the same loss and LoRA gradients as the model's own
logits, with the fallback taken where the head is trainable."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune_fixtures import smollm2_tokenizer, tiny_chat_model  # noqa: F401
from test_finetune_lora import low_bit_model, randomize_lora, rel
from xpu_llm.finetune import add_lora
from xpu_llm.finetune.data import IGNORE
from xpu_llm.finetune.loss import answer_index, fusable, head_cross_entropy, loss_sum, mean_loss, output_head
from xpu_llm.lowbit import LowBitLinear


def random_head(low_bit: str | None, bias: bool) -> nn.Module:
    torch.manual_seed(3)
    head = nn.Linear(48, 301, bias=bias)
    if low_bit:
        head = LowBitLinear.from_linear(head, low_bit, group_size=16)
    for p in head.parameters():
        p.requires_grad_(False)
    return head


def dense_weight(head: nn.Module) -> torch.Tensor:
    return head.weight if isinstance(head, nn.Linear) else head.dequantize_weight(torch.float32)


@pytest.mark.parametrize("low_bit,bias", [(None, True), (None, False), ("nf4", False), ("sym_int4", True)])
def test_head_cross_entropy_matches_float64(low_bit, bias):
    head = random_head(low_bit, bias)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 48, generator=g, requires_grad=True)
    t = torch.randint(0, 301, (37,), generator=g)
    rows = 8  # 5 chunks, the last one partial
    loss = head_cross_entropy(h, head, t, chunk_bytes=4 * 301 * rows)
    (loss * 0.37).backward()  # the upstream gradient scales the one computed in forward

    hd = h.detach().double().requires_grad_()
    b = None if head.bias is None else head.bias.double()
    ref = F.cross_entropy(F.linear(hd, dense_weight(head).double(), b), t, reduction="sum")
    (ref * 0.37).backward()
    assert abs(loss.item() - ref.item()) <= 1e-6 * abs(ref.item())
    assert rel(h.grad, hd.grad) < 1e-5


def test_head_cross_entropy_under_bf16_autocast_matches_the_unfused_path():
    head = random_head(None, False)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 48, generator=g, requires_grad=True)
    t = torch.randint(0, 301, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = head_cross_entropy(h, head, t, chunk_bytes=4 * 301 * 16)
        unfused = F.cross_entropy(head(h).float(), t, reduction="sum")
    fused.backward()
    g_fused, h.grad = h.grad.clone(), None
    unfused.backward()
    assert rel(fused.detach(), unfused.detach()) < 1e-5  # the same bf16 logits, log-sum-exp in float32
    assert rel(g_fused, h.grad) < 1e-2  # both round the logits' gradient to bf16 before its matmul


def lora_model(folder: str) -> nn.Module:
    model = add_lora(low_bit_model(folder, "nf4"), r=4, lora_alpha=8, lora_dropout=0.0)
    randomize_lora(model)
    return model


def answer_batch() -> dict[str, torch.Tensor]:
    """Two rows: the first left-padded (attention 0, label IGNORE), prompts IGNORE, answers labelled."""
    ids = torch.tensor([[0, 0, 504, 3458, 282, 4649, 314, 253, 1345, 30],
                        [5, 17, 33, 2, 90, 41, 7, 11, 900, 40000]])
    labels = ids.clone()
    labels[0, :5] = IGNORE
    labels[1, :3] = IGNORE
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def head_positions(model: nn.Module) -> tuple[list[int], object]:
    """Positions of the head's output on each call (a forward hook), and the hook's handle."""
    seen: list[int] = []
    handle = output_head(model).register_forward_hook(lambda m, a, out: seen.append(out.shape[-2]))
    return seen, handle


def loss_and_lora_grads(model: nn.Module, batch: dict, fused: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model, batch, fused=fused)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_sum_fused_equals_the_models_logits(tiny_chat_model):
    model = lora_model(tiny_chat_model)
    batch = answer_batch()
    assert fusable(output_head(model))
    seen, handle = head_positions(model)
    loss_f, grads_f = loss_and_lora_grads(model, batch, fused=True)
    loss_u, grads_u = loss_and_lora_grads(model, batch, fused=False)
    handle.remove()
    assert seen == [1, 7]  # fused: the head itself ran one position; unfused: positions 2..8 predict answers
    assert abs(loss_f - loss_u) <= 1e-5 * abs(loss_u)
    assert grads_f.keys() == grads_u.keys() and grads_f
    for name in grads_f:
        assert rel(grads_f[name], grads_u[name]) < 1e-4, name
    with torch.no_grad():  # evaluation: no gradient is computed in the forward
        assert abs(loss_sum(model, batch, fused=True).item() - loss_u) <= 1e-5 * abs(loss_u)


def test_answer_rows_found_on_the_host_give_the_same_loss_and_grads(tiny_chat_model):
    """answer_index on the CPU labels (what the trainer passes, sparing a device sync) selects exactly the rows the
    on-device mask selects: the same loss and LoRA gradients, bit for bit."""
    model = lora_model(tiny_chat_model)
    batch = answer_batch()
    rows = answer_index(batch["labels"])
    assert rows.tolist() == [4, 5, 6, 7, 8] + [10 + i for i in range(2, 9)]  # positions b * 10 + t
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model, batch, fused=True, answer_rows=rows)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    ref_loss, ref_grads = loss_and_lora_grads(model, batch, fused=True)
    assert loss.item() == ref_loss and all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)


def test_mean_loss_is_the_hf_labels_loss(tiny_chat_model):
    model = lora_model(tiny_chat_model)
    ids = answer_batch()["input_ids"]
    ref = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert abs(mean_loss(model, ids).item() - ref.item()) <= 1e-5 * ref.item()


def test_a_trainable_head_takes_the_models_logits(tiny_chat_model, monkeypatch):
    model = lora_model(tiny_chat_model)
    batch = answer_batch()
    ref, _ = loss_and_lora_grads(model, batch, fused=False)
    output_head(model).weight.requires_grad_(True)  # e.g. modules_to_save=["lm_head"]
    assert not fusable(output_head(model))
    seen, handle = head_positions(model)
    loss, _ = loss_and_lora_grads(model, batch, fused=True)
    handle.remove()
    assert seen == [7] and abs(loss - ref) <= 1e-6 * abs(ref)
    assert output_head(model).weight.grad.abs().sum() > 0  # the head's own gradient flows
    output_head(model).weight.requires_grad_(False)
    assert fusable(output_head(model))
    monkeypatch.setattr(output_head(model).weight, "ds_id", 0, raising=False)  # as ZeRO-3 marks its shards
    assert not fusable(output_head(model))
    monkeypatch.delattr(output_head(model).weight, "ds_id")
    monkeypatch.setenv("XPU_LLM_FUSED_LOSS", "0")  # the A/B switch
    seen, handle = head_positions(model)
    loss_sum(model, batch)
    handle.remove()
    assert seen == [7]
