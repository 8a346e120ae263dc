"""The ``hilt train`` command line: the parser, the options it gives (flags over ``--config`` JSON), and
``main`` (what ``hilt train``, ``python -m hilt.train`` and ``torchrun -m hilt.train`` run)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from hilt.models.registry import get_model_spec, model_types

from .checkpoint import CheckpointError
from .config import MODEL_FLAGS, TrainConfig, TrainingError, flag, model_config_for
from .loop import train

__all__ = ["build_parser", "config_from_args", "run_cli", "main"]


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
        m.add_argument(flag(name), type=typ, dest=f"m_{name}", help=helps[name],
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
