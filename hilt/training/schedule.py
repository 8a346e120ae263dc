"""Schedules and the optimizer: warmup + cosine learning rate, the HILT modulation-scale ramp, AdamW."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["lr_at", "ilt_scale_at", "WarmupCosine", "configure_optimizer"]


def lr_at(step: int, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup to ``lr`` over ``warmup`` steps, then a
    cosine decay to ``min_lr`` at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    decay_steps = max_steps - warmup
    if decay_steps <= 1:
        return lr
    progress = min(1.0, (step - warmup) / (decay_steps - 1))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def ilt_scale_at(step: int, start: float, end: float, max_steps: int) -> float:
    """HILT modulation scale: linear from ``start`` at step 0 to ``end`` at the last step."""
    if max_steps <= 1:
        return end
    return start + (end - start) * min(1.0, step / (max_steps - 1))


class WarmupCosine:
    """Sets the optimizer's LR from :func:`lr_at`; its state (the step) goes into ``optimizer.pt``."""

    def __init__(self, optimizer, lr: float, min_lr: float, warmup: int, max_steps: int) -> None:
        self.optimizer, self.lr, self.min_lr, self.warmup, self.max_steps = optimizer, lr, min_lr, warmup, max_steps
        self.last_step = -1

    def set(self, step: int) -> float:
        lr = lr_at(step, self.lr, self.min_lr, self.warmup, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_step = step
        return lr

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "lr": self.lr, "min_lr": self.min_lr, "warmup": self.warmup,
                "max_steps": self.max_steps}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])


def configure_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2: linear weights, embeddings) only; biases, norms,
    learned vectors get none. Tied weights appear once. ``cfg``: a :class:`~hilt.training.config.TrainConfig`."""
    decay, no_decay = [], []
    for p in model.parameters():  # unique parameters
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kwargs)
