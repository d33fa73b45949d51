"""The Triton low-bit kernels against the plain-torch reference (formats.dequantize + a float64 matmul), every
format, on random inputs, with outputs (and split-K workspaces) poisoned with NaN before each run and shapes that
are not multiples of the tiles. On a GPU (XPU or CUDA, as xpu_llm.device picks) the compiled kernels run at
realistic sizes; without one, the same kernels run on CPU tensors through Triton's interpreter at small sizes.

Error bars: a bf16 output carries ~1.7e-3 relative rounding error by itself, so each result is compared with the
float64 reference both raw (<= 2e-3) and rounded to the output dtype the same way (<= 2e-4: what is left is
float32 accumulation order; a wrong index or scale gives O(1)). The decode kernel multiplies float32 weights
(reference: weights dequantized in float32); the matmul paths round the weights to the activation dtype first,
as the reference path F.linear(x, dequantize(dtype)) does (reference: weights dequantized in that dtype)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import interpreter  # noqa: E402
from interpreter import DEVICE, ON_GPU, RUN_HERE, here  # noqa: E402
from xpu_llm.lowbit.formats import LOW_BIT_NAMES, get_format  # noqa: E402

test_interpreter_suite = interpreter.suite(__file__)  # the tests below on CPU tensors, in a child process


if RUN_HERE:
    from xpu_llm.lowbit.kernels import triton_gemm as tgemm  # noqa: E402
    from xpu_llm.lowbit.kernels import triton_gemv as tgemv  # noqa: E402
    from xpu_llm.lowbit.kernels import triton_ops as tops  # noqa: E402
    from xpu_llm.lowbit.kernels import triton_tune as ttune  # noqa: E402
    GemvConfig, DotConfig = tgemv.GemvConfig, tgemm.DotConfig


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    """Tests pin their configs or take the untuned default (tuning is tested once, on GPUs)."""
    monkeypatch.setenv("XPU_LLM_TRITON_AUTOTUNE", "0")


@here
def test_kernels_built_for_this_machine():
    assert tops.is_interpreting() != ON_GPU


# Shapes: N and the group count are never multiples of the tiles used below.
N_OUT = 1000 if ON_GPU else 72
GROUPS = 37 if ON_GPU else 5


def _weight(name: str, g: int, n: int = N_OUT, seed: int = 0):
    fmt = get_format(name)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, GROUPS * g, generator=gen).to(DEVICE)
    q = fmt.quantize(w, g)
    return fmt, q, tops.format_args(name, q["qweight"], q["scales"], q.get("mins"), n, g)


def _x(m: int, k: int, dtype=torch.bfloat16, seed: int = 1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


_MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def _check(out, x, w_ref, raw_tol=2e-3, rounded_tol=2e-4):
    """out vs x @ w_ref.T in float64. Rounded to out's dtype, the exact result must agree to `rounded_tol`; raw,
    out may be off by no more than that rounding itself (+ rounded_tol), and by <= raw_tol on outputs large enough
    (>= 1000 elements) for the rounding error's norm to be stable (bf16 rounding alone gives ~1.7e-3)."""
    assert not out.isnan().any(), "some outputs were never written"
    ref = x.double() @ w_ref.double().t()
    rel = lambda a: ((a - ref).norm() / ref.norm()).item()  # noqa: E731
    raw, floor = rel(out.double()), rel(ref.to(out.dtype).double())
    # vs the exact result rounded to out's dtype, leaving out rounding ties that the float32 accumulation tipped
    # to the other neighbour (|out - exact| within half a step plus the accumulation error): in a small output
    # one such tie outweighs rounded_tol (a GPU's tl.dot sums in another order than the reference)
    _, e = torch.frexp(ref.to(out.dtype).double())
    half_step = torch.ldexp(torch.ones_like(ref), e - 2 - _MANTISSA[out.dtype])
    tie = (out.double() - ref).abs() <= half_step + 1e-5 * ref.pow(2).mean().sqrt()
    rounded = ((out.double() - ref.to(out.dtype).double())[~tie].norm() / ref.norm()).item()
    assert rounded <= rounded_tol, f"relative error {rounded:.2e} vs the exact result rounded to {out.dtype}"
    assert raw <= floor + rounded_tol, f"relative error {raw:.2e}, rounding the exact result gives {floor:.2e}"
    if out.numel() >= 1000:
        assert raw <= raw_tol, f"relative error {raw:.2e} > {raw_tol:.1e}"
    return raw


@here
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("name", LOW_BIT_NAMES)
def test_dequantize_bit_exact(name, g):
    fmt, q, args = _weight(name, g)
    k = GROUPS * g
    for dtype in (torch.float32, torch.bfloat16, torch.float16) if g == 64 else (torch.bfloat16,):
        out = tgemm.dequantize(args, _nan(N_OUT, k, dtype=dtype), block_n=32, ng=2)
        assert torch.equal(out, fmt.dequantize(q, g, dtype)), f"{name} g{g} {dtype}: differs from formats.dequantize"


@here
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("name", LOW_BIT_NAMES)
def test_gemv(name, g):
    fmt, q, args = _weight(name, g)
    w32 = fmt.dequantize(q, g, torch.float32)
    x = _x(1, GROUPS * g)
    # the last g64 config divides N and K: the kernel's unmasked (EVEN_N, EVEN_G) path
    cfgs = (GemvConfig(32, 2, 4, 1), GemvConfig(16, 1, 2, 3), GemvConfig(8, 1, 2, 1)) if g == 64 else \
        (GemvConfig(16, 2, 2, 2),)
    for cfg in cfgs:  # split-K > 1: a NaN workspace that every program must rewrite
        split = tgemv.groups_per_split(GROUPS, cfg.ng, cfg.split)[1]
        out = tgemv.gemv(x, args, cfg, _nan(1, N_OUT, dtype=x.dtype), partial=_nan(split, 1, N_OUT, dtype=torch.float32))
        _check(out, x, w32)


@here
@pytest.mark.parametrize("name", ["sym_int4", "asym_int4", "sym_int8"])
def test_gemv_inplace_decode_same_bits(name, monkeypatch):
    """The in-place decode (one logic op and one FMA per value) gives exactly the values of the plain decode, and
    bf16 activations read as int32 pairs exactly their float32 values: the GEMV's output is the same bits."""
    fmt, q, args = _weight(name, 64)
    x = _x(1, GROUPS * 64)
    outs = []
    for inplace in (False, True):
        monkeypatch.setattr(tgemv, "INPLACE", inplace)
        outs.append(tgemv.gemv(x, args, GemvConfig(16, 2, 2, 1), _nan(1, N_OUT, dtype=torch.float32)))
    assert torch.equal(outs[0], outs[1]), f"{name}: in-place decode changed the GEMV's result"
    # x at an address that is not 4-byte aligned takes the plain bf16 load instead of int32 pairs: same bits
    odd = torch.empty(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)[:, 1:]
    odd.copy_(x)
    assert odd.data_ptr() % 4 and x.data_ptr() % 4 == 0
    out = tgemv.gemv(odd, args, GemvConfig(16, 2, 2, 1), _nan(1, N_OUT, dtype=torch.float32))
    assert torch.equal(out, outs[1]), f"{name}: the paired bf16 load changed the GEMV's result"


@here
def test_gemv_nf4_pair_table_same_bits():
    """nf4 decoded a byte per read of the 256-entry pair table gives the same GEMV bits as a nibble per read of the
    16-entry table (the tuner may pick either)."""
    fmt, q, args = _weight("nf4", 64)
    x = _x(1, GROUPS * 64)
    outs = [tgemv.gemv(x, args, GemvConfig(16, 2, 2, 1, pairs=p), _nan(1, N_OUT, dtype=torch.float32))
            for p in (False, True)]
    assert torch.equal(outs[0], outs[1]), "the nf4 pair table changed the GEMV's result"
    _check(outs[1], x, fmt.dequantize(q, 64, torch.float32))


@here
@pytest.mark.parametrize("name", LOW_BIT_NAMES)
def test_dot_skinny_and_prefill(name):
    g = 64
    fmt, q, args = _weight(name, g)
    w_act = fmt.dequantize(q, g, torch.bfloat16)
    dot_f32 = tops.is_interpreting()  # the interpreter has no bf16 dot: it multiplies the same bf16 values in fp32
    cases = [(3, DotConfig(16, 32, 2, 4, 2, split=2)), (16, DotConfig(16, 64, 1, 4, 3, split=3))]
    cases.append((100, DotConfig(64, 64, 2, 4, 3, group_m=2)) if ON_GPU else (37, DotConfig(32, 32, 2, 4, 2, group_m=2)))
    for m, cfg in cases:
        x = _x(m, GROUPS * g)
        split = tgemv.groups_per_split(GROUPS, cfg.ng, cfg.split)[1]
        partial = _nan(split, m, N_OUT, dtype=torch.float32) if split > 1 else None
        out = tgemm.dot(x, args, cfg, _nan(m, N_OUT, dtype=x.dtype), partial=partial, dot_f32=dot_f32)
        _check(out, x, w_act)
    # N a multiple of the tile and whole K steps: the unmasked (EVEN_N, EVEN_G) path
    fmt, q, args = _weight(name, g, n=64)
    x = _x(5, GROUPS * g)
    out = tgemm.dot(x, args, DotConfig(16, 32, 1, 4, 2), _nan(5, 64, dtype=x.dtype), dot_f32=dot_f32)
    _check(out, x, fmt.dequantize(q, g, torch.bfloat16))


@here
@pytest.mark.parametrize("name", ["sym_int4", "asym_int4", "nf4", "fp8_e5m2"])
def test_dispatch_every_path_and_dtype(name):
    """triton_ops.matmul as the layer calls it: each path, bf16/fp16/float32 activations."""
    g = 32
    fmt, q, args = _weight(name, g, seed=3)
    k = GROUPS * g
    for m in (1, 5, 20):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = _x(m, k, dtype)
            kind = tops.path(m, dtype)
            w_ref = fmt.dequantize(q, g, torch.float32 if kind == "gemv" else dtype)
            # the vendor matmul (which the tuner may pick for m > 1) may reduce split-K partials in 16 bits
            tol = (2e-3, 1e-3) if dtype == torch.bfloat16 else (3e-4, 3e-4) if dtype == torch.float16 else (1e-5, 1e-5)
            _check(tops.matmul(x, args, out=_nan(m, N_OUT, dtype=dtype)), x, w_ref, *tol)
    x = _x(20, k)
    _check(tops.matmul(x, args, kind="dequant"), x, fmt.dequantize(q, g, torch.bfloat16), 2e-3, 1e-3)


@here
def test_path_choice():
    assert tops.path(1, torch.bfloat16) == "gemv"
    assert tops.path(16, torch.bfloat16) == "auto" and tops.path(16, torch.float32) == "auto"
    assert tops.path(17, torch.float32) == "dequant"
    assert tops.path(2048, torch.bfloat16) == tops.PREFILL


@here
@pytest.mark.parametrize("name", LOW_BIT_NAMES)
def test_kernel_object_state_is_canonical(name):
    """pack is a view of the canonical qweight (nothing duplicated) and unpack restores it bit-exactly."""
    _, q, _ = _weight(name, 64, n=40)
    kern = tops.select(name, 40, GROUPS * 64, 64, torch.bfloat16)
    assert kern is tops.KERNELS[name] and not kern.droppable()
    state = kern.pack(q, 40, GROUPS * 64, 64)
    assert state["qweight"].data_ptr() == q["qweight"].data_ptr()
    back = kern.unpack(state, 40, GROUPS * 64, 64)
    assert back.dtype == q["qweight"].dtype and torch.equal(back.view(torch.uint8), q["qweight"].view(torch.uint8))
    assert tops.select(name, 40, GROUPS * 64, 64, torch.float64) is None  # float64 keeps the reference path
    assert tops.select(name, 40, 40 * 96, 96, torch.bfloat16) is None  # group not a power of two


@here
def test_torch_compile_keeps_the_kernel_in_the_graph():
    fmt, q, _ = _weight("sym_int4", 64, n=40)
    kern = tops.KERNELS["sym_int4"]
    state = kern.pack(q, 40, GROUPS * 64, 64)
    x = _x(2, GROUPS * 64)
    fn = torch.compile(lambda x: kern.mm(x, state, q, 64) * 2, backend="eager", fullgraph=True)
    _check(fn(x) / 2, x, fmt.dequantize(q, 64, torch.bfloat16))


@here
def test_tuning_cache_roundtrip(tmp_path, monkeypatch):
    """A tuned choice is written atomically to the cache file and read back in a fresh process state."""
    monkeypatch.setenv("XPU_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(ttune, "_memory", {})
    monkeypatch.setattr(ttune, "_fast", {})
    monkeypatch.setattr(ttune, "_disk_loaded", True)
    _, _, args = _weight("nf4", 32, n=40)
    x = _x(1, GROUPS * 32)
    cands = ttune.gemv_candidates(x, args)
    assert len(cands) > 1 and all(isinstance(c, GemvConfig) for c in cands)
    chosen = cands[-1]
    ttune._memory["probe"] = dict(chosen.__dict__)
    ttune._save_disk()
    monkeypatch.setattr(ttune, "_memory", {})
    monkeypatch.setattr(ttune, "_disk_loaded", False)
    ttune._load_disk()
    assert ttune._memory["probe"] == chosen.__dict__
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


@pytest.mark.skipif(not ON_GPU, reason="compiled kernels need a GPU")
@pytest.mark.parametrize("name", ["sym_int4", "nf4", "fp8_e4m3"])
def test_every_tuning_candidate_is_correct(name):
    """Autotuning may pick any candidate: every one of them must compute the same function."""
    g = 64
    fmt, q, args = _weight(name, g)
    w32, w_act = fmt.dequantize(q, g, torch.float32), fmt.dequantize(q, g, torch.bfloat16)
    x1 = _x(1, GROUPS * g)
    for cfg in ttune.gemv_candidates(x1, args):
        _check(tgemv.gemv(x1, args, cfg, _nan(1, N_OUT, dtype=x1.dtype)), x1, w32)
    for m in (7, 100):
        x = _x(m, GROUPS * g)
        for cfg in ttune.dot_candidates(x, args):
            _check(tgemm.run(x, args, cfg, _nan(m, N_OUT, dtype=x.dtype)), x, w_act)


@pytest.mark.skipif(not ON_GPU, reason="tuning times kernels on a GPU")
def test_autotune_picks_a_candidate_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XPU_LLM_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("XPU_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(ttune, "_memory", {})
    monkeypatch.setattr(ttune, "_fast", {})
    monkeypatch.setattr(ttune, "_disk_loaded", False)
    fmt, q, args = _weight("sym_int4", 64, seed=5)
    for m in (1, 8):
        x = _x(m, GROUPS * 64)
        kind = tops.path(m, x.dtype)
        _check(tops.matmul(x, args), x, fmt.dequantize(q, 64, torch.float32 if kind == "gemv" else torch.bfloat16),
               2e-3, 1e-3)
    assert len(ttune._fast) == 2 and len(ttune._memory) == 2
    assert (tmp_path / "triton_tune.json").exists()


@pytest.mark.skipif(not ON_GPU, reason="the layer dispatch reaches the Triton kernels on GPUs only")
@pytest.mark.parametrize("name", LOW_BIT_NAMES)
def test_lowbit_linear_uses_triton_on_gpu(name):
    from xpu_llm.lowbit import LowBitLinear
    from xpu_llm.lowbit.kernels import select_kernel
    lin = torch.nn.Linear(GROUPS * 64, 300, bias=True).to(DEVICE)
    layer = LowBitLinear.from_linear(lin, name, 64)
    x = _x(3, GROUPS * 64)
    assert isinstance(select_kernel(layer, x), tops.TritonKernel)
    y = layer(x.view(1, 3, -1)).view(3, -1)
    ref = x.double() @ layer.dequantize_weight(torch.bfloat16).double().t() + lin.bias.double()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 3e-3
    assert torch.equal(layer.state_dict()["qweight"].cpu(), get_format(name).quantize(lin.weight, 64)["qweight"].cpu())
