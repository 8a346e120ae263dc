"""Reference backend of window2_attention: elementwise PyTorch over the 2×2 window.

For every (b, t, h) the four scores s_ij = scale · q_i·k_j are per-token dot products; a softmax over
two entries is a sigmoid of their difference, so everything is a handful of fused elementwise ops
and row reductions over D (no permutes, no 2×2 matmuls). Computed in fp32 (fp64 for fp64).
"""

from __future__ import annotations

import torch

from ._common import compute_dtype

__all__ = ["forward", "backward"]


def _split(x, cd):
    x = x.to(cd)
    return x[:, 0], x[:, 1]


def _dot(a, b):
    return (a * b).sum(-1, keepdim=True)


def _probs(q0, q1, k0, k1, causal, scale):
    """p_i0 (the weight of element 0 in row i) for rows 0 and 1; p_i1 = 1 − p_i0."""
    p10 = torch.sigmoid((_dot(q1, k0) - _dot(q1, k1)) * scale)
    if causal:
        p00 = torch.ones_like(p10)
    else:
        p00 = torch.sigmoid((_dot(q0, k0) - _dot(q0, k1)) * scale)
    return p00, p10


def forward(q, k, v, causal: bool, scale: float):
    """Returns out (B, 2, T, H, D) in q.dtype; see BACKENDS.md."""
    cd = compute_dtype(q.dtype)
    (q0, q1), (k0, k1), (v0, v1) = _split(q, cd), _split(k, cd), _split(v, cd)
    p00, p10 = _probs(q0, q1, k0, k1, causal, scale)
    out0 = v1 + p00 * (v0 - v1)
    out1 = v1 + p10 * (v0 - v1)
    return torch.stack((out0, out1), dim=1).to(q.dtype)


def backward(dout, q, k, v, causal: bool, scale: float):
    """Returns (dq, dk, dv), each (B, 2, T, H, D) in q.dtype; see BACKENDS.md."""
    cd = compute_dtype(q.dtype)
    (q0, q1), (k0, k1), (v0, v1) = _split(q, cd), _split(k, cd), _split(v, cd)
    g0, g1 = _split(dout, cd)
    p00, p10 = _probs(q0, q1, k0, k1, causal, scale)
    p01, p11 = 1 - p00, 1 - p10
    dv0 = p00 * g0 + p10 * g1
    dv1 = p01 * g0 + p11 * g1
    # Row i: dS_i0 = P_i0 P_i1 (dP_i0 − dP_i1) = −dS_i1, with dP_ij = dout_i · v_j.
    dvd = v0 - v1
    ds0 = p00 * p01 * _dot(g0, dvd) * scale
    ds1 = p10 * p11 * _dot(g1, dvd) * scale
    dk_diff = k0 - k1
    dq0 = ds0 * dk_diff
    dq1 = ds1 * dk_diff
    dk0 = ds0 * q0 + ds1 * q1
    dk1 = -dk0
    stack = lambda a, b: torch.stack((a, b), dim=1).to(q.dtype)  # noqa: E731
    return stack(dq0, dq1), stack(dk0, dk1), stack(dv0, dv1)
