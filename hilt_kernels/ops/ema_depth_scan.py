"""ema_depth_scan: an exponential moving average across depth (the L-Former side path)."""

from __future__ import annotations

import torch

from .. import _validate as check
from .._library import register_family
from ..dispatch import choose_backend
from ..reference._common import compute_dtype

__all__ = ["ema_depth_scan"]


def _fwd_fake(values, alpha_logits, init, return_all):
    shape = values.shape if return_all else values.shape[1:]
    return values.new_empty(shape)


def _bwd_fake(grad, values, alpha_logits, init, states, return_all):
    acc = compute_dtype(values.dtype, alpha_logits.dtype)
    dinit = values.new_empty(values.shape[1:] if init is not None else (0,), dtype=acc)
    return (
        torch.empty_like(values, memory_format=torch.contiguous_format),
        alpha_logits.new_empty(alpha_logits.shape, dtype=acc),
        dinit,
    )


def _setup_context(ctx, inputs, output):
    values, alpha_logits, init, return_all = inputs
    states = output if return_all else None
    ctx.save_for_backward(values, alpha_logits, init, states)
    ctx.return_all = return_all


def _make_backward(bwd_op):
    def backward(ctx, grad):
        values, alpha_logits, init, states = ctx.saved_tensors
        dvalues, dalpha, dinit = bwd_op(grad, values, alpha_logits, init, states, ctx.return_all)
        if init is not None:  # the backend returns dinit in the state's shape, fp32: reduce, then cast
            dinit = dinit.sum_to_size(init.shape).to(init.dtype)
        return dvalues, dalpha.to(alpha_logits.dtype), (dinit if init is not None else None), None

    return backward


_FORWARD = register_family(
    "ema",
    "ema_depth_scan",
    "(Tensor values, Tensor alpha_logits, Tensor? init, bool return_all) -> Tensor",
    "(Tensor grad, Tensor values, Tensor alpha_logits, Tensor? init, Tensor? states, bool return_all)"
    " -> (Tensor, Tensor, Tensor)",
    _fwd_fake,
    _bwd_fake,
    _setup_context,
    _make_backward,
)


def ema_depth_scan(
    values: torch.Tensor,
    alpha_logits: torch.Tensor,
    *,
    init: torch.Tensor | None = None,
    return_all: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Exponential moving average over depth: ``S^l = (1 − α_l) · S^{l−1} + α_l · values_l``.

    ``α_l = sigmoid(alpha_logits_l)``, ``S^0 = init`` (zeros by default). The state is carried in fp32.
    The backward never divides by ``1 − α`` and never uses a cumulative-product closed form, so it
    stays finite when the sigmoid saturates.

    Args:
        values: ``(L, *S)`` — φ(z^l) for L taps (e.g. ``(L, B, T, C)``).
        alpha_logits: ``(L,)`` one gate per step, or ``(L, C)`` per channel with ``C = values.shape[-1]``.
            Its dtype may differ from the values' (autocast); the output takes the values' dtype and
            the gradient the alpha_logits' dtype.
        init: optional initial state, broadcastable to ``S``, in the values' dtype.
        return_all: return all states ``(L, *S)`` (default) or only the last ``(*S)``; with ``False``
            the backward recomputes the states instead of keeping them.
        backend: ``None`` (automatic), ``"reference"``, ``"triton"`` or ``"cuda"``.

    Example:
        >>> phi = torch.randn(6, 2, 10, 32)                     # L=6 taps of (B, T, d_side)
        >>> alpha = torch.full((6,), -2.0)                      # sigmoid(-2) ≈ 0.12
        >>> states = ema_depth_scan(phi, alpha)                 # (6, 2, 10, 32)
    """
    check.tensor("values", values, "(L, *S)", tuple(range(1, 16)))
    check.tensor("alpha_logits", alpha_logits, "(L,) or (L, C)", (1, 2))
    check.same_device(("values", "alpha_logits"), (values, alpha_logits))
    check.flag("return_all", return_all)
    L, S = values.shape[0], values.shape[1:]
    if alpha_logits.shape[0] != L:
        raise ValueError(f"alpha_logits must have L = values.shape[0] = {L} rows, got shape {tuple(alpha_logits.shape)}")
    if alpha_logits.dim() == 2:
        if len(S) == 0 or alpha_logits.shape[1] != S[-1]:
            C = S[-1] if len(S) else "(none: values is 1-d)"
            raise ValueError(f"alpha_logits of shape (L, C) needs C = values.shape[-1] = {C}, got {tuple(alpha_logits.shape)}")
    if init is not None:
        check.tensor("init", init, f"broadcastable to S = {tuple(S)}", tuple(range(0, 16)))
        check.same_dtype(("values", "init"), (values, init))
        check.same_device(("values", "init"), (values, init))
        try:
            expanded = torch.broadcast_shapes(init.shape, S)
        except RuntimeError:
            expanded = None
        if expanded != S:
            raise ValueError(f"init must be broadcastable to S = values.shape[1:] = {tuple(S)}, got {tuple(init.shape)}")
    if L == 0:  # nothing to scan: the states are empty, the last state is init
        if return_all:
            return values.clone(memory_format=torch.contiguous_format)  # empty, connected to the graph
        raise ValueError("values must have L >= 1 steps when return_all=False (there is no last state)")
    args = (values, alpha_logits, init, return_all)
    tensors = (values, alpha_logits) if init is None else (values, alpha_logits, init)
    name = choose_backend("ema_depth_scan", backend, tensors, args)
    return _FORWARD[name](*args)
