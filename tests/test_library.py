"""The custom ops: torch.library.opcheck, and torch.compile(fullgraph=True) of each public op."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import hilt_kernels
from tests.conftest import assert_close


def _bla_args():
    q, k, v = torch.randn(3, 2, 10, 2, 8).unbind(0)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 4:8] = True
    return (q, k, v, 4, True, 0.35, mask)


def _apool_args():
    return (torch.randn(2, 10, 3), torch.randn(2, 10, 3, 5), 4, torch.rand(2, 10) < 0.3)


def _w2a_args():
    q, k, v = torch.randn(3, 2, 2, 5, 2, 4).unbind(0)
    return (q, k, v, True, 0.5)


def _ema_args():
    return (torch.randn(4, 2, 3), torch.randn(4, 3), torch.randn(3), True)


FWD_CASES = {"bla": _bla_args, "apool": _apool_args, "w2a": _w2a_args, "ema": _ema_args}


@pytest.mark.parametrize("short", list(FWD_CASES))
def test_opcheck_forward_reference(short):
    args = FWD_CASES[short]()
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    opcheck(getattr(torch.ops.hilt, f"{short}_fwd_reference"), args)


def test_opcheck_backward_reference():
    q, k, v, b, causal, scale, mask = _bla_args()
    out, lse = torch.ops.hilt.bla_fwd_reference(q, k, v, b, causal, scale, mask)
    opcheck(torch.ops.hilt.bla_bwd_reference, (torch.randn_like(out), q, k, v, out, lse, b, causal, scale, mask))
    s, vals, b, m = _apool_args()
    o = torch.ops.hilt.apool_fwd_reference(s, vals, b, m)
    opcheck(torch.ops.hilt.apool_bwd_reference, (torch.randn_like(o), s, vals, o, b, m))
    q, k, v, causal, scale = _w2a_args()
    opcheck(torch.ops.hilt.w2a_bwd_reference, (torch.randn_like(q), q, k, v, causal, scale))
    vals, a, init, ra = _ema_args()
    o = torch.ops.hilt.ema_fwd_reference(vals, a, init, ra)
    opcheck(torch.ops.hilt.ema_bwd_reference, (torch.randn_like(o), vals, a, init, o, ra))


PUBLIC = {
    "block_local_attention": lambda q, k, v: hilt_kernels.block_local_attention(q, k, v, 4, key_padding_mask=_MASK),
    "attention_pool": lambda s, v: hilt_kernels.attention_pool(s, v, 4),
    "window2_attention": lambda q, k, v: hilt_kernels.window2_attention(q, k, v),
    "ema_depth_scan": lambda v, a, i: hilt_kernels.ema_depth_scan(v, a, init=i),
}
_MASK = torch.tensor([[False] * 6 + [True] * 4, [True] * 3 + [False] * 7])
INPUTS = {
    "block_local_attention": lambda: torch.randn(3, 2, 10, 2, 8).unbind(0),
    "attention_pool": lambda: (torch.randn(2, 10, 3), torch.randn(2, 10, 6)),
    "window2_attention": lambda: torch.randn(3, 2, 2, 5, 2, 4).unbind(0),
    "ema_depth_scan": lambda: (torch.randn(4, 2, 3), torch.randn(4), torch.randn(3)),
}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("op", list(PUBLIC))
def test_compile_fullgraph_forward_backward(op):
    fn = PUBLIC[op]
    xs = [x.detach().clone().requires_grad_() for x in INPUTS[op]()]
    ys = [x.detach().clone().requires_grad_() for x in xs]
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: (fn(*a) ** 2).sum(), fullgraph=True)
    loss = compiled(*xs)
    loss.backward()
    exp = (fn(*ys) ** 2).sum()
    exp.backward()
    assert_close(loss, exp, 1e-5, 1e-5, "loss")
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert_close(x.grad, y.grad, 1e-5, 1e-5, f"grad {i}")
