"""CPU-runnable checks of the CUDA backend's build: nvcc compiles and links the torch-free library,
ctypes loads it, every launcher is exported, errors come back as codes + messages, and
``unavailable_reason()`` explains why the backend cannot run here. Skips where nvcc is absent."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from hilt_kernels.cuda import _build, _lib, build_check

NVCC = _build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA library cannot be built here")
ROOT = _build.repo_root()


@pytest.fixture(scope="module")
def library():
    """Path of the library built for the build check's archs (compiled once, cached in build/hilt_cuda/)."""
    if NVCC is None:
        pytest.skip("nvcc not found: the CUDA library cannot be built here")
    res = _build.build(archs=build_check.CHECK_ARCHS)
    assert res.ok, res.error
    return res.library


@pytest.fixture
def fresh_status(monkeypatch):
    """Clears the cached load/device status before and after (the test points HILT_CUDA_LIBRARY elsewhere)."""
    _lib.load.cache_clear()
    _lib.device_reason.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    _lib.load.cache_clear()
    _lib.device_reason.cache_clear()


@needs_nvcc
@pytest.mark.slow
def test_build_check_passes(library, capsys):
    """Compiles for sm_80 + sm_90 (objects cached: a full compile takes ~1-1.5 min on 2 cores), no spills,
    library loads and exports every launcher."""
    rc = build_check.main([])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASSED" in out
    for kernel in ("bla_fwd_kernel", "bla_bwd_dq_kernel", "bla_bwd_dkdv_kernel", "ema_fwd_kernel", "ema_bwd_kernel",
                   "ema_dalpha_kernel", "w2a_fwd_kernel", "w2a_bwd_kernel", "apool_fwd_kernel", "apool_bwd_kernel"):
        assert kernel in out, f"{kernel} missing from the ptxas table"
    assert "sm_80" in out and "sm_90" in out
    assert "blk/SM" in out and "(regs" in out  # the occupancy column


def test_build_check_skips_without_nvcc(monkeypatch, capsys):
    monkeypatch.setattr(_build, "find_nvcc", lambda: None)
    assert build_check.main([]) == 0
    assert "SKIPPED" in capsys.readouterr().out


@needs_nvcc
def test_library_exports_every_symbol(library):
    raw = ctypes.CDLL(library)
    missing = [name for name in _lib.SIGNATURES if not hasattr(raw, name)]
    assert not missing
    lib = _lib.bind(library)
    assert lib.hilt_abi_version() == _lib.ABI_VERSION
    assert set(_lib.LAUNCHERS) == {f"hilt_{op}_{d}" for op in ("bla", "ema", "w2a", "apool")
                                   for d in ("forward", "backward")}
    assert b"statically linked" in lib.hilt_build_info()
    assert b"archs sm_80 sm_90" in lib.hilt_build_info()  # the build note (archs built / dropped)


@needs_nvcc
def test_last_error_round_trips(library):
    lib = _lib.bind(library)
    lib.hilt_clear_error()
    assert _lib.last_error(lib) == ""
    assert lib.hilt_set_error_for_test(b"something went wrong: 42") != 0
    assert _lib.last_error(lib) == "something went wrong: 42"
    with pytest.raises(RuntimeError, match="something went wrong: 42"):
        _lib.check(lib, 1, "test call")


@needs_nvcc
def test_argument_errors_are_codes_not_crashes(library):
    lib = _lib.bind(library)
    s4 = _lib.int64s(1, 1, 1, 1)
    rc = lib.hilt_bla_forward(None, None, None, None, None, None, 1, 4, 1, 200, 2, s4, s4, s4, None, 1.0, 0, 1, 0, None)
    assert rc != 0 and "D=200 > 128" in _lib.last_error(lib)
    rc = lib.hilt_bla_forward(None, None, None, None, None, None, 1, 4, 1, 8, 0, s4, s4, s4, None, 1.0, 0, 1, 0, None)
    assert rc != 0 and "block_size" in _lib.last_error(lib)
    s5 = _lib.int64s(1, 1, 1, 1, 1)
    rc = lib.hilt_w2a_forward(None, None, None, None, 1, 1, 1, 1, s5, s5, s5, 1.0, 1, 7, 0, None)
    assert rc != 0 and "dtype" in _lib.last_error(lib)
    # empty problems succeed without touching the device
    assert lib.hilt_apool_forward(None, None, None, None, 0, 5, 2, 8, 2, s4, s4, None, 0, 0, 0, None) == 0
    # host-only helper: states (L*R*C) + partial sums (L * ceil(R / 8) * C with 32 columns per CTA)
    assert lib.hilt_ema_workspace_floats(3, 10, 64) == 3 * 10 * 64 + 3 * 2 * 64


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_launcher_without_gpu_returns_error(library):
    lib = _lib.bind(library)
    count = ctypes.c_int(7)
    assert lib.hilt_cuda_device_count(ctypes.byref(count)) != 0
    assert count.value == 0 and "cudaGetDeviceCount failed" in _lib.last_error(lib)
    fake = ctypes.c_void_p(256)  # never dereferenced: the launcher stops at cudaSetDevice
    s4, s5 = _lib.int64s(1, 1, 1, 1), _lib.int64s(1, 1, 1, 1, 1)
    for name, args in [
        ("hilt_bla_forward", (fake, fake, fake, None, fake, fake, 1, 4, 1, 8, 2, s4, s4, s4, None, 1.0, 0, 1, 0, None)),
        ("hilt_w2a_forward", (fake, fake, fake, fake, 1, 1, 1, 8, s5, s5, s5, 1.0, 1, 0, 0, None)),
    ]:
        rc = getattr(lib, name)(*args)
        assert rc != 0, name
        assert "cudaSetDevice" in _lib.last_error(lib), _lib.last_error(lib)


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_unavailable_reason_names_no_cuda_device(library, fresh_status):
    fresh_status.setenv("HILT_CUDA_LIBRARY", library)
    from hilt_kernels.cuda import unavailable_reason

    reason = unavailable_reason()
    assert reason is not None and "no CUDA device" in reason, reason


def test_unavailable_reason_names_missing_library(fresh_status, tmp_path):
    fresh_status.setenv("HILT_CUDA_LIBRARY", str(tmp_path / "nope.so"))
    from hilt_kernels.cuda import unavailable_reason

    reason = unavailable_reason()
    assert reason is not None and "not built" in reason and "nope.so" in reason


def test_unavailable_reason_names_broken_library(fresh_status, tmp_path):
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"not a shared library")
    fresh_status.setenv("HILT_CUDA_LIBRARY", str(bad))
    from hilt_kernels.cuda import unavailable_reason

    assert "failed to load" in unavailable_reason()


def test_parse_archs():
    assert _build.parse_archs("8.0;9.0+PTX") == [("80", False), ("90", True)]
    assert _build.parse_archs("sm_80, sm_90") == [("80", False), ("90", False)]
    assert _build.parse_archs("90a") == [("90a", False)]
    flags = _build.gencode_flags([("80", False), ("90", False)])
    assert flags == ["-gencode", "arch=compute_80,code=[sm_80]", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"]
    with pytest.raises(ValueError):
        _build.parse_archs("banana")


def test_ptxas_parser():
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]
"""
    (k,) = _build.parse_ptxas(text, "x.cu")
    assert (k.name, k.arch, k.registers, k.smem, k.stack, k.spill_stores, k.spill_loads) == (
        "_Z3fooPf", "sm_90", 40, 1024, 8, 4, 4)


def test_setup_py_is_torch_free():
    from tests.torch_free import run_without_torch

    src = open(os.path.join(ROOT, "setup.py")).read()
    assert not any(line.strip().startswith(("import torch", "from torch")) for line in src.splitlines())
    run_without_torch(os.path.join(ROOT, "hilt_kernels", "cuda", "_build.py"), "m.archs_from_env()")
