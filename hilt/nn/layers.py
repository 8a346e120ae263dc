"""Pre-LN transformer layer with pluggable attention, and its MLP."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from .attention import BlockLocalAttention, CausalSelfAttention, Window2Attention, _check_dropout

__all__ = ["MLP", "TransformerLayer", "ATTENTION_KINDS"]

ATTENTION_KINDS = ("causal", "full", "block", "window2")


class MLP(nn.Module):
    """Linear(d, d_ff) -> GELU -> Linear(d_ff, d) -> dropout."""

    def __init__(self, d_model: int, d_ff: Optional[int] = None, dropout: float = 0.0,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_ff = int(d_ff) if d_ff is not None else 4 * d_model
        if self.d_ff < 1:
            raise ValueError(f"d_ff must be >= 1, got {self.d_ff}")
        self.fc1 = nn.Linear(d_model, self.d_ff, bias=bias, **factory)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(self.d_ff, d_model, bias=bias, **factory)
        self.dropout = nn.Dropout(_check_dropout(dropout))

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}"


class TransformerLayer(nn.Module):
    """Pre-LN transformer layer: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    ``attention`` picks the token mixer:
      - ``"causal"``: full causal attention (:class:`CausalSelfAttention`); ``causal`` must be True;
      - ``"full"``: full attention, causal per ``causal``;
      - ``"block"``: :class:`BlockLocalAttention` with ``block_size``, causal per ``causal``;
      - ``"window2"``: :class:`Window2Attention` over (B, 2, T, C) inputs (ILT layers);
      - an ``nn.Module`` instance taking ``(x, key_padding_mask=None)``, used as is.
    Attributes ``norm1``, ``attn``, ``norm2``, ``mlp``. ``rope`` applies RoPE inside
    "causal"/"full"/"block" attention.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: Optional[int] = None, dropout: float = 0.0,
                 attention: Union[str, nn.Module] = "causal", block_size: Optional[int] = None,
                 causal: bool = True, bias: bool = True, rope: bool = False,
                 rope_base: float = 10000.0, layer_norm_eps: float = 1e-5,
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.n_heads = n_heads
        self.causal = causal
        if isinstance(attention, nn.Module):
            self.attention_kind = "custom"
            attn = attention
        elif attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS} or an nn.Module, got {attention!r}")
        else:
            self.attention_kind = attention
            if attention == "causal" and not causal:
                raise ValueError('attention="causal" with causal=False: use attention="full"')
            if attention in ("causal", "full"):
                attn = CausalSelfAttention(d_model, n_heads, dropout=dropout, bias=bias, causal=causal,
                                           rope=rope, rope_base=rope_base, **factory)
            elif attention == "block":
                if block_size is None:
                    raise ValueError('attention="block" needs block_size')
                attn = BlockLocalAttention(d_model, n_heads, block_size, causal=causal, dropout=dropout,
                                           bias=bias, rope=rope, rope_base=rope_base, backend=backend,
                                           **factory)
            else:
                if rope:
                    raise ValueError('rope is not supported with attention="window2"')
                attn = Window2Attention(d_model, n_heads, causal=causal, dropout=dropout, bias=bias,
                                        backend=backend, **factory)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.attn = attn
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.mlp = MLP(d_model, d_ff, dropout=dropout, bias=bias, **factory)

    def reset_parameters(self) -> None:
        self.norm1.reset_parameters()
        self.norm2.reset_parameters()
        if hasattr(self.attn, "reset_parameters"):
            self.attn.reset_parameters()
        self.mlp.reset_parameters()

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        h = self.norm1(x)
        a = self.attn(h) if key_padding_mask is None else self.attn(h, key_padding_mask=key_padding_mask)
        x = x + a
        return x + self.mlp(self.norm2(x))

    def forward_cached(self, x: Tensor, k_cache, v_cache, pos: int, ragged=None) -> Tensor:
        """:meth:`forward` for new tokens at positions ``pos ..`` with a KV cache (causal attention
        only; see :meth:`CausalSelfAttention.forward_cached`, also for ``ragged``)."""
        if not isinstance(self.attn, CausalSelfAttention):
            raise RuntimeError(f"a KV cache needs causal attention, this layer has {self.attention_kind!r}")
        x = x + self.attn.forward_cached(self.norm1(x), k_cache, v_cache, pos, ragged)
        return x + self.mlp(self.norm2(x))

    def forward_offset(self, x: Tensor, offset: int = 0) -> Tensor:
        """:meth:`forward` without padding or dropout for block-local attention whose first token is at
        absolute position ``offset`` (RoPE); any other attention ignores ``offset``."""
        h = self.norm1(x)
        a = self.attn.forward_offset(h, offset) if isinstance(self.attn, BlockLocalAttention) else self.attn(h)
        x = x + a
        return x + self.mlp(self.norm2(x))

    def forward_block_cached(self, x: Tensor, k_cache, v_cache, slot: int, offset: int) -> Tensor:
        """:meth:`forward` for new tokens of the current block with a block KV cache (block-local causal
        attention only; see :meth:`BlockLocalAttention.forward_cached`)."""
        if not isinstance(self.attn, BlockLocalAttention):
            raise RuntimeError(f"a block cache needs block-local attention, this layer has {self.attention_kind!r}")
        x = x + self.attn.forward_cached(self.norm1(x), k_cache, v_cache, slot, offset)
        return x + self.mlp(self.norm2(x))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, attention={self.attention_kind!r}"
