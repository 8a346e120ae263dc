"""ctypes binding of the torch-free CUDA library ``_hilt_cuda.so`` (csrc/, built by setup.py).

Torch-free: importable without torch (build_check and the CPU tests use it). Every launcher returns
an int (0 = success) and leaves a message in ``hilt_last_error()`` on failure.
"""

from __future__ import annotations

import ctypes
import functools
import os

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


def _not_built_reason(path: str) -> str:
    why = None
    try:
        with open(build_status_path()) as fh:
            why = fh.read().strip() or None
    except OSError:
        pass
    if why is None:
        from ._build import find_nvcc

        why = ("nvcc is not on PATH here, so setup.py could not compile it" if find_nvcc() is None
               else "setup.py did not build it; reinstall with `pip install --no-build-isolation -e .`")
    return f"the CUDA library is not built ({path} does not exist): {why}"


def bind(path: str) -> ctypes.CDLL:
    """Load ``path`` and declare every signature; raises OSError / AttributeError / RuntimeError."""
    lib = ctypes.CDLL(path)
    for name, (res, args) in SIGNATURES.items():
        fn = getattr(lib, name)  # AttributeError names a missing symbol
        fn.restype = res
        fn.argtypes = args
    abi = lib.hilt_abi_version()
    if abi != ABI_VERSION:
        raise RuntimeError(f"ABI version {abi} != {ABI_VERSION} expected by this Python package (rebuild it)")
    return lib


@functools.lru_cache(maxsize=None)
def load() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why it cannot be loaded)."""
    path = library_path()
    if not os.path.isfile(path):
        return None, _not_built_reason(path)
    try:
        return bind(path), None
    except OSError as e:
        return None, f"the CUDA library {path} failed to load ({e})"
    except AttributeError as e:
        return None, f"the CUDA library {path} lacks a symbol ({e}); rebuild it"
    except RuntimeError as e:
        return None, f"the CUDA library {path} is unusable: {e}"


def last_error(lib) -> str:
    msg = lib.hilt_last_error()
    return msg.decode(errors="replace") if msg else ""


@functools.lru_cache(maxsize=None)
def device_reason() -> str | None:
    """None when the library sees at least one CUDA device, else why not (library loaded)."""
    lib, why = load()
    if lib is None:
        return why
    count = ctypes.c_int(0)
    rc = lib.hilt_cuda_device_count(ctypes.byref(count))
    if rc != 0:
        return f"no CUDA device is usable by the CUDA library ({last_error(lib)})"
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
