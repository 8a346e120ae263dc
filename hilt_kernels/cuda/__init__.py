"""CUDA C++ backend: kernels in ``csrc/``, built by ``setup.py`` with nvcc into the torch-free
shared library ``hilt_kernels/cuda/_hilt_cuda.so`` (C ABI, CUDA runtime linked statically), loaded
with ctypes (:mod:`hilt_kernels.cuda._lib`). The op modules (``block_local_attention.py``, ...)
implement the contract of ``hilt_kernels/BACKENDS.md`` on top of it.

``unavailable_reason()`` tells dispatch why the backend cannot run (None: it can).
``python -m hilt_kernels.cuda.build_check`` compiles the library for sm_80 and sm_90 and prints the
register / shared memory / spill table of every kernel.
"""

from __future__ import annotations

__all__ = ["unavailable_reason", "library_path"]


def library_path() -> str:
    from ._lib import library_path as _path

    return _path()


def unavailable_reason() -> str | None:
    """None when the compiled library loads and the CUDA driver reports a device, else why not:
    the library is not built (and why, when setup.py recorded it), failed to load, or there is no
    CUDA device / no usable driver. Cached: computed once per process."""
    from ._lib import device_reason

    return device_reason()
