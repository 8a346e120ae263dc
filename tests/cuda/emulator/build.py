"""Build ``csrc/`` as host C++ against the CUDA emulator (hilt_emu.h / hilt_emu.cpp), with g++ under
AddressSanitizer + UndefinedBehaviorSanitizer ("asan") or ThreadSanitizer ("tsan").

The real ``csrc/`` stays the one source: each file is copied into the build dir with three
mechanical rewrites (``rewrite``), then compiled with ``-x c++`` and the emulator's shim headers
(``include/cuda_runtime.h`` ...) first on the include path:

* ``kernel<Args><<<grid, block, smem, stream>>>(a, b)`` ->
  ``::emu::launch(kernel<Args>, "kernel<Args>", ::emu::cfg(grid, block, smem, stream), a, b)``
* ``__shared__ T name[N];`` -> ``T (&name)[N] = EMU_SHARED_ARRAY(T, name, N);`` (per-block allocation)
* ``extern __shared__ T name[];`` -> ``T* name = static_cast<T*>(::emu::shared_dynamic());``

Objects are cached per file under ``build/hilt_emu/<variant>/`` by a hash of the rewritten source,
the rewritten headers, the emulator sources and the flags, so a session builds once and a mutated
copy (``mutate``) recompiles only the file it changes. Standard library only.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
CSRC = os.path.join(ROOT, "csrc")
BUILD = os.path.join(ROOT, "build", "hilt_emu")

COMMON = ["-std=c++17", "-fPIC", "-pthread", "-g", "-fno-strict-aliasing", "-fno-omit-frame-pointer",
          "-Wno-unknown-pragmas"]
VARIANTS = {
    # -O1 keeps the sanitizers' reports precise and the compile short
    "asan": {"kernel": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
             "emu": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
             "link": ["-fsanitize=address,undefined"], "runtime": "libasan.so"},
    # the emulator runtime is NOT instrumented: its futex coordination must be invisible to TSan
    "tsan": {"kernel": ["-O1", "-fsanitize=thread"], "emu": ["-O2"], "link": ["-fsanitize=thread"],
             "runtime": "libtsan.so"},
}

_LAUNCH = re.compile(r"(\b[A-Za-z_][\w:]*(?:<[^;{}()<>]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_DYN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"__shared__\s+([\w:]+)\s+(\w+)\s*\[([^\]]+)\]\s*;")


def rewrite(text: str) -> str:
    """The three source rewrites (see the module docstring)."""
    text = _LAUNCH.sub(lambda m: f"::emu::launch({m.group(1)}, \"{m.group(1)}\", ::emu::cfg({m.group(2)}), ", text)
    text = _DYN_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = static_cast<{m.group(1)}*>(::emu::shared_dynamic());",
                           text)
    text = _SHARED.sub(lambda m: f"{m.group(1)} (&{m.group(2)})[{m.group(3)}] = "
                                 f"EMU_SHARED_ARRAY({m.group(1)}, {m.group(2)}, {m.group(3)});", text)
    if "<<<" in text or "__shared__" in text:
        raise RuntimeError("a launch or __shared__ declaration escaped the emulator rewrite")
    return text


def _gxx_file(name: str) -> str:
    out = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(out):
        raise RuntimeError(f"g++ does not ship {name}")
    return os.path.realpath(out)


def runtime_library(variant: str) -> str:
    """Path of the sanitizer runtime to LD_PRELOAD into python for ``variant``."""
    return _gxx_file(VARIANTS[variant]["runtime"])


def preload(variant: str) -> str:
    """LD_PRELOAD for a python running the ``variant`` library: the sanitizer runtime first, then
    libstdc++ (so the runtime's __cxa_throw interceptor, which the emulator's abort path uses, finds
    the real one at start-up: python itself does not link libstdc++)."""
    return f"{runtime_library(variant)} {_gxx_file('libstdc++.so.6')}"


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _read(p: str) -> str:
    with open(p) as fh:
        return fh.read()


def _write_if_changed(p: str, text: str) -> None:
    os.makedirs(os.path.dirname(p), exist_ok=True)
    if os.path.exists(p) and _read(p) == text:
        return
    tmp = f"{p}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, p)


def _compile(cmd: list[str], obj: str) -> None:
    tmp = f"{obj}.tmp{os.getpid()}.o"
    r = subprocess.run(cmd + ["-o", tmp], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{r.stderr[-6000:]}")
    os.replace(tmp, obj)


def build(variant: str, mutate=None, tag: str = "", jobs: int | None = None, log=None) -> str:
    """Build (or reuse) the emulator library of ``variant`` ("asan" / "tsan"); returns its path.

    ``mutate(relpath, text) -> text`` edits the rewritten sources (the mutation test); ``tag``
    names that build's directory.
    """
    flags = VARIANTS[variant]
    files = {}
    for d, _dirs, names in os.walk(CSRC):
        for n in names:
            if n.endswith((".cu", ".cuh", ".h")):
                rel = os.path.relpath(os.path.join(d, n), CSRC)
                text = rewrite(_read(os.path.join(d, n)))
                files[rel] = mutate(rel, text) if mutate else text
    emu_h = _read(os.path.join(HERE, "hilt_emu.h"))
    emu_cpp = _read(os.path.join(HERE, "hilt_emu.cpp"))
    shims = "".join(_read(os.path.join(HERE, "include", n)) for n in sorted(os.listdir(os.path.join(HERE, "include"))))
    headers = _sha(emu_h, shims, *[f"{k}\n{v}" for k, v in sorted(files.items()) if not k.endswith(".cu")])
    tree_key = _sha(headers, *[f"{k}\n{v}" for k, v in sorted(files.items())])
    src_dir = os.path.join(BUILD, "src", tree_key)
    for rel, text in files.items():
        _write_if_changed(os.path.join(src_dir, rel), text)
    incs = ["-I", os.path.join(HERE, "include"), "-I", HERE]
    obj_dir = os.path.join(BUILD, variant, "obj")
    os.makedirs(obj_dir, exist_ok=True)
    jobs_list = []
    for rel in sorted(k for k in files if k.endswith(".cu")):
        key = _sha(headers, files[rel], " ".join(COMMON + flags["kernel"]))
        obj = os.path.join(obj_dir, rel.replace("/", "__") + f"-{key}.o")
        cmd = ["g++", *COMMON, *flags["kernel"], *incs, "-x", "c++", "-c", os.path.join(src_dir, rel)]
        jobs_list.append((cmd, obj))
    key = _sha(emu_h, emu_cpp, " ".join(COMMON + flags["emu"]))
    emu_obj = os.path.join(obj_dir, f"hilt_emu-{key}.o")
    jobs_list.append((["g++", *COMMON, *flags["emu"], *incs, "-c", os.path.join(HERE, "hilt_emu.cpp")], emu_obj))
    todo = [(c, o) for c, o in jobs_list if not os.path.exists(o)]
    t0 = time.time()
    if todo:
        with concurrent.futures.ThreadPoolExecutor(jobs or min(len(todo), os.cpu_count() or 2)) as ex:
            for f in [ex.submit(_compile, c, o) for c, o in todo]:
                f.result()
    objs = [o for _c, o in jobs_list]
    lib_dir = os.path.join(BUILD, variant, "lib", _sha(*objs, " ".join(flags["link"])) + (f"-{tag}" if tag else ""))
    lib = os.path.join(lib_dir, "libhilt_emu.so")
    if not os.path.exists(lib):
        os.makedirs(lib_dir, exist_ok=True)
        tmp = f"{lib}.tmp{os.getpid()}"
        r = subprocess.run(["g++", "-shared", "-pthread", *flags["link"], "-o", tmp, *objs], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulator link failed:\n{r.stderr[-4000:]}")
        os.replace(tmp, lib)
    if log is not None:
        log(f"emulator {variant}{'/' + tag if tag else ''}: compiled {len(todo)} of {len(jobs_list)} objects in "
            f"{time.time() - t0:.1f}s -> {lib}")
    return lib


def build_selftest(variant: str = "asan", log=None) -> str:
    """The emulator's self-test kernels (selftest.cu, rewritten like csrc/) linked with its runtime."""
    flags = VARIANTS[variant]
    incs = ["-I", os.path.join(HERE, "include"), "-I", HERE]
    emu_h = _read(os.path.join(HERE, "hilt_emu.h"))
    emu_cpp = _read(os.path.join(HERE, "hilt_emu.cpp"))
    text = rewrite(_read(os.path.join(HERE, "selftest.cu")))
    obj_dir = os.path.join(BUILD, variant, "obj")
    src = os.path.join(BUILD, "src", "selftest-" + _sha(text), "selftest.cu")
    _write_if_changed(src, text)
    jobs = [(["g++", *COMMON, *flags["kernel"], *incs, "-x", "c++", "-c", src],
             os.path.join(obj_dir, f"selftest-{_sha(emu_h, text, ' '.join(COMMON + flags['kernel']))}.o")),
            (["g++", *COMMON, *flags["emu"], *incs, "-c", os.path.join(HERE, "hilt_emu.cpp")],
             os.path.join(obj_dir, f"hilt_emu-{_sha(emu_h, emu_cpp, ' '.join(COMMON + flags['emu']))}.o"))]
    os.makedirs(obj_dir, exist_ok=True)
    for cmd, obj in jobs:
        if not os.path.exists(obj):
            _compile(cmd, obj)
    objs = [o for _c, o in jobs]
    lib = os.path.join(BUILD, variant, "lib", "selftest-" + _sha(*objs), "libhilt_emu_selftest.so")
    if not os.path.exists(lib):
        os.makedirs(os.path.dirname(lib), exist_ok=True)
        r = subprocess.run(["g++", "-shared", "-pthread", *flags["link"], "-o", lib + ".tmp", *objs],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"selftest link failed:\n{r.stderr[-4000:]}")
        os.replace(lib + ".tmp", lib)
    if log is not None:
        log(f"emulator selftest ({variant}) -> {lib}")
    return lib


def clean() -> None:
    shutil.rmtree(BUILD, ignore_errors=True)


if __name__ == "__main__":
    for v in sys.argv[1:] or ["asan", "tsan"]:
        print(build(v, log=print))
