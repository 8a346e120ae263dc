"""CUDA backend of ``attention_pool`` (contract: ``hilt_kernels/BACKENDS.md``).

Kernel: ``csrc/attention_pool/attention_pool.cu`` (a warp per (batch, block, head); 16-byte value
loads when aligned). scores and values keep their own dtypes; shared ``(B, T, D)`` values are
passed as ``(B, T, H, D)`` with head stride 0. Inputs are read through their strides; outputs are
fresh contiguous tensors from ``hilt_kernels._alloc``. Limits: D <= 256 (fp32 values) / 512
(16-bit values); shared values: H <= 1700 (the backward's dynamic shared memory is 96 H bytes,
above 48 KiB with the opt-in attribute; 1700 heads fit the 163 KiB of sm_80).
"""

from __future__ import annotations

import torch

from hilt_kernels._alloc import empty

from . import _lib
from ._torch import call, dtype_reasons, launch_ctx, mask_arg, ptr, tag

__all__ = ["unsupported", "forward", "backward"]

MAX_SHARED_HEADS = 1700


def _max_d(dtype) -> int:
    return 256 if dtype == torch.float32 else 512


def unsupported(scores, values, block_size, key_padding_mask) -> list[str]:
    """Reasons this backend cannot run the case ([] = supported)."""
    reasons = dtype_reasons(("scores", scores), ("values", values))
    if values.dim() in (3, 4) and not reasons and values.shape[-1] > _max_d(values.dtype):
        reasons.append(f"head dim D={values.shape[-1]} > {_max_d(values.dtype)} for {values.dtype} values")
    if values.dim() == 3 and scores.dim() == 3 and scores.shape[2] > MAX_SHARED_HEADS:
        reasons.append(f"shared (B, T, D) values need H <= {MAX_SHARED_HEADS} (got {scores.shape[2]})")
    return reasons


def _value_strides(values):
    s = values.stride()
    if values.dim() == 3:  # shared values: head stride 0
        return _lib.int64s(s[0], s[1], 0, s[2])
    return _lib.int64s(*s)


def forward(scores, values, block_size: int, key_padding_mask):
    B, T, H = scores.shape
    D = values.shape[-1]
    nb = -(-T // int(block_size))
    out = empty((B, nb, H, D), dtype=values.dtype, device=values.device)
    if out.numel() == 0:
        return out
    kpm, kpm_s = mask_arg(key_padding_mask)
    dev, stream = launch_ctx(values)
    call("hilt_apool_forward", ptr(scores), ptr(values), ptr(kpm), ptr(out), B, T, H, D, min(int(block_size), T),
         _lib.strides(scores), _value_strides(values), kpm_s, tag(scores.dtype), tag(values.dtype), dev, stream)
    return out


def backward(dout, scores, values, out, block_size: int, key_padding_mask):
    B, T, H = scores.shape
    D = values.shape[-1]
    dscores = empty(scores.shape, dtype=scores.dtype, device=scores.device)
    dvalues = empty(values.shape, dtype=values.dtype, device=values.device)
    if B * T == 0:
        return dscores, dvalues
    if H == 0 or D == 0:  # nothing flows: all-zero gradients (no launch)
        return dscores.zero_(), dvalues.zero_()
    if dout.dtype != values.dtype:
        dout = dout.to(values.dtype)
    if out.dtype != values.dtype:
        out = out.to(values.dtype)
    kpm, kpm_s = mask_arg(key_padding_mask)
    dev, stream = launch_ctx(values)
    call("hilt_apool_backward", ptr(dout), ptr(scores), ptr(values), ptr(out), ptr(kpm), ptr(dscores), ptr(dvalues),
         B, T, H, D, min(int(block_size), T), _lib.strides(dout), _lib.strides(scores), _value_strides(values),
         _lib.strides(out), kpm_s, int(values.dim() == 3), tag(scores.dtype), tag(values.dtype), dev, stream)
    return dscores, dvalues
