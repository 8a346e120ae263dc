"""GPU tests of the CUDA backend against the reference backend (skip without CUDA / without the library).

Every op, forward and backward, fp32/fp16/bf16, odd shapes (T not a multiple of b, D in
{16, 24, 64, 80, 128}, b in {1, 8, 16, 32, 64, 128}), padding masks including fully padded blocks,
non-contiguous inputs, ``out.sum().backward()`` (stride-0 gradients), and HILT_DEBUG_NAN_FILL=1
(autouse here) so unwritten output elements fail. fp32 is compared with the reference in fp32;
16-bit results with the reference run in fp32 on the same rounded inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

import hilt_kernels
from hilt_kernels.dispatch import load_impl
from tests.conftest import TOLERANCES, assert_close
from tests.cuda.conftest import cuda_backend_or_skip

pytestmark = pytest.mark.gpu



@pytest.fixture(autouse=True)
def _needs_cuda_backend():
    """Skips through tests/cuda/conftest.py's one helper ("cuda backend unavailable: ..."), which the
    HILT_ALLOW_MISSING_BACKENDS rule of tests/conftest.py can turn into a failure on a GPU machine."""
    cuda_backend_or_skip()

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP32_TOL = (2e-4, 2e-4)


@pytest.fixture(autouse=True)
def _nan_fill(monkeypatch):
    monkeypatch.setenv("HILT_DEBUG_NAN_FILL", "1")


def _tol(dtype, grad=False):
    if dtype == torch.float32:
        return FP32_TOL
    a, r = TOLERANCES[dtype]
    return (a * 4, r * 4) if grad else (a, r)


def _randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype)


def _compare(fn, inputs, dtype, names, seed=1, sum_backward=False):
    """fn(*inputs, backend) on cuda in `dtype` against the reference in fp32 (same rounded values)."""
    xs = [x.detach().to(dtype).requires_grad_(x.is_floating_point()) if x is not None else None for x in inputs]
    rs = [x.detach().float().requires_grad_(True) if x is not None and x.is_floating_point() else x for x in xs]
    out = fn(*xs, backend="cuda")
    ref = fn(*rs, backend="reference")
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref, *_tol(dtype), name="out")
    if sum_backward:
        out.sum().backward()
        ref.sum().backward()
    else:
        g = _randn(*out.shape, seed=seed)
        (out.float() * g).sum().backward()
        (ref * g).sum().backward()
    for n, x, r in zip(names, xs, rs):
        if n is None:
            continue
        assert x.grad is not None and x.grad.dtype == x.dtype, n
        assert_close(x.grad, r.grad, *_tol(dtype, grad=True), name=f"d{n}")


# ------------------------------------------------------------------------------------ block_local_attention
def _bla(q, k, v, b, causal, mask, backend):
    return hilt_kernels.block_local_attention(q, k, v, b, causal=causal, key_padding_mask=mask, backend=backend)


def _mask(kind, B, T, b, seed=0):
    if kind is None:
        return None
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(B, T, generator=g) < 0.3).to(DEV)
    m = torch.zeros(B, T, dtype=torch.bool)
    if kind == "block":  # batch 0: its second block fully padded; other batches: each block's first token
        m[0, b: 2 * b] = True
        m[1:, ::b] = True
    elif kind == "all":
        m[:] = True
    return m.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [16, 24, 64, 80, 128])
@pytest.mark.parametrize("b", [1, 8, 16, 32, 64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_bla_shapes(dtype, D, b, causal):
    B, H = 2, 3
    T = 2 * b + 5 if b < 64 else b + 37  # not a multiple of b; several tiles per block for b > 64
    q, k, v = (_randn(B, T, H, D, seed=s) for s in range(3))
    _compare(lambda q, k, v, backend: _bla(q, k, v, b, causal, None, backend), [q, k, v], dtype, "qkv")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "block", "all"])
@pytest.mark.parametrize("b", [1, 5, 8, 33])
@pytest.mark.parametrize("causal", [True, False])
def test_bla_masks(dtype, kind, b, causal):
    B, T, H, D = 3, 4 * b + 3, 2, 24
    q, k, v = (_randn(B, T, H, D, seed=s) for s in range(3))
    m = _mask(kind, B, T, b)
    _compare(lambda q, k, v, backend: _bla(q, k, v, b, causal, m, backend), [q, k, v], dtype, "qkv")


@pytest.mark.parametrize("causal", [True, False])
def test_bla_lse_matches_reference(causal):
    B, T, H, D, b = 2, 45, 2, 40, 8
    q, k, v = (_randn(B, T, H, D, seed=s) for s in range(3))
    m = _mask("block", B, T, b)
    out, lse = load_impl("block_local_attention", "cuda").forward(q, k, v, b, causal, D ** -0.5, m)
    rout, rlse = load_impl("block_local_attention", "reference").forward(q, k, v, b, causal, D ** -0.5, m)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, T)
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    fin = torch.isfinite(rlse)
    assert_close(lse[fin], rlse[fin], *FP32_TOL, name="lse")
    assert_close(out, rout, *FP32_TOL, name="out")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bla_noncontiguous_and_sum_backward(dtype):
    B, T, H, D, b = 2, 50, 4, 32, 16
    qkv = _randn(B, T, 3, H, D, seed=3)
    q, k, v = qkv.unbind(2)  # strided views of a fused projection
    _compare(lambda q, k, v, backend: _bla(q, k, v, b, True, None, backend), [q, k, v], dtype, "qkv",
             sum_backward=True)


def test_bla_block_larger_than_T():
    q, k, v = (_randn(2, 7, 2, 16, seed=s) for s in range(3))
    _compare(lambda q, k, v, backend: _bla(q, k, v, 1000, False, None, backend), [q, k, v], torch.float32, "qkv")


# ------------------------------------------------------------------------------------ attention_pool
def _apool(s, v, b, mask, backend):
    return hilt_kernels.attention_pool(s, v, b, key_padding_mask=mask, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [16, 24, 64, 80, 128, 200])
@pytest.mark.parametrize("b", [1, 8, 16, 32, 64, 128])
@pytest.mark.parametrize("shared", [False, True])
def test_apool_shapes(dtype, D, b, shared):
    B, H = 2, 3
    T = 2 * b + 3
    s = _randn(B, T, H, seed=0) * 2
    v = _randn(B, T, D, seed=1) if shared else _randn(B, T, H, D, seed=1)
    _compare(lambda s, v, backend: _apool(s, v, b, None, backend), [s, v], dtype, ["scores", "values"])


@pytest.mark.parametrize("kind", ["random", "block", "all"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apool_masks(kind, shared, dtype):
    B, T, H, D, b = 3, 27, 2, 24, 5
    s = _randn(B, T, H, seed=0)
    v = _randn(B, T, D, seed=1) if shared else _randn(B, T, H, D, seed=1)
    m = _mask(kind, B, T, b)
    _compare(lambda s, v, backend: _apool(s, v, b, m, backend), [s, v], dtype, ["scores", "values"])


@pytest.mark.parametrize("shared", [False, True])
def test_apool_mixed_dtypes_noncontiguous_sum_backward(shared):
    B, T, H, D, b = 2, 21, 4, 40, 4
    s = _randn(B, T, H, seed=0).requires_grad_(True)  # fp32 scores (autocast-style), bf16 values
    big = _randn(B, T, H, 2 * D, seed=1)
    v = (big[:, :, 0, :D] if shared else big[..., D:]).to(torch.bfloat16).requires_grad_(True)
    out = _apool(s, v, b, None, "cuda")
    assert out.dtype == torch.bfloat16
    out.sum().backward()
    s2, v2 = s.detach().clone().requires_grad_(True), v.detach().float().requires_grad_(True)
    ref = _apool(s2, v2, b, None, "reference")
    ref.sum().backward()
    assert_close(out, ref, *TOLERANCES[torch.bfloat16], name="out")
    assert s.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16
    assert_close(s.grad, s2.grad, *_tol(torch.bfloat16, True), name="dscores")
    assert_close(v.grad, v2.grad, *_tol(torch.bfloat16, True), name="dvalues")


@pytest.mark.parametrize("H", [513, 1024, 1700])
def test_apool_shared_values_many_heads(H):
    """Shared values with H > 512: the backward opts in to > 48 KiB of dynamic shared memory (96 H bytes)."""
    B, T, D, b = 1, 19, 32, 8
    s = _randn(B, T, H, seed=0)
    v = _randn(B, T, D, seed=1)
    _compare(lambda s, v, backend: _apool(s, v, b, None, backend), [s, v], torch.float32, ["scores", "values"])


# ------------------------------------------------------------------------------------ window2_attention
def _w2a(q, k, v, causal, backend):
    return hilt_kernels.window2_attention(q, k, v, causal=causal, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [1, 16, 24, 64, 80, 128, 200])
@pytest.mark.parametrize("causal", [True, False])
def test_w2a(dtype, D, causal):
    B, T, H = 2, 9, 3
    proj = _randn(B, 2, T, H, 3 * D, seed=0)
    q, k, v = proj[..., :D], proj[..., D: 2 * D], proj[..., 2 * D:]  # strided views, no copies
    _compare(lambda q, k, v, backend: _w2a(q, k, v, causal, backend), [q, k, v], dtype, "qkv")


@pytest.mark.parametrize("causal", [True, False])
def test_w2a_sum_backward(causal):
    q, k, v = (_randn(3, 2, 5, 2, 24, seed=s) for s in range(3))
    _compare(lambda q, k, v, backend: _w2a(q, k, v, causal, backend), [q, k, v], torch.float32, "qkv",
             sum_backward=True)


# ------------------------------------------------------------------------------------ ema_depth_scan
def _ema(values, alpha, init, return_all, backend):
    return hilt_kernels.ema_depth_scan(values, alpha, init=init, return_all=return_all, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("init_kind", [None, "C", "S"])
@pytest.mark.parametrize("return_all", [True, False])
def test_ema(dtype, per_channel, init_kind, return_all):
    L, B, T, C = 5, 2, 7, 40
    values = _randn(L, B, T, C, seed=0)
    alpha = _randn(L, C, seed=1) if per_channel else _randn(L, seed=1)
    init = None if init_kind is None else _randn(C, seed=2) if init_kind == "C" else _randn(B, T, C, seed=2)
    names = ["values", "alpha"] + ([] if init is None else ["init"])
    if init is None:
        fn = lambda v, a, backend: _ema(v, a, None, return_all, backend)  # noqa: E731
        inputs = [values, alpha]
    else:
        fn = lambda v, a, i, backend: _ema(v, a, i, return_all, backend)  # noqa: E731
        inputs = [values, alpha, init]
    _compare(fn, inputs, dtype, names)


@pytest.mark.parametrize("shape", [(3,), (4, 1), (2, 3, 1), (6, 5, 300), (1, 4097)])
def test_ema_odd_shapes_saturated_sum_backward(shape):
    L = shape[0]
    values = _randn(*shape, seed=0)
    alpha = torch.tensor([30.0, -30.0, 0.3, 12.0, -5.0, 2.0][:L], device=DEV)
    _compare(lambda v, a, backend: _ema(v, a, None, True, backend), [values, alpha], torch.float32,
             ["values", "alpha"], sum_backward=True)


def test_ema_noncontiguous_values():
    base = _randn(4, 3, 10, 16, seed=0)
    values = base[:, :, ::2, :]  # S[:-1] not collapsible to one stride: copied by the backend
    alpha = _randn(4, 16, seed=1)
    _compare(lambda v, a, backend: _ema(v, a, None, True, backend), [values, alpha], torch.float32,
             ["values", "alpha"])


def test_ema_dalpha_deterministic():
    values = _randn(6, 64, 33, 17, seed=0).requires_grad_(True)
    alpha = _randn(6, seed=1).requires_grad_(True)
    grads = []
    for _ in range(3):
        alpha.grad = None
        _ema(values, alpha, None, True, "cuda").sum().backward()
        grads.append(alpha.grad.clone())
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    assert math.isfinite(grads[0].abs().sum().item())
