"""CUDA backend of ``ema_depth_scan`` (contract: ``hilt_kernels/BACKENDS.md``).

Kernels: ``csrc/ema_depth_scan/ema_depth_scan.cu``. ``values`` (L, *S) / ``grad`` / ``init`` are
passed as (L, R, C) / (R, C) strided views (C = S[-1], R = prod(S[:-1])): no copy when S[:-1]
collapses to one stride (contiguous, L-slices, stride-0 expanded grads and inits); otherwise
``.contiguous()`` first. alpha is passed as ``sigmoid(alpha_logits)`` in fp32 (computed by torch,
tiny). The backward recomputes the fp32 states (the saved ``states`` are not used) and reduces
dalpha deterministically (per-CTA partial sums + a fixed-order reduction kernel, no atomics).
"""

from __future__ import annotations

import math

import torch

from hilt_kernels._alloc import empty

from . import _lib
from ._torch import call, dtype_reasons, launch_ctx, ptr, tag

__all__ = ["unsupported", "forward", "backward"]


def unsupported(values, alpha_logits, init, return_all) -> list[str]:
    """Reasons this backend cannot run the case ([] = supported)."""
    reasons = dtype_reasons(("values", values), ("alpha_logits", alpha_logits), ("init", init))
    if init is not None and init.dtype != values.dtype:
        reasons.append(f"init dtype {init.dtype} differs from values dtype {values.dtype}")
    if alpha_logits.dim() not in (1, 2):
        reasons.append(f"alpha_logits must be (L,) or (L, C), got shape {tuple(alpha_logits.shape)}")
    return reasons


def _collapse(sizes, strides):
    """One stride for dims ``sizes`` seen as a single flat dim, or None if impossible."""
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    for (n0, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    return dims[-1][1] if dims else 0


def _rc_view(x: torch.Tensor, lead: int):
    """(tensor, [sL, sR, sC]) with x's dims after the first ``lead`` seen as (R, C)."""
    for attempt in range(2):
        S, st = x.shape[lead:], x.stride()[lead:]
        sL = x.stride(0) if lead else 0
        if len(S) == 0:
            return x, [sL, 0, 0]
        sR = _collapse(S[:-1], st[:-1])
        if sR is not None:
            return x, [sL, sR, st[-1]]
        x = x.contiguous()
    raise AssertionError("unreachable")  # pragma: no cover


def _geometry(values):
    S = values.shape[1:]
    C = S[-1] if len(S) else 1
    N = math.prod(S)
    R = N // C if C else 0
    return values.shape[0], S, N, R, C


def _alpha(alpha_logits):
    return torch.sigmoid(alpha_logits.to(torch.float32)).contiguous()


def forward(values, alpha_logits, init, return_all: bool):
    L, S, N, R, C = _geometry(values)
    out = empty((L, *S) if return_all else S, dtype=values.dtype, device=values.device)
    if N == 0 or L == 0:
        return out
    vals, sv = _rc_view(values, 1)
    ini, si = (None, [0, 0, 0]) if init is None else _rc_view(init.expand(S), 0)
    alpha = _alpha(alpha_logits)  # keep a reference until the launch is queued
    dev, stream = launch_ctx(values)
    call("hilt_ema_forward", ptr(vals), ptr(alpha), ptr(ini), ptr(out), L, R, C, _lib.int64s(*sv),
         _lib.int64s(*si[1:]), int(alpha_logits.dim() == 2), int(bool(return_all)), tag(values.dtype), dev, stream)
    return out


def backward(grad, values, alpha_logits, init, states, return_all: bool):
    L, S, N, R, C = _geometry(values)
    dev_t = values.device
    dvalues = empty(values.shape, dtype=values.dtype, device=dev_t)
    dalpha = empty(alpha_logits.shape, dtype=torch.float32, device=dev_t)
    dinit = empty(S, dtype=torch.float32, device=dev_t) if init is not None else torch.empty(0, device=dev_t)
    if N == 0 or L == 0:
        dalpha.zero_()
        return dvalues, dalpha, dinit
    if grad.dtype != values.dtype:
        grad = grad.to(values.dtype)
    vals, sv = _rc_view(values, 1)
    g, sg = _rc_view(grad, 1 if return_all else 0)
    ini, si = (None, [0, 0, 0]) if init is None else _rc_view(init.expand(S), 0)
    lib = _lib.get()
    ws = torch.empty(int(lib.hilt_ema_workspace_floats(L, R, C)), dtype=torch.float32, device=dev_t)
    alpha = _alpha(alpha_logits)
    dev, stream = launch_ctx(values)
    call("hilt_ema_backward", ptr(g), ptr(vals), ptr(alpha), ptr(ini), ptr(dvalues), ptr(dalpha),
         ptr(dinit) if init is not None else None, ptr(ws), L, R, C, _lib.int64s(*sg), _lib.int64s(*sv),
         _lib.int64s(*si[1:]), int(alpha_logits.dim() == 2), int(bool(return_all)), tag(values.dtype), dev, stream)
    return dvalues, dalpha, dinit
