"""``hilt npt-train``: multi-layer NPT training with teacher scaffolding (DESIGN.md, NPT).

Start from a trained Llama checkpoint (``hilt train --model llama``), convert some layers to NP layers,
freeze the base, and train only the NP weights:

1. the teacher is the same model with every NP layer in standard mode, run without gradient;
2. a curriculum (``--curriculum``) sets, step by step, how much of the teacher's hidden state the NP
   layers see: ``stage:steps[:attn_ratio[:mlp_ratio]]``, comma-separated, stages ``teacher`` / ``mixed`` /
   ``student``; ratio r: 0 = teacher, 1 = student, ``(1 - r) teacher + r student`` of the attention input
   (attn_ratio) and of the MLP residual input (mlp_ratio);
3. the loss: per-layer direct loss (MSE of ``MLP_mod(...)`` against the teacher's ``a + MLP(norm(h + a))``),
   weighted over layers (``--layer-weights uniform|linear|w1,w2,...``), plus ``--kl-weight`` x
   KL(teacher || student) of the final next-token distribution, plus ``--reg-weight`` x the mean squared
   norms of v_a and v_b;
4. logs (``metrics.csv``): stage, ratios, losses, and per layer the direct loss, v_a / v_b norms and the
   v_a-attention cosine similarity of every rank; fidelity (KL, next-token agreement with the teacher) and
   val bits/byte of teacher and student before training, every ``--eval-every`` steps and at the end;
5. the NP weights only, as safetensors (atomic), ``np_weights.safetensors``; ``summary.json``.

It reuses the parts of ``hilt train``: processes and devices (:mod:`.distributed`), the corpus and sampler
(:mod:`.data`), the LR schedule (:mod:`.schedule`), the run folder (:mod:`.logging`) and the CLI wrapper
(:mod:`.cli`); only the teacher-scaffolded step, its loss and the fidelity evaluation are its own.

Several processes: ``torchrun --nproc_per_node=N -m hilt.npt_train ...``: DDP over the NP weights; each rank
reads its own shard of every global batch (:class:`hilt.training.data.BatchSampler`), so no data is duplicated.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hilt.models import npt as N

from .checkpoint import load, read_state
from .cli import run_cli
from .config import TrainingError
from .data import BatchSampler, eval_batches, load_corpus
from .distributed import Dist, all_reduce, cpu_threads, rank0_first, resolve_device, setup_distributed, wrap_model
from .evaluate import LN2
from .logging import new_run_dir
from .npt_parts import (STAGES, CurriculumError, NPTTrainConfig, NPTTrainResult, Stage,
                        csv_fields, kl_teacher_student, npt_loss, parse_curriculum, parse_layer_weights, stage_at)
from .npt_step import StepLog, fmt_fidelity, make_optimizer, metrics_row, optimize, val_columns

__all__ = ["STAGES", "Stage", "CurriculumError", "parse_curriculum", "stage_at", "parse_layer_weights",
           "NPTTrainConfig", "NPTScaffold", "npt_loss", "evaluate_fidelity", "make_sampler", "train_npt",
           "build_parser", "main"]

# --------------------------------------------------------------------------------------- the pieces

class NPTScaffold(nn.Module):
    """The model under teacher scaffolding as one module (what DDP wraps): ``forward(ids, attn_ratio,
    mlp_ratio) -> ScaffoldOutput``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids, attn_ratio: float, mlp_ratio: float, key_padding_mask=None) -> N.ScaffoldOutput:
        return N.scaffolded_forward(self.model, ids, attn_ratio, mlp_ratio, key_padding_mask)


@torch.no_grad()
def evaluate_fidelity(model: nn.Module, data: np.ndarray, batch_size: int, seq_len: int, iters: Optional[int], *,
                      device, seed: int = 0, d: Dist = Dist()) -> dict:
    """Student (NPT) vs teacher (standard mode) on ``data``: KL(teacher || student) per token, next-token
    agreement (argmax equal), and the bits per byte of both against the real next bytes."""
    was = model.training
    model.eval()
    tot = torch.zeros(5, dtype=torch.float64, device=device)  # kl, agree, ce_teacher, ce_student, tokens
    for ids, targets in eval_batches(data, batch_size, seq_len, iters, seed=seed, rank=d.rank,
                                     world_size=d.world_size, device=device):
        if ids.numel() == 0:
            continue
        out = N.scaffolded_forward(model, ids, 1.0, 1.0)
        t, s = out.teacher_logits.float(), out.student_logits.float()
        n = targets.numel()
        tot[0] += kl_teacher_student(t, s).double() * n
        tot[1] += (t.argmax(-1) == s.argmax(-1)).sum()
        tot[2] += F.cross_entropy(t.flatten(0, 1), targets.flatten(), reduction="sum").double()
        tot[3] += F.cross_entropy(s.flatten(0, 1), targets.flatten(), reduction="sum").double()
        tot[4] += n
    all_reduce(tot, d)
    model.train(was)
    n = tot[4].clamp_min(1)
    return {"kl": (tot[0] / n).item(), "agreement": (tot[1] / n).item(),
            "teacher_bpb": (tot[2] / n).item() / LN2, "student_bpb": (tot[3] / n).item() / LN2,
            "tokens": int(tot[4].item())}


def make_sampler(corpus_train: np.ndarray, cfg: NPTTrainConfig, seq_len: int, d: Dist, device) -> BatchSampler:
    """Every rank draws the same global batch and keeps its own rows (no duplicated data across ranks)."""
    return BatchSampler(corpus_train, cfg.batch_size, seq_len, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                        device=device)


# ------------------------------------------------------------------------------------------- the run

def train_npt(cfg: NPTTrainConfig, log=print) -> NPTTrainResult:
    cfg.validate()
    stages = parse_curriculum(cfg.curriculum)
    max_steps = stages[-1].end
    d = setup_distributed(cfg.device)
    device = resolve_device(cfg.device, d)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads, d))
    log = log if d.master else (lambda *a, **k: None)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # base model, conversion, frozen base
    state = read_state(cfg.ckpt)
    if state["model_type"] != "llama":
        raise TrainingError(f"--ckpt {cfg.ckpt}: holds a {state['model_type']!r} model; NPT needs a Llama "
                            "checkpoint (hilt train --model llama)")
    model = load(cfg.ckpt, device=device, eval_mode=False)
    layers = N.convert_to_npt(model, cfg.layers, np_rank=cfg.np_rank, num_ranks=cfg.num_ranks,
                              modulate=cfg.modulate)
    model.to(device)
    weights = parse_layer_weights(cfg.layer_weights, len(layers))
    n_train = N.freeze_base(model)
    seq_len = cfg.seq_len or model.config.max_seq_len
    if not 1 <= seq_len <= model.config.max_seq_len:
        raise TrainingError(f"seq_len must be in 1..{model.config.max_seq_len}, got {seq_len}")

    # data
    data = cfg.data if cfg.data is not None else (state.get("train_config") or {}).get("data")
    with rank0_first(d):  # rank 0 builds the token cache
        corpus = load_corpus(data, use_cache=cfg.use_cache)
    sampler = make_sampler(corpus.train, cfg, seq_len, d, device)
    eval_bs = cfg.eval_batch_size or cfg.batch_size

    # optimizer over the NP weights only
    params = N.np_parameters(model)
    optimizer, schedule = make_optimizer(params, cfg, max_steps)
    scaffold, _ = wrap_model(NPTScaffold(model), compile=False, ddp=d.enabled, device=device)

    # output
    out = new_run_dir(cfg.out, "npt", d)
    paths = {"csv": out / "metrics.csv", "weights": out / "np_weights.safetensors", "summary": out / "summary.json",
             "config": out / "npt_config.json"}
    fields = csv_fields(layers, cfg.num_ranks)
    if d.master:
        out.mkdir(parents=True, exist_ok=True)
        paths["config"].write_text(json.dumps(dict(asdict(cfg), npt=model.npt_config.to_dict(),
                                                   stages=[asdict(s) for s in stages]), indent=2) + "\n")

    log(f"hilt npt-train: {cfg.ckpt} ({model.config.n_layers} layers, d_model {model.config.d_model}); NP layers "
        f"{layers} (np_rank {cfg.np_rank}, num_ranks {cfg.num_ranks}, {cfg.modulate}); {n_train:,} trainable "
        f"parameters; device {device}, {d.world_size} process(es)")
    log(f"corpus: {corpus.describe()}")
    log("curriculum: " + ", ".join(f"{s.name} steps {s.start}-{s.end - 1} (attn {s.attn_ratio:g}, mlp "
                                   f"{s.mlp_ratio:g})" for s in stages) + f"; layer weights {weights}")

    def run_eval() -> dict:
        return evaluate_fidelity(model, corpus.val, eval_bs, seq_len, cfg.eval_iters, device=device,
                                 seed=cfg.seed + 1, d=d)

    def save(step: int) -> None:
        if d.master:
            N.save_np_weights(model, paths["weights"], {"base_checkpoint": str(Path(cfg.ckpt).resolve()),
                                                        "step": step})

    before = run_eval()
    log(f"before: {fmt_fidelity(before, 'val ')}")
    history: list[dict] = []
    after = before
    steps_log = StepLog(paths["csv"], fields, max_steps, writes=d.master, progress=cfg.progress, log=log)
    t_start = time.perf_counter()
    scaffold.train()
    try:
        for step in range(max_steps):
            stage = stage_at(stages, step)
            lr = schedule.set(step)
            ids, _ = sampler.next_batch()
            out_s = scaffold(ids, stage.attn_ratio, stage.mlp_ratio)
            loss, parts = npt_loss(out_s, weights, cfg)
            grad_norm, bad = optimize(loss, params, cfg, optimizer, reduce=lambda t: all_reduce(t, d))
            vals = torch.stack([loss.detach(), parts["direct"], parts["kl"], parts["reg"]]).double()
            all_reduce(vals, d)
            vals /= d.world_size
            row = metrics_row(step + 1, stage, lr, dict(zip(("loss", "direct", "kl", "reg"), vals.tolist())),
                              grad_norm, bad, out_s.layers)
            is_last = step + 1 == max_steps
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or is_last:
                after = run_eval()
                row.update(val_columns(after))
                steps_log.say(f"step {step + 1} ({stage.name}): loss {row['loss']:.4f}; {fmt_fidelity(after, 'val ')}")
                save(step + 1)
            row["seconds"] = time.perf_counter() - t_start
            history.append(row)
            steps_log.add(row)
    finally:
        steps_log.close()
    seconds = time.perf_counter() - t_start
    if d.master:
        paths["summary"].write_text(json.dumps({"before": before, "after": after, "steps": max_steps,
                                                "seconds": seconds, "layers": layers, "trainable_parameters": n_train,
                                                "base_checkpoint": str(Path(cfg.ckpt).resolve()),
                                                "config": asdict(cfg)}, indent=2) + "\n")
    log(f"after:  {fmt_fidelity(after, 'val ')}")
    log(f"wrote {out}/ in {seconds:.0f} s: np_weights.safetensors (NP weights only), metrics.csv, summary.json")
    return NPTTrainResult(out, before, after, history, model, paths)


# ------------------------------------------------------------------------------------------- CLI

def build_parser(prog: str = "hilt npt-train") -> argparse.ArgumentParser:
    D = NPTTrainConfig()
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert layers of a trained Llama checkpoint to neuro-plastic (NP) layers and train only their "
                    "weights with teacher scaffolding (the same model in standard mode is the teacher). Writes "
                    "metrics.csv, np_weights.safetensors (NP weights only) and summary.json (fidelity and val "
                    "bits/byte before and after).",
        epilog="curriculum: comma-separated stage:steps[:attn_ratio[:mlp_ratio]], stages teacher (0/0), mixed "
               "(default 0.5, mlp = attn) and student (1/1); ratio 0 = the teacher's hidden state, 1 = the "
               "student's, linear in between. Example: teacher:200,mixed:100:0.3,mixed:100:0.7,student:200.\n"
               "Several processes: torchrun --nproc_per_node=N -m hilt.npt_train ...")
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--ckpt", metavar="PATH", help="base Llama checkpoint (hilt train --model llama)")
    base.add_argument("--hf", metavar="PATH", help="base Hugging Face Llama model: a model folder or a .gguf file "
                                                  "(needs pip install 'hilt[hf]'; its own tokenizer; one process)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="with --hf: dtype of the frozen base (the NP weights stay float32; default: float32)")
    p.add_argument("--grad-checkpoint", action="store_const", const=True,
                   help="with --hf: recompute the student layers in the backward pass (less memory)")
    p.add_argument("--np-weights", metavar="FILE", help="with --hf: start from these trained NP layers (frozen, "
                                                       "NPT mode) and train --layers on top: layer by layer")
    p.add_argument("--layers", help=f"layers to convert: all, upper_half, lower_half, A-B or A,B,C (0-based; "
                                    f"default: {D.layers})")
    p.add_argument("--np-rank", type=int, help=f"bottleneck width r of the v generators (default: {D.np_rank})")
    p.add_argument("--num-ranks", type=int, help=f"rank-1 terms k per projection (default: {D.num_ranks})")
    p.add_argument("--modulate", choices=list(N.MODULATE), help=f"modulated projections: single = gate, dual = "
                                                               f"gate+up, triple = gate+up+down (default: {D.modulate})")
    p.add_argument("--curriculum", help=f"stages (default: {D.curriculum}); the total is the number of steps")
    p.add_argument("--layer-weights", help="direct-loss weights over the NP layers: uniform, linear (1 down to 1/n) "
                                           "or a comma list, one per layer (default: uniform)")
    p.add_argument("--data", metavar="FILE|DIR", help="text (default: what the base was trained on)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/npt-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--device", help="auto|cpu|cuda|cuda:N (default: auto)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads per process")
    p.add_argument("--seed", type=int, help=f"seed (default: {D.seed})")
    p.add_argument("--batch-size", type=int, help=f"global sequences per step (default: {D.batch_size})")
    p.add_argument("--seq-len", type=int, help="training window (default: the model's max_seq_len)")
    p.add_argument("--lr", type=float, help=f"peak learning rate, warmup + cosine (default: {D.lr:g})")
    p.add_argument("--min-lr", type=float, help="final learning rate (default: lr / 10)")
    p.add_argument("--warmup", type=int, help=f"warmup steps (default: {D.warmup})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW weight decay on NP matrices (default: {D.weight_decay:g})")
    p.add_argument("--grad-clip", type=float, help=f"gradient-norm clip; 0: off (default: {D.grad_clip:g})")
    p.add_argument("--direct-weight", type=float, help=f"weight of the per-layer direct loss (default: {D.direct_weight:g})")
    p.add_argument("--kl-weight", type=float, help=f"weight of KL(teacher || student) (default: {D.kl_weight:g})")
    p.add_argument("--reg-weight", type=float, help=f"weight of the v_a/v_b norm penalty (default: {D.reg_weight:g})")
    p.add_argument("--eval-every", type=int, help="evaluate fidelity every N steps (default: 0 = before and at the end)")
    p.add_argument("--eval-iters", type=int, help=f"validation batches per eval (default: {D.eval_iters})")
    p.add_argument("--eval-batch-size", type=int, help="sequences per validation batch (default: --batch-size)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    p.add_argument("--no-cache", dest="use_cache", action="store_const", const=False, help="do not use the token cache")
    return p


def main(argv: Optional[list[str]] = None, prog: str = "hilt npt-train") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.hf is not None:
        from .npt_hf import HFNPTTrainConfig, train_npt_hf

        names = {f.name for f in dataclasses.fields(HFNPTTrainConfig)}
        cfg = HFNPTTrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
        return run_cli(lambda: train_npt_hf(cfg), prog)
    for flag in ("dtype", "grad_checkpoint", "np_weights"):
        if getattr(args, flag) is not None:
            parser.error(f"--{flag.replace('_', '-')} needs --hf")
    names = {f.name for f in dataclasses.fields(NPTTrainConfig)}
    cfg = NPTTrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    return run_cli(lambda: train_npt(cfg), prog)
