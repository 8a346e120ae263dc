"""Build of the torch-free CPU library (``csrc/cpu/*.cpp`` -> ``_hilt_cpu.so``) with a C++ compiler.

Standard library only: ``setup.py`` loads this file by path (it must not import torch).
Compiler: ``$CXX``, else ``c++`` / ``g++`` / ``clang++`` on PATH. Flags: ``-std=c++17 -O3 -fPIC
-shared`` (plus ``$HILT_CPU_CXXFLAGS``). No ``-march``: the hot loops carry
``target_clones`` (AVX-512 / AVX2+FMA / baseline, picked when the library loads) on x86-64 Linux,
so the library runs on any CPU of its platform.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

LIB_NAME = "_hilt_cpu.so"
FLAGS = ["-std=c++17", "-O3", "-fPIC", "-shared", "-Wall", "-Wextra"]


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sources(root: str | None = None) -> list[str]:
    d = os.path.join(root or repo_root(), "csrc", "cpu")
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".cpp"))


def find_cxx() -> str | None:
    env = os.environ.get("CXX", "").strip()
    if env:
        exe = shlex.split(env)[0]
        return shutil.which(exe) or (exe if os.path.isfile(exe) else None)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Result:
    ok: bool
    library: str = ""
    error: str = ""
    seconds: float = 0.0
    command: str = ""


def build(out_dir: str | None = None, log=print) -> Result:
    """Compile every ``csrc/cpu/*.cpp`` into one shared library in ``out_dir`` (default
    ``build/hilt_cpu``); returns a :class:`Result` (``ok`` False with the compiler's message)."""
    cxx = find_cxx()
    srcs = sources()
    if cxx is None:
        return Result(False, error="no C++ compiler found (set CXX, or install g++/clang++)")
    if not srcs:
        return Result(False, error="csrc/cpu/ has no sources")
    out_dir = out_dir or os.path.join(repo_root(), "build", "hilt_cpu")
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    extra = shlex.split(os.environ.get("HILT_CPU_CXXFLAGS", ""))
    cmd = [cxx, *FLAGS, *extra, *srcs, "-o", tmp]
    log(f"compiling the CPU library: {' '.join(cmd)}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        os.unlink(tmp)
        return Result(False, error=f"{cxx} could not run: {e}", command=" ".join(cmd))
    if proc.returncode != 0:
        os.unlink(tmp)
        return Result(False, error=(proc.stderr or proc.stdout).strip()[-4000:], command=" ".join(cmd))
    final = os.path.join(out_dir, LIB_NAME)
    os.replace(tmp, final)
    return Result(True, library=final, seconds=time.perf_counter() - t0, command=" ".join(cmd[:-1] + [final]))
