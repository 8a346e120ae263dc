"""Build script: the pure-Python packages plus two torch-free libraries, CUDA and CPU.

The CUDA kernels in csrc/ are compiled by nvcc alone — no torch headers, torch is never imported —
into one shared library, ``hilt_kernels/cuda/_hilt_cuda.so`` (C ABI, CUDA runtime linked
statically), loaded with ctypes, so it works with any torch version. The build logic lives in
``hilt_kernels/cuda/_build.py`` (standard library only, loaded here by path).

The library is compiled in the ``build_py`` step, in place into ``hilt_kernels/cuda/`` (so editable
installs find it) and copied into the wheel for regular installs. Environment:

* ``HILT_CUDA_ARCHS`` / ``TORCH_CUDA_ARCH_LIST``: target archs (default sm_80 and sm_90; names such
  as "Hopper" are mapped, archs this nvcc cannot build are dropped and named by ``hilt info``);
* ``HILT_CUDA_DEFINES``: extra ``-D`` macros (the launch-bounds variants of csrc/);
* ``MAX_JOBS``: parallel nvcc processes (default: the CPU count);
* ``HILT_SKIP_CUDA_BUILD=1``: do not build it; ``HILT_FORCE_CUDA_BUILD=1``: fail if it cannot be built.

Without nvcc (or when the compile fails and the build is not forced) the pure-Python package is
installed and the reason is printed once, and recorded in ``build/hilt_cuda/status.txt``, which
``hilt_kernels.cuda.unavailable_reason()`` reports.

The CPU library (``csrc/cpu/*.cpp`` -> ``hilt_kernels/cpu/_hilt_cpu.so``, fused decoding steps, logic in
``hilt_kernels/cpu/_build.py``) is compiled the same way with the system C++ compiler (``$CXX``, else
c++/g++/clang++; extra flags in ``HILT_CPU_CXXFLAGS``); ``HILT_SKIP_CPU_BUILD=1`` skips it,
``HILT_FORCE_CPU_BUILD=1`` fails the install when it cannot be built. Without it the same steps run through
PyTorch ops; the reason is recorded in ``build/hilt_cpu/status.txt`` and shown by ``hilt info``.

A wheel that carries a library is tagged as a platform wheel (``py3-none-<platform>``: the library
is torch- and Python-version independent, but it is a Linux x86-64/aarch64 binary); without it the
wheel stays pure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

try:  # setuptools >= 70.1 ships bdist_wheel; older ones use the wheel package's
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover
    from wheel.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_CUDA = os.path.join(HERE, "hilt_kernels", "cuda")
PKG_CPU = os.path.join(HERE, "hilt_kernels", "cpu")
LIBS = (("cuda", "_hilt_cuda.so"), ("cpu", "_hilt_cpu.so"))  # (subpackage, file) of each compiled library


def _load_build_module(pkg: str = PKG_CUDA, name: str = "_hilt_cuda_build"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(pkg, "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    print(f"hilt: {msg}", file=sys.stderr, flush=True)


def _record(status: str, which: str = "hilt_cuda") -> None:
    d = os.path.join(HERE, "build", which)
    try:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "status.txt"), "w") as fh:
            fh.write(status + "\n")
    except OSError:
        pass


_DONE: list[bool] = []


class _LibraryBuild:
    """The bookkeeping both library builds share: HILT_SKIP_*/HILT_FORCE_*_BUILD, the status file that
    ``hilt info`` reads, never leaving a stale library behind, and the atomic install of a new one."""

    def __init__(self, kind: str, target: str, status_dir: str, env: str, fallback: str) -> None:
        self.kind, self.target, self.status_dir, self.fallback = kind, target, status_dir, fallback
        self.skip_var, self.force_var = f"HILT_SKIP_{env}_BUILD", f"HILT_FORCE_{env}_BUILD"
        self.force = _truthy(self.force_var)

    def skipped(self) -> bool:
        if _truthy(self.skip_var) and not self.force:
            self.not_built(f"{self.skip_var}=1 was set at install time")
            return True
        return False

    def not_built(self, why: str) -> None:
        if self.force:
            raise SystemExit(f"hilt: {self.force_var}=1 but the {self.kind} cannot be built: {why}")
        if os.path.exists(self.target):
            os.remove(self.target)  # never leave a stale library from older sources
        _record(why, self.status_dir)
        _say(f"the {self.kind} was NOT built ({why}); {self.fallback}")

    def install(self, built: str, status: str) -> None:
        tmp = self.target + ".tmp"
        shutil.copyfile(built, tmp)
        os.replace(tmp, self.target)
        _record(status, self.status_dir)


def build_cuda_library() -> None:
    """Compile csrc/ into hilt_kernels/cuda/_hilt_cuda.so (once per setup.py process)."""
    if _DONE:
        return
    _DONE.append(True)
    b = _load_build_module()
    target = os.path.join(PKG_CUDA, b.LIB_NAME)
    job = _LibraryBuild("CUDA backend", target, "hilt_cuda", "CUDA",
                        "installing the pure-Python package (reference and triton backends).")
    if job.skipped():
        return
    if not b.sources():
        job.not_built("csrc/ has no CUDA sources")
        return
    if b.find_nvcc() is None:
        job.not_built("nvcc was not found at install time (not on PATH, no CUDA_HOME/bin/nvcc)")
        return
    try:
        b.archs_from_env()
    except ValueError as e:
        job.not_built(f"bad arch list: {e}")
        return
    res = b.build(log=_say)
    if not res.ok:
        _say(res.error)
        job.not_built("nvcc failed to compile or link csrc/ (the error is printed above)")
        return
    archs_s = ", ".join(f"sm_{a}" for a, _ in res.archs)
    dropped = f"; dropped {', '.join(res.dropped)} (not supported by this nvcc)" if res.dropped else ""
    job.install(res.library, f"built for {archs_s}{dropped} from {res.library}")
    _say(f"built the CUDA library {target} for {archs_s}{dropped} in {res.seconds:.0f} s "
         f"({len(res.compiled)} source(s) compiled, the rest reused).")


_CPU_DONE: list[bool] = []


def build_cpu_library() -> None:
    """Compile csrc/cpu/ into hilt_kernels/cpu/_hilt_cpu.so (once per setup.py process)."""
    if _CPU_DONE:
        return
    _CPU_DONE.append(True)
    b = _load_build_module(PKG_CPU, "_hilt_cpu_build")
    target = os.path.join(PKG_CPU, b.LIB_NAME)
    job = _LibraryBuild("CPU library", target, "hilt_cpu", "CPU",
                        "the fused CPU decoding steps will run as PyTorch ops.")
    if job.skipped():
        return
    res = b.build(log=_say)
    if not res.ok:
        _say(res.error)
        job.not_built("the C++ compiler failed on csrc/cpu/ (the error is printed above)" if res.command else res.error)
        return
    job.install(res.library, f"built {res.library} with: {res.command}")
    _say(f"built the CPU library {target} in {res.seconds:.1f} s.")


def _built_libraries() -> list[tuple[str, str]]:
    return [(pkg, name) for pkg, name in LIBS if os.path.isfile(os.path.join(HERE, "hilt_kernels", pkg, name))]


class BuildPyWithCuda(build_py):
    """build_py that first compiles the CUDA and CPU libraries in place and ships them with the package."""

    def run(self):
        build_cuda_library()
        build_cpu_library()
        super().run()
        if not getattr(self, "editable_mode", False):
            for pkg, name in _built_libraries():
                dest = os.path.join(self.build_lib, "hilt_kernels", pkg)
                os.makedirs(dest, exist_ok=True)
                shutil.copyfile(os.path.join(HERE, "hilt_kernels", pkg, name), os.path.join(dest, name))

    def get_outputs(self, include_bytecode=1):
        outs = super().get_outputs(include_bytecode)
        return outs + [os.path.join(self.build_lib, "hilt_kernels", pkg, name) for pkg, name in _built_libraries()]


class PlatformWheel(bdist_wheel):
    """A wheel carrying a compiled library is a platform wheel (py3-none-<plat>), else a pure one."""

    def finalize_options(self):
        super().finalize_options()
        if _built_libraries():
            self.root_is_pure = False

    def run(self):
        build_cuda_library()  # before the purity decision (build_py would only run later)
        build_cpu_library()
        self.root_is_pure = not _built_libraries()
        super().run()

    def get_tag(self):
        python, abi, plat = super().get_tag()
        if self.root_is_pure:
            return python, abi, plat
        return "py3", "none", plat


setup(cmdclass={"build_py": BuildPyWithCuda, "bdist_wheel": PlatformWheel})
