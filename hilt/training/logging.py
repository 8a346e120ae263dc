"""What a run writes and shows: the run folder, ``metrics.csv``, TensorBoard scalars, the progress bar,
the loss-curve PNG, the generated sample and the closing summary. Only rank 0 writes; other ranks' calls
do nothing."""
from __future__ import annotations

import csv
import json
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch.distributed as dist

from .distributed import Dist
from .evaluate import LN2

__all__ = ["CSV_FIELDS", "RunLog", "new_run_dir", "prepare_csv", "plot_losses", "sample_prompt"]

CSV_FIELDS = ["step", "lr", "loss", "val_loss", "val_bpb", "tokens_per_s", "ilt_scale", "grad_norm", "skipped",
              "phase", "tool_acc", "value_mae", "plan_em"]  # the last four: --model lformer only
HEAD_METRICS = ("tool_acc", "value_mae", "plan_em")


def new_run_dir(out: Optional[str], model_name: str, d: Dist) -> Path:
    """``out``, or a new ``runs/<model>-<YYYYmmdd-HHMMSS>[-N]`` (the same on every rank)."""
    if out is not None:
        return Path(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = [f"{model_name}-{stamp}"]
    if d.enabled:
        dist.broadcast_object_list(name, src=0)
    path = Path("runs") / name[0]
    if d.master:
        n = 2
        while path.exists():
            path = Path("runs") / f"{name[0]}-{n}"
            n += 1
    if d.enabled:
        box = [str(path)]
        dist.broadcast_object_list(box, src=0)
        path = Path(box[0])
    return path


def prepare_csv(path: Path, start_step: int) -> None:
    """Keep the rows up to ``start_step`` (a resumed run rewrites the steps after its checkpoint)."""
    rows = []
    if path.exists() and start_step > 0:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})


def plot_losses(csv_path: Path, png_path: Path, title: str) -> None:
    """Train and val bits per byte against the step, from ``metrics.csv``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps, loss, vsteps, vloss = [], [], [], []
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            if r["loss"] not in ("", "nan", "inf"):
                steps.append(int(r["step"]))
                loss.append(float(r["loss"]) / LN2)
            if r["val_loss"]:
                vsteps.append(int(r["step"]))
                vloss.append(float(r["val_loss"]) / LN2)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(steps, loss, lw=1, alpha=0.8, label="train")
    if vsteps:
        ax.plot(vsteps, vloss, "o-", lw=1.5, label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def sample_prompt(val: np.ndarray, n: int = 64) -> list[int]:
    """A prompt from the val text: the ``n`` bytes starting at its first top-level ``def``/``class``."""
    head = bytes(np.asarray(val[: min(len(val), 200_000)]))
    for marker in (b"\ndef ", b"\nclass ", b"\n"):
        i = head.find(marker)
        if i >= 0 and i + 1 + n <= len(head):
            return list(head[i + 1:i + 1 + n])
    return list(head[:n])


class RunLog:
    """The run folder and its logs. ``paths``: run, checkpoint, csv, plot, sample, config, corpus (and
    tensorboard when written); :meth:`finish` drops the ones that were not written."""

    def __init__(self, out: Path, d: Dist, log=print) -> None:
        self.out, self.d = out, d
        self.log = log if d.master else (lambda *a, **k: None)
        self.paths = {"run": out, "checkpoint": out / "checkpoint", "csv": out / "metrics.csv",
                      "plot": out / "loss.png", "sample": out / "sample.txt", "config": out / "train_config.json",
                      "corpus": out / "corpus.json"}
        self.writer = self.pbar = None

    def start(self, train_config: dict, corpus_info: dict, start_step: int, max_steps: int, *, tensorboard: bool,
              progress: bool, header: list[str]) -> None:
        """Create the folder, write the options and corpus description, (re)start ``metrics.csv``, open
        TensorBoard (when installed), show the ``header`` lines, open the progress bar."""
        if not self.d.master:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.paths["config"].write_text(json.dumps(train_config, indent=2) + "\n")
        self.paths["corpus"].write_text(json.dumps(corpus_info, indent=2, default=str) + "\n")
        prepare_csv(self.paths["csv"], start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tb"))
                self.paths["tensorboard"] = self.out / "tb"
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.writer = None
        for line in header:
            self.log(line)
        if progress:
            from tqdm.auto import tqdm

            self.pbar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def message(self, text: str) -> None:
        """A line above the progress bar (or a plain log line without one)."""
        if self.pbar is not None:
            self.pbar.write(text)
        else:
            self.log(text)

    def eval_line(self, row: dict, phase) -> None:
        """The line after an evaluation: train and val loss (and the L-Former head metrics)."""
        heads = ""
        if row["tool_acc"] != "":
            heads = (f", tool acc {row['tool_acc']:.3f}, value MAE {row['value_mae']:.3f}, "
                     f"plan exact {row['plan_em']:.3f} (phase {phase})")
        if self.pbar is not None:
            self.pbar.write(f"step {row['step']}: train loss {row['loss']:.4f}, val loss {row['val_loss']:.4f}, "
                            f"val bits/byte {row['val_bpb']:.4f}{heads}")
        elif heads:
            self.log(f"step {row['step']}: val bits/byte {row['val_bpb']:.4f}{heads}")

    def row(self, row: dict) -> None:
        """One step: a CSV row, the TensorBoard scalars, the progress bar."""
        if not self.d.master:
            return
        with open(self.paths["csv"], "a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow(row)
        step = row["step"]
        if self.writer is not None:
            self.writer.add_scalar("train/loss", row["loss"], step)
            self.writer.add_scalar("train/lr", row["lr"], step)
            self.writer.add_scalar("train/tokens_per_s", row["tokens_per_s"], step)
            if row["ilt_scale"] != "":
                self.writer.add_scalar("train/ilt_scale", row["ilt_scale"], step)
            if row["val_loss"] != "":
                self.writer.add_scalar("val/loss", row["val_loss"], step)
                self.writer.add_scalar("val/bits_per_byte", row["val_bpb"], step)
            for k in HEAD_METRICS:
                if row[k] != "":
                    self.writer.add_scalar(f"val/{k}", row[k], step)
        if self.pbar is not None:
            self.pbar.update(1)
            self.pbar.set_postfix(loss=f"{row['loss']:.3f}", bpb=f"{row['loss'] / LN2:.3f}",
                                  tok_s=f"{row['tokens_per_s']:,.0f}")

    def close_progress(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None

    def close(self) -> None:
        self.close_progress()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def finish(self, finished: bool, cfg, *, title: str, sample_model, val: np.ndarray) -> None:
        """After the last step (``finished``): the loss plot and the sample, as ``cfg`` asks; ``paths`` then
        lists only what was written."""
        if self.d.master and finished:
            if cfg.plot:
                self.plot(title)
            else:
                self.paths.pop("plot")
            if cfg.sample_tokens > 0:
                self.sample(sample_model, val, cfg)
            else:
                self.paths.pop("sample")
        else:
            for k in ("plot", "sample"):
                self.paths.pop(k, None)

    def plot(self, title: str) -> None:
        """The loss-curve PNG; a failure is a warning, never the end of a run."""
        try:
            plot_losses(self.paths["csv"], self.paths["plot"], title)
        except Exception as e:  # noqa: BLE001 - a plot is never worth failing a run
            warnings.warn(f"hilt: could not draw the loss plot: {e}")
            self.paths.pop("plot")

    def sample(self, model, val: np.ndarray, cfg) -> None:
        """Generate ``cfg.sample_tokens`` bytes after a prompt from the val text; write and show them."""
        from hilt.generate import generate

        from .data import decode

        prompt = sample_prompt(val, min(64, model.config.max_seq_len))
        ids = generate(model, prompt, cfg.sample_tokens, temperature=cfg.sample_temperature, top_p=cfg.sample_top_p,
                       seed=cfg.seed)
        text = decode(ids[len(prompt):].tolist())
        self.paths["sample"].write_text(f"--- prompt ({len(prompt)} bytes of the val text) ---\n"
                                        f"{decode(prompt)}\n--- continuation ({cfg.sample_tokens} bytes, "
                                        f"temperature {cfg.sample_temperature}, top-p {cfg.sample_top_p}) ---\n"
                                        f"{text}\n")
        self.log("sample:\n" + decode(prompt) + "\u2502" + text)

    def summary(self, step_done: int, val_loss, val_bpb, skipped: int, seconds: float, tensorboard: bool) -> None:
        """The closing lines: the final numbers and where everything went."""
        if val_bpb is not None:
            self.log(f"final: step {step_done}, val loss {val_loss:.4f}, val bits/byte {val_bpb:.4f}"
                     + (f", {skipped} step(s) skipped" if skipped else ""))
        self.log(f"wrote {self.out}/ in {seconds:.0f} s:")
        for key, p in self.paths.items():
            if key != "run" and Path(p).exists():
                self.log(f"  {key:<12} {p}")
        if "tensorboard" not in self.paths and tensorboard:
            self.log("  (TensorBoard logs: not written, tensorboard is not installed)")
