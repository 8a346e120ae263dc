"""End-to-end training-step benchmark: GPT vs HILT vs BlockHierarchicalLM vs LFormer.

One step = forward with targets (loss, aux losses included), backward, AdamW step, zero_grad — timed side by
side in interleaved rounds at each sequence length, with the same batch of random byte tokens. Reported:
tokens/s, ms per step (median and spread), peak memory of a step (CUDA), parameter count.
On a GPU the models run in fp32 weights under bf16 autocast with the ops' automatic backend (triton); on the
CPU in fp32 with the reference backend.

    python benchmarks/bench_models.py --quick          # CPU: tiny models, two lengths
    python benchmarks/bench_models.py                  # GPU: d512 x 8 layers at 1k/2k/4k tokens, 32k tokens a step

Writes a table to stdout and <out>/<tag>.json and .md (default out: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as tm  # noqa: E402

from hilt.models import (  # noqa: E402
    GPT, HILT, BlockHierarchicalLM, BlockHierarchicalLMConfig, GPTConfig, HILTConfig, LFormer, LFormerConfig,
)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODELS = ("GPT", "HILT", "BlockHierarchicalLM", "LFormer")


def build(name: str, size: dict, max_seq_len: int, device: str, backend: str | None):
    """The model with ``size``'s width and depth (the same number of transformer layers in each model)."""
    d, h, L = size["d_model"], size["n_heads"], size["n_layers"]
    common = dict(vocab_size=256, d_model=d, n_heads=h, max_seq_len=max_seq_len, dropout=size["dropout"])
    if name == "GPT":
        m = GPT(GPTConfig(n_layers=L, **common), backend=backend)
    elif name == "HILT":
        m = HILT(HILTConfig(n_layers=L, ilt_dim=size["ilt_dim"], ilt_dropout=size["dropout"], **common),
                 backend=backend)
    elif name == "BlockHierarchicalLM":
        n_local = max(1, L // 4)
        m = BlockHierarchicalLM(BlockHierarchicalLMConfig(
            block_size=size["block_size"], n_local_layers=n_local, n_decoder_layers=n_local,
            n_global_layers=max(1, L - 2 * n_local), **common), backend=backend)
    elif name == "LFormer":
        m = LFormer(LFormerConfig(n_layers=L, d_side=size["d_side"], tap_every=1, tap_mode="token",
                                  aggregator="ema", side_dropout=size["dropout"], **common), backend=backend)
    else:
        raise ValueError(name)
    return m.to(device)


def make_step(model, ids, targets, device: str, amp_dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                            fused=device == "cuda")
    model.train()

    def step():
        with torch.autocast(device_type=device, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(ids, targets=targets)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--seq-lens", type=int, nargs="+", default=None)
    p.add_argument("--tokens-per-step", type=int, default=None, help="batch = tokens_per_step // seq_len")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-heads", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--block-size", type=int, default=8, help="BlockHierarchicalLM's block")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--backend", choices=["reference", "triton", "cuda"], default=None,
                   help="force the ops' backend (default: automatic)")
    p.add_argument("--no-amp", action="store_true", help="GPU: fp32 instead of bf16 autocast")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--min-time", type=float, default=None)
    p.add_argument("--budget-s", type=float, default=None, help="start no new sequence length after this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    gpu = args.device == "cuda"
    if gpu:
        dflt = dict(seq_lens=[1024, 2048, 4096], tokens_per_step=32768, d_model=512, n_heads=8, n_layers=8,
                    rounds=5, min_time=0.2)
        if args.quick:
            dflt.update(seq_lens=[1024, 4096], rounds=3)
    elif args.quick:
        dflt = dict(seq_lens=[128, 256], tokens_per_step=512, d_model=128, n_heads=4, n_layers=4, rounds=2,
                    min_time=0.0)
    else:
        dflt = dict(seq_lens=[128, 256, 512], tokens_per_step=2048, d_model=128, n_heads=4, n_layers=4, rounds=3,
                    min_time=0.2)
    for k, v in dflt.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.tag is None:
        args.tag = "models_" + ("gpu" if gpu else "cpu") + ("_quick" if args.quick else "")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    t0 = time.perf_counter()
    dev = args.device
    amp = torch.bfloat16 if dev == "cuda" and not args.no_amp else None
    env = tm.environment(dev, [os.path.relpath(os.path.abspath(__file__))] + argv)
    print(tm.environment_line(env), flush=True)
    size = dict(d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers, dropout=args.dropout,
                ilt_dim=min(128, args.d_model), d_side=min(128, args.d_model), block_size=args.block_size)
    records, finished = [], True
    g = torch.Generator().manual_seed(args.seed)
    for T in args.seq_lens:
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: skipping T >= {T}", flush=True)
            finished = False
            break
        B = max(1, args.tokens_per_step // T)
        ids = torch.randint(0, 256, (B, T + 1), generator=g).to(dev)
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        steps, params, status = {}, {}, {}
        for name in args.models:
            try:
                torch.manual_seed(args.seed)
                model = build(name, size, max(args.seq_lens), dev, args.backend)
                params[name] = model.num_parameters() if hasattr(model, "num_parameters") else sum(
                    p.numel() for p in model.parameters())
                steps[name] = make_step(model, x, y, dev, amp)
                loss = steps[name]().item()  # first step: also the check that it runs and is finite
                if not loss == loss or loss in (float("inf"), float("-inf")):
                    raise FloatingPointError(f"loss {loss}")
                status[name] = {"status": "ok", "first_loss": loss}
            except Exception as e:  # noqa: BLE001 - report and go on with the other models
                traceback.print_exc()
                steps.pop(name, None)
                status[name] = {"status": "FAILED", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        timings = tm.time_providers(steps, dev, rounds=args.rounds, min_time=args.min_time)
        for name in args.models:
            rec = {"model": name, "seq_len": T, "batch": B, "tokens_per_step": B * T, "params": params.get(name),
                   "amp": str(amp) if amp else None, **status[name]}
            if name in timings:
                t = timings[name]
                rec.update(t)
                rec["tokens_per_s"] = B * T / (t["median_ms"] * 1e-3)
                rec["peak_mem_MiB"] = tm.peak_memory_mib(steps[name], dev)
            records.append(rec)
        print(f"  T={T} B={B}: " + ", ".join(f"{n} {timings[n]['median_ms']:.1f} ms" for n in timings), flush=True)
        del steps
        if dev == "cuda":
            torch.cuda.empty_cache()

    base = {r["seq_len"]: r.get("tokens_per_s") for r in records if r["model"] == "GPT"}
    rows = []
    for r in records:
        if "tokens_per_s" not in r:
            rows.append([r["model"], r["seq_len"], r["batch"], tm.fmt(r.get("params")),
                         f"FAILED: {r.get('reason')}", "-", "-", "-", "-"])
            continue
        rel = r["tokens_per_s"] / base[r["seq_len"]] if base.get(r["seq_len"]) else None
        rows.append([r["model"], r["seq_len"], r["batch"], f"{r['params'] / 1e6:.2f}M",
                     f"{r['tokens_per_s']:,.0f}", tm.fmt(r["median_ms"]),
                     f"{tm.fmt(r['min_ms'])}–{tm.fmt(r['max_ms'])}", tm.fmt(r.get("peak_mem_MiB")),
                     f"{rel:.2f}x" if rel else "-"])
    table = tm.markdown_table(["model", "T", "B", "params", "tokens/s", "ms/step", "min–max ms", "peak MiB",
                               "tokens/s vs GPT"], rows)
    n_local = max(1, args.n_layers // 4)
    text = (f"## Training-step benchmark\n\n{tm.environment_line(env)}\n\n"
            f"d_model={args.d_model}, n_heads={args.n_heads}, {args.n_layers} layers (BlockHierarchicalLM: "
            f"local/global/decoder = {n_local}/{max(1, args.n_layers - 2 * n_local)}/{n_local}, "
            f"block {args.block_size}), dropout {args.dropout}, "
            f"{'bf16 autocast' if amp else 'fp32'}, AdamW; {args.rounds} interleaved rounds"
            f"{'' if finished else '; **stopped early (budget)**'}.\n\n{table}\n")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.tag)
    with open(stem + ".json", "w") as f:
        json.dump({"benchmark": "bench_models", "environment": env, "settings": {**size, "seq_lens": args.seq_lens,
                   "tokens_per_step": args.tokens_per_step, "amp": str(amp)}, "finished": finished,
                   "elapsed_s": time.perf_counter() - t0, "results": records}, f, indent=1, default=tm.json_default)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print()
    print(text)
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
