"""LR and modulation-scale schedules, optimizer groups."""
from __future__ import annotations

import math

import pytest
import torch

from hilt.models import HILT, HILTConfig
from hilt.training.config import TrainConfig
from hilt.training.schedule import WarmupCosine, configure_optimizer, ilt_scale_at, lr_at


def test_lr_warmup_then_cosine():
    lr, lo, warm, total = 1e-3, 1e-4, 10, 110
    assert lr_at(0, lr, lo, warm, total) == pytest.approx(1e-4)
    assert lr_at(4, lr, lo, warm, total) == pytest.approx(5e-4)
    assert lr_at(9, lr, lo, warm, total) == pytest.approx(1e-3)
    assert lr_at(10, lr, lo, warm, total) == pytest.approx(1e-3)   # cosine starts at the peak
    mid = 10 + (100 - 1) / 2
    assert lr_at(int(mid), lr, lo, warm, total) == pytest.approx(
        lo + 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 99)) * (lr - lo))
    assert lr_at(109, lr, lo, warm, total) == pytest.approx(1e-4)  # the last step reaches min_lr
    values = [lr_at(s, lr, lo, warm, total) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    assert lr_at(0, lr, lo, 0, 5) == pytest.approx(lr)  # no warmup


def test_ilt_scale_linear_default_range():
    assert ilt_scale_at(0, 0.01, 0.1, 100) == pytest.approx(0.01)
    assert ilt_scale_at(99, 0.01, 0.1, 100) == pytest.approx(0.1)
    assert ilt_scale_at(33, 0.01, 0.1, 100) == pytest.approx(0.01 + 0.09 * 33 / 99)
    assert TrainConfig().ilt_scale_start == 0.01 and TrainConfig().ilt_scale_end == 0.1


def test_weight_decay_on_matrices_only_and_schedule_sets_lr():
    m = HILT(HILTConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=16, ilt_dim=16))
    opt = configure_optimizer(m, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == m.num_parameters()  # the tied embedding appears once
    s = WarmupCosine(opt, 1e-3, 1e-4, 2, 10)
    assert s.set(0) == pytest.approx(5e-4) and all(g["lr"] == pytest.approx(5e-4) for g in opt.param_groups)
