"""Build of the torch-free CUDA library (``csrc/**.cu`` -> ``_hilt_cuda.so``) with nvcc alone.

Standard library only: ``setup.py`` loads this file by path (it must not import torch, and
``hilt_kernels/__init__.py`` does), and ``python -m hilt_kernels.cuda.build_check`` reuses it.

* Every ``.cu`` file is compiled ONCE for the whole arch list (one nvcc call with several
  ``-gencode``), in parallel (``MAX_JOBS`` nvcc processes, default: the CPU count), into
  ``build/hilt_cuda/<key>/`` where ``key`` hashes the nvcc version and all flags. An object is
  reused while the hash of its source + every header under ``csrc/`` is unchanged, so
  ``pip install`` followed by the build check compiles only once.
* Flags: ``-std=c++17 -O3 -Xcompiler -fPIC -Xptxas -v`` (the ptxas report of every object is kept
  next to it, ``<obj>.ptxas.txt``, for the register/spill table), one ``-gencode`` per arch
  (SASS) plus PTX of the newest arch; linked with ``nvcc -shared -cudart static``.
* Archs: ``HILT_CUDA_ARCHS`` (``"80;90"``, ``"sm_80,sm_90"``), else ``TORCH_CUDA_ARCH_LIST``
  (``"8.0;9.0+PTX"``, or names such as ``"Ampere;Hopper"``), else sm_80 and sm_90. Archs this nvcc
  cannot build (``nvcc --list-gpu-arch``; CUDA 13 dropped everything below sm_75) are dropped with a
  note instead of failing the build; the note is compiled into the library (``hilt_build_info()``,
  shown by ``hilt info``) because pip hides setup.py's messages without ``-v``.
* ``HILT_CUDA_DEFINES`` (``"HILT_BLA_MIN_BLOCKS=2 HILT_APOOL_MIN_BLOCKS=2"``): extra ``-D`` macros,
  e.g. the launch-bounds variants of csrc/ (part of the flags hash, so variants build side by side).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

LIB_NAME = "_hilt_cuda.so"
DEFAULT_ARCHS = ("80", "90")
BASE_FLAGS = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-lineinfo"]
LINK_FLAGS = ["-shared", "-cudart", "static"]


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def csrc_dir(root: str | None = None) -> str:
    return os.path.join(root or repo_root(), "csrc")


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.isfile(default) else None


def nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except Exception as e:  # pragma: no cover
        return f"unknown ({e})"
    m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"{m.group(1)} ({m.group(2)})" if m else out.strip().splitlines()[-1] if out.strip() else "unknown"


# TORCH_CUDA_ARCH_LIST's architecture names (as torch.utils.cpp_extension understands them).
ARCH_NAMES = {
    "kepler+tesla": ["37"], "kepler": ["35"], "maxwell+tegra": ["53"], "maxwell": ["50", "52"],
    "pascal": ["60", "61"], "volta+tegra": ["72"], "volta": ["70"], "turing": ["75"],
    "ampere+tegra": ["87"], "ampere": ["80", "86"], "ada": ["89"], "hopper": ["90"], "blackwell": ["100", "120"],
}


def parse_archs(spec: str) -> list[tuple[str, bool]]:
    """``"8.0;9.0+PTX"`` / ``"80,90"`` / ``"sm_80 sm_90"`` / ``"Ampere;Hopper+PTX"`` -> [("80", False), ...]."""
    archs: list[tuple[str, bool]] = []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        ptx = tok.upper().endswith("+PTX")
        tok = tok[:-4] if ptx else tok
        if tok.lower() in ARCH_NAMES:
            names = ARCH_NAMES[tok.lower()]
            archs += [(a, ptx and i == len(names) - 1) for i, a in enumerate(names)]
            continue
        tok = tok.lower().removeprefix("sm_").removeprefix("compute_")
        if "." in tok:
            major, minor = tok.split(".", 1)
            tok = major + minor
        if not re.fullmatch(r"\d+[a-z]?", tok):
            raise ValueError(f"cannot parse CUDA arch {tok!r} in {spec!r}")
        archs.append((tok, ptx))
    if not archs:
        raise ValueError(f"empty CUDA arch list {spec!r}")
    return archs


def archs_from_env() -> list[tuple[str, bool]]:
    for var in ("HILT_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        spec = os.environ.get(var, "").strip()
        if spec:
            return parse_archs(spec)
    return [(a, False) for a in DEFAULT_ARCHS]


@functools.lru_cache(maxsize=None)
def nvcc_archs(nvcc: str) -> tuple[str, ...] | None:
    """The archs this nvcc can compile for (``nvcc --list-gpu-arch``), or None if it cannot tell."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except Exception:  # pragma: no cover
        return None
    found = tuple(m.group(1) for m in re.finditer(r"compute_(\d+[a-z]?)", out))
    return found or None


def filter_archs(archs: list[tuple[str, bool]], supported) -> tuple[list[tuple[str, bool]], list[str]]:
    """(archs the toolkit supports, ["sm_70", ...] dropped). Raises ValueError if none is left."""
    if supported is None:
        return list(archs), []
    keep, dropped, seen = [], [], set()
    for a, ptx in archs:
        if a in seen:
            continue
        seen.add(a)
        (keep if a in supported else dropped).append((a, ptx))
    if not keep:
        want = ", ".join("sm_" + a for a, _ in archs)
        oldest = min(supported, key=lambda x: int(re.match(r"\d+", x).group()))
        raise ValueError(f"none of the requested archs ({want}) is supported by this nvcc (it supports sm_{oldest} "
                         "and newer)")
    return keep, [f"sm_{a}" for a, _ in dropped]


def extra_defines() -> list[str]:
    """``-D`` flags from ``HILT_CUDA_DEFINES`` (space/semicolon separated NAME[=VALUE])."""
    out = []
    for tok in re.split(r"[;\s]+", os.environ.get("HILT_CUDA_DEFINES", "").strip()):
        if tok:
            if not re.fullmatch(r"[A-Za-z_]\w*(=[\w.]+)?", tok):
                raise ValueError(f"bad HILT_CUDA_DEFINES entry {tok!r} (NAME or NAME=VALUE)")
            out.append(f"-D{tok}")
    return out


def build_note(version: str, archs, dropped: list[str], defines: list[str]) -> str:
    """The text compiled into hilt_build_info() (no commas: nvcc splits -D values on them)."""
    note = f"nvcc {version.split()[0]}; archs {' '.join('sm_' + a for a, _ in archs)}"
    if dropped:
        note += f"; dropped {' '.join(dropped)} (not supported by this nvcc)"
    if defines:
        note += f"; defines {' '.join(d[2:] for d in defines)}"
    return note.replace(",", " ").replace('"', "'")


def gencode_flags(archs: list[tuple[str, bool]]) -> list[str]:
    flags = []
    newest = max(archs, key=lambda a: int(re.match(r"\d+", a[0]).group()))[0]
    for arch, ptx in archs:
        codes = [f"sm_{arch}"]
        if ptx or arch == newest:
            codes.append(f"compute_{arch}")
        flags += ["-gencode", f"arch=compute_{arch},code=[{','.join(codes)}]"]
    return flags


def sources(root: str | None = None) -> list[str]:
    found = []
    for d, _dirs, files in os.walk(csrc_dir(root)):
        found += [os.path.join(d, f) for f in files if f.endswith(".cu")]
    return sorted(found)


def _headers_digest(root: str | None = None) -> bytes:
    h = hashlib.sha256()
    for d, _dirs, files in sorted(os.walk(csrc_dir(root))):
        for f in sorted(files):
            if f.endswith((".cuh", ".h", ".hpp")):
                p = os.path.join(d, f)
                h.update(p.encode())
                with open(p, "rb") as fh:
                    h.update(fh.read())
    return h.digest()


def default_jobs() -> int:
    env = os.environ.get("MAX_JOBS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    return max(1, os.cpu_count() or 1)


@dataclass
class BuildResult:
    ok: bool
    library: str | None = None
    error: str = ""
    seconds: float = 0.0
    compiled: list[str] = field(default_factory=list)  # sources compiled now (others reused)
    ptxas_logs: dict[str, str] = field(default_factory=dict)  # source -> ptxas report
    command_example: str = ""
    archs: list[tuple[str, bool]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # requested archs this nvcc cannot build
    note: str = ""  # compiled into the library: archs built / dropped, defines


def build(root: str | None = None, archs: list[tuple[str, bool]] | None = None, jobs: int | None = None,
          force: bool = False, log=None) -> BuildResult:
    """Compile (or reuse) every object and link the library. Never raises for a compile error."""
    t0 = time.time()
    root = root or repo_root()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    nvcc = find_nvcc()
    if nvcc is None:
        return BuildResult(False, error="nvcc was not found (not on PATH, no CUDA_HOME/bin/nvcc)")
    try:
        archs = archs or archs_from_env()
        archs, dropped = filter_archs(archs, nvcc_archs(nvcc))
        defines = extra_defines()
    except ValueError as e:
        return BuildResult(False, error=str(e))
    srcs = sources(root)
    if not srcs:
        return BuildResult(False, error=f"no .cu sources under {csrc_dir(root)}")
    version = nvcc_version(nvcc)
    note = build_note(version, archs, dropped, defines)
    if dropped:
        log(f"hilt: dropped {', '.join(dropped)} from the arch list: nvcc {version} cannot build them")
    flags = BASE_FLAGS + defines + gencode_flags(archs)
    key = hashlib.sha256(("\0".join([version, nvcc] + flags)).encode()).hexdigest()[:12]
    objdir = os.path.join(root, "build", "hilt_cuda", key)
    os.makedirs(objdir, exist_ok=True)
    hdr = _headers_digest(root)
    res = BuildResult(False, archs=archs, dropped=dropped, note=note)
    note_flag = f'-DHILT_BUILD_NOTE="{note}"'  # common.cu only (hilt_build_info)
    res.command_example = " ".join([nvcc, *flags, "-c", "<file.cu>", "-o", "<file.o>"])

    def obj_of(src):
        rel = os.path.relpath(src, csrc_dir(root)).replace(os.sep, "__")
        return os.path.join(objdir, rel[:-3] + ".o")

    def src_flags(src):
        return [note_flag] if os.path.basename(src) == "common.cu" else []

    def digest(src):
        with open(src, "rb") as fh:
            return hashlib.sha256(hdr + fh.read() + " ".join(src_flags(src)).encode()).hexdigest()

    todo = []
    for src in srcs:
        obj = obj_of(src)
        stamp = obj + ".hash"
        fresh = (not force and os.path.isfile(obj) and os.path.isfile(stamp) and os.path.isfile(obj + ".ptxas.txt")
                 and open(stamp).read().strip() == digest(src))
        if not fresh:
            todo.append(src)

    def compile_one(src):
        obj = obj_of(src)
        cmd = [nvcc, *flags, *src_flags(src), "-I", csrc_dir(root), "-c", src, "-o", obj + ".tmp"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        return src, obj, cmd, p

    errors = []
    if todo:
        n = min(jobs or default_jobs(), len(todo))
        log(f"hilt: compiling {len(todo)} CUDA source(s) for sm_{', sm_'.join(a for a, _ in archs)} "
            f"with {n} parallel nvcc job(s)...")
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            for src, obj, cmd, p in pool.map(compile_one, todo):
                if p.returncode != 0:
                    errors.append(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}")
                    continue
                os.replace(obj + ".tmp", obj)
                with open(obj + ".ptxas.txt", "w") as fh:
                    fh.write(p.stdout + p.stderr)
                with open(obj + ".hash", "w") as fh:
                    fh.write(digest(src))
                res.compiled.append(src)
    for src in srcs:
        p = obj_of(src) + ".ptxas.txt"
        if os.path.isfile(p):
            with open(p) as fh:
                res.ptxas_logs[src] = fh.read()
    if errors:
        res.error = "nvcc failed:\n" + "\n".join(errors)
        res.seconds = time.time() - t0
        return res

    lib = os.path.join(objdir, LIB_NAME)
    objs = [obj_of(s) for s in srcs]
    if force or todo or not os.path.isfile(lib) or any(os.path.getmtime(o) > os.path.getmtime(lib) for o in objs):
        cmd = [nvcc, *LINK_FLAGS, *objs, "-o", lib + ".tmp"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            res.error = f"linking failed:\n$ {' '.join(cmd)}\n{p.stdout}{p.stderr}"
            res.seconds = time.time() - t0
            return res
        os.replace(lib + ".tmp", lib)
    res.ok = True
    res.library = lib
    res.seconds = time.time() - t0
    return res


# --------------------------------------------------------------------------------- ptxas report
@dataclass
class KernelInfo:
    name: str
    arch: str
    registers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    source: str = ""


def parse_ptxas(text: str, source: str = "") -> list[KernelInfo]:
    """Kernels (entry functions) of an ``-Xptxas -v`` report."""
    out: list[KernelInfo] = []
    cur: KernelInfo | None = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = KernelInfo(m.group(1), m.group(2), source=source)
            out.append(cur)
            continue
        if re.search(r"Function properties for (\S+)", line):
            fn = re.search(r"Function properties for (\S+)", line).group(1)
            if cur is None or fn != cur.name:
                cur = None  # a non-entry device function: not reported
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.stack, cur.spill_stores, cur.spill_loads = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur.registers = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur.smem = int(sm.group(1)) if sm else 0
    return out


def demangle(names: list[str]) -> dict[str, str]:
    tool = None
    nvcc = find_nvcc()
    if nvcc and os.path.isfile(os.path.join(os.path.dirname(nvcc), "cu++filt")):
        tool = os.path.join(os.path.dirname(nvcc), "cu++filt")
    tool = tool or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    try:
        p = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, timeout=60)
        lines = p.stdout.splitlines()
        if len(lines) != len(names):
            return {n: n for n in names}
        return dict(zip(names, lines))
    except Exception:
        return {n: n for n in names}


def short_name(demangled: str) -> str:
    s = demangled
    if s.startswith("void "):
        s = s[5:]
    s = s.replace("(anonymous namespace)::", "")
    # drop the argument list: the last top-level "(...)"
    depth = 0
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            s = s[:i]
            break
    s = re.sub(r"\b(hilt::bla::|hilt::|\(anonymous namespace\)::)", "", s)
    return s.replace("__nv_bfloat16", "bf16").replace("__half", "f16").replace("float", "f32")
