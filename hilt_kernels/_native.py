"""Loading hilt's torch-free native libraries with ctypes (the CUDA library, ``cuda/_lib.py``, and the CPU
library, ``cpu/_lib.py``): declaring signatures, checking the ABI version, and saying why a library cannot
be used (not built, and why setup.py did not build it; unloadable; a missing symbol; a stale ABI).
Standard library only."""

from __future__ import annotations

import ctypes
import os
from typing import Callable, Optional


def bind(path: str, signatures: dict[str, tuple], abi_symbol: str, abi_version: int) -> ctypes.CDLL:
    """Load ``path``, declare every ``{name: (restype, argtypes)}`` and check ``abi_symbol()`` returns
    ``abi_version``; raises OSError / AttributeError (a missing symbol) / RuntimeError (another ABI)."""
    lib = ctypes.CDLL(path)
    for name, (res, args) in signatures.items():
        fn = getattr(lib, name)  # AttributeError names a missing symbol
        fn.restype = res
        fn.argtypes = args
    abi = getattr(lib, abi_symbol)()
    if abi != abi_version:
        raise RuntimeError(f"ABI version {abi} != {abi_version} expected by this Python package (rebuild it)")
    return lib


def recorded_status(status_path: str) -> Optional[str]:
    """What setup.py recorded about a build (``build/<lib>/status.txt``), or None."""
    try:
        with open(status_path) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def load(path: str, what: str, bind_fn: Callable[[str], ctypes.CDLL],
         not_built: Callable[[], str]) -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """(library, None), or (None, why ``what`` -- "the CUDA library" -- at ``path`` cannot be used);
    ``not_built()`` says why it was not built when the file is missing."""
    if not os.path.isfile(path):
        return None, f"{what} is not built ({path} does not exist): {not_built()}"
    try:
        return bind_fn(path), None
    except OSError as e:
        return None, f"{what} {path} failed to load ({e})"
    except AttributeError as e:
        return None, f"{what} {path} lacks a symbol ({e}); rebuild it"
    except RuntimeError as e:
        return None, f"{what} {path} is unusable: {e}"
