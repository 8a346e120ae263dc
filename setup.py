"""Build script: the pure-Python packages, plus (in a later version) the torch-free CUDA library.

The CUDA kernels in csrc/ are compiled by nvcc alone — no torch headers — into one shared library
loaded with ctypes, so the build never imports torch and works with any torch version. This version
has no kernels in csrc/ yet, so there is nothing to compile and setup.py says so once.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_sources() -> list[str]:
    csrc = os.path.join(HERE, "csrc")
    found = []
    for root, _dirs, files in os.walk(csrc):
        found += [os.path.join(root, f) for f in files if f.endswith(".cu")]
    return sorted(found)


if not _cuda_sources():
    print("hilt: csrc/ has no CUDA kernels in this version; installing the pure-Python package "
          "(reference and triton backends).", file=sys.stderr)

setup()
