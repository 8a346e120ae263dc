"""Inter-Layer Transformer (ILT): attention over the window (previous, current) layer state."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
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

    def step(self, prev: Tensor, cur: Tensor, out: Optional[Tensor] = None, scale: Optional[Tensor] = None,
             fused: bool = True) -> Tensor:
        """:meth:`forward`'s math with few ops, for decoding (eval mode: no dropout).

        ``prev``, ``cur`` (B, T, d_model). Both states go through one ``proj_in`` (window on a trailing
        axis: (B·T, 2, ilt_dim)); each window layer is one call of PyTorch's fused pre-LN encoder-layer op
        (``torch._transformer_encoder_layer_fwd``, the kernel behind ``nn.TransformerEncoderLayer``'s
        inference fast path, with the 2×2 causal mask; under ``torch.no_grad`` only), or, with ``fused=False``,
        gradients enabled or layers without biases, a few functional ops (a softmax over two scores is a sigmoid of their difference). Returns the
        modulation (B, T, d_model), or, with ``out`` and ``scale``, ``out + scale · modulation`` in one op.
        """
        I = self.ilt_dim
        x = F.linear(torch.stack((prev, cur), dim=-2), self.proj_in.weight, self.proj_in.bias)
        x = F.layer_norm(x + self.window_emb.to(x.dtype), (I,), self.norm.weight, self.norm.bias, self.norm.eps)
        lead = x.shape[:-2]
        x = x.reshape(-1, 2, I)
        use_fused = (fused and not torch.is_grad_enabled() and self.proj_in.bias is not None
                     and hasattr(torch, "_transformer_encoder_layer_fwd"))
        for layer in self.layers:
            x = _window_layer_fused(layer, x) if use_fused else _window_layer(layer, x)
        mod = F.linear(x.mean(-2).view(*lead, I), self.proj_out.weight, self.proj_out.bias)
        if out is None:
            return mod
        return torch.addcmul(out, scale.to(out.dtype), mod)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, ilt_dim={self.ilt_dim}, n_heads={self.n_heads}, "
                f"n_layers={self.n_layers}, dropout={self.dropout_p}, causal={self.causal}")


_CAUSAL2 = {}


def _causal_mask(x: Tensor) -> Tensor:
    key = (x.device, x.dtype)
    if key not in _CAUSAL2:
        _CAUSAL2[key] = torch.tensor([[0.0, float("-inf")], [0.0, 0.0]], device=x.device, dtype=x.dtype)
    return _CAUSAL2[key]


def _window_layer_fused(layer: TransformerLayer, x: Tensor) -> Tensor:
    """One pre-LN window layer on x (N, 2, I) in one fused op (eval, GELU MLP, biases present)."""
    a, m = layer.attn, layer.mlp
    mask = _causal_mask(x) if a.causal else None
    return torch._transformer_encoder_layer_fwd(
        x, a.d_model, a.n_heads, a.qkv.weight, a.qkv.bias, a.out_proj.weight, a.out_proj.bias, True, True,
        layer.norm1.eps, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias,
        m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, mask, 0 if mask is not None else None)


def _window_layer(layer: TransformerLayer, x: Tensor) -> Tensor:
    """One pre-LN window layer on x (N, 2, I) in functional ops (eval)."""
    attn, mlp = layer.attn, layer.mlp
    I, H, D = x.shape[-1], attn.n_heads, attn.head_dim
    h = F.layer_norm(x, (I,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).view(-1, 2, 3, H, D)
    diff = qkv[:, 0] - qkv[:, 1]  # (N, 3, H, D): q0 - q1, k0 - k1, v0 - v1
    dk, dv, v1 = diff[:, 1], diff[:, 2], qkv[:, 1, 2]
    scale = D ** -0.5
    if attn.causal:  # row 0 sees itself: v0; row 1: v1 + sigmoid(s (q1 . (k0 - k1))) (v0 - v1)
        p1 = torch.sigmoid((qkv[:, 1, 0] * dk).sum(-1, keepdim=True) * scale)
        y = torch.stack((qkv[:, 0, 2], torch.addcmul(v1, p1, dv)), dim=1)
    else:
        p = torch.sigmoid((qkv[:, :, 0] * dk.unsqueeze(1)).sum(-1, keepdim=True) * scale)  # (N, 2, H, 1)
        y = torch.addcmul(v1.unsqueeze(1), p, dv.unsqueeze(1))
    x = x + F.linear(y.reshape(-1, 2, I), attn.out_proj.weight, attn.out_proj.bias)
    h = F.layer_norm(x, (I,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    return x + F.linear(F.gelu(F.linear(h, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
