"""Tiny models for the NPT tests."""
from __future__ import annotations

import torch

from hilt.models import Llama, LlamaConfig

TINY = dict(d_model=32, n_heads=2, n_layers=4, max_seq_len=32, dropout=0.0, d_ff=48)


def tiny_llama(seed: int = 0, **kw) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**{**TINY, **kw})).eval()


def rand_ids(B: int = 2, T: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g)


def randomize_np(model, std: float = 0.05, seed: int = 3) -> None:
    """Non-zero v_b generators (a trained-looking NP layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".np." in f".{name}":
                p.copy_(torch.randn(p.shape, generator=g) * std)
