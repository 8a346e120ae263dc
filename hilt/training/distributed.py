"""Processes and devices: DDP from the torchrun env vars, the device / dtype / thread choice, DDP or FSDP2
wrapping, and the FSDP2 full-state gather (checkpoints in the one-process format)."""
from __future__ import annotations

import datetime as _dt
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .config import DTYPES, TrainingError

__all__ = ["Dist", "setup_distributed", "resolve_device", "resolve_dtype", "cpu_threads", "all_reduce",
           "rank0_first", "wrap_model", "fsdp_shard", "fsdp_full_state", "fsdp_set_optimizer_state"]


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


def all_reduce(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum ``t`` over the ranks in place (a no-op for one process); returns ``t``."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@contextmanager
def rank0_first(d: Dist):
    """The body runs on rank 0 first, then on the others (e.g. rank 0 builds the token cache)."""
    if d.enabled and not d.master:
        dist.barrier()
    yield
    if d.enabled and d.master:
        dist.barrier()


def wrap_model(raw: nn.Module, *, compile: bool, ddp: bool, device: torch.device,
               find_unused_parameters: bool = False) -> tuple[nn.Module, nn.Module]:
    """(the module to train, the module to evaluate): ``torch.compile`` and/or DDP around ``raw``
    (FSDP2 shards ``raw`` in place, see :func:`fsdp_shard`, so it needs no wrapper here)."""
    model = torch.compile(raw) if compile else raw
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=find_unused_parameters)
    eval_model = model.module if ddp else model  # without DDP's forward hooks (no gradient sync)
    return model, (eval_model if compile else raw)


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
