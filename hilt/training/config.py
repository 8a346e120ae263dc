"""``TrainConfig``: every option of a ``hilt train`` run, its validation, its JSON form, and the model
config it asks for."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from hilt.models.registry import get_model_spec

__all__ = ["TrainingError", "TrainConfig", "MODEL_FLAGS", "DEFAULT_MODEL", "DTYPES", "model_config_for",
           "has_reasoning_heads"]


class TrainingError(RuntimeError):
    """Training cannot go on (repeated non-finite losses, bad options); the message says why."""


# Model-shape flags: CLI flag -> config field (applied when the chosen model's config has the field).
MODEL_FLAGS = {
    "d_model": int, "n_layers": int, "n_heads": int, "d_ff": int, "max_seq_len": int, "block_size": int,
    "dropout": float, "pos_encoding": str, "ilt_dim": int, "ilt_heads": int, "ilt_layers": int,
    "ilt_dropout": float, "n_local_layers": int, "n_global_layers": int, "n_decoder_layers": int,
    "d_side": int, "tap_every": int,
}

# The small default run's model settings, on top of each config's own defaults (where the field exists).
DEFAULT_MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 256, "dropout": 0.0,
                 "ilt_dim": 64}

DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def flag(name: str) -> str:
    """``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything a run needs; saved in every checkpoint (``state.json``) and as ``train_config.json``."""

    model: str = "hilt"
    model_config: dict = field(default_factory=dict)  # config fields set on top of DEFAULT_MODEL
    data: Optional[str] = None       # None: the embedded stdlib corpus
    out: Optional[str] = None        # None: runs/<model>-<YYYYmmdd-HHMMSS>
    device: str = "auto"
    dtype: str = "auto"              # autocast dtype: auto|float32|bfloat16|float16
    backend: Optional[str] = None    # op backend for the model's layers (None: automatic)
    threads: Optional[int] = None    # CPU intra-op threads; None: usable cores / local processes
    seed: int = 1337
    batch_size: int = 16             # global sequences per micro-step
    grad_accum: int = 1
    max_steps: int = 200
    warmup: int = 20
    lr: float = 2e-3
    min_lr: Optional[float] = None   # None: lr / 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0           # 0: no clipping
    eval_every: int = 50
    eval_iters: int = 10
    ckpt_every: int = 50            # 0: only at the end
    ilt_scale_start: float = 0.01
    ilt_scale_end: float = 0.1
    compile: bool = False
    fsdp: bool = False               # under torchrun: shard the model with FSDP2 instead of DDP
    grad_checkpoint: bool = False
    max_bad_steps: int = 5           # consecutive non-finite steps before stopping
    sample_tokens: int = 256
    sample_temperature: float = 0.8
    sample_top_p: float = 0.95
    progress: bool = True
    tensorboard: bool = True         # when installed
    plot: bool = True
    cache_dir: Optional[str] = None
    use_cache: bool = True
    # --model lformer only: training phases and the synthetic reasoning data (hilt.training.lformer)
    phase_a_steps: Optional[int] = None   # base frozen; None: round(phase_a_fraction * max_steps)
    phase_b_steps: Optional[int] = None   # given: max_steps = phase A steps + this
    phase_a_fraction: float = 0.5
    phase_b_unfreeze: str = "1"           # phase B trains the last K base layers ("K") or all ("all")
    reasoning_batch_size: Optional[int] = None  # reasoning rows per micro-batch; None: batch_size // 2
    reasoning_examples: int = 4096        # training pool
    reasoning_eval_examples: int = 256    # held out

    @property
    def final_lr(self) -> float:
        """The end of the cosine decay: ``min_lr``, or ``lr / 10``."""
        return self.min_lr if self.min_lr is not None else self.lr / 10

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_iters", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "ckpt_every", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if get_model_spec(self.model).name != "lformer":
            given = [n for n in ("phase_a_steps", "phase_b_steps", "reasoning_batch_size")
                     if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{', '.join(flag(n) for n in given)} applies to --model lformer only")
        for name in ("phase_a_steps", "phase_b_steps", "reasoning_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.fsdp and DTYPES[self.dtype] == torch.float16:
            raise ValueError("--fsdp does not support --dtype float16 (its gradient scaler is per rank); "
                             "use bfloat16 or float32")
        if not 0.0 <= self.phase_a_fraction <= 1.0:
            raise ValueError(f"phase_a_fraction must be in [0, 1], got {self.phase_a_fraction}")


def has_reasoning_heads(model_cfg) -> bool:
    """Whether an LFormer config has a reasoning head (then ``train`` runs the phases and reasoning data)."""
    return bool(model_cfg.n_tools or model_cfg.value_head or model_cfg.plan_vocab)


def model_config_for(cfg: TrainConfig):
    """The model config object: the type's defaults, then DEFAULT_MODEL (where it applies), then
    ``cfg.model_config`` (every key must be a field of that config)."""
    spec = get_model_spec(cfg.model)
    fields = {f.name for f in dataclasses.fields(spec.config_class)}
    values = {k: v for k, v in DEFAULT_MODEL.items() if k in fields}
    if spec.name == "lformer":  # heads sized for the synthetic reasoning data
        from .lformer import lformer_head_config

        values.update(lformer_head_config())
    user = {k: v for k, v in cfg.model_config.items() if k != "model_type"}
    wrong = sorted(set(user) - fields)
    if wrong:
        raise ValueError(f"{', '.join('--' + w.replace('_', '-') for w in wrong)} does not apply to --model "
                         f"{spec.name} ({spec.config_class.__name__} has no such field)")
    values.update(user)
    return spec.config_class.from_dict(values)
