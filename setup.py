"""Build script: the pure-Python packages plus the torch-free CUDA library.

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

A wheel that carries the library is tagged as a platform wheel (``py3-none-<platform>``: the library
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


def _load_build_module():
    spec = importlib.util.spec_from_file_location("_hilt_cuda_build", os.path.join(PKG_CUDA, "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    print(f"hilt: {msg}", file=sys.stderr, flush=True)


def _record(status: str) -> None:
    d = os.path.join(HERE, "build", "hilt_cuda")
    try:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "status.txt"), "w") as fh:
            fh.write(status + "\n")
    except OSError:
        pass


_DONE: list[bool] = []


def build_cuda_library() -> None:
    """Compile csrc/ into hilt_kernels/cuda/_hilt_cuda.so (once per setup.py process)."""
    if _DONE:
        return
    _DONE.append(True)
    b = _load_build_module()
    target = os.path.join(PKG_CUDA, b.LIB_NAME)
    force = _truthy("HILT_FORCE_CUDA_BUILD")

    def not_built(why: str) -> None:
        if force:
            raise SystemExit(f"hilt: HILT_FORCE_CUDA_BUILD=1 but the CUDA library cannot be built: {why}")
        if os.path.exists(target):
            os.remove(target)  # never leave a stale library from older sources
        _record(why)
        _say(f"the CUDA backend was NOT built ({why}); installing the pure-Python package "
             "(reference and triton backends).")

    if _truthy("HILT_SKIP_CUDA_BUILD") and not force:
        not_built("HILT_SKIP_CUDA_BUILD=1 was set at install time")
        return
    if not b.sources():
        not_built("csrc/ has no CUDA sources")
        return
    if b.find_nvcc() is None:
        not_built("nvcc was not found at install time (not on PATH, no CUDA_HOME/bin/nvcc)")
        return
    try:
        archs = b.archs_from_env()
    except ValueError as e:
        not_built(f"bad arch list: {e}")
        return
    res = b.build(log=_say)
    if not res.ok:
        _say(res.error)
        not_built("nvcc failed to compile or link csrc/ (the error is printed above)")
        return
    tmp = target + ".tmp"
    shutil.copyfile(res.library, tmp)
    os.replace(tmp, target)
    archs_s = ", ".join(f"sm_{a}" for a, _ in res.archs)
    dropped = f"; dropped {', '.join(res.dropped)} (not supported by this nvcc)" if res.dropped else ""
    _record(f"built for {archs_s}{dropped} from {res.library}")
    _say(f"built the CUDA library {target} for {archs_s}{dropped} in {res.seconds:.0f} s "
         f"({len(res.compiled)} source(s) compiled, the rest reused).")


class BuildPyWithCuda(build_py):
    """build_py that first compiles the CUDA library in place and ships it with the package."""

    def run(self):
        build_cuda_library()
        super().run()
        so = os.path.join(PKG_CUDA, "_hilt_cuda.so")
        if not getattr(self, "editable_mode", False) and os.path.isfile(so):
            dest = os.path.join(self.build_lib, "hilt_kernels", "cuda")
            os.makedirs(dest, exist_ok=True)
            shutil.copyfile(so, os.path.join(dest, "_hilt_cuda.so"))

    def get_outputs(self, include_bytecode=1):
        outs = super().get_outputs(include_bytecode)
        so = os.path.join(self.build_lib, "hilt_kernels", "cuda", "_hilt_cuda.so")
        return outs + ([so] if os.path.isfile(os.path.join(PKG_CUDA, "_hilt_cuda.so")) else [])


class PlatformWheel(bdist_wheel):
    """A wheel carrying _hilt_cuda.so is a platform wheel (py3-none-<plat>), else a pure one."""

    def finalize_options(self):
        super().finalize_options()
        if os.path.isfile(os.path.join(PKG_CUDA, "_hilt_cuda.so")):
            self.root_is_pure = False

    def run(self):
        build_cuda_library()  # before the purity decision (build_py would only run later)
        self.root_is_pure = not os.path.isfile(os.path.join(PKG_CUDA, "_hilt_cuda.so"))
        super().run()

    def get_tag(self):
        python, abi, plat = super().get_tag()
        if self.root_is_pure:
            return python, abi, plat
        return "py3", "none", plat


setup(cmdclass={"build_py": BuildPyWithCuda, "bdist_wheel": PlatformWheel})
