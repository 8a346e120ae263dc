"""The ``hilt`` command: ``hilt train | eval | generate | info``. ``hilt <command> --help`` explains each."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

__all__ = ["main", "eval_main", "generate_main"]


def _device(arg: Optional[str], threads: Optional[int] = None) -> str:
    import torch

    from .training.distributed import Dist, cpu_threads

    if arg in (None, "auto"):
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    if arg == "cpu":
        torch.set_num_threads(cpu_threads(threads, Dist()))
    return arg


def build_eval_parser(prog: str = "hilt eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Validation loss and bits per byte of a checkpoint.")
    _base_args(p)
    p.add_argument("--data", metavar="FILE|DIR",
                   help="text to evaluate on: its val split (default: the data the checkpoint was trained on, "
                        "or the standard library corpus)")
    p.add_argument("--split", choices=["val", "train"], default="val", help="which split (default: val)")
    p.add_argument("--eval-iters", type=int, metavar="N",
                   help="N batches of random windows (fixed seed) instead of the whole split in "
                        "non-overlapping windows (the default)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per batch (default: 16)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default: auto)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="autocast dtype; with --hf the base model's dtype (default: float32)")
    p.add_argument("--seq-len", type=int, metavar="N", help="with --hf: window length in tokens (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random windows with --eval-iters (default: 0)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all usable cores)")
    p.add_argument("--no-cache", action="store_true", help="do not use the token cache")
    return p


def _base_args(p: argparse.ArgumentParser) -> None:
    """--ckpt (a hilt checkpoint) or --hf (a Hugging Face model folder / .gguf), exactly one; --np-weights."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ckpt", metavar="PATH", help="checkpoint folder (e.g. runs/<run>/checkpoint)")
    g.add_argument("--hf", metavar="PATH", help="a Hugging Face model folder or .gguf file (pip install 'hilt[hf]')")
    p.add_argument("--np-weights", metavar="FILE", help="with --hf: NP weights (hilt npt-train --hf); the model "
                                                       "then runs in NPT mode (default: the base, standard mode)")


def _run_hf(args, run, prog: str) -> int:
    from .models.npt import NPTError

    try:
        return run(args, _device(args.device, args.threads), prog)
    except (NPTError, ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


def eval_main(argv: Optional[list[str]] = None, prog: str = "hilt eval") -> int:
    parser = build_eval_parser(prog)
    args = parser.parse_args(argv)
    if args.hf is not None:
        from .hf_cli import hf_eval

        return _run_hf(args, hf_eval, prog)
    for flag in ("np_weights", "seq_len"):
        if getattr(args, flag) is not None:
            parser.error(f"--{flag.replace('_', '-')} needs --hf")
    from .training.checkpoint import CheckpointError, load, read_state
    from .training.data import CorpusError, load_corpus
    from .training.config import DTYPES
    from .training.evaluate import evaluate

    try:
        state = read_state(args.ckpt)
        data = args.data
        if data is None:
            data = (state.get("train_config") or {}).get("data")
        model = load(args.ckpt, device=_device(args.device, args.threads))
        corpus = load_corpus(data, use_cache=not args.no_cache)
    except (CheckpointError, CorpusError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    split = corpus.val if args.split == "val" else corpus.train
    device = next(model.parameters()).device
    loss, bpb = evaluate(model, split, args.batch_size, model.config.max_seq_len, args.eval_iters, device=device,
                         dtype=DTYPES[args.dtype], seed=args.seed, progress=sys.stderr.isatty())
    print(f"checkpoint: {args.ckpt} ({state['model_type']}, step {state['step']})")
    print(f"data: {corpus.describe()}")
    print(f"{args.split} loss {loss:.4f}  bits/byte {bpb:.4f}  "
          f"({'whole split' if args.eval_iters is None else f'{args.eval_iters} batches'}, "
          f"{len(split):,} bytes)")
    return 0


def build_generate_parser(prog: str = "hilt generate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Continue one or more prompts with a trained checkpoint "
                                                       "(byte-level) or a Hugging Face model (--hf, its tokenizer).")
    _base_args(p)
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text to continue (default: 'def '); repeat it to continue several prompts in one batch "
                        "(each keeps its own positions; printed one after another under '=== i ===' lines)")
    p.add_argument("--prompt-file", metavar="PATH",
                   help="more prompts, one per line (blank lines skipped), added after any --prompt")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="bytes (tokens of its tokenizer with --hf) to generate per prompt (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely bytes (default: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same text (default: 0)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default: auto)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all usable cores)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the whole context every step instead of using the model's cache (every LM "
                        "model has one: GPT, HILT, LFormer, Llama/NPT, BlockHierarchicalLM's block-wise cache; "
                        "with --hf the Hugging Face KV cache)")
    p.add_argument("--eos-id", type=int, default=None, metavar="BYTE",
                   help="stop once this byte value is generated (kept in the output; default: off)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="with --hf: the model's dtype (default: float32)")
    return p


def generate_main(argv: Optional[list[str]] = None, prog: str = "hilt generate") -> int:
    parser = build_generate_parser(prog)
    args = parser.parse_args(argv)
    prompts = list(args.prompt or [])
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as fh:
                prompts += [line.rstrip("\n") for line in fh if line.strip()]
        except OSError as e:
            parser.error(f"--prompt-file: cannot read {args.prompt_file}: {e}")
    prompts = prompts or ["def "]
    if args.hf is not None:
        from .hf_cli import hf_generate

        args.prompts, args.prompt = prompts, prompts[0]
        return _run_hf(args, hf_generate, prog)
    if args.np_weights is not None:
        parser.error("--np-weights needs --hf")
    from .training.checkpoint import CheckpointError, load
    from .training.data import decode, encode
    from .generate import generate

    try:
        model = load(args.ckpt, device=_device(args.device, args.threads))
        encoded = [encode(p) for p in prompts]
        if not all(encoded):
            raise ValueError("--prompt must not be empty")
        outs = generate(model, encoded, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, use_cache=False if args.no_kv_cache else None,
                        eos_id=args.eos_id)
    except (CheckpointError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    for i, (text, ids, out) in enumerate(zip(prompts, encoded, outs)):
        if len(prompts) > 1:
            sys.stdout.write(f"=== {i + 1} ===\n")
        sys.stdout.write(text + decode(out[len(ids):].tolist()) + "\n")
    return 0


COMMANDS = {
    "train": "train a model (default: a small HILT on the Python standard library)",
    "eval": "validation loss and bits/byte of a checkpoint",
    "generate": "continue one or more prompts with a checkpoint",
    "info": "versions, devices and kernel backends available here",
}
COMMANDS["npt-train"] = ("train neuro-plastic (NP) layers of a Llama checkpoint or Hugging Face Llama model with "
                         "teacher scaffolding")
COMMANDS["ablate"] = "GPT vs HILT vs block vs L-Former and variants at matched parameters or FLOPs: table + val-curve plot"


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="hilt", description="hilt: hierarchical and inter-layer transformers.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="commands:\n" + "\n".join(f"  {k:<10} {v}" for k, v in COMMANDS.items())
                                + "\n\n'hilt <command> --help' explains each command's options.")
    p.add_argument("command", choices=list(COMMANDS), metavar="command", help="one of: " + ", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's options")
    if not argv or argv[0] in ("-h", "--help"):
        p.print_help()
        return 0 if argv else 2
    ns = p.parse_args(argv[:1])
    rest = argv[1:]
    if ns.command == "train":
        from .training.cli import main as train_main

        return train_main(rest, prog="hilt train")
    if ns.command == "npt-train":
        from .training.npt import main as npt_train_main

        return npt_train_main(rest, prog="hilt npt-train")
    if ns.command == "ablate":
        from .training.ablate import main as ablate_main

        return ablate_main(rest, prog="hilt ablate")
    if ns.command == "eval":
        return eval_main(rest)
    if ns.command == "generate":
        return generate_main(rest)
    from .info import main as info_main

    return info_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
