"""Reference backend of ema_depth_scan: a loop over the L depth steps, vectorized over everything else.

The state is carried in fp32 (fp64 when values or alpha_logits are fp64). The backward recomputes the
states forward (never by dividing by 1 − α) and runs the reverse recurrence of DESIGN.md; the alpha
gradient is reduced per step in a fixed order, so it is deterministic.
"""

from __future__ import annotations

import torch

from hilt_kernels._alloc import empty

from ._common import compute_dtype

__all__ = ["forward", "backward"]


def _alphas(alpha_logits, ndim_state, cd):
    """α as (L, 1, ..., 1) or (L, 1, ..., C), broadcastable against each (*S) step with a leading L."""
    a = torch.sigmoid(alpha_logits.to(cd))
    if a.dim() == 1:
        return a.view(-1, *([1] * ndim_state))
    return a.view(a.shape[0], *([1] * (ndim_state - 1)), a.shape[1])


def _states(values, alpha_logits, init, cd):
    """All states (L, *S) in the compute dtype."""
    L, S = values.shape[0], values.shape[1:]
    a = _alphas(alpha_logits, len(S), cd)
    states = torch.empty((L, *S), dtype=cd, device=values.device)
    s = init.to(cd) if init is not None else torch.zeros(S, dtype=cd, device=values.device)
    for l in range(L):
        s = torch.lerp(s, values[l].to(cd), a[l])
        states[l] = s
    return states


def forward(values, alpha_logits, init, return_all: bool):
    """Returns all states (L, *S) or the last (*S), in values.dtype; see BACKENDS.md."""
    cd = compute_dtype(values.dtype, alpha_logits.dtype)
    L, S = values.shape[0], values.shape[1:]
    a = _alphas(alpha_logits, len(S), cd)
    s = init.to(cd).expand(S) if init is not None else torch.zeros(S, dtype=cd, device=values.device)
    out = empty((L, *S) if return_all else S, dtype=values.dtype, device=values.device)
    for l in range(L):
        s = torch.lerp(s, values[l].to(cd), a[l])
        if return_all:
            out[l] = s
    if not return_all:
        out.copy_(s)
    return out


def backward(grad, values, alpha_logits, init, states, return_all: bool):
    """Returns (dvalues, dalpha_logits, dinit); see BACKENDS.md for their dtypes and shapes."""
    cd = compute_dtype(values.dtype, alpha_logits.dtype)
    L, S = values.shape[0], values.shape[1:]
    a = _alphas(alpha_logits, len(S), cd)
    st = _states(values, alpha_logits, init, cd)  # recomputed in fp32/fp64 whatever `states` holds
    zero = torch.zeros(S, dtype=cd, device=values.device)
    s0 = init.to(cd).expand(S) if init is not None else zero
    a_raw = torch.sigmoid(alpha_logits.to(cd))  # (L,) or (L, C)
    # dalpha_l sums over every element sharing α_l: all of S, or all but the channel dim.
    red_dims = tuple(range(len(S) - 1)) if alpha_logits.dim() == 2 else tuple(range(len(S)))

    dvalues = empty((L, *S), dtype=values.dtype, device=values.device)
    dalpha = empty(alpha_logits.shape, dtype=cd, device=values.device)
    G = zero
    for l in range(L - 1, -1, -1):
        g_l = grad[l].to(cd) if return_all else (grad.to(cd) if l == L - 1 else zero)
        G = g_l + (1 - a[l + 1]) * G if l < L - 1 else g_l
        dvalues[l] = a[l] * G
        prev = st[l - 1] if l > 0 else s0
        contrib = G * (values[l].to(cd) - prev)
        if red_dims:
            contrib = contrib.sum(red_dims)
        dalpha[l] = a_raw[l] * (1 - a_raw[l]) * contrib
    if init is None:
        dinit = torch.empty(0, dtype=cd, device=values.device)
    else:
        dinit = ((1 - a[0]) * G).expand(S).contiguous()
    return dvalues, dalpha, dinit
