"""Low-bit formats, packing, LowBitLinear and its kernels: exact storage, bounded error, kernel == reference,
canonical state dicts that survive the kernels, and GGUF blocks that map onto our formats unchanged."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from xpu_llm.errors import UnknownFormatError
from xpu_llm.lowbit import FORMATS, GROUP_SIZES, LOW_BIT_NAMES, LowBitLinear, get_format, quantize_linears
from xpu_llm.lowbit.kernels import cpu, cpu_native
from xpu_llm.lowbit.packing import pack_int4_signed, pack_nibbles, unpack_nibbles

K = 256  # divisible by every group size
# Frobenius relative error of quantize -> dequantize on N(0, 1) weights, measured (x ~1.15 margin).
REL_ERR = {"sym_int4": 0.14, "asym_int4": 0.12, "nf4": 0.11, "fp4": 0.13, "sym_int8": 0.008,
           "fp8_e4m3": 0.03, "fp8_e5m2": 0.06, "bf16": 0.002, "fp16": 3e-4, "fp32": 0.0}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(n, k, generator=_gen(seed))
    w[0, :128] = 0.0  # an all-zero group for every group size: scale 0, codes 0, no NaN
    return w


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A view that torch.equal compares bit for bit (fp8 and NaN-safe)."""
    return t.contiguous().view(torch.uint8)


def _random_canonical(name: str, n: int, k: int, g: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random valid canonical tensors (every code, scales > 0) straight into the storage layout."""
    gen, out = _gen(seed), {}
    for t, (shape, dt) in get_format(name).shapes(n, k, g).items():
        if t == "qweight" and not dt.is_floating_point:
            lo, hi = (0, 256) if dt == torch.uint8 else (-127, 128)
            out[t] = torch.randint(lo, hi, shape, generator=gen, dtype=dt)
        else:  # fp8 codes: random finite values; mins < 0; scales > 0
            r = torch.randn(shape, generator=gen) * 8 if t == "qweight" else torch.rand(shape, generator=gen)
            out[t] = (-r if t == "mins" else r * 0.1 + 1e-3 if t == "scales" else r).to(dt)
    return out


@pytest.fixture(params=["native", "torch"])
def kernels_always(request, monkeypatch):
    """Each family of CPU kernels in turn: the native AVX2 one, then PyTorch's packed ones (what runs where the
    native one cannot be built); each applies whatever the size (production thresholds keep some layers off)."""
    if request.param == "native":
        if not cpu_native.available():
            pytest.skip("the native CPU kernel cannot be built on this machine")
        monkeypatch.setattr(cpu_native, "MAX_M", 1 << 30)
    else:
        monkeypatch.setattr(cpu_native, "available", lambda: False)
        for name in ("INT4_MAX_M", "INT8_CHANNEL_MAX_M", "INT8_GROUPED_MAX_M"):
            monkeypatch.setattr(cpu, name, 1 << 30)
        monkeypatch.setattr(cpu, "INT8_GROUPED_MIN_ROWS_X_GROUP", 0)
    return request.param


@pytest.fixture
def torch_kernels(monkeypatch):
    """PyTorch's packed kernels, as where the native one cannot be built (they re-lay and drop qweight)."""
    monkeypatch.setattr(cpu_native, "available", lambda: False)


def _drops_canonical(name: str, kernels: str) -> bool:
    """Whether a prepared layer holds only the kernel's re-laid copy of qweight (PyTorch's int4/int8 packs)."""
    return kernels == "torch" and name in ("sym_int4", "asym_int4", "sym_int8")


# ---------------------------------------------------------------------------------------------- registry

def test_registry_and_unknown_format():
    assert LOW_BIT_NAMES == ("sym_int4", "asym_int4", "nf4", "fp4", "sym_int8", "fp8_e4m3", "fp8_e5m2")
    assert GROUP_SIZES == (32, 64, 128) and get_format("SYM_INT4") is FORMATS["sym_int4"]
    for name, f in FORMATS.items():
        assert get_format(name) is f and f.name == name and f.dense == (name in ("bf16", "fp16", "fp32"))
    with pytest.raises(UnknownFormatError) as e:
        get_format("int3")
    assert all(name in str(e.value) for name in FORMATS)
    with pytest.raises(UnknownFormatError):
        LowBitLinear(64, 64, low_bit="q4_k")


@pytest.mark.parametrize("name", list(FORMATS))
def test_shapes_and_nbytes(name):
    f = get_format(name)
    for g in GROUP_SIZES:
        q = f.quantize(_weight(48, K), g)
        shapes = f.shapes(48, K, g)
        assert {t: (tuple(v.shape), v.dtype) for t, v in q.items()} == shapes
        assert tuple(q) == f.tensor_names
        assert f.nbytes(48, K, g) == sum(v.numel() * v.element_size() for v in q.values())
    if not f.dense:
        assert f.bits * 48 * K // 8 < f.nbytes(48, K, 32) < 48 * K * 2


# ---------------------------------------------------------------------------------------------- packing

def test_nibble_round_trip():
    codes = torch.randint(0, 16, (7, 3, 64), generator=_gen(1), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (7, 3, 32) and packed.dtype == torch.uint8 and torch.equal(unpack_nibbles(packed), codes)
    assert torch.equal(packed[..., 0] & 0xF, codes[..., 0]) and torch.equal(packed[..., 0] >> 4, codes[..., 1])
    raw = torch.randint(0, 256, (5, 40), generator=_gen(2), dtype=torch.uint8)
    q = torch.randint(-8, 8, (4, 32), generator=_gen(3))
    assert torch.equal(pack_nibbles(unpack_nibbles(raw)), raw)
    assert torch.equal(unpack_nibbles(pack_int4_signed(q)).long() - 8, q)


@pytest.mark.parametrize("name", LOW_BIT_NAMES)
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_kernel_layout_round_trip(name, g, kernels_always):
    """Random canonical tensors survive the kernel re-layout (prepare) bit for bit, rows stay independent."""
    n = 80  # not a multiple of 64: a tail block in the int4 layout
    q = _random_canonical(name, n, K, g, seed=g)
    layer = LowBitLinear.from_quantized({k: v.clone() for k, v in q.items()}, K, n, name, g).prepare(torch.bfloat16)
    assert (layer._buffers["qweight"] is None) == _drops_canonical(name, kernels_always)
    got = layer.tensors()
    for t in q:
        assert torch.equal(_bits(got[t]), _bits(q[t])), (name, t)
    rows = torch.tensor([3, 0, 79])
    sub = get_format(name).dequantize({t: v[rows] for t, v in q.items()}, g)
    assert torch.equal(sub, layer.dequantize_weight()[rows])


@pytest.mark.skipif(cpu.int4pack_layout() is None, reason="no int4pack CPU kernel layout here")
@pytest.mark.parametrize("n,k", [(16, 64), (48, 128), (80, 64), (192, 576), (208, 128), (576, 1536),
                                 (1536, 576), (49152, 576)])
def test_int4pack_unpack_bit_exact(n, k):
    qweight = torch.randint(0, 256, (n, k // 2), generator=_gen(n), dtype=torch.uint8)
    packed = cpu.int4_pack(qweight)
    if n <= 1536:  # packing in row chunks == one call
        one = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(qweight).to(torch.int32), 2)
        assert torch.equal(cpu.int4_pack(qweight, chunk_rows=64), one) and torch.equal(packed, one)
    assert torch.equal(cpu.int4_unpack(packed, n, k), qweight)


# ---------------------------------------------------------------------------------------------- quantize

@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_quantize_error_bounded(name, g):
    f = get_format(name)
    w = _weight(64, K, seed=g)
    for dt in (torch.float32, torch.bfloat16):
        q = f.quantize(w.to(dt), g)
        d = f.dequantize(q, g)
        assert torch.isfinite(d).all() and _rel(d, w.to(dt)) <= REL_ERR[name]
        assert torch.equal(d[0, :128], torch.zeros(128)) and f.dequantize(q, g, torch.bfloat16).dtype == torch.bfloat16
    if name in ("sym_int4", "asym_int4", "sym_int8"):  # element-wise: within half a step of the group scale
        q = f.quantize(w, g)
        step = q["scales"].float().repeat_interleave(g, dim=1)
        assert ((f.dequantize(q, g) - w).abs() <= step * 0.5 + 1e-3 * step + 1e-6).all()


def _np_fp16_scale(v32: np.ndarray, div: float) -> np.ndarray:
    """absmax / div in float32 (via float64: correctly rounded), then rounded to float16, as float64."""
    return (v32.astype(np.float64) / div).astype(np.float32).astype(np.float16).astype(np.float64)


@pytest.mark.parametrize("g", GROUP_SIZES)
def test_int_formats_match_numpy_float64(g):
    """sym_int4 / asym_int4 / sym_int8 codes and scales recomputed independently in numpy."""
    w = _weight(64, K, seed=10 + g)
    x32 = w.numpy().reshape(64, K // g, g)
    x, absmax = x32.astype(np.float64), np.abs(x32).max(-1, keepdims=True)
    safe = lambda s: np.where(s == 0, 1.0, s)  # noqa: E731

    s = _np_fp16_scale(absmax, 7)
    codes = (np.clip(np.rint(x / safe(s)), -8, 7) + 8).astype(np.uint8).reshape(64, K)
    q = get_format("sym_int4").quantize(w, g)
    assert np.array_equal(q["scales"].numpy(), s[..., 0].astype(np.float16))
    assert np.array_equal(q["qweight"].numpy(), codes[:, 0::2] | (codes[:, 1::2] << 4))

    mn, mx = x32.min(-1, keepdims=True), x32.max(-1, keepdims=True)
    s = _np_fp16_scale((mx - mn).astype(np.float32), 15)
    m = mn.astype(np.float16).astype(np.float64)
    codes = np.clip(np.rint((x - m) / safe(s)), 0, 15).astype(np.uint8).reshape(64, K)
    q = get_format("asym_int4").quantize(w, g)
    assert np.array_equal(q["scales"].numpy(), s[..., 0].astype(np.float16))
    assert np.array_equal(q["mins"].numpy(), m[..., 0].astype(np.float16))
    assert np.array_equal(q["qweight"].numpy(), codes[:, 0::2] | (codes[:, 1::2] << 4))
    deq = get_format("asym_int4").dequantize(q, g, torch.float64).numpy()
    assert np.allclose(deq, (codes.reshape(64, K // g, g) * s + m).reshape(64, K), rtol=0, atol=1e-6)

    s = _np_fp16_scale(absmax, 127)
    codes = np.clip(np.rint(x / safe(s)), -127, 127).astype(np.int8).reshape(64, K)
    q = get_format("sym_int8").quantize(w, g)
    assert np.array_equal(q["scales"].numpy(), s[..., 0].astype(np.float16))
    assert np.array_equal(q["qweight"].numpy(), codes)


def test_codebook_and_fp8_codes():
    w = _weight(16, 128, seed=5)
    q = get_format("nf4").quantize(w, 64)
    code = torch.tensor(FORMATS["nf4"].code)
    y = (w.view(16, 2, 64) / q["scales"].float().clamp_min(1e-30).unsqueeze(-1)).reshape(16, 128)
    idx = unpack_nibbles(q["qweight"]).long()
    assert torch.equal(idx, (y.unsqueeze(-1) - code).abs().argmin(-1))  # nearest level (no ties in random data)
    q = get_format("fp4").quantize(w, 32)
    levels = get_format("fp4").dequantize(q, 32) / q["scales"].float().repeat_interleave(32, 1).clamp_min(1e-30)
    assert set(levels.flatten().tolist()) <= set(FORMATS["fp4"].code)
    for name, dt in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        q = get_format(name).quantize(w, 32)
        assert q["qweight"].dtype == dt and q["scales"].dtype == torch.float32
        assert torch.allclose(q["scales"][1:], w[1:].view(15, 4, 32).abs().amax(-1) / torch.finfo(dt).max)


# ---------------------------------------------------------------------------------------------- GGUF blocks

@pytest.mark.parametrize("qtype,low_bit", [("Q4_1", "asym_int4"), ("Q4_0", "sym_int4"), ("Q8_0", "sym_int8")])
def test_gguf_blocks_map_exactly(qtype, low_bit):
    """Hand-made GGUF blocks (fp16 d [, m], then codes; Q4: element j in the low nibble of byte j, j+16 in the
    high nibble) re-laid into our canonical form dequantize exactly as the gguf package does."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    rows, nblocks = 3, 4
    rng = np.random.default_rng(0)
    nhead = 4 if qtype == "Q4_1" else 2
    head = np.stack([rng.uniform(0.01, 0.1, (rows, nblocks)), rng.uniform(-1, 0, (rows, nblocks))], -1)
    head = head[..., : nhead // 2].astype(np.float16)  # d (and m)
    body = rng.integers(0, 256, (rows, nblocks, 32 if qtype == "Q8_0" else 16), dtype=np.uint8)
    if qtype == "Q8_0":
        body[body == 128] = 129  # -128 is not a sym_int8 code
    raw = np.concatenate([head.view(np.uint8), body], -1).reshape(rows, -1)
    expected = dequantize(raw, getattr(GGMLQuantizationType, qtype))  # float32
    q = {"scales": torch.from_numpy(np.ascontiguousarray(head[..., 0]))}
    if qtype == "Q4_1":
        q["mins"] = torch.from_numpy(np.ascontiguousarray(head[..., 1]))
    if qtype == "Q8_0":
        q["qweight"] = torch.from_numpy(body.view(np.int8).reshape(rows, -1))
    else:  # elements in order, then our nibble packing
        codes = torch.from_numpy(np.concatenate([body & 0x0F, body >> 4], -1)).reshape(rows, -1)
        q["qweight"] = pack_nibbles(codes)
    assert np.array_equal(get_format(low_bit).dequantize(q, 32).numpy(), expected)  # bit for bit in float32
    layer = LowBitLinear.from_quantized(q, 32 * nblocks, rows, low_bit, 32)
    assert np.array_equal(layer.dequantize_weight().numpy(), expected)


# ---------------------------------------------------------------------------------------------- LowBitLinear

def _layer(name: str, n: int, g: int, bias: bool = True, seed: int = 0) -> LowBitLinear:
    lin = nn.Linear(K, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(_weight(n, K, seed))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=_gen(seed + 1)))
    return LowBitLinear.from_linear(lin, name, g)


@pytest.mark.parametrize("name", LOW_BIT_NAMES)
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_forward_matches_float64(name, g, kernels_always):
    for n in (192, 80):
        layer = _layer(name, n, g, seed=n + g)
        w, b = layer.dequantize_weight(torch.float64), layer.bias.double()
        for shape in ((1, K), (3, 5, K)):
            x = torch.randn(*shape, generator=_gen(g))
            for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)):
                xd = x.to(dt)
                y = layer(xd)
                assert y.dtype == dt and y.shape == (*shape[:-1], n)
                assert _rel(y, xd.double() @ w.T + b) < tol, (name, g, n, shape, dt)
        if kernels_always == "native" or name in ("sym_int4", "asym_int4", "sym_int8"):
            assert layer._kernel is not None  # a kernel ran, not the dequantize fallback
        assert (layer._buffers["qweight"] is None) == _drops_canonical(name, kernels_always)
    x64 = torch.randn(2, K, generator=_gen(1), dtype=torch.float64)
    assert torch.allclose(layer(x64), x64 @ w.T + b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["sym_int4", "asym_int4", "nf4", "fp8_e5m2"])
def test_dequant_matmul_row_blocks(name):
    layer = _layer(name, 200, 64, bias=False)
    w = layer.dequantize_weight(torch.float64)
    if hasattr(layer.fmt, "dequantize_halves"):
        even, odd = layer.fmt.dequantize_halves(layer.tensors(), 64)
        assert torch.equal(even, w[:, 0::2].float()) and torch.equal(odd, w[:, 1::2].float())
    for dt, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-3)):
        x = torch.randn(3, K, generator=_gen(6)).to(dt)
        y = cpu.dequant_matmul(x, layer.fmt, layer.tensors(), 64, chunk_elems=64 * K)  # 4 row blocks
        assert y.dtype == dt and y.shape == (3, 200) and _rel(y, x.double() @ w.T) < tol


@pytest.mark.parametrize("name", LOW_BIT_NAMES)
def test_state_dict_safetensors_round_trip(name, tmp_path, kernels_always):
    g = 64
    layer = _layer(name, 80, g, seed=7)
    sd0 = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 3, K, generator=_gen(4))
    y0 = layer(x)
    for dt in (torch.bfloat16, torch.float32):  # the kernel path runs (and may drop qweight), then fp32 again
        layer(x.to(dt))
    sd1 = layer.state_dict()
    assert list(sd1) == list(get_format(name).tensor_names) + ["bias"]
    for k in sd0:
        assert sd1[k].dtype == sd0[k].dtype and torch.equal(_bits(sd1[k]), _bits(sd0[k])), k
    path = tmp_path / "layer.safetensors"
    save_file(sd1, str(path))
    fresh = LowBitLinear(K, 80, bias=True, low_bit=name, group_size=g, device="meta")
    fresh.load_state_dict(load_file(str(path)), assign=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(_bits(v), _bits(sd0[k])), k
    assert torch.equal(fresh(x), y0)
    fresh.prepare(torch.bfloat16)
    fresh.load_state_dict(sd0)  # loading into a prepared layer resets the kernel state
    assert fresh._kernel is None and torch.equal(fresh(x), y0)


def test_meta_construction_and_asserts():
    layer = LowBitLinear(K, 96, bias=False, low_bit="asym_int4", group_size=32, device="meta")
    assert {n: (tuple(b.shape), b.dtype) for n, b in layer.named_buffers()} == FORMATS["asym_int4"].shapes(96, K, 32)
    assert layer.bias is None and all(b.is_meta for b in layer.buffers())
    assert not any(p.requires_grad for p in _layer("nf4", 32, 64).parameters())
    with pytest.raises(AssertionError, match="not a multiple of group_size"):
        LowBitLinear(100, 64, low_bit="sym_int4", group_size=64)
    with pytest.raises(AssertionError, match="dense"):
        LowBitLinear(64, 64, low_bit="bf16")
    assert "low_bit=asym_int4, group_size=32" in repr(layer)


def test_dtype_casts_keep_the_format(torch_kernels):
    layer = _layer("fp8_e4m3", 32, 64)
    layer(torch.randn(1, K, dtype=torch.bfloat16))
    layer.to(torch.bfloat16)  # a model-wide cast: fp8 codes and fp32 scales are part of the format
    assert (layer.qweight.dtype, layer.scales.dtype, layer.bias.dtype) == (torch.float8_e4m3fn, torch.float32,
                                                                           torch.bfloat16)
    layer = _layer("sym_int4", 32, 64).prepare(torch.bfloat16)
    assert layer._buffers["qweight"] is None
    layer.half()
    assert layer.qweight.dtype == torch.uint8 and layer.scales.dtype == torch.float16 and layer._kernel is None


def test_keep_canonical_restores_qweight(torch_kernels):
    layer = _layer("sym_int4", 64, 32).prepare(torch.bfloat16)
    assert layer._buffers["qweight"] is None
    layer.keep_canonical = True  # what a tied LowBitEmbedding sets: it gathers rows of qweight
    assert layer.qweight is not None and torch.equal(layer.qweight, layer.tensors()["qweight"])
    layer(torch.randn(1, K, dtype=torch.bfloat16))
    assert layer._buffers["qweight"] is not None


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_backward_to_the_input(dt):
    layer = _layer("sym_int4", 64, 64)
    x = torch.randn(2, 3, K, generator=_gen(5)).to(dt).requires_grad_(True)
    layer(x).sum().backward()
    expected = torch.ones(2, 3, 64, dtype=dt) @ layer.dequantize_weight(dt)
    assert torch.allclose(x.grad.float(), expected.float(), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------- quantize_linears

class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(128, 64)
        self.odd = nn.Linear(100, 64)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(64, 128, bias=False), nn.ReLU()) for _ in range(2)])
        self.head = nn.Linear(128, 32, bias=False)


def test_quantize_linears(caplog):
    torch.manual_seed(0)
    model = _Tiny()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with caplog.at_level(logging.WARNING, logger="xpu_llm.lowbit.linear"):
        out = quantize_linears(model, "sym_int4", 64, skip=lambda name, lin: name == "head")
    assert out is model
    assert isinstance(model.a, LowBitLinear) and isinstance(model.blocks[1][0], LowBitLinear)
    assert type(model.odd) is nn.Linear and type(model.head) is nn.Linear
    assert any("odd" in r.getMessage() and "100" in r.getMessage() for r in caplog.records)
    assert not any("head" in r.getMessage() for r in caplog.records)
    assert _rel(model.a.dequantize_weight(), before["a"]) < REL_ERR["sym_int4"]
    assert model.a.bias is not None and model.blocks[0][0].bias is None
    dense = quantize_linears(_Tiny(), "bf16", 64)
    assert all(m.weight.dtype == torch.bfloat16 for m in dense.modules() if isinstance(m, nn.Linear))
    assert isinstance(quantize_linears(nn.Linear(64, 16), "nf4", 32), LowBitLinear)


def test_lookup_tables_match_direct_conversion():
    from xpu_llm.lowbit.formats import fp8_values
    from xpu_llm.lowbit.packing import lookup_bytes, lookup_nibbles, nibbles_to_float
    code = tuple(torch.randn(16, generator=_gen(8)).tolist())
    for width in (6, 7):  # even byte count: 2 bytes per lookup; odd: 1
        packed = torch.randint(0, 256, (3, width), generator=_gen(width), dtype=torch.uint8)
        idx = unpack_nibbles(packed).long()
        assert torch.equal(lookup_nibbles(packed, code), torch.tensor(code)[idx])
        assert torch.equal(nibbles_to_float(packed), idx.float())
        for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
            data = packed.view(fp8)  # every bit pattern, NaN and inf included
            assert torch.equal(_bits(lookup_bytes(data, fp8_values(fp8))), _bits(data.float()))


@pytest.mark.parametrize("name,n,g", [("sym_int4", 64, 32), ("asym_int4", 64, 32), ("sym_int8", 4096, 32),
                                      ("sym_int8", 96, K)])  # int8: grouped (N*g large enough), per-channel
def test_prefill_after_decode_uses_canonical_weights(name, n, g, torch_kernels):
    """Large M takes the dequantize path; after the kernel dropped qweight it is rebuilt exactly for it."""
    layer = _layer(name, n, g, seed=9)
    w, b = layer.dequantize_weight(torch.float64), layer.bias.double()
    decode = torch.randn(1, 1, K, generator=_gen(1)).to(torch.bfloat16)
    prefill = torch.randn(2, 40, K, generator=_gen(2)).to(torch.bfloat16)  # M = 80: above every kernel's limit
    assert _rel(layer(decode), decode.double() @ w.T + b) < 2e-2
    assert layer._kernel is not None and layer._buffers["qweight"] is None
    assert _rel(layer(prefill), prefill.double() @ w.T + b) < 2e-2
    assert layer._buffers["qweight"] is None  # still packed for the next decode step


@pytest.mark.skipif(not cpu_native.available(), reason="the native CPU kernel cannot be built on this machine")
@pytest.mark.parametrize("name", LOW_BIT_NAMES)
def test_native_decode_then_prefill_keeps_its_state(name):
    """Decode (native kernel) and prefill (dequantize + GEMM) alternate without re-packing or dropping qweight."""
    layer = _layer(name, 64, 32, seed=10)
    w, b = layer.dequantize_weight(torch.float64), layer.bias.double()
    for _ in range(2):
        for m in (1, cpu_native.MAX_M, cpu_native.MAX_M + 1, 80):
            x = torch.randn(m, K, generator=_gen(m))
            assert _rel(layer(x), x.double() @ w.T + b) < 1e-5, (name, m)
        kernel, state = layer._kernel, layer._state
        assert isinstance(kernel, cpu_native.NativeLowBit) and layer._buffers["qweight"] is not None
    assert layer._kernel is kernel and layer._state is state  # prepared once


def _int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per block of 32 (scale absmax / 127, round half to even), back in float64: what the
    integer kernels multiply by, computed independently."""
    m, k = x.shape
    b = x.double().view(m, k // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(b * inv) * (amax / 127)).view(m, k)


@pytest.mark.skipif(not cpu_native.available(), reason="the native CPU kernel cannot be built on this machine")
@pytest.mark.parametrize("name", ["sym_int4", "asym_int4", "fp4", "sym_int8"])
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_native_int8_activations_match_reference(name, g):
    """kernel_dtype=int8 (the fast default of LLM on CPUs): exact weights times int8-rounded activations."""
    layer = _layer(name, 80, g, seed=11)
    layer.kernel_dtype = torch.int8
    w, b = layer.dequantize_weight(torch.float64), layer.bias.double()
    for m in (1, 3, 5, cpu_native.MAX_M):
        x = torch.randn(m, K, generator=_gen(m)) * torch.linspace(0.1, 3, K)  # uneven channel magnitudes
        x[0, 7] = 0.0
        y = layer(x)
        assert layer._kernel.int8_activations
        assert _rel(y, _int8_blocks(x) @ w.T + b) < 1e-5, (name, g, m)
        assert _rel(y, x.double() @ w.T + b) < 2e-2  # and close to the float result
    x = torch.randn(cpu_native.MAX_M + 1, K, generator=_gen(0))  # above the kernel's rows: exact dequant path
    assert _rel(layer(x), x.double() @ w.T + b) < 1e-5
