"""The model-type registry: a name (CLI name, alias or ``config.model_type``) -> how to build the model.

``gpt``, ``hilt``, ``block`` (``block_hierarchical_lm``), ``lformer`` and ``llama`` are built in.
:func:`register_model` adds another type (for the trainer, the CLI and ``hilt.load``). The checkpoint code
imports this module; nothing here imports training code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

from torch import nn

from .block_hierarchical import BlockHierarchicalLM
from .config import BlockHierarchicalLMConfig, GPTConfig, HILTConfig
from .gpt import GPT
from .hilt import HILT
from .lformer import LFormer, LFormerConfig
from .llama import Llama, LlamaConfig

__all__ = ["ModelSpec", "register_model", "get_model_spec", "model_types", "build_model"]


@dataclass
class ModelSpec:
    """How to build one model type. ``name``: the CLI name; ``model_type``: ``config.model_type``;
    ``find_unused_parameters``: DDP needs it (a head without labels in a batch)."""

    name: str
    model_type: str
    model_class: Callable[..., nn.Module]
    config_class: type
    find_unused_parameters: bool = False
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register_model(spec: ModelSpec, *aliases: str, overwrite: bool = False) -> ModelSpec:
    """Make a model type known to the trainer, the CLI and :func:`hilt.load`."""
    if spec.model_type in _REGISTRY and not overwrite:
        raise ValueError(f"model type {spec.model_type!r} is already registered")
    _REGISTRY[spec.model_type] = spec
    for a in (spec.name, spec.model_type, *aliases):
        _ALIASES[a] = spec.model_type
    return spec


def model_types() -> list[str]:
    """The CLI names of the registered model types."""
    return [s.name for s in _REGISTRY.values()]


def get_model_spec(name: str) -> ModelSpec:
    """By CLI name, alias or ``config.model_type``."""
    key = _ALIASES.get(name, _ALIASES.get(str(name).lower()))
    if key is None:
        raise ValueError(f"unknown model type {name!r}; known: {', '.join(model_types())}")
    return _REGISTRY[key]


def same_model_type(a: str, b: str) -> bool:
    """Whether two names (aliases or model types) name the same registered type."""
    return _ALIASES.get(a) is not None and _ALIASES.get(a) == _ALIASES.get(b)


def build_model(name: str, config: Union[dict, Any], **kwargs) -> nn.Module:
    """``Model(config)`` for a registered type; ``config`` may be a dict or a config object."""
    spec = get_model_spec(name)
    if isinstance(config, dict):
        d = dict(config)
        d.setdefault("model_type", spec.config_class.model_type)
        config = spec.config_class.from_dict(d)
    return spec.model_class(config, **kwargs)


# the built-in types (llama first: the order `hilt train --model` has always listed them in)
register_model(ModelSpec("llama", "llama", Llama, LlamaConfig,
                         description="Llama-style decoder (RMSNorm, SwiGLU, RoPE); NPT base model"))
register_model(ModelSpec("gpt", "gpt", GPT, GPTConfig, description="plain pre-LN decoder"))
register_model(ModelSpec("hilt", "hilt", HILT, HILTConfig, description="GPT + inter-layer transformers"))
register_model(ModelSpec("block", "block_hierarchical_lm", BlockHierarchicalLM, BlockHierarchicalLMConfig,
                         description="block-wise hierarchical LM"), "block_hierarchical", "blockhierarchicallm")
register_model(ModelSpec("lformer", LFormerConfig.model_type, LFormer, LFormerConfig, find_unused_parameters=True,
                         description="decoder + progressive depth aggregation side path"), "lformer")
