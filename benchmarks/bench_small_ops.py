"""Benchmark of attention_pool, window2_attention and ema_depth_scan on every backend.

For each op and mode (fwd, bwd, fwd+bwd), side by side in interleaved rounds:
  hilt reference / hilt triton / hilt cuda   the op's backends (skipped with the dispatcher's reasons)
  eager (math)                               the reference math written in plain PyTorch, run eagerly
  compile (math)                             torch.compile of the same function (not with --quick)

Every provider is checked against the reference backend in fp32 before it is timed (FAILED otherwise).
Reported: median time and spread, minimum bytes moved (each input read once, each output written once —
see ``bytes_moved`` below), GB/s and % of the copy bandwidth measured at the start of the run, and the
speedup over torch.compile (compile ms / provider ms; DESIGN.md's target is >= 1 on a GPU).

    python benchmarks/bench_small_ops.py --quick      # CPU, well under a minute
    python benchmarks/bench_small_ops.py              # full: GPU sizes on a GPU (bf16), CPU sizes otherwise

Writes a table to stdout and <out>/<tag>.json and .md (default out: benchmarks/results/).
"""

from __future__ import annotations

import os
import sys

if "--interpret" in sys.argv:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as tm  # noqa: E402

import hilt_kernels  # noqa: E402
from hilt_kernels.dispatch import backend_reasons  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")
BACKENDS = ("reference", "triton", "cuda")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------- the reference math, plain torch
def apool_math(scores, values, b):
    """Block softmax of the scores weighting the block's values (T a multiple of b)."""
    B, T, H = scores.shape
    nb = T // b
    w = torch.softmax(scores.view(B, nb, b, H).float(), dim=2).to(values.dtype)
    if values.dim() == 3:
        return torch.einsum("bnjh,bnjd->bnhd", w, values.view(B, nb, b, -1))
    return torch.einsum("bnjh,bnjhd->bnhd", w, values.view(B, nb, b, H, -1))


def w2a_math(q, k, v, causal=True):
    """The 2×2 attention over the layer axis, per token and head."""
    s = torch.einsum("bitHd,bjtHd->btHij", q.float(), k.float()) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(~torch.ones(2, 2, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.einsum("btHij,bjtHd->bitHd", torch.softmax(s, -1), v.float()).to(q.dtype)


def ema_math(values, alpha_logits):
    """S^l = (1 − α_l) S^{l−1} + α_l values_l, fp32 state, all L states returned."""
    a = torch.sigmoid(alpha_logits.float())  # a[l]: a scalar, or (C,) broadcasting over the last dim
    s = torch.zeros_like(values[0], dtype=torch.float32)
    out = []
    for layer in range(values.shape[0]):
        al = a[layer]
        s = (1 - al) * s + al * values[layer].float()
        out.append(s)
    return torch.stack(out).to(values.dtype)


# ----------------------------------------------------------------------------- cases
@dataclass
class OpCase:
    """One op at one size: its inputs, which of them get gradients, the providers, the bytes moved."""

    op: str
    label: str
    shape: dict
    make: Callable[[torch.Generator, str, torch.dtype], tuple]  # -> inputs (tensors)
    diff_idx: tuple
    hilt: Callable  # hilt(*inputs, backend=...) -> out
    math: Callable  # math(*inputs) -> out
    bytes_fn: Callable[[tuple, torch.Tensor, str], int]
    backend_args: Callable[[tuple], tuple]  # inputs -> the backend forward's arguments (for backend_reasons)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def apool_bytes(inputs, out, mode):
    """fwd: scores + values read, out written. bwd: dout, scores, values, out read; dscores, dvalues written."""
    scores, values = inputs
    fwd = _nbytes(scores, values, out)
    bwd = 2 * _nbytes(scores, values) + 2 * _nbytes(out)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def w2a_bytes(inputs, out, mode):
    """fwd: q, k, v read, out written (4 N). bwd: dout, q, k, v read; dq, dk, dv written (7 N)."""
    n = _nbytes(out)
    return {"fwd": 4 * n, "bwd": 7 * n, "fwd+bwd": 11 * n}[mode]


def ema_bytes(inputs, out, mode):
    """fwd: values read, states written (2 N). bwd: grad, values read, dvalues written (3 N; a kernel that
    reads the saved states instead of recomputing them moves 4 N). alpha's bytes are negligible."""
    n = _nbytes(out)
    return {"fwd": 2 * n, "bwd": 3 * n, "fwd+bwd": 5 * n}[mode]


def build_cases(args) -> list[OpCase]:
    gpu = args.device == "cuda"
    b = 8
    if gpu:  # DESIGN.md-scale: 64k tokens (256k for window2, whose tensors are small per token)
        B, T, H, D, C = 16, 4096, 16, 64, 512
        wB, wT, wH, wD = 64, 4096, 2, 64
        L, eS = 12, (16, 4096, 256)
    elif args.quick:
        B, T, H, D, C = 2, 1024, 8, 64, 256
        wB, wT, wH, wD = 2, 1024, 2, 64
        L, eS = 12, (2, 1024, 128)
    else:
        B, T, H, D, C = 4, 2048, 8, 64, 512
        wB, wT, wH, wD = 4, 2048, 2, 64
        L, eS = 12, (4, 2048, 128)
    if args.interpret:  # the Triton interpreter is ~1000x slower
        B, T, H, D, C = 1, 64, 2, 16, 32
        wB, wT, wH, wD = 1, 64, 2, 16
        L, eS = 4, (1, 64, 32)

    def rn(g, dev, dt, *shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=dt)

    cases = [
        OpCase("attention_pool", f"per-head values, b={b}", dict(B=B, T=T, H=H, D=D, block_size=b),
               lambda g, dev, dt: (rn(g, dev, dt, B, T, H), rn(g, dev, dt, B, T, H, D)), (0, 1),
               lambda s, v, backend=None: hilt_kernels.attention_pool(s, v, b, backend=backend),
               lambda s, v: apool_math(s, v, b), apool_bytes, lambda xs: (*xs, b, None)),
        OpCase("attention_pool", f"shared values C={C}, b={b}", dict(B=B, T=T, H=H, C=C, block_size=b),
               lambda g, dev, dt: (rn(g, dev, dt, B, T, H), rn(g, dev, dt, B, T, C)), (0, 1),
               lambda s, v, backend=None: hilt_kernels.attention_pool(s, v, b, backend=backend),
               lambda s, v: apool_math(s, v, b), apool_bytes, lambda xs: (*xs, b, None)),
        OpCase("window2_attention", "causal", dict(B=wB, T=wT, H=wH, D=wD),
               lambda g, dev, dt: tuple(rn(g, dev, dt, wB, 2, wT, wH, wD) for _ in range(3)), (0, 1, 2),
               lambda q, k, v, backend=None: hilt_kernels.window2_attention(q, k, v, backend=backend),
               lambda q, k, v: w2a_math(q, k, v, True), w2a_bytes,
               lambda xs: (*xs, True, xs[0].shape[-1] ** -0.5)),
        OpCase("ema_depth_scan", "per-layer alpha, return_all", dict(L=L, S=list(eS)),
               lambda g, dev, dt: (rn(g, dev, dt, L, *eS), rn(g, dev, torch.float32, L)), (0, 1),
               lambda v, a, backend=None: hilt_kernels.ema_depth_scan(v, a, backend=backend),
               ema_math, ema_bytes, lambda xs: (*xs, None, True)),
    ]
    if args.ops:
        cases = [c for c in cases if c.op in args.ops]
    return cases


# ----------------------------------------------------------------------------- running
def backend_reason(case: OpCase, backend: str, inputs) -> str | None:
    """None if ``backend`` can run this case, else the dispatcher's reasons."""
    if backend == "triton" and inputs[0].device.type == "cpu" and not os.environ.get("TRITON_INTERPRET") == "1":
        return "the Triton interpreter is off (pass --interpret to run it on the CPU, tiny sizes only)"
    reasons = backend_reasons(case.op, backend, tuple(x for x in inputs if x.is_floating_point()),
                              case.backend_args(inputs))
    return "; ".join(reasons) or None


def run_case(case: OpCase, dtype: torch.dtype, args, peak_gbs: float, log) -> list[dict]:
    dev = args.device
    g = torch.Generator(device=dev).manual_seed(args.seed)
    probe = case.make(g, dev, dtype)
    with torch.no_grad():
        out0 = case.math(*probe)
    ws = _nbytes(*probe) + 2 * _nbytes(out0)
    copies = tm.copies_for(ws, dev)
    sets = [probe] + [case.make(g, dev, dtype) for _ in range(copies - 1)]
    grad_outs = [torch.randn(out0.shape, generator=g, device=dev, dtype=out0.dtype) for _ in range(copies)]
    need_grad = any(m != "fwd" for m in args.modes)
    ref = lambda *xs: case.hilt(*xs, backend="reference")  # noqa: E731
    ref_out, ref_grads = tm.reference_outputs(ref, probe, grad_outs[0] if need_grad else None, case.diff_idx)

    providers: dict[str, Callable | None] = {}
    status: dict[str, dict] = {}
    for backend in BACKENDS:
        name = f"hilt {backend}"
        why = backend_reason(case, backend, probe)
        if why:
            status[name] = {"status": "skipped", "reason": why}
        else:
            providers[name] = (lambda be: (lambda *xs: case.hilt(*xs, backend=be)))(backend)
    providers["eager (math)"] = case.math
    if args.no_compile:
        status["compile (math)"] = {"status": "skipped", "reason": "off (--quick / --no-compile)"}
    else:
        providers["compile (math)"] = torch.compile(case.math, dynamic=False)
    ready = {}
    for name, fn in providers.items():
        try:
            chk = tm.check_against(fn, probe, grad_outs[0] if need_grad else None, ref_out, ref_grads, dtype,
                                   case.diff_idx)
        except Exception as e:  # noqa: BLE001
            status[name] = {"status": "FAILED", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            if args.verbose:
                traceback.print_exc()
            continue
        status[name] = {"status": "ok", **chk}
        ready[name] = fn
    names = [n for n in (*(f"hilt {b}" for b in BACKENDS), "eager (math)", "compile (math)") if n in status]

    records = []
    for mode in args.modes:
        builders = {n: (lambda fn=fn: tm.mode_callable(fn, sets, grad_outs, mode, case.diff_idx))
                    for n, fn in ready.items() if tm.mode_ok(status[n], mode)}
        timings, fns, failed = tm.time_providers_safely(builders, dev, args.rounds, args.min_time)
        mode_status = {n: {**status[n], "status": "FAILED", "reason": why} for n, why in failed.items()}
        nbytes = case.bytes_fn(probe, out0, mode)
        comp = timings.get("compile (math)", {}).get("median_ms")
        eager = timings.get("eager (math)", {}).get("median_ms")
        for name in names:
            st = mode_status.get(name, status[name])
            rec = {"op": case.op, "case": case.label, **case.shape, "dtype": tm.dtype_name(dtype), "mode": mode,
                   "provider": name, "bytes": nbytes, "input_copies": copies,
                   **{k: v for k, v in st.items() if k != "status"}, "status": st["status"]}
            if st["status"] == "ok":
                rec["status"], rec["reason"] = tm.verdict(st, mode)
                if rec["status"] == "ok" and name not in timings:
                    rec["status"], rec["reason"] = "FAILED", "not timed"
            if name in timings:
                t = timings[name]
                rec.update(t)
                rec["GB/s"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
                rec["pct_peak"] = 100 * rec["GB/s"] / peak_gbs
                rec["speedup_vs_compile"] = comp / t["median_ms"] if comp else None
                rec["speedup_vs_eager"] = eager / t["median_ms"] if eager else None
                rec["peak_mem_MiB"] = tm.peak_memory_mib(fns[name], dev)
            records.append(rec)
        log(f"  {case.op} ({case.label}) {tm.dtype_name(dtype)} {mode}: "
            + ", ".join(f"{n} {tm.fmt(t['median_ms'])} ms" for n, t in timings.items()))
        del fns
    if dev == "cuda":
        torch.cuda.empty_cache()
    return records


def results_table(records) -> str:
    header = ["op", "case", "dtype", "mode", "provider", "median ms", "min–max ms", "GB/s", "% peak", "peak MiB",
              "vs eager", "vs compile"]
    rows = []
    for r in records:
        if r["status"] == "skipped":
            continue
        lead = [r["op"], r["case"], r["dtype"], r["mode"], r["provider"]]
        if "median_ms" not in r:
            rows.append(lead + [f"FAILED: {r.get('reason', '')}"] + ["-"] * 6)
            continue
        x = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
        rows.append(lead + [tm.fmt(r["median_ms"]), f"{tm.fmt(r['min_ms'])}–{tm.fmt(r['max_ms'])}", tm.fmt(r["GB/s"]),
                            tm.fmt(r["pct_peak"], 2), tm.fmt(r.get("peak_mem_MiB")), x(r.get("speedup_vs_eager")),
                            x(r.get("speedup_vs_compile"))])
    return tm.markdown_table(header, rows)


def report(args, env, copy_bw, records, finished) -> str:
    shapes = {}
    for r in records:
        shapes.setdefault((r["op"], r["case"]), {k: r[k] for k in ("B", "T", "H", "D", "C", "L", "S", "block_size")
                                                  if k in r})
    lines = ["## attention_pool / window2_attention / ema_depth_scan benchmark\n", tm.environment_line(env), "",
             f"Measured copy bandwidth {copy_bw['GB/s']:.1f} GB/s (read + write); medians over {args.rounds} "
             f"interleaved rounds; 'vs compile' = torch.compile ms / provider ms (> 1: faster than compile)"
             f"{'' if finished else '; **stopped early (budget)**'}.", ""]
    lines += [f"- {op} ({case}): {sh}" for (op, case), sh in shapes.items()]
    lines += ["", results_table(records), ""]
    skipped = dict.fromkeys((r["provider"], r["reason"]) for r in records if r["status"] == "skipped")
    if skipped:
        lines += ["Not run:", ""] + [f"- {p}: skipped — {why}" for p, why in skipped] + [""]
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small CPU sizes, no torch.compile")
    p.add_argument("--interpret", action="store_true", help="hilt triton on the CPU under TRITON_INTERPRET=1, tiny")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtypes", nargs="+", default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--ops", nargs="+", choices=["attention_pool", "window2_attention", "ema_depth_scan"], default=None)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--min-time", type=float, default=None)
    p.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--tag", default=None)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    gpu = args.device == "cuda"
    args.dtypes = [tm.parse_dtype(d) for d in (args.dtypes or (["bf16"] if gpu else ["fp32"]))]
    args.no_compile = args.no_compile or args.quick or args.interpret
    if args.rounds is None:
        args.rounds = 10 if gpu else (3 if args.quick or args.interpret else 7)
    if args.min_time is None:
        args.min_time = 0.02 if gpu else (0.0 if args.interpret else (0.03 if args.quick else 0.05))
    if args.tag is None:
        args.tag = "small_ops_" + ("gpu" if gpu else "cpu") + ("_quick" if args.quick else "") + (
            "_interpret" if args.interpret else "")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    tm.allow_repeated_compiled_backward()
    env = tm.environment(args.device, [os.path.relpath(os.path.abspath(__file__))] + argv)
    copy_bw = tm.copy_bandwidth(args.device)
    print(f"{tm.environment_line(env)}\ncopy bandwidth {copy_bw['GB/s']:.1f} GB/s (read + write)", flush=True)
    records: list[dict] = []
    finished = True
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.tag)
    jobs = [(c, dt) for dt in args.dtypes for c in build_cases(args)]
    for i, (case, dtype) in enumerate(jobs):
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: {len(jobs) - i} case(s) not run", flush=True)
            finished = False
            break
        records += run_case(case, dtype, args, copy_bw["GB/s"], lambda m: print(m, flush=True))
        with open(stem + ".json", "w") as f:
            json.dump({"benchmark": "bench_small_ops", "environment": env, "copy_bandwidth": copy_bw,
                       "finished": finished and i == len(jobs) - 1, "elapsed_s": time.perf_counter() - t0,
                       "results": records}, f, indent=1, default=tm.json_default)
    text = report(args, env, copy_bw, records, finished)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print()
    print(text)
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
