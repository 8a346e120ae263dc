"""Model outputs and losses shared by the models."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ModelOutput", "lm_loss", "classification_loss", "init_weights", "check_ids"]

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    """``logits``: (B, T, vocab) for LMs, (B, n_classes) for classification. ``loss``: a scalar
    when targets were given. ``aux_losses``: named extra scalars (already included in ``loss``
    where a model says so)."""

    logits: Tensor
    loss: Optional[Tensor] = None
    aux_losses: dict = field(default_factory=dict)


def check_step(ids: Tensor, cache, start_pos: Optional[int], max_seq_len: int) -> int:
    """Validate a cached decoding step (``forward_step``) of ``ids`` (B, T) against a KV ``cache`` (with
    ``batch_size``, ``length``, ``max_len``) and return the start position (``cache.length`` by default)."""
    pos = cache.length if start_pos is None else int(start_pos)
    check_ids(ids, max_seq_len)
    B, T = ids.shape
    if B != cache.batch_size:
        raise ValueError(f"ids has batch {B}, the cache was built for {cache.batch_size}")
    if not 0 <= pos <= cache.length:
        raise ValueError(f"start_pos must be in [0, cache.length={cache.length}], got {pos}")
    if pos + T > cache.max_len:
        raise ValueError(f"positions {pos}..{pos + T - 1} exceed the cache length {cache.max_len} "
                         f"(max_seq_len={max_seq_len}): rebuild the cache from a shorter window")
    return pos


def check_ids(ids: Tensor, max_seq_len: int, key_padding_mask: Optional[Tensor] = None) -> None:
    if ids.dim() != 2:
        raise ValueError(f"ids must be (B, T), got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
    if ids.shape[1] > max_seq_len:
        raise ValueError(f"ids length {ids.shape[1]} exceeds max_seq_len={max_seq_len}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != ids.shape:
            raise ValueError(f"key_padding_mask must have ids' shape {tuple(ids.shape)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be torch.bool (True = padding), got {key_padding_mask.dtype}")


def lm_loss(logits: Tensor, targets: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Mean token cross-entropy (fp32) of ``logits`` (B, T, V) against ``targets`` (B, T).

    Targets are already shifted by the caller. Positions with target -100, and positions where
    ``key_padding_mask`` is True, do not count. With no counted position the loss is 0 (not NaN).
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    targets = targets.long()
    if key_padding_mask is not None:
        targets = targets.masked_fill(key_padding_mask, IGNORE_INDEX)
    flat = targets.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = (flat != IGNORE_INDEX).sum().clamp_min(1)
    return total / count


def classification_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of ``logits`` (B, n_classes) against ``targets`` (B,); -100 ignored."""
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:1])}, got {tuple(targets.shape)}")
    targets = targets.long()
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp_min(1)


def init_weights(module: nn.Module, std: float = 0.02, n_residual: int = 1) -> None:
    """GPT-2 style init of every submodule: Linear/Embedding weights ~ N(0, std), zero biases,
    LayerNorm at identity; residual output projections (``attn.out_proj``, ``mlp.fc2``) scaled by
    1/sqrt(2 * n_residual); other parameters owning a ``reset_parameters`` (learned positional
    tables, pooling queries) are reset by their module."""
    resid_std = std / math.sqrt(2 * max(n_residual, 1))
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            is_resid = name.endswith("attn.out_proj") or name.endswith("mlp.fc2")
            nn.init.normal_(m.weight, std=resid_std if is_resid else std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            m.reset_parameters()
        elif isinstance(m, nn.Module) and m is not module and hasattr(m, "reset_parameters") and any(
                True for _ in m.parameters(recurse=False)):
            m.reset_parameters()
