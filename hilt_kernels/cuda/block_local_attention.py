"""CUDA backend of ``block_local_attention`` (contract: ``hilt_kernels/BACKENDS.md``).

Kernels: ``csrc/block_local_attention/`` (fp32-accumulating SIMT tiles that pack whole small blocks
per CTA; see bla_kernels.cuh). Inputs are read through their strides (no copies; incoming
gradients may be stride-0 expanded views), outputs are fresh contiguous tensors from
``hilt_kernels._alloc``. Limits: fp32/fp16/bf16, head dim D <= 128.
"""

from __future__ import annotations

import torch

from hilt_kernels._alloc import empty

from . import _lib
from ._torch import call, dtype_reasons, launch_ctx, mask_arg, ptr, tag

__all__ = ["unsupported", "forward", "backward"]

MAX_HEAD_DIM = 128


def unsupported(q, k, v, block_size, causal, scale, key_padding_mask) -> list[str]:
    """Reasons this backend cannot run the case ([] = supported)."""
    reasons = dtype_reasons(("q", q))
    if q.dim() == 4 and q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim D={q.shape[-1]} > {MAX_HEAD_DIM}")
    return reasons


def forward(q, k, v, block_size: int, causal: bool, scale: float, key_padding_mask):
    B, T, H, D = q.shape
    out = empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse = empty((B, H, T), dtype=torch.float32, device=q.device)
    if B * T * H == 0:
        return out, lse
    kpm, kpm_s = mask_arg(key_padding_mask)
    dev, stream = launch_ctx(q)
    call("hilt_bla_forward", ptr(q), ptr(k), ptr(v), ptr(kpm), ptr(out), ptr(lse), B, T, H, D,
         min(int(block_size), T), _lib.strides(q), _lib.strides(k), _lib.strides(v), kpm_s, float(scale),
         tag(q.dtype), int(bool(causal)), dev, stream)
    return out, lse


def backward(dout, q, k, v, out, lse, block_size: int, causal: bool, scale: float, key_padding_mask):
    B, T, H, D = q.shape
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(q.shape, dtype=q.dtype, device=q.device)
    dv = empty(q.shape, dtype=q.dtype, device=q.device)
    if dq.numel() == 0:
        return dq, dk, dv
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    if out.dtype != q.dtype:
        out = out.to(q.dtype)
    lse = lse.to(torch.float32).contiguous()
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)  # scratch, fully written
    kpm, kpm_s = mask_arg(key_padding_mask)
    dev, stream = launch_ctx(q)
    call("hilt_bla_backward", ptr(dout), ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ptr(kpm), ptr(dq), ptr(dk),
         ptr(dv), ptr(delta), B, T, H, D, min(int(block_size), T), _lib.strides(dout), _lib.strides(q),
         _lib.strides(k), _lib.strides(v), _lib.strides(out), kpm_s, float(scale), tag(q.dtype),
         int(bool(causal)), dev, stream)
    return dq, dk, dv
