"""Torch-free C++ CPU library (``csrc/cpu/``): fused decoding steps that PyTorch would run as dozens
of tiny ops. Built by ``setup.py`` with the system C++ compiler into ``hilt_kernels/cpu/_hilt_cpu.so``
and loaded with ctypes; without it (no compiler, ``HILT_SKIP_CPU_BUILD=1``, or ``HILT_CPU_KERNELS=0``)
the same steps run through PyTorch ops.

* :mod:`hilt_kernels.cpu.ilt_step`: the Inter-Layer Transformer's decoding step
  (:meth:`hilt.nn.InterLayerTransformer.step`).
"""

from __future__ import annotations

__all__ = ["unavailable_reason", "library_path"]


def library_path() -> str:
    from ._lib import library_path as _path

    return _path()


def unavailable_reason() -> str | None:
    """None when the CPU library is loaded and in use, else why not."""
    from ._lib import load

    return load()[1]
