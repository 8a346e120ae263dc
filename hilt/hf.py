"""NP layers for Hugging Face ``transformers`` Llama models (optional: ``pip install hilt[hf]``).

:func:`convert_hf_llama_to_npt` converts decoder layers of a ``LlamaForCausalLM`` (or ``LlamaModel``) **in
place**: each chosen ``LlamaDecoderLayer`` gets an ``np`` submodule (:class:`hilt.models.npt.NPComponent`) and
its class is swapped for a subclass whose forward, in NPT mode, is::

    a  = self_attn(input_layernorm(h), ...)        # the model's own RoPE, mask and cache arguments
    h' = h + MLP_mod(post_attention_layernorm(h))  # no attention residual

and in standard mode is the original forward. The base weights keep their names (``model.layers.<i>.*``);
the NP weights are ``model.layers.<i>.np.*``. :func:`hilt.models.npt.freeze_base`, ``set_npt_mode``,
``standard_mode``, ``save_np_weights`` and ``load_np_weights`` work on the converted model (importing this
module registers the converter ``load_np_weights`` uses on an unconverted Hugging Face model). Written against
the decoder-layer interface of transformers >= 4.56 (the layer returns a tensor); tested with 5.x.
"""
from __future__ import annotations

import inspect
from typing import Sequence, Union

from torch import Tensor, nn

from hilt.models.npt import (NPComponent, NPTConfig, NPTError, _is_np_layer, _layer_list, npt_layers, parse_layers,
                             register_converter)

__all__ = ["convert_hf_llama_to_npt", "is_available"]

_CLASSES: dict[type, type] = {}


def is_available() -> bool:
    """True when ``transformers`` can be imported."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _npt_forward(self, hidden_states: Tensor, *args, **kwargs):
    base = type(self).__mro__[1]
    if not self.npt_mode:
        return base.forward(self, hidden_states, *args, **kwargs)
    if args:  # the model calls its layers with keywords; accept positional ones by the original signature
        bound = inspect.signature(base.forward).bind(self, hidden_states, *args, **kwargs)
        kwargs = {k: v for k, v in bound.arguments.items() if k not in ("self", "hidden_states")}
        extra = kwargs.pop("kwargs", {})
        kwargs.update(extra)
    out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    a = out[0] if isinstance(out, tuple) else out
    return hidden_states + self.np.mlp_mod(self.mlp, self.post_attention_layernorm(hidden_states), a)


def _npt_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"NPT{cls.__name__}", (cls,), {
            "forward": _npt_forward, "__doc__": f"{cls.__name__} with an NP component (hilt.hf)."})
    return _CLASSES[cls]


def convert_hf_llama_to_npt(model: nn.Module, layers: Union[str, int, Sequence[int]] = "upper_half", *,
                            np_rank: int = 64, num_ranks: int = 1, modulate: str = "dual") -> list[int]:
    """Convert decoder layers of a Hugging Face Llama model in place (see the module docstring); returns
    their indices. ``layers``: ``all``, ``upper_half``, ``A-B``, ``A,B`` or a list (0-based)."""
    mlayers = _layer_list(model)
    idx = parse_layers(layers, len(mlayers))
    cfg = NPTConfig(layers=[], np_rank=np_rank, num_ranks=num_ranks, modulate=modulate).validate()
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
        layer.np = NPComponent(w.shape[1], w.shape[0], np_rank, num_ranks, modulate, device=w.device, dtype=w.dtype)
        layer.npt_mode = True
        layer.__class__ = _npt_class(type(layer))
    cfg.layers = npt_layers(model)
    model.npt_config = cfg
    return idx


# load_np_weights on a Hugging Face model converts it with this (models/npt.py never imports this module)
register_converter(lambda layer: True, convert_hf_llama_to_npt)
