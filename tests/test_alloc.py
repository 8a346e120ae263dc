"""The NaN-fill debug switch of the ops' allocator."""

from __future__ import annotations

import torch

from hilt_kernels import _alloc


def test_nan_fill_switch(monkeypatch):
    monkeypatch.delenv("HILT_DEBUG_NAN_FILL", raising=False)
    assert not _alloc.nan_fill_enabled()
    monkeypatch.setenv("HILT_DEBUG_NAN_FILL", "1")
    assert _alloc.nan_fill_enabled()
    t = _alloc.empty(3, 4, dtype=torch.float16, device="cpu")
    assert t.shape == (3, 4) and t.is_contiguous() and torch.isnan(t).all()
    u = _alloc.empty_like(torch.zeros(2, 5).t(), dtype=torch.float64)
    assert u.shape == (5, 2) and u.dtype == torch.float64 and u.is_contiguous() and torch.isnan(u).all()
    ints = _alloc.empty((4,), dtype=torch.int32, device="cpu")  # not a float: left alone
    assert ints.dtype == torch.int32

