"""A/B of the CUDA backward kernels' launch bounds on a GPU:

    python -m hilt_kernels.cuda.ab_launch_bounds [--out DIR] [--budget-s S]

A = the default build (``__launch_bounds__(256, 1)``: one CTA per SM for block_local_attention's
backward (108-168 registers) and attention_pool's backward (~180));
B = ``HILT_CUDA_DEFINES="HILT_BLA_BWD_MIN_BLOCKS=2 HILT_APOOL_BWD_MIN_BLOCKS=2"`` (at most 128
registers: two CTAs per SM, possibly with spills).

Both libraries are built for this GPU's arch only (cached in build/hilt_cuda/<flags hash>/); each is
timed in its own subprocess (``HILT_CUDA_LIBRARY``) on the same inputs (median of CUDA-event timed
repetitions), and B's gradients are compared with A's. Prints a markdown table (and writes
``cuda_launch_bounds_ab.{json,md}`` to ``--out``). The defaults change only on a measured gain.
Run by ``benchmarks/gpu_suite.sh``; without a GPU or nvcc it says why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANT_B = "HILT_BLA_BWD_MIN_BLOCKS=2 HILT_APOOL_BWD_MIN_BLOCKS=2"
CASES = {
    # name: (op, shape/params)
    "bla_bwd bf16 B8 T4096 H16 D64 b64 causal": ("bla", dict(B=8, T=4096, H=16, D=64, b=64, causal=True)),
    "bla_bwd bf16 B8 T4096 H16 D128 b128": ("bla", dict(B=8, T=4096, H=16, D=128, b=128, causal=False)),
    "apool_bwd bf16 B8 T4096 H16 D64 b16": ("apool", dict(B=8, T=4096, H=16, D=64, b=16)),
}


def _time_cases(save_dir: str, reps: int) -> dict:
    """In the child: time each backward with the library of $HILT_CUDA_LIBRARY; save the gradients."""
    import torch

    from hilt_kernels.cuda import attention_pool as ap
    from hilt_kernels.cuda import block_local_attention as bla

    dev, dt = "cuda", torch.bfloat16
    res = {}
    for i, (name, (op, p)) in enumerate(CASES.items()):
        g = torch.Generator(device="cpu").manual_seed(0)
        if op == "bla":
            q, k, v, do = (torch.randn(p["B"], p["T"], p["H"], p["D"], generator=g).to(dev, dt) for _ in range(4))
            scale = p["D"] ** -0.5
            out, lse = bla.forward(q, k, v, p["b"], p["causal"], scale, None)

            def fn():
                return bla.backward(do, q, k, v, out, lse, p["b"], p["causal"], scale, None)
        else:
            s = torch.randn(p["B"], p["T"], p["H"], generator=g).to(dev, dt)
            v = torch.randn(p["B"], p["T"], p["H"], p["D"], generator=g).to(dev, dt)
            out = ap.forward(s, v, p["b"], None)
            do = torch.randn(out.shape, generator=g).to(dev, dt)

            def fn():
                return ap.backward(do, s, v, out, p["b"], None)
        grads = fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        times.sort()
        res[name] = times[len(times) // 2]
        torch.save([x.float().cpu() for x in grads], os.path.join(save_dir, f"{i}.pt"))
    return res


def _regs(build_res, kernels=("bla_bwd_dq_kernel", "bla_bwd_dkdv_kernel", "apool_bwd_kernel")) -> dict:
    from . import _build

    out = {}
    for src, text in build_res.ptxas_logs.items():
        infos = _build.parse_ptxas(text)
        names = _build.demangle([k.name for k in infos])
        for k in infos:
            short = _build.short_name(names.get(k.name, k.name))
            if short.split("<")[0] in kernels and "bf16" in short:
                out[short] = f"{k.registers} regs, spill {k.spill_stores}/{k.spill_loads} B"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:  # timing subprocess
        print(json.dumps(_time_cases(a.child, a.reps)))
        return 0
    t0 = time.time()
    import torch

    from . import _build

    if not torch.cuda.is_available():
        print("cuda launch-bounds A/B: SKIPPED (no CUDA device)")
        return 0
    if _build.find_nvcc() is None:
        print("cuda launch-bounds A/B: SKIPPED (nvcc not found)")
        return 0
    major, minor = torch.cuda.get_device_capability()
    archs = [(f"{major}{minor}", False)]
    builds = {}
    for label, defines in (("A default", ""), ("B min 2 CTAs/SM", VARIANT_B)):
        old = os.environ.get("HILT_CUDA_DEFINES")
        os.environ["HILT_CUDA_DEFINES"] = defines
        try:
            builds[label] = _build.build(archs=archs, log=print)
        finally:
            if old is None:
                os.environ.pop("HILT_CUDA_DEFINES")
            else:
                os.environ["HILT_CUDA_DEFINES"] = old
        if not builds[label].ok:
            print(f"cuda launch-bounds A/B: build {label} FAILED:\n{builds[label].error}")
            return 1
        print(f"built {label} in {builds[label].seconds:.0f}s ({time.time() - t0:.0f}s spent)")
    timings, dirs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, res in builds.items():
            if time.time() - t0 > a.budget_s:
                print(f"budget spent before timing {label}")
                break
            dirs[label] = os.path.join(tmp, label.split()[0])
            os.makedirs(dirs[label])
            env = dict(os.environ, HILT_CUDA_LIBRARY=res.library)
            p = subprocess.run([sys.executable, "-m", "hilt_kernels.cuda.ab_launch_bounds", "--child", dirs[label],
                                "--reps", str(a.reps)], env=env, capture_output=True, text=True,
                               timeout=max(30, a.budget_s - (time.time() - t0)))
            if p.returncode != 0:
                print(f"timing {label} failed:\n{p.stdout[-2000:]}{p.stderr[-4000:]}")
                return 1
            timings[label] = json.loads(p.stdout.strip().splitlines()[-1])
        diffs = {}
        if len(dirs) == 2:
            for i, name in enumerate(CASES):
                fa, fb = (os.path.join(d, f"{i}.pt") for d in dirs.values())
                ga, gb = torch.load(fa), torch.load(fb)
                diffs[name] = max(float((x - y).abs().max()) for x, y in zip(ga, gb))
    la, lb = list(builds)
    lines = [f"### CUDA backward launch bounds A/B ({torch.cuda.get_device_name()}, sm_{major}{minor})", "",
             f"A = default (min 1 CTA/SM); B = `HILT_CUDA_DEFINES=\"{VARIANT_B}\"`. Median ms of {a.reps} reps.", "",
             "| case | A ms | B ms | B/A | max abs grad diff |", "|---|---|---|---|---|"]
    for name in CASES:
        ta, tb = timings.get(la, {}).get(name), timings.get(lb, {}).get(name)
        ratio = f"{tb / ta:.3f}" if ta and tb else "-"
        lines.append(f"| {name} | {ta:.3f} | {tb:.3f} | {ratio} | {diffs.get(name, float('nan')):.3g} |"
                     if ta and tb else f"| {name} | {ta} | {tb} | - | - |")
    lines += ["", "| kernel (bf16) | A | B |", "|---|---|---|"]
    ra, rb = _regs(builds[la]), _regs(builds[lb])
    for k in sorted(ra):
        lines.append(f"| {k} | {ra[k]} | {rb.get(k, '-')} |")
    md = "\n".join(lines)
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "cuda_launch_bounds_ab.md"), "w") as fh:
            fh.write(md + "\n")
        with open(os.path.join(a.out, "cuda_launch_bounds_ab.json"), "w") as fh:
            json.dump({"timings_ms": timings, "max_abs_grad_diff": diffs, "regs": {"A": ra, "B": rb},
                       "variant_b": VARIANT_B}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
