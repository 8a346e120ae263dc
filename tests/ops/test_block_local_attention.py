"""block_local_attention on every backend against the naive loop implementation."""

from __future__ import annotations

import math

import pytest
import torch

import hilt_kernels
from hilt_kernels.dispatch import load_impl
from tests import naive
from tests.conftest import TOLERANCES, assert_close, on_test_device
from tests.ops.common import check_16bit_against_fp32, check_against_naive, leaf

OP = on_test_device(hilt_kernels.block_local_attention)
# both reference formulations (fused CPU kernel and batched matmul), and triton
OP_BACKENDS = ["reference", "reference-math", "triton"]


def make_mask(kind, B, T, b, seed=0):
    if kind is None:
        return None
    if kind == "random":
        return torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.3
    if kind == "block":  # batch 0: its second block fully padded; batch 1: each block's first token padded
        m = torch.zeros(B, T, dtype=torch.bool)
        m[0, b : 2 * b] = True
        m[1:, ::b] = True
        return m
    if kind == "all":
        return torch.ones(B, T, dtype=torch.bool)
    raise ValueError(kind)


# (B, T, H, D, block_size, causal, mask kind)
CASES = [
    (2, 13, 3, 8, 4, True, None),  # T not a multiple of b
    (2, 13, 3, 8, 4, False, None),
    (1, 10, 1, 1, 1, True, None),  # b = 1, D = 1, H = 1
    (1, 9, 2, 3, 1, False, "random"),  # b = 1 with padding: padded queries have no key
    (2, 7, 2, 3, 16, True, "random"),  # b >= T, D = 3
    (2, 7, 2, 3, 16, False, "random"),
    (2, 20, 2, 5, 5, True, "block"),  # a fully padded block; causal rows with no valid key
    (2, 20, 2, 5, 5, False, "block"),
    (1, 36, 1, 16, 36, True, "random"),  # one large block: the FlashAttention-style path
    (2, 9, 2, 4, 4, False, "all"),  # everything padded: zeros, zero gradients
]
IDS = [f"B{c[0]}T{c[1]}H{c[2]}D{c[3]}b{c[4]}{'c' if c[5] else 'n'}-{c[6]}" for c in CASES]


def masters(B, T, H, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3)]


def _dtypes(backend):
    return [torch.float32] if backend == "triton" else [torch.float64, torch.float32]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_naive(backend, case, nan_fill):
    B, T, H, D, b, causal, kind = case
    mask = make_mask(kind, B, T, b)

    def op(q, k, v):
        return OP(q, k, v, b, causal=causal, key_padding_mask=mask, backend=backend)

    def ref(q, k, v):
        return naive.block_local_attention(q, k, v, b, causal=causal, key_padding_mask=mask)

    for dtype in _dtypes(backend):
        check_against_naive(op, ref, masters(B, T, H, D), dtype, "qkv")


@pytest.mark.parametrize("case", CASES[:2] + CASES[6:8], ids=IDS[:2] + IDS[6:8])
def test_lse_and_empty_rows(backend, case, nan_fill):
    """The saved log-sum-exp is exact, +inf for queries without a valid key, whose output is 0."""
    B, T, H, D, b, causal, kind = case
    mask = make_mask(kind, B, T, b)
    q, k, v = (x.float() for x in masters(B, T, H, D))
    scale = D**-0.5
    out, lse = on_test_device(load_impl("block_local_attention", backend).forward)(q, k, v, b, causal, scale, mask)
    assert lse.shape == (B, H, T) and lse.dtype == torch.float32
    for bb in range(B):
        for t in range(T):
            keys = [
                s for s in range(T)
                if s // b == t // b and (not causal or s <= t) and not (mask is not None and mask[bb, s])
            ]
            if not keys:
                assert torch.all(lse[bb, :, t] == math.inf)
                assert torch.all(out[bb, t] == 0)
            else:
                expected = torch.logsumexp(torch.einsum("hd,shd->hs", q[bb, t], k[bb, keys]).double() * scale, -1)
                assert_close(lse[bb, :, t], expected, 1e-5, 1e-5, f"lse[{bb}, :, {t}]")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[6]], ids=[IDS[0], IDS[6]])
def test_16bit_matches_fp32(backend, case, dtype, nan_fill):
    B, T, H, D, b, causal, kind = case
    mask = make_mask(kind, B, T, b)

    def op(q, k, v):
        return OP(q, k, v, b, causal=causal, key_padding_mask=mask, backend=backend)

    check_16bit_against_fp32(op, masters(B, T, H, D), dtype, "qkv")


def test_noncontiguous_inputs_and_expanded_grad(backend, nan_fill):
    """q, k, v as strided views of one packed projection; out.sum().backward() gives a stride-0 grad."""
    B, T, H, D, b = 2, 11, 2, 6, 4
    dtype = torch.float32
    qkv = torch.randn(B, T, 3, H, D + 2, dtype=dtype)[..., 1 : D + 1].requires_grad_(True)  # strided
    mask = make_mask("random", B, T, b)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out = OP(q, k, v, b, key_padding_mask=mask, backend=backend)
    out.sum().backward()
    qkv2 = qkv.detach().double().requires_grad_(True)
    exp = naive.block_local_attention(*qkv2.unbind(2), b, key_padding_mask=mask)
    exp.sum().backward()
    atol, rtol = TOLERANCES[dtype]
    assert_close(out, exp, atol, rtol, "out")
    assert_close(qkv.grad, qkv2.grad, atol, rtol, "dqkv")


def test_fully_padded_block_gives_zeros_and_finite_grads(backend, nan_fill):
    B, T, H, D, b = 1, 12, 2, 4, 4
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 4:8] = True
    q, k, v = (leaf(x, torch.float32) for x in masters(B, T, H, D))
    out = OP(q, k, v, b, causal=False, key_padding_mask=mask, backend=backend)
    assert torch.all(out[:, 4:8] == 0)
    out.square().sum().backward()
    for name, x in zip("qkv", (q, k, v)):
        assert torch.isfinite(x.grad).all(), f"d{name} is not finite"
        assert torch.all(x.grad[:, 4:8] == 0), f"d{name} of the padded block is not zero"


@pytest.mark.parametrize("shape", [(2, 0, 2, 4), (0, 5, 2, 4)], ids=["T0", "B0"])
def test_empty_inputs(backend, shape):
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    out = OP(q, k, v, 4, backend=backend)
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == shape


def test_gradcheck_fp64():
    q, k, v = (leaf(x, torch.float64) for x in masters(1, 7, 2, 3))
    mask = torch.tensor([[False, True, False, False, True, True, False]])
    for causal in (True, False):
        fn = lambda q, k, v: OP(q, k, v, 3, causal=causal, key_padding_mask=mask, backend="reference")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = (x.float() for x in masters(1, 8, 2, 9))
    assert_close(OP(q, k, v, 4), OP(q, k, v, 4, scale=9**-0.5), 0, 0, "out")
    assert not torch.allclose(OP(q, k, v, 4), OP(q, k, v, 4, scale=1.0))
