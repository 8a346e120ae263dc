"""Output allocation for the ops' backends.

Every backend allocates the tensors it returns through :func:`empty` / :func:`empty_like`.
Setting the environment variable ``HILT_DEBUG_NAN_FILL=1`` makes them pre-fill the fresh
memory with NaN, so a kernel that forgets to write an element produces a NaN that the tests
catch instead of stale memory that happens to look plausible. The variable is read on every
call, so tests can toggle it.
"""

from __future__ import annotations

import os

import torch

__all__ = ["nan_fill_enabled", "empty", "empty_like"]


def nan_fill_enabled() -> bool:
    """True when ``HILT_DEBUG_NAN_FILL`` is set to a true value (1/true/yes/on)."""
    return os.environ.get("HILT_DEBUG_NAN_FILL", "").strip().lower() in ("1", "true", "yes", "on")


def _maybe_fill(t: torch.Tensor) -> torch.Tensor:
    if nan_fill_enabled() and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def empty(*size, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A contiguous uninitialised tensor (NaN-filled under ``HILT_DEBUG_NAN_FILL=1``)."""
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = tuple(size[0])
    return _maybe_fill(torch.empty(size, dtype=dtype, device=device))


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous uninitialised tensor shaped like ``t`` (NaN-filled under the debug switch)."""
    return _maybe_fill(torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device))
