"""Training: ``hilt train`` / ``python -m hilt.train`` / ``torchrun --nproc_per_node=N -m hilt.train``.

One readable loop, top to bottom (nanoGPT style):

1. processes and device: DDP when launched by torchrun (gloo on CPU, nccl on GPU, from the env vars)
   (``--fsdp``: FSDP2 instead, each layer sharded; checkpoints gathered to rank 0 in the usual format)
2. data: byte-level corpus (the stdlib by default, ``--data`` otherwise) and a seeded batch sampler
   (each rank takes its shard of the same global batch)
3. model: any registered type (``--model gpt|hilt|block|...``), built from size flags or ``--config``
4. optimizer: AdamW, weight decay on matrices only; warmup + cosine LR; GradScaler for fp16
5. resume (``--resume``): weights, optimizer, scheduler, scaler, RNG and sampler states: exact on CPU
6. the loop: gradient accumulation under autocast, clipping, a NaN/inf guard decided the same way on
   every rank, the HILT modulation-scale schedule, periodic eval (loss, bits/byte) and checkpoints
7. the end: final eval and checkpoint, loss-curve PNG, a generated sample, and where everything went

``--model lformer`` with a reasoning head (as by default) adds one hook
(:class:`hilt.reasoning.LFormerTraining`): phase A (base frozen) then phase B (the last K base layers
unfrozen) by step, synthetic reasoning rows appended to every micro-batch (head losses on them, the LM
loss on the corpus rows), and tool accuracy / value MAE / plan exact match at each eval (``phase``,
``tool_acc``, ``value_mae``, ``plan_em`` columns of metrics.csv; the ``loss``
column is then the total of the LM and head losses).

``--batch-size`` is the global batch per micro-step (all ranks together), so a run's numbers do not
depend on the number of processes; one optimizer step sees ``batch_size * grad_accum * max_seq_len`` tokens.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import json
import math
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import (CheckpointError, build_model, get_model_spec, load_checkpoint, model_types,
                         read_state, rng_state, save_checkpoint, set_rng_state, unwrap_model)
from .data import BatchSampler, load_corpus, eval_batches

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train", "evaluate", "lr_at", "ilt_scale_at",
           "WarmupCosine", "configure_optimizer", "enable_grad_checkpointing", "build_parser",
           "config_from_args", "main", "MODEL_FLAGS"]

LN2 = math.log(2.0)


class TrainingError(RuntimeError):
    """Training cannot go on (repeated non-finite losses, bad options); the message says why."""


# ------------------------------------------------------------------------------------------- config

# Model-shape flags: CLI flag -> config field (applied when the chosen model's config has the field).
MODEL_FLAGS = {
    "d_model": int, "n_layers": int, "n_heads": int, "d_ff": int, "max_seq_len": int, "block_size": int,
    "dropout": float, "pos_encoding": str, "ilt_dim": int, "ilt_heads": int, "ilt_layers": int,
    "ilt_dropout": float, "n_local_layers": int, "n_global_layers": int, "n_decoder_layers": int,
    "d_side": int, "tap_every": int,
}

def _has_reasoning_heads(model_cfg) -> bool:
    """Whether an LFormer config has a reasoning head (then ``train`` runs the phases and reasoning data)."""
    return bool(model_cfg.n_tools or model_cfg.value_head or model_cfg.plan_vocab)


# The small default run's model settings, on top of each config's own defaults (where the field exists).
DEFAULT_MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 256, "dropout": 0.0,
                 "ilt_dim": 64}


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
    # --model lformer only: training phases and the synthetic reasoning data (hilt.reasoning)
    phase_a_steps: Optional[int] = None   # base frozen; None: round(phase_a_fraction * max_steps)
    phase_b_steps: Optional[int] = None   # given: max_steps = phase A steps + this
    phase_a_fraction: float = 0.5
    phase_b_unfreeze: str = "1"           # phase B trains the last K base layers ("K") or all ("all")
    reasoning_batch_size: Optional[int] = None  # reasoning rows per micro-batch; None: batch_size // 2
    reasoning_examples: int = 4096        # training pool
    reasoning_eval_examples: int = 256    # held out

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
                raise ValueError(f"{', '.join(_flag(n) for n in given)} applies to --model lformer only")
        for name in ("phase_a_steps", "phase_b_steps", "reasoning_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.fsdp and DTYPES[self.dtype] == torch.float16:
            raise ValueError("--fsdp does not support --dtype float16 (its gradient scaler is per rank); "
                             "use bfloat16 or float32")
        if not 0.0 <= self.phase_a_fraction <= 1.0:
            raise ValueError(f"phase_a_fraction must be in [0, 1], got {self.phase_a_fraction}")


DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def model_config_for(cfg: TrainConfig):
    """The model config object: the type's defaults, then DEFAULT_MODEL (where it applies), then
    ``cfg.model_config`` (every key must be a field of that config)."""
    spec = get_model_spec(cfg.model)
    fields = {f.name for f in dataclasses.fields(spec.config_class)}
    values = {k: v for k, v in DEFAULT_MODEL.items() if k in fields}
    if spec.name == "lformer":  # heads sized for the synthetic reasoning data
        from .reasoning import lformer_head_config

        values.update(lformer_head_config())
    user = {k: v for k, v in cfg.model_config.items() if k != "model_type"}
    wrong = sorted(set(user) - fields)
    if wrong:
        raise ValueError(f"{', '.join('--' + w.replace('_', '-') for w in wrong)} does not apply to --model "
                         f"{spec.name} ({spec.config_class.__name__} has no such field)")
    values.update(user)
    return spec.config_class.from_dict(values)


# --------------------------------------------------------------------------------------- schedules

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


def configure_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2: linear weights, embeddings) only; biases, norms,
    learned vectors get none. Tied weights appear once."""
    decay, no_decay = [], []
    for p in model.parameters():  # unique parameters
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kwargs)


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


# -------------------------------------------------------------------------------------- processes

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str) -> Dist:
    """DDP from the torchrun env vars (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda") or device_arg.startswith("cuda")
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=_dt.timedelta(minutes=30))
    return Dist(rank, local, world, True)


def resolve_device(arg: str, d: Dist) -> torch.device:
    if arg == "auto":
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(arg)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {arg}: CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())
    return dev


def cpu_threads(requested: Optional[int], d: Dist) -> int:
    """CPU threads per process: ``requested``, else the usable cores split between the local
    processes (at least 1). Fixed from the machine, not from its current load, so a run is
    reproducible; on a busy shared machine pass ``--threads 1``."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size if d.enabled else 1))
    return max(1, cores // max(1, local))


def resolve_dtype(arg: str, device: torch.device) -> torch.dtype:
    dt = DTYPES[arg]
    if dt is None:  # auto: bf16 (or fp16) autocast on CUDA, fp32 on CPU (small matmuls are slower in bf16 there)
        if device.type == "cuda":
            dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dt = torch.float32
    return dt


def _all_reduce(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def fsdp_shard(model: nn.Module) -> nn.Module:
    """FSDP2 in place: ``fully_shard`` each block of every ``nn.ModuleList`` in the model (the transformer
    layers of any model type: ``layers``, ``ilts``, local/global/decoder layers, ...), then the root."""
    from torch.distributed.fsdp import fully_shard

    blocks = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst
              if any(True for _ in m.parameters())]
    for m in blocks:
        if not any(m is not b and any(m is x for x in b.modules()) for b in blocks):  # outermost blocks only
            fully_shard(m)
    fully_shard(model)
    return model


def fsdp_full_state(model: nn.Module, optimizer, build, master: bool):
    """Collective (every rank): the full weights and optimizer state of an FSDP2 model, gathered to the
    CPU. Rank 0 gets (a plain model copy from ``build()``, the optimizer state in the single-process
    format, or None without ``optimizer``); the other ranks (None, None)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    if not master:
        return None, None
    plain = build()
    plain.load_state_dict(msd)
    if osd is not None:  # parameter names -> their index in the param groups, as optimizer.state_dict() has it
        index: dict[str, int] = {}
        groups = [dict(g, params=[index.setdefault(n, len(index)) for n in g["params"]]) for g in osd["param_groups"]]
        osd = {"state": {index[n]: s for n, s in osd["state"].items()}, "param_groups": groups}
    return plain, osd


def fsdp_set_optimizer_state(model: nn.Module, optimizer, plain_state: dict) -> None:
    """Load a single-process optimizer state dict (parameter indices) into the optimizer of an FSDP2
    model (parameter names), sharding it like the parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for g in optimizer.param_groups for p in g["params"]]
    osd = {"state": {order[i]: s for i, s in plain_state["state"].items()},
           "param_groups": [dict(g, params=[order[i] for i in g["params"]]) for g in plain_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


# -------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, data: np.ndarray, batch_size: int, seq_len: int, iters: Optional[int], *,
             device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0, d: Dist = Dist(),
             progress: bool = False) -> tuple[float, float]:
    """(mean token loss, bits per byte) on ``data``: ``iters`` fixed random batches (the same every
    call), or the whole split in non-overlapping windows when ``iters`` is None. Ranks split the work."""
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
    _all_reduce(total, d)
    model.train(was_training)
    loss = (total[0] / total[1].clamp_min(1)).item()
    return loss, loss / LN2


# ---------------------------------------------------------------------------------------- the run

@dataclass
class TrainResult:
    out_dir: Optional[Path]
    history: list = field(default_factory=list)   # one dict per step (the CSV rows)
    val_loss: Optional[float] = None
    val_bpb: Optional[float] = None
    step: int = 0
    skipped_steps: int = 0
    model: Optional[nn.Module] = None
    paths: dict = field(default_factory=dict)
    seconds: float = 0.0


CSV_FIELDS = ["step", "lr", "loss", "val_loss", "val_bpb", "tokens_per_s", "ilt_scale", "grad_norm", "skipped",
              "phase", "tool_acc", "value_mae", "plan_em"]  # the last four: --model lformer only


def _new_run_dir(cfg: TrainConfig, d: Dist) -> Path:
    if cfg.out is not None:
        out = Path(cfg.out)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = [f"{get_model_spec(cfg.model).name}-{stamp}"]
        if d.enabled:
            dist.broadcast_object_list(name, src=0)
        out = Path("runs") / name[0]
        if d.master:
            n = 2
            while out.exists():
                out = Path("runs") / f"{name[0]}-{n}"
                n += 1
        if d.enabled:
            box = [str(out)]
            dist.broadcast_object_list(box, src=0)
            out = Path(box[0])
    return out


def _prepare_csv(path: Path, start_step: int) -> None:
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


def _plot(csv_path: Path, png_path: Path, title: str) -> None:
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


def _sample_prompt(val: np.ndarray, n: int = 64) -> list[int]:
    """A prompt from the val text: the ``n`` bytes starting at its first top-level ``def``/``class``."""
    head = bytes(np.asarray(val[: min(len(val), 200_000)]))
    for marker in (b"\ndef ", b"\nclass ", b"\n"):
        i = head.find(marker)
        if i >= 0 and i + 1 + n <= len(head):
            return list(head[i + 1:i + 1 + n])
    return list(head[:n])


def train(cfg: TrainConfig, *, resume: Optional[str] = None, stop_at_step: Optional[int] = None,
          explicit: Optional[set] = None, log=print) -> TrainResult:
    """Run (or resume) a training run. ``stop_at_step``: stop after that many steps as if interrupted
    (the schedules still run to ``max_steps``; resume it later). ``explicit``: the options given on the
    command line, which override a resumed checkpoint's saved options."""
    t_start = time.perf_counter()

    # -- 1. processes and device --------------------------------------------------------------------
    d = setup_distributed(cfg.device)
    state = None
    if resume is not None:
        state = read_state(resume)
        saved = state.get("train_config")
        if not saved:
            raise CheckpointError(f"{Path(resume) / 'state.json'}: no training config; it cannot be resumed")
        given = explicit if explicit is not None else set()
        if given & {"model", "model_config"}:
            raise TrainingError("--resume: the model comes from the checkpoint; drop --model, --config's model "
                                "settings and the size flags")
        merged = dict(saved)
        # FSDP or not is a choice of this launch: the checkpoint is the same either way
        merged.update({k: v for k, v in asdict(cfg).items() if k in given or k == "fsdp"})
        if "out" not in given:
            merged["out"] = str(Path(resume).resolve().parent)
        cfg = TrainConfig.from_dict(merged)
    cfg.validate()
    if cfg.fsdp and not d.enabled:
        raise TrainingError("--fsdp shards the model between processes: launch with torchrun "
                            "--nproc_per_node=N (N >= 2), or drop --fsdp for one process")
    if get_model_spec(cfg.model).name == "lformer":
        from .reasoning import resolve_phases

        cfg = resolve_phases(cfg)  # --phase-b-steps sets max_steps
    device = resolve_device(cfg.device, d)
    dtype = resolve_dtype(cfg.dtype, device)
    log = log if d.master else (lambda *a, **k: None)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads, d))

    # -- 2. data ------------------------------------------------------------------------------------
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if d.enabled and not d.master:
        dist.barrier()  # rank 0 builds the token cache first
    corpus = load_corpus(cfg.data, use_cache=cfg.use_cache, cache=cfg.cache_dir)
    if d.enabled and d.master:
        dist.barrier()

    # -- 3. model -----------------------------------------------------------------------------------
    spec = get_model_spec(state["model_type"] if state else cfg.model)
    if state:
        model_cfg = spec.config_class.from_dict(dict(state["config"], model_type=spec.config_class.model_type))
    else:
        model_cfg = model_config_for(cfg)
    kwargs = {"backend": cfg.backend} if cfg.backend else {}
    raw = build_model(spec.name, model_cfg, **kwargs).to(device)
    seq_len = model_cfg.max_seq_len
    if getattr(model_cfg, "vocab_size", 256) < 256:
        raise TrainingError(f"byte-level data needs vocab_size >= 256, got {model_cfg.vocab_size}")
    if cfg.grad_checkpoint:
        enable_grad_checkpointing(raw)
    has_ilt_scale = hasattr(raw, "set_ilt_scale") and getattr(raw, "ilts", None) is not None
    sampler = BatchSampler(corpus.train, cfg.batch_size, seq_len, seed=cfg.seed, rank=d.rank,
                           world_size=d.world_size, device=device)
    lformer = None  # the L-Former hook: phases, reasoning rows mixed into each batch, head metrics
    if spec.name == "lformer" and _has_reasoning_heads(model_cfg):  # without reasoning heads: a plain LM run
        from .reasoning import LFormerTraining

        lformer = LFormerTraining(cfg, raw, seq_len, device, rank=d.rank, world_size=d.world_size,
                                  log=log if d.master else (lambda *a, **k: None))

    # -- 4. optimizer, schedule, grad scaler --------------------------------------------------------
    min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10
    optimizer = configure_optimizer(raw, cfg, device)
    schedule = WarmupCosine(optimizer, cfg.lr, min_lr, cfg.warmup, cfg.max_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # -- 5. resume ----------------------------------------------------------------------------------
    start_step, skipped_total = 0, 0
    torch.manual_seed(cfg.seed + d.rank)  # dropout differs between ranks
    if state:
        state = load_checkpoint(resume, raw, optimizer=optimizer, scheduler=schedule, scaler=scaler,
                                map_location=device, restore_rng=True)
        ranks = state.get("rng_ranks")
        if ranks and len(ranks) == d.world_size:
            set_rng_state(ranks[d.rank])
        if state.get("sampler"):
            sampler.load_state_dict(state["sampler"])
        start_step = int(state["step"])
        skipped_total = int(state.get("metrics", {}).get("skipped_steps", 0))
    if cfg.fsdp:  # shard the (resumed) model, then a new optimizer over the shards, with the resumed state
        plain_opt_state = optimizer.state_dict() if state else None
        fsdp_shard(raw)
        optimizer = configure_optimizer(raw, cfg, device)
        schedule.optimizer = optimizer
        if plain_opt_state is not None:
            fsdp_set_optimizer_state(raw, optimizer, plain_opt_state)

    model: nn.Module = raw
    if cfg.compile:
        model = torch.compile(model)
    if d.enabled and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=spec.find_unused_parameters)
    eval_model = unwrap_model(model) if not cfg.compile else model.module if d.enabled and not cfg.fsdp else model

    def build_plain() -> nn.Module:  # FSDP: rank 0's unsharded copy for checkpoints and the sample
        return build_model(spec.name, model_cfg, **kwargs).to(device)

    # -- output folder and logs ---------------------------------------------------------------------
    out = _new_run_dir(cfg, d)
    paths = {"run": out, "checkpoint": out / "checkpoint", "csv": out / "metrics.csv", "plot": out / "loss.png",
             "sample": out / "sample.txt", "config": out / "train_config.json", "corpus": out / "corpus.json"}
    writer = None
    if d.master:
        out.mkdir(parents=True, exist_ok=True)
        paths["config"].write_text(json.dumps(dict(cfg.to_dict(), model_config=model_cfg.to_dict()), indent=2) + "\n")
        paths["corpus"].write_text(json.dumps(corpus.info, indent=2, default=str) + "\n")
        _prepare_csv(paths["csv"], start_step)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(out / "tb"))
                paths["tensorboard"] = out / "tb"
            except Exception:  # noqa: BLE001 - tensorboard is optional
                writer = None
    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len
    log(f"hilt train: {spec.name} ({raw.num_parameters() if hasattr(raw, 'num_parameters') else sum(p.numel() for p in raw.parameters()):,} parameters), "
        f"device {device}" + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
        + f", autocast {str(dtype).replace('torch.', '')}, {d.world_size} process(es)")
    log(f"corpus: {corpus.describe()}")
    log(f"steps {start_step} -> {cfg.max_steps}, {tokens_per_step:,} tokens/step "
        f"(batch {cfg.batch_size} x accum {cfg.grad_accum} x seq {seq_len}), lr {cfg.lr:g} -> {min_lr:g}, "
        f"warmup {cfg.warmup}" + (f", resumed from {resume}" if resume else ""))

    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    pbar = None
    if d.master and cfg.progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def save(step_done: int, metrics: dict) -> None:
        rng_ranks = None
        if d.enabled:
            rng_ranks = [None] * d.world_size
            dist.all_gather_object(rng_ranks, rng_state())
        ckpt_model, ckpt_opt = raw, optimizer
        if cfg.fsdp:  # every rank gathers; rank 0 writes the same format as one process
            ckpt_model, opt_state = fsdp_full_state(raw, optimizer, lambda: build_model(spec.name, model_cfg),
                                                    d.master)
            ckpt_opt = SimpleNamespace(state_dict=lambda: opt_state)
        if d.master:
            save_checkpoint(paths["checkpoint"], ckpt_model, optimizer=ckpt_opt, scheduler=schedule, scaler=scaler,
                            step=step_done, sampler_state=sampler.state_dict(), train_config=cfg.to_dict(),
                            metrics=dict(metrics, skipped_steps=skipped_total),
                            extra={"rng_ranks": rng_ranks} if rng_ranks else None)
        if d.enabled:
            dist.barrier()

    def run_eval() -> tuple[float, float]:
        return evaluate(eval_model, corpus.val, cfg.batch_size, seq_len, cfg.eval_iters, device=device,
                        dtype=dtype, seed=cfg.seed + 1, d=d)

    # -- 6. the loop --------------------------------------------------------------------------------
    history: list[dict] = []
    consecutive_bad = 0
    val_loss = val_bpb = None
    last_step = min(cfg.max_steps, stop_at_step) if stop_at_step is not None else cfg.max_steps
    step = start_step
    model.train()
    try:
        for step in range(start_step, last_step):
            t0 = time.perf_counter()
            lr = schedule.set(step)
            ilt_scale = None
            if has_ilt_scale:
                ilt_scale = ilt_scale_at(step, cfg.ilt_scale_start, cfg.ilt_scale_end, cfg.max_steps)
                raw.set_ilt_scale(ilt_scale)
            phase = lformer.set_phase(raw, step) if lformer is not None else None

            # forward/backward over the micro-batches; DDP syncs gradients on the last one only
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                ids, targets = sampler.next_batch()
                extra = {}
                if lformer is not None:  # + reasoning rows and their head labels
                    ids, targets, extra = lformer.mix(ids, targets, step, micro)
                sync = not d.enabled or micro == cfg.grad_accum - 1
                if cfg.fsdp:
                    raw.set_requires_gradient_sync(sync)
                with (nullcontext() if sync or cfg.fsdp else model.no_sync()):
                    with autocast:
                        loss = model(ids, targets, **extra).loss / cfg.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach().float()

            # NaN/inf guard: every rank sees the same all-reduced numbers, so every rank decides the same
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            else:
                grads = [p.grad.detach().norm() for p in raw.parameters() if p.grad is not None]
                grad_norm = torch.stack(grads).norm() if grads else torch.zeros((), device=device)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                grad_norm = grad_norm.full_tensor()
            stats = torch.stack([torch.nan_to_num(loss_sum, nan=0.0, posinf=0.0, neginf=0.0),
                                 (~torch.isfinite(loss_sum)).float(),
                                 (~torch.isfinite(grad_norm.float())).float()]).double()
            _all_reduce(stats, d)
            bad = stats[1].item() > 0 or (stats[2].item() > 0 and not scaler.is_enabled())
            if bad:
                optimizer.zero_grad(set_to_none=True)
                if scaler.is_enabled():
                    scaler.update()  # the unscale above recorded the inf: the scale goes down
                skipped_total += 1
                consecutive_bad += 1
                loss_value = float("nan")
                if consecutive_bad >= cfg.max_bad_steps:
                    raise TrainingError(
                        f"stopping at step {step + 1}: {consecutive_bad} consecutive steps had a non-finite "
                        f"loss or gradient (NaN/inf), {skipped_total} skipped in all. Lower --lr, use "
                        f"--dtype bfloat16 or float32, raise --warmup, or check the data; resume from the last "
                        f"checkpoint with --resume {paths['checkpoint']}")
                log_msg = f"step {step + 1}: non-finite loss or gradient, step skipped ({consecutive_bad} in a row)"
                if pbar is not None:
                    pbar.write(log_msg)
                else:
                    log(log_msg)
            else:
                consecutive_bad = 0
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                loss_value = stats[0].item() / d.world_size
            dt = time.perf_counter() - t0
            tok_s = tokens_per_step / dt if dt > 0 else float("nan")

            # eval and checkpoints
            step_done = step + 1
            row = {"step": step_done, "lr": lr, "loss": loss_value, "val_loss": "", "val_bpb": "",
                   "tokens_per_s": tok_s, "ilt_scale": ilt_scale if ilt_scale is not None else "",
                   "grad_norm": grad_norm.item(), "skipped": int(bad), "phase": phase or "", "tool_acc": "",
                   "value_mae": "", "plan_em": ""}
            is_last = step_done == cfg.max_steps
            if (cfg.eval_every and step_done % cfg.eval_every == 0) or is_last:
                val_loss, val_bpb = run_eval()
                row["val_loss"], row["val_bpb"] = val_loss, val_bpb
                heads = ""
                if lformer is not None:
                    row.update(lformer.evaluate(eval_model))
                    heads = (f", tool acc {row['tool_acc']:.3f}, value MAE {row['value_mae']:.3f}, "
                             f"plan exact {row['plan_em']:.3f} (phase {phase})")
                if pbar is not None:
                    pbar.write(f"step {step_done}: train loss {loss_value:.4f}, val loss {val_loss:.4f}, "
                               f"val bits/byte {val_bpb:.4f}{heads}")
                elif heads:
                    log(f"step {step_done}: val bits/byte {val_bpb:.4f}{heads}")
            history.append(row)
            if d.master:
                with open(paths["csv"], "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow(row)
                if writer is not None:
                    writer.add_scalar("train/loss", loss_value, step_done)
                    writer.add_scalar("train/lr", lr, step_done)
                    writer.add_scalar("train/tokens_per_s", tok_s, step_done)
                    if ilt_scale is not None:
                        writer.add_scalar("train/ilt_scale", ilt_scale, step_done)
                    if row["val_loss"] != "":
                        writer.add_scalar("val/loss", val_loss, step_done)
                        writer.add_scalar("val/bits_per_byte", val_bpb, step_done)
                    for k in ("tool_acc", "value_mae", "plan_em"):
                        if row[k] != "":
                            writer.add_scalar(f"val/{k}", row[k], step_done)
            if (cfg.ckpt_every and step_done % cfg.ckpt_every == 0) or is_last or step_done == last_step:
                save(step_done, {"val_loss": val_loss, "val_bpb": val_bpb, "train_loss": loss_value})
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss_value:.3f}", bpb=f"{loss_value / LN2:.3f}", tok_s=f"{tok_s:,.0f}")
        step_done = max(start_step, last_step)

        # -- 7. the end: plot, sample, where everything went ------------------------------------
        if pbar is not None:
            pbar.close()
            pbar = None
        result = TrainResult(out, history, val_loss, val_bpb, step_done, skipped_total, raw, paths,
                             time.perf_counter() - t_start)
        sample_model = raw
        if cfg.fsdp and step_done == cfg.max_steps and cfg.sample_tokens > 0:  # every rank gathers
            sample_model = fsdp_full_state(raw, None, build_plain, d.master)[0]
        if d.master and step_done == cfg.max_steps:
            if cfg.plot:
                try:
                    _plot(paths["csv"], paths["plot"], f"{spec.name} on {Path(cfg.data).name if cfg.data else 'stdlib'}")
                except Exception as e:  # noqa: BLE001 - a plot is never worth failing a run
                    warnings.warn(f"hilt: could not draw the loss plot: {e}")
                    paths.pop("plot")
            else:
                paths.pop("plot")
            if cfg.sample_tokens > 0:
                from .data import decode
                from .generate import generate

                prompt = _sample_prompt(corpus.val, min(64, raw.config.max_seq_len))
                ids = generate(sample_model, prompt, cfg.sample_tokens, temperature=cfg.sample_temperature,
                               top_p=cfg.sample_top_p, seed=cfg.seed)
                text = decode(ids[len(prompt):].tolist())
                paths["sample"].write_text(f"--- prompt ({len(prompt)} bytes of the val text) ---\n"
                                           f"{decode(prompt)}\n--- continuation ({cfg.sample_tokens} bytes, "
                                           f"temperature {cfg.sample_temperature}, top-p {cfg.sample_top_p}) ---\n"
                                           f"{text}\n")
                log("sample:\n" + decode(prompt) + "\u2502" + text)
            else:
                paths.pop("sample")
        else:
            for k in ("plot", "sample"):
                paths.pop(k, None)
        if d.master:
            if val_bpb is not None:
                log(f"final: step {step_done}, val loss {val_loss:.4f}, val bits/byte {val_bpb:.4f}"
                    + (f", {skipped_total} step(s) skipped" if skipped_total else ""))
            log(f"wrote {out}/ in {result.seconds:.0f} s:")
            for key, p in paths.items():
                if key != "run" and Path(p).exists():
                    log(f"  {key:<12} {p}")
            if "tensorboard" not in paths and cfg.tensorboard:
                log("  (TensorBoard logs: not written, tensorboard is not installed)")
        return result
    finally:
        if pbar is not None:
            pbar.close()
        if writer is not None:
            writer.close()


# ------------------------------------------------------------------------------------------- CLI

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(prog: str = "hilt train") -> argparse.ArgumentParser:
    """The ``hilt train`` parser. Every option defaults to None (unset) so explicit ones can be told apart."""
    D = TrainConfig()
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a byte-level language model. With no arguments: a small HILT (d_model 128, 4 layers, "
                    f"4 heads, context 256, batch 16) for {D.max_steps} steps on the Python standard library "
                    "(CUDA when available), written to runs/<model>-<YYYYmmdd-HHMMSS>/: metrics.csv, checkpoint/, "
                    "loss.png, sample.txt.",
        epilog="Several processes: torchrun --nproc_per_node=N -m hilt.train [options] (DDP; gloo on CPU, nccl "
               "on GPU). --batch-size is the global batch, split between the processes.")
    g = p.add_argument_group("run")
    g.add_argument("--model", choices=model_types(), help=f"model type (default: {D.model})")
    g.add_argument("--config", metavar="FILE.json",
                   help="options from a JSON file: training options (TrainConfig names, with an optional "
                        "'model_config' object), or a model config (e.g. a checkpoint's config.json, with "
                        "'model_type'). Flags given on the command line win.")
    g.add_argument("--data", metavar="FILE|DIR", help="your own text: a file, or a folder of text files "
                                                      "(default: the Python standard library's .py files)")
    g.add_argument("--out", metavar="DIR", help="run folder (default: runs/<model>-<YYYYmmdd-HHMMSS>; with "
                                                "--resume: the checkpoint's run folder)")
    g.add_argument("--resume", metavar="PATH", help="resume from a checkpoint folder (weights, optimizer, "
                                                    "schedule, RNG and data position); exact on CPU")
    g.add_argument("--device", help="auto|cpu|cuda|cuda:N (default: auto = cuda when available)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype (default: auto = bfloat16 on CUDA, else float16 there; float32 on CPU). "
                        "float16 uses a gradient scaler")
    g.add_argument("--backend", choices=["reference", "triton", "cuda"], help="op backend for every layer "
                                                                             "(default: automatic)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads per process (default: the usable cores divided by the local processes)")
    g.add_argument("--seed", type=int, metavar="N", help=f"seed for initialisation, data order and dropout (default: {D.seed})")
    g.add_argument("--max-steps", type=int, metavar="N", help=f"optimizer steps (default: {D.max_steps}); small for a smoke run")
    g.add_argument("--stop-at-step", type=int, metavar="N",
                   help="stop after step N as if interrupted (the schedules still aim at --max-steps); "
                        "continue with --resume")
    g.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    g.add_argument("--fsdp", action="store_const", const=True,
                   help="under torchrun: shard parameters, gradients and optimizer state between the "
                        "processes (FSDP2) instead of replicating them (DDP); for large models")
    g.add_argument("--grad-checkpoint", action="store_const", const=True,
                   help="activation checkpointing: recompute each layer in the backward (less memory, slower)")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="no progress bar")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const=False,
                   help="no TensorBoard logs (written only when tensorboard is installed)")
    g.add_argument("--no-plot", dest="plot", action="store_const", const=False, help="no loss-curve PNG")
    g.add_argument("--no-cache", dest="use_cache", action="store_const", const=False,
                   help="do not read or write the token cache ($HILT_CACHE_DIR, default ~/.cache/hilt)")
    g.add_argument("--cache-dir", metavar="DIR", help="token cache folder (default: $HILT_CACHE_DIR or ~/.cache/hilt)")

    o = p.add_argument_group("optimization")
    o.add_argument("--batch-size", type=int, help=f"global sequences per micro-step (default: {D.batch_size})")
    o.add_argument("--grad-accum", type=int, help=f"micro-steps per optimizer step (default: {D.grad_accum})")
    o.add_argument("--lr", type=float, help=f"peak learning rate (default: {D.lr:g})")
    o.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay (default: lr / 10)")
    o.add_argument("--warmup", type=int, help=f"linear warmup steps (default: {D.warmup})")
    o.add_argument("--weight-decay", type=float, help=f"AdamW weight decay on matrices (default: {D.weight_decay:g})")
    o.add_argument("--beta1", type=float, help=f"AdamW beta1 (default: {D.beta1:g})")
    o.add_argument("--beta2", type=float, help=f"AdamW beta2 (default: {D.beta2:g})")
    o.add_argument("--grad-clip", type=float, help=f"clip the gradient norm to this; 0: off (default: {D.grad_clip:g})")
    o.add_argument("--max-bad-steps", type=int,
                   help=f"stop after this many consecutive non-finite steps (default: {D.max_bad_steps})")
    o.add_argument("--ilt-scale-start", type=float,
                   help=f"HILT modulation scale at the first step (default: {D.ilt_scale_start:g})")
    o.add_argument("--ilt-scale-end", type=float,
                   help=f"HILT modulation scale at the last step, linear in between (default: {D.ilt_scale_end:g})")

    e = p.add_argument_group("eval, checkpoints, sample")
    e.add_argument("--eval-every", type=int, help=f"validate every N steps and at the end; 0: only at the end "
                                                  f"(default: {D.eval_every})")
    e.add_argument("--eval-iters", type=int, help=f"validation batches (fixed windows) per eval (default: {D.eval_iters})")
    e.add_argument("--ckpt-every", type=int, help=f"checkpoint every N steps and at the end; 0: only at the end "
                                                  f"(default: {D.ckpt_every})")
    e.add_argument("--sample-tokens", type=int, help=f"bytes to generate after training; 0: none (default: {D.sample_tokens})")
    e.add_argument("--sample-temperature", type=float, help=f"sampling temperature (default: {D.sample_temperature:g})")
    e.add_argument("--sample-top-p", type=float, help=f"nucleus sampling threshold (default: {D.sample_top_p:g})")

    lf = p.add_argument_group("L-Former phases and reasoning data (--model lformer; see hilt.reasoning)")
    lf.add_argument("--phase-a-steps", type=int, metavar="N",
                    help="phase A (base frozen, side path and heads train) steps (default: --phase-a-fraction "
                         "of --max-steps)")
    lf.add_argument("--phase-b-steps", type=int, metavar="N",
                    help="phase B steps; sets --max-steps to phase A + N (default: the rest of --max-steps)")
    lf.add_argument("--phase-a-fraction", type=float, metavar="X",
                    help=f"phase A share of --max-steps when --phase-a-steps is not given (default: {D.phase_a_fraction:g})")
    lf.add_argument("--phase-b-unfreeze", metavar="K|all",
                    help=f"phase B trains the last K base layers, or all of the base (default: {D.phase_b_unfreeze})")
    lf.add_argument("--reasoning-batch-size", type=int, metavar="N",
                    help="synthetic reasoning rows appended to each micro-batch (default: batch size // 2)")
    lf.add_argument("--reasoning-examples", type=int, metavar="N",
                    help=f"size of the synthetic training pool (default: {D.reasoning_examples})")
    lf.add_argument("--reasoning-eval-examples", type=int, metavar="N",
                    help=f"held-out reasoning examples per eval (default: {D.reasoning_eval_examples})")

    m = p.add_argument_group("model size (each applies to the model types whose config has that field)")
    helps = {
        "d_model": "width (default: 128)", "n_layers": "layers (gpt, hilt; default: 4)",
        "n_heads": "attention heads (default: 4)", "d_ff": "MLP width (default: 4 * d_model)",
        "max_seq_len": "context length in bytes, also the training window (default: 256)",
        "block_size": "local attention / pooling block (block; default: 8)",
        "dropout": "dropout (default: 0.0 for training runs)",
        "pos_encoding": "positional encoding: sinusoidal|learned|rope (default: learned)",
        "ilt_dim": "ILT width (hilt; default: 64 here)", "ilt_heads": "ILT heads (hilt; default: 2)",
        "ilt_layers": "layers per ILT; 0 = plain GPT (hilt; default: 2)", "ilt_dropout": "ILT dropout (hilt; default: 0.1)",
        "n_local_layers": "block-local layers (block; default: 2)",
        "n_global_layers": "global layers over blocks (block; default: 2)",
        "n_decoder_layers": "block-local decoder layers (block; default: 2)",
        "d_side": "side-path width (lformer)", "tap_every": "tap every N layers (lformer)",
    }
    for name, typ in MODEL_FLAGS.items():
        m.add_argument(_flag(name), type=typ, dest=f"m_{name}", help=helps[name],
                       metavar={int: "N", float: "X", str: "NAME"}[typ])
    return p


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, set]:
    """(TrainConfig, names of the options set explicitly) from parsed ``hilt train`` arguments."""
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise TrainingError(f"--config {path}: cannot read it ({e.strerror})") from None
        except ValueError as e:
            raise TrainingError(f"--config {path}: not valid JSON ({e})") from None
        if not isinstance(blob, dict):
            raise TrainingError(f"--config {path}: expected a JSON object")
        if "model_type" in blob:  # a model config
            values["model"] = get_model_spec(blob["model_type"]).name
            values["model_config"] = {k: v for k, v in blob.items() if k != "model_type"}
        else:
            values.update(blob)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    model_cfg = dict(values.get("model_config") or {})
    for name in MODEL_FLAGS:
        v = getattr(args, f"m_{name}", None)
        if v is not None:
            model_cfg[name] = v
    if model_cfg:
        values["model_config"] = model_cfg
    explicit = set(values)
    try:
        cfg = TrainConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise TrainingError(f"--config {args.config}: {e}" if args.config else str(e)) from None
    return cfg, explicit


def run_cli(run, prog: str) -> int:
    """Run a command's body: a known error becomes one line on stderr and exit code 1, and the process
    group (torchrun) is torn down either way."""
    try:
        run()
    except (TrainingError, CheckpointError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: Optional[list[str]] = None, prog: str = "hilt train") -> int:
    args = build_parser(prog).parse_args(argv)

    def run():
        cfg, explicit = config_from_args(args)
        if args.resume is None:
            cfg.validate()
            model_config_for(cfg)  # fail early on a flag that does not apply
        train(cfg, resume=args.resume, stop_at_step=args.stop_at_step, explicit=explicit)

    return run_cli(run, prog)


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m hilt.train"))
