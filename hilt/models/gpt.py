"""GPT: a plain pre-LN decoder-only transformer, the baseline of every ablation."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from hilt.nn import LearnedPositionalEncoding, SinusoidalPositionalEncoding, TransformerLayer
from hilt.nn.attention import KVCache

from .config import GPTConfig
from .output import check_step, ModelOutput, check_ids, init_weights, lm_loss

__all__ = ["GPT", "make_positional_encoding"]


def make_positional_encoding(kind: str, d_model: int, max_seq_len: int, factory: dict) -> Optional[nn.Module]:
    """Additive encoding for ``"learned"``/``"sinusoidal"``; None for ``"rope"`` (applied in attention)."""
    if kind == "learned":
        return LearnedPositionalEncoding(d_model, max_seq_len, device=factory.get("device"),
                                         dtype=factory.get("dtype"))
    if kind == "sinusoidal":
        return SinusoidalPositionalEncoding(d_model, max_seq_len, device=factory.get("device"),
                                            dtype=factory.get("dtype"))
    return None


class GPT(nn.Module):
    """Pre-LN decoder: token embedding (+ positional encoding) -> dropout -> ``n_layers`` causal
    :class:`~hilt.nn.TransformerLayer` -> final LayerNorm -> LM head.

    The LM head's weight is **tied** to the token embedding (``lm_head.weight is tok_emb.weight``;
    both names appear in the ``state_dict``, one parameter in ``parameters()``).

    Reusable parts: ``tok_emb``, ``pos_enc`` (None with RoPE), ``drop``, ``layers`` (ModuleList),
    ``norm_f``, ``lm_head``; :meth:`embed`, :meth:`hidden_states` (every layer's output),
    :meth:`head`.

    ``forward(ids, targets=None, key_padding_mask=None)``: ``targets`` (B, T) are already shifted
    by the caller; -100 is ignored. ``key_padding_mask`` (B, T) bool, True = padding: padded
    tokens are ignored as attention keys and their targets never count (callers may also set
    them to -100 themselves).

    Incremental decoding (KV cache): ``cache = model.init_cache(batch_size)`` then
    ``model.forward_step(ids_chunk, cache)`` feeds the next tokens (a prompt, then one token at a
    time) at positions ``cache.length ..`` and returns their logits; positions (learned,
    sinusoidal, RoPE) are absolute, so the logits equal ``forward`` on the whole prefix. The
    context is at most ``max_seq_len``; :func:`hilt.generate.generate` rebuilds the cache when a
    sliding window moves. ``supports_kv_cache`` is False for subclasses that change ``forward``.
    """

    config_class = GPTConfig

    def __init__(self, config: GPTConfig, backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model, **factory)
        self.pos_enc = make_positional_encoding(c.pos_encoding, c.d_model, c.max_seq_len, factory)
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(c.d_model, c.n_heads, d_ff=c.d_ff, dropout=c.dropout, attention="causal",
                             bias=c.bias, rope=c.pos_encoding == "rope", rope_base=c.rope_base,
                             layer_norm_eps=c.layer_norm_eps, backend=backend, **factory)
            for _ in range(c.n_layers))
        self.norm_f = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, bias=c.bias, **factory)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False, **factory)
        self.lm_head.weight = self.tok_emb.weight  # tied
        self.reset_parameters()

    @classmethod
    def from_config(cls, config, **kwargs):
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        return cls(config, **kwargs)

    def reset_parameters(self) -> None:
        init_weights(self, std=self.config.init_std, n_residual=self.config.n_layers)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Unique parameters (tied weights counted once); ``non_embedding`` leaves out the token
        embedding and a learned positional table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if isinstance(self.pos_enc, LearnedPositionalEncoding):
                n -= self.pos_enc.weight.numel()
        return n

    def set_backend(self, backend: Optional[str]) -> None:
        """Set the op backend of every module that has one."""
        for m in self.modules():
            if hasattr(m, "backend") and m is not self:
                m.backend = backend

    def embed(self, ids: Tensor) -> Tensor:
        """h_0: token embedding + positional encoding, dropout."""
        h = self.tok_emb(ids)
        if self.pos_enc is not None:
            h = self.pos_enc(h)
        return self.drop(h)

    def _run_layers(self, h: Tensor, key_padding_mask: Optional[Tensor], collect: bool) -> list[Tensor]:
        states = [h]
        for layer in self.layers:
            h = layer(h, key_padding_mask)
            if collect:
                states.append(h)
        return states if collect else [h]

    def hidden_states(self, ids: Tensor, key_padding_mask: Optional[Tensor] = None) -> list[Tensor]:
        """[h_0, h_1, ..., h_L]: the embedding output and every layer's output (before ``norm_f``)."""
        check_ids(ids, self.config.max_seq_len, key_padding_mask)
        return self._run_layers(self.embed(ids), key_padding_mask, collect=True)

    def head(self, h: Tensor) -> Tensor:
        """Final norm + LM head: (B, T, d_model) -> (B, T, vocab)."""
        return self.lm_head(self.norm_f(h))

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> ModelOutput:
        check_ids(ids, self.config.max_seq_len, key_padding_mask)
        h = self._run_layers(self.embed(ids), key_padding_mask, collect=False)[-1]
        logits = self.head(h)
        loss = lm_loss(logits, targets, key_padding_mask) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss)

    # ------------------------------------------------------------ KV cache
    @property
    def supports_kv_cache(self) -> bool:
        """True when :meth:`forward_step` reproduces :meth:`forward`'s logits: the model's forward is
        GPT's (HILT changes only the layers, which it handles in :meth:`_step_layers`). A subclass
        with its own forward (e.g. LFormer's blend) does not get a cache unless it overrides this."""
        return type(self).forward is GPT.forward

    # forward_step takes left-padded rows with their own positions (KVCache.set_left_padding), so generate()
    # decodes prompts of different lengths in one batch (hilt.generate.supports_ragged_cache also needs a cache)
    supports_ragged_cache = True

    def init_cache(self, batch_size: int, max_len: Optional[int] = None, device=None, dtype=None) -> KVCache:
        """An empty :class:`~hilt.nn.attention.KVCache` for ``batch_size`` sequences of at most
        ``max_len`` (default and maximum: ``config.max_seq_len``) tokens, on the model's device and dtype."""
        if not self.supports_kv_cache:
            raise NotImplementedError(f"{type(self).__name__} has no KV-cache decoding path")
        attn = self.layers[0].attn
        return KVCache.for_model(len(self.layers), batch_size, attn.n_heads, attn.head_dim, max_len,
                                 self.config.max_seq_len, self.tok_emb.weight, device, dtype)

    def _step_layers(self, h: Tensor, cache: KVCache, pos: int, ragged=None) -> Tensor:
        for i, layer in enumerate(self.layers):
            h = layer.forward_cached(h, cache.k[i], cache.v[i], pos, ragged)
        return h

    def _embed_step(self, ids: Tensor, cache: KVCache, start_pos: Optional[int]):
        """The input of a cached step: (h_0 of ``ids`` at their positions, start slot, RaggedStep or None)."""
        pos = check_step(ids, cache, start_pos, self.config.max_seq_len)
        ragged = cache.ragged_step(pos, ids.shape[1])
        h = self.tok_emb(ids)
        if self.pos_enc is not None:
            h = self.pos_enc(h, offset=pos if ragged is None else ragged.positions)
        return self.drop(h), pos, ragged

    def forward_step(self, ids: Tensor, cache: KVCache, start_pos: Optional[int] = None) -> ModelOutput:
        """Logits (B, T, vocab) of ``ids`` (B, T) placed at positions ``start_pos .. start_pos+T-1``
        (default ``cache.length``: right after the cached tokens), attending to the cached tokens
        before them. Writes their keys/values into ``cache`` and sets ``cache.length = start_pos + T``.
        A ``start_pos`` below ``cache.length`` rewinds (the later entries are overwritten).
        Decoding only: no padding mask, no loss; call it in eval mode (dropout is not applied). With a
        left-padded cache (ragged rows, :meth:`~hilt.nn.attention.KVCache.set_left_padding`) positions count
        slots, and each row's tokens get their own positions and never attend to its padding."""
        if not self.supports_kv_cache:
            raise NotImplementedError(f"{type(self).__name__} has no KV-cache decoding path")
        h, pos, ragged = self._embed_step(ids, cache, start_pos)
        h = self._step_layers(h, cache, pos, ragged)
        cache.length = pos + ids.shape[1]
        return ModelOutput(logits=self.head(h))

    def extra_repr(self) -> str:
        return f"num_parameters={self.num_parameters()}"
