"""Hazards that only hardware shows, tested on the CPU: the device guard, the grid's y/z limit, the
fixed-config hook, sizing from the launched grid, no dummy allocation; and the conftest rule for
missing backends."""

from __future__ import annotations

import contextlib

import pytest
import torch

import hilt_kernels
from hilt_kernels.triton import _launch
from hilt_kernels.triton import attention_pool as ap
from hilt_kernels.triton import block_local_attention as bla
from hilt_kernels.triton import ema_depth_scan as ema
from hilt_kernels.triton import window2_attention as w2a
from tests import naive
from tests.conftest import assert_close, skip_missing_backend, triton_usable
from tests.ops.test_triton_configs import dense_bla


@pytest.fixture
def need_triton():
    if not triton_usable():
        skip_missing_backend("triton", "triton is not usable here")


def _all_ops_fwd_bwd():
    """Each op forward + backward on small CPU tensors (triton backend)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    mask = torch.tensor([[False, True, False, False, False, True, False]])
    hilt_kernels.block_local_attention(r(1, 7, 2, 4), r(1, 7, 2, 4), r(1, 7, 2, 4), 3,
                                       key_padding_mask=mask, backend="triton").sum().backward()
    hilt_kernels.block_local_attention(r(1, 70, 1, 4), r(1, 70, 1, 4), r(1, 70, 1, 4), 65,
                                       backend="triton").sum().backward()  # large path (3 kernels)
    hilt_kernels.attention_pool(r(1, 70, 2), r(1, 70, 2, 3), 66, backend="triton").sum().backward()  # + stats
    hilt_kernels.window2_attention(r(1, 2, 3, 2, 4), r(1, 2, 3, 2, 4), r(1, 2, 3, 2, 4),
                                   backend="triton").sum().backward()
    hilt_kernels.ema_depth_scan(r(3, 2, 4), r(3), return_all=False, backend="triton").sum().backward()


def test_every_launch_is_under_the_device_guard(monkeypatch, need_triton):
    """triton launches on the current CUDA device: each launch must enter torch.cuda.device(tensors'
    device). On the CPU the guard is a no-op, so it is patched to record its device and its launches."""
    entered = []
    records = []
    state = {"depth": 0}

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        state["depth"] += 1
        try:
            yield
        finally:
            state["depth"] -= 1

    original_execute = _launch._execute

    def execute(fn, grid_fn, args, kwargs):
        assert state["depth"] == 1, "a kernel launched outside the device guard"
        return original_execute(fn, grid_fn, args, kwargs)

    monkeypatch.setattr(_launch, "device_guard", guard)
    monkeypatch.setattr(_launch, "_execute", execute)
    monkeypatch.setattr(_launch, "records", records)
    _all_ops_fwd_bwd()
    names = {r.name for r in records}
    assert {"_bla_fwd_small", "_bla_bwd_small", "_bla_fwd_large", "_bla_bwd_dq_large", "_bla_bwd_dkdv_large",
            "_apool_fwd_kernel", "_apool_bwd_kernel", "_apool_stats_kernel", "_w2a_fwd_kernel", "_w2a_bwd_kernel",
            "_ema_fwd_kernel", "_ema_bwd_kernel"} <= names
    assert len(entered) == len(records)
    assert all(d == torch.device("cpu") for d in entered)
    assert all(r.device == torch.device("cpu") for r in records)


def test_device_guard_selects_the_tensors_cuda_device():
    g = _launch.device_guard(torch.device("cuda", 1))
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    assert isinstance(_launch.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_grid_over_the_limits_is_a_clear_error():
    assert _launch.check_grid((5, 65535), "k") == (5, 65535, 1)
    with pytest.raises(ValueError, match="k: grid .* exceeds"):
        _launch.check_grid((1, 1, 65536), "k")
    with pytest.raises(ValueError, match="exceeds"):
        _launch.check_grid((2**31, 1, 1), "k")


@pytest.mark.parametrize("b", [4, 40])  # small path, large path
def test_bla_batch_over_65535_launches_in_chunks(monkeypatch, b):
    """B on grid axis z: a batch of 70,000 launches chunks of <= 65,535 covering it (launches
    intercepted, nothing runs)."""
    records = []
    launched = []

    def execute(fn, grid_fn, args, kwargs):
        meta = {**dict(zip(fn.arg_names, args)), **kwargs}
        launched.append((grid_fn(meta), args[0].shape[0], args[0].data_ptr()))

    monkeypatch.setattr(_launch, "_execute", execute)
    monkeypatch.setattr(_launch, "records", records)
    monkeypatch.setattr(_launch, "pick", lambda name, kept: kept[0])
    B, T = 70_000, b + 3
    q = torch.zeros(B, T, 1, 4)
    out, lse = bla.forward(q, q, q, b, True, 0.5, None)
    bla.backward(q, q, q, q, out, lse, b, True, 0.5, None)
    assert launched
    for kernel in {r.name for r in records}:
        grids = [r.grid for r in records if r.name == kernel]
        assert all(g[2] <= 65535 and g[1] == 1 for g in grids)
        assert sum(g[2] for g in grids) == B and len(grids) == 2
    assert all(grid[2] == nb for grid, nb, _ in launched)  # each chunk's tensors hold its batch rows
    assert {ptr for _, _, ptr in launched if True} >= {q.data_ptr(), q[65535:].data_ptr()}


@pytest.mark.parametrize("b", [3, 40])
def test_bla_batch_chunks_compute_the_right_result(monkeypatch, need_triton, b):
    """With the limit lowered to 2, B = 5 runs as 3 chunks per kernel and gives the exact result."""
    monkeypatch.setattr(_launch, "GRID_YZ_MAX", 2)
    records = []
    monkeypatch.setattr(_launch, "records", records)
    B, T, H, D = 5, b + 5, 2, 4
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(B, T, generator=g) < 0.3
    xs = [x.float().requires_grad_(True) for x in (q, k, v)]
    rs = [x.detach().double().requires_grad_(True) for x in xs]
    out = hilt_kernels.block_local_attention(*xs, b, key_padding_mask=mask, backend="triton")
    exp = dense_bla(*rs, b, True, mask)
    gout = torch.randn(out.shape, generator=g)
    out.backward(gout)
    exp.backward(gout.double())
    assert_close(out, exp, 1e-4, 1e-4, "out")
    for n, x, r in zip("qkv", xs, rs):
        assert_close(x.grad, r.grad, 2e-4, 2e-4, f"d{n}")
    for kernel in {r.name for r in records}:
        grids = [r.grid for r in records if r.name == kernel]
        assert [gr[2] for gr in grids] == [2, 2, 1]


def test_fixed_config_hook(monkeypatch):
    """HILT_TRITON_FIXED_CONFIG=1 (or the interpreter) runs the first kept config; otherwise the autotuner."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("HILT_TRITON_FIXED_CONFIG", raising=False)
    assert not _launch.fixed_config()
    calls = []
    monkeypatch.setattr(_launch, "_execute", lambda fn, grid_fn, args, kwargs: calls.append((fn, kwargs)) or
                        grid_fn({**dict(zip(w2a.fwd_kernel.fn.arg_names, args)), **kwargs, "BLOCK_R": 4}))
    q = torch.zeros(1, 2, 3, 2, 64)
    w2a.forward(q, q, q, True, 1.0)
    assert calls[-1][0] is w2a.fwd_kernel.autotuned
    monkeypatch.setenv("HILT_TRITON_FIXED_CONFIG", "1")
    assert _launch.fixed_config()
    w2a.forward(q, q, q, True, 1.0)
    fn, kwargs = calls[-1]
    assert fn is w2a.fwd_kernel.fn
    first = w2a.prune_fwd(w2a.CANDIDATES, {}, BLOCK_D=64)[0]
    assert kwargs["BLOCK_R"] == first.kwargs["BLOCK_R"] and kwargs["num_warps"] == first.num_warps
    monkeypatch.setenv("HILT_TRITON_FIXED_CONFIG", "0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _launch.fixed_config()


def test_ema_partial_rows_come_from_the_launched_grid(monkeypatch, need_triton):
    """dalpha sums the partial rows of the programs actually launched: the autotuner's shared
    best_config (set here to another BLOCK, as another thread's launch would) is never read."""
    ema.bwd_kernel.autotuned.best_config = ema.CONFIGS[-1]  # BLOCK 4096
    monkeypatch.setattr(_launch, "pick", lambda name, kept: kept[0])  # BLOCK 512
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 5000, generator=g, dtype=torch.float64)
    alpha = torch.randn(3, generator=g, dtype=torch.float64)
    records = []
    monkeypatch.setattr(_launch, "records", records)
    v32, a32 = values.float().requires_grad_(True), alpha.float().requires_grad_(True)
    hilt_kernels.ema_depth_scan(v32, a32, backend="triton").sum().backward()
    vr, ar = values.clone().requires_grad_(True), alpha.clone().requires_grad_(True)
    naive.ema_depth_scan(vr, ar).sum().backward()
    assert_close(a32.grad, ar.grad, 1e-4, 1e-4, "dalpha")
    bwd = [r for r in records if r.name == "_ema_bwd_kernel"]
    assert bwd[0].config.kwargs["BLOCK"] == 512 and bwd[0].grid[0] == 10  # cdiv(5000, 512) partial rows


def test_no_allocation_for_a_missing_mask():
    q = torch.zeros(1, 4, 1, 8)
    kpm, strides, has = bla._kpm_args(None, q)
    assert kpm is q and strides == (0, 0) and not has
    scores = torch.zeros(1, 4, 2)
    m, *_rest, has = ap._mask_args(None, scores)
    assert m is scores and not has


def test_missing_backend_fails_with_cuda_unless_allowed(monkeypatch):
    """The conftest rule: with CUDA present a missing triton/cuda backend fails the test, unless
    HILT_ALLOW_MISSING_BACKENDS names it; without CUDA it skips."""
    monkeypatch.delenv("HILT_ALLOW_MISSING_BACKENDS", raising=False)
    with pytest.raises(pytest.fail.Exception, match="backend 'cuda' is missing"):
        skip_missing_backend("cuda", "no library", has_cuda=True)
    with pytest.raises(pytest.skip.Exception, match="no library"):
        skip_missing_backend("cuda", "no library", has_cuda=False)
    monkeypatch.setenv("HILT_ALLOW_MISSING_BACKENDS", "triton, cuda")
    with pytest.raises(pytest.skip.Exception):
        skip_missing_backend("cuda", "no library", has_cuda=True)
    monkeypatch.setenv("HILT_ALLOW_MISSING_BACKENDS", "cuda")
    with pytest.raises(pytest.fail.Exception, match="HILT_ALLOW_MISSING_BACKENDS=triton"):
        skip_missing_backend("triton", "not importable", has_cuda=True)


def test_triton_status_reports_the_interpreter_loop_bug(monkeypatch, need_triton):
    """Under the interpreter, triton < 3.8 with numpy >= 2.4 cannot run runtime-bound loops
    (triton#9171): triton_status says so (the reference backend is used) unless the probe passes."""
    import numpy
    import triton

    from hilt_kernels import dispatch
    from hilt_kernels.triton import _probe

    assert _probe.runtime_loop_works()  # here: triton >= 3.8, or the conftest shim
    status = dispatch.triton_status.__wrapped__
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_probe, "runtime_loop_works", lambda: False)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    reason = status()
    assert reason and "triton-lang/triton#9171" in reason and "3.6.0" in reason and "2.4.6" in reason
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert status() is None
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    assert status() is None
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert status() is None  # compiled kernels on a GPU are not affected
