"""Fixtures of the CPU library tests (``csrc/cpu/``, ``hilt_kernels/cpu/``).

``cpu_library``: the loaded library. Where it is not usable the test is skipped only when that is
expected (no C++ compiler on this machine, or ``HILT_CPU_KERNELS=0`` / ``HILT_SKIP_CPU_BUILD=1`` set on
purpose); with a compiler present a missing or broken library is an install bug and FAILS.
"""

from __future__ import annotations

import os

import pytest


def _off(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("0", "false", "no", "off") if name == "HILT_CPU_KERNELS" \
        else os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@pytest.fixture
def cpu_library():
    from hilt_kernels.cpu import _lib
    from hilt_kernels.cpu._build import find_cxx

    lib, why = _lib.load()
    if lib is not None:
        return lib
    if _off("HILT_CPU_KERNELS") or _off("HILT_SKIP_CPU_BUILD"):
        pytest.skip(f"cpu library turned off on purpose: {why}")
    if find_cxx() is None:
        pytest.skip(f"cpu library unavailable (no C++ compiler here): {why}")
    pytest.fail(f"a C++ compiler is installed but the CPU library is unusable: {why}", pytrace=False)
