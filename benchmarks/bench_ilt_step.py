"""Benchmark of the Inter-Layer Transformer's decoding step (HILT's per-token ILT) against the number of
tokens per call, on the CPU: the CPU library's fused step (csrc/cpu/ilt_step.cpp), the same step as PyTorch
ops on packed weights (the path without the library), and the module's forward.

Every provider is checked against the module forward first (fp32, 1e-4). Interleaved rounds, median ms.
Sizes: the README's HILT (d_model 128, ilt_dim 64) and bench_generate's matched one (d_model 216, ilt_dim 104),
2 heads, 2 window layers, d_ff 4 * ilt_dim.

    python benchmarks/bench_ilt_step.py                 # 1 thread, tokens 1..256
    python benchmarks/bench_ilt_step.py --threads 2 --quick

Writes <out>/<tag>.json and .md (default: benchmarks/results/ilt_step_cpu.*). The library's limit per call
(hilt_kernels.cpu.ilt_step.MAX_TOKENS) is chosen from this table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as tm  # noqa: E402

from hilt.nn import InterLayerTransformer  # noqa: E402
from hilt_kernels.cpu import ilt_step as cpu_ilt  # noqa: E402

SIZES = [(128, 64), (216, 104)]
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def providers(ilt: InterLayerTransformer, n: int, d: int) -> dict:
    g = torch.Generator().manual_seed(n)
    prev, cur = torch.randn(n, 1, d, generator=g), torch.randn(n, 1, d, generator=g)
    scale = torch.tensor(0.1)
    ops = ilt.step_weights()
    ops.cpu = None  # the PyTorch-ops path
    fns = {"pytorch ops": lambda: ops(prev, cur, cur, scale),
           "module forward": lambda: cur + scale * ilt(prev, cur)}
    lib = cpu_ilt.pack(ilt)
    if lib is not None:
        lib.max_tokens = 1 << 30  # time it beyond MAX_TOKENS too
        fns = {"library": lambda: lib(prev, cur, cur, scale), **fns}
    ref = fns["module forward"]()
    for name, fn in fns.items():
        torch.testing.assert_close(fn(), ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    return fns


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="tokens 1, 8, 32; 3 rounds")
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--tag", default="ilt_step_cpu")
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.rounds = [1, 8, 32], 3
    torch.set_num_threads(a.threads)
    results = {"env": tm.environment("cpu"), "threads": a.threads, "load_average": [round(os.getloadavg()[0], 2)],
               "library": cpu_ilt.unavailable_reason(InterLayerTransformer(8, 8, 2)) or "used",
               "max_tokens": cpu_ilt.MAX_TOKENS, "rows": []}
    with torch.no_grad():
        for d, I in SIZES:
            torch.manual_seed(0)
            ilt = InterLayerTransformer(d, ilt_dim=I, n_heads=2, n_layers=2, dropout=0.0).eval()
            for n in a.tokens:
                t = tm.time_interleaved(providers(ilt, n, d), rounds=a.rounds, min_time=0.05)
                row = {"d_model": d, "ilt_dim": I, "tokens": n, **{k: v["median_ms"] * 1e3 for k, v in t.items()}}
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
    results["load_average"].append(round(os.getloadavg()[0], 2))
    names = [k for k in ("library", "pytorch ops", "module forward") if k in results["rows"][0]]
    lines = [f"# ILT decoding step ({a.tag})", "",
             f"Machine: {tm.environment_line(results['env'])}; {a.threads} thread(s); 1-minute load average "
             f"{'–'.join(map(str, results['load_average']))}; CPU library: {results['library']}; MAX_TOKENS "
             f"{results['max_tokens']}. Median µs per call of {a.rounds} interleaved rounds.", "",
             tm.markdown_table(["d_model", "ilt_dim", "tokens", *[f"{k} µs" for k in names], "ops / library"],
                               [[r["d_model"], r["ilt_dim"], r["tokens"], *[tm.fmt(r[k]) for k in names],
                                 f"{r['pytorch ops'] / r['library']:.2f}x" if "library" in r else "-"]
                                for r in results["rows"]]), ""]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{a.tag}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(a.out, f"{a.tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
