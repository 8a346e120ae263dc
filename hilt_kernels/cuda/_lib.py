"""ctypes binding of the torch-free CUDA library ``_hilt_cuda.so`` (csrc/, built by setup.py).

Torch-free: importable without torch (build_check and the CPU tests use it). Every launcher returns
an int (0 = success) and leaves a message in ``hilt_last_error()`` on failure.
"""

from __future__ import annotations

import ctypes
import functools
import os

from .. import _native
from .._native import recorded_status
from ._build import LIB_NAME, repo_root

ABI_VERSION = 1

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_i64p = ctypes.POINTER(ctypes.c_int64)
_i = ctypes.c_int
_f = ctypes.c_float

# name -> (restype, argtypes). Pointers to int64 are stride arrays (see the csrc/ launchers' comments).
SIGNATURES: dict[str, tuple] = {
    "hilt_abi_version": (_i, []),
    "hilt_build_info": (ctypes.c_char_p, []),
    "hilt_last_error": (ctypes.c_char_p, []),
    "hilt_clear_error": (None, []),
    "hilt_set_error_for_test": (_i, [ctypes.c_char_p]),
    "hilt_cuda_runtime_version": (_i, []),
    "hilt_cuda_driver_version": (_i, [ctypes.POINTER(_i)]),
    "hilt_cuda_device_count": (_i, [ctypes.POINTER(_i)]),
    # block_local_attention
    "hilt_bla_forward": (_i, [_p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64,
                              _i64p, _i64p, _i64p, _i64p, _f, _i, _i, _i, _p]),
    "hilt_bla_backward": (_i, [_p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64,
                               _i64p, _i64p, _i64p, _i64p, _i64p, _i64p, _f, _i, _i, _i, _p]),
    # ema_depth_scan
    "hilt_ema_workspace_floats": (_i64, [_i64, _i64, _i64]),
    "hilt_ema_forward": (_i, [_p, _p, _p, _p, _i64, _i64, _i64, _i64p, _i64p, _i, _i, _i, _i, _p]),
    "hilt_ema_backward": (_i, [_p, _p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64p, _i64p, _i64p,
                               _i, _i, _i, _i, _p]),
    # window2_attention
    "hilt_w2a_forward": (_i, [_p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64p, _i64p, _i64p, _f, _i, _i, _i, _p]),
    "hilt_w2a_backward": (_i, [_p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64p, _i64p, _i64p, _i64p,
                               _f, _i, _i, _i, _p]),
    # attention_pool
    "hilt_apool_forward": (_i, [_p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64p, _i64p, _i64p, _i, _i, _i, _p]),
    "hilt_apool_backward": (_i, [_p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64p, _i64p, _i64p,
                                 _i64p, _i64p, _i, _i, _i, _i, _p]),
}

LAUNCHERS = [n for n in SIGNATURES if n.endswith(("_forward", "_backward"))]


def library_path() -> str:
    """``$HILT_CUDA_LIBRARY`` if set, else ``hilt_kernels/cuda/_hilt_cuda.so``."""
    return os.environ.get("HILT_CUDA_LIBRARY") or os.path.join(os.path.dirname(os.path.abspath(__file__)), LIB_NAME)


def build_status_path() -> str:
    """Where setup.py records why the library was (not) built (source checkouts only)."""
    return os.path.join(repo_root(), "build", "hilt_cuda", "status.txt")


def _not_built_reason() -> str:
    why = recorded_status(build_status_path())
    if why is None:
        from ._build import find_nvcc

        why = ("nvcc is not on PATH here, so setup.py could not compile it" if find_nvcc() is None
               else "setup.py did not build it; reinstall with `pip install --no-build-isolation -e .`")
    return why


def bind(path: str) -> ctypes.CDLL:
    """Load ``path`` and declare every signature; raises OSError / AttributeError / RuntimeError."""
    return _native.bind(path, SIGNATURES, "hilt_abi_version", ABI_VERSION)


@functools.lru_cache(maxsize=None)
def load() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why it cannot be loaded)."""
    return _native.load(library_path(), "the CUDA library", bind, _not_built_reason)


def last_error(lib) -> str:
    msg = lib.hilt_last_error()
    return msg.decode(errors="replace") if msg else ""


def cuda_version_str(v: int) -> str:
    """12040 -> "12.4"."""
    return f"{v // 1000}.{v % 1000 // 10}"


def driver_version(lib) -> int:
    """The CUDA version the installed driver supports (e.g. 12040), 0 when there is no driver."""
    v = ctypes.c_int(0)
    return v.value if lib.hilt_cuda_driver_version(ctypes.byref(v)) == 0 else 0


def driver_problem(lib, torch_cuda: str | None = None) -> str | None:
    """Why the driver cannot run this library (None: no driver problem detected)."""
    runtime, driver = lib.hilt_cuda_runtime_version(), driver_version(lib)
    if driver == 0:
        return "no NVIDIA driver is installed (cudaDriverGetVersion failed)"
    if driver < runtime:
        match = f" ({torch_cuda} here)" if torch_cuda else ""
        return (f"the NVIDIA driver supports CUDA {cuda_version_str(driver)}, but the library links the CUDA "
                f"{cuda_version_str(runtime)} runtime statically, which needs a newer driver (CUDA 13: the 580 "
                f"series or newer). Upgrade the driver, or rebuild hilt with the CUDA toolkit matching "
                f"torch.version.cuda{match}: HILT_FORCE_CUDA_BUILD=1 CUDA_HOME=<that toolkit> "
                f"pip install --no-build-isolation -e .")
    return None


def describe(torch_cuda: str | None = None) -> list[str]:
    """Lines for ``hilt info``: library path, build info (archs built / dropped), runtime and driver."""
    lib, why = load()
    if lib is None:
        return [f"cuda library: not loaded: {why}"]
    lines = [f"cuda library: {library_path()}", f"  {lib.hilt_build_info().decode(errors='replace')}"]
    runtime, driver = lib.hilt_cuda_runtime_version(), driver_version(lib)
    lines.append(f"  CUDA runtime {cuda_version_str(runtime)} (static), driver supports "
                 + (cuda_version_str(driver) if driver else "nothing (no driver)"))
    problem = driver_problem(lib, torch_cuda)
    if problem:
        lines.append(f"  driver problem: {problem}")
    return lines


@functools.lru_cache(maxsize=None)
def device_reason() -> str | None:
    """None when the library sees at least one CUDA device, else why not (library loaded)."""
    lib, why = load()
    if lib is None:
        return why
    count = ctypes.c_int(0)
    rc = lib.hilt_cuda_device_count(ctypes.byref(count))
    if rc != 0:
        why = f"no CUDA device is usable by the CUDA library ({last_error(lib)})"
        problem = driver_problem(lib)
        return why + (f"; {problem}" if problem and "no NVIDIA driver" not in problem else "")
    if count.value == 0:
        return "no CUDA device (cudaGetDeviceCount found 0 devices)"
    return None


def get() -> ctypes.CDLL:
    lib, why = load()
    if lib is None:
        raise RuntimeError(why)
    return lib


def check(lib, rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"hilt CUDA {what} failed (code {rc}): {last_error(lib)}")


def strides(t) -> ctypes.Array:
    """The element strides of a tensor as a C int64 array."""
    s = t.stride()
    return (ctypes.c_int64 * max(len(s), 1))(*s)


def int64s(*vals) -> ctypes.Array:
    return (ctypes.c_int64 * len(vals))(*vals)
