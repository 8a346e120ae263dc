"""Validation: the mean token loss and bits per byte of a language model on a held-out split."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import numpy as np
import torch
from torch import nn

from .data import eval_batches
from .distributed import Dist, all_reduce

__all__ = ["LN2", "evaluate"]

LN2 = math.log(2.0)


@torch.no_grad()
def evaluate(model: nn.Module, data: np.ndarray, batch_size: int, seq_len: int, iters: Optional[int], *,
             device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0, d: Dist = Dist(),
             progress: bool = False) -> tuple[float, float]:
    """(mean token loss, bits per byte) on ``data`` (bytes, shape ``(n,)``): ``iters`` fixed random batches of
    ``(batch_size, seq_len)`` (the same every call), or the whole split in non-overlapping windows when
    ``iters`` is None. Ranks split the work."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    batches = eval_batches(data, batch_size, seq_len, iters, seed=seed, rank=d.rank, world_size=d.world_size,
                           device=device)
    if progress:
        from tqdm.auto import tqdm

        n = iters if iters is not None else -(-max(len(data) - 1, 1) // (min(seq_len + 1, len(data)) - 1) // batch_size)
        batches = tqdm(batches, total=n, desc="eval", dynamic_ncols=True)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    for ids, targets in batches:
        if ids.numel() == 0:
            continue
        with autocast:
            loss = model(ids, targets).loss
        total[0] += loss.double() * targets.numel()
        total[1] += targets.numel()
    all_reduce(total, d)
    model.train(was_training)
    loss = (total[0] / total[1].clamp_min(1)).item()
    return loss, loss / LN2
