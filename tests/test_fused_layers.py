"""The fused RMSNorm, SwiGLU and rotary embedding of xpu_llm.finetune against Hugging Face's modules and a
float64 reference: forward and input gradients on random inputs, rows, widths and lengths that are not multiples
of the tiles, outputs poisoned with NaN; then a low-bit LoRA model with its layers swapped trains to the same
loss and adapter gradients. On a GPU the compiled kernels run; without one, the same kernels run on CPU tensors
through Triton's interpreter (a child process)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

import interpreter  # noqa: E402
from interpreter import DEV, ON_GPU, here  # noqa: E402
from xpu_llm.finetune.fused import FusedRMSNorm, FusedSwiGLUMLP, fuse_layers, reference_rms_norm  # noqa: E402

ROWS, WIDTH = (777, 4000) if ON_GPU else (21, 200)
test_interpreter_suite = interpreter.suite(__file__)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def hf_norm(width: int, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(width, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=torch.Generator().manual_seed(seed)) * 0.5 + 1.0)
    return norm.to(DEV, dtype)


@here
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_kernels_match_float64_and_hf(dtype, wdtype):
    from xpu_llm.finetune import kernels as k

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(ROWS, WIDTH, generator=g) * 3 + 0.5).to(DEV, dtype)
    dy = torch.randn(ROWS, WIDTH, generator=g).to(DEV, torch.promote_types(dtype, wdtype))
    hf = hf_norm(WIDTH, wdtype)
    poison = torch.full_like(dy, float("nan"))
    y, rstd = k.rms_norm_forward(x, hf.weight, 1e-5, out=poison)
    assert y.data_ptr() == poison.data_ptr() and y.dtype == hf(x).dtype and torch.isfinite(y).all()
    dx = k.rms_norm_backward(dy, x, hf.weight, rstd, out=torch.full_like(x, float("nan")))
    x64 = x.double().requires_grad_(True)
    y64 = reference_rms_norm(x64, hf.weight.double(), 1e-5)
    dx64, = torch.autograd.grad(y64, x64, dy.double())
    # dx: one rounding to the output dtype; y: two, as in HF's formula (x * rstd to x's dtype, then times w)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel(dx, dx64) <= tol and rel(y, y64) <= 2 * tol, (rel(dx, dx64), rel(y, y64))
    # Rounded as HF rounds (x * rstd to x's dtype, times w): equal up to one unit of the last place.
    ulp = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert (y.double() - hf(x).double()).abs().max() <= ulp * hf(x).double().abs().max()


@here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu_kernels_match_float64(dtype):
    from xpu_llm.finetune import kernels as k

    gen = torch.Generator().manual_seed(2)
    g, u, dh = ((torch.randn(ROWS, WIDTH + 3, generator=gen) * 3).to(DEV, dtype) for _ in range(3))
    poison = torch.full_like(g, float("nan"))
    h = k.swiglu_forward(g, u, out=poison)
    dg, du = k.swiglu_backward(dh, g, u, out=(torch.full_like(g, float("nan")), torch.full_like(u, float("nan"))))
    g64, u64 = g.double().requires_grad_(True), u.double().requires_grad_(True)
    h64 = torch.nn.functional.silu(g64) * u64
    dg64, du64 = torch.autograd.grad(h64, (g64, u64), dh.double())
    tol = 1e-6 if dtype == torch.float32 else 2e-3  # one rounding to the output dtype
    assert h.data_ptr() == poison.data_ptr() and h.dtype == dtype
    assert rel(h, h64) <= tol and rel(dg, dg64) <= tol and rel(du, du64) <= tol, (rel(h, h64), rel(dg, dg64))


def hf_rope_inputs(b: int, h: int, t: int, d: int, dtype: torch.dtype, cos_batch: int, seed: int = 4):
    """q-like [B, H, T, D] as HF makes it (a transposed view of [B, T, H, D]) and a real LlamaRotaryEmbedding's
    cos, sin [cos_batch, T, D] at shuffled positions."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, t, h, d, generator=gen) * 2).to(DEV, dtype).transpose(1, 2)
    cfg = transformers.LlamaConfig(hidden_size=h * d, num_attention_heads=h, rope_theta=10000.0)
    emb = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg).to(DEV)
    pos = torch.stack([torch.randperm(4 * t, generator=gen)[:t] for _ in range(cos_batch)]).to(DEV)
    cos, sin = emb(x, pos)
    return x, cos, sin


@here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,cos_batch", [(5, 3), (8, 1)])
def test_rope_kernel_matches_float64(dtype, heads, cos_batch):
    from xpu_llm.finetune import kernels as k

    hf_rope = transformers.models.llama.modeling_llama.apply_rotary_pos_emb
    x, cos, sin = hf_rope_inputs(3, heads, 13 if DEV.type == "cpu" else 1000, 64, dtype, cos_batch)
    assert k.rope_supported(x, cos)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(DEV, dtype)
    y = k.rope(x, cos, sin, out=torch.full_like(x, float("nan")))
    dx = k.rope(dy, cos, sin, backward=True, out=torch.full_like(dy, float("nan")))
    x64 = x.double().requires_grad_(True)
    y64, _ = hf_rope(x64, x64, cos.double(), sin.double())
    dx64, = torch.autograd.grad(y64, x64, dy.double())
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # one rounding to the output dtype
    assert y.dtype == dtype and y.stride() == x.stride() and torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert rel(y, y64) <= tol and rel(dx, dx64) <= tol, (rel(y, y64), rel(dx, dx64))
    y_hf, _ = hf_rope(x, x, cos, sin)  # HF rounds after each op: about as far from float64 as one rounding
    assert rel(y_hf, y64) <= 3 * tol


@here
def test_norm_module_forward_backward_and_trainable_weight():
    hf = hf_norm(WIDTH, torch.float32)
    hf.weight.requires_grad_(True)
    fused = FusedRMSNorm(hf.weight, hf.variance_epsilon)
    assert fused.weight is hf.weight
    x = torch.randn(3, ROWS, WIDTH, device=DEV, requires_grad=True)
    dy = torch.randn(3, ROWS, WIDTH, device=DEV)
    ref = torch.autograd.grad(hf(x), (x, hf.weight), dy)
    got = torch.autograd.grad(fused(x), (x, fused.weight), dy)
    assert rel(got[0], ref[0]) <= 1e-5 and rel(got[1], ref[1]) <= 1e-5


@here
def test_swapped_lora_model_trains_identically():
    """A low-bit LoRA model: loss and adapter gradients with fused layers equal the unfused model's (float32)."""
    import copy

    import xpu_llm
    from xpu_llm.finetune import add_lora

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEV)
    model.requires_grad_(False)
    xpu_llm.optimize_model(model, low_bit="nf4", group_size=32)
    model = add_lora(model, r=4, lora_alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    fused = copy.deepcopy(model)
    assert fuse_layers(fused) == {"norms": 2 * 2 + 1, "mlps": 2, "attentions": 2}
    assert isinstance(fused.base_model.model.model.layers[0].mlp, FusedSwiGLUMLP)
    attn = fused.base_model.model.model.layers[1].self_attn
    assert type(attn).__name__ == "FusedRoPELlamaAttention" and fused.state_dict().keys() == model.state_dict().keys()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3)).to(DEV)
    results = []
    for m in (model, fused):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) <= 1e-5 * abs(l0)
    assert g0.keys() == g1.keys() and all(rel(g1[n], g0[n]) <= 1e-4 for n in g0)


def test_other_layers_are_left_alone_and_cpu_tensors_take_the_hf_formulas():
    gemma_like = type("GemmaRMSNorm", (nn.Module,), {})()
    gemma_like.variance_epsilon = 1e-6
    shape = dict(hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2)
    cfg = transformers.LlamaConfig(**shape)
    gelu_mlp = transformers.models.llama.modeling_llama.LlamaMLP(transformers.LlamaConfig(**shape, hidden_act="gelu"))
    model = nn.ModuleDict({"a": gemma_like, "b": hf_norm(16, torch.float32).cpu(), "c": gelu_mlp,
                           "d": transformers.models.llama.modeling_llama.LlamaMLP(cfg)})
    ref = {k: model[k] for k in "bd"}
    assert fuse_layers(model) == {"norms": 1, "mlps": 1, "attentions": 0}
    assert model["a"] is gemma_like and model["c"] is gelu_mlp
    assert isinstance(model["b"], FusedRMSNorm) and isinstance(model["d"], FusedSwiGLUMLP)
    assert model["d"].up_proj is ref["d"].up_proj
    if not interpreter.IN_CHILD:  # no kernels on CPU tensors outside the interpreter: exactly HF's formulas
        x = torch.randn(5, 16, dtype=torch.bfloat16)
        assert torch.equal(model["b"](x), ref["b"](x))
        assert torch.equal(model["d"](x.float()), ref["d"](x.float()))


def test_fused_attention_keeps_hf_behaviour_with_a_kv_cache():
    """Generation passes a KV cache: the swapped attention hands such calls to HF's own forward, so greedy
    generation (and, on CPU tensors outside the interpreter, every logit) is HF's."""
    import copy

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, initializer_range=0.3)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    fused = copy.deepcopy(hf)
    assert fuse_layers(fused)["attentions"] == 2
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = fused.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(a, b)
        if not interpreter.IN_CHILD:
            assert torch.equal(hf(ids, use_cache=False).logits, fused(ids, use_cache=False).logits)


def test_fused_checkpointed_lora_model_copies_and_pickles():
    """A model with fused layers, checkpointing and LoRA deep-copies with the same logits, and its swapped
    attention and low-bit layers pickle (PEFT's model itself does not: HF's input-grad hook is a local function);
    the weak links for weight keeping are not copied (only a speed hint)."""
    import copy
    import pickle

    import xpu_llm
    from xpu_llm.finetune import add_lora, checkpoint_layers
    from xpu_llm.lowbit.linear import keeps_weight

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    xpu_llm.optimize_model(model, low_bit="nf4", group_size=32)
    fuse_layers(model)
    checkpoint_layers(model, 1)
    layer0 = model.model.layers[0]
    assert keeps_weight(layer0.self_attn.q_proj) and not keeps_weight(model.model.layers[1].self_attn.q_proj)
    model = add_lora(model, r=4, lora_alpha=8).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert torch.equal(copy.deepcopy(model)(input_ids=ids).logits, before)
    attn = pickle.loads(pickle.dumps(layer0.self_attn))
    assert type(attn) is type(layer0.self_attn) and type(attn).__name__ == "FusedRoPELlamaAttention"
    assert attn.q_proj.base_layer.recompute_owner is None and not keeps_weight(attn.q_proj.base_layer.train())
    assert torch.equal(attn.q_proj.base_layer.qweight, layer0.self_attn.q_proj.base_layer.qweight)


@pytest.mark.parametrize("dropout,autocast", [(0.0, False), (0.1, False),
                                              pytest.param(0.1, True, marks=here)])
def test_lora_inputs_are_recomputed_not_kept(dropout, autocast):
    """The inputs that LoRA A's gradient needs and that a fused layer can make again are saved as the way to make
    them, not as memory: the MLP's down input h = silu(g) * u always, and with the kernels (in the interpreter
    child or on a GPU) the two norm outputs that feed q/k/v and gate/up. After forward they are freed, and the
    loss and every gradient equal, bit for bit, those of a run that keeps them (an outer saved-tensor hook, as
    non-reentrant checkpointing installs, turns the recompute off). A bf16 model under autocast takes LoRA's
    fused dropout, which saves a view of its input; in float32, PEFT's A saves the input itself (p = 0) or the
    dropout's output (p > 0, where the input was never kept)."""
    import gc
    from contextlib import nullcontext

    from torch.multiprocessing.reductions import StorageWeakRef

    import xpu_llm
    from xpu_llm.finetune import add_lora
    from xpu_llm.finetune.fused import use_kernels

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEV, torch.bfloat16 if autocast else torch.float32)
    model.requires_grad_(False)
    xpu_llm.optimize_model(model, low_bit="nf4", group_size=32)
    fuse_layers(model)
    model = add_lora(model, r=4, lora_alpha=8, lora_dropout=dropout).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    layer = model.base_model.model.model.layers[0]
    seen: dict[str, list] = {"down": [], "q": [], "gate": []}
    for name, mod in (("down", layer.mlp.down_proj), ("q", layer.self_attn.q_proj), ("gate", layer.mlp.gate_proj)):
        mod.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(
            StorageWeakRef(args[0].untyped_storage())))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3)).to(DEV)

    def run(keep: bool):
        torch.manual_seed(5)
        model.zero_grad(set_to_none=True)
        outer = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if keep else nullcontext()
        with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=autocast), outer:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # training: no KV cache
        gc.collect()
        alive = {name: not refs[-1].expired() for name, refs in seen.items()}  # held by the tensor or a view
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, alive

    loss, grads, alive = run(keep=False)
    ref_loss, ref_grads, ref_alive = run(keep=True)
    assert not alive["down"], "the MLP's down projection input is still held after forward"
    if use_kernels(ids):
        assert not alive["q"] and not alive["gate"], f"a fused norm's output is still held after forward: {alive}"
    kept = dropout == 0 or autocast
    assert ref_alive == {"down": kept, "q": kept, "gate": kept}, f"the reference run should keep them: {ref_alive}"
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[n], ref_grads[n]) for n in grads)


@here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_rows_match_float64(dtype):
    """The loss kernel's per-row cross-entropy and its in-place softmax - one-hot against float64, over a vocabulary
    of two blocks, the second partial, with logits large enough that a sum of plain exponentials overflows."""
    from xpu_llm.finetune import kernels as k

    rows, vocab = 7, k.CE_BLOCK + 904
    g = torch.Generator().manual_seed(2)
    z = torch.randn(rows, vocab, generator=g) * 4
    z[0] += 200.0  # exp(200) overflows float32: only a max-shifted sum is finite
    z[1, -1] = 60.0  # the row's maximum in the partial block
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[2] = vocab - 1
    logits = z.to(DEV, dtype).clone()  # overwritten by the gradient
    z64 = logits.double().cpu()
    ref_loss = torch.nn.functional.cross_entropy(z64, t, reduction="none")
    ref_grad = torch.softmax(z64, -1) - torch.nn.functional.one_hot(t, vocab).double()
    loss = k.cross_entropy_rows_(logits, t.to(DEV))
    assert torch.allclose(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-5), (loss, ref_loss)
    ulp = 1e-6 if dtype == torch.float32 else 4e-3  # one rounding of each probability to the logits' dtype
    assert (logits.double().cpu() - ref_grad).abs().max() <= ulp
    again = z.to(DEV, dtype).clone()
    assert torch.equal(k.cross_entropy_rows_(again, t.to(DEV), grad=False), loss)
    assert torch.equal(again, z.to(DEV, dtype)), "grad=False must leave the logits as they are"


@here
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_head_loss_with_the_kernel_matches_float64(autocast):
    """head_cross_entropy through the loss kernel (chunks of 8 rows, the last partial) gives the float64 loss and
    input gradient: exact in float32, within bf16's rounding of the logits and their gradient under autocast."""
    from xpu_llm.finetune.loss import head_cross_entropy

    torch.manual_seed(3)
    head = nn.Linear(48, 301, bias=True).to(DEV).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 48, generator=g).to(DEV).requires_grad_(True)
    t = torch.randint(0, 301, (37,), generator=g).to(DEV)
    with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=autocast):
        loss = head_cross_entropy(h, head, t, chunk_bytes=4 * 301 * 8)
    (loss * 0.37).backward()
    hd = h.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hd, head.weight.double(), head.bias.double()),
                                            t, reduction="sum")
    (ref * 0.37).backward()
    tol = (2e-2, 3e-2) if autocast else (1e-6, 1e-5)
    assert abs(loss.item() - ref.item()) <= tol[0] * abs(ref.item()) and rel(h.grad, hd.grad) < tol[1]


@here
def test_norm_output_is_recomputable_only_with_autograd_and_a_whole_weight():
    """A fused norm offers its output for recompute when autograd records and its weight is whole here; not
    under no_grad, and not for a ZeRO-3-partitioned weight (ds_id), which is gathered only around the norm's own
    forward and backward. The recompute gives the output bit for bit."""
    from xpu_llm.finetune.fused import RECOMPUTABLE

    norm = FusedRMSNorm(hf_norm(WIDTH, torch.bfloat16).weight, 1e-5)
    x = torch.randn(3, 5, WIDTH, generator=torch.Generator().manual_seed(4)).to(DEV, torch.bfloat16)
    x.requires_grad_(True)
    y = norm(x)
    assert torch.equal(RECOMPUTABLE[y](), y.detach())
    with torch.no_grad():
        assert RECOMPUTABLE.get(norm(x)) is None
    norm.weight.ds_id = 7
    try:
        assert RECOMPUTABLE.get(norm(x)) is None
    finally:
        del norm.weight.ds_id
