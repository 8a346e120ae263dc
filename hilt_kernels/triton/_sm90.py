"""Compile hilt's triton kernels for sm_90 without a GPU and report registers, spills, shared memory.

For a :class:`~hilt_kernels.triton._launch.Tuned` kernel and one launch's arguments, every config the
pruner keeps is compiled the way the JIT would compile it on an H100/H200: the JIT's own binder gives
the signature, constexprs and divisibility attributes, ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` builds PTX and cubin, and the bundled ptxas (``-v``) reports the
registers and spill bytes; the shared memory comes from the compiled metadata.

Needs the real JIT: import this with ``TRITON_INTERPRET`` unset (the tests run it in a subprocess).
Tested with triton 3.6 (the GPU image's version) and 3.9 (the newest; CI runs it under both): the JIT
internals used here (``create_function_from_signature``, ``JITFunction._pack_args``) may change in other
releases. Run ``python -m hilt_kernels.triton._sm90 [--full]`` for the table.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232_448  # bytes of shared memory per block on sm_90 (227 KB opt-in)


@dataclass
class Result:
    kernel: str
    case: str
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.spill_stores == 0 and self.spill_loads == 0 and self.shared <= SMEM_LIMIT


def _ptxas_report(ptx: str, arch: str) -> tuple[int, int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(TARGET.arch).path if _takes_arch() else get_ptxas().path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        p = subprocess.run([ptxas, "-v", "-lineinfo", f"--gpu-name={arch}", f.name, "-o", f.name + ".o"],
                           capture_output=True, text=True, check=True)
    log = p.stdout + p.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    loads = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    return regs, stores, loads


def _takes_arch() -> bool:
    import inspect

    from triton.backends.nvidia.compiler import get_ptxas

    return len(inspect.signature(get_ptxas).parameters) > 0


_backend = None
_seen: dict = {}


def compile_config(fn, args, kwargs, config) -> tuple[int, int, int, int, float]:
    """(registers, spill store bytes, spill load bytes, shared bytes, seconds) of ``fn`` compiled for
    sm_90 with these launch arguments and ``config``. Identical compilations are done once."""
    global _backend
    if _backend is None:
        _backend = make_backend(TARGET)
    kw = {**kwargs, **config.all_kwargs()}
    binder = create_function_from_signature(fn.signature, fn.params, _backend)
    bound_args, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(_backend, kw, bound_args, specialization, options)
    key = (fn.__name__, str(signature), str(sorted(constexprs.items(), key=str)), str(attrs), str(options))
    if key in _seen:
        return _seen[key]
    t0 = time.time()
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    regs, stores, loads = _ptxas_report(k.asm["ptx"], "sm_90a")
    _seen[key] = (regs, stores, loads, int(k.metadata.shared), time.time() - t0)
    return _seen[key]


def check_launches(fn_call, case: str) -> list[Result]:
    """Run ``fn_call()`` (a hilt op call on CPU tensors) with every tuned launch intercepted: each
    launch's kept configs are compiled for sm_90 instead of run."""
    from hilt_kernels.triton import _launch

    results: list[Result] = []
    current = {}

    def execute(fn, grid_fn, args, kwargs):
        kernel = current.get("tuned")
        if kernel is not None and fn is kernel.fn:
            fn, name = kernel.fn, kernel.name
            kw = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            configs = kernel.kept(args, kw)
        else:  # an untuned kernel: its own launch parameters
            name = fn.__name__
            kw = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            configs = [triton.Config({}, num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 3))]
        for c in configs:
            regs, st, ld, sh, dt = compile_config(fn, args, kw, c)
            cfg = ",".join(f"{k}={v}" for k, v in c.kwargs.items()) + f",w{c.num_warps},s{c.num_stages}"
            results.append(Result(name, case, cfg.lstrip(","), regs, st, ld, sh, dt))
        grid_fn({**dict(zip(fn.arg_names, args)), **kwargs})  # the launch's grid (checked, recorded)

    original_run = _launch.Tuned.run

    def run(self, grid, args, kwargs):
        current["tuned"] = self
        saved_pick = _launch.pick
        _launch.pick = lambda name, kept: kept[0]  # take the fixed-config path, so _execute sees the args
        try:
            return original_run(self, grid, args, kwargs)
        finally:
            _launch.pick = saved_pick
            current["tuned"] = None

    saved = (_launch._execute, _launch.Tuned.run)
    _launch._execute = execute
    _launch.Tuned.run = run
    try:
        try:
            fn_call()
        except _Skip:
            pass
    finally:
        _launch._execute, _launch.Tuned.run = saved
    return results


class _Skip(Exception):
    pass


def bla_cases(full: bool):
    """(case name, callable) pairs: block_local_attention forward + backward launches."""
    from hilt_kernels.triton import block_local_attention as bla

    blocks = [8, 16, 24, 32, 64, 128, 256] if full else [16, 64, 256]
    dims = [32, 64, 80, 128] if full else [64, 128]
    dtypes = [torch.float16, torch.bfloat16, torch.float32] if full else [torch.float16, torch.float32]
    masks = [False, True] if full else [False]
    for b in blocks:
        for D in dims:
            for dt in dtypes:
                for has_mask in masks:
                    name = f"b={b} D={D} {str(dt)[6:]}{' mask' if has_mask else ''}"

                    def call(b=b, D=D, dt=dt, has_mask=has_mask):
                        T = 2 * b
                        q = torch.zeros(1, T, 1, D, dtype=dt)
                        mask = torch.zeros(1, T, dtype=torch.bool) if has_mask else None
                        out, lse = bla.forward(q, q, q, b, True, D**-0.5, mask)
                        bla.backward(q, q, q, q, out, lse, b, True, D**-0.5, mask)

                    yield name, call


def other_cases(full: bool):
    """attention_pool, window2_attention, ema_depth_scan at representative shapes."""
    from hilt_kernels.triton import attention_pool as ap
    from hilt_kernels.triton import ema_depth_scan as ema
    from hilt_kernels.triton import window2_attention as w2a

    dtypes = [torch.float16, torch.bfloat16, torch.float32] if full else [torch.float16, torch.float32]
    for dt in dtypes:
        s = str(dt)[6:]
        for b in ([8, 64, 256] if full else [64]):
            for shared in (True, False):
                def apool(b=b, shared=shared, dt=dt):
                    T, H, D = 2 * b, 8, 64
                    scores = torch.zeros(1, T, H, dtype=dt)
                    values = torch.zeros((1, T, 768) if shared else (1, T, H, D), dtype=dt)
                    out = ap.forward(scores, values, b, None)
                    ap.backward(out, scores, values, out, b, None)
                yield f"apool b={b} {'shared C=768' if shared else 'heads D=64'} {s}", apool
        for D in ([32, 64, 128, 1024] if full else [64]):
            def window(D=D, dt=dt):
                q = torch.zeros(2, 2, 64, 4, D, dtype=dt)
                w2a.forward(q, q, q, True, D**-0.5)
                w2a.backward(q, q, q, q, True, D**-0.5)
            yield f"w2a D={D} {s}", window
        for per_channel in (False, True):
            def scan(per_channel=per_channel, dt=dt):
                values = torch.zeros(12, 4, 1000, 128, dtype=dt)
                alpha = torch.zeros((12, 128) if per_channel else (12,), dtype=dt)
                ema.forward(values, alpha, values[0], True)
                ema.backward(values, values, alpha, values[0], values, True)
            yield f"ema {'per-channel' if per_channel else 'scalar'} {s}", scan


def run_all(full: bool, log=print) -> list[Result]:
    results = []
    for name, call in list(other_cases(full)) + list(bla_cases(full)):
        rs = check_launches(call, name)
        for r in rs:
            log(f"{r.kernel:22s} {r.case:28s} {r.config:40s} regs {r.registers:3d} spill {r.spill_stores:5d}/"
                f"{r.spill_loads:5d} smem {r.shared:6d} {'OK' if r.ok else 'BAD'} ({r.seconds:.1f}s)")
        results += rs
    return results


if __name__ == "__main__":
    import sys

    t0 = time.time()
    res = run_all("--full" in sys.argv)
    bad = [r for r in res if not r.ok]
    print(f"{len(res)} kernel/config/case checks, {len(_seen)} distinct compilations, {len(bad)} bad, "
          f"{time.time() - t0:.0f}s")
    sys.exit(1 if bad else 0)
