"""What both NPT trainers do every step: the AdamW + warmup-cosine optimiser over the NP weights, one
optimisation step with the NaN/inf guard, the metrics row of the step (losses and per-layer v statistics),
and where rows go (metrics.csv and the progress bar). Used by :func:`hilt.training.npt.train_npt` (hilt
Llama checkpoints, DDP) and :func:`hilt.training.npt_hf.train_npt_hf` (Hugging Face models)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Optional

import torch

from .npt_parts import NPTTrainConfig, Stage
from .schedule import WarmupCosine

__all__ = ["make_optimizer", "optimize", "metrics_row", "val_columns", "fmt_fidelity", "StepLog"]

FIDELITY_KEYS = ("kl", "agreement", "student_bpb", "teacher_bpb", "student_nats", "teacher_nats")


def make_optimizer(params: list[torch.Tensor], cfg: NPTTrainConfig,
                   max_steps: int) -> tuple[torch.optim.Optimizer, WarmupCosine]:
    """AdamW (betas 0.9/0.95, weight decay on matrices only) and its warmup + cosine schedule
    (floor ``cfg.min_lr``, default a tenth of ``cfg.lr``)."""
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95))
    schedule = WarmupCosine(optimizer, cfg.lr, cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10,
                            cfg.warmup, max_steps)
    return optimizer, schedule


def optimize(loss: torch.Tensor, params: list[torch.Tensor], cfg: NPTTrainConfig, optimizer: torch.optim.Optimizer,
             reduce: Optional[Callable[[torch.Tensor], None]] = None) -> tuple[torch.Tensor, bool]:
    """Backward, clip to ``cfg.grad_clip`` (0: only measure the norm), and step unless the loss or the
    gradient norm is NaN/inf (on any process: ``reduce`` sums the flags across them). Returns
    (gradient norm, skipped)."""
    loss.backward()
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        grad_norm = torch.stack([p.grad.norm() for p in params if p.grad is not None]).norm()
    flags = torch.tensor([float(not torch.isfinite(loss).item()), float(not torch.isfinite(grad_norm).item())],
                         device=loss.device)
    if reduce is not None:
        reduce(flags)
    bad = bool(flags.sum().item() > 0)
    if not bad:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, bad


def metrics_row(step: int, stage: Stage, lr: float, losses: dict[str, float], grad_norm: torch.Tensor, bad: bool,
                layer_stats: dict) -> dict:
    """The metrics.csv row of a step: ``losses`` (loss, direct, kl, reg), the stage, and per NP layer its
    direct loss, the norms of v_a and v_b and the cosine of each v_a rank with the attention output."""
    row = {"step": step, "stage": stage.name, "attn_ratio": stage.attn_ratio, "mlp_ratio": stage.mlp_ratio,
           "lr": lr, **{k: losses[k] for k in ("loss", "direct", "kl", "reg")}, "grad_norm": grad_norm.item(),
           "skipped": int(bad)}
    for i, st in layer_stats.items():
        row[f"layer{i}_direct"] = st.direct_loss.item()
        row[f"layer{i}_v_a_norm"] = st.v_a_norm.item()
        row[f"layer{i}_v_b_norm"] = st.v_b_norm.item()
        row[f"layer{i}_v_a_attn_cos"] = st.v_a_attn_cos.mean().item()
        for k, c in enumerate(st.v_a_attn_cos.tolist()):
            row[f"layer{i}_v_a_attn_cos_r{k}"] = c
    return row


def val_columns(m: dict) -> dict:
    """The metrics.csv columns of a fidelity evaluation: ``val_<key>`` for each of :data:`FIDELITY_KEYS` it has."""
    return {f"val_{k}": m[k] for k in FIDELITY_KEYS if k in m}


def fmt_fidelity(m: dict, split: str = "") -> str:
    """One line of a fidelity evaluation (the nats/token losses when it has them); ``split``: a prefix of the
    bits/byte, e.g. ``"val "``."""
    line = f"KL(teacher||student) {m['kl']:.4f} nats/token, next-token agreement {100 * m['agreement']:.2f}%, "
    if "student_nats" in m:
        line += f"loss student {m['student_nats']:.4f} / teacher {m['teacher_nats']:.4f} nats/token, "
    return line + f"{split}bits/byte student {m['student_bpb']:.4f} / teacher {m['teacher_bpb']:.4f}"


class StepLog:
    """Rows into ``csv_path`` (header written here) and a tqdm bar of ``total`` steps; ``writes``: this
    process writes (rank 0), ``progress``: show the bar. ``say`` prints above the bar (or logs)."""

    def __init__(self, csv_path: Path, fields: list[str], total: int, writes: bool, progress: bool,
                 log: Callable[[str], None]) -> None:
        self.csv_path, self.fields, self.writes, self.log = csv_path, fields, writes, log
        if writes:
            with open(csv_path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writeheader()
        self.pbar = None
        if writes and progress:
            from tqdm.auto import tqdm

            self.pbar = tqdm(total=total, desc="npt-train", dynamic_ncols=True)

    def say(self, msg: str) -> None:
        self.pbar.write(msg) if self.pbar is not None else self.log(msg)

    def add(self, row: dict) -> None:
        if self.writes:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        if self.pbar is not None:
            self.pbar.update(1)
            self.pbar.set_postfix(stage=row["stage"], loss=f"{row['loss']:.4f}", kl=f"{row['kl']:.3f}")

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
