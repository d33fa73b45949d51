"""The lowbit draft's default "auto" format: a float target loaded from GGUF Q4_0 / Q4_1 blocks gets a draft whose
layers are those blocks' grid again, so they dequantize to the target's weights bit for bit; layers read from
anything else go to sym_int4 g64 as before. Tiny GGUF files written here keep it to seconds."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from xpu_llm import LLM, XpuLLMError
from xpu_llm.drafts import LowBitDraft, lowbit_copy
from xpu_llm.lowbit.exact import exact_quantize
from xpu_llm.lowbit.formats import get_format
from xpu_llm.lowbit.linear import LowBitLinear
from xpu_llm.speculative import SpeculativeConfig

HIDDEN, HEADS, KV, FFN, VOCAB = 64, 4, 2, 128, 128
GRID = {QT.Q4_0: "sym_int4", QT.Q4_1: "asym_int4"}
LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


def write_gguf(path, main: QT, tied: bool) -> None:
    """Two llama layers: layer 0 all `main`; layer 1 with q|k|v of mixed 4-bit types (no single grid), o in
    `main`, gate|up Q8_0 (an 8-bit grid) and down F16. Tied: the embedding in `main`, else an F16 embedding and an
    lm_head in `main`."""
    other = QT.Q4_1 if main == QT.Q4_0 else QT.Q4_0
    rng = np.random.default_rng(int(main))
    hd = HIDDEN // HEADS
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV * hd, HIDDEN), "attn_v": (KV * hd, HIDDEN),
              "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
              "ffn_down": (HIDDEN, FFN)}
    types = [dict.fromkeys(shapes, main),
             {"attn_q": main, "attn_k": main, "attn_v": other, "attn_output": main, "ffn_gate": QT.Q8_0,
              "ffn_up": QT.Q8_0, "ffn_down": QT.F16}]
    tensors = {"token_embd.weight": ((VOCAB, HIDDEN), main if tied else QT.F16),
               "output_norm.weight": ((HIDDEN,), QT.F32)}
    if not tied:
        tensors["output.weight"] = ((VOCAB, HIDDEN), main)
    for i, layer in enumerate(types):
        tensors.update({f"blk.{i}.{n}.weight": (shapes[n], t) for n, t in layer.items()})
        tensors.update({f"blk.{i}.{n}.weight": ((HIDDEN,), QT.F32) for n in ("attn_norm", "ffn_norm")})
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, 2), (w.add_context_length, 256), (w.add_embedding_length, HIDDEN),
                   (w.add_feed_forward_length, FFN), (w.add_head_count, HEADS), (w.add_head_count_kv, KV),
                   (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, VOCAB)):
        add(v)
    for name, (shape, qtype) in tensors.items():
        x = (rng.standard_normal(shape) * (1.0 if name.endswith("norm.weight") else 0.3)).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def expected_grid(main: QT) -> dict[str, tuple[str, int]]:
    """What the loader should record for write_gguf's file."""
    fmt = (GRID[main], 32)
    grid = {f"layers.0.{n}": fmt for n in LINEARS}
    grid.update({"layers.1.attention.wo": fmt, "layers.1.feed_forward.w13": ("sym_int8", 32), "output": fmt})
    return grid


def load_float32(path: str, max_seq_len: int) -> LLM:
    """A float32 target from `path` (LLM() returns once its background tokenizer load is over: these files have no
    vocabulary, so that load fails, and its error would only be raised where a tokenizer is used)."""
    return LLM(path, low_bit=None, dtype=torch.float32, device="cpu", max_seq_len=max_seq_len)


@pytest.fixture(scope="module", params=[QT.Q4_1, QT.Q4_0], ids=["q4_1", "q4_0-tied"])
def float_target(request, tmp_path_factory):
    """(main type, a float32 LLM loaded from the file, the file's path)."""
    main = request.param
    path = tmp_path_factory.mktemp("grid") / f"tiny-{main.name}.gguf"
    write_gguf(path, main, tied=main == QT.Q4_0)
    return main, load_float32(str(path), 96), str(path)


def linears(model) -> dict[str, torch.nn.Module]:
    out = {f"layers.{i}.{n}": layer.get_submodule(n) for i, layer in enumerate(model.layers) for n in LINEARS}
    out["output"] = model.output
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


def test_loader_records_source_grid(float_target):
    main, llm, _ = float_target
    assert llm.model.source_grid == expected_grid(main)
    # a float target throughout (its dense linears swapped for cpu_decode's SkinnyLinear: the record is by path)
    assert all(isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32 for m in linears(llm.model).values())


def test_auto_draft_reproduces_source_grid_layers(float_target):
    """Layers with a 4-bit source grid come back bit for bit in it; the rest are sym_int4 g64."""
    main, llm, _ = float_target
    draft, share = lowbit_copy(llm.model, "auto", 64)
    assert share == 1.0
    grid = expected_grid(main)
    target = linears(llm.model)
    for name, layer in linears(draft).items():
        assert isinstance(layer, LowBitLinear), name
        if grid.get(name, ("", 0))[0] in ("sym_int4", "asym_int4"):
            assert (layer.low_bit, layer.group_size) == grid[name], name
            assert same_bits(layer.dequantize_weight(torch.float32), target[name].weight), name
        else:
            assert (layer.low_bit, layer.group_size) == ("sym_int4", 64), name
            assert not same_bits(layer.dequantize_weight(torch.float32), target[name].weight), name


def test_explicit_format_ignores_source_grid(float_target):
    _, llm, _ = float_target
    draft, _ = lowbit_copy(llm.model, "sym_int4", 64)
    assert {(m.low_bit, m.group_size) for m in linears(draft).values()} == {("sym_int4", 64)}


def test_off_grid_weight_still_uses_its_grid(float_target):
    """A weight moved off its grid (here one value nudged by an ulp) is quantized into the grid all the same."""
    main, _, path = float_target
    llm = load_float32(path, 32)
    wo = llm.model.layers[0].attention.wo.weight
    with torch.no_grad():
        wo[0, 0] = torch.nextafter(wo[0, 0], torch.tensor(1.0))
    draft, _ = lowbit_copy(llm.model, "auto", 64)
    layer = draft.layers[0].attention.wo
    assert (layer.low_bit, layer.group_size) == (GRID[main], 32)
    assert not same_bits(layer.dequantize_weight(torch.float32), wo)
    assert same_bits(draft.layers[0].feed_forward.w2.dequantize_weight(torch.float32),
                     llm.model.layers[0].feed_forward.w2.weight)


@pytest.mark.parametrize("rows", [[[5, 9, 14, 5, 9, 14, 5, 9]], [[5, 9, 14, 5, 9, 14, 5, 9], [77, 3, 3, 60, 121]]],
                         ids=["batch1", "batch2"])
def test_greedy_identical_auto_draft(float_target, rows):
    _, llm, _ = float_target
    t = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    ref = llm.generate_ids(ids, max_new_tokens=24, attention_mask=mask, ignore_eos=True)
    got = llm.generate_ids(ids, max_new_tokens=24, attention_mask=mask, ignore_eos=True, speculative="lowbit")
    assert torch.equal(ref, got)
    assert isinstance(llm._draft(SpeculativeConfig(kind="lowbit")), LowBitDraft)
    assert ("lowbit", "auto", 64) in llm._drafts


def test_auto_without_source_grid_is_sym_int4(tiny_checkpoints):
    """An HF (float) checkpoint has no source grid: "auto" builds the sym_int4 g64 draft of before."""
    llm = LLM(tiny_checkpoints["llama"][0], low_bit=None, dtype=torch.float32, device="cpu", max_seq_len=32)
    assert llm.model.source_grid == {}
    auto, _ = lowbit_copy(llm.model, "auto", 64)
    sym, _ = lowbit_copy(llm.model, "sym_int4", 64)
    for (name, a), b in zip(linears(auto).items(), linears(sym).values()):
        assert (a.low_bit, a.group_size) == (b.low_bit, b.group_size), name
        assert same_bits(a.dequantize_weight(torch.float32), b.dequantize_weight(torch.float32)), name


def test_config_accepts_auto():
    assert SpeculativeConfig().low_bit == "auto"
    assert SpeculativeConfig.of("lowbit").draft_key() == ("lowbit", "auto", 64)
    assert SpeculativeConfig.of({"kind": "lowbit", "low_bit": "AUTO"}).draft_key() == ("lowbit", "auto", 64)
    assert SpeculativeConfig.of({"kind": "lowbit", "low_bit": "nf4"}).draft_key() == ("lowbit", "nf4", 64)
    for bad in ("sym_int8", "fp16", "int3"):
        with pytest.raises(XpuLLMError, match="low_bit='auto' or a 4-bit format"):
            SpeculativeConfig.of({"kind": "lowbit", "low_bit": bad})


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1])
def test_exact_quantize_gguf_blocks(qtype):
    """gguf-py's Q4_0 / Q4_1 blocks (all-zero groups included, whose Q4_0 scale is -0.0) come back bit for bit;
    the registry's own quantize does not give Q4_0 back (absmax / 7, not / 8); off-grid weights give None."""
    x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    x[0, :32] = 0.0
    w = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).astype(np.float32))
    fmt = get_format(GRID[qtype])
    q = exact_quantize(fmt.name, w, 32)
    assert q is not None and same_bits(fmt.dequantize(q, 32, torch.float32), w)
    if qtype == QT.Q4_0:
        assert not torch.equal(fmt.dequantize(fmt.quantize(w, 32), 32, torch.float32), w)
    assert exact_quantize(fmt.name, torch.from_numpy(x), 32) is None
    assert exact_quantize(fmt.name, w.bfloat16().float() + 1e-3, 32) is None
