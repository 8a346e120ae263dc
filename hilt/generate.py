"""Autoregressive generation, with a KV cache for every model that has one.

``generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
use_cache=None, cache_rebuild_keep=None, eos_id=None, padding_mask=None)``: ``temperature=0`` is greedy;
otherwise sampling from the softmax of ``logits / temperature``, restricted to the ``top_k`` most likely
tokens and/or the smallest set whose probability reaches ``top_p`` (nucleus), with a ``torch.Generator``
seeded by ``seed`` (same seed, same output).

Cached models: GPT, HILT, LFormer (both tap modes), Llama (NP layers included), BlockHierarchicalLM
(decoder mode, a block-wise cache). ``use_cache=False`` recomputes the whole window every step.

Every step conditions on a window of at most ``config.max_seq_len`` tokens. Past the context the window
slides by the model's ``window_stride`` (1 token; a whole block for BlockHierarchicalLM, so block
boundaries stay aligned with the tokens), identically with and without the cache:

* token-wise sliding (GPT-like models): positions shift and every cached key/value is stale, so the cache
  is **rebuilt** from the new window (``cache_rebuild_keep=None``: from the last ``max_seq_len`` tokens
  at every step, identical to the recompute path; an int k: from the last k tokens, then incremental again
  until the context is full, cheaper but conditioning on fewer tokens);
* models with ``slide_cache`` (BlockHierarchicalLM): the oldest block leaves the cache once per block.

**Batched prompts of different lengths**: a list of lists of ints, or ``(B, T)`` ids with a
``padding_mask`` (True = padding, anywhere in the row). Each row keeps its own unpadded positions (and
block phase), so a row's tokens are those it gets generated alone (greedy; to rounding, ~1e-6 in the
logits). Models with ``supports_ragged_cache`` (GPT, HILT, LFormer, Llama/NPT) decode all rows in ONE batch:
the rows are left-padded into one KV cache (:meth:`~hilt.nn.attention.KVCache.set_left_padding`), every
token gets its row's own position and no row attends to its padding; once the longest row fills the context
(where rows would start to slide at different steps) the rows continue in batches of equal length.
BlockHierarchicalLM (a block phase per row) decodes in batches of equal prompt length from the start.
``eos_id`` stops each row by itself once it emits that token.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from hilt.nn.attention import KVCache

__all__ = ["generate", "filter_logits", "supports_cache", "supports_ragged_cache", "window_start", "KVCache"]


def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. ``logits``: (B, V)."""
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the most likely one always stays)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def supports_cache(model: nn.Module) -> bool:
    """Whether ``model`` has a KV-cache decoding path (``init_cache`` / ``forward_step``)."""
    return bool(getattr(model, "supports_kv_cache", False)) and hasattr(model, "forward_step")


def supports_ragged_cache(model: nn.Module) -> bool:
    """Whether ``model``'s KV cache takes left-padded rows with their own positions (one batch for prompts
    of different lengths)."""
    return supports_cache(model) and bool(getattr(model, "supports_ragged_cache", False))


def window_start(n: int, max_len: int, stride: int = 1) -> int:
    """Index of the first token of the generation window over ``n`` tokens: the smallest multiple of
    ``stride`` that leaves at most ``max_len`` tokens (0 while ``n <= max_len``)."""
    if n <= max_len:
        return 0
    return -(-(n - max_len) // stride) * stride


def _as_rows(prompt_ids, padding_mask: Optional[Tensor]) -> tuple[list[Tensor], str]:
    """The prompts as a list of 1-D LongTensors, and the input form: 'flat' (T,), 'batch' (B, T),
    'ragged' (list of lists / ids + padding mask)."""
    if padding_mask is not None:
        if not isinstance(prompt_ids, Tensor) or prompt_ids.dim() != 2:
            raise ValueError("padding_mask needs prompt_ids as a (B, T) tensor")
        if padding_mask.shape != prompt_ids.shape or padding_mask.dtype != torch.bool:
            raise ValueError(f"padding_mask must be a bool tensor of prompt_ids' shape {tuple(prompt_ids.shape)} "
                             f"(True = padding), got {padding_mask.dtype} {tuple(padding_mask.shape)}")
        rows = [row[~m] for row, m in zip(prompt_ids, padding_mask.to(prompt_ids.device))]
        return [r.long() for r in rows], "ragged"
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dim() == 1:
            return [prompt_ids.long()], "flat"
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be (T,) or (B, T), got shape {tuple(prompt_ids.shape)}")
        return [r.long() for r in prompt_ids], "batch"
    items = list(prompt_ids)
    if items and all(isinstance(x, (list, tuple, Tensor)) for x in items):
        return [torch.as_tensor(list(x) if not isinstance(x, Tensor) else x, dtype=torch.long).reshape(-1)
                for x in items], "ragged"
    return [torch.tensor(items, dtype=torch.long)], "flat"


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: Union[Tensor, Sequence[int], Sequence[Sequence[int]]],
             max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: Optional[int] = None, use_cache: Optional[bool] = None,
             cache_rebuild_keep: Optional[int] = None, eos_id: Optional[int] = None,
             padding_mask: Optional[Tensor] = None) -> Union[Tensor, list[Tensor]]:
    """Continue the prompt(s) by up to ``max_new_tokens`` tokens each.

    ``prompt_ids``: ``(T,)`` or a list of ints -> a 1-D tensor; ``(B, T)`` -> ``(B, T + n)``; a list of
    lists of ints, or ``(B, T)`` with ``padding_mask`` (B, T) bool (True = padding) -> a list of 1-D
    tensors (each prompt's unpadded tokens followed by its new tokens). With ``eos_id`` a row stops
    after emitting it (the eos is kept): 1-D and ragged outputs end there; in a ``(B, T + n)`` output,
    ``n`` is the longest row's count and the finished rows are filled with ``eos_id``.
    The model runs in eval mode (restored afterwards). ``use_cache``: None = the cache when the model
    has one; True demands it (ValueError otherwise); False recomputes every step.
    ``cache_rebuild_keep``: see the module docstring (token-wise sliding models only).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = next(model.parameters()).device
    rows, form = _as_rows(prompt_ids, padding_mask)
    if not rows:
        raise ValueError("prompt_ids holds no prompt")
    for r in rows:
        if r.numel() == 0:
            raise ValueError("every prompt must hold at least one token")
    max_len = model.config.max_seq_len
    if use_cache is None:
        use_cache = supports_cache(model)
    elif use_cache and not supports_cache(model):
        raise ValueError(f"use_cache=True: {type(model).__name__} has no KV-cache decoding path")
    slides = hasattr(model, "slide_cache")
    if cache_rebuild_keep is not None and slides:
        raise ValueError(f"cache_rebuild_keep: {type(model).__name__} slides its cache by whole blocks, "
                         "leave cache_rebuild_keep=None")
    keep = max_len if cache_rebuild_keep is None else int(cache_rebuild_keep)
    if not 1 <= keep <= max_len:
        raise ValueError(f"cache_rebuild_keep must be in [1, max_seq_len={max_len}], got {cache_rebuild_keep}")
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed if seed is not None else torch.initial_seed() % 2**63)
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p, gen=gen, use_cache=use_cache, keep=keep,
                eos_id=eos_id, stride=int(getattr(model, "window_stride", 1)), slides=slides)
    was_training = model.training
    model.eval()
    try:
        if form == "batch":
            out = _decode(model, torch.stack(rows).to(device), max_new_tokens, **opts)
            return out
        rows = [r.to(device) for r in rows]
        lengths = [r.numel() for r in rows]
        if (len(set(lengths)) > 1 and use_cache and max_new_tokens > 0 and supports_ragged_cache(model)
                and max(lengths) <= max_len):
            seqs = _decode_ragged(model, rows, max_new_tokens, opts)
        else:
            seqs = _decode_grouped(model, rows, max_new_tokens, opts)
        outs = [_trim_eos(s, n, eos_id) for s, n in zip(seqs, lengths)]
    finally:
        model.train(was_training)
    return outs[0] if form == "flat" else outs


def _decode_grouped(model: nn.Module, rows: list[Tensor], max_new_tokens: int, opts: dict) -> list[Tensor]:
    """Rows decoded in batches of equal length (each batch by :func:`_decode`)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.numel(), []).append(i)
    outs: list[Tensor] = list(rows)
    for idx in groups.values():
        res = _decode(model, torch.stack([rows[i] for i in idx]), max_new_tokens, **opts)
        for j, i in enumerate(idx):
            outs[i] = res[j]
    return outs


def _decode_ragged(model: nn.Module, rows: list[Tensor], max_new_tokens: int, opts: dict) -> list[Tensor]:
    """Rows of different lengths (the longest within the context) in one batch: left-padded in one KV cache
    with per-row positions while every row fits the context (the longest row fills it after
    ``max_len - N + 1`` new tokens); the rows still running then continue grouped by length, so each
    row slides exactly as it would alone."""
    max_len = model.config.max_seq_len
    N = max(r.numel() for r in rows)
    pad = torch.tensor([N - r.numel() for r in rows], device=rows[0].device)
    ids = torch.zeros(len(rows), N, dtype=torch.long, device=rows[0].device)  # padding token: 0 (never attended)
    for b, r in enumerate(rows):
        ids[b, N - r.numel():] = r
    steps = min(max_new_tokens, max_len - N + 1)
    out = _decode(model, ids, steps, pad=pad, **opts)
    seqs = [out[b, N - r.numel():] for b, r in enumerate(rows)]
    rest, eos_id = max_new_tokens - steps, opts["eos_id"]
    if rest > 0:
        running = [b for b, (s, r) in enumerate(zip(seqs, rows))
                   if eos_id is None or not bool((s[r.numel():] == eos_id).any())]
        for b, s in zip(running, _decode_grouped(model, [seqs[b] for b in running], rest, opts)):
            seqs[b] = s
    return seqs


def _trim_eos(row: Tensor, prompt_len: int, eos_id: Optional[int]) -> Tensor:
    if eos_id is None:
        return row
    hit = (row[prompt_len:] == eos_id).nonzero()
    return row if hit.numel() == 0 else row[:prompt_len + int(hit[0, 0]) + 1]


def _decode(model: nn.Module, ids: Tensor, max_new_tokens: int, *, temperature, top_k, top_p, gen, use_cache,
            keep, eos_id, stride, slides, pad: Optional[Tensor] = None) -> Tensor:
    """Decode a batch of prompts of one length: ids (B, T) -> (B, T + n), n <= max_new_tokens. ``pad``
    (B,): row b's first pad[b] tokens are left padding (a ragged cache; the caller keeps every slot within
    the context)."""
    max_len = model.config.max_seq_len
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    cache = model.init_cache(B) if use_cache and max_new_tokens > 0 else None
    for step in range(max_new_tokens):
        if cache is None:
            window = ids[:, window_start(ids.shape[1], max_len, stride):]
            logits = model(window).logits[:, -1, :].float()
        elif step == 0:
            window = ids[:, window_start(ids.shape[1], max_len, stride):]
            cache = _reset(model, cache)
            if pad is not None:
                cache.set_left_padding(pad)
            logits = model.forward_step(window, cache).logits[:, -1, :].float()
        elif slides:
            if cache.length >= max_len:
                model.slide_cache(cache)
            logits = model.forward_step(ids[:, -1:], cache).logits[:, -1, :].float()
        elif cache.length >= max_len:  # token-wise slide: rebuild from the last `keep` tokens
            logits = model.forward_step(ids[:, -keep:], cache.reset()).logits[:, -1, :].float()
        else:
            logits = model.forward_step(ids[:, -1:], cache).logits[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
        if eos_id is not None:
            nxt = torch.where(done.unsqueeze(1), torch.full_like(nxt, eos_id), nxt)
            done = done | (nxt[:, 0] == eos_id)
        ids = torch.cat([ids, nxt], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    return ids


def _reset(model: nn.Module, cache):
    reset = getattr(model, "_reset_cache", None)
    return reset(cache) if reset is not None else cache.reset()
