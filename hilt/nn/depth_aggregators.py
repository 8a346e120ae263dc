"""Depth aggregators: turn the stacked side-path inputs φ(z^1..z^L) into states S^1..S^L.

Every aggregator takes ``values`` of shape ``(L, *S, d_side)`` — token-wise ``(L, B, T, d_side)``
or sequence-wise ``(L, B, d_side)`` — and returns all states, same shape. State ``l`` depends on
``values[0..l]`` only (causal over depth), and the aggregators never mix positions of ``S``
(token-wise states stay causal over tokens). ``init`` is an optional initial state ``S^0``,
broadcastable to ``(*S, d_side)`` (zeros by default).

- :class:`EMADepthAggregator`: ``S^l = (1 − α_l) S^{l−1} + α_l φ_l`` with learned gates
  ``α = sigmoid(alpha_logits)`` (one per tap, or per tap and channel), through
  :func:`hilt.functional.ema_depth_scan`.
- :class:`GRUDepthAggregator`: a :class:`torch.nn.GRUCell` stepping over depth.
- :class:`AttentionDepthAggregator`: state ``l`` is a multi-head attention readout over
  ``φ_0..φ_l`` (causal attention along the depth axis), queried by ``φ_l``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hilt.functional import ema_depth_scan

from .attention import _check_dropout, _check_heads

__all__ = ["EMADepthAggregator", "GRUDepthAggregator", "AttentionDepthAggregator", "DEPTH_AGGREGATORS",
           "make_depth_aggregator"]

DEPTH_AGGREGATORS = ("ema", "gru", "attn")


def _check_values(values: Tensor, d_side: int, n_taps: Optional[int] = None, start: int = 0) -> None:
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a Tensor, got {type(values).__name__}")
    if values.dim() < 2:
        raise ValueError(f"values must be (L, ..., d_side) with at least 2 dims, got shape {tuple(values.shape)}")
    if values.shape[-1] != d_side:
        raise ValueError(f"values' last dim must be d_side={d_side}, got shape {tuple(values.shape)}")
    if n_taps is not None and start + values.shape[0] > n_taps:
        raise ValueError(f"values has L={values.shape[0]} taps (from start={start}) but the aggregator was "
                         f"built for n_taps={n_taps}")


def _check_init(init: Optional[Tensor], values: Tensor) -> Optional[Tensor]:
    if init is None:
        return None
    try:
        shape = torch.broadcast_shapes(init.shape, values.shape[1:])
    except RuntimeError:
        shape = None
    if shape != values.shape[1:]:
        raise ValueError(f"init must be broadcastable to values.shape[1:] = {tuple(values.shape[1:])}, "
                         f"got {tuple(init.shape)}")
    return init.to(values.dtype)


class EMADepthAggregator(nn.Module):
    """Exponential moving average over depth with learned gates.

    ``S^l = (1 − α_l) · S^{l−1} + α_l · values_l``, ``α = sigmoid(alpha_logits)``. ``alpha_logits``
    is ``(n_taps,)``, or ``(n_taps, d_side)`` with ``per_channel=True``, initialised so that every
    gate is exactly ``alpha_init`` (0.12 by default). ``backend`` is passed to
    :func:`hilt.functional.ema_depth_scan`.

    ``forward(values, init=None, start=0)``: values ``(L, ..., d_side)`` with ``start + L <= n_taps``
    (``start`` selects the gates ``start .. start + L − 1``, to scan the taps in chunks);
    returns all states ``(L, ..., d_side)``.
    """

    def __init__(self, d_side: int, n_taps: int, per_channel: bool = False, alpha_init: float = 0.12,
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        if int(d_side) < 1:
            raise ValueError(f"d_side must be >= 1, got {d_side}")
        if int(n_taps) < 1:
            raise ValueError(f"n_taps must be >= 1, got {n_taps}")
        if not 0.0 < float(alpha_init) < 1.0:
            raise ValueError(f"alpha_init must be in (0, 1), got {alpha_init}")
        self.d_side = int(d_side)
        self.n_taps = int(n_taps)
        self.per_channel = bool(per_channel)
        self.alpha_init = float(alpha_init)
        self.backend = backend
        shape = (self.n_taps, self.d_side) if self.per_channel else (self.n_taps,)
        self.alpha_logits = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        a = self.alpha_init
        with torch.no_grad():
            self.alpha_logits.fill_(math.log(a) - math.log1p(-a))  # sigmoid(logit(a)) = a

    def alphas(self) -> Tensor:
        """The gates ``sigmoid(alpha_logits)``: ``(n_taps,)`` or ``(n_taps, d_side)`` (differentiable)."""
        return torch.sigmoid(self.alpha_logits)

    def forward(self, values: Tensor, init: Optional[Tensor] = None, start: int = 0) -> Tensor:
        _check_values(values, self.d_side, self.n_taps, start)
        init = _check_init(init, values)
        logits = self.alpha_logits[start:start + values.shape[0]]
        return ema_depth_scan(values, logits, init=init, return_all=True, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"d_side={self.d_side}, n_taps={self.n_taps}, per_channel={self.per_channel}, "
                f"alpha_init={self.alpha_init}, backend={self.backend!r}")


class GRUDepthAggregator(nn.Module):
    """A :class:`torch.nn.GRUCell` (input and hidden size ``d_side``) stepping over depth:
    ``S^l = GRUCell(values_l, S^{l−1})``, ``S^0 = init`` (zeros by default).

    ``forward(values, init=None)``: values ``(L, ..., d_side)`` -> all states ``(L, ..., d_side)``.
    """

    def __init__(self, d_side: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if int(d_side) < 1:
            raise ValueError(f"d_side must be >= 1, got {d_side}")
        self.d_side = int(d_side)
        self.bias = bias
        self.cell = nn.GRUCell(self.d_side, self.d_side, bias=bias, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        self.cell.reset_parameters()

    def forward(self, values: Tensor, init: Optional[Tensor] = None) -> Tensor:
        _check_values(values, self.d_side)
        init = _check_init(init, values)
        L, shape = values.shape[0], values.shape[1:]
        x = values.reshape(L, -1, self.d_side)
        if init is None:
            h = x.new_zeros(x.shape[1:])
        else:
            h = init.expand(shape).reshape(-1, self.d_side)
        states = []
        for step in range(L):
            h = self.cell(x[step], h)
            states.append(h)
        return torch.stack(states).view(values.shape)

    def extra_repr(self) -> str:
        return f"d_side={self.d_side}, bias={self.bias}"


class AttentionDepthAggregator(nn.Module):
    """Multi-head attention over depth, causal: state ``l`` attends over ``values_0..values_l``.

    Per position (token or sequence, never mixed): ``x_l = LayerNorm(values_l + e_l)`` (``e_l`` a
    learned depth embedding when ``n_taps`` is given), ``q, k, v = W x``,
    ``S^l = init + out_proj(softmax(q_l k_{0..l}ᵀ / sqrt(D)) v_{0..l})``, heads concatenated.
    Like the EMA's states (convex combinations of the values), each state is a learned weighting
    of the taps so far.

    ``forward(values, init=None)``: values ``(L, ..., d_side)`` with ``L <= n_taps`` when ``n_taps``
    is set -> all states ``(L, ..., d_side)``.
    """

    def __init__(self, d_side: int, n_heads: int = 4, n_taps: Optional[int] = None, dropout: float = 0.0,
                 bias: bool = True, layer_norm_eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.head_dim = _check_heads(int(d_side), int(n_heads))
        if n_taps is not None and int(n_taps) < 1:
            raise ValueError(f"n_taps must be >= 1 or None, got {n_taps}")
        self.d_side = int(d_side)
        self.n_heads = int(n_heads)
        self.n_taps = None if n_taps is None else int(n_taps)
        self.dropout = _check_dropout(dropout)
        self.bias = bias
        self.depth_emb = (nn.Parameter(torch.empty(self.n_taps, self.d_side, **factory))
                          if self.n_taps is not None else None)
        self.norm = nn.LayerNorm(self.d_side, eps=layer_norm_eps, bias=bias, **factory)
        self.qkv = nn.Linear(self.d_side, 3 * self.d_side, bias=bias, **factory)
        self.out_proj = nn.Linear(self.d_side, self.d_side, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.depth_emb is not None:
            nn.init.normal_(self.depth_emb, std=0.02)
        self.norm.reset_parameters()
        self.qkv.reset_parameters()
        self.out_proj.reset_parameters()

    def forward(self, values: Tensor, init: Optional[Tensor] = None) -> Tensor:
        _check_values(values, self.d_side, self.n_taps)
        init = _check_init(init, values)
        L = values.shape[0]
        x = values
        if self.depth_emb is not None:
            x = x + self.depth_emb[:L].view((L,) + (1,) * (values.dim() - 2) + (self.d_side,)).to(x.dtype)
        x = self.norm(x).reshape(L, -1, self.d_side).transpose(0, 1)  # (N, L, d)
        N = x.shape[0]
        qkv = self.qkv(x).view(N, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, N, H, L, D)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=p, is_causal=True)
        y = self.out_proj(y.transpose(1, 2).reshape(N, L, self.d_side))
        out = y.transpose(0, 1).reshape(values.shape)
        return out if init is None else out + init

    def extra_repr(self) -> str:
        return (f"d_side={self.d_side}, n_heads={self.n_heads}, n_taps={self.n_taps}, "
                f"dropout={self.dropout}, bias={self.bias}")


def make_depth_aggregator(kind: str, d_side: int, n_taps: int, *, n_heads: int = 4, per_channel: bool = False,
                          alpha_init: float = 0.12, dropout: float = 0.0, bias: bool = True,
                          backend: Optional[str] = None, device=None, dtype=None) -> nn.Module:
    """Build the aggregator named ``kind`` (``"ema" | "gru" | "attn"``)."""
    factory = {"device": device, "dtype": dtype}
    if kind == "ema":
        return EMADepthAggregator(d_side, n_taps, per_channel=per_channel, alpha_init=alpha_init,
                                  backend=backend, **factory)
    if kind == "gru":
        return GRUDepthAggregator(d_side, bias=bias, **factory)
    if kind == "attn":
        return AttentionDepthAggregator(d_side, n_heads=n_heads, n_taps=n_taps, dropout=dropout, bias=bias,
                                        **factory)
    raise ValueError(f"aggregator must be one of {DEPTH_AGGREGATORS}, got {kind!r}")
