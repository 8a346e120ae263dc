"""``hilt ablate`` / ``python -m hilt.ablate``: GPT vs HILT vs BlockHierarchicalLM vs LFormer (and variants
of them) at a matched parameter count or matched training FLOPs per token, on the same tokens, over seeds.

Entries
-------
``--models`` is a comma-separated list of entries, each a model name optionally followed by overrides in
brackets: ``"gpt,hilt,hilt[ilt_scale_start=1,ilt_scale_end=1],block[block_size=16]"`` (commas inside the
brackets belong to the entry; :mod:`hilt.training.variants`). An override sets a model-config field (of
that model's config class) or a training option (:class:`hilt.training.config.TrainConfig`; not the ones the
ablation sets for every run: ``model``, ``out``, ``seed``, ``data``, ``device``, ...). Each entry keeps
its text as its label (table, plot, JSON) and gets its own run folder ``<out>/<sanitized label>-seed<k>``.

How the models are matched (``--match``)
----------------------------------------
GPT (``--d-model`` D, ``--n-layers`` L, 4 heads, d_ff 4·D) is the baseline; its parameter count
(``--match params``, default) or its training FLOPs per token at ``--seq-len`` (``--match flops``,
:func:`hilt.models.flops.flops_per_token`) is the target. Every other entry keeps its architecture's
shape, with the entry's overrides applied first, and is re-sized to that target:

* ``hilt``: L layers, ILTs with ``ilt_dim = d/2`` (at least 16), 2 ILT layers, ILT dropout 0;
* ``block``: 2 block-local + 2 global + 2 block-local decoder layers, block 8;
* ``lformer``: L layers, a token-wise EMA side path (``d_side = d/2``, a tap per layer) blended into the
  LM head (``blend_into_lm``; without it the side path could not change the LM loss), no reasoning heads
  (so :func:`hilt.training.loop.train` trains it as a plain LM: no phases, no reasoning rows).

For each, the width ``d`` (a multiple of the head count) whose measure (with d_ff = 4·d) is closest to the
target is picked, then ``d_ff`` is solved for so that the measure lands as close as possible (both are
linear in d_ff), within [2·d, 8·d]. Overriding ``d_model`` or ``d_ff`` is an error unless ``--match none``
(every entry at the baseline's width, overrides as given). Parameter counts are unique parameters (tied
embeddings once), computed on the meta device. Every entry's parameters and FLOPs per token are printed
and tabled with their difference to GPT's.

Same tokens: every run of one seed uses the same ``--batch-size``, ``--seq-len`` and sampler seed, so
all models see the same batches in the same order (the seed also sets the initialisation); seeds are
``0 .. --seeds - 1``. Each run is :func:`hilt.training.loop.train` (the one training loop); evaluation every
``--eval-every`` steps on fixed val windows. A finished run leaves ``ablate_run.json`` in its folder;
``--resume`` reuses those (when their settings match) instead of training again, so an interrupted
ablation continues where it stopped (several processes with ``--resume`` on one ``--out`` share the
runs: each claims a run with a ``<run folder>.lock``); ``--report-only`` trains nothing and tables the finished runs only
(the ``seeds`` column says how many each row has).

Outputs in ``--out`` (default ``runs/ablate-<YYYYmmdd-HHMMSS>``): ``ablation.md`` (entry, shape, params,
training FLOPs/token, val bits/byte mean ± std over seeds, tokens/s), ``val_curves.png`` (val bits/byte
against step, mean ± std band), ``results.json`` (everything, per run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Union

__all__ = ["ABLATION_MODELS", "MATCH_MODES", "AblationConfig", "Entry", "matched_model_configs", "size_entries",
           "count_parameters", "count_flops", "run_ablation", "format_table", "build_parser", "main"]

ABLATION_MODELS = ("gpt", "hilt", "block", "lformer")
MATCH_MODES = ("params", "flops", "none")
N_HEADS = 4
# training options the ablation sets for every run: not overridable per entry
RESERVED_TRAIN_FIELDS = ("model", "model_config", "out", "seed", "data", "device", "threads", "progress",
                         "tensorboard", "plot", "sample_tokens", "cache_dir", "use_cache", "fsdp", "ckpt_every")
# keys of a run's settings that may differ on --resume without making it a different run
_RESUME_IGNORED = ("progress", "threads", "device", "out")


@dataclasses.dataclass
class AblationConfig:
    models: Union[tuple, str] = ABLATION_MODELS  # entry strings (or one --models string)
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
    match: str = "params"
    resume: bool = False
    report_only: bool = False
    data: Optional[str] = None
    out: Optional[str] = None
    device: str = "auto"
    threads: Optional[int] = None
    progress: bool = False


@dataclasses.dataclass
class Entry:
    """One sized ``--models`` entry: its variant, model config (dict), training overrides, measures."""

    variant: object  # hilt.training.variants.Variant
    config: dict
    train_overrides: dict
    params: int
    flops: float  # training FLOPs per token

    @property
    def label(self) -> str:
        return self.variant.label

    @property
    def model(self) -> str:
        return self.variant.model


def count_parameters(model: str, config: dict) -> int:
    """Unique parameters of a registered model type built on the meta device (no memory, no init cost)."""
    from hilt.models.registry import build_model

    m = build_model(model, config, device="meta")
    return sum(p.numel() for p in m.parameters())


def count_flops(model: str, config: dict, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward matmuls) at ``seq_len``."""
    from hilt.models.flops import flops_per_token

    return flops_per_token(model, config, seq_len).training


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


def _config_fields(model: str) -> set:
    from hilt.models.registry import get_model_spec

    return {f.name for f in dataclasses.fields(get_model_spec(model).config_class)}


def _check_config(model: str, cfg: dict) -> None:
    from hilt.models.registry import get_model_spec

    get_model_spec(model).config_class.from_dict(dict(cfg))


def _split(variant, match: str) -> tuple[dict, dict]:
    """(model overrides, training overrides) of a variant, checked (a ValueError names the bad field)."""
    from .config import TrainConfig
    from .variants import split_overrides

    model_over, train_over = split_overrides(variant, _config_fields(variant.model),
                                             [f.name for f in dataclasses.fields(TrainConfig)],
                                             RESERVED_TRAIN_FIELDS)
    sized = [k for k in ("d_model", "d_ff") if k in model_over]
    if sized and match != "none":
        raise ValueError(f"--models entry {variant.label!r}: {' and '.join(sized)} cannot be overridden with "
                         f"--match {match} (matching sets them); use --match none")
    return model_over, train_over


def size_entries(variants: list, d_model: int, n_layers: int, seq_len: int,
                 match: str = "params") -> tuple[list, dict]:
    """Size every variant to the GPT baseline (``--match``): returns ([Entry], target) where target is
    ``{"params": int, "flops": float}`` of GPT at ``d_model`` / ``n_layers``."""
    if match not in MATCH_MODES:
        raise ValueError(f"--match must be one of {', '.join(MATCH_MODES)}, got {match!r}")
    base = _shape("gpt", d_model, n_layers, seq_len)
    target = {"params": count_parameters("gpt", base), "flops": count_flops("gpt", base, seq_len)}

    def measure(model: str, cfg: dict) -> float:
        return count_parameters(model, cfg) if match == "params" else count_flops(model, cfg, seq_len)

    entries = []
    for v in variants:
        model_over, train_over = _split(v, match)
        if match == "none" or (v.model == "gpt" and not model_over):
            cfg = dict(_shape(v.model, d_model, n_layers, seq_len), **model_over)
            try:
                _check_config(v.model, cfg)
            except (ValueError, TypeError) as e:
                raise ValueError(f"--models entry {v.label!r}: {e}") from None
        else:
            cfg = _sized(v, model_over, d_model, n_layers, seq_len, target[match], measure)
        entries.append(Entry(v, cfg, train_over, count_parameters(v.model, cfg), count_flops(v.model, cfg, seq_len)))
    return entries, target


def _sized(v, model_over: dict, d_model: int, n_layers: int, seq_len: int, target: float, measure) -> dict:
    """The config of ``v`` at the width (then d_ff) whose measure is closest to ``target``."""
    heads = model_over.get("n_heads", N_HEADS)
    step = heads if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 else N_HEADS
    best, best_err, first_error = None, None, None
    for w in range(2 * step, 3 * d_model + 1, step):
        cfg = dict(_shape(v.model, w, n_layers, seq_len), **model_over)
        try:
            _check_config(v.model, cfg)
        except (ValueError, TypeError) as e:
            first_error = first_error or e
            continue
        err = abs(measure(v.model, cfg) - target)
        if best_err is None or err < best_err:
            best, best_err = cfg, err
    if best is None:
        raise ValueError(f"--models entry {v.label!r}: no valid config at any width: {first_error}")
    d = best["d_model"]
    a = measure(v.model, dict(best, d_ff=4 * d))
    b = measure(v.model, dict(best, d_ff=4 * d + 1)) - a  # the measure is linear in d_ff
    if b > 0:
        best["d_ff"] = int(min(8 * d, max(2 * d, round(4 * d + (target - a) / b))))
    return best


def matched_model_configs(models, d_model: int, n_layers: int, seq_len: int,
                          match: str = "params") -> tuple[dict, dict, int]:
    """({label: config dict}, {label: params}, GPT's params): each entry (a model name or a variant string)
    sized to the GPT baseline by ``match``."""
    from .variants import parse_variants

    text = models if isinstance(models, str) else ",".join(models)
    entries, target = size_entries(parse_variants(text, ABLATION_MODELS), d_model, n_layers, seq_len, match)
    return {e.label: e.config for e in entries}, {e.label: e.params for e in entries}, target["params"]


def _describe(model: str, cfg: dict) -> str:
    d, ff = cfg["d_model"], cfg.get("d_ff") or 4 * cfg["d_model"]
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


def _fmt_flops(x: float) -> str:
    return f"{x / 1e6:.2f} M"


def _settings(cfg) -> dict:
    """A run's settings for the --resume comparison (JSON-normalised)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in _RESUME_IGNORED}
    return json.loads(json.dumps(d, default=str))


def _load_finished(run_dir: Path, cfg) -> Optional[dict]:
    """The stored result of a finished run whose settings equal ``cfg``'s; None when not finished; a
    ValueError when the folder holds a run with other settings."""
    path = run_dir / "ablate_run.json"
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    now = _settings(cfg)
    diff = sorted(k for k in set(now) | set(stored.get("settings", {}))
                  if now.get(k) != stored.get("settings", {}).get(k))
    if diff:
        raise ValueError(f"--resume: {run_dir} holds a finished run with other settings ({', '.join(diff)}); "
                         f"use another --out or remove that folder")
    return stored["result"]


def _claim(run_dir: Path) -> Optional[Path]:
    """With --resume, several processes may work through one --out: a run is claimed by creating
    ``<run_dir>.lock`` holding the pid. Returns the lock path, or None when a live process holds it
    (a lock left by a dead process is taken over)."""
    lock = run_dir.parent / (run_dir.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
                return None  # alive
            except ProcessLookupError:
                lock.unlink(missing_ok=True)  # stale: its process is gone
            except (ValueError, PermissionError, FileNotFoundError):
                return None
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    return None


def run_ablation(ac: AblationConfig, log: Callable = print) -> dict:
    """Train every entry for every seed with :func:`hilt.training.loop.train`; write the table, the plot and
    results.json; return the results dict (``paths`` says where things went)."""
    from .config import TrainConfig
    from .loop import train
    from .variants import parse_variants

    if ac.steps < 1 or ac.seeds < 1:
        raise ValueError(f"--steps and --seeds must be >= 1, got {ac.steps}, {ac.seeds}")
    text = ac.models if isinstance(ac.models, str) else ",".join(ac.models)
    variants = parse_variants(text, ABLATION_MODELS)
    entries, target = size_entries(variants, ac.d_model, ac.n_layers, ac.seq_len, ac.match)
    out = Path(ac.out) if ac.out else Path("runs") / f"ablate-{time.strftime('%Y%m%d-%H%M%S')}"

    def train_config(e: Entry, seed: int) -> "TrainConfig":
        base = dict(model=e.model, model_config=e.config, data=ac.data, out=str(out / f"{e.variant.dir_name}-seed{seed}"),
                    device=ac.device, threads=ac.threads, seed=seed, batch_size=ac.batch_size, max_steps=ac.steps,
                    warmup=min(ac.warmup, max(ac.steps - 1, 0)), lr=ac.lr, eval_every=ac.eval_every,
                    eval_iters=ac.eval_iters, ckpt_every=0, progress=ac.progress, tensorboard=False, plot=False,
                    sample_tokens=0, dtype="float32")
        cfg = TrainConfig(**dict(base, **e.train_overrides))
        try:
            cfg.validate()
        except ValueError as err:
            raise ValueError(f"--models entry {e.label!r}: {err}") from None
        return cfg

    plan = [(seed, e, train_config(e, seed)) for seed in range(ac.seeds) for e in entries]  # checked up front
    out.mkdir(parents=True, exist_ok=True)
    log(f"hilt ablate: {len(entries)} entries x {ac.seeds} seed(s), {ac.steps} steps of "
        f"{ac.batch_size} x {ac.seq_len} tokens, matched by {ac.match}, into {out}/")
    log(f"target: GPT d_model {ac.d_model}, {ac.n_layers} layers = {target['params']:,} parameters, "
        f"{_fmt_flops(target['flops'])} training FLOPs/token at context {ac.seq_len}")
    w = max(len(e.label) for e in entries)
    for e in entries:
        log(f"  {e.label:<{w}} {e.params:>11,} params ({(e.params - target['params']) / target['params']:+.1%})  "
            f"{_fmt_flops(e.flops):>10} FLOPs/token ({(e.flops - target['flops']) / target['flops']:+.1%})  "
            f"{_describe(e.model, e.config)}")

    runs = []
    t0 = time.perf_counter()
    for seed, e, cfg in plan:
        run_dir = Path(cfg.out)
        done = _load_finished(run_dir, cfg) if ac.resume or ac.report_only else None
        if done is not None:
            runs.append(done)
            log(f"  {e.label} seed {seed}: finished before, val bits/byte {done['val_bpb']:.4f}")
            continue
        if ac.report_only:
            log(f"  {e.label} seed {seed}: not finished (--report-only: left out)")
            continue
        lock = _claim(run_dir) if ac.resume else None
        if ac.resume and lock is None:
            log(f"  {e.label} seed {seed}: being trained by another process (--resume: left out here)")
            continue
        if lock is not None and (run_dir / "ablate_run.json").exists():  # finished while we were claiming
            lock.unlink(missing_ok=True)
            runs.append(_load_finished(run_dir, cfg))
            continue
        try:
            res = train(cfg, log=lambda *a, **k: None)
        finally:
            if lock is not None:
                lock.unlink(missing_ok=True)
        tps = [r["tokens_per_s"] for r in res.history[1:] or res.history]
        curve = [(r["step"], r["val_bpb"]) for r in res.history if r["val_bpb"] != ""]
        run = {"label": e.label, "model": e.model, "seed": seed, "val_bpb": res.val_bpb, "val_loss": res.val_loss,
               "tokens_per_s": statistics.median(tps), "seconds": res.seconds, "curve": curve, "dir": str(run_dir)}
        (run_dir / "ablate_run.json").write_text(json.dumps({"settings": _settings(cfg), "result": run},
                                                            indent=2, default=str) + "\n")
        runs.append(run)
        log(f"  {e.label} seed {seed}: val bits/byte {res.val_bpb:.4f}, {run['tokens_per_s']:,.0f} tokens/s, "
            f"{res.seconds:.0f} s")
    wall = time.perf_counter() - t0

    rows = []
    for e in entries:
        mine = [r for r in runs if r["label"] == e.label]
        bpb, bpb_std = _mean_std([r["val_bpb"] for r in mine])
        tps, _ = _mean_std([r["tokens_per_s"] for r in mine])
        rows.append({"label": e.label, "model": e.model, "overrides": e.variant.override_dict,
                     "train_overrides": e.train_overrides, "shape": _describe(e.model, e.config),
                     "params": e.params, "params_vs_gpt": (e.params - target["params"]) / target["params"],
                     "flops_per_token": e.flops, "flops_vs_gpt": (e.flops - target["flops"]) / target["flops"],
                     "val_bpb_mean": bpb, "val_bpb_std": bpb_std, "n_seeds": len(mine), "tokens_per_s": tps,
                     "config": e.config})
    paths = {"table": out / "ablation.md", "plot": out / "val_curves.png", "results": out / "results.json"}
    table = format_table(rows, ac)
    paths["table"].write_text(table)
    try:
        _plot_curves(runs, [e.label for e in entries], paths["plot"], ac)
    except Exception as err:  # noqa: BLE001 - a plot is never worth losing the table
        log(f"(could not draw the plot: {err})")
        paths.pop("plot")
    results = {"config": dataclasses.asdict(ac), "target_params": target["params"],
               "target_flops_per_token": target["flops"], "rows": rows, "runs": runs, "wall_seconds": wall,
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "paths": {k: str(v) for k, v in paths.items()}}
    paths["results"].write_text(json.dumps(results, indent=2, default=str) + "\n")
    log("\n" + table)
    log(f"ablation done in {wall:.0f} s:")
    for k, p in paths.items():
        log(f"  {k:<8} {p}")
    return results


def format_table(rows: list, ac: AblationConfig) -> str:
    how = {"params": "parameters matched to", "flops": "training FLOPs per token matched to",
           "none": "no matching; baseline"}[ac.match]
    head = (f"Val bits/byte after {ac.steps} steps of {ac.batch_size} x {ac.seq_len} bytes (same batches for every "
            f"model), mean ± std over the seeds (of 0..{ac.seeds - 1}) that ran; {how} GPT d_model {ac.d_model}, {ac.n_layers} layers. "
            f"FLOPs: training (3 × forward matmuls) per token at context {ac.seq_len}.\n\n")
    lines = ["| model | shape | params | vs GPT | FLOPs/token | vs GPT | val bits/byte | seeds | tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r["n_seeds"]:
            bpb, tps = "not run", "-"
        else:
            bpb = f"{r['val_bpb_mean']:.4f}" + (f" ± {r['val_bpb_std']:.4f}" if r["val_bpb_std"] is not None else "")
            tps = f"{r['tokens_per_s']:,.0f}"
        lines.append(f"| {r['label']} | {r['shape']} | {r['params']:,} | {r['params_vs_gpt']:+.1%} | "
                     f"{_fmt_flops(r['flops_per_token'])} | {r['flops_vs_gpt']:+.1%} | {bpb} | {r['n_seeds']} | {tps} |")
    return head + "\n".join(lines) + "\n"


def _plot_curves(runs: list, labels, path: Path, ac: AblationConfig) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for label in labels:
        curves = [dict(map(tuple, r["curve"])) for r in runs if r["label"] == label]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        mean = [statistics.fmean(c[s] for c in curves) for s in steps]
        line, = ax.plot(steps, mean, "o-", lw=1.5, ms=3, label=label)
        if len(curves) > 1:
            std = [statistics.stdev(c[s] for c in curves) for s in steps]
            ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("val bits per byte")
    ax.set_title(f"ablation, matched {ac.match}, context {ac.seq_len} ({ac.seeds} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser(prog: str = "hilt ablate") -> argparse.ArgumentParser:
    D = AblationConfig()
    p = argparse.ArgumentParser(
        prog=prog, description="Train GPT, HILT, BlockHierarchicalLM and LFormer (and variants of them) at a matched "
                               "parameter count or matched training FLOPs per token on the same tokens (the standard "
                               "library corpus by default) and compare val bits/byte. "
                               f"The defaults ({len(D.models)} models x {D.seeds} seed, {D.steps} steps of {D.batch_size} x "
                               f"{D.seq_len} bytes) take about 6 minutes on an idle 2-core CPU (longer on a busy one).")
    p.add_argument("--models", default=",".join(D.models),
                   help=f"comma-separated entries: a model ({','.join(ABLATION_MODELS)}) optionally with overrides of "
                        "model-config fields or training options in brackets, e.g. "
                        "\"gpt,hilt,hilt[ilt_scale_start=1,ilt_scale_end=1],block[block_size=16]\" (quote it; "
                        "default: the four models)")
    p.add_argument("--match", choices=MATCH_MODES, default=D.match,
                   help="size the non-GPT entries to GPT's parameter count (params), its training FLOPs per token "
                        "(flops), or not at all (none: every entry at --d-model) (default: params)")
    p.add_argument("--resume", action="store_true",
                   help="reuse runs already finished in --out (same settings) instead of training them again")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: build the table, plot and JSON from the runs already finished in --out")
    p.add_argument("--steps", type=int, default=D.steps, help=f"optimizer steps per run (default: {D.steps})")
    p.add_argument("--d-model", type=int, default=D.d_model, help=f"GPT baseline width (default: {D.d_model})")
    p.add_argument("--n-layers", type=int, default=D.n_layers, help=f"GPT baseline depth (default: {D.n_layers})")
    p.add_argument("--seeds", type=int, default=D.seeds, help=f"seeds 0..N-1 per entry (default: {D.seeds})")
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
    ac = AblationConfig(models=args.models, steps=args.steps, d_model=args.d_model, n_layers=args.n_layers,
                        seeds=args.seeds, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                        warmup=min(AblationConfig.warmup, max(1, args.steps // 10)), eval_every=args.eval_every,
                        eval_iters=args.eval_iters, match=args.match, resume=args.resume,
                        report_only=args.report_only, data=args.data,
                        out=args.out, device=args.device, threads=args.threads, progress=args.progress)
    try:
        run_ablation(ac)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
