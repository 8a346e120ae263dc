"""The parts of NPT training that ``hilt npt-train --ckpt`` (:mod:`.npt`) and ``--hf`` (:mod:`.npt_hf`) share:
the curriculum (stages and mixing ratios), the layer weights, the config, the loss, the CSV columns and the
result. See :mod:`.npt` for what they mean."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hilt.models import npt as N

from .config import TrainingError

__all__ = ["STAGES", "DEFAULT_CURRICULUM", "Stage", "CurriculumError", "parse_curriculum", "stage_at",
           "parse_layer_weights", "NPTTrainConfig", "kl_teacher_student", "npt_loss", "csv_fields", "NPTTrainResult"]

STAGES = ("teacher", "mixed", "student")
DEFAULT_CURRICULUM = "teacher:100,mixed:100:0.5,student:100"


class CurriculumError(ValueError):
    """A malformed ``--curriculum`` or ``--layer-weights``; the message names the bad part."""


# ------------------------------------------------------------------------------------- curriculum

@dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    attn_ratio: float
    mlp_ratio: float
    start: int = 0  # first step (0-based) of the stage

    @property
    def end(self) -> int:
        return self.start + self.steps


def _ratio(text: str, what: str, part: str, i: int) -> float:
    try:
        r = float(text)
    except ValueError:
        raise CurriculumError(f"curriculum part {i} {part!r}: {what} {text!r} is not a number") from None
    if not (math.isfinite(r) and 0.0 <= r <= 1.0):
        raise CurriculumError(f"curriculum part {i} {part!r}: {what} {text!r} must be in [0, 1] "
                              "(0 = teacher, 1 = student)")
    return r


def parse_curriculum(spec: str) -> list[Stage]:
    """``stage:steps[:attn_ratio[:mlp_ratio]]``, comma-separated, into :class:`Stage` s.

    Defaults: ``teacher`` = 0 / 0 (both inputs are the teacher's), ``student`` = 1 / 1, ``mixed`` =
    attn_ratio 0.5 and mlp_ratio = attn_ratio. A teacher stage's attn_ratio must be 0 and a student stage's
    1 when given (say ``mixed`` otherwise); mlp_ratio is free (``teacher:N:0:1`` feeds the NP layers the
    teacher's attention input and the student's own residual stream). Ratios are constant within a stage."""
    if not isinstance(spec, str) or not spec.strip():
        raise CurriculumError("curriculum is empty; expected 'stage:steps[:attn_ratio[:mlp_ratio]],...' "
                              f"with stages {'/'.join(STAGES)}")
    stages: list[Stage] = []
    start = 0
    for i, part in enumerate(spec.split(","), 1):
        raw = part.strip()
        fields = [f.strip() for f in raw.split(":")]
        if not raw:
            raise CurriculumError(f"curriculum part {i} is empty (a stray comma?) in {spec!r}")
        if len(fields) < 2 or len(fields) > 4:
            raise CurriculumError(f"curriculum part {i} {raw!r}: expected stage:steps[:attn_ratio[:mlp_ratio]]")
        name = fields[0].lower()
        if name not in STAGES:
            raise CurriculumError(f"curriculum part {i} {raw!r}: unknown stage {fields[0]!r} "
                                  f"(use {', '.join(STAGES)})")
        if not fields[1].isdigit() or int(fields[1]) < 1:
            raise CurriculumError(f"curriculum part {i} {raw!r}: steps {fields[1]!r} is not a positive integer")
        steps = int(fields[1])
        default = {"teacher": 0.0, "mixed": 0.5, "student": 1.0}[name]
        attn = _ratio(fields[2], "attn_ratio", raw, i) if len(fields) > 2 and fields[2] != "" else default
        mlp = _ratio(fields[3], "mlp_ratio", raw, i) if len(fields) > 3 and fields[3] != "" else (
            attn if name == "mixed" else default)
        if name == "teacher" and attn != 0.0:
            raise CurriculumError(f"curriculum part {i} {raw!r}: a teacher stage has attn_ratio 0; "
                                  f"use 'mixed:{steps}:{fields[2]}' for a mix")
        if name == "student" and attn != 1.0:
            raise CurriculumError(f"curriculum part {i} {raw!r}: a student stage has attn_ratio 1; "
                                  f"use 'mixed:{steps}:{fields[2]}' for a mix")
        stages.append(Stage(name, steps, attn, mlp, start))
        start += steps
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage of optimizer step ``step`` (0-based); past the end, the last stage."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    for s in stages:
        if step < s.end:
            return s
    return stages[-1]


def parse_layer_weights(spec: str, n: int) -> list[float]:
    """``uniform`` (all 1), ``linear`` (from 1 at the first NP layer down to 1/n at the last), or ``n``
    comma-separated non-negative numbers (not all 0). The direct loss is ``sum w_i L_i / sum w_i``."""
    if n < 1:
        raise CurriculumError("layer weights need at least one NP layer")
    s = str(spec).strip().lower()
    if s == "uniform":
        return [1.0] * n
    if s == "linear":
        return [1.0 - j / n for j in range(n)]
    parts = [p.strip() for p in s.split(",")]
    if len(parts) != n:
        raise CurriculumError(f"layer weights {spec!r}: expected 'uniform', 'linear' or {n} comma-separated "
                              f"numbers (one per NP layer), got {len(parts)}")
    out = []
    for p in parts:
        try:
            w = float(p)
        except ValueError:
            raise CurriculumError(f"layer weights {spec!r}: {p!r} is not a number") from None
        if not math.isfinite(w) or w < 0:
            raise CurriculumError(f"layer weights {spec!r}: {p!r} must be a finite number >= 0")
        out.append(w)
    if sum(out) <= 0:
        raise CurriculumError(f"layer weights {spec!r}: at least one must be > 0")
    return out


# ------------------------------------------------------------------------------------------- config

@dataclass
class NPTTrainConfig:
    ckpt: str = ""                   # base Llama checkpoint folder (hilt train --model llama)
    layers: str = "upper_half"       # all | upper_half | lower_half | A-B | A,B,C
    np_rank: int = 64
    num_ranks: int = 1
    modulate: str = "dual"           # single | dual | triple
    curriculum: str = DEFAULT_CURRICULUM
    layer_weights: str = "uniform"
    data: Optional[str] = None       # None: the data the base was trained on
    out: Optional[str] = None        # None: runs/npt-<YYYYmmdd-HHMMSS>
    device: str = "auto"
    threads: Optional[int] = None
    seed: int = 1337
    batch_size: int = 8              # global sequences per step (split between processes)
    seq_len: Optional[int] = None    # None: the model's max_seq_len
    lr: float = 1e-3
    min_lr: Optional[float] = None   # None: lr / 10
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    direct_weight: float = 1.0
    kl_weight: float = 1.0
    reg_weight: float = 1e-4
    eval_every: int = 0              # 0: before training and at the end only
    eval_iters: int = 10
    eval_batch_size: Optional[int] = None
    progress: bool = True
    use_cache: bool = True

    def validate(self) -> None:
        if not self.ckpt:
            raise TrainingError("--ckpt (a Llama checkpoint folder) is required")
        self.validate_settings()

    def validate_settings(self) -> None:
        """Everything but the base model: NPT settings, curriculum, sizes, loss weights, LR."""
        N.NPTConfig(np_rank=self.np_rank, num_ranks=self.num_ranks, modulate=self.modulate).validate()
        parse_curriculum(self.curriculum)
        for name in ("batch_size", "eval_iters"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every"):
            if getattr(self, name) < 0:
                raise TrainingError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("direct_weight", "kl_weight", "reg_weight", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise TrainingError(f"{name} must be a finite number >= 0, got {v}")
        if not self.lr > 0:
            raise TrainingError(f"lr must be > 0, got {self.lr}")


def kl_teacher_student(teacher_logits, student_logits) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, summed over the vocabulary, mean over tokens."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def npt_loss(out: N.ScaffoldOutput, weights: list[float], cfg: NPTTrainConfig) -> tuple[torch.Tensor, dict]:
    """(total loss, parts): ``direct_weight * sum w_i L_i / sum w_i + kl_weight * KL + reg_weight * mean reg``."""
    idx = sorted(out.layers)
    w = torch.tensor(weights, dtype=torch.float32, device=out.student_logits.device)
    direct = torch.stack([out.layers[i].direct_loss for i in idx])
    direct = (w * direct).sum() / w.sum()
    reg = torch.stack([out.layers[i].reg for i in idx]).mean()
    kl = kl_teacher_student(out.teacher_logits, out.student_logits)
    total = cfg.direct_weight * direct + cfg.kl_weight * kl + cfg.reg_weight * reg
    return total, {"direct": direct.detach(), "kl": kl.detach(), "reg": reg.detach()}


def csv_fields(layers: list[int], num_ranks: int) -> list[str]:
    f = ["step", "stage", "attn_ratio", "mlp_ratio", "lr", "loss", "direct", "kl", "reg", "grad_norm", "skipped"]
    for i in layers:
        f += [f"layer{i}_direct", f"layer{i}_v_a_norm", f"layer{i}_v_b_norm", f"layer{i}_v_a_attn_cos"]
        f += [f"layer{i}_v_a_attn_cos_r{k}" for k in range(num_ranks)]
    return f + ["val_kl", "val_agreement", "val_student_bpb", "val_teacher_bpb", "seconds"]


@dataclass
class NPTTrainResult:
    out_dir: Path
    before: dict
    after: dict
    history: list = field(default_factory=list)
    model: Optional[nn.Module] = None
    paths: dict = field(default_factory=dict)
