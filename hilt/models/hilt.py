"""HILT: a GPT whose layer outputs are modulated by Inter-Layer Transformers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from hilt.nn import InterLayerTransformer

from .config import HILTConfig
from .gpt import GPT

__all__ = ["HILT"]


class HILT(GPT):
    """GPT + ILTs. With ``h_0`` = embeddings and ``h_{i+1} = layers[i](h_i)`` (0-based), for every
    i >= 1: ``h_{i+1} <- h_{i+1} + ilt_scale * ilts[i-1](h_i, h_{i+1})``, ``h_i`` being the previous
    layer's already-modulated output: ``n_layers - 1`` ILTs.

    ``ilt_scale`` is a registered float buffer (in the ``state_dict``), changed in place by
    :meth:`set_ilt_scale` (no recompiles); its initial value is ``config.ilt_scale``.
    ``ilt_layers=0`` builds no ILT at all: the model is exactly GPT (same parameter names,
    ``state_dict`` keys, initialisation for the same seed, and outputs); ``ilt_scale`` is then a
    non-persistent buffer. Embeddings are tied as in GPT.
    """

    config_class = HILTConfig

    def __init__(self, config: HILTConfig, backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__(config, backend=backend, device=device, dtype=dtype)
        c = config
        has_ilts = c.ilt_layers > 0 and c.n_layers > 1
        self.register_buffer("ilt_scale", torch.tensor(float(c.ilt_scale), device=device,
                                                       dtype=torch.float32), persistent=has_ilts)
        if has_ilts:
            # built after GPT's parameters, so the GPT part's init is the same as GPT's for one seed
            self.ilts = nn.ModuleList(
                InterLayerTransformer(c.d_model, ilt_dim=c.ilt_dim, n_heads=c.ilt_heads,
                                      n_layers=c.ilt_layers, dropout=c.ilt_dropout, causal=c.ilt_causal,
                                      bias=c.bias, layer_norm_eps=c.layer_norm_eps, init_std=c.init_std,
                                      backend=backend, device=device, dtype=dtype)
                for _ in range(c.n_layers - 1))
        else:
            self.ilts = None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "ilts", None) is not None:
            for ilt in self.ilts:
                ilt.reset_parameters()

    @torch.no_grad()
    def set_ilt_scale(self, scale: float) -> None:
        """Set the modulation scale in place (e.g. from a 0.01 -> 0.1 schedule)."""
        self.ilt_scale.fill_(float(scale))

    def get_ilt_scale(self) -> float:
        return float(self.ilt_scale)

    def _run_layers(self, h: Tensor, key_padding_mask: Optional[Tensor], collect: bool) -> list[Tensor]:
        if self.ilts is None:
            return super()._run_layers(h, key_padding_mask, collect)
        states = [h]
        for i, layer in enumerate(self.layers):
            new = layer(h, key_padding_mask)
            if i >= 1:
                new = new + self.ilt_scale.to(new.dtype) * self.ilts[i - 1](h, new)
            h = new
            if collect:
                states.append(h)
        return states if collect else [h]

    def init_cache(self, batch_size: int, max_len: Optional[int] = None, device=None, dtype=None):
        """GPT's :class:`~hilt.nn.attention.KVCache`, plus each ILT's packed step weights
        (``cache.ilt_weights``, :meth:`InterLayerTransformer.step_weights`): a cache belongs to the
        parameters it was made with (its keys and values do too); make a new one after changing them."""
        cache = super().init_cache(batch_size, max_len, device=device, dtype=dtype)
        cache.ilt_weights = None if self.ilts is None else [ilt.step_weights() for ilt in self.ilts]
        return cache

    def _step_layers(self, h: Tensor, cache, pos: int, ragged=None) -> Tensor:
        """KV-cached layers. ILTs mix (prev, cur) states of the same token, so they cache nothing: they run
        on the new tokens with the current ``ilt_scale``, through :meth:`InterLayerTransformer.step` (the
        forward's math in a few ops on the weights packed by :meth:`init_cache`; the full module forward
        when an ILT is in training mode)."""
        if self.ilts is None:
            return super()._step_layers(h, cache, pos, ragged)
        packed = getattr(cache, "ilt_weights", None)
        for i, layer in enumerate(self.layers):
            new = layer.forward_cached(h, cache.k[i], cache.v[i], pos, ragged)
            if i >= 1:
                ilt = self.ilts[i - 1]
                if ilt.training and ilt.dropout_p > 0:
                    new = new + self.ilt_scale.to(new.dtype) * ilt(h, new)
                else:
                    new = ilt.step(h, new, out=new, scale=self.ilt_scale,
                                   weights=None if packed is None else packed[i - 1])
            h = new
        return h
