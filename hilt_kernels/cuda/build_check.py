"""CI build check of the CUDA library: ``python -m hilt_kernels.cuda.build_check [--force] [--archs 80,90]``.

1. Compiles every ``csrc/**.cu`` for sm_80 and sm_90 with ``-Xptxas -v`` (objects are cached in
   ``build/hilt_cuda/<flags hash>/`` and shared with setup.py's build; ``--force`` recompiles) and
   links the library (``-cudart static``). Any compile or link error: exit 1.
2. Prints registers, static shared memory, stack and spill bytes of every kernel and arch, and the
   resident CTAs per SM they allow (``blk/SM``: from registers, shared memory, the CTA size and the
   per-SM limits of the arch; ``lb``: the ``__launch_bounds__`` minimum asked of the compiler); a
   spill in any kernel (they are all hot): exit 1.
3. Loads the library with ctypes, checks the ABI version and that every symbol of
   ``hilt_kernels.cuda._lib.SIGNATURES`` is exported, that ``hilt_last_error`` round-trips a
   message, and (without a GPU) that a launcher returns an error code and message instead of crashing.
Where nvcc is absent (or csrc/ is not there, i.e. not a source checkout) it prints why it skipped
and exits 0. Standard library only (no torch import needed by this module itself).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import re
import sys

if __package__ in (None, ""):  # run as a script: make `hilt_kernels.cuda` importable without its parent
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hilt_kernels.cuda import _build  # noqa: E402  (hilt_kernels/__init__ imports torch; fine in CI)
from hilt_kernels.cuda import _lib  # noqa: E402

CHECK_ARCHS = [("80", False), ("90", False)]

# Per-SM limits (CUDA C++ Programming Guide, compute capabilities table): registers (4 sub-partitions
# of 16K, allocated per warp in units of 256), threads, resident CTAs, shared memory per SM and the
# 1 KiB the runtime reserves per CTA.
SM_LIMITS = {
    "sm_80": dict(regs=65536, threads=2048, ctas=32, smem=164 * 1024, reserved=1024),
    "sm_86": dict(regs=65536, threads=1536, ctas=16, smem=100 * 1024, reserved=1024),
    "sm_89": dict(regs=65536, threads=1536, ctas=24, smem=100 * 1024, reserved=1024),
    "sm_90": dict(regs=65536, threads=2048, ctas=32, smem=228 * 1024, reserved=1024),
}
# Dynamic shared memory per CTA at launch (the rest use none): attention_pool backward keeps 3 floats
# per warp (8 warps) per head: 96 B with per-head values (shown), 96 * H with values shared by H heads.
DYNAMIC_SMEM = {"apool_bwd_kernel": 96}


def launch_bounds(root: str | None = None) -> dict[str, tuple[int, int]]:
    """{kernel base name: (max threads per CTA, min CTAs per SM)} from the csrc/ sources'
    ``__launch_bounds__`` (constexpr ints and ``#define``s resolved; ``HILT_CUDA_DEFINES`` applied).
    Every csrc/ kernel is launched with exactly its launch-bounds CTA size."""
    out: dict[str, tuple[int, int]] = {}
    overrides = dict(d[2:].split("=", 1) if "=" in d else (d[2:], "1") for d in _build.extra_defines())
    for d, _dirs, files in os.walk(_build.csrc_dir(root)):
        for f in files:
            if not f.endswith((".cu", ".cuh")):
                continue
            with open(os.path.join(d, f)) as fh:
                text = fh.read()
            consts = {m.group(1): m.group(2) for m in re.finditer(r"constexpr\s+int\s+(\w+)\s*=\s*([^;]+);", text)}
            consts.update({m.group(1): m.group(2) for m in re.finditer(r"#define\s+(\w+)\s+(\S+)", text)})
            consts.update(overrides)

            def ev(expr, depth=0):
                expr = re.sub(r"\b[A-Za-z_]\w*\b", lambda m: f"({ev(consts[m.group(0)], depth + 1)})"
                              if m.group(0) in consts and depth < 8 else m.group(0), expr)
                return int(eval(expr, {"__builtins__": {}}))  # noqa: S307 - integer constant expressions of csrc/

            for m in re.finditer(r"__launch_bounds__\(([^,()]+)(?:,\s*([^()]+))?\)\s*(\w+)\s*\(", text):
                out[m.group(3)] = (ev(m.group(1)), ev(m.group(2)) if m.group(2) else 1)
    return out


def blocks_per_sm(k: _build.KernelInfo, threads: int, dyn_smem: int = 0) -> tuple[int, str]:
    """(resident CTAs per SM, the limiting resource) for a kernel build on its arch."""
    lim = SM_LIMITS.get(k.arch, SM_LIMITS["sm_90"])
    warps = math.ceil(threads / 32)
    by = {"threads": lim["threads"] // (warps * 32), "ctas": lim["ctas"]}
    if k.registers:
        per_warp = math.ceil(k.registers * 32 / 256) * 256
        by["regs"] = (lim["regs"] // 4 // per_warp) * 4 // warps
    by["smem"] = lim["smem"] // (k.smem + dyn_smem + lim["reserved"])
    n = min(by.values())
    order = ["threads", "ctas", "regs", "smem"]  # on a tie, name the structural limit first
    return n, min(by, key=lambda r: (by[r], order.index(r)))


def kernel_table(result: _build.BuildResult) -> tuple[str, list[_build.KernelInfo]]:
    infos: list[_build.KernelInfo] = []
    for src, text in result.ptxas_logs.items():
        infos += _build.parse_ptxas(text, os.path.relpath(src, _build.csrc_dir()))
    names = _build.demangle(sorted({k.name for k in infos}))
    for k in infos:
        k.name = _build.short_name(names.get(k.name, k.name))
    infos.sort(key=lambda k: (k.source, k.name, k.arch))
    bounds = launch_bounds()
    w = max([len(k.name) for k in infos] + [6])
    lines = [f"{'kernel':<{w}}  arch   regs  smem(B)  stack(B)  spill st/ld(B)  CTA  lb  blk/SM        source"]
    for k in infos:
        base = k.name.split("<")[0]
        threads, lb = bounds.get(base, (256, 1))
        n, why = blocks_per_sm(k, threads, DYNAMIC_SMEM.get(base, 0))
        lim = f"({why})"
        lines.append(f"{k.name:<{w}}  {k.arch:<6} {k.registers:>4}  {k.smem:>7}  {k.stack:>8}  "
                     f"{k.spill_stores:>6}/{k.spill_loads:<6}  {threads:>3}  {lb:>2}  {n:>2} {lim:<9}  {k.source}")
    return "\n".join(lines), infos


def check_library(path: str) -> list[str]:
    """Problems found when loading the library with ctypes (empty: fine)."""
    problems = []
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        return [f"ctypes cannot load {path}: {e}"]
    missing = [n for n in _lib.SIGNATURES if not hasattr(lib, n)]
    if missing:
        return [f"missing symbols: {', '.join(missing)}"]
    try:
        lib = _lib.bind(path)
    except Exception as e:
        return [f"binding failed: {e}"]
    rc = lib.hilt_set_error_for_test(b"build-check message")
    if rc == 0 or _lib.last_error(lib) != "build-check message":
        problems.append("hilt_last_error does not round-trip a message")
    count = ctypes.c_int(0)
    rc = lib.hilt_cuda_device_count(ctypes.byref(count))
    if rc != 0 or count.value == 0:
        # No GPU: a launcher must fail gracefully with a message (sizes > 0, null pointers).
        # Non-null dummy pointers: the launcher must stop at the device selection, never touch them.
        s4 = _lib.int64s(1, 1, 1, 1)
        fake = ctypes.c_void_p(256)
        rc = lib.hilt_bla_forward(fake, fake, fake, None, fake, fake, 1, 4, 1, 8, 2, s4, s4, s4, None,
                                  1.0, 0, 1, 0, None)
        msg = _lib.last_error(lib)
        if rc == 0 or not msg:
            problems.append(f"hilt_bla_forward without a GPU returned {rc} with message {msg!r}")
        else:
            print(f"no GPU here: hilt_bla_forward returned code {rc}: {msg}")
    else:
        print(f"{count.value} CUDA device(s) visible to the library")
    print(f"library: {lib.hilt_build_info().decode()}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="recompile every object")
    ap.add_argument("--archs", default=None, help="arch list (default: 80,90)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel nvcc jobs (default: $MAX_JOBS or CPU count)")
    args = ap.parse_args(argv)

    nvcc = _build.find_nvcc()
    if nvcc is None:
        print("hilt build_check: SKIPPED — nvcc not found (not on PATH, no CUDA_HOME); nothing to check.")
        return 0
    if not _build.sources():
        print(f"hilt build_check: SKIPPED — no CUDA sources under {_build.csrc_dir()} (not a source checkout).")
        return 0
    archs = _build.parse_archs(args.archs) if args.archs else CHECK_ARCHS
    print(f"nvcc: {nvcc}, CUDA {_build.nvcc_version(nvcc)}")
    print(f"flags: {' '.join(_build.BASE_FLAGS + _build.gencode_flags(archs))}; link: {' '.join(_build.LINK_FLAGS)}")
    res = _build.build(archs=archs, jobs=args.jobs, force=args.force, log=print)
    reused = len(_build.sources()) - len(res.compiled)
    print(f"build: {'ok' if res.ok else 'FAILED'} in {res.seconds:.1f} s "
          f"({len(res.compiled)} compiled, {reused} reused from cache)")
    if not res.ok:
        print(res.error)
        return 1
    table, infos = kernel_table(res)
    print(table)
    rc = 0
    spilled = [k for k in infos if k.spill_stores or k.spill_loads]
    if spilled:
        print(f"FAIL: {len(spilled)} kernel build(s) spill registers: "
              + ", ".join(sorted({f'{k.name} ({k.arch})' for k in spilled})))
        rc = 1
    seen_archs = sorted({k.arch for k in infos})
    want = sorted({f"sm_{a}" for a, _ in archs})
    if seen_archs != want:
        print(f"FAIL: ptxas reported archs {seen_archs}, expected {want}")
        rc = 1
    problems = check_library(res.library)
    for p in problems:
        print(f"FAIL: {p}")
    if problems:
        rc = 1
    print(f"library {res.library}: {'OK' if not problems else 'PROBLEMS'}; "
          f"{len(infos)} kernel builds, {len(_lib.LAUNCHERS)} launchers exported")
    print("hilt build_check:", "PASSED" if rc == 0 else "FAILED")
    return rc


if __name__ == "__main__":
    sys.exit(main())
