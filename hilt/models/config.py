"""Model configs: dataclasses that validate themselves and round-trip through JSON.

Field names are shared by every model (DESIGN.md): vocab_size, d_model, n_heads, n_layers, d_ff,
dropout, max_seq_len (context length), block_size (local attention/pooling block), n_local_layers,
n_global_layers, n_decoder_layers, ilt_dim, ilt_heads, ilt_layers, ilt_dropout, pos_encoding.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

__all__ = ["ModelConfig", "GPTConfig", "HILTConfig", "BlockHierarchicalLMConfig", "POS_ENCODINGS"]

POS_ENCODINGS = ("sinusoidal", "learned", "rope")


def _int(cfg, name: str, minimum: int = 1, optional: bool = False) -> None:
    v = getattr(cfg, name)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")


def _prob(cfg, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {v!r}")
    setattr(cfg, name, float(v))


def _bool(cfg, name: str) -> None:
    if not isinstance(getattr(cfg, name), bool):
        raise ValueError(f"{name} must be a bool, got {getattr(cfg, name)!r}")


def _float(cfg, name: str, positive: bool = False) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name} must be a finite {'positive ' if positive else ''}float, got {v!r}")
    setattr(cfg, name, float(v))


@dataclass
class ModelConfig:
    """Base: JSON/dict round trip. ``to_dict`` adds ``model_type``; ``from_dict`` checks it."""

    model_type: ClassVar[str] = "base"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = self.model_type
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        mt = d.pop("model_type", cls.model_type)
        if mt != cls.model_type:
            raise ValueError(f"model_type {mt!r} does not match {cls.__name__} ({cls.model_type!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**d)

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None, indent: int = 2) -> str:
        """JSON text; also written to ``path`` when given."""
        s = json.dumps(self.to_dict(), indent=indent, sort_keys=True)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(s + "\n")
        return s

    @classmethod
    def from_json(cls, text_or_path: Union[str, os.PathLike]):
        """From JSON text, or from a file path."""
        if isinstance(text_or_path, os.PathLike) or not str(text_or_path).lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as f:
                text = f.read()
        else:
            text = str(text_or_path)
        return cls.from_dict(json.loads(text))

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def _validate_common(self) -> None:
        _int(self, "vocab_size")
        _int(self, "d_model")
        _int(self, "n_heads")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        _int(self, "d_ff", optional=True)
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        _prob(self, "dropout")
        _int(self, "max_seq_len")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}")
        if self.pos_encoding == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"pos_encoding='rope' needs an even head dim (d_model / n_heads), got "
                             f"{self.d_model // self.n_heads}")
        _float(self, "rope_base", positive=True)
        _bool(self, "bias")
        _float(self, "layer_norm_eps", positive=True)
        _float(self, "init_std", positive=True)


@dataclass
class GPTConfig(ModelConfig):
    """Plain pre-LN decoder. ``d_ff=None`` means 4 * d_model (resolved on construction)."""

    model_type: ClassVar[str] = "gpt"

    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: Optional[int] = None
    dropout: float = 0.1
    max_seq_len: int = 256
    pos_encoding: str = "learned"
    bias: bool = True
    rope_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self._validate_common()
        _int(self, "n_layers")


@dataclass
class HILTConfig(GPTConfig):
    """GPT plus Inter-Layer Transformers. ``ilt_layers=0``: no ILT modules (exactly GPT).
    ``ilt_scale``: the initial value of the modulation scale buffer (a training schedule moves
    it, 0.01 -> 0.1 by default). ``ilt_causal``: causal attention over the (prev, cur) window."""

    model_type: ClassVar[str] = "hilt"

    ilt_dim: int = 128
    ilt_heads: int = 2
    ilt_layers: int = 2
    ilt_dropout: float = 0.1
    ilt_causal: bool = True
    ilt_scale: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _int(self, "ilt_dim")
        _int(self, "ilt_heads")
        if self.ilt_dim % self.ilt_heads:
            raise ValueError(f"ilt_dim ({self.ilt_dim}) must be divisible by ilt_heads ({self.ilt_heads})")
        _int(self, "ilt_layers", minimum=0)
        _prob(self, "ilt_dropout")
        _bool(self, "ilt_causal")
        _float(self, "ilt_scale")


MODES = ("decoder", "encoder")


@dataclass
class BlockHierarchicalLMConfig(ModelConfig):
    """Block-wise hierarchical model. ``mode="decoder"`` (LM, default) or ``"encoder"``
    (sequence classification with ``n_classes``; decoder layers are not built)."""

    model_type: ClassVar[str] = "block_hierarchical_lm"

    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    d_ff: Optional[int] = None
    dropout: float = 0.1
    max_seq_len: int = 256
    block_size: int = 8
    n_local_layers: int = 2
    n_global_layers: int = 2
    n_decoder_layers: int = 2
    pos_encoding: str = "learned"
    mode: str = "decoder"
    n_classes: Optional[int] = None
    bias: bool = True
    rope_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self._validate_common()
        _int(self, "block_size")
        _int(self, "n_local_layers", minimum=0)
        _int(self, "n_global_layers", minimum=0)
        _int(self, "n_decoder_layers", minimum=0)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "encoder":
            if self.n_classes is None:
                raise ValueError("n_classes is required when mode='encoder'")
            _int(self, "n_classes", minimum=2)
        else:
            _int(self, "n_classes", minimum=2, optional=True)
