"""The decoding cache of :class:`~hilt.models.BlockHierarchicalLM` (block-wise keys/values)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["BlockKVCache"]


class BlockKVCache:
    """State of a block-hierarchical decoder between :meth:`BlockHierarchicalLM.forward_step` calls.

    With B sequences, H heads of D dims, C = d_model, S = ``block_size``, NB = ceil(max_len / S):

    - ``local_k[i]``, ``local_v[i]``, ``decoder_k[i]``, ``decoder_v[i]``: (B, H, S, D) keys/values of the
      **current block only** (slots ``[0, phase)`` are filled), one pair per local / decoder layer;
      they are overwritten from slot 0 when a block starts;
    - ``block_states``: (B, S, C) the local layers' outputs of the current block (pooled once it is full);
    - ``global_k[i]``, ``global_v[i]``: (B, H, NB, D) one entry per completed block, per global layer;
    - ``pooled``: (B, NB, C) each completed block's pooled vector (kept with RoPE only, to rebuild the
      global cache when the window slides by a block; None otherwise);
    - ``shifted``: (B, C) the current block's global input (the learned start vector in block 0);
    - ``ids``: (B, max_len) the window's tokens (to rebuild after a slide).

    ``length``: tokens in the window; ``phase = length % S``; ``n_blocks``: completed blocks.
    """

    def __init__(self, n_local: int, n_global: int, n_decoder: int, batch_size: int, n_heads: int,
                 head_dim: int, block_size: int, max_len: int, keep_pooled: bool, device=None,
                 dtype=None) -> None:
        if min(batch_size, n_heads, head_dim, block_size, max_len) < 1:
            raise ValueError("BlockKVCache sizes must all be >= 1, got "
                             f"{(batch_size, n_heads, head_dim, block_size, max_len)}")
        f = {"device": device, "dtype": dtype}
        C = n_heads * head_dim
        nb = -(-max_len // block_size)
        blk = (batch_size, n_heads, block_size, head_dim)
        glb = (batch_size, n_heads, nb, head_dim)
        self.local_k = [torch.zeros(blk, **f) for _ in range(n_local)]
        self.local_v = [torch.zeros(blk, **f) for _ in range(n_local)]
        self.decoder_k = [torch.zeros(blk, **f) for _ in range(n_decoder)]
        self.decoder_v = [torch.zeros(blk, **f) for _ in range(n_decoder)]
        self.global_k = [torch.zeros(glb, **f) for _ in range(n_global)]
        self.global_v = [torch.zeros(glb, **f) for _ in range(n_global)]
        self.block_states = torch.zeros(batch_size, block_size, C, **f)
        self.pooled: Optional[Tensor] = torch.zeros(batch_size, nb, C, **f) if keep_pooled else None
        self.shifted = torch.zeros(batch_size, C, **f)
        self.ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.batch_size, self.block_size, self.max_len, self.max_blocks = batch_size, block_size, max_len, nb
        self.length = 0
        self.n_blocks = 0

    @property
    def phase(self) -> int:
        """Tokens already in the current block."""
        return self.length % self.block_size

    def reset(self) -> "BlockKVCache":
        """Empty the cache (buffers are reused; the caller sets ``shifted`` to the start vector)."""
        self.length = 0
        self.n_blocks = 0
        return self

    def tensors(self) -> list[Tensor]:
        ts = [*self.local_k, *self.local_v, *self.decoder_k, *self.decoder_v, *self.global_k, *self.global_v,
              self.block_states, self.shifted, self.ids]
        return ts + ([self.pooled] if self.pooled is not None else [])

    @property
    def nbytes(self) -> int:
        """Bytes held by every buffer of the cache."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def __repr__(self) -> str:
        return (f"BlockKVCache(batch={self.batch_size}, block_size={self.block_size}, length={self.length}/"
                f"{self.max_len}, blocks={self.n_blocks}/{self.max_blocks}, phase={self.phase})")
