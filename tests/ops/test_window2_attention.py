"""window2_attention on every backend against the naive loop implementation."""

from __future__ import annotations

import pytest
import torch

import hilt_kernels
from tests import naive
from tests.conftest import TOLERANCES, assert_close, on_test_device
from tests.ops.common import check_16bit_against_fp32, check_against_naive, leaf

OP = on_test_device(hilt_kernels.window2_attention)

# (B, T, H, D, causal)
CASES = [
    (2, 5, 3, 8, True),
    (2, 5, 3, 8, False),
    (1, 3, 1, 1, True),  # D = 1, H = 1
    (1, 4, 2, 3, False),  # D = 3
    (2, 7, 2, 24, True),  # D not a power of 2
]
IDS = [f"B{c[0]}T{c[1]}H{c[2]}D{c[3]}{'c' if c[4] else 'n'}" for c in CASES]


def masters(B, T, H, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 2, T, H, D, generator=g, dtype=torch.float64) for _ in range(3)]


def _op(backend, causal):
    return lambda q, k, v: OP(q, k, v, causal=causal, backend=backend)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_naive(backend, case, nan_fill):
    B, T, H, D, causal = case
    ref = lambda q, k, v: naive.window2_attention(q, k, v, causal=causal)  # noqa: E731
    for dtype in [torch.float32] if backend == "triton" else [torch.float64, torch.float32]:
        check_against_naive(_op(backend, causal), ref, masters(B, T, H, D), dtype, "qkv")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_16bit_matches_fp32(backend, dtype, causal, nan_fill):
    check_16bit_against_fp32(_op(backend, causal), masters(2, 6, 2, 8), dtype, "qkv")


def test_causal_element0_is_its_own_value(backend, nan_fill):
    q, k, v = (x.float() for x in masters(2, 5, 2, 4))
    out = OP(q, k, v, causal=True, backend=backend)
    assert_close(out[:, 0], v[:, 0], 1e-6, 1e-6, "out[:, 0]")


def test_strided_views_of_a_projection_and_expanded_grad(backend, nan_fill):
    """q, k, v as views of one (B, 2, T, 3, H, D) projection; out.sum().backward()."""
    B, T, H, D = 2, 5, 2, 6
    qkv = torch.randn(B, 2, T, 3, H, D, requires_grad=True)
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    out = OP(q, k, v, causal=False, backend=backend)
    out.sum().backward()
    ref = qkv.detach().double().requires_grad_(True)
    exp = naive.window2_attention(*ref.unbind(3), causal=False)
    exp.sum().backward()
    atol, rtol = TOLERANCES[torch.float32]
    assert_close(out, exp, atol, rtol, "out")
    assert_close(qkv.grad, ref.grad, atol, rtol, "dqkv")


@pytest.mark.parametrize("shape", [(2, 2, 0, 2, 4), (0, 2, 5, 2, 4)], ids=["T0", "B0"])
def test_empty_inputs(backend, shape):
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    out = OP(q, k, v, backend=backend)
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == shape


def test_gradcheck_fp64():
    q, k, v = (leaf(x, torch.float64) for x in masters(1, 3, 2, 3))
    for causal in (True, False):
        fn = lambda q, k, v: OP(q, k, v, causal=causal, backend="reference")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v))
