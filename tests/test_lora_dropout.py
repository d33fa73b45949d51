"""LoRA dropout fused into A's product (xpu_llm.finetune.lora_dropout) against float64 computed with the same
mask: forward, input and weight gradients, shapes that are not multiples of the tiles; the mask's statistics;
replay under activation checkpointing; and a low-bit LoRA layer taking the fused path. On a GPU the compiled
kernels run; without one, the same kernels run on CPU tensors through Triton's interpreter (a child process)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

import interpreter  # noqa: E402
from interpreter import DEV, here  # noqa: E402

test_interpreter_suite = interpreter.suite(__file__)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@here
@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_mask_keeps_one_minus_p_independently(p):
    from xpu_llm.finetune import lora_dropout as ld

    rows, cols = 96, 640
    keep = ld.keep_mask(11 << 33, rows, cols, p, DEV).double()
    q = 1 - ld.threshold(p) / 65536
    n = keep.numel()
    assert abs(keep.mean().item() - q) <= 5 * math.sqrt(q * (1 - q) / n)
    # every column position of the 64-wide blocks and every row keeps at the same rate
    per_pos = keep.view(rows, cols // 64, 64).mean(dim=(0, 1))
    assert (per_pos - q).abs().max().item() <= 6 * math.sqrt(q * (1 - q) / (rows * cols // 64))
    assert (keep.mean(1) - q).abs().max().item() <= 6 * math.sqrt(q * (1 - q) / cols)
    # neighbouring columns and rows uncorrelated
    c = keep - q
    for a, b in ((c[:, 1:], c[:, :-1]), (c[1:], c[:-1])):
        assert abs((a * b).mean().item()) / (q * (1 - q)) <= 6 / math.sqrt(a.numel())
    other = ld.keep_mask(12 << 33, rows, cols, p, DEV).double()
    assert abs((keep != other).double().mean().item() - 2 * q * (1 - q)) <= 0.02
    assert torch.equal(ld.keep_mask(11 << 33, rows, cols, p, DEV).double(), keep)  # a pure function of the seed
    # the mask of a row does not depend on how many rows were drawn
    assert torch.equal(ld.keep_mask(11 << 33, 7, cols, p, DEV).double(), keep[:7])


@here
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,k,r", [(37, 200, 8), (64, 128, 16), (5, 70, 24)])
def test_kernels_match_float64_with_the_same_mask(dtype, t, k, r):
    from xpu_llm.finetune import lora_dropout as ld

    g = torch.Generator().manual_seed(t + k + r)
    x = (torch.randn(t, k, generator=g) * 2 + 0.3).to(DEV, dtype)
    a = (torch.randn(r, k, generator=g) * 0.1).to(DEV)  # float32, as PEFT keeps it; rounded in the kernels
    a16 = a.to(dtype).double()
    dh = torch.randn(t, r, generator=g).to(DEV, dtype)
    p, seed = 0.25, 5 << 33
    keep = ld.keep_mask(seed, t, k, p, DEV).double()
    x64 = x.double() * keep * ld.keep_scale(p)
    h = ld.forward(x, a, seed, p)
    for splits in (1, 2, 3):  # K in one program, or split into column ranges whose last program adds them up
        h_s = ld.forward(x, a, seed, p, splits=splits)
        assert rel(h_s, x64 @ a16.T) <= 4e-3, splits
        if ld.forward_splits(t, k, x.device) == splits:
            assert torch.equal(h_s, h)
        assert torch.equal(ld.forward(x, a, seed, p, splits=splits), h_s)  # deterministic, counters reset
    dx, da = ld.backward(dh, x, a, seed, p)
    assert h.dtype == dx.dtype == dtype and da.dtype == torch.float32
    assert rel(h, x64 @ a16.T) <= 4e-3  # one rounding of h to the 16-bit dtype
    assert rel(dx, (dh.double() @ a16) * keep * ld.keep_scale(p)) <= 4e-3
    assert rel(da, dh.double().T @ x64) <= 1e-5  # float32 accumulation of exact products
    assert (dx.double()[keep == 0] == 0).all()
    # one gradient alone: the same values
    only_dx, none = ld.backward(dh, x, a, seed, p, want_da=False)
    none2, only_da = ld.backward(dh, x, a, seed, p, want_dx=False)
    assert none is None and none2 is None and torch.equal(only_dx, dx) and torch.equal(only_da, da)


@here
@pytest.mark.parametrize("n", [2, 3])
def test_one_launch_for_adapters_of_one_input_equals_one_call_each(n):
    """q/k/v (gate/up) adapters share their input: one launch with a seed per adapter and their A stacked gives
    each adapter's product under its own mask, bit for bit as one call each; one backward launch gives the sum
    of their input gradients (added to the base's in float32) and each A's gradient as one call each."""
    from xpu_llm.finetune import lora_dropout as ld

    t, k, r, p = 37, 200, 8, 0.25
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(t, k, generator=g) * 2 + 0.3).to(DEV, torch.bfloat16)
    a_each = [(torch.randn(r, k, generator=g) * 0.1).to(DEV) for _ in range(n)]
    dh_each = [torch.randn(t, r, generator=g).to(DEV, torch.bfloat16) for _ in range(n)]
    seeds = [(5 + i) << 33 for i in range(n)]
    a, dh = torch.cat(a_each), torch.cat(dh_each, 1)
    for splits in (None, 3):
        h = ld.forward(x, a, seeds, p, splits=splits)
        assert h.shape == (t, n * r)
        for i in range(n):
            assert torch.equal(h[:, i * r:(i + 1) * r], ld.forward(x, a_each[i], seeds[i], p, splits=splits))
    base = torch.randn(t, k, generator=g).to(DEV, torch.bfloat16)
    dx, da = ld.backward(dh, x, a, seeds, p, dx=base.clone())
    want = base.double()
    for i in range(n):
        keep = ld.keep_mask(seeds[i], t, k, p, DEV).double() * ld.keep_scale(p)
        want += (dh_each[i].double() @ a_each[i].to(torch.bfloat16).double()) * keep
        _, da_i = ld.backward(dh_each[i], x, a_each[i], seeds[i], p, want_dx=False)
        assert torch.equal(da[i * r:(i + 1) * r], da_i)
        assert rel(da_i, dh_each[i].double().T @ (x.double() * keep)) <= 1e-5
    assert rel(dx, want) <= 4e-3
    only_dx, _ = ld.backward(dh, x, a, seeds, p, want_da=False)
    _, only_da = ld.backward(dh, x, a, seeds, p, want_dx=False)
    assert torch.equal(only_da, da) and rel(only_dx, want - base.double()) <= 4e-3
    with pytest.raises(AssertionError, match="one per adapter"):
        ld.forward(x, a[:-1], seeds, p)


@here
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_autograd_function_replays_its_mask_under_checkpointing(reentrant):
    from torch.utils.checkpoint import checkpoint

    from xpu_llm.finetune import lora_dropout as ld

    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(45, 130, generator=g).to(DEV, torch.bfloat16)
    w = (torch.randn(16, 130, generator=g) * 0.1).to(DEV)
    w.requires_grad_(True)
    dh = torch.randn(45, 16, generator=g).to(DEV, torch.bfloat16)

    def run(seed: int, ckpt: bool):
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(seed)
        fn = (lambda xx: ld.dropout_lora_a(xx, w, 0.3))  # reentrant: the first pass runs it without autograd
        h = checkpoint(fn, x, use_reentrant=reentrant) if ckpt else fn(x)
        h.backward(dh)  # reentrant checkpointing takes .backward(), not autograd.grad
        gw, w.grad = w.grad, None
        return h.detach(), x.grad, gw

    h, gx, gw = run(7, False)
    assert gw.dtype == torch.float32
    for got, want in zip(run(7, True), (h, gx, gw)):
        assert torch.equal(got, want)
    assert rel(run(8, False)[0], h) > 0.1  # another seed, other masks
    # the gradients are those of the mask the drawn seed gives, in float64
    torch.manual_seed(7)
    keep = ld.keep_mask(ld.draw_seed(), 45, 130, 0.3, DEV).double() * ld.keep_scale(0.3)
    wb = w.detach().to(torch.bfloat16).double()
    assert rel(h, (x0.double() * keep) @ wb.T) <= 4e-3
    assert rel(gx, (dh.double() @ wb) * keep) <= 4e-3
    assert rel(gw, dh.double().T @ (x0.double() * keep)) <= 1e-5


def down_proj_with_lora(p: float):
    """(model, its MLP down projection as a LowBitLoraLinear with B random, an input x [3, 11, 96] bf16 that needs
    a gradient, an output gradient dy): a one-layer nf4 Llama with LoRA r 4 (alpha 8) and dropout p."""
    import xpu_llm
    from xpu_llm.finetune import add_lora

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEV)
    model.requires_grad_(False)
    xpu_llm.optimize_model(model, low_bit="nf4", group_size=32)
    model = add_lora(model, r=4, lora_alpha=8, lora_dropout=p)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05)
    x = torch.randn(3, 11, 96, generator=torch.Generator().manual_seed(1)).to(DEV, torch.bfloat16)
    x.requires_grad_(True)
    dy = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(2)).to(DEV, torch.bfloat16)
    return model, layer, x, dy


@here
def test_low_bit_lora_layer_takes_the_fused_dropout():
    """A LowBitLoraLinear in training with dropout, under bf16 autocast: output and gradients equal base(x) +
    scaling * B(A(x * keep / (1 - p))) in float64 with the mask of the seed the layer drew; in eval mode (no
    dropout) the plain path."""
    from xpu_llm.finetune import lora_dropout as ld
    from xpu_llm.finetune.lora import LowBitLoraLinear

    model, layer, x, dy = down_proj_with_lora(0.2)
    assert isinstance(layer, LowBitLoraLinear)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    model.train()
    torch.manual_seed(9)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        y = layer(x)
        base = layer.base_layer(x.detach().reshape(-1, 96)).double()
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), dy)
    torch.manual_seed(9)
    keep = ld.keep_mask(ld.draw_seed(), 33, 96, 0.2, DEV).double() * ld.keep_scale(0.2)
    a64, b64 = a.detach().to(torch.bfloat16).double(), b.detach().to(torch.bfloat16).double()
    xd = x.detach().reshape(-1, 96).double() * keep
    h = xd @ a64.T
    want = base + 2.0 * (h @ b64.T)
    assert rel(y.reshape(-1, 64), want) <= 1e-2
    dy2 = dy.reshape(-1, 64).double()
    dh = 2.0 * dy2 @ b64
    assert rel(ga, dh.T @ xd) <= 2e-2 and rel(gb, 2.0 * dy2.T @ h) <= 2e-2
    # the input gradient: the base's, plus the adapter's through the mask
    base_gx = torch.autograd.grad(layer.base_layer(x.reshape(-1, 96)), x, dy.reshape(-1, 64))[0]
    assert rel(gx.reshape(-1, 96) - base_gx.reshape(-1, 96), (dh @ a64) * keep) <= 2e-2
    layer.lora_dropout["default"].p = 1.0  # everything dropped (legal in torch): PEFT's modules, the base alone
    with torch.no_grad(), torch.autocast(DEV.type, dtype=torch.bfloat16):
        assert torch.equal(layer(x), layer.base_layer(x.reshape(-1, 96)).view(3, 11, 64))
    layer.lora_dropout["default"].p = 0.2
    model.eval()  # no dropout: PEFT's own modules
    with torch.no_grad(), torch.autocast(DEV.type, dtype=torch.bfloat16):
        y_eval = layer(x)
        plain = layer.base_layer(x.reshape(-1, 96)).float() + 2.0 * (x.reshape(-1, 96) @ a.T.to(x.dtype)).float() @ \
            b.T.float()
    assert rel(y_eval.reshape(-1, 64), plain) <= 1e-2


@here
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_one_node_layer_equals_the_pieces(p, monkeypatch):
    """Under autocast a LowBitLoraLinear runs as one autograd node (lora_linear.py): output and A / B gradients are
    those of the separate pieces bit for bit (the same kernels in the same order, the same mask); the input
    gradient is the base's plus the adapter's added in float32 inside the dropout kernel (one rounding, not two),
    so equal to a bf16 rounding."""
    from xpu_llm.finetune import lora_linear

    model, layer, x, dy = down_proj_with_lora(p)
    model.train()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def run():
        torch.manual_seed(9)
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            y = layer(x)
        return (y, *torch.autograd.grad(y, (x, a, b), dy))

    y, gx, ga, gb = run()
    node = y.grad_fn.next_functions[0][0]
    assert type(node).__name__ == "LoraLinearFunctionBackward", type(node).__name__
    monkeypatch.setattr(lora_linear, "applies", lambda *args: False)
    y0, gx0, ga0, gb0 = run()
    assert type(y0.grad_fn.next_functions[0][0]).__name__ != "LoraLinearFunctionBackward"
    assert torch.equal(y, y0) and torch.equal(ga, ga0) and torch.equal(gb, gb0)
    assert gx.dtype == gx0.dtype == torch.bfloat16
    assert (gx.float() - gx0.float()).abs().max() <= 2 ** -7 * gx0.float().abs().max()


@here
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_one_node_checkpointed_model_trains_like_the_pieces(p, monkeypatch):
    """A bf16 model with fused layers, reentrant checkpointing on its first layer (whose low-bit linears keep their
    dequantized weight for backward) and LoRA with and without dropout: q/k/v and gate/up as one node each (the
    default), every linear as one node, and the pieces give the same loss (with dropout, the same masks) and
    adapter gradients within bf16 rounding of the input gradients' fewer roundings."""
    import xpu_llm
    from xpu_llm.finetune import add_lora, checkpoint_layers, fuse_layers, lora_linear

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEV, torch.bfloat16)
    model.requires_grad_(False)
    xpu_llm.optimize_model(model, low_bit="nf4", group_size=32)
    fuse_layers(model)
    checkpoint_layers(model, 1)
    model = add_lora(model, r=4, lora_alpha=8, lora_dropout=p).train()
    with torch.no_grad():
        for n, w in model.named_parameters():
            if "lora_B" in n:
                w.normal_(0, 0.05)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3)).to(DEV)

    def run():
        torch.manual_seed(5)
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: w.grad for n, w in model.named_parameters() if w.requires_grad}

    sizes = []
    apply = lora_linear.LoraLinearFunction.apply
    monkeypatch.setattr(lora_linear.LoraLinearFunction, "apply",
                        lambda x, bases, *rest: sizes.append(len(bases)) or apply(x, bases, *rest))
    loss, grads = run()
    # a layer: q/k/v and gate/up as one node each, o and down alone; run for the second layer's forward and the
    # first one's recompute (its first forward runs without autograd, where the pieces run: nothing is recorded)
    assert sorted(sizes) == [1] * 4 + [2] * 2 + [3] * 2
    sizes.clear()
    monkeypatch.setenv("XPU_LLM_GROUPED_LORA", "0")
    one_loss, one_grads = run()
    assert sizes == [1] * 7 * 2
    monkeypatch.setattr(lora_linear, "applies", lambda *args: False)
    ref_loss, ref_grads = run()
    # the same masks and products: the same loss (without dropout the stacked A's product is one matmul, which may
    # round differently); input gradients rounded once instead of once per linear
    assert torch.equal(one_loss, ref_loss)
    assert torch.equal(loss, ref_loss) if p else abs(loss.item() - ref_loss.item()) <= 1e-2
    assert grads.keys() == ref_grads.keys() and all(rel(grads[n], ref_grads[n]) <= 2e-2 for n in grads)
    assert all(rel(one_grads[n], ref_grads[n]) <= 2e-2 for n in grads)


@here
def test_linears_are_grouped_only_when_nothing_would_be_skipped(monkeypatch):
    """q/k/v and gate/up go through one node only when calling them one by one would run no hooks and their
    adapters match: a forward hook on k_proj, or k_proj with another rank (LoraConfig.rank_pattern), sends the
    attention's three linears one by one (the hook runs), while gate/up stay grouped."""
    import xpu_llm
    from xpu_llm.finetune import add_lora, fuse_layers, lora_linear

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEV)

    def build(**lora):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).to(DEV, torch.bfloat16).requires_grad_(False)
        xpu_llm.optimize_model(model, low_bit="nf4", group_size=32)
        fuse_layers(model)
        return add_lora(model, r=4, lora_alpha=8, lora_dropout=0.1, **lora).train()

    def groups(model) -> list[int]:
        sizes = []
        apply = lora_linear.LoraLinearFunction.apply
        monkeypatch.setattr(lora_linear.LoraLinearFunction, "apply",
                            lambda x, bases, *rest: sizes.append(len(bases)) or apply(x, bases, *rest))
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            model(input_ids=ids, use_cache=False).logits.float().sum().backward()
        return sizes

    model = build()
    assert groups(model) == [3, 1, 2, 1]  # q/k/v, o, gate/up, down
    seen = []
    k_proj = model.get_submodule("base_model.model.model.layers.0.self_attn.k_proj")
    handle = k_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    assert groups(model) == [1, 1, 1, 1, 2, 1] and len(seen) == 1
    handle.remove()
    assert groups(build(rank_pattern={"k_proj": 8})) == [1, 1, 1, 1, 2, 1]
