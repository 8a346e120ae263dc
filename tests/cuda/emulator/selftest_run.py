"""Child process of the emulator self-tests: ``python selftest_run.py LIB NAME`` (sanitizer runtime
preloaded) calls ``selftest_<NAME>`` of LIB (selftest.cu) and prints one JSON line: the launch's
error code, the emulator's message, the output values. Standard library only (no torch)."""

from __future__ import annotations

import ctypes
import json
import sys


def main(lib_path: str, name: str) -> None:
    lib = ctypes.CDLL(lib_path)
    msg = ctypes.create_string_buffer(4096)
    res = {"name": name}
    if name == "reduce":
        out = (ctypes.c_int * 2)(0, 0)
        res["rc"] = lib.selftest_reduce(out, msg, 4096)
        res["out"] = list(out)
    elif name == "divergent_barrier":
        out = (ctypes.c_int * 64)()
        res["rc"] = lib.selftest_divergent_barrier(out, msg, 4096)
    elif name in ("partial_warp", "exited_lane", "barrier_vs_shuffle"):
        out = (ctypes.c_float * 64)()
        res["rc"] = getattr(lib, f"selftest_{name}")(out, msg, 4096)
        res["out"] = list(out)[:48]
    elif name.startswith("dyn_smem"):  # dyn_smem:<bytes>:<optin>
        _, nbytes, optin = name.split(":")
        out = (ctypes.c_float * 1)(0.0)
        res["rc"] = lib.selftest_dyn_smem(out, int(nbytes), int(optin), msg, 4096)
        res["out"] = list(out)
    elif name == "overflow":
        n = 100
        libc = ctypes.CDLL(None)  # malloc as interposed by the sanitizer: exactly n floats, then a redzone
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        buf = ctypes.c_void_p(libc.malloc(4 * n))
        res["rc"] = lib.selftest_overflow(buf, n, msg, 4096)
    else:
        raise SystemExit(f"unknown self-test {name}")
    res["msg"] = msg.value.decode(errors="replace")
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
