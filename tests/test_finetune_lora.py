"""LoRA on low-bit layers through PEFT's own custom-layer hook: plain `peft.get_peft_model` wraps every
LowBitLinear; loss and adapter gradients equal PEFT on the float model holding the dequantized weights; the
saved adapter loads onto a plain float HF model with the same logits; merge re-quantizes; the ZeRO-3 packed
storage is bit-exact; HF Trainer runs unchanged."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from torch import nn

from finetune_fixtures import smollm2_tokenizer, tiny_chat_model  # noqa: F401
from xpu_llm import AutoModelForCausalLM, XpuLLMError
from xpu_llm.finetune import (LowBitLoraLinear, PackedLowBitLinear, add_lora, dequantize_linears, lora_config,
                              pack_low_bit_layers)
from xpu_llm.lowbit import LowBitLinear, get_format

FORMATS = ["nf4", "sym_int4", "fp4", "sym_int8", "fp8_e4m3"]
IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 2],
                    [5, 17, 33, 2, 90, 41, 7, 11, 900, 40000]])


def low_bit_model(folder: str, fmt: str) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(folder, load_in_low_bit=fmt, group_size=64)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def float_reference(folder: str, fmt: str) -> nn.Module:
    """Plain transformers model whose linear weights are dequantize(quantize(w)): the QLoRA base in float."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    f = get_format(fmt)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, nn.Linear) and name != "lm_head":
                m.weight.copy_(f.dequantize(f.quantize(m.weight, 64), 64))
    return ref


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B as well as A, so that both gradients and the adapter's effect on the logits are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def loss_and_grads(model: nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=IDS, labels=IDS, use_cache=False)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("fmt", FORMATS)
def test_plain_peft_trains_low_bit_layers_like_the_float_reference(tiny_chat_model, fmt):
    model = low_bit_model(tiny_chat_model, fmt)
    cfg = lora_config(model, r=8, lora_alpha=16)
    assert sorted(cfg.target_modules) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                          "v_proj"]
    pm = peft.get_peft_model(model, cfg)  # PEFT's own entry point, unpatched
    wrapped = [m for m in pm.modules() if isinstance(m, LowBitLoraLinear)]
    assert len(wrapped) == 14 and all(isinstance(m.get_base_layer(), LowBitLinear) for m in wrapped)
    assert all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)
    randomize_lora(pm)

    ref = peft.get_peft_model(float_reference(tiny_chat_model, fmt),
                              peft.LoraConfig(r=8, lora_alpha=16, target_modules=cfg.target_modules))
    randomize_lora(ref)
    loss, grads = loss_and_grads(pm)
    ref_loss, ref_grads = loss_and_grads(ref)
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    worst = max(rel(grads[k], ref_grads[k]) for k in grads)
    assert worst < 1e-4, f"{fmt}: LoRA gradients differ from the float reference by {worst:.2e}"


def test_gradient_checkpointing_gives_the_same_gradients(tiny_chat_model):
    model = low_bit_model(tiny_chat_model, "nf4")
    pm = add_lora(model, r=8, lora_alpha=16)
    randomize_lora(pm)
    pm.train()
    loss, grads = loss_and_grads(pm)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ck, grads_ck = loss_and_grads(pm)
    assert model.model.gradient_checkpointing and loss == loss_ck
    assert max(rel(grads_ck[k], grads[k]) for k in grads) < 1e-6


def weight_passes(monkeypatch) -> dict[str, list[str]]:
    """Records, per low-bit layer, each pass over its packed weight: "mm" (the kernel) or "dq" (dequantize)."""
    import xpu_llm.lowbit.linear as linear_mod

    seen: dict[str, list[str]] = {}
    mm = linear_mod.lowbit_matmul

    def count(layer, kind):
        seen.setdefault(layer.name, []).append(kind)

    monkeypatch.setattr(linear_mod, "lowbit_matmul", lambda x, layer: (count(layer, "mm"), mm(x, layer))[1])
    for cls in (LowBitLinear, PackedLowBitLinear):
        monkeypatch.setattr(cls, "dequantize_weight",
                            lambda self, dtype=torch.float32, _f=getattr(cls, "dequantize_weight"):
                            (count(self, "dq"), _f(self, dtype))[1])
    return seen


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("packed", [False, True], ids=["buffers", "packed"])
def test_checkpointed_layers_reuse_the_recomputed_weight_in_backward(tiny_chat_model, monkeypatch, packed,
                                                                     reentrant):
    """checkpoint_layers(model, 1) on 2 layers: layer 0 is recomputed and its linears pass over their packed
    weight twice a step (forward: the kernel without autograd when reentrant, else a dequantize; the recompute
    dequantizes, and backward reuses that W), layer 1 keeps its activations, runs the kernel forward and
    dequantizes in backward; the gradients are those without checkpointing."""
    from xpu_llm.finetune import checkpoint_layers
    from xpu_llm.lowbit.linear import keeps_weight

    model = low_bit_model(tiny_chat_model, "nf4")
    pm = add_lora(model, r=8, lora_alpha=16)
    randomize_lora(pm)
    pm.train()
    loss, grads = loss_and_grads(pm)
    assert checkpoint_layers(model, 1, reentrant=reentrant) == 1
    if packed:
        assert pack_low_bit_layers(model) == 14
    for name, m in model.named_modules():
        if isinstance(m, (LowBitLinear, PackedLowBitLinear)):
            m.name = name
            assert keeps_weight(m) == (".layers.0." in name), name
    seen = weight_passes(monkeypatch)
    loss_ck, grads_ck = loss_and_grads(pm)
    assert len(seen) == 14
    for name, passes in seen.items():
        if packed:  # the packed layer's kernel is dequantize + matmul: every pass is a dequantize
            assert passes == ["dq", "dq"], (name, passes)
        else:
            first = "dq" if ".layers.0." in name and not reentrant else "mm"
            assert passes == [first, "dq"], (name, passes)
    assert abs(loss_ck - loss) <= 1e-6 * abs(loss)
    assert max(rel(grads_ck[k], grads[k]) for k in grads) < 1e-5

    seen.clear()  # eval mode (no checkpointing in HF's layers): nothing is kept, backward dequantizes
    pm.eval()
    loss_and_grads(pm)
    assert all(p == (["dq", "dq"] if packed else ["mm", "dq"]) for p in seen.values()), seen
    with pytest.raises(XpuLLMError, match="pass 0 to 2"):
        checkpoint_layers(model, 3)
    pm.train()  # checkpointing turned off through HF's API: no layer keeps its weight any more
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    assert not any(keeps_weight(m) for m in model.modules() if isinstance(m, (LowBitLinear, PackedLowBitLinear)))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointing_replays_lora_dropout(tiny_chat_model, reentrant):
    """With LoRA dropout, a checkpointed step gives the gradients of the plain step from the same seed: the
    recompute replays the forward's dropout masks."""
    from xpu_llm.finetune import checkpoint_layers

    model = low_bit_model(tiny_chat_model, "nf4")
    pm = add_lora(model, r=8, lora_alpha=16, lora_dropout=0.3)
    randomize_lora(pm)
    pm.train()
    torch.manual_seed(7)
    loss, grads = loss_and_grads(pm)
    checkpoint_layers(model, 0, reentrant=reentrant)
    torch.manual_seed(7)
    loss_ck, grads_ck = loss_and_grads(pm)
    torch.manual_seed(8)
    _, other = loss_and_grads(pm)
    assert abs(loss_ck - loss) <= 1e-6 * abs(loss)
    assert max(rel(grads_ck[k], grads[k]) for k in grads) < 1e-5
    assert max(rel(other[k], grads[k]) for k in grads) > 1e-2  # other masks: the test can tell them apart


def test_adapter_loads_onto_plain_float_model_with_the_same_logits(tiny_chat_model, tmp_path):
    model = low_bit_model(tiny_chat_model, "nf4")
    pm = add_lora(model, r=8, lora_alpha=16)
    randomize_lora(pm)
    pm.eval()
    with torch.no_grad():
        trained = pm(input_ids=IDS).logits
    pm.save_pretrained(tmp_path / "adapter")

    plain = peft.PeftModel.from_pretrained(float_reference(tiny_chat_model, "nf4"), str(tmp_path / "adapter"))
    with torch.no_grad():
        served = plain(input_ids=IDS).logits
        with plain.disable_adapter():
            no_adapter = plain(input_ids=IDS).logits
    err = (served - trained).abs().max().item()
    assert err < 1e-3 and rel(served, trained) < 1e-5, f"max abs logit difference {err:.2e}"
    assert (no_adapter - trained).abs().max().item() > 1e-2  # the adapter does change the logits


def test_merge_requantizes_the_merged_weight(tiny_chat_model):
    model = low_bit_model(tiny_chat_model, "sym_int8")
    pm = add_lora(model, r=8, lora_alpha=16)
    randomize_lora(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    want = layer.get_base_layer().dequantize_weight() + layer.get_delta_weight("default")
    f = get_format("sym_int8")
    with torch.no_grad():
        before = pm(input_ids=IDS).logits
    merged = pm.merge_and_unload()
    q = merged.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowBitLinear) and q.low_bit == "sym_int8"
    assert torch.equal(q.dequantize_weight(), f.dequantize(f.quantize(want, 64), 64))
    with torch.no_grad():
        after = merged(input_ids=IDS).logits
    assert rel(after, before) < 2e-2  # only the int8 re-rounding of the merged weights


def test_lora_variants_are_refused(tiny_chat_model):
    model = low_bit_model(tiny_chat_model, "nf4")
    with pytest.raises(XpuLLMError, match="not supported on low-bit layers"):
        add_lora(model, lora_config(model, r=4, use_dora=True))
    with pytest.raises(XpuLLMError, match="cannot add LoRA.*no_such_proj"):
        add_lora(low_bit_model(tiny_chat_model, "nf4"), r=4, target_modules="no_such_proj")


def test_autocast_input_skips_peft_float32_cast(tiny_chat_model):
    """Under bf16 autocast a bf16 input reaches dropout and A as it is (PEFT would copy it to float32, which
    autocast undoes at once): the same loss and gradients bit for bit as PEFT's own cast, with dropout off."""
    model = add_lora(low_bit_model(tiny_chat_model, "nf4").to(torch.bfloat16), r=4, lora_alpha=8)
    randomize_lora(model)
    layers = [m for m in model.modules() if isinstance(m, LowBitLoraLinear)]
    x = torch.randn(3, layers[0].in_features, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layers[0]._cast_input_dtype(x, torch.float32) is x
        assert layers[0]._cast_input_dtype(x.float(), torch.float32).dtype == torch.float32
    assert layers[0]._cast_input_dtype(x, torch.float32).dtype == torch.float32  # no autocast: PEFT's cast

    def run() -> tuple[float, dict[str, torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_and_grads(model)

    ours = run()
    for m in layers:  # PEFT's own behaviour: cast to the adapter's float32, then autocast casts back
        m._cast_input_dtype = lambda x, dtype, m=m: peft.tuners.lora.layer.Linear._cast_input_dtype(m, x, dtype)
    stock = run()
    assert ours[0] == stock[0]
    assert all(torch.equal(ours[1][n], stock[1][n]) for n in stock[1]), "the gradients changed"


def test_fused_lora_update_matches_peft_forward(tiny_chat_model):
    """The addmm LoRA update (base + scaling * h @ B^T in one GEMM) gives PEFT's loss and adapter gradients: in
    float32 to rounding; under bf16 autocast about as close to the float32 result as PEFT's own bf16 forward
    (both round differently). lora_bias takes PEFT's path, which must not change."""
    model = add_lora(low_bit_model(tiny_chat_model, "nf4"), r=4, lora_alpha=12)
    randomize_lora(model)
    layers = [m for m in model.modules() if isinstance(m, LowBitLoraLinear)]
    assert all(m._fused_ok() for m in layers)

    def run(autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return loss_and_grads(model)

    ours, ours16 = run(False), run(True)
    for m in layers:
        m.forward = lambda x, *a, m=m, **k: peft.tuners.lora.layer.Linear.forward(m, x, *a, **k)
    stock, stock16 = run(False), run(True)
    assert abs(ours[0] - stock[0]) <= 1e-6 * abs(stock[0])
    for n, g in stock[1].items():
        assert rel(ours[1][n], g) <= 1e-5, n
        assert not torch.equal(g, torch.zeros_like(g)), n
    err_ours = sum(rel(ours16[1][n], g) for n, g in stock[1].items())
    err_stock = sum(rel(stock16[1][n], g) for n, g in stock[1].items())
    assert err_ours <= 1.5 * err_stock, (err_ours, err_stock)  # bf16 noise of either order (measured 1.07x)
    with_bias = add_lora(low_bit_model(tiny_chat_model, "nf4"), r=4, lora_bias=True)
    assert not any(m._fused_ok() for m in with_bias.modules() if isinstance(m, LowBitLoraLinear))


def test_lora_update_adds_into_the_base_output_in_place(tiny_chat_model):
    """With a bf16 base under bf16 autocast (the GPU setting: float32 adapters), the update goes into the base
    layer's output tensor itself (no copy of it) and the gradients stay those of PEFT's own forward, within bf16
    noise of the float32 result."""
    ref = add_lora(low_bit_model(tiny_chat_model, "nf4"), r=4, lora_alpha=12)
    randomize_lora(ref)
    _, exact = loss_and_grads(ref)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_chat_model, load_in_low_bit="nf4", group_size=64,
                                                          dtype=torch.bfloat16).requires_grad_(False),
                     r=4, lora_alpha=12)
    randomize_lora(model)
    layers = [m for m in model.modules() if isinstance(m, LowBitLoraLinear)]
    ptrs: dict[str, list[int]] = {"base": [], "lora": []}
    for m in layers:
        m.get_base_layer().register_forward_hook(lambda mod, i, o: ptrs["base"].append(o.data_ptr()))
        m.register_forward_hook(lambda mod, i, o: ptrs["lora"].append(o.data_ptr()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ours = loss_and_grads(model)
    assert ptrs["base"] == ptrs["lora"] and len(ptrs["base"]) == len(layers)
    for m in layers:
        m.forward = lambda x, *a, m=m, **k: peft.tuners.lora.layer.Linear.forward(m, x, *a, **k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, stock = loss_and_grads(model)
    err_ours = sum(rel(ours[n], g) for n, g in exact.items())
    err_stock = sum(rel(stock[n], g) for n, g in exact.items())
    assert 0 < err_ours <= 1.5 * err_stock, (err_ours, err_stock)


def test_load_base_fuses_layers_unless_told_not_to(tiny_chat_model):
    """load_base swaps in the fused norm and gate (same parameter names); on CPU tensors they compute HF's own
    formulas, so the logits are bit-identical; --no-fused-layers keeps HF's modules."""
    from xpu_llm.finetune import load_base
    from xpu_llm.finetune.args import build_parser
    from xpu_llm.finetune.fused import FusedRMSNorm, FusedSwiGLUMLP

    fused, plain = load_base(tiny_chat_model, "nf4"), load_base(tiny_chat_model, "nf4", fuse=False)
    assert isinstance(fused.model.norm, FusedRMSNorm) and isinstance(fused.model.layers[1].mlp, FusedSwiGLUMLP)
    assert type(plain.model.norm).__name__ == "LlamaRMSNorm" and type(plain.model.layers[1].mlp).__name__ == "LlamaMLP"
    assert fused.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(fused(input_ids=IDS).logits, plain(input_ids=IDS).logits)
    parse = build_parser().parse_args
    assert parse(["--data", "d", "-o", "o"]).fused_layers and not parse(["--data", "d", "-o", "o",
                                                                        "--no-fused-layers"]).fused_layers


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_packed_storage_is_bit_exact_and_trains_identically(tiny_chat_model, storage):
    model = low_bit_model(tiny_chat_model, "nf4")
    packed = copy.deepcopy(model)
    assert pack_low_bit_layers(packed, storage) == 14
    for (n, a), (_, b) in zip(model.named_modules(), packed.named_modules()):
        if isinstance(a, LowBitLinear):
            assert isinstance(b, PackedLowBitLinear) and b.packed.dtype == storage and not b.packed.requires_grad
            assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.fmt.tensor_names), n
            assert torch.equal(b.to_lowbit().tensors()["qweight"], a.tensors()["qweight"])
    layer = copy.deepcopy(packed.model.layers[0].mlp.down_proj)
    raw = layer.packed.detach().clone()
    layer.to(torch.float16)  # a dtype cast never touches the packed bytes (a module.half() would corrupt them)
    assert layer.packed.dtype == storage and torch.equal(layer.packed.view(torch.uint8), raw.view(torch.uint8))
    pm_a, pm_b = add_lora(model, r=8, lora_alpha=16), add_lora(packed, r=8, lora_alpha=16)
    assert sum(isinstance(m, LowBitLoraLinear) for m in pm_b.modules()) == 14
    randomize_lora(pm_a)
    randomize_lora(pm_b)
    loss_a, grads_a = loss_and_grads(pm_a)
    loss_b, grads_b = loss_and_grads(pm_b)
    assert abs(loss_a - loss_b) < 1e-5 * abs(loss_a)
    assert max(rel(grads_b[k], grads_a[k]) for k in grads_a) < 1e-5


def test_dequantize_linears_gives_the_float_training_base(tiny_chat_model):
    model = low_bit_model(tiny_chat_model, "fp4")
    ref = float_reference(tiny_chat_model, "fp4")
    plain = dequantize_linears(copy.deepcopy(model))
    assert not any(isinstance(m, (LowBitLinear, PackedLowBitLinear)) for m in plain.modules())
    with torch.no_grad():
        assert rel(plain(input_ids=IDS).logits, ref(input_ids=IDS).logits) < 1e-6


def test_hf_trainer_runs_unchanged(tiny_chat_model, tmp_path):
    """transformers.Trainer on the PEFT low-bit model, as a user would write it: the loss goes down."""
    model = low_bit_model(tiny_chat_model, "nf4")
    pm = add_lora(model, r=8, lora_alpha=16, lora_dropout=0.0)
    rows = [{"input_ids": IDS[i % 2], "labels": IDS[i % 2]} for i in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=6,
                                          learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=pm, args=args, train_dataset=rows)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6 and logged[-1] < logged[0]


def test_step_gc_collects_between_steps_only():
    """StepGC: no automatic collection inside the block, this step's garbage cycles freed by step(), the
    collector's state restored after."""
    import gc
    import weakref

    from xpu_llm.finetune.gc_steps import StepGC

    class Node:
        pass

    assert gc.isenabled()
    with StepGC(full_every=2) as collector:
        assert not gc.isenabled()
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: only the collector frees it
        dead = weakref.ref(a)
        del a, b
        for _ in range(3):
            [Node() for _ in range(10_000)]  # allocations that would trigger automatic collection
        assert dead() is not None
        collector.step(1)
        assert dead() is None
    assert gc.isenabled()
