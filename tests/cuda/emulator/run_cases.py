"""Child process of the emulator tests: runs cases (cases.py) with the sanitizer runtime preloaded.

    LD_PRELOAD=<libasan|libtsan> HILT_CUDA_EMULATOR=1 HILT_CUDA_LIBRARY=<emulator .so> \
        python -m tests.cuda.emulator.run_cases --out results.jsonl ID [ID ...]

Writes one JSON line ``{"id", "event": "start"}`` before a case and ``{"id", "event": "done",
"errors": [...], "seconds"}`` after it (flushed), so the parent can name the case during which a
sanitizer aborted the process. A case fails on a wrong value, an exception, or any emulator error
(``hilt_emu_error_count``); sanitizer reports abort the process (halt_on_error).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
import traceback

import torch

from hilt_kernels.dispatch import load_impl

from .cases import BY_ID

TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, dtype, layout="contig", swap=(1, 2)):
    """A tensor of ``shape`` rounded to ``dtype``, laid out as ``layout`` (values independent of it)."""
    if layout == "fused":  # a strided view of a larger (…, 3, D) projection
        x = torch.randn(*shape[:-1], 3, shape[-1], generator=_gen(seed)).to(dtype)
        return x[..., 1, :]
    if layout == "transposed":
        a, b = swap
        s = list(shape)
        s[a], s[b] = s[b], s[a]
        return torch.randn(*s, generator=_gen(seed)).to(dtype).transpose(a, b)
    if layout == "sliced":  # last-dim stride 2
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=_gen(seed)).to(dtype)[..., ::2]
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _grad(shape, seed, dtype, kind):
    if kind == "expand":  # a stride-0 gradient, as out.sum().backward() gives
        return torch.randn((), generator=_gen(seed)).to(dtype).expand(shape)
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _mask(kind, B, T, b, seed=7):
    if kind is None:
        return None
    if kind == "random":
        return torch.rand(B, T, generator=_gen(seed)) < 0.3
    m = torch.zeros(B, T, dtype=torch.bool)
    if kind == "block":  # batch 0: its second block fully padded; other batches: each block's first token
        m[0, b: 2 * b] = True
        m[1:, ::b] = True
    elif kind == "all":
        m[:] = True
    return m


def _check(errors, name, got, ref, dtype, grad=False):
    atol, rtol = TOL[dtype]
    if grad and dtype != torch.float32:
        atol, rtol = atol * 4, rtol * 4
    if tuple(got.shape) != tuple(ref.shape):
        errors.append(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
        return
    g, r = got.double(), ref.double()
    scale = max(1.0, float(r[torch.isfinite(r)].abs().max()) if torch.isfinite(r).any() else 1.0)
    ok = torch.isclose(g, r, rtol=rtol, atol=atol * scale)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        err = (g - r).abs()
        errors.append(f"{name}: {int((~ok).sum())} of {ok.numel()} elements differ (first at {bad}: got "
                      f"{g[tuple(bad)].item():.6g}, reference {r[tuple(bad)].item():.6g}; max |err| "
                      f"{float(err[torch.isfinite(err)].max()) if torch.isfinite(err).any() else float('nan'):.3g})")


def _r64(x):
    return None if x is None else x.double()


def case_bla(c, errors):
    from hilt_kernels.cuda import block_local_attention as cu

    ref = load_impl("block_local_attention", "reference")
    dt = DT[c["dtype"]]
    B, T, H, D, b = c["B"], c["T"], c["H"], c["D"], c["b"]
    lay = c["layout"]
    q = _randn((B, T, H, D), 1, dt, "fused" if lay == "fused" else lay)
    k = (torch.randn(B, T, 1, D, generator=_gen(2)).to(dt).expand(B, T, H, D) if lay == "expand_k"
         else _randn((B, T, H, D), 2, dt, "fused" if lay == "fused" else lay))
    v = _randn((B, T, H, D), 3, dt, "fused" if lay == "fused" else lay)
    m = _mask(c["mask"], B, T, b)
    scale = D ** -0.5
    out, lse = cu.forward(q, k, v, b, c["causal"], scale, m)
    rout, rlse = ref.forward(_r64(q), _r64(k), _r64(v), b, c["causal"], scale, m)
    _check(errors, "out", out, rout, dt)
    _check(errors, "lse", lse, rlse, torch.float32)
    g = _grad((B, T, H, D), 4, dt, c["grad"])
    grads = cu.backward(g, q, k, v, out, lse, b, c["causal"], scale, m)
    rgrads = ref.backward(_r64(g), _r64(q), _r64(k), _r64(v), rout, rlse, b, c["causal"], scale, m)
    for n, x, r in zip(("dq", "dk", "dv"), grads, rgrads):
        _check(errors, n, x, r, dt, grad=True)


def case_w2a(c, errors):
    from hilt_kernels.cuda import window2_attention as cu

    ref = load_impl("window2_attention", "reference")
    dt = DT[c["dtype"]]
    shape = (c["B"], 2, c["T"], c["H"], c["D"])
    q, k, v = (_randn(shape, s, dt, c["layout"], swap=(2, 3)) for s in (1, 2, 3))
    scale = c["D"] ** -0.5
    out = cu.forward(q, k, v, c["causal"], scale)
    _check(errors, "out", out, ref.forward(_r64(q), _r64(k), _r64(v), c["causal"], scale), dt)
    g = _grad(shape, 4, dt, c["grad"])
    grads = cu.backward(g, q, k, v, c["causal"], scale)
    rgrads = ref.backward(_r64(g), _r64(q), _r64(k), _r64(v), c["causal"], scale)
    for n, x, r in zip(("dq", "dk", "dv"), grads, rgrads):
        _check(errors, n, x, r, dt, grad=True)


def case_apool(c, errors):
    from hilt_kernels.cuda import attention_pool as cu

    ref = load_impl("attention_pool", "reference")
    dt, sdt = DT[c["dtype"]], DT[c["sdtype"]]
    B, T, H, D, b = c["B"], c["T"], c["H"], c["D"], c["b"]
    scores = _randn((B, T, H), 1, sdt)
    vshape = (B, T, D) if c["shared"] else (B, T, H, D)
    if c["layout"] == "expand_t":  # stride-0 token dim
        values = torch.randn(B, 1, *vshape[2:], generator=_gen(2)).to(dt).expand(vshape)
    else:
        values = _randn(vshape, 2, dt, c["layout"])
    m = _mask(c["mask"], B, T, b)
    reasons = cu.unsupported(scores, values, b, m)
    if reasons:
        errors.append(f"unsupported by the CUDA backend: {reasons}")
        return
    rout = ref.forward(_r64(scores), _r64(values), b, m)
    if c.get("fwd") == "reference":
        out = rout.to(dt)
    else:
        out = cu.forward(scores, values, b, m)
        _check(errors, "out", out, rout, dt)
    g = _grad(tuple(out.shape), 4, dt, c["grad"])
    ds, dv = cu.backward(g, scores, values, out, b, m)
    rds, rdv = ref.backward(_r64(g), _r64(scores), _r64(values), rout, b, m)
    _check(errors, "dscores", ds, rds, sdt if sdt != torch.float32 else dt, grad=True)
    _check(errors, "dvalues", dv, rdv, dt, grad=True)


def case_ema(c, errors):
    from hilt_kernels.cuda import ema_depth_scan as cu

    ref = load_impl("ema_depth_scan", "reference")
    dt = DT[c["dtype"]]
    L, S = c["L"], tuple(c["S"])
    C = S[-1]
    values = _randn((L, *S), 1, dt, c["layout"])
    alpha = torch.randn(*((L, C) if c["per_channel"] else (L,)), generator=_gen(2))
    init = None
    if c["init"] == "full":
        init = _randn(S, 3, dt)
    elif c["init"] == "bcast":
        init = _randn((C,), 3, dt)
    out = cu.forward(values, alpha, init, c["return_all"])
    rout = ref.forward(_r64(values), alpha.double(), _r64(init), c["return_all"])
    _check(errors, "out", out, rout, dt)
    g = _grad(tuple(out.shape), 4, dt, c["grad"])
    dv, da, di = cu.backward(g, values, alpha, init, out, c["return_all"])
    rdv, rda, rdi = ref.backward(_r64(g), _r64(values), alpha.double(), _r64(init), rout, c["return_all"])
    _check(errors, "dvalues", dv, rdv, dt, grad=True)
    _check(errors, "dalpha", da, rda, dt if dt != torch.float32 else torch.float32, grad=True)
    if init is not None:
        if rdi.shape != di.shape:  # the reference may reduce to init's shape; the kernel returns shape S
            di = di.sum_to_size(rdi.shape)
        _check(errors, "dinit", di, rdi, dt, grad=True)


def case_device(c, errors):
    """The launchers restore the caller's current device (hilt::DeviceGuard)."""
    from hilt_kernels.cuda import window2_attention as cu

    lib = ctypes.CDLL(os.environ["HILT_CUDA_LIBRARY"])
    q = torch.randn(1, 2, 3, 2, 8)
    before = lib.hilt_emu_current_device()
    os.environ["HILT_CUDA_EMULATOR_DEVICE"] = "1"
    try:
        out = cu.forward(q, q, q, True, 0.5)
    finally:
        del os.environ["HILT_CUDA_EMULATOR_DEVICE"]
    if before != 0:
        errors.append(f"current device before the call is {before}, expected 0")
    if lib.hilt_emu_last_launch_device() != 1:
        errors.append(f"the kernel ran on device {lib.hilt_emu_last_launch_device()}, expected 1")
    if lib.hilt_emu_current_device() != 0:
        errors.append(f"the current device changed to {lib.hilt_emu_current_device()} after the call (expected 0)")
    _check(errors, "out", out, load_impl("window2_attention", "reference").forward(q.double(), q.double(),
                                                                                     q.double(), True, 0.5),
           torch.float32)


RUN = {"device": case_device, "bla": case_bla, "w2a": case_w2a, "apool": case_apool, "ema": case_ema}


def run_case(c) -> list[str]:
    errors: list[str] = []
    try:
        RUN[c["op"]](c, errors)
    except Exception as e:  # noqa: BLE001 - reported as the case's failure
        errors.append(f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}")
    return errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("ids", nargs="+")
    a = ap.parse_args(argv)
    if os.environ.get("HILT_CUDA_EMULATOR") != "1":
        raise SystemExit("run_cases needs HILT_CUDA_EMULATOR=1 and HILT_CUDA_LIBRARY=<emulator .so>")
    os.environ["HILT_DEBUG_NAN_FILL"] = "1"  # outputs start as NaN: an unwritten element fails
    torch.set_num_threads(1)
    emu = ctypes.CDLL(os.environ["HILT_CUDA_LIBRARY"])
    emu.hilt_emu_errors.restype = ctypes.c_char_p
    with open(a.out, "a") as fh:
        for cid in a.ids:
            c = BY_ID[cid]
            fh.write(json.dumps({"id": cid, "event": "start"}) + "\n")
            fh.flush()
            emu.hilt_emu_reset_errors()
            t0 = time.time()
            errors = run_case(c)
            if emu.hilt_emu_error_count():
                errors.append("emulator error(s): " + emu.hilt_emu_errors().decode(errors="replace"))
            fh.write(json.dumps({"id": cid, "event": "done", "errors": errors, "seconds": time.time() - t0}) + "\n")
            fh.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
