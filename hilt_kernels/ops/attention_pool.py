"""attention_pool: softmax-weighted pooling of each block of tokens (public op)."""

from __future__ import annotations

import torch

from .. import _validate as check
from .._library import register_family
from ..dispatch import choose_backend

__all__ = ["attention_pool"]


def _out_shape(scores, values, block_size):
    B, T, H = scores.shape
    return (B, -(-T // block_size), H, values.shape[-1])


def _fwd_fake(scores, values, block_size, key_padding_mask):
    return values.new_empty(_out_shape(scores, values, block_size))


def _bwd_fake(dout, scores, values, out, block_size, key_padding_mask):
    return (
        torch.empty_like(scores, memory_format=torch.contiguous_format),
        torch.empty_like(values, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    scores, values, block_size, key_padding_mask = inputs
    ctx.save_for_backward(scores, values, output, key_padding_mask)
    ctx.block_size = block_size


def _make_backward(bwd_op):
    def backward(ctx, dout):
        scores, values, out, key_padding_mask = ctx.saved_tensors
        dscores, dvalues = bwd_op(dout, scores, values, out, ctx.block_size, key_padding_mask)
        return dscores, dvalues, None, None

    return backward


_FORWARD = register_family(
    "apool",
    "attention_pool",
    "(Tensor scores, Tensor values, int block_size, Tensor? key_padding_mask) -> Tensor",
    "(Tensor dout, Tensor scores, Tensor values, Tensor out, int block_size, Tensor? key_padding_mask)"
    " -> (Tensor, Tensor)",
    _fwd_fake,
    _bwd_fake,
    _setup_context,
    _make_backward,
)


def attention_pool(
    scores: torch.Tensor,
    values: torch.Tensor,
    block_size: int,
    *,
    key_padding_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Pool each block of ``block_size`` tokens into one vector per head with a softmax over the block.

    ``out[b, n, h] = Σ_{t ∈ block n} softmax_t(scores[b, t, h]) · values[b, t, (h)]``, the softmax taken
    over the block's non-padding tokens. This is attention pooling with a learned constant query in
    "score-first" form: a module computes ``scores = x @ U`` and pools ``x`` itself before its value
    projection (see ``hilt.nn.AttentionPooling``).

    Args:
        scores: ``(B, T, H)`` logits, already scaled.
        values: ``(B, T, H, D)`` per head, or ``(B, T, D)`` shared by all heads. Its dtype may differ
            from the scores' (autocast does that); the output takes the values' dtype.
        block_size: tokens per block, ``>= 1``; the last block may be shorter.
        key_padding_mask: optional ``(B, T)`` bool, **True = padding** (ignored). A fully padded block
            outputs zeros and passes zero gradients.
        backend: ``None`` (automatic), ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(B, ceil(T / block_size), H, D)`` contiguous, in the values' dtype (fp32 accumulation).

    Example:
        >>> x = torch.randn(2, 100, 64)                         # (B, T, C)
        >>> scores = x @ torch.randn(64, 4)                     # (B, T, H=4)
        >>> pooled = attention_pool(scores, x, block_size=8)    # (2, 13, 4, 64)
    """
    check.tensor("scores", scores, "(B, T, H)", (3,))
    check.tensor("values", values, "(B, T, H, D) or (B, T, D)", (3, 4))
    check.same_device(("scores", "values"), (scores, values))
    B, T, H = scores.shape
    if values.shape[:2] != scores.shape[:2] or (values.dim() == 4 and values.shape[2] != H):
        expected = f"(B, T, H, D) = ({B}, {T}, {H}, D) or (B, T, D) = ({B}, {T}, D)"
        raise ValueError(f"values must have shape {expected} to match scores, got {tuple(values.shape)}")
    if values.shape[-1] == 0:
        raise ValueError(f"values must have a feature dim D >= 1, got shape {tuple(values.shape)}")
    check.positive_int("block_size", block_size)
    key_padding_mask = check.key_padding_mask(key_padding_mask, B, T, scores.device)
    args = (scores, values, block_size, key_padding_mask)
    name = choose_backend("attention_pool", backend, (scores, values), args)
    return _FORWARD[name](*args)
