"""Training FLOPs per token of the LM models, computed from their configs (no model is built).

Convention (the usual one for transformer compute budgets):

* a matmul of an (m, k) by a (k, n) matrix costs ``2·m·n·k`` FLOPs; so a Linear(d_in, d_out) costs
  ``2·d_in·d_out`` per row it is applied to;
* attention costs ``4·d·K`` per query for ``K`` attended keys and total head width ``d``
  (``QKᵀ``: 2·d·K, ``softmax·V``: 2·d·K), where ``K`` counts only the keys the layer really
  attends to: causal (query t sees t + 1 keys), block-local (position in its block + 1),
  global over blocks (block n sees n + 1 block vectors), the ILT's 2-element window (1 + 2 keys);
* training = forward + backward = ``3 ×`` the forward's matmul FLOPs;
* everything is averaged over one ``seq_len``-token sequence: a layer that runs on block vectors
  costs its per-vector FLOPs × ``ceil(seq_len / block_size) / seq_len`` per token;
* the LM head (d_model × vocab) is counted; embedding lookups, norms, activations, softmax,
  residual adds and the EMA depth scan (element-wise) are not; neither are products of weights
  alone (the pooling's score vectors ``W_kᵀ q``), whose cost is per batch, not per token.

``flops_per_token(model, config, seq_len)`` returns a :class:`FlopCount` with the forward's parts
(``linear``, ``attention``, ``lm_head``) and ``training`` = 3 × ``forward``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Union

__all__ = ["FlopCount", "flops_per_token", "causal_keys", "block_causal_keys", "FLOP_MODELS"]

FLOP_MODELS = ("gpt", "hilt", "block", "lformer")


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token by part, and the training total (3 × forward). Floats: averages over
    a sequence need not be integers."""

    linear: float      # every Linear / projection except the LM head
    attention: float   # QKᵀ and softmax·V over the attended keys, pooling's weighted sums
    lm_head: float     # d_model -> vocab

    @property
    def forward(self) -> float:
        return self.linear + self.attention + self.lm_head

    @property
    def training(self) -> float:
        return 3.0 * self.forward

    def to_dict(self) -> dict:
        return {"linear": self.linear, "attention": self.attention, "lm_head": self.lm_head,
                "forward": self.forward, "training": self.training}


def causal_keys(n: int) -> float:
    """Mean number of keys per query under causal attention over n positions: (n + 1) / 2."""
    return (n + 1) / 2.0


def block_causal_keys(n: int, block_size: int, causal: bool = True) -> float:
    """Mean keys per query of block-local attention over n positions (the last block may be short):
    causal: position-in-block + 1; bidirectional: the block's length."""
    total = 0
    for start in range(0, n, block_size):
        m = min(block_size, n - start)
        total += m * (m + 1) // 2 if causal else m * m
    return total / n


def _layer(d: int, d_ff: int, keys: float) -> tuple[float, float]:
    """(linear, attention) forward FLOPs of one pre-LN transformer layer for one query row:
    qkv (d -> 3d) + out (d -> d) + MLP (d -> d_ff -> d); attention over ``keys`` keys."""
    linear = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * d_ff
    return float(linear), 4.0 * d * keys


def _get(cfg: Any, name: str, default=None):
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _d_ff(cfg: Any) -> int:
    ff = _get(cfg, "d_ff")
    return int(ff) if ff is not None else 4 * int(_get(cfg, "d_model"))


def _gpt_body(cfg: Any, T: int) -> tuple[float, float]:
    d, L = int(_get(cfg, "d_model")), int(_get(cfg, "n_layers", 4))
    lin, att = _layer(d, _d_ff(cfg), causal_keys(T))
    return L * lin, L * att


def _ilt(cfg: Any) -> tuple[float, float]:
    """One InterLayerTransformer per token: proj_in on both window states, ``ilt_layers`` layers on
    2 elements (d_ff 4·ilt_dim; window attention: element 0 sees 1 key, element 1 sees 2), proj_out
    once (after the mean over the window)."""
    d, i, n = int(_get(cfg, "d_model")), int(_get(cfg, "ilt_dim", 128)), int(_get(cfg, "ilt_layers", 2))
    causal = bool(_get(cfg, "ilt_causal", True))
    lin_row, _ = _layer(i, 4 * i, 0)
    keys = 3 if causal else 4  # summed over the 2 elements
    linear = 2 * (2 * d * i) + n * 2 * lin_row + 2 * i * d
    return float(linear), float(n * 4 * i * keys)


def flops_per_token(model: str, config: Union[dict, Any], seq_len: int) -> FlopCount:
    """Forward / training FLOPs per token of ``model`` (``gpt | hilt | block | lformer``, or a
    config's ``model_type``) with ``config`` (a config object or a dict of its fields; missing
    fields take the config class's defaults) on sequences of ``seq_len`` tokens."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    name = {"block_hierarchical_lm": "block", "block_hierarchical": "block"}.get(model, model)
    if name not in FLOP_MODELS:
        raise ValueError(f"flops_per_token: unknown model {model!r}; known: {', '.join(FLOP_MODELS)}")
    cfg = _with_defaults(name, config)
    T = seq_len
    d, V = int(cfg["d_model"]), int(cfg["vocab_size"])
    head = 2.0 * d * V
    if name == "gpt":
        lin, att = _gpt_body(cfg, T)
        return FlopCount(lin, att, head)
    if name == "hilt":
        lin, att = _gpt_body(cfg, T)
        n_ilts = (int(cfg["n_layers"]) - 1) if int(cfg["ilt_layers"]) > 0 and int(cfg["n_layers"]) > 1 else 0
        il, ia = _ilt(cfg)
        return FlopCount(lin + n_ilts * il, att + n_ilts * ia, head)
    if name == "lformer":
        return _lformer(cfg, T, head)
    return _block(cfg, T, head)


def _block(cfg: dict, T: int, head: float) -> FlopCount:
    if cfg["mode"] != "decoder":
        raise ValueError("flops_per_token counts the LM (mode='decoder') only, got mode='encoder'")
    d, ff, b = int(cfg["d_model"]), _d_ff(cfg), int(cfg["block_size"])
    H = int(cfg["n_heads"])
    nb = -(-T // b)
    per_block = nb / T  # block vectors per token
    loc_lin, loc_att = _layer(d, ff, block_causal_keys(T, b))
    n_tok_layers = int(cfg["n_local_layers"]) + int(cfg["n_decoder_layers"])
    glob_lin, glob_att = _layer(d, ff, causal_keys(nb))
    n_glob = int(cfg["n_global_layers"])
    # pooling: scores x @ U (d -> H) per token; the weighted sum of each block's tokens (shared
    # values, one per head: 2·H·d per token); per block: each head's value rows (d -> d in all) and
    # out_proj (d -> d)
    pool_lin = 2 * d * H + per_block * (2 * d * d + 2 * d * d)
    pool_att = 2.0 * H * d
    linear = n_tok_layers * loc_lin + n_glob * glob_lin * per_block + pool_lin
    attention = n_tok_layers * loc_att + n_glob * glob_att * per_block + pool_att
    return FlopCount(float(linear), float(attention), head)


def _lformer(cfg: dict, T: int, head: float) -> FlopCount:
    unsupported = []
    if cfg["tap_mode"] != "token":
        unsupported.append(f"tap_mode={cfg['tap_mode']!r}")
    if cfg["aggregator"] not in ("ema", "gru"):
        unsupported.append(f"aggregator={cfg['aggregator']!r}")
    for f in ("tree_checkpoint", "n_tools", "plan_vocab"):
        if cfg[f]:
            unsupported.append(f"{f}={cfg[f]!r}")
    if cfg["value_head"]:
        unsupported.append("value_head=True")
    if unsupported:
        raise ValueError("flops_per_token counts the L-Former as a plain LM (token-wise taps, ema or gru "
                         f"aggregator, no reasoning heads); not supported: {', '.join(unsupported)}")
    lin, att = _gpt_body(cfg, T)
    d, s = int(cfg["d_model"]), int(cfg["d_side"])
    n_taps = int(cfg["n_layers"]) // int(cfg["tap_every"])
    side = n_taps * (2 * d * s + 2 * 2 * s * 4 * s)  # tap projection + φ MLP (s -> 4s -> s), per tap
    if cfg["aggregator"] == "gru":
        side += n_taps * 2 * (2 * s * 3 * s)  # GRUCell: input and hidden products, 3 gates each
    if cfg["blend_into_lm"]:
        side += 2 * s * d  # blend_proj (d_side -> d_model)
    return FlopCount(lin + side, att, head)


def _with_defaults(name: str, config: Union[dict, Any]) -> dict:
    """The config as a plain dict with every field (the class defaults filled in)."""
    from hilt.models import BlockHierarchicalLMConfig, GPTConfig, HILTConfig
    from hilt.models.lformer import LFormerConfig

    cls = {"gpt": GPTConfig, "hilt": HILTConfig, "block": BlockHierarchicalLMConfig, "lformer": LFormerConfig}[name]
    if not isinstance(config, dict):
        if not isinstance(config, cls):
            raise TypeError(f"config for {name!r} must be a dict or a {cls.__name__}, got {type(config).__name__}")
        return dataclasses.asdict(config)
    d = dict(config)
    d.pop("model_type", None)
    return dataclasses.asdict(cls.from_dict(d))  # validates (unknown fields named) and fills in defaults
