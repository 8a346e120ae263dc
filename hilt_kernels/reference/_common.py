"""Small helpers shared by the reference backends."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation dtype of an op on inputs of these dtypes: fp64 if any is fp64 (for gradcheck),
    else fp32 (16-bit inputs are computed in fp32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def pad_dim(x: torch.Tensor, dim: int, size: int, value: float | bool = 0) -> torch.Tensor:
    """Pad dimension ``dim`` of ``x`` at the end up to ``size`` with ``value`` (no copy if already there)."""
    n = x.shape[dim]
    if n == size:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, size - n]
    if x.dtype == torch.bool:
        return F.pad(x.to(torch.uint8), pad, value=int(value)).bool()
    return F.pad(x, pad, value=value)
