"""CUDA C++ backend (csrc/, built by setup.py into a torch-free shared library).

Not built yet: the kernels are the subject of a later issue. ``unavailable_reason`` tells dispatch why.
"""

from __future__ import annotations


def unavailable_reason() -> str | None:
    """None when the compiled library is loadable, else a sentence saying why not."""
    return "the CUDA C++ kernels are not implemented yet (csrc/ holds no kernels in this version)"
