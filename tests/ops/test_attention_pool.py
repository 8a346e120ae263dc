"""attention_pool on every backend against the naive loop implementation."""

from __future__ import annotations

import pytest
import torch

import hilt_kernels
from tests import naive
from tests.conftest import TOLERANCES, assert_close, on_test_device
from tests.ops.common import check_16bit_against_fp32, check_against_naive, leaf
from tests.ops.test_block_local_attention import make_mask

OP = on_test_device(hilt_kernels.attention_pool)

# (B, T, H, D, block_size, shared values, mask kind)
CASES = [
    (2, 13, 3, 8, 4, False, None),  # T not a multiple of b, per-head values
    (2, 13, 3, 8, 4, True, None),  # shared values
    (1, 6, 1, 1, 1, False, "random"),  # b = 1, D = 1, H = 1
    (2, 7, 2, 3, 16, True, "random"),  # b >= T, D = 3
    (2, 20, 2, 5, 5, False, "block"),  # a fully padded block
    (2, 20, 3, 24, 5, True, "block"),
    (2, 9, 2, 4, 4, True, "all"),
]
IDS = [f"B{c[0]}T{c[1]}H{c[2]}D{c[3]}b{c[4]}{'shared' if c[5] else 'heads'}-{c[6]}" for c in CASES]


def masters(B, T, H, D, shared, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, T, H, generator=g, dtype=torch.float64) * 2
    values = torch.randn((B, T, D) if shared else (B, T, H, D), generator=g, dtype=torch.float64)
    return [scores, values]


def _op(backend, b, mask):
    return lambda scores, values: OP(scores, values, b, key_padding_mask=mask, backend=backend)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_naive(backend, case, nan_fill):
    B, T, H, D, b, shared, kind = case
    mask = make_mask(kind, B, T, b)
    ref = lambda s, v: naive.attention_pool(s, v, b, key_padding_mask=mask)  # noqa: E731
    for dtype in [torch.float32] if backend == "triton" else [torch.float64, torch.float32]:
        check_against_naive(_op(backend, b, mask), ref, masters(B, T, H, D, shared), dtype, ("scores", "values"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shared", [False, True], ids=["heads", "shared"])
def test_16bit_matches_fp32(backend, dtype, shared, nan_fill):
    B, T, H, D, b = 2, 13, 3, 8, 4
    mask = make_mask("block", B, T, b)
    check_16bit_against_fp32(_op(backend, b, mask), masters(B, T, H, D, shared), dtype, ("scores", "values"))


def test_mixed_dtypes_scores_fp32_values_fp16(backend, nan_fill):
    """Autocast gives fp32 scores with fp16 values: output and dvalues in fp16, dscores in fp32."""
    B, T, H, D, b = 2, 10, 2, 8, 4
    s, v = masters(B, T, H, D, False)
    s32, v16 = leaf(s, torch.float32), leaf(v, torch.float16)
    out = OP(s32, v16, b, backend=backend)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert s32.grad.dtype == torch.float32 and v16.grad.dtype == torch.float16
    s64, v64 = leaf(s32, torch.float64), leaf(v16, torch.float64)
    exp = naive.attention_pool(s64, v64, b)
    exp.sum().backward()
    atol, rtol = TOLERANCES[torch.float16]
    assert_close(out, exp, atol, rtol, "out")
    assert_close(s32.grad, s64.grad, atol, rtol, "dscores")
    assert_close(v16.grad, v64.grad, atol, rtol, "dvalues")


def test_noncontiguous_inputs_and_expanded_grad(backend, nan_fill):
    B, T, H, D, b = 2, 11, 3, 6, 4
    packed = torch.randn(B, T, H + 1 + D, dtype=torch.float32, requires_grad=True)
    s, v = packed[..., :H], packed[..., H + 1 :]
    assert not s.is_contiguous() and not v.is_contiguous()
    mask = make_mask("random", B, T, b)
    out = OP(s, v, b, key_padding_mask=mask, backend=backend)
    out.sum().backward()
    ref = packed.detach().double().requires_grad_(True)
    exp = naive.attention_pool(ref[..., :H], ref[..., H + 1 :], b, key_padding_mask=mask)
    exp.sum().backward()
    atol, rtol = TOLERANCES[torch.float32]
    assert_close(out, exp, atol, rtol, "out")
    assert_close(packed.grad, ref.grad, atol, rtol, "dpacked")


def test_fully_padded_block_gives_zeros_and_finite_grads(backend, nan_fill):
    B, T, H, D, b = 1, 12, 2, 4, 4
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 4:8] = True
    s, v = (leaf(x, torch.float32) for x in masters(B, T, H, D, False))
    out = OP(s, v, b, key_padding_mask=mask, backend=backend)
    assert torch.all(out[:, 1] == 0)
    out.square().sum().backward()
    for name, x in (("scores", s), ("values", v)):
        assert torch.isfinite(x.grad).all(), f"d{name} is not finite"
        assert torch.all(x.grad[:, 4:8] == 0), f"d{name} of the padded block is not zero"


@pytest.mark.parametrize("shape", [(2, 0, 2), (0, 5, 2)], ids=["T0", "B0"])
@pytest.mark.parametrize("shared", [False, True], ids=["heads", "shared"])
def test_empty_inputs(backend, shape, shared):
    B, T, H = shape
    s = torch.randn(shape, requires_grad=True)
    v = torch.randn((B, T, 3) if shared else (B, T, H, 3), requires_grad=True)
    out = OP(s, v, 4, backend=backend)
    assert out.shape == (B, -(-T // 4), H, 3)
    out.sum().backward()
    assert v.grad.shape == v.shape


def test_gradcheck_fp64():
    mask = torch.tensor([[False, True, False, True, True, True, False]])
    for shared in (False, True):
        s, v = (leaf(x, torch.float64) for x in masters(1, 7, 2, 3, shared))
        fn = lambda s, v: OP(s, v, 3, key_padding_mask=mask, backend="reference")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (s, v))
