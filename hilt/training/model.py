"""The model of a run: built from the options (or a resumed checkpoint's config), with activation
checkpointing when asked for."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from hilt.models.registry import ModelSpec, build_model, get_model_spec

from .config import TrainConfig, TrainingError, model_config_for

__all__ = ["build_for_training", "enable_grad_checkpointing"]


def build_for_training(cfg: TrainConfig, state: Optional[dict], device: torch.device):
    """(spec, model config, model on ``device``) for ``cfg``; a resumed run (``state``: its ``state.json``)
    takes the model type and config from the checkpoint. Byte-level data needs ``vocab_size >= 256``."""
    spec: ModelSpec = get_model_spec(state["model_type"] if state else cfg.model)
    if state:
        model_cfg = spec.config_class.from_dict(dict(state["config"], model_type=spec.config_class.model_type))
    else:
        model_cfg = model_config_for(cfg)
    raw = build_model(spec.name, model_cfg, **backend_kwargs(cfg)).to(device)
    if getattr(model_cfg, "vocab_size", 256) < 256:
        raise TrainingError(f"byte-level data needs vocab_size >= 256, got {model_cfg.vocab_size}")
    if cfg.grad_checkpoint:
        enable_grad_checkpointing(raw)
    return spec, model_cfg, raw


def backend_kwargs(cfg: TrainConfig) -> dict:
    """The model constructor's keyword arguments for ``--backend``."""
    return {"backend": cfg.backend} if cfg.backend else {}


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Activation checkpointing: recompute each transformer layer / ILT in the backward instead of
    storing its activations. Uses the model's own ``set_grad_checkpointing`` when it has one. Returns
    how many modules were wrapped."""
    from torch.utils.checkpoint import checkpoint

    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
        return -1
    from hilt.nn import InterLayerTransformer, TransformerLayer

    wrapped: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, (TransformerLayer, InterLayerTransformer)):
            continue
        if any(name.startswith(w + ".") for w in wrapped):
            continue

        def forward(*args, _orig=m.forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_orig, *args, use_reentrant=False, **kwargs)
            return _orig(*args, **kwargs)

        m.forward = forward
        wrapped.append(name)
    return len(wrapped)
