"""``hilt eval --hf PATH [--np-weights F]`` and ``hilt generate --hf PATH [--np-weights F]`` (see :mod:`hilt.cli`).

Without ``--np-weights`` the base model runs as it is (standard mode); with them, the NP layers recorded in the
file are converted, the weights loaded (the file's base identity must match the model's) and the model runs in
NPT mode. ``eval`` then reports the NPT model against its base (KL, next-token agreement, both losses in
nats/token and bits/byte); ``generate`` samples with the Hugging Face ``generate`` and its KV cache.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["hf_eval", "hf_generate", "hf_loss"]

LN2 = 0.6931471805599453


def _load(args, device: str):
    from .hf_load import load_hf_model
    from .models import npt as N

    hm = load_hf_model(args.hf, dtype=getattr(args, "dtype", "float32") or "float32", device=device)
    layers = N.load_np_weights(hm.model, args.np_weights) if args.np_weights else []
    hm.model.to(device).eval().requires_grad_(False)
    return hm, layers


@torch.no_grad()
def hf_loss(model, batches, count_bytes) -> dict:
    """The model's cross-entropy over ``batches`` of ``(ids, targets)``: nats/token and bits/byte."""
    nats, n_tok, n_bytes = 0.0, 0, 0
    for ids, targets in batches:
        if ids.numel() == 0:
            continue
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nats += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        n_tok += targets.numel()
        n_bytes += count_bytes(targets.cpu())
    return {"nats": nats / max(n_tok, 1), "bpb": nats / (LN2 * max(n_bytes, 1)), "tokens": n_tok, "bytes": n_bytes}


def hf_eval(args, device: str, prog: str = "hilt eval") -> int:
    from .hf_scaffold import byte_counter, hf_fidelity
    from .training.data import eval_batches
    from .training.hf_data import load_token_corpus
    from .training.npt_hf import DEFAULT_HF_SEQ_LEN
    from .training.npt_step import fmt_fidelity

    hm, layers = _load(args, device)
    model = hm.model
    corpus = load_token_corpus(args.data, hm.tokenizer, use_cache=not args.no_cache)
    split = corpus.val if args.split == "val" else corpus.train
    seq_len = args.seq_len or min(DEFAULT_HF_SEQ_LEN, int(getattr(model.config, "max_position_embeddings", 1 << 30)))
    dev = next(model.parameters()).device
    batches = eval_batches(split, args.batch_size, seq_len, args.eval_iters, seed=args.seed, device=dev)
    count = byte_counter(hm.tokenizer)
    t = time.perf_counter()
    print(f"model: {hm.path} ({type(model).__name__}, {model.config.num_hidden_layers} layers)"
          + (f"; NP weights {args.np_weights} on layers {layers} (NPT mode)" if layers else " (standard mode)"))
    print(f"data: {corpus.describe()}")
    what = "whole split" if args.eval_iters is None else f"{args.eval_iters} batches"
    if layers:
        m = hf_fidelity(model, batches, count)
        print(f"{args.split}: {fmt_fidelity(m)} ({what} of {args.batch_size}x{seq_len}, {m['tokens']:,} tokens, "
              f"{m['bytes']:,} bytes, {time.perf_counter() - t:.0f} s)")
    else:
        m = hf_loss(model, batches, count)
        print(f"{args.split} loss {m['nats']:.4f} nats/token  bits/byte {m['bpb']:.4f} ({what} of "
              f"{args.batch_size}x{seq_len}, {m['tokens']:,} tokens, {m['bytes']:,} bytes, "
              f"{time.perf_counter() - t:.0f} s)")
    return 0


def hf_generate(args, device: str, prog: str = "hilt generate") -> Optional[int]:
    hm, layers = _load(args, device)
    model, tok = hm.model, hm.tokenizer
    prompts = list(getattr(args, "prompts", None) or [args.prompt])
    if not all(prompts):
        raise ValueError("--prompt must not be empty")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # several prompts: one left-padded batch (the attention mask gives each row its own positions)
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    T = max(len(r) for r in rows)
    dev = next(model.parameters()).device
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], device=dev)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=dev)
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    kw = {"do_sample": sample, "max_new_tokens": args.max_new_tokens, "use_cache": not args.no_kv_cache,
          "pad_token_id": pad_id, "attention_mask": mask}
    if getattr(args, "eos_id", None) is not None:  # with --hf a token id of the model's tokenizer
        kw["eos_token_id"] = args.eos_id
    if sample:
        kw.update(temperature=args.temperature, top_k=args.top_k or 0, top_p=args.top_p or 1.0)
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    with torch.no_grad():
        out = model.generate(ids, **kw)
    for i, prompt in enumerate(prompts):
        if len(prompts) > 1:
            sys.stdout.write(f"=== {i + 1} ===\n")
        sys.stdout.write(prompt + tok.decode(out[i, T:], skip_special_tokens=True) + "\n")
    return 0
