"""Self-attention modules: full (SDPA), block-local and length-2 window attention."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hilt.functional import block_local_attention, window2_attention

from .positional import RotaryEmbedding

__all__ = ["CausalSelfAttention", "BlockLocalAttention", "Window2Attention", "KVCache", "RaggedStep"]


class KVCache:
    """Keys and values of every layer for incremental decoding (``GPT.init_cache`` builds one).

    ``k[i]``, ``v[i]``: (B, H, max_len, D) buffers of layer i; slots ``[0, length)`` are filled.
    ``length`` is the next slot to write; :meth:`reset` empties the cache (buffers are reused).

    Ragged batches (:meth:`set_left_padding`): row b's first ``pad[b]`` slots hold padding, so its token in
    slot s is at position ``s - pad[b]``; cached steps then apply each token's own position and never
    attend to a padding slot (:class:`RaggedStep`). Without padding, slot == position.
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, head_dim: int, max_len: int,
                 device=None, dtype=None) -> None:
        if min(n_layers, batch_size, n_heads, head_dim, max_len) < 1:
            raise ValueError("KVCache sizes must all be >= 1, got "
                             f"{(n_layers, batch_size, n_heads, head_dim, max_len)}")
        shape = (batch_size, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        self.pad: Optional[Tensor] = None

    @classmethod
    def for_model(cls, n_layers: int, batch_size: int, n_heads: int, head_dim: int, max_len: Optional[int],
                  max_seq_len: int, like: Tensor, device=None, dtype=None) -> "KVCache":
        """A model's empty cache: ``max_len`` tokens (default and maximum: the model's ``max_seq_len``; a
        ValueError otherwise), on ``device`` / ``dtype`` (default: those of the parameter ``like``)."""
        max_len = max_seq_len if max_len is None else int(max_len)
        if not 1 <= max_len <= max_seq_len:
            raise ValueError(f"max_len must be in [1, max_seq_len={max_seq_len}], got {max_len}")
        return cls(n_layers, batch_size, n_heads, head_dim, max_len, device=device or like.device,
                   dtype=dtype or like.dtype)

    def reset(self) -> "KVCache":
        """Empty the cache (and drop any left padding)."""
        self.length = 0
        self.pad = None
        return self

    def set_left_padding(self, pad: Optional[Tensor]) -> "KVCache":
        """Row b's first ``pad[b]`` slots are padding (``pad``: (B,) integers >= 0; None: no padding). Set it
        on an empty cache, then fill it with left-padded rows (``forward_step`` of (B, T) ids whose row b
        starts with ``pad[b]`` padding tokens, ``pad[b] < T``)."""
        if pad is not None:
            pad = torch.as_tensor(pad, dtype=torch.long, device=self.k[0].device)
            if pad.shape != (self.batch_size,) or (pad.numel() and int(pad.min()) < 0):
                raise ValueError(f"pad must hold {self.batch_size} integers >= 0 (one per row), got "
                                 f"{pad.tolist() if pad.dim() <= 1 else tuple(pad.shape)}")
            if self.length:
                raise ValueError("set_left_padding needs an empty cache (call reset() first)")
        self.pad = pad
        return self

    def ragged_step(self, pos: int, T: int) -> Optional["RaggedStep"]:
        """The :class:`RaggedStep` of T new tokens in slots ``pos ..`` (None without padding)."""
        return None if self.pad is None else RaggedStep.make(self.pad, pos, T)

    def __repr__(self) -> str:
        B, H, L, D = self.k[0].shape
        return f"KVCache(layers={len(self.k)}, batch={B}, heads={H}, head_dim={D}, length={self.length}/{L})"


class RaggedStep:
    """Positions and attention mask of a cached step over left-padded rows (:meth:`KVCache.set_left_padding`).

    ``positions`` (B, T): each new token's own position, ``slot - pad[b]`` (0 for padding tokens);
    ``mask`` (B, 1, T, end): the slots each new token attends to: causal, and never a padding slot for a
    real token (a padding token attends to the padding before it, so its values stay finite; nothing
    real ever reads them).
    """

    __slots__ = ("positions", "mask")

    def __init__(self, positions: Tensor, mask: Tensor) -> None:
        self.positions, self.mask = positions, mask

    @classmethod
    def make(cls, pad: Tensor, pos: int, T: int) -> "RaggedStep":
        slots = torch.arange(pos, pos + T, device=pad.device)
        keys = torch.arange(pos + T, device=pad.device)
        positions = (slots[None, :] - pad[:, None]).clamp_min(0)                       # (B, T)
        causal = keys[None, :] <= slots[:, None]                                          # (T, end)
        real_key = keys[None, None, :] >= pad[:, None, None]                              # (B, 1, end)
        pad_query = slots[None, :, None] < pad[:, None, None]                             # (B, T, 1)
        return cls(positions, (causal[None] & (real_key | pad_query))[:, None])          # (B, 1, T, end)


def _check_heads(d_model: int, n_heads: int) -> int:
    if d_model < 1 or n_heads < 1:
        raise ValueError(f"d_model and n_heads must be >= 1, got d_model={d_model}, n_heads={n_heads}")
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    return d_model // n_heads


def _check_dropout(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    return float(p)


def _check_kpm(key_padding_mask: Optional[Tensor], B: int, T: int) -> Optional[Tensor]:
    if key_padding_mask is None:
        return None
    if key_padding_mask.shape != (B, T):
        raise ValueError(f"key_padding_mask must have shape {(B, T)}, got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be torch.bool (True = padding), got {key_padding_mask.dtype}")
    return key_padding_mask


class _QKVAttention(nn.Module):
    """Shared parts: fused qkv Linear (d -> 3d, rows ordered q|k|v, head-major inside each,
    the same layout as nn.MultiheadAttention's in_proj), out projection, optional RoPE."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, bias: bool, rope: bool,
                 rope_base: float, factory: dict) -> None:
        super().__init__()
        self.head_dim = _check_heads(d_model, n_heads)
        self.d_model = d_model
        self.n_heads = n_heads
        self.dropout = _check_dropout(dropout)
        self.bias = bias
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias, **factory)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.resid_dropout = nn.Dropout(dropout)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base, device=factory.get("device")) if rope else None

    def reset_parameters(self) -> None:
        self.qkv.reset_parameters()
        self.out_proj.reset_parameters()

    def _qkv(self, x: Tensor, offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, C) -> q, k, v as (B, T, H, D) strided views of one projection (no copies).
        ``offset``: the absolute position of x's first token (RoPE)."""
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        return q, k, v


class CausalSelfAttention(_QKVAttention):
    """Full multi-head self-attention through ``F.scaled_dot_product_attention``.

    (B, T, C) -> (B, T, C). ``causal=False`` gives bidirectional attention.
    ``key_padding_mask``: (B, T) bool, True = padding (ignored as a key). A query with no
    valid key outputs zeros (before the out projection). ``dropout`` applies to the attention
    probabilities (training only) and to the output. Optional RoPE on q and k.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True,
                 causal: bool = True, rope: bool = False, rope_base: float = 10000.0,
                 device=None, dtype=None) -> None:
        super().__init__(d_model, n_heads, dropout, bias, rope, rope_base,
                         {"device": device, "dtype": dtype})
        self.causal = causal

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        B, T, C = x.shape
        kpm = _check_kpm(key_padding_mask, B, T)
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x))  # (B, H, T, D)
        p = self.dropout if self.training else 0.0
        if kpm is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        else:
            allowed = ~kpm[:, None, None, :]  # (B, 1, 1, T)
            if self.causal:
                allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            else:
                allowed = allowed.expand(B, 1, T, T)
            has_key = allowed.any(-1, keepdim=True)  # (B, 1, T, 1)
            # rows without any valid key would be NaN: let them attend everywhere, then zero them
            safe = allowed | ~has_key
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, dropout_p=p)
            y = y * has_key.to(y.dtype)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.out_proj(y))

    def forward_cached(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int,
                       ragged: Optional[RaggedStep] = None) -> Tensor:
        """Incremental causal attention for tokens at positions ``pos .. pos+T-1``: their keys and
        values are written into ``k_cache``/``v_cache`` (B, H, max_len, D) at ``[pos, pos+T)``, and
        each query attends to the cached positions ``<=`` its own. No dropout (decoding). ``ragged``
        (left-padded rows, :meth:`KVCache.ragged_step`): ``pos`` counts slots, each token has its row's own
        position (RoPE) and no real token attends to a padding slot."""
        if not self.causal:
            raise RuntimeError("forward_cached needs causal attention")
        B, T, C = x.shape
        end = pos + T
        if end > k_cache.shape[2]:
            raise ValueError(f"KV cache overflow: positions up to {end} > cache length {k_cache.shape[2]}")
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x, offset=pos if ragged is None else ragged.positions))
        k_cache[:, :, pos:end] = k
        v_cache[:, :, pos:end] = v
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
        if ragged is not None:
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=ragged.mask)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, keys, values)
        else:  # query i (position pos+i) sees keys 0 .. pos+i
            mask = torch.arange(end, device=x.device) <= torch.arange(pos, end, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, "
                f"dropout={self.dropout}, bias={self.bias}, rope={self.rotary is not None}")


class BlockLocalAttention(_QKVAttention):
    """Multi-head attention restricted to non-overlapping blocks of ``block_size`` tokens.

    (B, T, C) -> (B, T, C). Token t attends to tokens s of its own block (s <= t if causal).
    The fused qkv projection's output is viewed as (B, T, 3, H, D) and q, k, v are passed to
    :func:`hilt.functional.block_local_attention` as strided views (no transposes).
    ``key_padding_mask`` (B, T) bool, True = padding. ``dropout`` applies to the output.
    """

    def __init__(self, d_model: int, n_heads: int, block_size: int, causal: bool = True,
                 dropout: float = 0.0, bias: bool = True, rope: bool = False,
                 rope_base: float = 10000.0, backend: Optional[str] = None,
                 device=None, dtype=None) -> None:
        super().__init__(d_model, n_heads, dropout, bias, rope, rope_base,
                         {"device": device, "dtype": dtype})
        if int(block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = int(block_size)
        self.causal = causal
        self.backend = backend

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        B, T, C = x.shape
        kpm = _check_kpm(key_padding_mask, B, T)
        q, k, v = self._qkv(x)
        y = block_local_attention(q, k, v, self.block_size, causal=self.causal,
                                  key_padding_mask=kpm, backend=self.backend)
        return self.resid_dropout(self.out_proj(y.reshape(B, T, C)))

    def forward_offset(self, x: Tensor, offset: int = 0) -> Tensor:
        """:meth:`forward` (no padding) for tokens whose first one sits at absolute position ``offset``
        (RoPE angles), ``x`` (B, T, C) starting on a block boundary."""
        B, T, C = x.shape
        q, k, v = self._qkv(x, offset=offset)
        y = block_local_attention(q, k, v, self.block_size, causal=self.causal, backend=self.backend)
        return self.out_proj(y.reshape(B, T, C))

    def forward_cached(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, slot: int, offset: int) -> Tensor:
        """Incremental causal attention inside the current block: ``x`` (B, T, C) are the tokens at
        slots ``slot .. slot+T-1`` of the block (``slot + T <= block_size``) and absolute positions
        ``offset ..`` (RoPE). Their keys/values go into ``k_cache``/``v_cache`` (B, H, block_size, D)
        at those slots; each query attends to the block's slots ``<=`` its own. No padding, no dropout."""
        if not self.causal:
            raise RuntimeError("forward_cached needs causal attention")
        B, T, C = x.shape
        end = slot + T
        if end > self.block_size or k_cache.shape[2] < end:
            raise ValueError(f"block cache overflow: slots up to {end} > block_size {self.block_size}")
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x, offset=offset))  # (B, H, T, D)
        k_cache[:, :, slot:end] = k
        v_cache[:, :, slot:end] = v
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
        if T == 1:
            y = F.scaled_dot_product_attention(q, keys, values)
        else:
            mask = torch.arange(end, device=x.device) <= torch.arange(slot, end, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, block_size={self.block_size}, "
                f"causal={self.causal}, dropout={self.dropout}, bias={self.bias}, "
                f"rope={self.rotary is not None}, backend={self.backend!r}")


class Window2Attention(nn.Module):
    """Attention over a length-2 window of layer states, independently per token.

    (B, 2, T, C) -> (B, 2, T, C); index 0 on dim 1 = previous layer, 1 = current layer.
    The qkv projection's output is viewed as (B, 2, T, 3, H, D) and q, k, v are passed to
    :func:`hilt.functional.window2_attention` as strided views. Causal over the window axis:
    element 0 sees itself, element 1 sees both. ``dropout`` applies to the output.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, dropout: float = 0.0,
                 bias: bool = True, backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.head_dim = _check_heads(d_model, n_heads)
        self.d_model = d_model
        self.n_heads = n_heads
        self.causal = causal
        self.dropout = _check_dropout(dropout)
        self.bias = bias
        self.backend = backend
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias, **factory)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.resid_dropout = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        self.qkv.reset_parameters()
        self.out_proj.reset_parameters()

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 2:
            raise ValueError(f"Window2Attention expects (B, 2, T, C), got {tuple(x.shape)}")
        B, W, T, C = x.shape
        qkv = self.qkv(x).view(B, W, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.unbind(3)
        y = window2_attention(q, k, v, causal=self.causal, backend=self.backend)
        return self.resid_dropout(self.out_proj(y.reshape(B, W, T, C)))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, "
                f"dropout={self.dropout}, bias={self.bias}, backend={self.backend!r}")
