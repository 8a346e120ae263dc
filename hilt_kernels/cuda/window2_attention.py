"""CUDA backend of ``window2_attention`` (contract: ``hilt_kernels/BACKENDS.md``).

Kernel: ``csrc/window2_attention/window2_attention.cu`` (a lane group per (b, t, h) row, any D).
q, k, v (and dout) are read through their 5 strides — strided views of a larger projection need
no copy. Outputs are fresh contiguous tensors from ``hilt_kernels._alloc``.
"""

from __future__ import annotations

from hilt_kernels._alloc import empty

from . import _lib
from ._torch import call, dtype_reasons, launch_ctx, ptr, tag

__all__ = ["unsupported", "forward", "backward"]


def unsupported(q, k, v, causal, scale) -> list[str]:
    """Reasons this backend cannot run the case ([] = supported)."""
    return dtype_reasons(("q", q))


def forward(q, k, v, causal: bool, scale: float):
    B, _, T, H, D = q.shape
    out = empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    dev, stream = launch_ctx(q)
    call("hilt_w2a_forward", ptr(q), ptr(k), ptr(v), ptr(out), B, T, H, D, _lib.strides(q), _lib.strides(k),
         _lib.strides(v), float(scale), int(bool(causal)), tag(q.dtype), dev, stream)
    return out


def backward(dout, q, k, v, causal: bool, scale: float):
    B, _, T, H, D = q.shape
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(q.shape, dtype=q.dtype, device=q.device)
    dv = empty(q.shape, dtype=q.dtype, device=q.device)
    if dq.numel() == 0:
        return dq, dk, dv
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    dev, stream = launch_ctx(q)
    call("hilt_w2a_backward", ptr(dout), ptr(q), ptr(k), ptr(v), ptr(dq), ptr(dk), ptr(dv), B, T, H, D,
         _lib.strides(dout), _lib.strides(q), _lib.strides(k), _lib.strides(v), float(scale), int(bool(causal)),
         tag(q.dtype), dev, stream)
    return dq, dk, dv
