"""block_local_attention: attention restricted to fixed-size blocks of tokens (public op)."""

from __future__ import annotations

import torch

from .. import _validate as check
from .._library import register_family
from ..dispatch import choose_backend
from ..reference._common import compute_dtype

__all__ = ["block_local_attention"]


def _fwd_fake(q, k, v, block_size, causal, scale, key_padding_mask):
    B, T, H, D = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, T), dtype=compute_dtype(q.dtype))


def _bwd_fake(dout, q, k, v, out, lse, block_size, causal, scale, key_padding_mask):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, block_size, causal, scale, key_padding_mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.args = (block_size, causal, scale)
    ctx.mark_non_differentiable(lse)


def _make_backward(bwd_op):
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        block_size, causal, scale = ctx.args
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, block_size, causal, scale, key_padding_mask)
        return dq, dk, dv, None, None, None, None

    return backward


_FORWARD = register_family(
    "bla",
    "block_local_attention",
    "(Tensor q, Tensor k, Tensor v, int block_size, bool causal, float scale, Tensor? key_padding_mask)"
    " -> (Tensor, Tensor)",
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int block_size, bool causal,"
    " float scale, Tensor? key_padding_mask) -> (Tensor, Tensor, Tensor)",
    _fwd_fake,
    _bwd_fake,
    _setup_context,
    _make_backward,
)


def block_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention within fixed-size blocks of tokens.

    Token ``t`` attends to the tokens ``s`` of its own block (``s // block_size == t // block_size``),
    only those with ``s <= t`` when ``causal``. ``T`` need not be a multiple of ``block_size``: the last
    block is shorter. No ``T × T`` matrix is ever built.

    Args:
        q, k, v: ``(B, T, H, D)`` — the flash-attn layout, so the views of a fused QKV projection
            reshaped to ``(B, T, 3, H, D)`` can be passed without a transpose. One dtype for all three.
        block_size: tokens per block, ``>= 1``.
        causal: mask keys after the query inside its block.
        scale: score scale, default ``D ** -0.5``.
        key_padding_mask: optional ``(B, T)`` bool, **True = padding**: that key is ignored
            (``nn.MultiheadAttention`` convention). A query left with no valid key outputs zeros and
            gets zero gradients, never NaN.
        backend: ``None`` (automatic), ``"reference"``, ``"triton"`` or ``"cuda"`` (a demand: an
            unavailable backend raises an error listing why). See :mod:`hilt_kernels.dispatch`.

    Returns:
        ``(B, T, H, D)`` contiguous, in the inputs' dtype. fp16/bf16/fp32 are computed with fp32
        accumulation; fp64 (reference backend) in fp64. The forward keeps the fp32 log-sum-exp
        ``(B, H, T)`` for the backward.

    Example:
        >>> q, k, v = torch.randn(3, 2, 100, 4, 32).unbind(0)       # B=2, T=100, H=4, D=32
        >>> out = block_local_attention(q, k, v, block_size=16)     # (2, 100, 4, 32)
    """
    shape = "(B, T, H, D)"
    check.tensor("q", q, shape, (4,))
    check.tensor("k", k, shape, (4,))
    check.tensor("v", v, shape, (4,))
    check.same_shape(("q", "k", "v"), (q, k, v))
    check.same_dtype(("q", "k", "v"), (q, k, v))
    check.same_device(("q", "k", "v"), (q, k, v))
    check.positive_int("block_size", block_size)
    check.flag("causal", causal)
    B, T, H, D = q.shape
    if D == 0:
        raise ValueError(f"q must have a head dim D >= 1, got shape {tuple(q.shape)}")
    scale = check.scale(scale, D)
    key_padding_mask = check.key_padding_mask(key_padding_mask, B, T, q.device)
    args = (q, k, v, block_size, causal, scale, key_padding_mask)
    name = choose_backend("block_local_attention", backend, (q, k, v), args)
    out, _lse = _FORWARD[name](*args)
    return out
