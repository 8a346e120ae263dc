"""Llama: a decoder with RMSNorm, SwiGLU MLP, rotary position embeddings and causal attention.

Layer (pre-norm, as in Llama)::

    a  = attn(input_norm(x))            # causal, RoPE on q and k, optional grouped-query heads
    h  = x + a
    x' = h + mlp(post_attn_norm(h))     # mlp(x) = down_proj(silu(gate_proj(x)) * up_proj(x))

Module names follow Hugging Face's ``LlamaForCausalLM`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) so the NPT code (:mod:`hilt.models.npt`) works on
both. The causal mask is always explicit (``is_causal=True`` or a boolean mask), whatever SDPA backend
runs, and RoPE is applied on every call (training, eval and generation take the same path).

Registered as model type ``llama`` (``hilt train --model llama``, ``hilt.load``, ``hilt eval``,
``hilt generate``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hilt.nn import RotaryEmbedding

from .config import ModelConfig, _bool, _int
from .output import check_step, ModelOutput, check_ids, lm_loss

__all__ = ["LlamaConfig", "Llama", "LlamaLayer", "LlamaAttention", "SwiGLU", "llama_d_ff"]


def llama_d_ff(d_model: int, multiple_of: int = 32) -> int:
    """Llama's MLP width: 2/3 of 4 * d_model (same parameters as a 4x GELU MLP), rounded up to ``multiple_of``."""
    d = int(8 * d_model / 3)
    return multiple_of * ((d + multiple_of - 1) // multiple_of)


@dataclass
class LlamaConfig(ModelConfig):
    """Llama-style decoder. ``d_ff=None``: :func:`llama_d_ff` (8/3 d_model rounded up to 32).
    ``n_kv_heads=None``: as many key/value heads as query heads (else grouped-query attention).
    ``pos_encoding`` must be ``"rope"``. ``layer_norm_eps`` is the RMSNorm epsilon. ``bias``: biases in
    the linear layers (Llama: none). ``tie_embeddings``: the LM head shares the token embedding."""

    model_type: ClassVar[str] = "llama"

    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    n_layers: int = 4
    d_ff: Optional[int] = None
    dropout: float = 0.0
    max_seq_len: int = 256
    pos_encoding: str = "rope"
    rope_base: float = 10000.0
    bias: bool = False
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.d_ff is None and isinstance(self.d_model, int) and not isinstance(self.d_model, bool):
            self.d_ff = llama_d_ff(self.d_model)
        self._validate_common()
        if self.pos_encoding != "rope":
            raise ValueError(f"a Llama model uses pos_encoding='rope', got {self.pos_encoding!r}")
        _int(self, "n_layers")
        _int(self, "n_kv_heads", optional=True)
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        _bool(self, "tie_embeddings")


class LlamaAttention(nn.Module):
    """Causal multi-head attention with RoPE and optional grouped-query heads (``n_kv_heads``).

    (B, T, C) -> (B, T, C). ``key_padding_mask`` (B, T) bool, True = padding (ignored as a key); a query
    with no valid key outputs zeros."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None, dropout: float = 0.0,
                 bias: bool = False, rope_base: float = 10000.0, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_heads = d_model, n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        self.head_dim = d_model // n_heads
        self.dropout = float(dropout)
        kv = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.k_proj = nn.Linear(d_model, kv, bias=bias, **factory)
        self.v_proj = nn.Linear(d_model, kv, bias=bias, **factory)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base, device=device)
        self.resid_dropout = nn.Dropout(self.dropout)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        B, T, C = x.shape
        q = self.rotary(self.q_proj(x).view(B, T, self.n_heads, self.head_dim))
        k = self.rotary(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        p = self.dropout if self.training else 0.0
        if key_padding_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            if key_padding_mask.shape != (B, T) or key_padding_mask.dtype != torch.bool:
                raise ValueError(f"key_padding_mask must be a (B, T) = {(B, T)} bool tensor")
            allowed = ~key_padding_mask[:, None, None, :] & torch.ones(T, T, dtype=torch.bool,
                                                                       device=x.device).tril()
            has_key = allowed.any(-1, keepdim=True)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, dropout_p=p)
            y = y * has_key.to(y.dtype)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.o_proj(y))

    def forward_cached(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int, ragged=None) -> Tensor:
        """Incremental causal attention for tokens at positions ``pos .. pos+T-1``: their (RoPE'd) keys and
        values go into ``k_cache``/``v_cache`` (B, n_kv_heads, max_len, D) at ``[pos, pos+T)``; each query
        attends to the cached positions ``<=`` its own. No dropout (decoding). ``ragged``: left-padded rows
        (:class:`hilt.nn.attention.RaggedStep`: per-row positions, padding slots never attended)."""
        B, T, C = x.shape
        end = pos + T
        if end > k_cache.shape[2]:
            raise ValueError(f"KV cache overflow: positions up to {end} > cache length {k_cache.shape[2]}")
        rp = pos if ragged is None else ragged.positions
        q = self.rotary(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), rp).transpose(1, 2)
        k_cache[:, :, pos:end] = self.rotary(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim),
                                             rp).transpose(1, 2)
        v_cache[:, :, pos:end] = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        k, v = k_cache[:, :, :end], v_cache[:, :, :end]
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if ragged is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=ragged.mask)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            mask = torch.arange(end, device=x.device) <= torch.arange(pos, end, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}"


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` then dropout."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_ff = d_model, d_ff
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias, **factory)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias, **factory)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias, **factory)
        self.act_fn = nn.SiLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}"


class LlamaLayer(nn.Module):
    """``h = x + attn(input_norm(x))``; ``x' = h + mlp(post_attn_norm(h))``."""

    def __init__(self, config: LlamaConfig, device=None, dtype=None) -> None:
        super().__init__()
        c = config
        factory = {"device": device, "dtype": dtype}
        self.input_norm = nn.RMSNorm(c.d_model, eps=c.layer_norm_eps, **factory)
        self.attn = LlamaAttention(c.d_model, c.n_heads, c.n_kv_heads, c.dropout, c.bias, c.rope_base, **factory)
        self.post_attn_norm = nn.RMSNorm(c.d_model, eps=c.layer_norm_eps, **factory)
        self.mlp = SwiGLU(c.d_model, c.d_ff, c.dropout, c.bias, **factory)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        h = x + self.attn(self.input_norm(x), key_padding_mask)
        return h + self.mlp(self.post_attn_norm(h))

    def forward_cached(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int, ragged=None) -> Tensor:
        """:meth:`forward` for new tokens at positions ``pos ..`` with a KV cache (``ragged``: see
        :meth:`LlamaAttention.forward_cached`)."""
        h = x + self.attn.forward_cached(self.input_norm(x), k_cache, v_cache, pos, ragged)
        return h + self.mlp(self.post_attn_norm(h))


class Llama(nn.Module):
    """Llama-style decoder LM: token embedding -> dropout -> ``n_layers`` :class:`LlamaLayer` -> RMSNorm
    -> LM head (tied to the embedding when ``config.tie_embeddings``).

    Parts: ``tok_emb``, ``drop``, ``layers`` (ModuleList; :func:`hilt.models.npt.convert_to_npt` replaces
    some by NP layers), ``norm_f``, ``lm_head``; :meth:`embed`, :meth:`hidden_states`, :meth:`head`.
    ``forward(ids, targets=None, key_padding_mask=None) -> ModelOutput`` (targets already shifted, -100
    ignored)."""

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig, backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"Llama needs a LlamaConfig, got {type(config).__name__}")
        self.config = c = config
        factory = {"device": device, "dtype": dtype}
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model, **factory)
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(LlamaLayer(c, **factory) for _ in range(c.n_layers))
        self.norm_f = nn.RMSNorm(c.d_model, eps=c.layer_norm_eps, **factory)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False, **factory)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.grad_checkpointing = False
        self.reset_parameters()

    @classmethod
    def from_config(cls, config, **kwargs):
        if isinstance(config, dict):
            config = LlamaConfig.from_dict(config)
        return cls(config, **kwargs)

    def reset_parameters(self) -> None:
        """N(0, init_std) weights, zero biases, unit norms; ``o_proj``/``down_proj`` scaled by 1/sqrt(2 n_layers)."""
        std = self.config.init_std
        resid = std / math.sqrt(2 * self.config.n_layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=resid if name.endswith(("o_proj", "down_proj")) else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.RMSNorm):
                m.reset_parameters()

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer in the backward (used by ``hilt train --grad-checkpoint``)."""
        self.grad_checkpointing = bool(enabled)

    def embed(self, ids: Tensor) -> Tensor:
        return self.drop(self.tok_emb(ids))

    def run_layer(self, i: int, h: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        layer = self.layers[i]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(layer, h, key_padding_mask, use_reentrant=False)
        return layer(h, key_padding_mask)

    def hidden_states(self, ids: Tensor, key_padding_mask: Optional[Tensor] = None) -> list[Tensor]:
        """[h_0, ..., h_L]: the embedding output and every layer's output (before ``norm_f``)."""
        check_ids(ids, self.config.max_seq_len, key_padding_mask)
        h = self.embed(ids)
        states = [h]
        for i in range(len(self.layers)):
            h = self.run_layer(i, h, key_padding_mask)
            states.append(h)
        return states

    def head(self, h: Tensor) -> Tensor:
        return self.lm_head(self.norm_f(h))

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> ModelOutput:
        check_ids(ids, self.config.max_seq_len, key_padding_mask)
        h = self.embed(ids)
        for i in range(len(self.layers)):
            h = self.run_layer(i, h, key_padding_mask)
        logits = self.head(h)
        loss = lm_loss(logits, targets, key_padding_mask) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss)

    # ------------------------------------------------------------ KV cache
    @property
    def supports_kv_cache(self) -> bool:
        """True when every layer has a cached path (LlamaLayer, and NPTLayer in either mode)."""
        return all(hasattr(layer, "forward_cached") for layer in self.layers)

    # forward_step takes left-padded rows with their own positions (KVCache.set_left_padding), so generate()
    # decodes prompts of different lengths in one batch (hilt.generate.supports_ragged_cache also needs a cache)
    supports_ragged_cache = True

    def init_cache(self, batch_size: int, max_len: Optional[int] = None, device=None, dtype=None):
        """An empty :class:`~hilt.nn.attention.KVCache` with ``n_kv_heads`` heads per layer for ``batch_size``
        sequences of at most ``max_len`` (default and maximum: ``config.max_seq_len``) tokens."""
        from hilt.nn.attention import KVCache

        if not self.supports_kv_cache:
            raise NotImplementedError("a layer of this Llama has no cached path (forward_cached)")
        attn = self.layers[0].attn
        return KVCache.for_model(len(self.layers), batch_size, attn.n_kv_heads, attn.head_dim, max_len,
                                 self.config.max_seq_len, self.tok_emb.weight, device, dtype)

    def forward_step(self, ids: Tensor, cache, start_pos: Optional[int] = None) -> ModelOutput:
        """Logits (B, T, vocab) of ``ids`` (B, T) at positions ``start_pos ..`` (default ``cache.length``),
        attending to the cached tokens before them; equal to :meth:`forward` on the whole prefix (NP layers
        included, in their current mode). Eval mode. A cache with left padding (ragged rows,
        :meth:`~hilt.nn.attention.KVCache.set_left_padding`) gives each row its own positions."""
        if not self.supports_kv_cache:
            raise NotImplementedError("a layer of this Llama has no cached path (forward_cached)")
        pos = check_step(ids, cache, start_pos, self.config.max_seq_len)
        T = ids.shape[1]
        ragged = cache.ragged_step(pos, T)
        h = self.embed(ids)
        for i, layer in enumerate(self.layers):
            h = layer.forward_cached(h, cache.k[i], cache.v[i], pos, ragged)
        cache.length = pos + T
        return ModelOutput(logits=self.head(h))

    def extra_repr(self) -> str:
        return f"num_parameters={self.num_parameters()}"
