"""Fixtures of the CUDA backend tests.

* ``cuda_backend_or_skip()``: THE one place where a GPU test of the CUDA backend skips because the
  backend is unavailable (message prefix ``"cuda backend unavailable: "``), so the
  ``HILT_ALLOW_MISSING_BACKENDS`` rule of tests/conftest.py can turn that skip into a failure on a
  GPU machine.
* ``emulator``: the CPU emulation of csrc/ (tests/cuda/emulator): builds the ASan+UBSan and the
  TSan libraries once per session (objects cached under build/hilt_emu/), runs the cases of
  tests/cuda/emulator/cases.py in a child python with the sanitizer runtime preloaded (one child per
  sanitizer, restarted after a crash), and hands each test its case's result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "WARNING: ThreadSanitizer", "ERROR: ThreadSanitizer", "runtime error:",
                     "ERROR: LeakSanitizer", "hilt-emu ERROR")


def cuda_backend_or_skip() -> None:
    """Skip (``cuda backend unavailable: <why>``) unless a CUDA device and the compiled library are usable."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("cuda backend unavailable: no CUDA device")
    from hilt_kernels.cuda import unavailable_reason

    why = unavailable_reason()
    if why is not None:  # a GPU without the library: a broken install, which FAILS (tests/conftest.py's rule)
        from tests.conftest import skip_missing_backend

        skip_missing_backend("cuda", f"cuda backend unavailable: {why}")


def sanitizer_env(variant: str, lib: str) -> dict:
    """Environment of a child python running the emulator library ``lib`` built as ``variant``."""
    from tests.cuda.emulator import build  # standard library only

    env = dict(os.environ)
    for k in ("HILT_CUDA_EMULATOR_DEVICE", "HILT_BACKEND"):
        env.pop(k, None)
    env.update(
        LD_PRELOAD=build.preload(variant),
        HILT_CUDA_EMULATOR="1",
        HILT_CUDA_LIBRARY=lib,
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86:detect_odr_violation=0:alloc_dealloc_mismatch=0",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87",
        TSAN_OPTIONS="halt_on_error=1:exitcode=66:report_signal_unsafe=0:history_size=4",
    )
    return env


def run_cases(variant: str, lib: str, ids: list[str], timeout: float = 900) -> dict[str, dict]:
    """Run ``ids`` in child processes; {id: {"errors": [...], "seconds": s}}. A child that dies (a
    sanitizer report halts it) fails the case it was running, with its stderr; the next child
    continues with the remaining cases."""
    results: dict[str, dict] = {}
    todo = list(ids)
    with tempfile.TemporaryDirectory(prefix=f"hilt-emu-{variant}-") as tmp:
        for attempt in range(len(ids) + 1):
            if not todo:
                break
            out, err = os.path.join(tmp, f"r{attempt}.jsonl"), os.path.join(tmp, f"e{attempt}.txt")
            with open(err, "w") as eh:
                try:
                    rc = subprocess.run([sys.executable, "-m", "tests.cuda.emulator.run_cases", "--out", out, *todo],
                                        cwd=ROOT, env=sanitizer_env(variant, lib), stdout=eh, stderr=subprocess.STDOUT,
                                        timeout=timeout).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            with open(err, errors="replace") as eh:
                log = eh.read()
            started = None
            if os.path.exists(out):
                with open(out) as fh:
                    for line in fh:
                        d = json.loads(line)
                        if d["event"] == "start":
                            started = d["id"]
                        else:
                            results[d["id"]] = {"errors": d["errors"], "seconds": d["seconds"]}
                            started = None
            todo = [i for i in todo if i not in results]
            bad_log = any(m in log for m in SANITIZER_MARKERS)
            if rc == 0 and not bad_log and not todo:
                break
            victim = started or (todo[0] if todo else None)
            if victim is None:  # every case finished, yet the child reported something on exit
                results["<exit>"] = {"errors": [f"child exited with {rc}:\n{log[-6000:]}"], "seconds": 0}
                break
            results[victim] = {"errors": [f"child process died (exit {rc}) during this case:\n{log[-8000:]}"],
                               "seconds": 0}
            todo = [i for i in todo if i != victim]
    return results


class Emulator:
    """Session-wide builds and results (lazy, per sanitizer variant)."""

    def __init__(self):
        self.libs: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        self.times: dict[str, float] = {}

    def available(self, variant: str) -> str | None:
        if shutil.which("g++") is None:
            return "g++ is not installed"
        from tests.cuda.emulator import build  # standard library only

        try:
            build.runtime_library(variant)
        except Exception as e:  # noqa: BLE001
            return f"g++ has no {variant} runtime ({e})"
        return None

    def lib(self, variant: str, mutate=None, tag: str = "") -> str:
        key = f"{variant}/{tag}"
        if key not in self.libs:
            from tests.cuda.emulator import build  # standard library only

            t0 = time.time()
            self.libs[key] = build.build(variant, mutate=mutate, tag=tag)
            self.times[f"build {key}"] = time.time() - t0
        return self.libs[key]

    def result(self, variant: str, ids: list[str], case_id: str) -> dict:
        if variant not in self.results:
            lib = self.lib(variant)
            t0 = time.time()
            self.results[variant] = run_cases(variant, lib, ids)
            self.times[f"run {variant}"] = time.time() - t0
        res = self.results[variant]
        if "<exit>" in res:
            return res["<exit>"]
        return res.get(case_id, {"errors": ["no result (the child never reached this case)"], "seconds": 0})


@pytest.fixture(scope="session")
def emulator():
    emu = Emulator()
    yield emu
    if emu.times:
        sys.stderr.write("\n[hilt emulator] " + ", ".join(f"{k}: {v:.1f}s" for k, v in emu.times.items()) + "\n")
