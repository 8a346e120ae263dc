"""ctypes binding of the torch-free CPU library ``_hilt_cpu.so`` (``csrc/cpu/``, built by setup.py).

Importable without torch. ``load()`` returns (library, None) or (None, why it cannot be used).
``HILT_CPU_KERNELS=0`` turns the library off (everything then runs through PyTorch ops);
``HILT_CPU_LIBRARY`` points at another build of it.
"""

from __future__ import annotations

import ctypes
import functools
import os

from .. import _native
from .._native import recorded_status
from ._build import LIB_NAME, find_cxx, repo_root

ABI_VERSION = 1

_p = ctypes.c_void_p
_i64 = ctypes.c_int64

SIGNATURES: dict[str, tuple] = {
    "hilt_cpu_abi_version": (ctypes.c_int, []),
    "hilt_ilt_weights_floats": (_i64, [_i64, _i64, _i64, _i64]),
    # prev, cur, base, out, scale (float*, may be NULL), weights, n, d, I, H, F, L, causal
    "hilt_ilt_step_f32": (ctypes.c_int, [_p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64, ctypes.c_int]),
}


def library_path() -> str:
    """``$HILT_CPU_LIBRARY`` if set, else ``hilt_kernels/cpu/_hilt_cpu.so``."""
    return os.environ.get("HILT_CPU_LIBRARY") or os.path.join(os.path.dirname(os.path.abspath(__file__)), LIB_NAME)


def build_status_path() -> str:
    """Where setup.py records why the library was (not) built (source checkouts only)."""
    return os.path.join(repo_root(), "build", "hilt_cpu", "status.txt")


def _not_built_reason() -> str:
    why = recorded_status(build_status_path())
    if why is None:
        why = ("no C++ compiler was found, so setup.py could not compile it" if find_cxx() is None
               else "setup.py did not build it; reinstall with `pip install --no-build-isolation -e .`")
    return why


def disabled() -> bool:
    return os.environ.get("HILT_CPU_KERNELS", "").strip().lower() in ("0", "false", "no", "off")


def bind(path: str) -> ctypes.CDLL:
    """Load ``path`` and declare every signature; raises OSError / AttributeError / RuntimeError."""
    return _native.bind(path, SIGNATURES, "hilt_cpu_abi_version", ABI_VERSION)


@functools.lru_cache(maxsize=None)
def _load(path: str) -> tuple[ctypes.CDLL | None, str | None]:
    return _native.load(path, "the CPU library", bind, _not_built_reason)


def load() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None), or (None, why not): turned off by ``HILT_CPU_KERNELS=0``, not built, or unloadable.
    The environment is read on every call (cheap), the library loaded once per path."""
    if disabled():
        return None, "turned off by HILT_CPU_KERNELS=0"
    return _load(library_path())


def describe() -> list[str]:
    """Lines for ``hilt info``."""
    lib, why = load()
    if lib is None:
        return [f"cpu library: not used: {why}"]
    return [f"cpu library: {library_path()} (fused ILT decoding step, fp32)"]
