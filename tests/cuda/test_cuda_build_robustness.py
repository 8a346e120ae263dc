"""Build robustness of the CUDA backend (CPU-only, fast): TORCH_CUDA_ARCH_LIST names and archs the
toolkit cannot build, extra defines (launch-bounds variants), the build note compiled into the
library, driver/runtime reporting for ``hilt info``, the platform wheel tag, and build_check's
occupancy (blocks per SM) arithmetic."""

from __future__ import annotations

import os
import runpy

import pytest

from hilt_kernels.cuda import _build, _lib, build_check

ROOT = _build.repo_root()


@pytest.mark.parametrize("spec, want", [
    ("Hopper", [("90", False)]),
    ("Ampere+PTX", [("80", False), ("86", True)]),
    ("volta;Turing;8.0;9.0+PTX", [("70", False), ("75", False), ("80", False), ("90", True)]),
    ("sm_80,compute_90", [("80", False), ("90", False)]),
])
def test_parse_archs_maps_names(spec, want):
    assert _build.parse_archs(spec) == want


def test_parse_archs_rejects_garbage():
    with pytest.raises(ValueError, match="cannot parse CUDA arch"):
        _build.parse_archs("Fermi")


def test_filter_archs_drops_what_the_toolkit_cannot_build():
    supported = ("75", "80", "86", "89", "90", "100", "120")
    keep, dropped = _build.filter_archs(_build.parse_archs("6.1;7.0;7.5;8.0;8.0;9.0+PTX"), supported)
    assert keep == [("75", False), ("80", False), ("90", True)]
    assert dropped == ["sm_61", "sm_70"]
    assert _build.filter_archs([("70", False)], None) == ([("70", False)], [])  # nvcc could not tell: keep
    with pytest.raises(ValueError, match="none of the requested archs.*sm_75 and newer"):
        _build.filter_archs(_build.parse_archs("Volta;Pascal"), supported)


@pytest.mark.skipif(_build.find_nvcc() is None, reason="nvcc not found")
def test_nvcc_reports_its_archs():
    archs = _build.nvcc_archs(_build.find_nvcc())
    assert archs and "90" in archs
    if _build.nvcc_version(_build.find_nvcc()).startswith("13"):
        assert "70" not in archs  # CUDA 13 dropped sm_70 and older


def test_build_fails_cleanly_when_no_arch_is_left(monkeypatch):
    monkeypatch.setattr(_build, "nvcc_archs", lambda nvcc: ("80", "90"))
    monkeypatch.setattr(_build, "find_nvcc", lambda: "/nonexistent/nvcc")
    res = _build.build(archs=[("70", False)], log=lambda m: None)
    assert not res.ok and "none of the requested archs (sm_70)" in res.error


def test_build_note_names_dropped_archs_and_defines():
    note = _build.build_note("13.0 (V13.0.88)", [("80", False), ("90", True)], ["sm_70"],
                             ["-DHILT_BLA_BWD_MIN_BLOCKS=2"])
    assert note == ("nvcc 13.0; archs sm_80 sm_90; dropped sm_70 (not supported by this nvcc); "
                    "defines HILT_BLA_BWD_MIN_BLOCKS=2")
    assert "," not in _build.build_note("13.0", [("80", False)], ["sm_60", "sm_70"], [])


def test_extra_defines(monkeypatch):
    monkeypatch.setenv("HILT_CUDA_DEFINES", "HILT_BLA_BWD_MIN_BLOCKS=2; HILT_APOOL_BWD_MIN_BLOCKS=2")
    assert _build.extra_defines() == ["-DHILT_BLA_BWD_MIN_BLOCKS=2", "-DHILT_APOOL_BWD_MIN_BLOCKS=2"]
    monkeypatch.setenv("HILT_CUDA_DEFINES", "X=$(rm -rf /)")
    with pytest.raises(ValueError, match="HILT_CUDA_DEFINES"):
        _build.extra_defines()


class _FakeLib:
    """Stands in for the ctypes library: runtime / driver versions."""

    def __init__(self, runtime, driver):
        self.runtime, self.driver = runtime, driver

    def hilt_cuda_runtime_version(self):
        return self.runtime

    def hilt_cuda_driver_version(self, ptr):
        if self.driver is None:
            return 2
        ptr._obj.value = self.driver
        return 0

    def hilt_build_info(self):
        return b"hilt CUDA library, ABI 1; nvcc 13.0; archs sm_80 sm_90; dropped sm_70 (not supported by this nvcc)"


def test_driver_too_old_is_explained():
    lib = _FakeLib(13000, 12040)
    why = _lib.driver_problem(lib, "12.4")
    assert "driver supports CUDA 12.4" in why and "CUDA 13.0 runtime" in why and "580" in why
    assert "torch.version.cuda (12.4 here)" in why and "HILT_FORCE_CUDA_BUILD=1" in why
    assert _lib.driver_problem(_FakeLib(13000, 13010)) is None
    assert "no NVIDIA driver" in _lib.driver_problem(_FakeLib(13000, None))


def test_describe_shows_runtime_driver_and_dropped_archs(monkeypatch):
    monkeypatch.setattr(_lib, "load", lambda: (_FakeLib(13000, 12080), None))
    lines = "\n".join(_lib.describe("12.8"))
    assert "CUDA runtime 13.0 (static), driver supports 12.8" in lines
    assert "dropped sm_70" in lines and "driver problem:" in lines


def test_hilt_info_has_the_cuda_lines():
    from hilt.info import report

    text = report()
    assert "cuda library:" in text


def test_wheel_with_the_library_is_a_platform_wheel(monkeypatch):
    import setuptools
    from setuptools.dist import Distribution

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    wheel_cls = captured["cmdclass"]["bdist_wheel"]
    libs = [os.path.join(ROOT, "hilt_kernels", "cuda", _build.LIB_NAME),
            os.path.join(ROOT, "hilt_kernels", "cpu", "_hilt_cpu.so")]
    cmd = wheel_cls(Distribution({"name": "hilt", "version": "0"}))
    cmd.initialize_options()
    cmd.finalize_options()
    if any(os.path.isfile(so) for so in libs):
        assert not cmd.root_is_pure
        python, abi, plat = cmd.get_tag()
        assert (python, abi) == ("py3", "none") and plat not in ("any", "")
    else:
        assert cmd.root_is_pure


def test_launch_bounds_are_read_from_the_sources(monkeypatch):
    lb = build_check.launch_bounds()
    for k in ("bla_fwd_kernel", "bla_bwd_dq_kernel", "bla_bwd_dkdv_kernel", "apool_bwd_kernel", "ema_bwd_kernel",
              "w2a_fwd_kernel"):
        assert lb[k][0] == 256, k
    assert lb["bla_bwd_dq_kernel"][1] == 1 and lb["apool_bwd_kernel"][1] == 1
    monkeypatch.setenv("HILT_CUDA_DEFINES", "HILT_BLA_BWD_MIN_BLOCKS=2")
    lb2 = build_check.launch_bounds()
    assert lb2["bla_bwd_dq_kernel"][1] == 2 and lb2["bla_bwd_dkdv_kernel"][1] == 2 and lb2["apool_bwd_kernel"][1] == 1


@pytest.mark.parametrize("arch, regs, smem, dyn, want", [
    ("sm_90", 168, 9216, 0, (1, "regs")),    # 168 regs x 256 threads: 1 CTA (12 warps by registers)
    ("sm_90", 128, 0, 0, (2, "regs")),       # 128 regs: 2 CTAs
    ("sm_90", 32, 0, 0, (8, "threads")),     # 8 x 256 threads = 2048
    ("sm_80", 40, 60000, 0, (2, "smem")),    # 2 x (60000 + 1 KiB) fit in 164 KiB, 3 do not
    ("sm_90", 40, 0, 98304, (2, "smem")),    # attention_pool backward, 1024 shared heads: 96 KiB dynamic
])
def test_blocks_per_sm(arch, regs, smem, dyn, want):
    k = _build.KernelInfo("k", arch, registers=regs, smem=smem)
    assert build_check.blocks_per_sm(k, 256, dyn) == want


def test_launch_ctx_under_the_emulator(monkeypatch):
    import torch

    from hilt_kernels.cuda._torch import launch_ctx

    monkeypatch.setenv("HILT_CUDA_EMULATOR", "1")
    t = torch.zeros(3)
    assert launch_ctx(t) == (0, None)  # CPU tensor: device 0, stream 0 (no torch.cuda call)
    monkeypatch.setenv("HILT_CUDA_EMULATOR_DEVICE", "1")
    assert launch_ctx(t) == (1, None)


def test_missing_cuda_library_fails_on_a_gpu_machine(monkeypatch):
    """With a CUDA device present, a missing CUDA library fails the GPU tests (the one rule of
    tests/conftest.py) instead of skipping them, unless HILT_ALLOW_MISSING_BACKENDS names cuda."""
    import torch

    import hilt_kernels.cuda as hk_cuda
    import tests.conftest as root_conftest
    from tests.cuda.conftest import cuda_backend_or_skip

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hk_cuda, "unavailable_reason", lambda: "library not built")
    monkeypatch.setattr(root_conftest, "HAS_CUDA", True)
    monkeypatch.delenv("HILT_ALLOW_MISSING_BACKENDS", raising=False)
    with pytest.raises(pytest.fail.Exception, match="library not built"):
        cuda_backend_or_skip()
    monkeypatch.setenv("HILT_ALLOW_MISSING_BACKENDS", "cuda")
    with pytest.raises(pytest.skip.Exception, match="cuda backend unavailable: library not built"):
        cuda_backend_or_skip()
