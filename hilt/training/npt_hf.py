"""``hilt npt-train --hf PATH``: NPT training with teacher scaffolding on a Hugging Face Llama model.

The same curriculum (teacher / mixed / student stages, attention and MLP mixing ratios), layer weights,
per-layer direct loss, KL(teacher || student) and v_a / v_b regularisation as ``hilt npt-train --ckpt``
(:mod:`.npt`), on a ``LlamaForCausalLM`` loaded from a model folder or a ``.gguf`` file
(:mod:`hilt.hf_load`), with its own tokenizer: ``--data`` text or the default corpus, tokenized and cached
(:mod:`.hf_data`). ``--dtype bfloat16`` casts the frozen base (the NP weights stay float32);
``--np-weights F`` starts from trained NP layers, kept frozen in NPT mode, and trains ``--layers`` on top
(layer-by-layer training);
``--grad-checkpoint`` recomputes the student layers in the backward pass. Fidelity (KL per token, next-token
agreement, teacher and student nats/token and bits/byte, :func:`hilt.hf_scaffold.hf_fidelity`) before training,
every ``--eval-every`` steps and at the end, on the same ``--eval-iters`` validation batches each time.

Run folder (as ``hilt npt-train``): ``npt_config.json``, ``metrics.csv``, ``np_weights.safetensors`` (NP weights
only, with the base's identity) and ``summary.json`` (before / after, seconds per step, peak memory). One process.
"""
from __future__ import annotations

import json
import os
import random
import resource
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from hilt.hf import convert_hf_llama_to_npt
from hilt.hf_load import DTYPES, load_hf_model
from hilt.hf_scaffold import byte_counter, hf_fidelity, hf_scaffolded_forward
from hilt.models import npt as N

from .config import TrainingError
from .data import BatchSampler, eval_batches
from .distributed import Dist, cpu_threads, resolve_device
from .hf_data import load_token_corpus
from .logging import new_run_dir
from .npt_parts import (NPTTrainConfig, NPTTrainResult, csv_fields, npt_loss, parse_curriculum, parse_layer_weights,
                        stage_at)
from .npt_step import StepLog, fmt_fidelity, make_optimizer, metrics_row, optimize, val_columns

__all__ = ["HFNPTTrainConfig", "train_npt_hf", "DEFAULT_HF_SEQ_LEN", "peak_memory_mb"]

DEFAULT_HF_SEQ_LEN = 256


@dataclass
class HFNPTTrainConfig(NPTTrainConfig):
    hf: str = ""                     # Hugging Face model folder or .gguf file
    dtype: str = "float32"           # the frozen base: float32 | bfloat16 | float16
    grad_checkpoint: bool = False
    np_weights: Optional[str] = None  # NP weights to start from (their layers stay frozen): layer-by-layer training

    def validate(self) -> None:
        if not self.hf:
            raise TrainingError("--hf (a Hugging Face model folder or .gguf file) is required")
        if self.ckpt:
            raise TrainingError("give either --ckpt (a hilt checkpoint) or --hf (a Hugging Face model), not both")
        if self.dtype not in DTYPES:
            raise TrainingError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise TrainingError("npt-train --hf runs in one process (no torchrun)")
        self.validate_settings()


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (CPU, MiB) or peak allocated CUDA memory (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_npt_hf(cfg: HFNPTTrainConfig, log=print) -> NPTTrainResult:
    """Convert ``cfg.layers`` of the HF model at ``cfg.hf``, freeze the base and train the NP weights with the
    curriculum; returns before / after fidelity, the history and the model."""
    cfg.validate()
    stages = parse_curriculum(cfg.curriculum)
    max_steps = stages[-1].end
    device = resolve_device(cfg.device, Dist())
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads, Dist()))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    t0 = time.perf_counter()
    hm = load_hf_model(cfg.hf, dtype=cfg.dtype, device=device)
    model, tok = hm.model, hm.tokenizer
    load_s = time.perf_counter() - t0
    frozen: list[int] = []
    if cfg.np_weights:
        frozen = N.load_np_weights(model, cfg.np_weights)  # checks the base identity
        saved = model.npt_config
        cfg.np_rank, cfg.num_ranks, cfg.modulate = saved.np_rank, saved.num_ranks, saved.modulate
    layers = convert_hf_llama_to_npt(model, cfg.layers, np_rank=cfg.np_rank, num_ranks=cfg.num_ranks,
                                     modulate=cfg.modulate)
    model.to(device)
    weights = parse_layer_weights(cfg.layer_weights, len(layers))
    n_train = N.freeze_base(model)
    if frozen:
        mlayers = N._layer_list(model)
        for i in frozen:
            mlayers[i].np.requires_grad_(False)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    max_pos = int(getattr(model.config, "max_position_embeddings", 1 << 30))
    seq_len = cfg.seq_len or min(DEFAULT_HF_SEQ_LEN, max_pos)
    if not 1 <= seq_len <= max_pos:
        raise TrainingError(f"seq_len must be in 1..{max_pos}, got {seq_len}")

    corpus = load_token_corpus(cfg.data, tok, use_cache=cfg.use_cache)
    sampler = BatchSampler(corpus.train, cfg.batch_size, seq_len, seed=cfg.seed, device=device)
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    count_bytes = byte_counter(tok)

    params = [p for p in N.np_parameters(model) if p.requires_grad]
    optimizer, schedule = make_optimizer(params, cfg, max_steps)

    out = new_run_dir(cfg.out, "npt", Dist())
    paths = {"csv": out / "metrics.csv", "weights": out / "np_weights.safetensors", "summary": out / "summary.json",
             "config": out / "npt_config.json"}
    fields = csv_fields(layers, cfg.num_ranks)
    fields[-1:-1] = ["val_student_nats", "val_teacher_nats"]
    out.mkdir(parents=True, exist_ok=True)
    paths["config"].write_text(json.dumps(dict(asdict(cfg), npt=model.npt_config.to_dict(), seq_len=seq_len,
                                               base_identity=hm.identity, stages=[asdict(s) for s in stages]),
                                          indent=2) + "\n")

    c = model.config
    n_base = sum(p.numel() for n, p in model.named_parameters() if ".np." not in f".{n}")
    log(f"hilt npt-train --hf: {hm.path} ({type(model).__name__}, {c.num_hidden_layers} layers, hidden "
        f"{c.hidden_size}, {n_base:,} base parameters, {cfg.dtype}; "
        f"loaded in {load_s:.0f} s); NP layers {layers} (np_rank {cfg.np_rank}, num_ranks {cfg.num_ranks}, "
        f"{cfg.modulate}); {n_train:,} trainable parameters; device {device}, {torch.get_num_threads()} threads"
        + (f"; NP layers {frozen} from {cfg.np_weights} (frozen, NPT mode)" if frozen else ""))
    log(f"corpus: {corpus.describe()}; {corpus.info['train_tokens']:,} / {corpus.info['val_tokens']:,} "
        f"train / val tokens")
    log("curriculum: " + ", ".join(f"{s.name} steps {s.start}-{s.end - 1} (attn {s.attn_ratio:g}, mlp "
                                   f"{s.mlp_ratio:g})" for s in stages) + f"; layer weights {weights}; batch "
        f"{cfg.batch_size}x{seq_len}")

    eval_seconds = [0.0]

    def run_eval() -> dict:
        t = time.perf_counter()
        batches = eval_batches(corpus.val, eval_bs, seq_len, cfg.eval_iters, seed=cfg.seed + 1, device=device)
        m = hf_fidelity(model, batches, count_bytes)
        eval_seconds[0] += time.perf_counter() - t
        return m

    def save(step: int) -> None:
        N.save_np_weights(model, paths["weights"], {"base_model": str(hm.path.resolve()), "step": step})

    before = run_eval()
    eval_seconds[0] = 0.0  # from here on: evaluation time inside the training loop
    log(f"before: {fmt_fidelity(before)}")
    history: list[dict] = []
    after = before
    steps_log = StepLog(paths["csv"], fields, max_steps, writes=True, progress=cfg.progress, log=log)
    t_start = time.perf_counter()
    model.train()
    try:
        for step in range(max_steps):
            stage = stage_at(stages, step)
            lr = schedule.set(step)
            ids, _ = sampler.next_batch()
            out_s = hf_scaffolded_forward(model, ids, stage.attn_ratio, stage.mlp_ratio, cfg.grad_checkpoint)
            out_s.layers = {i: out_s.layers[i] for i in layers}  # the direct loss of the layers being trained
            loss, parts = npt_loss(out_s, weights, cfg)
            grad_norm, bad = optimize(loss, params, cfg, optimizer)
            losses = {"loss": loss.item(), **{k: parts[k].item() for k in ("direct", "kl", "reg")}}
            row = metrics_row(step + 1, stage, lr, losses, grad_norm, bad, out_s.layers)
            del out_s, loss
            is_last = step + 1 == max_steps
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or is_last:
                after = run_eval()
                model.train()
                row.update(val_columns(after))
                steps_log.say(f"step {step + 1} ({stage.name}): loss {row['loss']:.4f}; {fmt_fidelity(after)}")
                save(step + 1)
            row["seconds"] = time.perf_counter() - t_start
            history.append(row)
            steps_log.add(row)
    finally:
        steps_log.close()
    seconds = time.perf_counter() - t_start
    train_seconds = seconds - eval_seconds[0]
    summary = {"before": before, "after": after, "kl_ratio": before["kl"] / max(after["kl"], 1e-12),
               "steps": max_steps, "seconds": seconds, "eval_seconds": eval_seconds[0],
               "seconds_per_step": train_seconds / max_steps, "peak_memory_mb": peak_memory_mb(device),
               "layers": layers, "frozen_np_layers": frozen, "trainable_parameters": n_train, "base_model": str(hm.path.resolve()),
               "base_identity": hm.identity, "batch": [cfg.batch_size, seq_len], "threads": torch.get_num_threads(),
               "config": asdict(cfg)}
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    log(f"after:  {fmt_fidelity(after)}")
    log(f"KL before / after: {summary['kl_ratio']:.2f}x; {summary['seconds_per_step']:.2f} s/step (training), "
        f"peak memory {summary['peak_memory_mb']:.0f} MiB")
    log(f"wrote {out}/ in {seconds:.0f} s: np_weights.safetensors (NP weights only), metrics.csv, summary.json")
    return NPTTrainResult(out, before, after, history, model, paths)

