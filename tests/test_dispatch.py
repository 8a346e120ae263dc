"""Backend choice: demands, the HILT_BACKEND preference, the automatic rule, and hilt.info."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import hilt_kernels
from hilt_kernels import dispatch
from hilt_kernels.dispatch import BackendUnavailableError, choose_backend


def qkv(dtype=torch.float32):
    return torch.randn(3, 1, 8, 2, 4, dtype=dtype).unbind(0)


def args(q, k, v):
    return (q, k, v, 4, True, 0.5, None)


def test_unknown_backend_is_a_value_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend must be None or one of"):
        hilt_kernels.block_local_attention(q, k, v, 4, backend="flash")


def test_demanded_cuda_backend_lists_every_reason():
    q, k, v = qkv(torch.float64)
    with pytest.raises(BackendUnavailableError) as e:
        hilt_kernels.block_local_attention(q, k, v, 4, backend="cuda")
    msg = str(e.value)
    assert "no CUDA device" in msg or "not built" in msg  # the library / driver
    assert "need CUDA tensors" in msg  # the device
    assert "float64" in msg  # the dtype


def test_demanded_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv(torch.float64)
    with pytest.raises(BackendUnavailableError) as e:
        choose_backend("block_local_attention", "triton", (q, k, v), args(q, k, v))
    msg = str(e.value)
    assert "TRITON_INTERPRET=1" in msg or "not importable" in msg
    assert "float64" in msg


def test_auto_picks_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("HILT_BACKEND", raising=False)
    q, k, v = qkv()
    assert choose_backend("block_local_attention", None, (q, k, v), args(q, k, v)) == "reference"


def test_preference_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("HILT_BACKEND", "cuda")
    monkeypatch.setattr(dispatch, "_warned", set())
    q, k, v = qkv()
    with pytest.warns(RuntimeWarning, match="HILT_BACKEND='cuda' cannot run this call, using 'reference'"):
        out = hilt_kernels.block_local_attention(q, k, v, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second identical fallback must not warn again
        out2 = hilt_kernels.block_local_attention(q, k, v, 4)
    assert torch.equal(out, out2)


def test_preference_is_honoured_when_possible(monkeypatch):
    monkeypatch.setenv("HILT_BACKEND", "reference")
    q, k, v = qkv()
    assert choose_backend("block_local_attention", None, (q, k, v), args(q, k, v)) == "reference"


def test_bad_preference_warns_and_is_ignored(monkeypatch):
    monkeypatch.setenv("HILT_BACKEND", "fastest")
    monkeypatch.setattr(dispatch, "_warned", set())
    q, k, v = qkv()
    with pytest.warns(RuntimeWarning, match="is not one of"):
        assert choose_backend("block_local_attention", None, (q, k, v), args(q, k, v)) == "reference"


def test_cuda_stays_out_of_auto_until_recorded():
    assert dispatch.CUDA_IN_AUTO == {}


def test_backward_runs_on_the_forwards_backend(monkeypatch):
    """The autograd graph calls the backward of the backend that ran the forward."""
    from hilt_kernels.reference import block_local_attention as ref_mod

    called = []
    orig = ref_mod.backward
    monkeypatch.setattr(ref_mod, "backward", lambda *a: called.append(1) or orig(*a))
    q, k, v = (x.requires_grad_() for x in qkv())
    hilt_kernels.block_local_attention(q, k, v, 4, backend="reference").sum().backward()
    assert called == [1]


def test_info_reports_backends():
    r = subprocess.run([sys.executable, "-m", "hilt.info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ("torch", "reference  available", "triton", "cuda", "unavailable", "cpu library:"):
        assert word in r.stdout
