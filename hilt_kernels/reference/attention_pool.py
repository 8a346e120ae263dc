"""Reference backend of attention_pool: vectorized PyTorch over (batch, block, head).

Scores are padded to a multiple of the block size and viewed as (B, nb, b, H); the per-block
softmax is ``exp(s − logsumexp(s))`` with masked entries at −inf, and a fully padded block has
log-sum-exp +inf, so its weights, output and gradients are exactly 0. Computed in fp32 (fp64 when
either input is fp64).
"""

from __future__ import annotations

import math

import torch

from ._common import compute_dtype, pad_dim

__all__ = ["forward", "backward"]


def _weights(scores, block_size, key_padding_mask, cd):
    """(B, nb, b, H) softmax weights of each block (0 for padding and for fully padded blocks)."""
    B, T, H = scores.shape
    nb = -(-T // block_size)
    s = pad_dim(scores.to(cd), 1, nb * block_size, value=-math.inf).view(B, nb, block_size, H)
    if key_padding_mask is not None:
        pad = pad_dim(key_padding_mask, 1, nb * block_size, value=True).view(B, nb, block_size, 1)
        s = s.masked_fill(pad, -math.inf)
    lse = torch.logsumexp(s, dim=2, keepdim=True)
    lse = lse.masked_fill(lse == -math.inf, math.inf)
    return torch.exp(s - lse)


def _value_blocks(values, block_size, nb, cd):
    x = pad_dim(values.to(cd), 1, nb * block_size)
    return x.view(x.shape[0], nb, block_size, *x.shape[2:])


def forward(scores, values, block_size: int, key_padding_mask):
    """Returns out (B, nb, H, D) in values.dtype; see BACKENDS.md."""
    cd = compute_dtype(scores.dtype, values.dtype)
    w = _weights(scores, block_size, key_padding_mask, cd)
    vb = _value_blocks(values, block_size, w.shape[1], cd)
    if values.dim() == 4:  # per-head values (B, nb, b, H, D)
        out = (w[..., None] * vb).sum(2)
    else:  # shared values (B, nb, b, D): a batched (H × b) @ (b × D) matmul
        out = torch.matmul(w.transpose(-1, -2), vb)
    return out.to(values.dtype).contiguous()


def backward(dout, scores, values, out, block_size: int, key_padding_mask):
    """Returns (dscores, dvalues) in the inputs' shapes and dtypes; see BACKENDS.md."""
    B, T, H = scores.shape
    cd = compute_dtype(scores.dtype, values.dtype)
    w = _weights(scores, block_size, key_padding_mask, cd)  # (B, nb, b, H)
    nb = w.shape[1]
    vb = _value_blocks(values, block_size, nb, cd)
    g = dout.to(cd)  # (B, nb, H, D)
    if values.dim() == 4:
        dvalues = w[..., None] * g[:, :, None]  # (B, nb, b, H, D)
        dot = (g[:, :, None] * vb).sum(-1)  # (B, nb, b, H): dout_h · v_t,h
    else:
        dvalues = torch.matmul(w, g)  # (B, nb, b, D): Σ_h w_t,h dout_h
        dot = torch.matmul(vb, g.transpose(-1, -2))  # (B, nb, b, H)
    gout = (g * out.to(cd)).sum(-1)  # (B, nb, H)
    dscores = w * (dot - gout[:, :, None, :])
    dscores = dscores.reshape(B, nb * block_size, H)[:, :T].to(scores.dtype).contiguous()
    dvalues = dvalues.reshape(B, nb * block_size, *values.shape[2:])[:, :T].to(values.dtype).contiguous()
    return dscores, dvalues
