"""Inter-Layer Transformer (ILT): attention over the window (previous, current) layer state."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .attention import _check_dropout, _check_heads
from .layers import TransformerLayer

__all__ = ["InterLayerTransformer"]


class InterLayerTransformer(nn.Module):
    """ILT(prev, cur) -> modulation (B, T, d_model).

    ``proj_in`` (d_model -> ilt_dim) of both states, plus a learned embedding of the two window
    positions (``window_emb``; otherwise a non-causal ILT could not tell them apart), LayerNorm,
    ``n_layers`` pre-LN transformer layers over the length-2 window (``Window2Attention``, i.e.
    :func:`hilt.functional.window2_attention`, causal per ``causal``: the current state attends to
    the previous one and itself, the previous one to itself), dropout, mean over the window,
    ``proj_out`` (-> d_model). Tokens never mix. ``proj_out`` is initialised normally, not at zero:
    the caller's scale controls the modulation's magnitude.
    """

    def __init__(self, d_model: int, ilt_dim: int = 128, n_heads: int = 2, n_layers: int = 2,
                 dropout: float = 0.1, causal: bool = True, d_ff: Optional[int] = None,
                 bias: bool = True, layer_norm_eps: float = 1e-5, init_std: float = 0.02,
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        _check_heads(ilt_dim, n_heads)
        if n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {n_layers}")
        self.d_model = d_model
        self.ilt_dim = ilt_dim
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.dropout_p = _check_dropout(dropout)
        self.causal = causal
        self.init_std = init_std
        self.proj_in = nn.Linear(d_model, ilt_dim, bias=bias, **factory)
        self.window_emb = nn.Parameter(torch.empty(2, ilt_dim, **factory))
        self.norm = nn.LayerNorm(ilt_dim, eps=layer_norm_eps, bias=bias, **factory)
        self.layers = nn.ModuleList(
            TransformerLayer(ilt_dim, n_heads, d_ff=d_ff, dropout=dropout, attention="window2",
                             causal=causal, bias=bias, layer_norm_eps=layer_norm_eps,
                             backend=backend, **factory)
            for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(ilt_dim, d_model, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases, LayerNorms at identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=self.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        nn.init.normal_(self.window_emb, std=self.init_std)

    def forward(self, prev: Tensor, cur: Tensor) -> Tensor:
        if prev.shape != cur.shape or prev.dim() != 3:
            raise ValueError(f"prev and cur must both be (B, T, d_model), got {tuple(prev.shape)} "
                             f"and {tuple(cur.shape)}")
        x = torch.stack([self.proj_in(prev), self.proj_in(cur)], dim=1)  # (B, 2, T, I)
        x = x + self.window_emb.view(1, 2, 1, self.ilt_dim).to(x.dtype)
        x = self.norm(x)
        for layer in self.layers:
            x = layer(x)
        x = self.dropout(x)
        return self.proj_out(x.mean(dim=1))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, ilt_dim={self.ilt_dim}, n_heads={self.n_heads}, "
                f"n_layers={self.n_layers}, dropout={self.dropout_p}, causal={self.causal}")
