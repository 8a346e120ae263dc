"""Shared comparison logic of the op tests: an op on one backend against the naive fp64 loops."""

from __future__ import annotations

import torch

from tests.conftest import TOLERANCES, assert_close


def leaf(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.detach().to(dtype).requires_grad_(True)


def run(fn, inputs, grad_seed=0):
    """Output and input gradients of ``fn(*inputs)`` under a random (never zero) output gradient."""
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    if out.numel() and out.requires_grad:
        (out.to(torch.float64) * g.to(out.device)).sum().backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in inputs]
    return out, grads


def check_against_naive(op, naive, masters, dtype, names, tol=None):
    """Run ``op`` on ``masters`` cast to ``dtype`` and ``naive`` on the same values in fp64."""
    atol, rtol = tol or TOLERANCES[dtype]
    xs = [leaf(m, dtype) for m in masters]
    ref = [leaf(x.to(torch.float64), torch.float64) for x in xs]
    out, grads = run(op, xs)
    exp_out, exp_grads = run(naive, ref)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, exp_out, atol, rtol, "out")
    for n, g, e in zip(names, grads, exp_grads):
        assert g.dtype == dtype, f"d{n} has dtype {g.dtype}, expected {dtype}"
        assert_close(g, e, atol, rtol, f"d{n}")


def check_16bit_against_fp32(op, masters, dtype, names):
    """The op in a 16-bit dtype against the same op in fp32 on the same rounded inputs."""
    atol, rtol = TOLERANCES[dtype]
    xs = [leaf(m, dtype) for m in masters]
    xs32 = [leaf(x, torch.float32) for x in xs]
    out, grads = run(op, xs)
    out32, grads32 = run(op, xs32)
    assert out.dtype == dtype
    assert_close(out, out32, atol, rtol, f"out ({dtype})")
    for n, g, e in zip(names, grads, grads32):
        assert_close(g, e, atol * 4, rtol * 4, f"d{n} ({dtype})")
