"""NP layers for Hugging Face ``transformers`` Llama models (optional: ``pip install hilt[hf]``).

:func:`convert_hf_llama_to_npt` converts decoder layers of a ``LlamaForCausalLM`` (or ``LlamaModel``) **in
place**: each chosen ``LlamaDecoderLayer`` gets an ``np`` submodule (:class:`hilt.models.npt.NPComponent`) and
its class is swapped for a subclass whose forward, in NPT mode, is::

    a  = self_attn(input_layernorm(h), ...)        # the model's own RoPE, mask and cache arguments
    h' = h + MLP_mod(post_attention_layernorm(h))  # no attention residual

and in standard mode is the original forward. ``layer.npt_forward(attn_in, mlp_in, **kwargs)`` takes separate
attention and MLP-residual inputs (teacher scaffolding, :mod:`hilt.hf_scaffold`). The NP weights are created in
``np_dtype`` (default float32, also under a bfloat16 base: the attention output is cast to it). The base weights keep their names (``model.layers.<i>.*``);
the NP weights are ``model.layers.<i>.np.*``. :func:`hilt.models.npt.freeze_base`, ``set_npt_mode``,
``standard_mode``, ``save_np_weights`` and ``load_np_weights`` work on the converted model (importing this
module registers the converter ``load_np_weights`` uses on an unconverted Hugging Face model). Written against
the decoder-layer interface of transformers >= 4.56 (the layer returns a tensor); tested with 5.x.
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from hilt.models.npt import (NPComponent, NPTConfig, NPTError, _is_np_layer, _layer_list, npt_layers, parse_layers,
                             register_converter)

__all__ = ["convert_hf_llama_to_npt", "is_available", "is_hf_model"]

_CLASSES: dict[type, type] = {}


def is_available() -> bool:
    """True when ``transformers`` can be imported."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _base_class(layer: nn.Module) -> type:
    return next(c for c in type(layer).__mro__ if c not in _CLASSES.values())


def _npt_forward(self, hidden_states: Tensor, *args, **kwargs):
    base = _base_class(self)
    if not self.npt_mode:
        return base.forward(self, hidden_states, *args, **kwargs)
    if args:  # the model calls its layers with keywords; accept positional ones by the original signature
        bound = inspect.signature(base.forward).bind(self, hidden_states, *args, **kwargs)
        kwargs = {k: v for k, v in bound.arguments.items() if k not in ("self", "hidden_states")}
        extra = kwargs.pop("kwargs", {})
        kwargs.update(extra)
    return _npt_layer_forward(self, hidden_states, hidden_states, **kwargs)


def _npt_layer_forward(self, attn_in: Tensor, mlp_in: Tensor, *, return_parts: bool = False, **kwargs):
    """``mlp_in + MLP_mod(post_attention_layernorm(mlp_in))`` with ``a = self_attn(input_layernorm(attn_in))``
    (attn_in, mlp_in: (B, T, d); ``kwargs``: the model's mask / RoPE / cache arguments for this layer).
    ``return_parts``: ``(out, a, delta, vectors)`` with ``delta = MLP_mod(...)``."""
    out = self.self_attn(hidden_states=self.input_layernorm(attn_in), **kwargs)
    a = out[0] if isinstance(out, tuple) else out
    vectors = self.np.vectors(a.to(self.np.W_down.weight.dtype))
    delta = self.np.mlp_mod(self.mlp, self.post_attention_layernorm(mlp_in), a, vectors)
    h = mlp_in + delta.to(mlp_in.dtype)
    return (h, a, delta, vectors) if return_parts else h


def _npt_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"NPT{cls.__name__}", (cls,), {
            "forward": _npt_forward, "npt_forward": _npt_layer_forward,
            "__doc__": f"{cls.__name__} with an NP component (hilt.hf)."})
    return _CLASSES[cls]


def is_hf_model(model: nn.Module) -> bool:
    """True for a Hugging Face ``PreTrainedModel`` (what :mod:`hilt.hf` converts), False for hilt's models."""
    return any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def convert_hf_llama_to_npt(model: nn.Module, layers: Union[str, int, Sequence[int]] = "upper_half", *,
                            np_rank: int = 64, num_ranks: int = 1, modulate: str = "dual",
                            np_dtype: Optional[torch.dtype] = torch.float32) -> list[int]:
    """Convert decoder layers of a Hugging Face Llama model in place (see the module docstring); returns
    their indices. ``layers``: ``all``, ``upper_half``, ``A-B``, ``A,B`` or a list (0-based). ``np_dtype``:
    the NP weights' dtype (None: the base's)."""
    mlayers = _layer_list(model)
    idx = parse_layers(layers, len(mlayers))
    cfg = NPTConfig(layers=[], np_rank=np_rank, num_ranks=num_ranks, modulate=modulate).validate()
    old = getattr(model, "npt_config", None)
    if old is not None and npt_layers(model) and (old.np_rank, old.num_ranks, old.modulate) != (
            np_rank, num_ranks, modulate):
        raise NPTError(f"the model already has NP layers with np_rank={old.np_rank}, num_ranks={old.num_ranks}, "
                       f"modulate={old.modulate!r}; convert more layers with the same settings")
    for i in idx:
        layer = mlayers[i]
        if _is_np_layer(layer):
            raise NPTError(f"layer {i} is already an NP layer")
        for attr in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, attr):
                raise NPTError(f"layer {i} ({type(layer).__name__}) has no {attr}: not a Llama decoder layer")
        if not all(hasattr(layer.mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            raise NPTError(f"layer {i}: the MLP is not a gated (SwiGLU) MLP")
    for i in idx:
        layer = mlayers[i]
        w = layer.mlp.gate_proj.weight
        layer.np = NPComponent(w.shape[1], w.shape[0], np_rank, num_ranks, modulate, device=w.device,
                               dtype=np_dtype or w.dtype)
        layer.npt_mode = True
        layer.__class__ = _npt_class(type(layer))
    cfg.layers = npt_layers(model)
    model.npt_config = cfg
    return idx


# load_np_weights on a Hugging Face model converts it with this (models/npt.py never imports this module)
register_converter(lambda layer: True, convert_hf_llama_to_npt)
