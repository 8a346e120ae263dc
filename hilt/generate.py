"""Autoregressive generation, with a KV cache for the models that have one (GPT, HILT).

``generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
use_cache=None)``: ``temperature=0`` is greedy; otherwise sampling from the softmax of
``logits / temperature``, restricted to the ``top_k`` most likely tokens and/or the smallest set whose
probability reaches ``top_p`` (nucleus), with a ``torch.Generator`` seeded by ``seed`` (same seed, same
output).

Every step conditions on the last ``config.max_seq_len`` tokens (a sliding window), with or without
the cache:

* ``use_cache=False`` (and models without ``supports_kv_cache``, e.g. BlockHierarchicalLM, LFormer):
  each step recomputes the whole window with ``model(window)``.
* ``use_cache=True`` (the default where supported): the prompt's window is fed once
  (``model.forward_step(window, cache)``), then one token per step. When the context is full and
  the window must slide, positions shift and every cached key/value is stale, so the cache is
  **rebuilt** from the new window (``cache_rebuild_keep=None``: from the last ``max_seq_len``
  tokens at every step, identical to the recompute path; an int k: from the last k tokens, then
  incremental again until the context is full, cheaper but conditioning on fewer tokens).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from hilt.nn.attention import KVCache

__all__ = ["generate", "filter_logits", "supports_cache", "KVCache"]


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


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: Union[Tensor, Sequence[int]], max_new_tokens: int,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             seed: Optional[int] = None, use_cache: Optional[bool] = None,
             cache_rebuild_keep: Optional[int] = None) -> Tensor:
    """Continue ``prompt_ids`` (``(T,)`` or ``(B, T)``, or a list of ints) by ``max_new_tokens`` tokens.

    Returns the prompt followed by the new tokens, with the prompt's shape convention (1-D in, 1-D out).
    The model runs in eval mode (restored afterwards) on the last ``config.max_seq_len`` tokens each step.
    ``use_cache``: None = the KV cache when the model supports one; True demands it (ValueError
    otherwise); False recomputes every step. ``cache_rebuild_keep``: see the module docstring.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = next(model.parameters()).device
    ids = prompt_ids if isinstance(prompt_ids, Tensor) else torch.tensor(list(prompt_ids), dtype=torch.long)
    squeeze = ids.dim() == 1
    if squeeze:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"prompt_ids must be (T,) or (B, T), got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("prompt_ids must hold at least one token")
    ids = ids.to(device=device, dtype=torch.long)
    max_len = model.config.max_seq_len
    if use_cache is None:
        use_cache = supports_cache(model)
    elif use_cache and not supports_cache(model):
        raise ValueError(f"use_cache=True: {type(model).__name__} has no KV-cache decoding path")
    keep = max_len if cache_rebuild_keep is None else int(cache_rebuild_keep)
    if not 1 <= keep <= max_len:
        raise ValueError(f"cache_rebuild_keep must be in [1, max_seq_len={max_len}], got {cache_rebuild_keep}")
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed if seed is not None else torch.initial_seed() % 2**63)
    was_training = model.training
    model.eval()
    try:
        cache = model.init_cache(ids.shape[0]) if use_cache and max_new_tokens > 0 else None
        for step in range(max_new_tokens):
            if cache is None:
                logits = model(ids[:, -max_len:]).logits[:, -1, :].float()
            elif step == 0 or cache.length >= max_len:  # (re)build: feed the window from position 0
                window = ids[:, -(max_len if step == 0 else keep):]
                logits = model.forward_step(window, cache.reset()).logits[:, -1, :].float()
            else:
                logits = model.forward_step(ids[:, -1:], cache).logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
    finally:
        model.train(was_training)
    return ids[0] if squeeze else ids
