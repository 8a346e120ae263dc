"""``train()``: one readable loop, top to bottom (nanoGPT style): set-up, the loop, the end.

Each concern is one call into its own module: processes and devices (:mod:`.distributed`), options
(:mod:`.config`), data (:mod:`.data`), the model (:mod:`.model`), optimizer and schedules (:mod:`.schedule`),
resume and the run's checkpoints (:mod:`.resume`), one optimisation step with its NaN/inf guard
(:mod:`.step`), evaluation (:mod:`.evaluate`), the run folder and logs (:mod:`.logging`), and, for
``--model lformer`` with a reasoning head, the L-Former hook (:mod:`.lformer`): phase A (base frozen) then
phase B (the last K base layers unfrozen), synthetic reasoning rows appended to every micro-batch, and head
metrics at each eval (``phase``, ``tool_acc``, ``value_mae``, ``plan_em`` columns of metrics.csv; the
``loss`` column is then the total of the LM and head losses).

``--batch-size`` is the global batch per micro-step (all ranks together), so a run's numbers do not
depend on the number of processes; one optimizer step sees ``batch_size * grad_accum * max_seq_len`` tokens.
"""
from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from hilt.models.registry import build_model, get_model_spec

from .checkpoint import read_state
from .config import TrainConfig, TrainingError, has_reasoning_heads
from .data import BatchSampler, load_corpus
from .distributed import (cpu_threads, fsdp_full_state, rank0_first, resolve_device, resolve_dtype,
                          setup_distributed, wrap_model)
from .evaluate import evaluate
from .lformer import LFormerTraining, resolve_phases
from .logging import RunLog, new_run_dir
from .model import backend_kwargs, build_for_training
from .resume import restore, resume_config, save_run, shard_for_fsdp
from .schedule import WarmupCosine, configure_optimizer, ilt_scale_at
from .step import NonFiniteGuard, train_step

__all__ = ["TrainResult", "train"]


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


def train(cfg: TrainConfig, *, resume: Optional[str] = None, stop_at_step: Optional[int] = None,
          explicit: Optional[set] = None, log=print) -> TrainResult:
    """Run (or resume) a training run. ``stop_at_step``: stop after that many steps as if interrupted
    (the schedules still run to ``max_steps``; resume it later). ``explicit``: the options given on the
    command line, which override a resumed checkpoint's saved options."""
    t_start = time.perf_counter()

    # -- set-up: processes, options, device -----------------------------------------------------------
    d = setup_distributed(cfg.device)
    state = read_state(resume) if resume is not None else None
    if state is not None:
        cfg = resume_config(cfg, state, resume, explicit)
    cfg.validate()
    if cfg.fsdp and not d.enabled:
        raise TrainingError("--fsdp shards the model between processes: launch with torchrun "
                            "--nproc_per_node=N (N >= 2), or drop --fsdp for one process")
    if get_model_spec(cfg.model).name == "lformer":
        cfg = resolve_phases(cfg)  # --phase-b-steps sets max_steps
    device, log = resolve_device(cfg.device, d), (log if d.master else (lambda *a, **k: None))
    dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads, d))

    # data, model, the L-Former hook (phases, reasoning rows mixed into each batch, head metrics)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with rank0_first(d):  # rank 0 builds the token cache
        corpus = load_corpus(cfg.data, use_cache=cfg.use_cache, cache=cfg.cache_dir)
    spec, model_cfg, raw = build_for_training(cfg, state, device)
    seq_len = model_cfg.max_seq_len
    sampler = BatchSampler(corpus.train, cfg.batch_size, seq_len, seed=cfg.seed, rank=d.rank,
                           world_size=d.world_size, device=device)
    lformer = None  # without reasoning heads an L-Former trains as a plain LM
    if spec.name == "lformer" and has_reasoning_heads(model_cfg):
        lformer = LFormerTraining(cfg, raw, seq_len, device, rank=d.rank, world_size=d.world_size, log=log)

    # optimizer, schedule, grad scaler; resume; FSDP2 / DDP / compile
    optimizer = configure_optimizer(raw, cfg, device)
    schedule = WarmupCosine(optimizer, cfg.lr, cfg.final_lr, cfg.warmup, cfg.max_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_step, skipped = 0, 0
    torch.manual_seed(cfg.seed + d.rank)  # dropout differs between ranks
    if state is not None:
        start_step, skipped = restore(resume, raw, optimizer, schedule, scaler, sampler, device, d)
    if cfg.fsdp:
        optimizer = shard_for_fsdp(raw, optimizer, schedule, cfg, device, resumed=state is not None)
    model, eval_model = wrap_model(raw, compile=cfg.compile, ddp=d.enabled and not cfg.fsdp, device=device,
                                   find_unused_parameters=spec.find_unused_parameters)

    # run folder and logs
    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len
    n_params = raw.num_parameters() if hasattr(raw, "num_parameters") else sum(p.numel() for p in raw.parameters())
    run = RunLog(new_run_dir(cfg.out, spec.name, d), d, log)
    run.start(dict(cfg.to_dict(), model_config=model_cfg.to_dict()), corpus.info, start_step, cfg.max_steps,
              tensorboard=cfg.tensorboard, progress=cfg.progress, header=[
                  f"hilt train: {spec.name} ({n_params:,} parameters), device {device}"
                  + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
                  + f", autocast {str(dtype).replace('torch.', '')}, {d.world_size} process(es)",
                  f"corpus: {corpus.describe()}",
                  f"steps {start_step} -> {cfg.max_steps}, {tokens_per_step:,} tokens/step (batch {cfg.batch_size} "
                  f"x accum {cfg.grad_accum} x seq {seq_len}), lr {cfg.lr:g} -> {cfg.final_lr:g}, warmup "
                  f"{cfg.warmup}" + (f", resumed from {resume}" if resume else "")])

    # -- the loop ----------------------------------------------------------------------------------------
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    guard = NonFiniteGuard(cfg.max_bad_steps, skipped)
    has_ilt_scale = hasattr(raw, "set_ilt_scale") and getattr(raw, "ilts", None) is not None
    history: list[dict] = []
    val_loss = val_bpb = None
    last_step = min(cfg.max_steps, stop_at_step) if stop_at_step is not None else cfg.max_steps
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
            mix = None if lformer is None else (lambda ids, targets, micro, s=step: lformer.mix(ids, targets, s, micro))
            out = train_step(model, raw, sampler, optimizer, scaler, grad_accum=cfg.grad_accum,
                             grad_clip=cfg.grad_clip, autocast=autocast, d=d, fsdp=cfg.fsdp, mix=mix)
            step_done = step + 1
            skipped_msg = guard.check(out, step_done, run.paths["checkpoint"])
            if skipped_msg:
                run.message(skipped_msg)
            dt = time.perf_counter() - t0
            row = {"step": step_done, "lr": lr, "loss": out.loss, "val_loss": "", "val_bpb": "",
                   "tokens_per_s": tokens_per_step / dt if dt > 0 else float("nan"),
                   "ilt_scale": ilt_scale if ilt_scale is not None else "", "grad_norm": out.grad_norm,
                   "skipped": int(out.skipped), "phase": phase or "", "tool_acc": "", "value_mae": "", "plan_em": ""}
            if (cfg.eval_every and step_done % cfg.eval_every == 0) or step_done == cfg.max_steps:
                val_loss, val_bpb = evaluate(eval_model, corpus.val, cfg.batch_size, seq_len, cfg.eval_iters,
                                             device=device, dtype=dtype, seed=cfg.seed + 1, d=d)
                row.update(val_loss=val_loss, val_bpb=val_bpb)
                if lformer is not None:
                    row.update(lformer.evaluate(eval_model))
                run.eval_line(row, phase)
            history.append(row)
            run.row(row)
            if (cfg.ckpt_every and step_done % cfg.ckpt_every == 0) or step_done in (cfg.max_steps, last_step):
                save_run(run.paths["checkpoint"], raw, optimizer, schedule, scaler, sampler, cfg, d, step=step_done,
                         metrics={"val_loss": val_loss, "val_bpb": val_bpb, "train_loss": out.loss,
                                  "skipped_steps": guard.skipped_total},
                         build_plain=lambda: build_model(spec.name, model_cfg))
        step_done = max(start_step, last_step)

        # -- the end: loss plot, a sample, where everything went ---------------------------------------
        run.close_progress()
        result = TrainResult(run.out, history, val_loss, val_bpb, step_done, guard.skipped_total, raw, run.paths,
                             time.perf_counter() - t_start)
        finished = step_done == cfg.max_steps
        sample_model = raw
        if cfg.fsdp and finished and cfg.sample_tokens > 0:  # every rank gathers the full weights
            build_plain = lambda: build_model(spec.name, model_cfg, **backend_kwargs(cfg)).to(device)  # noqa: E731
            sample_model = fsdp_full_state(raw, None, build_plain, d.master)[0]
        run.finish(finished, cfg, sample_model=sample_model, val=corpus.val,
                   title=f"{spec.name} on {Path(cfg.data).name if cfg.data else 'stdlib'}")
        run.summary(step_done, val_loss, val_bpb, guard.skipped_total, result.seconds, cfg.tensorboard)
        return result
    finally:
        run.close()
