"""window2_attention: attention over the length-2 window (previous layer, current layer) of each token."""

from __future__ import annotations

import torch

from .. import _validate as check
from .._library import register_family
from ..dispatch import choose_backend

__all__ = ["window2_attention"]


def _fwd_fake(q, k, v, causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _bwd_fake(dout, q, k, v, causal, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.args = (causal, scale)


def _make_backward(bwd_op):
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = bwd_op(dout, q, k, v, *ctx.args)
        return dq, dk, dv, None, None

    return backward


_FORWARD = register_family(
    "w2a",
    "window2_attention",
    "(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> Tensor",
    "(Tensor dout, Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor, Tensor)",
    _fwd_fake,
    _bwd_fake,
    _setup_context,
    _make_backward,
)


def window2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention across a window of two layer states of every token (the HILT inter-layer window).

    For every batch element, token and head independently, the two window elements attend to each
    other; tokens never mix. Index 0 on dim 1 is the previous layer's state, index 1 the current
    layer's. "Causal" is over the layer axis: element 0 attends to itself only (its output is
    ``v[:, 0]``), element 1 attends to both. Non-causal: both see both.

    Args:
        q, k, v: ``(B, 2, T, H, D)``, one dtype; usually strided views of one projection — they are
            read through their strides, no copies.
        causal: see above.
        scale: score scale, default ``D ** -0.5``.
        backend: ``None`` (automatic), ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(B, 2, T, H, D)`` contiguous, in the inputs' dtype (fp32 math for 16-bit inputs).

    Example:
        >>> qkv = torch.randn(4, 2, 50, 3, 2, 16)                # (B, 2, T, 3, H, D)
        >>> out = window2_attention(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2])
    """
    shape = "(B, 2, T, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(name, t, shape, (5,))
        if t.shape[1] != 2:
            raise ValueError(f"{name} must have shape {shape} with a window of 2 on dim 1, got {tuple(t.shape)}")
    check.same_shape(("q", "k", "v"), (q, k, v))
    check.same_dtype(("q", "k", "v"), (q, k, v))
    check.same_device(("q", "k", "v"), (q, k, v))
    check.flag("causal", causal)
    if q.shape[-1] == 0:
        raise ValueError(f"q must have a head dim D >= 1, got shape {tuple(q.shape)}")
    scale = check.scale(scale, q.shape[-1])
    args = (q, k, v, causal, scale)
    name = choose_backend("window2_attention", backend, (q, k, v), args)
    return _FORWARD[name](*args)
