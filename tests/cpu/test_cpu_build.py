"""The CPU library's build (hilt_kernels/cpu/_build.py, used by setup.py): torch-free, a loadable
library from csrc/cpu/, and a clear failure without a working compiler."""
from __future__ import annotations

import importlib.util
import os

import pytest

from hilt_kernels.cpu import _build, _lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_build_module_is_torch_free():
    from tests.torch_free import run_without_torch

    assert int(run_without_torch(os.path.join(ROOT, "hilt_kernels", "cpu", "_build.py"), "len(m.sources())")) >= 1


def test_build_gives_a_loadable_library(tmp_path):
    if _build.find_cxx() is None:
        pytest.skip("no C++ compiler here")
    res = _build.build(out_dir=str(tmp_path), log=lambda _msg: None)
    assert res.ok, res.error
    assert os.path.isfile(res.library) and res.library.endswith(_build.LIB_NAME)
    lib = _lib.bind(res.library)
    assert lib.hilt_cpu_abi_version() == _lib.ABI_VERSION
    assert lib.hilt_ilt_weights_floats(8, 4, 16, 1) > 0
    assert not [f for f in os.listdir(tmp_path) if f != _build.LIB_NAME]  # no temporary file left behind


def test_build_failures_say_why(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    res = _build.build(out_dir=str(tmp_path), log=lambda _msg: None)
    assert not res.ok and "no C++ compiler" in res.error
    if os.path.isfile("/bin/false"):
        monkeypatch.setenv("CXX", "/bin/false")
        res = _build.build(out_dir=str(tmp_path), log=lambda _msg: None)
        assert not res.ok and res.command.startswith("/bin/false")
        assert not os.listdir(tmp_path)  # the failed output was removed


def test_setup_py_builds_or_records_why(tmp_path, monkeypatch):
    """setup.py's build_cpu_library: HILT_SKIP_CPU_BUILD records the reason where the library's loader
    finds it, and HILT_FORCE_CPU_BUILD turns a failure into an error."""
    spec = importlib.util.spec_from_file_location("hilt_setup_under_test", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    spec.loader.exec_module(mod)
    fake_pkg = tmp_path / "hilt_kernels" / "cpu"
    fake_pkg.mkdir(parents=True)
    (fake_pkg / "_build.py").write_text(open(os.path.join(ROOT, "hilt_kernels", "cpu", "_build.py")).read())
    (fake_pkg / "_hilt_cpu.so").write_text("stale")
    monkeypatch.setattr(mod, "HERE", str(tmp_path))
    monkeypatch.setattr(mod, "PKG_CPU", str(fake_pkg))
    monkeypatch.setenv("HILT_SKIP_CPU_BUILD", "1")
    mod.build_cpu_library()
    assert not (fake_pkg / "_hilt_cpu.so").exists()  # never a stale library
    assert "HILT_SKIP_CPU_BUILD=1" in (tmp_path / "build" / "hilt_cpu" / "status.txt").read_text()
    mod._CPU_DONE.clear()
    monkeypatch.setenv("HILT_FORCE_CPU_BUILD", "1")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(SystemExit, match="HILT_FORCE_CPU_BUILD=1 but the CPU library cannot be built"):
        mod.build_cpu_library()
