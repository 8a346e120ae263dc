"""``hilt ablate`` / ``python -m hilt.ablate``: GPT vs HILT vs BlockHierarchicalLM vs LFormer at a matched
parameter count, on the same tokens, over a few seeds.

How the models are matched
--------------------------
GPT (``--d-model`` D, ``--n-layers`` L, 4 heads, d_ff 4·D) is the baseline; its parameter count is the
target. Every other model keeps its architecture's shape and is re-sized to that target:

* ``hilt``: L layers, ILTs with ``ilt_dim = d/2`` (at least 16), 2 ILT layers, ILT dropout 0;
* ``block``: 2 block-local + 2 global + 2 block-local decoder layers, block 8;
* ``lformer``: L layers, a token-wise EMA side path (``d_side = d/2``, a tap per layer) blended into the
  LM head (``blend_into_lm``; without it the side path could not change the LM loss), no reasoning heads
  (so :func:`hilt.training.loop.train` trains it as a plain LM: no phases, no reasoning rows).

For each, the width ``d`` (a multiple of the head count) whose count (with d_ff = 4·d) is closest to the
target is picked, then ``d_ff`` is solved for so that the count lands as close as possible (the count is
linear in d_ff), within [2·d, 8·d]. Counts are unique parameters (tied embeddings once), computed on the
meta device. The table shows each model's count and its difference to GPT's.

Same tokens: every run of one seed uses the same ``--batch-size``, ``--seq-len`` and sampler seed, so
all models see the same batches in the same order (the seed also sets the initialisation); seeds are
``0 .. --seeds - 1``. Each run is :func:`hilt.training.loop.train` (the one training loop) into
``<out>/<model>-seed<k>/``; evaluation every ``--eval-every`` steps on fixed val windows.

Outputs in ``--out`` (default ``runs/ablate-<YYYYmmdd-HHMMSS>``): ``ablation.md`` (model, shape,
params, val bits/byte mean ± std over seeds, tokens/s), ``val_curves.png`` (val bits/byte against
step, mean ± std band), ``results.json`` (everything, per run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

__all__ = ["ABLATION_MODELS", "AblationConfig", "matched_model_configs", "count_parameters", "run_ablation",
           "format_table", "build_parser", "main"]

ABLATION_MODELS = ("gpt", "hilt", "block", "lformer")
N_HEADS = 4


@dataclasses.dataclass
class AblationConfig:
    models: tuple = ABLATION_MODELS
    steps: int = 300
    d_model: int = 128
    n_layers: int = 4
    seeds: int = 1
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    warmup: int = 30
    eval_every: int = 50
    eval_iters: int = 10
    data: Optional[str] = None
    out: Optional[str] = None
    device: str = "auto"
    threads: Optional[int] = None
    progress: bool = False


def count_parameters(model: str, config: dict) -> int:
    """Unique parameters of a registered model type built on the meta device (no memory, no init cost)."""
    from hilt.models.registry import build_model

    m = build_model(model, config, device="meta")
    return sum(p.numel() for p in m.parameters())


def _shape(model: str, d: int, n_layers: int, seq_len: int) -> dict:
    """The architecture's fixed shape at width d (d_ff left at its default 4·d)."""
    base = {"d_model": d, "n_heads": N_HEADS, "max_seq_len": seq_len, "dropout": 0.0}
    if model == "gpt":
        return dict(base, n_layers=n_layers)
    if model == "hilt":
        ilt = max(16, (d // 2) // 8 * 8)
        return dict(base, n_layers=n_layers, ilt_dim=ilt, ilt_heads=2, ilt_layers=2, ilt_dropout=0.0)
    if model == "block":
        return dict(base, block_size=8, n_local_layers=2, n_global_layers=2, n_decoder_layers=2)
    if model == "lformer":
        side = max(16, (d // 2) // 8 * 8)
        return dict(base, n_layers=n_layers, d_side=side, side_heads=N_HEADS, side_dropout=0.0, tap_every=1,
                    tap_mode="token", aggregator="ema", blend_into_lm=True, n_tools=0, value_head=False,
                    plan_vocab=0)  # a pure LM: no reasoning heads, so no phases / reasoning rows in train()
    raise ValueError(f"unknown ablation model {model!r}; choose from {', '.join(ABLATION_MODELS)}")


def matched_model_configs(models, d_model: int, n_layers: int, seq_len: int) -> tuple[dict, dict, int]:
    """({model: config dict}, {model: params}, target): each model sized to GPT's parameter count."""
    target = count_parameters("gpt", _shape("gpt", d_model, n_layers, seq_len))
    configs, counts = {}, {}
    for model in models:
        if model == "gpt":
            cfg = _shape("gpt", d_model, n_layers, seq_len)
        else:
            widths = range(N_HEADS * 2, 3 * d_model + 1, N_HEADS)
            d = min(widths, key=lambda w: abs(count_parameters(model, _shape(model, w, n_layers, seq_len)) - target))
            cfg = _shape(model, d, n_layers, seq_len)
            # the count is linear in d_ff: solve for it from two points
            a = count_parameters(model, dict(cfg, d_ff=4 * d))
            b = count_parameters(model, dict(cfg, d_ff=4 * d + 1)) - a
            if b > 0:
                cfg["d_ff"] = int(min(8 * d, max(2 * d, round(4 * d + (target - a) / b))))
        configs[model] = cfg
        counts[model] = count_parameters(model, cfg)
    return configs, counts, target


def _describe(model: str, cfg: dict) -> str:
    d, ff = cfg["d_model"], cfg.get("d_ff", 4 * cfg["d_model"])
    if model == "block":
        return (f"d {d}, ff {ff}, {cfg['n_local_layers']}+{cfg['n_global_layers']}+{cfg['n_decoder_layers']} "
                f"layers, block {cfg['block_size']}")
    extra = {"hilt": lambda: f", ilt {cfg['ilt_dim']}x{cfg['ilt_layers']}",
             "lformer": lambda: f", side {cfg['d_side']} ema+blend"}.get(model, lambda: "")()
    return f"d {d}, ff {ff}, {cfg['n_layers']} layers{extra}"


def _mean_std(xs: list) -> tuple[float, Optional[float]]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def run_ablation(ac: AblationConfig, log: Callable = print) -> dict:
    """Train every model for every seed with :func:`hilt.training.loop.train`; write the table, the plot and
    results.json; return the results dict (``paths`` says where things went)."""
    from .config import TrainConfig
    from .loop import train

    unknown = [m for m in ac.models if m not in ABLATION_MODELS]
    if unknown:
        raise ValueError(f"unknown ablation model(s) {unknown}; choose from {', '.join(ABLATION_MODELS)}")
    if ac.steps < 1 or ac.seeds < 1:
        raise ValueError(f"--steps and --seeds must be >= 1, got {ac.steps}, {ac.seeds}")
    out = Path(ac.out) if ac.out else Path("runs") / f"ablate-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    configs, counts, target = matched_model_configs(ac.models, ac.d_model, ac.n_layers, ac.seq_len)
    log(f"hilt ablate: {len(ac.models)} models x {ac.seeds} seed(s), {ac.steps} steps of "
        f"{ac.batch_size} x {ac.seq_len} tokens, into {out}/")
    log(f"parameters (target: GPT d_model {ac.d_model}, {ac.n_layers} layers = {target:,}):")
    for m in ac.models:
        log(f"  {m:<8} {counts[m]:>10,}  ({(counts[m] - target) / target:+.1%})  {_describe(m, configs[m])}")

    runs = []
    t0 = time.perf_counter()
    for seed in range(ac.seeds):
        for m in ac.models:
            run_dir = out / f"{m}-seed{seed}"
            cfg = TrainConfig(model=m, model_config=configs[m], data=ac.data, out=str(run_dir), device=ac.device,
                              threads=ac.threads, seed=seed, batch_size=ac.batch_size, max_steps=ac.steps,
                              warmup=min(ac.warmup, max(ac.steps - 1, 0)), lr=ac.lr, eval_every=ac.eval_every,
                              eval_iters=ac.eval_iters, ckpt_every=0, progress=ac.progress, tensorboard=False,
                              plot=False, sample_tokens=0, dtype="float32")
            res = train(cfg, log=lambda *a, **k: None)
            tps = [r["tokens_per_s"] for r in res.history[1:] or res.history]
            curve = [(r["step"], r["val_bpb"]) for r in res.history if r["val_bpb"] != ""]
            runs.append({"model": m, "seed": seed, "val_bpb": res.val_bpb, "val_loss": res.val_loss,
                         "tokens_per_s": statistics.median(tps), "seconds": res.seconds, "curve": curve,
                         "dir": str(run_dir)})
            log(f"  {m} seed {seed}: val bits/byte {res.val_bpb:.4f}, {statistics.median(tps):,.0f} tokens/s, "
                f"{res.seconds:.0f} s")
    wall = time.perf_counter() - t0

    rows = []
    for m in ac.models:
        mine = [r for r in runs if r["model"] == m]
        bpb, bpb_std = _mean_std([r["val_bpb"] for r in mine])
        tps, _ = _mean_std([r["tokens_per_s"] for r in mine])
        rows.append({"model": m, "shape": _describe(m, configs[m]), "params": counts[m],
                     "params_vs_gpt": (counts[m] - target) / target, "val_bpb_mean": bpb, "val_bpb_std": bpb_std,
                     "tokens_per_s": tps, "config": configs[m]})
    paths = {"table": out / "ablation.md", "plot": out / "val_curves.png", "results": out / "results.json"}
    table = format_table(rows, ac)
    paths["table"].write_text(table)
    try:
        _plot_curves(runs, ac.models, paths["plot"], ac)
    except Exception as e:  # noqa: BLE001 - a plot is never worth losing the table
        log(f"(could not draw the plot: {e})")
        paths.pop("plot")
    results = {"config": dataclasses.asdict(ac), "target_params": target, "rows": rows, "runs": runs,
               "wall_seconds": wall, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "paths": {k: str(v) for k, v in paths.items()}}
    paths["results"].write_text(json.dumps(results, indent=2, default=str) + "\n")
    log("\n" + table)
    log(f"ablation done in {wall:.0f} s:")
    for k, p in paths.items():
        log(f"  {k:<8} {p}")
    return results


def format_table(rows: list, ac: AblationConfig) -> str:
    head = (f"Val bits/byte after {ac.steps} steps of {ac.batch_size} x {ac.seq_len} bytes (same batches for every "
            f"model), mean ± std over {ac.seeds} seed(s); parameters matched to GPT d_model {ac.d_model}, "
            f"{ac.n_layers} layers.\n\n")
    lines = ["| model | shape | params | vs GPT | val bits/byte | tokens/s |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        std = f" ± {r['val_bpb_std']:.4f}" if r["val_bpb_std"] is not None else " (1 seed)"
        lines.append(f"| {r['model']} | {r['shape']} | {r['params']:,} | {r['params_vs_gpt']:+.1%} | "
                     f"{r['val_bpb_mean']:.4f}{std} | {r['tokens_per_s']:,.0f} |")
    return head + "\n".join(lines) + "\n"


def _plot_curves(runs: list, models, path: Path, ac: AblationConfig) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for m in models:
        curves = [dict(r["curve"]) for r in runs if r["model"] == m]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        mean = [statistics.fmean(c[s] for c in curves) for s in steps]
        line, = ax.plot(steps, mean, "o-", lw=1.5, ms=3, label=m)
        if len(curves) > 1:
            std = [statistics.stdev(c[s] for c in curves) for s in steps]
            ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("val bits per byte")
    ax.set_title(f"matched-parameter ablation ({ac.seeds} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser(prog: str = "hilt ablate") -> argparse.ArgumentParser:
    D = AblationConfig()
    p = argparse.ArgumentParser(
        prog=prog, description="Train GPT, HILT, BlockHierarchicalLM and LFormer at a matched parameter count on "
                               "the same tokens (the standard library corpus by default) and compare val bits/byte. "
                               f"The defaults ({len(D.models)} models x {D.seeds} seed, {D.steps} steps of {D.batch_size} x "
                               f"{D.seq_len} bytes) take about 6 minutes on an idle 2-core CPU (longer on a busy one).")
    p.add_argument("--models", default=",".join(D.models),
                   help=f"comma-separated subset of {','.join(ABLATION_MODELS)} (default: all)")
    p.add_argument("--steps", type=int, default=D.steps, help=f"optimizer steps per run (default: {D.steps})")
    p.add_argument("--d-model", type=int, default=D.d_model, help=f"GPT baseline width (default: {D.d_model})")
    p.add_argument("--n-layers", type=int, default=D.n_layers, help=f"GPT baseline depth (default: {D.n_layers})")
    p.add_argument("--seeds", type=int, default=D.seeds, help=f"seeds 0..N-1 per model (default: {D.seeds})")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help=f"sequences per step (default: {D.batch_size})")
    p.add_argument("--seq-len", type=int, default=D.seq_len, help=f"context length (default: {D.seq_len})")
    p.add_argument("--lr", type=float, default=D.lr, help=f"peak learning rate (default: {D.lr:g})")
    p.add_argument("--eval-every", type=int, default=D.eval_every, help=f"eval interval (default: {D.eval_every})")
    p.add_argument("--eval-iters", type=int, default=D.eval_iters, help=f"val batches per eval (default: {D.eval_iters})")
    p.add_argument("--data", metavar="FILE|DIR", help="text to train on (default: the standard library corpus)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/ablate-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default: auto)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: the usable cores)")
    p.add_argument("--progress", action="store_true", help="show each run's progress bar")
    return p


def main(argv: Optional[list[str]] = None, prog: str = "hilt ablate") -> int:
    args = build_parser(prog).parse_args(argv)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    ac = AblationConfig(models=models, steps=args.steps, d_model=args.d_model, n_layers=args.n_layers,
                        seeds=args.seeds, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                        warmup=min(AblationConfig.warmup, max(1, args.steps // 10)), eval_every=args.eval_every,
                        eval_iters=args.eval_iters, data=args.data, out=args.out, device=args.device,
                        threads=args.threads, progress=args.progress)
    try:
        run_ablation(ac)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
