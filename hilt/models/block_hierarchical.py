"""BlockHierarchicalLM: block-local layers, per-block attention pooling, global layers over blocks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from hilt.nn import AttentionPooling, LearnedPositionalEncoding, TransformerLayer, block_padding_mask

from .block_cache import BlockKVCache
from .config import BlockHierarchicalLMConfig
from .gpt import make_positional_encoding
from .output import ModelOutput, check_ids, classification_loss, init_weights, lm_loss

__all__ = ["BlockHierarchicalLM"]


class BlockHierarchicalLM(nn.Module):
    """Block-wise hierarchical transformer (compare MEGABYTE, Hourglass).

    Decoder mode (default, causal LM):
      tokens -> embedding (+ token positions) -> ``n_local_layers`` causal block-local layers ->
      :class:`~hilt.nn.AttentionPooling` per block -> (+ block positions) -> ``n_global_layers``
      causal full-attention layers over the block vectors -> ``global_norm`` -> shift by one block
      (block n receives the global output of block n-1; block 0 the learned ``start`` vector) ->
      added to every token of block n (on the local layers' output) -> ``n_decoder_layers`` causal
      block-local layers -> final norm -> per-token next-token logits (B, T, vocab).
      A token in block n sees the tokens before it in its block (local/decoder layers) and whole
      earlier blocks (through the shifted global stream): nothing leaks from the future.
      The LM head is tied to the token embedding.

    Encoder mode (``mode="encoder"``, classification): the same local layers, pooling and global
    layers, all bidirectional, no shift, no decoder layers; the head is a Linear over the mean of
    the valid blocks' (normed) global outputs: logits (B, n_classes); loss = CE vs targets (B,).

    ``T`` need not be a multiple of ``block_size`` (the last block is shorter).
    ``key_padding_mask`` (B, T) bool, True = padding: padded tokens are ignored by attention and
    pooling, fully padded blocks by the global layers and the classification mean, and their
    LM targets never count. With ``pos_encoding="rope"`` RoPE is used in every attention (token
    positions in local/decoder layers, block indices in global layers).
    """

    config_class = BlockHierarchicalLMConfig

    def __init__(self, config: BlockHierarchicalLMConfig, backend: Optional[str] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        c = config
        self.is_decoder = c.mode == "decoder"
        causal = self.is_decoder
        rope = c.pos_encoding == "rope"
        n_blocks_max = -(-c.max_seq_len // c.block_size)

        def layer(kind: str) -> TransformerLayer:
            return TransformerLayer(c.d_model, c.n_heads, d_ff=c.d_ff, dropout=c.dropout, attention=kind,
                                    block_size=c.block_size, causal=causal, bias=c.bias, rope=rope,
                                    rope_base=c.rope_base, layer_norm_eps=c.layer_norm_eps,
                                    backend=backend, **factory)

        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model, **factory)
        self.pos_enc = make_positional_encoding(c.pos_encoding, c.d_model, c.max_seq_len, factory)
        self.block_pos_enc = make_positional_encoding(c.pos_encoding, c.d_model, n_blocks_max, factory)
        self.drop = nn.Dropout(c.dropout)
        self.local_layers = nn.ModuleList(layer("block") for _ in range(c.n_local_layers))
        self.pool = AttentionPooling(c.d_model, c.n_heads, c.block_size, bias=c.bias, backend=backend,
                                     **factory)
        self.global_layers = nn.ModuleList(layer("full") for _ in range(c.n_global_layers))
        self.global_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, bias=c.bias, **factory)
        if self.is_decoder:
            self.start = nn.Parameter(torch.empty(c.d_model, **factory))
            self.decoder_layers = nn.ModuleList(layer("block") for _ in range(c.n_decoder_layers))
            self.norm_f = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, bias=c.bias, **factory)
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False, **factory)
            self.lm_head.weight = self.tok_emb.weight  # tied
        else:
            self.classifier = nn.Linear(c.d_model, c.n_classes, bias=True, **factory)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config, **kwargs):
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        return cls(config, **kwargs)

    def reset_parameters(self) -> None:
        c = self.config
        n_res = c.n_local_layers + c.n_global_layers + (c.n_decoder_layers if self.is_decoder else 0)
        init_weights(self, std=c.init_std, n_residual=n_res)
        if self.is_decoder:
            nn.init.normal_(self.start, std=c.init_std)

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            for pe in (self.pos_enc, self.block_pos_enc):
                if isinstance(pe, LearnedPositionalEncoding):
                    n -= pe.weight.numel()
        return n

    def set_backend(self, backend: Optional[str]) -> None:
        for m in self.modules():
            if hasattr(m, "backend") and m is not self:
                m.backend = backend

    def encode_blocks(self, ids: Tensor, key_padding_mask: Optional[Tensor] = None
                      ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Returns (local token states (B, T, C), normed global block states (B, nb, C),
        block padding mask (B, nb) or None)."""
        h = self.tok_emb(ids)
        if self.pos_enc is not None:
            h = self.pos_enc(h)
        h = self.drop(h)
        for lyr in self.local_layers:
            h = lyr(h, key_padding_mask)
        bmask = block_padding_mask(key_padding_mask, self.config.block_size)
        g = self.pool(h, key_padding_mask)  # (B, nb, C)
        if self.block_pos_enc is not None:
            g = self.block_pos_enc(g)
        for lyr in self.global_layers:
            g = lyr(g, bmask)
        return h, self.global_norm(g), bmask

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> ModelOutput:
        check_ids(ids, self.config.max_seq_len, key_padding_mask)
        B, T = ids.shape
        h, g, bmask = self.encode_blocks(ids, key_padding_mask)
        if not self.is_decoder:
            if bmask is None:
                pooled = g.mean(dim=1)
            else:
                w = (~bmask).to(g.dtype).unsqueeze(-1)
                pooled = (g * w).sum(1) / w.sum(1).clamp_min(1.0)
            logits = self.classifier(pooled)
            loss = classification_loss(logits, targets) if targets is not None else None
            return ModelOutput(logits=logits, loss=loss)
        # shift by one block: block n gets the global output of block n-1, block 0 the start vector
        start = self.start.to(g.dtype).view(1, 1, -1).expand(B, 1, -1)
        shifted = torch.cat([start, g[:, :-1]], dim=1)  # (B, nb, C)
        block_of_token = torch.arange(T, device=ids.device) // self.config.block_size
        h = h + shifted[:, block_of_token]
        for lyr in self.decoder_layers:
            h = lyr(h, key_padding_mask)
        logits = self.lm_head(self.norm_f(h))
        loss = lm_loss(logits, targets, key_padding_mask) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss)

    # ------------------------------------------------------------ incremental decoding
    @property
    def supports_kv_cache(self) -> bool:
        """Decoder mode with ``block_size <= max_seq_len`` decodes with a :class:`BlockKVCache`."""
        return self.is_decoder and self.config.block_size <= self.config.max_seq_len

    @property
    def window_stride(self) -> int:
        """Past ``max_seq_len`` the generation window slides by whole blocks (block boundaries stay
        aligned with the tokens)."""
        return self.config.block_size if self.config.block_size <= self.config.max_seq_len else 1

    def init_cache(self, batch_size: int, device=None, dtype=None) -> BlockKVCache:
        """An empty :class:`BlockKVCache` for ``batch_size`` sequences (window of ``max_seq_len`` tokens)."""
        if not self.supports_kv_cache:
            raise NotImplementedError("BlockHierarchicalLM decodes with a cache in decoder mode with "
                                      f"block_size <= max_seq_len (mode={self.config.mode!r}, "
                                      f"block_size={self.config.block_size}, max_seq_len={self.config.max_seq_len})")
        c = self.config
        ref = self.tok_emb.weight
        cache = BlockKVCache(c.n_local_layers, c.n_global_layers, c.n_decoder_layers, int(batch_size), c.n_heads,
                             c.d_model // c.n_heads, c.block_size, c.max_seq_len, c.pos_encoding == "rope",
                             device=device or ref.device, dtype=dtype or ref.dtype)
        return self._reset_cache(cache)

    def _reset_cache(self, cache: BlockKVCache) -> BlockKVCache:
        cache.reset()
        cache.shifted.copy_(self.start.to(cache.shifted.dtype).expand_as(cache.shifted))
        return cache

    def _embed_at(self, ids: Tensor, pos: int) -> Tensor:
        h = self.tok_emb(ids)
        if self.pos_enc is not None:
            h = self.pos_enc(h, offset=pos)
        return self.drop(h)

    def _close_blocks(self, h: Tensor, cache: BlockKVCache) -> Tensor:
        """Pool the k completed blocks ``h`` (B, k·S, C), run the global layers one step per block with
        their cache; returns the normed global outputs (B, k, C) and sets ``cache.shifted``."""
        nb = cache.n_blocks
        pooled = self.pool(h)  # (B, k, C)
        k = pooled.shape[1]
        if cache.pooled is not None:
            cache.pooled[:, nb:nb + k] = pooled
        g = self.block_pos_enc(pooled, offset=nb) if self.block_pos_enc is not None else pooled
        for i, lyr in enumerate(self.global_layers):
            g = lyr.forward_cached(g, cache.global_k[i], cache.global_v[i], nb)
        g = self.global_norm(g)
        cache.n_blocks = nb + k
        cache.shifted.copy_(g[:, -1])
        return g

    def _step_tokens(self, ids: Tensor, cache: BlockKVCache) -> Tensor:
        """Tokens ``ids`` (B, n) inside the current block (phase + n <= S), through the block caches."""
        pos, ph, n = cache.length, cache.phase, ids.shape[1]
        h = self._embed_at(ids, pos)
        for i, lyr in enumerate(self.local_layers):
            h = lyr.forward_block_cached(h, cache.local_k[i], cache.local_v[i], ph, pos)
        cache.block_states[:, ph:ph + n] = h
        x = h + cache.shifted.unsqueeze(1)
        for i, lyr in enumerate(self.decoder_layers):
            x = lyr.forward_block_cached(x, cache.decoder_k[i], cache.decoder_v[i], ph, pos)
        cache.length = pos + n
        if ph + n == self.config.block_size:  # the block is complete: one global step
            self._close_blocks(cache.block_states, cache)
        return self.lm_head(self.norm_f(x))

    def _step_blocks(self, ids: Tensor, cache: BlockKVCache) -> Tensor:
        """Whole blocks ``ids`` (B, k·S) starting on a block boundary, block-parallel (prefill)."""
        S, pos = self.config.block_size, cache.length
        h = self._embed_at(ids, pos)
        for lyr in self.local_layers:
            h = lyr.forward_offset(h, pos)
        prev = cache.shifted.clone()
        g = self._close_blocks(h, cache)
        shifted = torch.cat([prev.unsqueeze(1), g[:, :-1]], dim=1)  # (B, k, C)
        x = h + shifted.repeat_interleave(S, dim=1)
        for lyr in self.decoder_layers:
            x = lyr.forward_offset(x, pos)
        cache.length = pos + ids.shape[1]
        return self.lm_head(self.norm_f(x))

    def forward_step(self, ids: Tensor, cache: BlockKVCache) -> ModelOutput:
        """Logits (B, T, vocab) of ``ids`` (B, T) placed right after the ``cache.length`` cached tokens,
        equal to :meth:`forward` on the whole window. Whole blocks that start on a block boundary run
        block-parallel (prefill); other tokens run through the block caches (at most ``block_size``
        keys per local/decoder layer); each completed block takes one global step. The window holds at
        most ``max_seq_len`` tokens: :meth:`slide_cache` drops the oldest block. Eval mode only."""
        if not self.supports_kv_cache:
            raise NotImplementedError("this BlockHierarchicalLM has no cached decoding path (encoder mode "
                                      "or block_size > max_seq_len)")
        check_ids(ids, self.config.max_seq_len)
        B, T = ids.shape
        if B != cache.batch_size:
            raise ValueError(f"ids has batch {B}, the cache was built for {cache.batch_size}")
        if cache.length + T > cache.max_len:
            raise ValueError(f"{cache.length} cached + {T} new tokens exceed the window max_seq_len="
                             f"{cache.max_len}: slide the cache (slide_cache) or rebuild it")
        S = self.config.block_size
        cache.ids[:, cache.length:cache.length + T] = ids
        outs, t = [], 0
        while t < T:
            if cache.phase == 0 and T - t >= S:
                n = (T - t) // S * S
                outs.append(self._step_blocks(ids[:, t:t + n], cache))
            else:
                n = min(S - cache.phase, T - t)
                outs.append(self._step_tokens(ids[:, t:t + n], cache))
            t += n
        return ModelOutput(logits=outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))

    def slide_cache(self, cache: BlockKVCache) -> BlockKVCache:
        """Drop the window's oldest block (``block_size`` tokens), as the recompute path's window does.
        With RoPE only relative positions matter: the pooled vectors stay, the global layers are re-run
        over the remaining blocks (O(T / block_size) once per block) and the current partial block is
        re-fed (its global input changed). With learned or sinusoidal positions every position shifts:
        the cache is rebuilt from the window's tokens."""
        S, L = self.config.block_size, cache.length
        if L < S:
            raise ValueError(f"slide_cache needs at least one whole block in the window (length {L} < {S})")
        keep = cache.ids[:, S:L].clone()
        if cache.pooled is None:
            self._reset_cache(cache)
            if keep.shape[1]:
                self.forward_step(keep, cache)
            return cache
        k = cache.n_blocks - 1
        pooled = cache.pooled[:, 1:cache.n_blocks].clone()
        self._reset_cache(cache)
        cache.ids[:, :L - S] = keep
        if k:
            cache.pooled[:, :k] = pooled
            g = pooled
            for i, lyr in enumerate(self.global_layers):
                g = lyr.forward_cached(g, cache.global_k[i], cache.global_v[i], 0)
            cache.shifted.copy_(self.global_norm(g[:, -1]))
            cache.n_blocks = k
            cache.length = k * S
        if L - S > k * S:
            self._step_tokens(keep[:, k * S:], cache)
        return cache

    def extra_repr(self) -> str:
        return f"mode={self.config.mode!r}, num_parameters={self.num_parameters()}"
