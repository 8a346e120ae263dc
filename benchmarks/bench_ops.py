"""CPU benchmark of the four ops' reference backend against plain-torch formulations.

For each op, forward and forward+backward, measured side by side in interleaved rounds:
  * hilt reference           — what ``backend="reference"`` runs
  * naive eager              — the obvious loop (per block / per depth step / permute + SDPA)
  * plain-torch formulations — for block_local_attention the ones of DESIGN.md: one SDPA call on
                               per-block views, one SDPA call per block slice, batched matmul
  * torch.compile            — of the reference math (skipped with --no-compile / --quick)

    python benchmarks/bench_ops.py                   # full run (a few minutes on 2 cores)
    python benchmarks/bench_ops.py --quick           # fewer sizes, no torch.compile

Writes a markdown table to stdout and JSON + markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import markdown_table, time_interleaved  # noqa: E402

import hilt_kernels  # noqa: E402


def time_mode(providers, base, mode, rounds):
    """Interleaved timings of every provider: forward only (no grad) or forward + backward of the sum."""
    if mode == "fwd":
        fns = {n: (lambda f=f: f(*base)) for n, f in providers.items()}
        with torch.no_grad():
            return time_interleaved(fns, rounds=rounds)
    leaves = [x.clone().requires_grad_() for x in base]
    fns = {n: (lambda f=f: f(*leaves).sum().backward()) for n, f in providers.items()}
    return time_interleaved(fns, rounds=rounds)


# ----------------------------------------------------------------------------- block_local_attention
def bla_sdpa_block_views(q, k, v, b, causal=True):
    B, T, H, D = q.shape
    nb = -(-T // b)
    if nb * b != T:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, nb * b - T)) for x in (q, k, v))
    view = lambda x: x.reshape(B * nb, b, H, D).transpose(1, 2)  # noqa: E731
    o = F.scaled_dot_product_attention(view(q), view(k), view(v), is_causal=causal)
    return o.transpose(1, 2).reshape(B, nb * b, H, D)[:, :T]


def bla_sdpa_per_block(q, k, v, b, causal=True):
    T = q.shape[1]
    outs = [
        F.scaled_dot_product_attention(
            q[:, s : s + b].transpose(1, 2), k[:, s : s + b].transpose(1, 2), v[:, s : s + b].transpose(1, 2),
            is_causal=causal,
        ).transpose(1, 2)
        for s in range(0, T, b)
    ]
    return torch.cat(outs, dim=1)


def bla_bmm(q, k, v, b, causal=True):
    B, T, H, D = q.shape
    nb = T // b  # benchmark sizes are multiples of b
    qb, kb, vb = (x.view(B, nb, b, H, D).permute(0, 3, 1, 2, 4) for x in (q, k, v))
    s = qb @ kb.transpose(-1, -2) * D**-0.5
    if causal:
        s = s.masked_fill(~torch.ones(b, b, dtype=torch.bool).tril(), float("-inf"))
    o = torch.softmax(s, -1) @ vb
    return o.permute(0, 2, 3, 1, 4).reshape(B, T, H, D)


def bla_naive_loop(q, k, v, b, causal=True):
    T, D = q.shape[1], q.shape[3]
    outs = []
    for s in range(0, T, b):
        qs, ks, vs = (x[:, s : s + b].transpose(1, 2) for x in (q, k, v))
        sc = qs @ ks.transpose(-1, -2) * D**-0.5
        if causal:
            n = sc.shape[-1]
            sc = sc.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        outs.append((torch.softmax(sc, -1) @ vs).transpose(1, 2))
    return torch.cat(outs, dim=1)


def bench_bla(args, results):
    B, T, H, D = args.bla_shape
    blocks = [8, 32, 128] if args.quick else [8, 16, 32, 64, 128]
    rows = []
    for b in blocks:
        g = torch.Generator().manual_seed(0)
        base = [torch.randn(B, T, H, D, generator=g) for _ in range(3)]
        providers = {
            "hilt reference": lambda q, k, v: hilt_kernels.block_local_attention(q, k, v, b, backend="reference"),
            "sdpa block views": lambda q, k, v: bla_sdpa_block_views(q, k, v, b),
            "sdpa per block": lambda q, k, v: bla_sdpa_per_block(q, k, v, b),
            "bmm blocks": lambda q, k, v: bla_bmm(q, k, v, b),
            "naive loop": lambda q, k, v: bla_naive_loop(q, k, v, b),
        }
        if not args.no_compile:
            providers["compile(bmm)"] = torch.compile(lambda q, k, v: bla_bmm(q, k, v, b), dynamic=False)
        ref = providers["hilt reference"](*base)
        for name, fn in providers.items():  # every provider computes the same thing
            err = (fn(*base) - ref).abs().max().item()
            assert err < 1e-4, f"{name} differs from the reference by {err}"
        for mode in ("fwd", "fwd+bwd"):
            t = time_mode(providers, base, mode, args.rounds)
            best_plain = min(t[n]["median_ms"] for n in ("sdpa block views", "sdpa per block", "bmm blocks"))
            ratio = t["hilt reference"]["median_ms"] / best_plain
            rows.append([b, mode] + [f"{t[n]['median_ms']:.2f}" for n in providers] + [f"{ratio:.2f}"])
            print(f"  bla b={b} {mode}: " + ", ".join(f"{n} {t[n]['median_ms']:.2f} ms" for n in providers)
                  + f"; reference / best plain = {ratio:.2f}", flush=True)
            results.append({"op": "block_local_attention", "block_size": b, "mode": mode,
                            "shape": [B, T, H, D], "causal": True, "dtype": "float32", "timings": t,
                            "ratio_reference_to_best_plain": ratio})
    header = ["b", "mode"] + [f"{n} (ms)" for n in providers] + ["reference / best plain"]
    return f"### block_local_attention, B{B} T{T} H{H} D{D}, causal, fp32\n\n" + markdown_table(header, rows)


# ----------------------------------------------------------------------------- the other ops
def apool_naive(scores, values, b):
    B, T, H = scores.shape
    outs = []
    for s in range(0, T, b):
        w = torch.softmax(scores[:, s : s + b], dim=1)  # (B, b, H)
        outs.append(torch.einsum("bjh,bjd->bhd", w, values[:, s : s + b]))
    return torch.stack(outs, dim=1)


def apool_math(scores, values, b):
    B, T, H = scores.shape
    w = torch.softmax(scores.view(B, T // b, b, H), dim=2)
    return w.transpose(-1, -2) @ values.view(B, T // b, b, -1)


def w2a_naive(q, k, v, causal=True):
    B, W, T, H, D = q.shape
    perm = lambda x: x.permute(0, 2, 3, 1, 4).reshape(B * T * H, 1, 2, D)  # noqa: E731
    mask = torch.ones(2, 2, dtype=torch.bool).tril() if causal else None
    o = F.scaled_dot_product_attention(perm(q), perm(k), perm(v), attn_mask=mask)
    return o.view(B, T, H, 2, D).permute(0, 3, 1, 2, 4)


def w2a_math(q, k, v, causal=True):
    s = torch.einsum("bitHd,bjtHd->btHij", q, k) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(~torch.ones(2, 2, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("btHij,bjtHd->bitHd", torch.softmax(s, -1), v)


def ema_naive(values, alpha_logits):
    a = torch.sigmoid(alpha_logits)
    s, out = torch.zeros_like(values[0]), []
    for l in range(values.shape[0]):
        s = (1 - a[l]) * s + a[l] * values[l]
        out.append(s)
    return torch.stack(out)


def bench_small_ops(args, results):
    g = torch.Generator().manual_seed(0)
    B, T = (2, 1024) if args.quick else (4, 2048)
    cases = {
        "attention_pool (shared values C=512, H=8, b=8)": (
            [torch.randn(B, T, 8, generator=g), torch.randn(B, T, 512, generator=g)],
            {
                "hilt reference": lambda s, v: hilt_kernels.attention_pool(s, v, 8, backend="reference"),
                "naive loop": lambda s, v: apool_naive(s, v, 8),
                "compile(math)": torch.compile(lambda s, v: apool_math(s, v, 8), dynamic=False),
            },
        ),
        "window2_attention (H=2, D=64, causal)": (
            [torch.randn(B, 2, T, 2, 64, generator=g) for _ in range(3)],
            {
                "hilt reference": lambda q, k, v: hilt_kernels.window2_attention(q, k, v, backend="reference"),
                "permute+SDPA": w2a_naive,
                "compile(math)": torch.compile(w2a_math, dynamic=False),
            },
        ),
        "ema_depth_scan (L=12, S=(B, T, 128), per-layer alpha)": (
            [torch.randn(12, B, T, 128, generator=g), torch.randn(12, generator=g)],
            {
                "hilt reference": lambda v, a: hilt_kernels.ema_depth_scan(v, a, backend="reference"),
                "python loop": ema_naive,
                "compile(loop)": torch.compile(ema_naive, dynamic=False),
            },
        ),
    }
    text = []
    for title, (base, providers) in cases.items():
        if args.no_compile:
            providers = {n: f for n, f in providers.items() if not n.startswith("compile")}
        ref = providers["hilt reference"](*base)
        for name, fn in providers.items():
            err = (fn(*base) - ref).abs().max().item()
            assert err < 1e-4, f"{title}: {name} differs from the reference by {err}"
        rows = []
        for mode in ("fwd", "fwd+bwd"):
            t = time_mode(providers, base, mode, args.rounds)
            ref_ms = t["hilt reference"]["median_ms"]
            rows.append([mode] + [f"{t[n]['median_ms']:.2f} ({t[n]['median_ms'] / ref_ms:.2f}x)" for n in providers])
            results.append({"op": title, "mode": mode, "timings": t})
            print(f"  {title} {mode}: " + ", ".join(f"{n} {t[n]['median_ms']:.2f} ms" for n in providers), flush=True)
        header = ["mode"] + [f"{n} ms (time / reference)" for n in providers]
        text.append(f"### {title}, B{B} T{T}\n\n" + markdown_table(header, rows))
    return "\n\n".join(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer sizes and rounds, no torch.compile (about a minute)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 7, 3 with --quick)")
    p.add_argument("--only", choices=["bla", "others"], default=None, help="benchmark only one group")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's default). On a shared, busy machine, 1 thread "
                        "avoids OpenMP barrier stalls that slow small ops far more than large ones")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder for the JSON and markdown results")
    args = p.parse_args(argv)
    args.no_compile = args.no_compile or args.quick
    if args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.bla_shape = (2, 1024, 8, 64) if args.quick else (4, 2048, 8, 64)
    torch.manual_seed(0)
    device = platform.processor() or platform.machine()
    head = (f"CPU: {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{dt.date.today().isoformat()}, command: python benchmarks/bench_ops.py {' '.join(argv or sys.argv[1:])}")
    results, sections = [], []
    if args.only in (None, "bla"):
        sections.append(bench_bla(args, results))
    if args.only in (None, "others"):
        sections.append(bench_small_ops(args, results))
    text = f"## CPU op benchmark\n\n{head}\n\n" + "\n\n".join(sections) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"ops_cpu{'_' + args.only if args.only else ''}{'_quick' if args.quick else ''}")
    with open(stem + ".json", "w") as f:
        json.dump({"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "date": dt.date.today().isoformat(), "argv": argv or sys.argv[1:], "results": results}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
