"""Benchmark of block_local_attention against every provider available on this machine.

Providers (each skipped with its reason when it cannot run here):
  hilt reference      backend="reference" (vectorized PyTorch)
  hilt triton         backend="triton"  (GPU; on the CPU only with --interpret, tiny sizes)
  hilt cuda           backend="cuda"    (the csrc/ kernels, when built)
  sdpa block views    one SDPA call on per-block views x.view(B*nb, b, H, D).transpose(1, 2) — the baseline
  flex attention      torch.compile(flex_attention) with a block mask (not with --quick / --no-flex)
  flash-attn varlen   flash_attn_varlen_func with one "sequence" per block (when flash_attn is installed)
  naive eager         a Python loop over blocks (skipped past --naive-max-blocks blocks)

For every (dtype, head dim, causal, block size) and mode (fwd, bwd, fwd+bwd) it reports the median time
with its spread over interleaved rounds (min/max and IQR), the bytes moved as DESIGN.md defines them
(forward reads q, k, v and writes out: 4·D·elsize bytes per token·head; backward reads q, k, v, out, dout,
writes dq, dk, dv: 8·D·elsize, plus the fp32 lse), GB/s and % of the copy bandwidth measured at the start
of the run, effective TFLOP/s counting only the unmasked (query, key) pairs (forward 4·D per pair,
backward 2.5× that), peak memory (CUDA) and the speedup over "sdpa block views".
Before timing, every provider's output (and gradients, for the modes with a backward) is checked against
the reference backend run in fp32; a provider outside the dtype's tolerance is reported FAILED, not timed.

    python benchmarks/bench_attention.py --quick        # CPU: about a minute
    python benchmarks/bench_attention.py                # CPU full sweep, or the GPU target sizes on a GPU
    python benchmarks/bench_attention.py --interpret    # + hilt triton on the CPU under TRITON_INTERPRET=1

Writes a table to stdout and <out>/<tag>.json, .md and .png (default out: benchmarks/results/).
"""

from __future__ import annotations

import os
import sys

# The Triton interpreter must be switched on before triton is first imported.
if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as tm  # noqa: E402

import hilt_kernels  # noqa: E402
from hilt_kernels.dispatch import backend_reasons  # noqa: E402

OP = "block_local_attention"
BASELINE = "sdpa block views"
PROVIDERS = ("hilt reference", "hilt triton", "hilt cuda", "sdpa block views", "flex attention",
             "flash-attn varlen", "naive eager")
MODES = ("fwd", "bwd", "fwd+bwd")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------- counting
def unmasked_pairs(T: int, b: int, causal: bool) -> int:
    """(query, key) pairs a query may attend to, for one (batch, head): exact, the short last block included."""
    b = max(1, min(b, T)) if T else 1
    full, rest = divmod(T, b)
    if causal:
        return full * b * (b + 1) // 2 + rest * (rest + 1) // 2
    return full * b * b + rest * rest


def bytes_moved(B: int, T: int, H: int, D: int, elsize: int, mode: str) -> int:
    """Minimum bytes through memory (DESIGN.md): forward 4·D·elsize per token·head (q, k, v read, out
    written); backward 8·D·elsize (q, k, v, out, dout read; dq, dk, dv written) + 4 (fp32 lse read);
    fwd+bwd the sum, + 4 for the lse the training forward writes."""
    n = B * T * H
    fwd = 4 * D * elsize * n
    bwd = (8 * D * elsize + 4) * n
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd + 4 * n}[mode]


def flops(B: int, T: int, H: int, D: int, b: int, causal: bool, mode: str) -> int:
    """Effective FLOPs on unmasked entries only: forward 4·D per pair (QKᵀ and PV), backward 2.5× the
    forward (recomputed QKᵀ, dV, dP, dQ, dK), as FlashAttention counts."""
    fwd = 4 * D * unmasked_pairs(T, b, causal) * B * H
    return {"fwd": fwd, "bwd": int(2.5 * fwd), "fwd+bwd": int(3.5 * fwd)}[mode]


# ----------------------------------------------------------------------------- plain-torch providers
def sdpa_block_views(q, k, v, b, causal):
    """One SDPA call over all blocks: (B, T, H, D) -> (B·nb, H, b, D) views (T padded to a multiple of b)."""
    B, T, H, D = q.shape
    nb = -(-T // b)
    if nb * b != T:
        # zero keys in the padded tail of the last block would get weight in the non-causal case: cut them off
        # with a mask only there (causal: padded keys come after every real query, never seen)
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, nb * b - T)) for x in (q, k, v))
    view = lambda x: x.reshape(B * nb, b, H, D).transpose(1, 2)  # noqa: E731
    mask = None
    if nb * b != T and not causal:
        valid = torch.arange(nb * b, device=q.device) < T
        mask = valid.view(1, nb, 1, 1, b).expand(B, nb, 1, 1, b).reshape(B * nb, 1, 1, b)
    o = F.scaled_dot_product_attention(view(q), view(k), view(v), attn_mask=mask, is_causal=causal and mask is None)
    return o.transpose(1, 2).reshape(B, nb * b, H, D)[:, :T]


def naive_eager(q, k, v, b, causal):
    """The obvious loop over blocks (all batches and heads at once per block)."""
    T, D = q.shape[1], q.shape[3]
    outs = []
    for s in range(0, T, b):
        qs, ks, vs = (x[:, s : s + b].transpose(1, 2) for x in (q, k, v))
        sc = (qs @ ks.transpose(-1, -2)) * D**-0.5
        if causal:
            n = sc.shape[-1]
            sc = sc.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        outs.append((torch.softmax(sc, -1) @ vs).transpose(1, 2))
    return torch.cat(outs, dim=1)


_FLEX: dict[str, object] = {}


def flex_status() -> str | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"torch.nn.attention.flex_attention is not importable ({type(e).__name__}: {e})"
    return None


def make_flex(B, T, H, D, b, causal, device):
    """FlexAttention with a block mask. The block size and causality are captured 0-dim tensors, not
    Python constants, so one compiled kernel serves every block size (no recompile per case); the block
    mask (computed once per case, outside the timing) skips the tiles outside the block diagonal."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    fa = _FLEX["fn"]
    bs = torch.tensor(b, device=device)
    everything = torch.tensor(not causal, device=device)

    def mask_mod(batch, head, qi, ki):
        return ((qi // bs) == (ki // bs)) & ((ki <= qi) | everything)

    block_mask = create_block_mask(mask_mod, None, None, T, T, device=device)

    def run(q, k, v, _b=None, _c=None):
        o = fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return o.transpose(1, 2)

    return run


def flash_status(dtype) -> str | None:
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"flash_attn is not installed ({type(e).__name__}: {e})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn supports fp16/bf16 only, not {tm.dtype_name(dtype)}"
    return None


def make_flash(B, T, H, D, b, causal, device):
    """flash_attn_varlen_func with every block as its own sequence (cu_seqlens at the block starts)."""
    from flash_attn import flash_attn_varlen_func

    starts = torch.arange(0, T, b, device=device, dtype=torch.int32)
    cu = torch.cat([(starts + i * T) for i in range(B)] + [torch.tensor([B * T], device=device, dtype=torch.int32)])
    maxlen = min(b, T)

    def run(q, k, v, _b=None, _c=None):
        o = flash_attn_varlen_func(q.reshape(B * T, H, D), k.reshape(B * T, H, D), v.reshape(B * T, H, D),
                                   cu, cu, maxlen, maxlen, causal=causal)
        return o.view(B, T, H, D)

    return run


# ----------------------------------------------------------------------------- provider set-up
@dataclass
class Case:
    B: int
    T: int
    H: int
    D: int
    b: int
    causal: bool
    dtype: torch.dtype
    device: str

    @property
    def key(self) -> dict:
        return {"B": self.B, "T": self.T, "H": self.H, "D": self.D, "block_size": self.b, "causal": self.causal,
                "dtype": tm.dtype_name(self.dtype)}


def setup_provider(name: str, case: Case, args, probe) -> tuple[Callable | None, str | None]:
    """(fn(q, k, v) -> out, None), or (None, why it does not run here)."""
    b, causal = case.b, case.causal
    if name.startswith("hilt "):
        backend = name.split()[1]
        if backend == "triton" and case.device == "cpu" and not args.interpret:
            return None, "the Triton interpreter is off (pass --interpret to run it on the CPU, tiny sizes only)"
        reasons = backend_reasons(OP, backend, probe, (*probe, b, causal, case.D**-0.5, None))
        if reasons:
            return None, "; ".join(reasons)
        return (lambda q, k, v: hilt_kernels.block_local_attention(q, k, v, b, causal=causal, backend=backend)), None
    if name == "sdpa block views":
        return (lambda q, k, v: sdpa_block_views(q, k, v, b, causal)), None
    if name == "naive eager":
        nb = -(-case.T // b)
        if nb > args.naive_max_blocks:
            return None, f"{nb} blocks > --naive-max-blocks {args.naive_max_blocks} (a Python loop per block)"
        return (lambda q, k, v: naive_eager(q, k, v, b, causal)), None
    if name == "flex attention":
        if args.no_flex:
            return None, "off (--quick / --no-flex: it compiles for tens of seconds)"
        if args.interpret:
            return None, "off under --interpret"
        why = flex_status()
        if why:
            return None, why
        return make_flex(case.B, case.T, case.H, case.D, b, causal, case.device), None
    if name == "flash-attn varlen":
        why = flash_status(case.dtype)
        if why:
            return None, why
        if case.device != "cuda":
            return None, "flash-attn needs CUDA tensors"
        return make_flash(case.B, case.T, case.H, case.D, b, causal, case.device), None
    raise ValueError(name)


def make_inputs(case: Case, copies: int, seed: int):
    g = torch.Generator(device=case.device).manual_seed(seed)
    sets = []
    for _ in range(copies):
        q, k, v, do = (torch.randn(case.B, case.T, case.H, case.D, generator=g, device=case.device, dtype=case.dtype)
                       for _ in range(4))
        sets.append((q, k, v, do))
    return sets


# ----------------------------------------------------------------------------- the sweep
def run_case(case: Case, args, peak_gbs: float, log) -> list[dict]:
    es = torch.empty((), dtype=case.dtype).element_size()
    ws = 5 * case.B * case.T * case.H * case.D * es  # q, k, v, out, dout
    copies = 1 if case.device == "cuda" and ws >= 2 * tm.cache_bytes("cuda") else tm.copies_for(ws, case.device)
    sets = make_inputs(case, copies, seed=args.seed)
    q, k, v, do = sets[0]
    need_grad = any(m != "fwd" for m in args.modes)
    ref_fn = lambda q, k, v: hilt_kernels.block_local_attention(q, k, v, case.b, causal=case.causal,  # noqa: E731
                                                                backend="reference")
    ref_out, ref_grads = tm.reference_outputs(ref_fn, (q, k, v), do if need_grad else None, (0, 1, 2))

    records: list[dict] = []
    ready: dict[str, Callable] = {}
    status: dict[str, dict] = {}
    for name in args.providers:
        fn, why = setup_provider(name, case, args, (q, k, v))
        if fn is None:
            status[name] = {"status": "skipped", "reason": why}
            continue
        try:
            chk = tm.check_against(fn, (q, k, v), do if need_grad else None, ref_out, ref_grads, case.dtype,
                                   (0, 1, 2))
        except Exception as e:  # noqa: BLE001 - a provider that crashes is reported, not fatal
            status[name] = {"status": "FAILED", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            if args.verbose:
                traceback.print_exc()
            continue
        status[name] = {"status": "ok", **chk}
        ready[name] = fn
    del ref_out, ref_grads

    for mode in args.modes:
        builders = {name: (lambda fn=fn: tm.mode_callable(fn, [s[:3] for s in sets], [s[3] for s in sets], mode,
                                                          (0, 1, 2)))
                    for name, fn in ready.items() if tm.mode_ok(status[name], mode)}
        timings, fns, failed = tm.time_providers_safely(builders, case.device, args.rounds, args.min_time)
        mode_status = {n: {**status[n], "status": "FAILED", "reason": why} for n, why in failed.items()}
        for name, why in failed.items():
            log(f"    {name} failed in {mode}: {why}")
        nbytes = bytes_moved(case.B, case.T, case.H, case.D, es, mode)
        nflops = flops(case.B, case.T, case.H, case.D, case.b, case.causal, mode)
        base_ms = timings.get(BASELINE, {}).get("median_ms")
        for name in args.providers:
            st = mode_status.get(name, status[name])
            rec = {"op": OP, **case.key, "mode": mode, "provider": name, "input_copies": copies,
                   "bytes": nbytes, "flops": nflops, **{k: v for k, v in st.items() if k != "status"},
                   "status": st["status"]}
            if st["status"] == "ok":
                rec["status"], rec["reason"] = tm.verdict(st, mode)
                if rec["status"] == "ok" and name not in timings:
                    rec["status"], rec["reason"] = "FAILED", "not timed"
            if name in timings:
                t = timings[name]
                ms = t["median_ms"]
                rec.update(t)
                rec["GB/s"] = nbytes / (ms * 1e-3) / 1e9
                rec["pct_peak"] = 100 * rec["GB/s"] / peak_gbs
                rec["TFLOP/s"] = nflops / (ms * 1e-3) / 1e12
                rec["speedup_vs_sdpa"] = base_ms / ms if base_ms else None
                try:
                    rec["peak_mem_MiB"] = tm.peak_memory_mib(fns[name], case.device)
                except Exception:  # noqa: BLE001
                    rec["peak_mem_MiB"] = None
            records.append(rec)
        del fns
        line = ", ".join(f"{n} {tm.fmt(timings[n]['median_ms'])} ms" for n in timings)
        log(f"  {tm.dtype_name(case.dtype)} D{case.D} {'causal' if case.causal else 'full'} b={case.b} {mode}: {line}")
    del sets
    if case.device == "cuda":
        torch.cuda.empty_cache()
    return records


# ----------------------------------------------------------------------------- output
def results_table(records: list[dict]) -> str:
    header = ["dtype", "D", "causal", "b", "mode", "provider", "median ms", "min–max ms", "IQR ms", "GB/s",
              "% peak", "TFLOP/s", "peak MiB", "vs SDPA"]
    rows = []
    for r in records:
        if r["status"] == "skipped":
            continue
        lead = [r["dtype"], r["D"], "yes" if r["causal"] else "no", r["block_size"], r["mode"], r["provider"]]
        if r["status"] != "ok" or "median_ms" not in r:
            rows.append(lead + [f"FAILED: {r.get('reason', '')}"] + ["-"] * 7)
            continue
        rows.append(lead + [
            tm.fmt(r["median_ms"]), f"{tm.fmt(r['min_ms'])}–{tm.fmt(r['max_ms'])}",
            f"{tm.fmt(r['q1_ms'])}–{tm.fmt(r['q3_ms'])}", tm.fmt(r["GB/s"]), tm.fmt(r["pct_peak"], 2),
            tm.fmt(r["TFLOP/s"]), tm.fmt(r.get("peak_mem_MiB")),
            f"{r['speedup_vs_sdpa']:.2f}x" if r.get("speedup_vs_sdpa") else "-",
        ])
    return tm.markdown_table(header, rows)


def skipped_lines(records: list[dict]) -> list[str]:
    seen: dict[tuple, None] = {}
    for r in records:
        if r["status"] == "skipped":
            seen.setdefault((r["provider"], r["reason"]), None)
    return [f"- {p}: skipped — {why}" for p, why in seen]


def speedup_summary(records: list[dict], providers) -> str:
    """One row per case and mode: each timed provider's speedup over SDPA-on-block-views."""
    shown = [p for p in providers if p != BASELINE and any(r["provider"] == p and "median_ms" in r for r in records)]
    rows, seen = [], {}
    for r in records:
        key = (r["dtype"], r["D"], r["causal"], r["block_size"], r["mode"])
        seen.setdefault(key, {})[r["provider"]] = r
    for key, by in seen.items():
        base = by.get(BASELINE, {})
        if "median_ms" not in base:
            continue
        cells = []
        for p in shown:
            r = by.get(p, {})
            cells.append(f"{r['speedup_vs_sdpa']:.2f}x" if r.get("speedup_vs_sdpa") else
                         ("FAILED" if r.get("status") == "FAILED" else "-"))
        rows.append([key[0], key[1], "yes" if key[2] else "no", key[3], key[4], tm.fmt(base["median_ms"])] + cells)
    header = ["dtype", "D", "causal", "b", "mode", "SDPA ms"] + [f"{p} speedup" for p in shown]
    return tm.markdown_table(header, rows)


def plot(records: list[dict], providers, path: str, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception as e:  # noqa: BLE001
        return f"no plot: matplotlib unavailable ({e})"
    timed = [r for r in records if r.get("speedup_vs_sdpa")]
    if not timed:
        return "no plot: nothing timed against SDPA"
    groups = list(dict.fromkeys((r["dtype"], r["D"], r["causal"]) for r in timed))[:6]
    modes = list(dict.fromkeys(r["mode"] for r in timed))
    fig, axes = plt.subplots(len(groups), len(modes), figsize=(4.6 * len(modes), 3.4 * len(groups)), squeeze=False)
    for gi, (dtype, D, causal) in enumerate(groups):
        for mi, mode in enumerate(modes):
            ax = axes[gi][mi]
            for p in providers:
                pts = sorted((r["block_size"], r["speedup_vs_sdpa"]) for r in timed
                             if r["provider"] == p and r["mode"] == mode and r["dtype"] == dtype and r["D"] == D
                             and r["causal"] == causal)
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                            linestyle="--" if p == BASELINE else "-", label=p)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            bs = sorted({r["block_size"] for r in timed})
            ax.set_xticks(bs, [str(x) for x in bs])
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
            ax.set_xlabel("block size b")
            ax.set_ylabel("speedup vs SDPA block views")
            ax.set_title(f"{mode}, {dtype}, D={D}, {'causal' if causal else 'non-causal'}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(args, env, copy_bw, records, finished: bool, elapsed: float, final: bool) -> dict[str, str]:
    """JSON and markdown (rewritten after every case, so a killed run leaves what it measured); the plot
    only at the end."""
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.tag)
    doc = {"benchmark": "bench_attention", "environment": env, "copy_bandwidth": copy_bw,
           "settings": {k: (v if not isinstance(v, torch.dtype) else str(v)) for k, v in vars(args).items()},
           "finished": finished, "elapsed_s": elapsed, "results": records}
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1, default=tm.json_default)
    text = markdown_report(args, env, copy_bw, records, finished)
    with open(stem + ".md", "w") as f:
        f.write(text)
    paths = {"json": stem + ".json", "md": stem + ".md"}
    if final and not args.no_plot:
        why = plot(records, args.providers, stem + ".png",
                   f"block_local_attention B{args.batch} T{args.seq_len} H{args.heads} — {env['device_name']}")
        if why is None:
            paths["png"] = stem + ".png"
    return paths


def markdown_report(args, env, copy_bw, records, finished) -> str:
    head = (f"## block_local_attention benchmark\n\n"
            f"{tm.environment_line(env)}\n\n"
            f"B={args.batch}, T={args.seq_len}, H={args.heads}; measured copy bandwidth "
            f"{copy_bw['GB/s']:.1f} GB/s (read + write); times are medians over {args.rounds} interleaved rounds"
            f"{'' if finished else '; **stopped early (budget)**'}.\n")
    parts = [head, "### Speedup over SDPA on block views\n", speedup_summary(records, args.providers), "",
             "### All numbers\n", results_table(records), ""]
    sk = skipped_lines(records)
    if sk:
        parts += ["Not run:\n"] + sk + [""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke run (~1 min): few sizes, no FlexAttention")
    p.add_argument("--interpret", action="store_true",
                   help="run hilt triton on the CPU under TRITON_INTERPRET=1 (tiny default sizes)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch", "-B", type=int, default=None)
    p.add_argument("--seq-len", "-T", type=int, default=None)
    p.add_argument("--heads", "-H", type=int, default=None)
    p.add_argument("--head-dims", type=int, nargs="+", default=None, help="default 64 32 128 (primary first)")
    p.add_argument("--block-sizes", type=int, nargs="+", default=None, help="default 8 16 32 64 128")
    p.add_argument("--causal", choices=["true", "false", "both"], default=None)
    p.add_argument("--dtypes", nargs="+", default=None, help="bf16 fp16 fp32 (default bf16 fp16 on GPU, fp32 on CPU)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes tens of seconds)")
    p.add_argument("--naive-max-blocks", type=int, default=None,
                   help="skip the naive loop above this many blocks (default 512; 32 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    p.add_argument("--min-time", type=float, default=None, help="seconds per provider per round")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new case after this many seconds (results so far are written)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=RESULTS_DIR, help="output folder (default benchmarks/results)")
    p.add_argument("--tag", default=None, help="file stem of the outputs")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing providers")
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if args.interpret and gpu:
        p.error("--interpret is for CPU runs")
    # defaults: GPU = DESIGN.md's target (B·T = 64k tokens, H 16, D 64, bf16); CPU = small
    if gpu:
        dflt = dict(batch=16, seq_len=4096, heads=16, head_dims=[64, 32, 128], dtypes=["bf16", "fp16"],
                    block_sizes=[8, 16, 32, 64, 128], causal="both", rounds=10, min_time=0.02)
    elif args.interpret:
        dflt = dict(batch=1, seq_len=64, heads=2, head_dims=[32], dtypes=["fp32"], block_sizes=[8, 32],
                    causal="true", rounds=2, min_time=0.0)
    elif args.quick:
        dflt = dict(batch=2, seq_len=1024, heads=8, head_dims=[64], dtypes=["fp32"], block_sizes=[8, 32, 128],
                    causal="true", rounds=3, min_time=0.03)
    else:
        dflt = dict(batch=4, seq_len=2048, heads=8, head_dims=[64, 32, 128], dtypes=["fp32"],
                    block_sizes=[8, 16, 32, 64, 128], causal="both", rounds=7, min_time=0.05)
    if gpu and args.quick:
        dflt.update(head_dims=[64], dtypes=["bf16"], causal="true", rounds=5)
    for k, v in dflt.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.no_flex = args.no_flex or args.quick
    if args.naive_max_blocks is None:
        args.naive_max_blocks = 32 if args.quick else 512
    args.dtypes = [tm.parse_dtype(d) for d in args.dtypes]
    args.causals = {"true": [True], "false": [False], "both": [True, False]}[args.causal]
    if args.tag is None:
        args.tag = "attention_" + ("gpu" if gpu else "cpu") + ("_quick" if args.quick else "") + (
            "_interpret" if args.interpret else "")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    t0 = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    torch.manual_seed(args.seed)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for every provider
        from torch import _dynamo

        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
    tm.allow_repeated_compiled_backward()
    env = tm.environment(args.device, [os.path.relpath(os.path.abspath(__file__))] + argv)
    copy_bw = tm.copy_bandwidth(args.device)
    log(f"{tm.environment_line(env)}\ncopy bandwidth {copy_bw['GB/s']:.1f} GB/s (read + write)")
    records: list[dict] = []
    finished = True
    cases = [Case(args.batch, args.seq_len, args.heads, D, b, c, dt, args.device)
             for dt in args.dtypes for D in args.head_dims for c in args.causals for b in args.block_sizes]
    for i, case in enumerate(cases):
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            log(f"budget of {args.budget_s:.0f} s spent: {len(cases) - i} case(s) not run")
            finished = False
            break
        records += run_case(case, args, copy_bw["GB/s"], log)
        write_outputs(args, env, copy_bw, records, finished=False, elapsed=time.perf_counter() - t0, final=False)
    paths = write_outputs(args, env, copy_bw, records, finished=finished, elapsed=time.perf_counter() - t0,
                          final=True)
    print()
    print(markdown_report(args, env, copy_bw, records, finished))
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
