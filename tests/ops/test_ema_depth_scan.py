"""ema_depth_scan on every backend against the naive loop implementation."""

from __future__ import annotations

import pytest
import torch

import hilt_kernels
from tests import naive
from tests.conftest import TOLERANCES, assert_close, on_test_device
from tests.ops.common import check_16bit_against_fp32, check_against_naive, leaf

OP = on_test_device(hilt_kernels.ema_depth_scan)

# (values shape (L, *S), alpha per channel, init shape or None, return_all)
CASES = [
    ((5, 2, 3), False, None, True),
    ((5, 2, 3), True, None, True),
    ((5, 2, 3), True, (2, 3), False),  # full init, last state only
    ((4, 2, 5, 3), False, (3,), True),  # broadcast init
    ((4, 2, 5, 3), True, (1, 5, 1), False),
    ((1, 7), False, (7,), True),  # L = 1
    ((3, 4, 1), True, (1,), True),  # C = 1
]
IDS = [f"L{c[0][0]}S{'x'.join(map(str, c[0][1:]))}-{'chan' if c[1] else 'layer'}-init{c[2]}-{'all' if c[3] else 'last'}" for c in CASES]


def masters(shape, per_channel, init_shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    L, C = shape[0], shape[-1]
    values = torch.randn(shape, generator=g, dtype=torch.float64)
    alpha = torch.randn((L, C) if per_channel else (L,), generator=g, dtype=torch.float64) * scale
    xs = [values, alpha]
    if init_shape is not None:
        xs.append(torch.randn(init_shape, generator=g, dtype=torch.float64))
    return xs


def _op(backend, return_all):
    return lambda values, alpha, init=None: OP(values, alpha, init=init, return_all=return_all, backend=backend)


def _names(init_shape):
    return ("values", "alpha_logits") + (("init",) if init_shape is not None else ())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_naive(backend, case, nan_fill):
    shape, per_channel, init_shape, return_all = case
    ref = lambda v, a, i=None: naive.ema_depth_scan(v, a, init=i, return_all=return_all)  # noqa: E731
    for dtype in [torch.float32] if backend == "triton" else [torch.float64, torch.float32]:
        xs = masters(shape, per_channel, init_shape)
        check_against_naive(_op(backend, return_all), ref, xs, dtype, _names(init_shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_matches_fp32(backend, dtype, nan_fill):
    xs = masters((4, 2, 5, 3), True, (5, 3))
    check_16bit_against_fp32(_op(backend, True), xs, dtype, ("values", "alpha_logits", "init"))


def test_mixed_dtypes_alpha_fp32_values_fp16(backend, nan_fill):
    """Autocast gives fp16 values with fp32 alpha_logits: output fp16, dalpha fp32."""
    v, a, i = masters((4, 3, 8), True, (8,))
    v16, a32, i16 = leaf(v, torch.float16), leaf(a, torch.float32), leaf(i, torch.float16)
    out = OP(v16, a32, init=i16, backend=backend)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert a32.grad.dtype == torch.float32 and v16.grad.dtype == torch.float16 and i16.grad.dtype == torch.float16
    v64, a64, i64 = (leaf(x, torch.float64) for x in (v16, a32, i16))
    exp = naive.ema_depth_scan(v64, a64, init=i64)
    exp.sum().backward()
    atol, rtol = TOLERANCES[torch.float16]
    assert_close(out, exp, atol, rtol, "out")
    assert_close(a32.grad, a64.grad, atol * 4, rtol * 4, "dalpha")
    assert_close(v16.grad, v64.grad, atol, rtol, "dvalues")
    assert_close(i16.grad, i64.grad, atol * 4, rtol * 4, "dinit")


@pytest.mark.parametrize("return_all", [True, False], ids=["all", "last"])
def test_saturated_alpha_keeps_gradients_finite(backend, return_all, nan_fill):
    """α = sigmoid(±40) is exactly 0 or 1 in fp32: no division by 1 − α, no cumprod underflow."""
    v, _, i = masters((6, 2, 4), False, (2, 4))
    a = torch.tensor([40.0, -40.0, 40.0, 40.0, -40.0, 3.0], dtype=torch.float64)
    v32, a32, i32 = leaf(v, torch.float32), leaf(a, torch.float32), leaf(i, torch.float32)
    out = OP(v32, a32, init=i32, return_all=return_all, backend=backend)
    out.sum().backward()
    for name, x in (("values", v32), ("alpha_logits", a32), ("init", i32)):
        assert torch.isfinite(x.grad).all(), f"d{name} not finite"
    v64, a64, i64 = (leaf(x, torch.float64) for x in (v, a, i))
    naive.ema_depth_scan(v64, a64, init=i64, return_all=return_all).sum().backward()
    assert_close(v32.grad, v64.grad, 1e-4, 1e-4, "dvalues")
    assert_close(a32.grad, a64.grad, 1e-4, 1e-4, "dalpha")


def test_noncontiguous_values_and_expanded_grad(backend, nan_fill):
    base = torch.randn(3, 5, 2, 8, requires_grad=True)
    values = base.transpose(1, 2)[..., ::2]  # (3, 2, 5, 4) strided
    assert not values.is_contiguous()
    alpha = torch.randn(3, 4, requires_grad=True)
    out = OP(values, alpha, backend=backend)
    out.sum().backward()
    b64, a64 = leaf(base, torch.float64), leaf(alpha, torch.float64)
    exp = naive.ema_depth_scan(b64.transpose(1, 2)[..., ::2], a64)
    exp.sum().backward()
    atol, rtol = TOLERANCES[torch.float32]
    assert_close(out, exp, atol, rtol, "out")
    assert_close(base.grad, b64.grad, atol, rtol, "dvalues")
    assert_close(alpha.grad, a64.grad, atol, rtol, "dalpha")


def test_empty_state(backend):
    values = torch.randn(3, 0, 4, requires_grad=True)
    alpha = torch.randn(3, 4, requires_grad=True)
    out = OP(values, alpha, backend=backend)
    assert out.shape == (3, 0, 4)
    out.sum().backward()
    assert torch.all(alpha.grad == 0)


def test_zero_steps_return_all():
    out = OP(torch.randn(0, 2, 3), torch.randn(0))
    assert out.shape == (0, 2, 3)


def test_gradcheck_fp64():
    for per_channel, init_shape, return_all in ((False, (3,), True), (True, (2, 3), False)):
        xs = [leaf(x, torch.float64) for x in masters((4, 2, 3), per_channel, init_shape)]
        fn = lambda v, a, i: OP(v, a, init=i, return_all=return_all, backend="reference")  # noqa: E731
        assert torch.autograd.gradcheck(fn, tuple(xs))
