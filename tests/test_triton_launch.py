"""xpu_llm.lowbit.kernels.triton_launch: the reuse key separates every argument kind Triton specializes on, and
on a CUDA GPU a reused compiled kernel gives what Triton's own launch gives, across alignments and int classes."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import interpreter  # noqa: E402
from interpreter import IN_CHILD  # noqa: E402

from xpu_llm.lowbit.kernels import triton_launch  # noqa: E402
from xpu_llm.lowbit.kernels.triton_launch import arg_key, launch  # noqa: E402

test_interpreter_suite = interpreter.suite(__file__)


@triton.jit
def _axpb(x_ptr, y_ptr, n, b, scale, BLOCK: tl.constexpr, NEG: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    v = tl.load(x_ptr + i, mask=m).to(tl.float32) * scale + b
    if NEG:
        v = -v
    tl.store(y_ptr + i, v.to(y_ptr.dtype.element_ty), mask=m)


def test_arg_key_separates_what_triton_specializes_on():
    buf = torch.zeros(64, dtype=torch.float16)
    aligned, odd = buf[8:], buf[1:]  # 16-byte aligned, 2 bytes off
    assert aligned.data_ptr() % 16 == 0 and odd.data_ptr() % 16 != 0
    key = lambda *a, **k: arg_key(a, k)  # noqa: E731
    # the same kinds: one key
    assert key(aligned, 17, 2.5) == key(buf[16:], 33, -1.0)
    assert key(aligned, 32) == key(buf, 0) == key(buf, -48)
    # each kind Triton tells apart: another key
    different = [key(aligned, 17), key(odd, 17), key(aligned.float(), 17), key(aligned, 1), key(aligned, 16),
                 key(aligned, 1 << 31), key(aligned, 1 << 63), key(aligned, -(1 << 31) - 1), key(aligned, True),
                 key(aligned, False), key(aligned, 17.0), key(aligned, None), key(aligned, 17, BLOCK=64),
                 key(aligned, 17, BLOCK=128), key(aligned, 17, num_warps=8)]
    assert len(set(different)) == len(different), different
    assert key(aligned, "text") is None and key(aligned, (1, 2)) is None


@pytest.mark.skipif(not IN_CHILD, reason="CPU tensors run kernels only under Triton's interpreter (the child)")
def test_launch_on_cpu_is_tritons_own():
    """CPU tensors (Triton's interpreter in CI) never reach the compiled-kernel shortcut."""
    x = torch.randn(100)
    y = torch.full_like(x, float("nan"))
    before = dict(triton_launch._cache)
    launch(_axpb, (2,), x, y, 100, 3, 0.5, BLOCK=64, NEG=False)
    torch.testing.assert_close(y, x * 0.5 + 3)
    assert triton_launch._cache == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reused_kernel_equals_tritons_launch():
    if not triton_launch.enabled():
        pytest.skip("the shortcut is off for this Triton or device (triton_launch.CHECKED_VERSIONS)")
    base = torch.randn(4096 + 8, device="cuda", dtype=torch.float16)
    calls = 0
    for rep in range(3):  # the first round compiles and records, later rounds take the shortcut
        for off in (0, 1, 8):
            for n in (1, 16, 1000, 4000):
                for b, scale, neg in ((1, 0.5, False), (7, -2.0, True), (32, 1.0, False)):
                    x = base[off:off + n]
                    want = torch.full((n,), float("nan"), device="cuda", dtype=torch.float16)
                    got = want.clone()
                    grid = (triton.cdiv(n, 256),)
                    _axpb[grid](x, want, n, b, scale, BLOCK=256, NEG=neg)
                    launch(_axpb, grid, x, got, n, b, scale, BLOCK=256, NEG=neg)
                    assert torch.equal(got, want), (off, n, b, scale, neg)
                    ref = (x.float() * scale + b) * (-1 if neg else 1)
                    torch.testing.assert_close(got.float(), ref, rtol=1e-3, atol=1e-2)
                    calls += 1
    mine = [e for k, e in triton_launch._cache.items() if k[0] == id(_axpb)]
    assert mine and all(isinstance(e, triton_launch._Entry) for e in mine), mine
    assert len(mine) < calls // 3, "every call made its own entry: the key holds values, not kinds"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_constexpr_passed_positionally_is_refused():
    if not triton_launch.enabled():
        pytest.skip("the shortcut is off for this Triton or device")
    x = torch.randn(10, device="cuda")
    with pytest.raises(AssertionError, match="pass constexpr 'BLOCK' by keyword"):
        launch(_axpb, (1,), x, x, 10, 0, 1.0, 64, NEG=False)
