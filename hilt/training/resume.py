"""A run's checkpoints: saving the whole training state (weights, optimizer, schedule, scaler, every rank's
RNG, the data position; FSDP2 shards gathered to rank 0 first) and resuming from it exactly. The folder
format itself is :mod:`hilt.training.checkpoint`."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch.distributed as dist
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig, TrainingError
from .distributed import Dist, fsdp_full_state, fsdp_set_optimizer_state, fsdp_shard
from .schedule import configure_optimizer

__all__ = ["resume_config", "restore", "shard_for_fsdp", "save_run"]


def resume_config(cfg: TrainConfig, state: dict, resume: str, explicit: Optional[set]) -> TrainConfig:
    """The options of a resumed run: the checkpoint's saved ones, overridden by those given on the command
    line (``explicit``); ``--fsdp`` is always this launch's; the run folder stays the checkpoint's."""
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
    return TrainConfig.from_dict(merged)


def restore(resume: str, raw: nn.Module, optimizer, schedule, scaler, sampler, device, d: Dist) -> tuple[int, int]:
    """Load a checkpoint into the run's objects (this rank's RNG too, when it was saved by as many ranks).
    Returns (the step to continue from, the steps skipped so far)."""
    state = load_checkpoint(resume, raw, optimizer=optimizer, scheduler=schedule, scaler=scaler,
                            map_location=device, restore_rng=True)
    ranks = state.get("rng_ranks")
    if ranks and len(ranks) == d.world_size:
        set_rng_state(ranks[d.rank])
    if state.get("sampler"):
        sampler.load_state_dict(state["sampler"])
    return int(state["step"]), int(state.get("metrics", {}).get("skipped_steps", 0))


def shard_for_fsdp(raw: nn.Module, optimizer, schedule, cfg: TrainConfig, device, resumed: bool):
    """FSDP2: shard the (resumed) model in place, then a new optimizer over the shards, carrying over the
    resumed optimizer state. Returns the new optimizer (``schedule`` drives it from now on)."""
    plain_opt_state = optimizer.state_dict() if resumed else None
    fsdp_shard(raw)
    optimizer = configure_optimizer(raw, cfg, device)
    schedule.optimizer = optimizer
    if plain_opt_state is not None:
        fsdp_set_optimizer_state(raw, optimizer, plain_opt_state)
    return optimizer


def save_run(path: Path, raw: nn.Module, optimizer, schedule, scaler, sampler, cfg: TrainConfig, d: Dist, *,
             step: int, metrics: dict, build_plain: Callable[[], nn.Module]) -> None:
    """Collective (every rank): the run's checkpoint at ``path``, written by rank 0 in the one-process
    format. ``build_plain``: an unsharded model to gather FSDP2 shards into."""
    rng_ranks = None
    if d.enabled:
        rng_ranks = [None] * d.world_size
        dist.all_gather_object(rng_ranks, rng_state())
    ckpt_model, ckpt_opt = raw, optimizer
    if cfg.fsdp:  # every rank gathers; rank 0 writes the same format as one process
        ckpt_model, opt_state = fsdp_full_state(raw, optimizer, build_plain, d.master)
        ckpt_opt = SimpleNamespace(state_dict=lambda: opt_state)
    if d.master:
        save_checkpoint(path, ckpt_model, optimizer=ckpt_opt, scheduler=schedule, scaler=scaler, step=step,
                        sampler_state=sampler.state_dict(), train_config=cfg.to_dict(), metrics=metrics,
                        extra={"rng_ranks": rng_ranks} if rng_ranks else None)
    if d.enabled:
        dist.barrier()
