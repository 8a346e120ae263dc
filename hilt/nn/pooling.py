"""Attention pooling of each block of tokens to one vector (score-first form)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hilt.functional import attention_pool

from .attention import _check_heads, _check_kpm

__all__ = ["AttentionPooling", "block_padding_mask"]


def block_padding_mask(key_padding_mask: Optional[Tensor], block_size: int) -> Optional[Tensor]:
    """(B, T) token padding mask (True = padding) -> (B, ceil(T / block_size)) mask that is
    True where every token of the block is padding. ``None`` passes through."""
    if key_padding_mask is None:
        return None
    B, T = key_padding_mask.shape
    nb = -(-T // block_size)
    pad = nb * block_size - T
    m = F.pad(key_padding_mask, (0, pad), value=True) if pad else key_padding_mask
    return m.view(B, nb, block_size).all(-1)


class AttentionPooling(nn.Module):
    """Multi-head attention pooling with a learned query per head, one output per block.

    (B, T, C) -> (B, ceil(T / block_size), C). Mathematically, per block n and head h:
    ``softmax_t(q_h · (W_k x_t + b_k)_h / sqrt(D)) · (W_v x_t + b_v)_h``, heads concatenated,
    then ``out_proj``. Computed in the score-first form: ``q_h · W_k,h x_t = x_t · (W_k,hᵀ q_h)``,
    so scores are ``x @ U`` with ``U`` (C, H) (the key bias is a per-head constant that cancels in
    the softmax, so the key projection has no bias), ``x`` itself is pooled with
    :func:`hilt.functional.attention_pool` (values shared by the heads), and only then does each
    head apply its rows of the value projection (the value bias passes through since the
    weights sum to 1): ``block_size``x fewer value-projection FLOPs.

    ``key_padding_mask`` (B, T) bool, True = padding: padded tokens get no weight; a fully padded
    block outputs zeros.
    """

    def __init__(self, d_model: int, n_heads: int, block_size: int, bias: bool = True,
                 query_init_std: float = 0.02, backend: Optional[str] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.head_dim = _check_heads(d_model, n_heads)
        if int(block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.block_size = int(block_size)
        self.bias = bias
        self.query_init_std = query_init_std
        self.backend = backend
        self.query = nn.Parameter(torch.empty(n_heads, self.head_dim, **factory))
        self.k_proj = nn.Linear(d_model, d_model, bias=False, **factory)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.query, std=self.query_init_std)
        self.k_proj.reset_parameters()
        self.v_proj.reset_parameters()
        self.out_proj.reset_parameters()

    def score_weights(self) -> Tensor:
        """U (C, H): scores = x @ U = (q_h · W_k,h x) / sqrt(D)."""
        wk = self.k_proj.weight.view(self.n_heads, self.head_dim, self.d_model)
        return torch.einsum("hdc,hd->ch", wk, self.query) * (self.head_dim ** -0.5)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        B, T, C = x.shape
        kpm = _check_kpm(key_padding_mask, B, T)
        scores = x @ self.score_weights().to(x.dtype)  # (B, T, H)
        pooled = attention_pool(scores, x, self.block_size, key_padding_mask=kpm,
                                backend=self.backend)  # (B, nb, H, C)
        wv = self.v_proj.weight.view(self.n_heads, self.head_dim, C)
        v = torch.einsum("bnhc,hdc->bnhd", pooled, wv)
        if self.v_proj.bias is not None:
            v = v + self.v_proj.bias.view(self.n_heads, self.head_dim)
        out = self.out_proj(v.reshape(B, pooled.shape[1], C))
        if kpm is not None:
            out = out.masked_fill(block_padding_mask(kpm, self.block_size).unsqueeze(-1), 0.0)
        return out

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, block_size={self.block_size}, "
                f"bias={self.bias}, backend={self.backend!r}")
