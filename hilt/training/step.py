"""One optimisation step: gradient accumulation over micro-batches under autocast (DDP syncs on the last
one only), the fp16 gradient scaler, clipping, and the NaN/inf guard, decided the same way on every rank."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .config import TrainingError
from .distributed import Dist, all_reduce

__all__ = ["StepOutcome", "train_step", "NonFiniteGuard"]


@dataclass
class StepOutcome:
    loss: float        # the mean training loss over the ranks; nan when the step was skipped
    grad_norm: float   # before clipping
    skipped: bool      # a non-finite loss or gradient: no update


def train_step(model: nn.Module, raw: nn.Module, sampler, optimizer, scaler, *, grad_accum: int, grad_clip: float,
               autocast, d: Dist, fsdp: bool = False, mix: Optional[Callable] = None) -> StepOutcome:
    """Forward/backward over ``grad_accum`` micro-batches from ``sampler.next_batch()`` (``(B, T)`` ids and
    targets; ``mix(ids, targets, micro) -> (ids, targets, extra forward kwargs)`` adds rows, e.g. the
    L-Former's reasoning rows), then clip and update, or skip the update when any rank saw a non-finite
    loss (or, without a scaler, gradient). ``model`` is what runs (DDP / compiled), ``raw`` the module whose
    parameters are clipped (FSDP2-sharded in place when ``fsdp``)."""
    device = next(raw.parameters()).device
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        ids, targets = sampler.next_batch()
        extra = {}
        if mix is not None:
            ids, targets, extra = mix(ids, targets, micro)
        sync = not d.enabled or micro == grad_accum - 1
        if fsdp:
            raw.set_requires_gradient_sync(sync)
        with (nullcontext() if sync or fsdp else model.no_sync()):
            with autocast:
                loss = model(ids, targets, **extra).loss / grad_accum
            scaler.scale(loss).backward()
        loss_sum += loss.detach().float()

    # every rank sees the same all-reduced numbers, so every rank decides the same
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip)
    else:
        grads = [p.grad.detach().norm() for p in raw.parameters() if p.grad is not None]
        grad_norm = torch.stack(grads).norm() if grads else torch.zeros((), device=device)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    stats = torch.stack([torch.nan_to_num(loss_sum, nan=0.0, posinf=0.0, neginf=0.0),
                         (~torch.isfinite(loss_sum)).float(),
                         (~torch.isfinite(grad_norm.float())).float()]).double()
    all_reduce(stats, d)
    bad = stats[1].item() > 0 or (stats[2].item() > 0 and not scaler.is_enabled())
    if bad:
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.update()  # the unscale above recorded the inf: the scale goes down
        return StepOutcome(float("nan"), grad_norm.item(), True)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(stats[0].item() / d.world_size, grad_norm.item(), False)


class NonFiniteGuard:
    """Counts skipped steps; stops the run after ``max_bad_steps`` in a row."""

    def __init__(self, max_bad_steps: int, skipped_total: int = 0) -> None:
        self.max_bad_steps, self.skipped_total, self.in_a_row = max_bad_steps, skipped_total, 0

    def check(self, outcome: StepOutcome, step_done: int, checkpoint_path) -> Optional[str]:
        """None after a good step; a message after a skipped one; raises :class:`TrainingError` when too many
        were skipped in a row."""
        if not outcome.skipped:
            self.in_a_row = 0
            return None
        self.skipped_total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_bad_steps:
            raise TrainingError(
                f"stopping at step {step_done}: {self.in_a_row} consecutive steps had a non-finite "
                f"loss or gradient (NaN/inf), {self.skipped_total} skipped in all. Lower --lr, use "
                f"--dtype bfloat16 or float32, raise --warmup, or check the data; resume from the last "
                f"checkpoint with --resume {checkpoint_path}")
        return f"step {step_done}: non-finite loss or gradient, step skipped ({self.in_a_row} in a row)"
