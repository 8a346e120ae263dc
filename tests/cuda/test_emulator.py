"""Every CUDA kernel of csrc/ run on the CPU through the emulator (tests/cuda/emulator), under
AddressSanitizer + UndefinedBehaviorSanitizer and separately ThreadSanitizer, through the real
Python side (hilt_kernels.cuda.<op>.forward/backward on CPU tensors, HILT_CUDA_EMULATOR=1), against
the reference backend in float64. Any sanitizer report, emulator error (divergent barrier or
shuffle, missing lane, shared-memory limit) or wrong value fails the case.

The libraries are built once per session (cached in build/hilt_emu/); each sanitizer's cases run in
one child process (see tests/cuda/conftest.py). No GPU needed: these tests run in CI.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.cuda.emulator.cases import BY_ID, CASES, TSAN_IDS

ASAN_IDS = [c["id"] for c in CASES]


def _skip_unless(emulator, variant):
    why = emulator.available(variant)
    if why:
        pytest.skip(f"emulator {variant} build unavailable: {why}")


def _assert_ok(res, case_id):
    assert not res["errors"], f"{case_id}:\n" + "\n".join(res["errors"])


@pytest.mark.parametrize("case_id", ASAN_IDS)
def test_emulated_kernels_asan_ubsan(emulator, case_id):
    _skip_unless(emulator, "asan")
    _assert_ok(emulator.result("asan", ASAN_IDS, case_id), case_id)


@pytest.mark.parametrize("case_id", TSAN_IDS)
def test_emulated_kernels_tsan(emulator, case_id):
    _skip_unless(emulator, "tsan")
    _assert_ok(emulator.result("tsan", TSAN_IDS, case_id), case_id)


def test_every_launcher_has_a_case_in_both_sanitizer_runs():
    ops = {"bla": 2, "w2a": 2, "apool": 2, "ema": 2}  # forward + backward launchers per op
    for ids in (ASAN_IDS, TSAN_IDS):
        assert {BY_ID[i]["op"] for i in ids} >= set(ops)
    dtypes = {BY_ID[i].get("dtype") for i in ASAN_IDS}
    assert {"float32", "float16", "bfloat16"} <= dtypes


@pytest.fixture(scope="module")
def selftest_lib(emulator):
    _skip_unless(emulator, "asan")
    from tests.cuda.emulator import build  # standard library only

    return build.build_selftest("asan")


def _selftest(lib, name):
    import json
    import subprocess

    from tests.cuda.conftest import sanitizer_env

    p = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "emulator", "selftest_run.py"), lib,
                        name], env=sanitizer_env("asan", lib), capture_output=True, text=True, timeout=120)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    return p.returncode, (json.loads(lines[-1]) if lines else None), p.stderr


def test_emulator_selftest_correct_reduction(selftest_lib):
    rc, res, err = _selftest(selftest_lib, "reduce")
    assert rc == 0 and res["rc"] == 0, err[-3000:]
    assert res["out"] == [sum(range(256))] * 2


@pytest.mark.parametrize("name, expect", [
    ("divergent_barrier", "threads reached different __syncthreads"),
    ("partial_warp", "names lanes that do not exist (warp 1 has lanes 0x0000ffff)"),
    # which check fires first depends on thread timing: lane 3 exits while the others wait in the shuffle,
    # or a lane reaches the shuffle after lane 3 exited; both name the exited lane 3 (bit 0x00000008)
    ("exited_lane", ("lane 3 of warp 0 exited while lanes", "names exited lanes 0x00000008 of warp 0")),
    ("barrier_vs_shuffle", "divergence:"),
    ("dyn_smem:65536:0", "65536 bytes of dynamic shared memory > 49152 allowed"),
    ("dyn_smem:300000:300000", "above the 232448-byte limit"),
])
def test_emulator_selftest_reports_errors(selftest_lib, name, expect):
    """The emulator's checks: divergent barriers, full-warp masks in a partial warp, exited lanes,
    a lane at a barrier while its warp shuffles, dynamic shared memory limits."""
    rc, res, err = _selftest(selftest_lib, name)
    assert rc == 0 and res is not None, err[-3000:]
    expected = expect if isinstance(expect, tuple) else (expect,)
    assert res["rc"] != 0 and any(e in res["msg"] for e in expected), res


def test_emulator_selftest_smem_opt_in_allows_more(selftest_lib):
    rc, res, err = _selftest(selftest_lib, "dyn_smem:65536:65536")
    assert rc == 0 and res["rc"] == 0 and res["out"] == [16383.0], (res, err[-2000:])


def test_emulator_selftest_dropped_bounds_guard_is_a_heap_overflow(selftest_lib):
    rc, res, err = _selftest(selftest_lib, "overflow")
    assert rc != 0 and res is None
    assert "AddressSanitizer: heap-buffer-overflow" in err and "overflow_kernel" in err, err[-3000:]


def _remove_nth(text: str, needle: str, n: int) -> str:
    i = -1
    for _ in range(n + 1):
        i = text.index(needle, i + 1)
    return text[:i] + "/* removed by the mutation test */" + text[i + len(needle):]


def test_mutation_removed_syncthreads_is_reported_as_a_race(emulator):
    """The harness can fail: a copy of the block_local_attention forward without the __syncthreads
    that separates staging keys/values into shared memory from reading them is run under TSan, which
    must report a data race in bla_kernels.cuh (and the unmutated build passes the same case)."""
    _skip_unless(emulator, "tsan")
    from tests.cuda.conftest import run_cases

    def mutate(rel, text):
        if rel != os.path.join("block_local_attention", "bla_kernels.cuh"):
            return text
        return _remove_nth(text, "__syncthreads();", 1)  # the forward kernel's second barrier

    lib = emulator.lib("tsan", mutate=mutate, tag="no-syncthreads")
    case = "bla-f32-D1-b5-causal-randmask-noncontig"
    res = run_cases("tsan", lib, [case])[case]
    text = "\n".join(res["errors"])
    assert "ThreadSanitizer: data race" in text, text[-3000:]
    assert "bla_kernels.cuh" in text and "bla_fwd_kernel" in text, text[-3000:]


def test_mutation_missing_smem_opt_in_is_an_emulator_error(emulator):
    """Without cudaFuncSetAttribute, attention_pool's backward with 1024 shared heads (96 KiB of
    dynamic shared memory) must fail the launch with the emulator's shared-memory limit error."""
    _skip_unless(emulator, "asan")
    from tests.cuda.conftest import run_cases

    def mutate(rel, text):
        if rel != os.path.join("attention_pool", "attention_pool.cu"):
            return text
        needle = "e = cudaFuncSetAttribute("
        assert needle in text
        return text.replace(needle, "e = cudaSuccess; if (0) (void)cudaFuncSetAttribute(")

    lib = emulator.lib("asan", mutate=mutate, tag="no-smem-opt-in")
    case = "apool-f32-H1024-shared-bwd"
    res = run_cases("asan", lib, [case])[case]
    text = "\n".join(res["errors"])
    assert "dynamic shared memory" in text and "cudaFuncAttributeMaxDynamicSharedMemorySize" in text, text[-3000:]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
