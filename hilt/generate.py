"""Autoregressive generation (no KV cache yet: every step recomputes the last ``max_seq_len`` tokens).

``generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None)``:
``temperature=0`` is greedy; otherwise sampling from the softmax of ``logits / temperature``, restricted
to the ``top_k`` most likely tokens and/or the smallest set whose probability reaches ``top_p``
(nucleus), with a ``torch.Generator`` seeded by ``seed`` (same seed, same output).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["generate", "filter_logits"]


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


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: Union[Tensor, Sequence[int]], max_new_tokens: int,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             seed: Optional[int] = None) -> Tensor:
    """Continue ``prompt_ids`` (``(T,)`` or ``(B, T)``, or a list of ints) by ``max_new_tokens`` tokens.

    Returns the prompt followed by the new tokens, with the prompt's shape convention (1-D in, 1-D out).
    The model runs in eval mode (restored afterwards) on the last ``config.max_seq_len`` tokens each step.
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
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed if seed is not None else torch.initial_seed() % 2**63)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            window = ids[:, -max_len:]
            logits = model(window).logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
    finally:
        model.train(was_training)
    return ids[0] if squeeze else ids
