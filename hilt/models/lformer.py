"""L-Former: a GPT base decoder with an L-shaped progressive depth-aggregation side path.

Side path (DESIGN.md, "Models" -> LFormer): every ``tap_every`` layers the base's hidden state
h_l is tapped -> :class:`TapProjector` (Linear -> d_side, LayerNorm, dropout; optionally detached
from the base) -> token-wise ``(B, T, d_side)`` or sequence-wise ``(B, d_side)`` (pooled: mean /
last / attention, all ignoring padding) -> a per-tap φ MLP (d_side -> 4·d_side -> d_side) -> a
depth aggregator (ema / gru / attn, :mod:`hilt.nn.depth_aggregators`) returning all states
S^1..S^L -> optional tree checkpoints -> heads on S^L (tool classification, value regression, plan
decoder) and, token-wise only, a gated blend of S^L into the LM head's input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hilt.nn import MLP, AttentionPooling, CausalSelfAttention, make_depth_aggregator
from hilt.nn.attention import _check_heads

from .config import GPTConfig, _bool, _float, _int, _prob
from .gpt import GPT
from .output import IGNORE_INDEX, ModelOutput, classification_loss, init_weights, lm_loss

__all__ = ["LFormerConfig", "LFormer", "LFormerOutput", "TapProjector", "PlanDecoder",
           "TAP_MODES", "POOLINGS", "AGGREGATORS"]

TAP_MODES = ("token", "sequence")
POOLINGS = ("mean", "last", "attn")
AGGREGATORS = ("ema", "gru", "attn")


def _choice(cfg, name: str, choices: tuple) -> None:
    if getattr(cfg, name) not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {getattr(cfg, name)!r}")


def _nonneg(cfg, name: str) -> None:
    _float(cfg, name)
    if getattr(cfg, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")


@dataclass
class LFormerConfig(GPTConfig):
    """GPT fields plus the L-path.

    Side path: ``d_side`` (width), ``tap_every`` (tap h_l for l = tap_every, 2·tap_every, ...
    <= n_layers: ``n_layers // tap_every`` taps), ``tap_mode`` (``"token"``: (B, T, d_side) states,
    causal; ``"sequence"``: pooled (B, d_side) states), ``pooling`` (``mean | last | attn``: how
    sequence-wise taps are pooled, and how token-wise S^L is read out for the tool/value heads),
    ``aggregator`` (``ema | gru | attn``), ``alpha_init`` / ``alpha_per_channel`` (EMA gates),
    ``side_heads`` (heads of attention pooling, the attention aggregator and the plan decoder),
    ``side_dropout``, ``detach_taps`` (no gradient from the side path into the base),
    ``tree_checkpoint`` (k > 0: every k taps S <- S + MLP(concat(S, S_{l-k})); 0 = off).

    Heads: ``n_tools`` (0 = no tool head), ``value_head``, ``plan_vocab`` (0 = no plan decoder),
    ``plan_len`` (longest plan), ``plan_layers``. Loss weights: ``lambda_lm``, ``lambda_tool``,
    ``lambda_value``, ``lambda_plan``; ``alpha_l1`` / ``alpha_l2``: weights of the mean |α| and
    mean α² sparsity losses (EMA aggregator only). ``blend_into_lm``: gated blend of token-wise
    S^L into the LM head's input (needs ``tap_mode="token"``).
    """

    model_type: ClassVar[str] = "lformer"

    d_side: int = 128
    tap_every: int = 1
    tap_mode: str = "sequence"
    pooling: str = "mean"
    aggregator: str = "ema"
    alpha_init: float = 0.12
    alpha_per_channel: bool = False
    side_heads: int = 4
    side_dropout: float = 0.1
    detach_taps: bool = False
    tree_checkpoint: int = 0
    alpha_l1: float = 0.0
    alpha_l2: float = 0.0
    n_tools: int = 0
    value_head: bool = False
    plan_vocab: int = 0
    plan_len: int = 16
    plan_layers: int = 2
    lambda_lm: float = 1.0
    lambda_tool: float = 1.0
    lambda_value: float = 1.0
    lambda_plan: float = 0.2
    blend_into_lm: bool = False

    @property
    def n_taps(self) -> int:
        return self.n_layers // self.tap_every

    def __post_init__(self) -> None:
        super().__post_init__()
        _int(self, "d_side")
        _int(self, "tap_every")
        if self.tap_every > self.n_layers:
            raise ValueError(f"tap_every ({self.tap_every}) must be <= n_layers ({self.n_layers})")
        _choice(self, "tap_mode", TAP_MODES)
        _choice(self, "pooling", POOLINGS)
        _choice(self, "aggregator", AGGREGATORS)
        _float(self, "alpha_init")
        if not 0.0 < self.alpha_init < 1.0:
            raise ValueError(f"alpha_init must be in (0, 1), got {self.alpha_init}")
        _bool(self, "alpha_per_channel")
        _int(self, "side_heads")
        if self.d_side % self.side_heads:
            raise ValueError(f"d_side ({self.d_side}) must be divisible by side_heads ({self.side_heads})")
        _prob(self, "side_dropout")
        _bool(self, "detach_taps")
        _int(self, "tree_checkpoint", minimum=0)
        if self.tree_checkpoint > self.n_taps:
            raise ValueError(f"tree_checkpoint ({self.tree_checkpoint}) must be <= the number of taps "
                             f"n_layers // tap_every = {self.n_taps} (0 = off)")
        for name in ("alpha_l1", "alpha_l2"):
            _nonneg(self, name)
            if getattr(self, name) > 0 and self.aggregator != "ema":
                raise ValueError(f"{name} (alpha sparsity) needs aggregator='ema', got {self.aggregator!r}")
        _int(self, "n_tools", minimum=0)
        if self.n_tools == 1:
            raise ValueError("n_tools must be 0 (no tool head) or >= 2, got 1")
        _bool(self, "value_head")
        _int(self, "plan_vocab", minimum=0)
        _int(self, "plan_len")
        _int(self, "plan_layers", minimum=1)
        for name in ("lambda_lm", "lambda_tool", "lambda_value", "lambda_plan"):
            _nonneg(self, name)
        _bool(self, "blend_into_lm")
        if self.blend_into_lm and self.tap_mode != "token":
            raise ValueError("blend_into_lm needs tap_mode='token': sequence-wise taps pool every token, "
                             f"so blending them into the LM head would leak the future (tap_mode={self.tap_mode!r})")


@dataclass
class LFormerOutput(ModelOutput):
    """:class:`ModelOutput` plus the side path's outputs. ``side_states``: all aggregator states
    (after tree checkpoints) ``(n_taps, B, T, d_side)`` or ``(n_taps, B, d_side)``; ``tool_logits``
    (B, n_tools); ``values`` (B,); ``plan_logits`` (B, P, plan_vocab), only with ``plan_targets``.
    ``aux_losses`` holds each loss part unweighted; ``loss`` is their weighted sum."""

    tool_logits: Optional[Tensor] = None
    values: Optional[Tensor] = None
    plan_logits: Optional[Tensor] = None
    side_states: Optional[Tensor] = None


class TapProjector(nn.Module):
    """Linear(d_model -> d_side) -> LayerNorm -> dropout. ``detach=True`` stops the gradient into
    the tapped hidden state (the base)."""

    def __init__(self, d_model: int, d_side: int, dropout: float = 0.0, detach: bool = False, bias: bool = True,
                 layer_norm_eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_side, self.detach = d_model, d_side, detach
        self.proj = nn.Linear(d_model, d_side, bias=bias, **factory)
        self.norm = nn.LayerNorm(d_side, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, h: Tensor) -> Tensor:
        if self.detach:
            h = h.detach()
        return self.dropout(self.norm(self.proj(h)))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_side={self.d_side}, detach={self.detach}"


class _CrossAttention(nn.Module):
    """Multi-head attention of x (B, P, d) over memory (B, M, d); ``memory_mask`` (B, M) bool,
    True = padding. A query with no valid key outputs zeros (never NaN)."""

    def __init__(self, d: int, n_heads: int, dropout: float, bias: bool, factory: dict) -> None:
        super().__init__()
        self.head_dim = _check_heads(d, n_heads)
        self.d, self.n_heads, self.dropout = d, n_heads, dropout
        self.q_proj = nn.Linear(d, d, bias=bias, **factory)
        self.kv_proj = nn.Linear(d, 2 * d, bias=bias, **factory)
        self.out_proj = nn.Linear(d, d, bias=bias, **factory)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Optional[Tensor] = None) -> Tensor:
        B, P, d = x.shape
        M = memory.shape[1]
        q = self.q_proj(x).view(B, P, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(memory).view(B, M, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if memory_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            allowed = ~memory_mask[:, None, None, :]  # (B, 1, 1, M)
            has_key = allowed.any(-1, keepdim=True)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, dropout_p=p)
            y = y * has_key.to(y.dtype)
        return self.resid_dropout(self.out_proj(y.transpose(1, 2).reshape(B, P, d)))


class _PlanBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float, bias: bool, eps: float, factory: dict) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=eps, bias=bias, **factory)
        self.self_attn = CausalSelfAttention(d, n_heads, dropout=dropout, bias=bias, causal=True, **factory)
        self.norm2 = nn.LayerNorm(d, eps=eps, bias=bias, **factory)
        self.cross_attn = _CrossAttention(d, n_heads, dropout, bias, factory)
        self.norm3 = nn.LayerNorm(d, eps=eps, bias=bias, **factory)
        self.mlp = MLP(d, 4 * d, dropout=dropout, bias=bias, **factory)

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Optional[Tensor]) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), memory, memory_mask)
        return x + self.mlp(self.norm3(x))


class PlanDecoder(nn.Module):
    """A small causal decoder over plan tokens cross-attending to the side-path states.

    ``forward(plan_targets, memory, memory_mask=None)`` (teacher forcing): the input is a BOS token
    (index ``plan_vocab``) followed by ``plan_targets[:, :-1]`` (-100 read as token 0); returns
    logits (B, P, plan_vocab) predicting ``plan_targets``."""

    def __init__(self, d: int, n_heads: int, plan_vocab: int, plan_len: int, n_layers: int = 2,
                 dropout: float = 0.0, bias: bool = True, layer_norm_eps: float = 1e-5,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.plan_vocab, self.plan_len = plan_vocab, plan_len
        self.tok_emb = nn.Embedding(plan_vocab + 1, d, **factory)  # + BOS
        self.pos_emb = nn.Embedding(plan_len, d, **factory)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_PlanBlock(d, n_heads, dropout, bias, layer_norm_eps, factory)
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(d, eps=layer_norm_eps, bias=bias, **factory)
        self.head = nn.Linear(d, plan_vocab, bias=bias, **factory)

    def forward(self, plan_targets: Tensor, memory: Tensor, memory_mask: Optional[Tensor] = None) -> Tensor:
        B, P = plan_targets.shape
        prev = plan_targets[:, :-1].long().clamp_min(0)  # -100 -> 0 (its own target is ignored)
        inp = torch.cat([prev.new_full((B, 1), self.plan_vocab), prev], dim=1)
        x = self.drop(self.tok_emb(inp) + self.pos_emb.weight[:P])
        memory = memory.to(x.dtype)
        for block in self.blocks:
            x = block(x, memory, memory_mask)
        return self.head(self.norm(x))

    def extra_repr(self) -> str:
        return f"plan_vocab={self.plan_vocab}, plan_len={self.plan_len}"


def _readout_mlp(d_in: int, d_hidden: int, d_out: int, bias: bool, eps: float, factory: dict) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d_in, eps=eps, bias=bias, **factory), nn.Linear(d_in, d_hidden, bias=bias, **factory),
                         nn.GELU(), nn.Linear(d_hidden, d_out, bias=bias, **factory))


class LPath(nn.Module):
    """The side path's modules (``LFormer.side``): ``taps`` (a TapProjector per tap), ``pool``
    (AttentionPooling with ``pooling="attn"``, else None), ``phi`` (an MLP per tap),
    ``aggregator``, ``tree_mlp`` (with ``tree_checkpoint``), ``tool_head``, ``value_head``,
    ``plan_decoder`` (None where not configured)."""

    def __init__(self, c: LFormerConfig, backend: Optional[str], factory: dict) -> None:
        super().__init__()
        d, n = c.d_side, c.n_taps
        eps = c.layer_norm_eps
        self.taps = nn.ModuleList(TapProjector(c.d_model, d, dropout=c.side_dropout, detach=c.detach_taps,
                                               bias=c.bias, layer_norm_eps=eps, **factory) for _ in range(n))
        # one block spanning the whole context: one pooled vector per sequence
        self.pool = (AttentionPooling(d, c.side_heads, block_size=c.max_seq_len, bias=c.bias, backend=backend,
                                      **factory) if c.pooling == "attn" else None)
        self.phi = nn.ModuleList(MLP(d, 4 * d, dropout=c.side_dropout, bias=c.bias, **factory) for _ in range(n))
        self.aggregator = make_depth_aggregator(c.aggregator, d, n, n_heads=c.side_heads,
                                                per_channel=c.alpha_per_channel, alpha_init=c.alpha_init,
                                                dropout=c.side_dropout, bias=c.bias, backend=backend, **factory)
        self.tree_mlp = (_readout_mlp(2 * d, 2 * d, d, c.bias, eps, factory) if c.tree_checkpoint else None)
        self.tool_head = _readout_mlp(d, d, c.n_tools, c.bias, eps, factory) if c.n_tools else None
        self.value_head = _readout_mlp(d, d, 1, c.bias, eps, factory) if c.value_head else None
        self.plan_decoder = (PlanDecoder(d, c.side_heads, c.plan_vocab, c.plan_len, n_layers=c.plan_layers,
                                         dropout=c.side_dropout, bias=c.bias, layer_norm_eps=eps, **factory)
                             if c.plan_vocab else None)


def _pool(x: Tensor, kpm: Optional[Tensor], kind: str, attn: Optional[nn.Module]) -> Tensor:
    """(N, T, d) -> (N, d), ignoring padded tokens (kpm (N, T), True = padding). A fully padded
    row pools to zeros."""
    N, T, d = x.shape
    if kind == "attn":
        return attn(x, key_padding_mask=kpm)[:, 0]
    if kind == "mean":
        if kpm is None:
            return x.mean(1)
        w = (~kpm).to(x.dtype).unsqueeze(-1)
        return (x * w).sum(1) / w.sum(1).clamp_min(1.0)
    # last valid token
    if kpm is None:
        return x[:, -1]
    pos = torch.arange(T, device=x.device).expand(N, T)
    idx = torch.where(kpm, -1, pos).amax(1)  # (N,), -1 when fully padded
    out = x.gather(1, idx.clamp_min(0).view(N, 1, 1).expand(N, 1, d))[:, 0]
    return out * (idx >= 0).to(x.dtype).unsqueeze(-1)


def _value_loss(pred: Tensor, target: Tensor, mask: Optional[Tensor]) -> Tensor:
    """MSE (fp32) over valid entries: finite targets, and ``mask`` True where given. None valid -> 0."""
    target = target.to(torch.float32)
    valid = ~torch.isnan(target)
    if mask is not None:
        valid = valid & mask
    diff = torch.where(valid, pred.float() - torch.nan_to_num(target), 0.0)
    return diff.pow(2).sum() / valid.sum().clamp_min(1)


class LFormer(GPT):
    """GPT + an L-shaped progressive depth-aggregation side path (see the module docstring).

    The base is exactly :class:`GPT` (same parameter names; the side path lives under ``side.``,
    plus ``blend_proj`` / ``blend_gate`` with ``blend_into_lm``), so a trained GPT's state_dict
    loads with ``strict=False``. The LM logits come from the base's last hidden state; with
    ``blend_into_lm`` the LM head reads ``norm_f(h_L) + blend_gate · blend_proj(S^L)`` (token-wise
    S^L: per token, so still causal), ``blend_gate`` a scalar parameter starting at 0.

    ``forward(ids, targets=None, key_padding_mask=None, tool_labels=None, value_targets=None,
    plan_targets=None, value_mask=None) -> LFormerOutput``:

    - ``targets`` (B, T), already shifted; -100 and padded positions are ignored;
    - ``tool_labels`` (B,) in [0, n_tools), -100 = not a tool example (ignored);
    - ``value_targets`` (B,) float, NaN = no target; ``value_mask`` (B,) bool, True = counts;
    - ``plan_targets`` (B, P <= plan_len) in [0, plan_vocab), -100 ignored.

    ``loss`` = Σ weight · part over the parts whose targets were given (lm: ``lambda_lm``, tool,
    value, plan), plus ``alpha_l1 · mean|α| + alpha_l2 · mean α²`` (EMA only, when those weights are
    > 0); None when no target of any kind is given. ``aux_losses`` holds each part unweighted.
    Training phases: :meth:`freeze_base` (phase A), :meth:`unfreeze_last_k` (phase B).
    DDP needs ``find_unused_parameters=True`` when a head has no labels in a batch.
    """

    config_class = LFormerConfig

    def __init__(self, config: LFormerConfig, backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__(config, backend=backend, device=device, dtype=dtype)
        c = config
        if c.blend_into_lm and c.tap_mode != "token":  # the config checks this too; it may have been mutated
            raise ValueError("blend_into_lm needs tap_mode='token' (sequence-wise taps would leak the future), "
                             f"got tap_mode={c.tap_mode!r}")
        factory = {"device": device, "dtype": dtype}
        self.tap_layers = tuple(range(c.tap_every, c.n_layers + 1, c.tap_every))  # indices into [h_0..h_L]
        # built after GPT's parameters: the base's init is GPT's for one seed
        self.side = LPath(c, backend, factory)
        if c.blend_into_lm:
            self.blend_proj = nn.Linear(c.d_side, c.d_model, bias=c.bias, **factory)
            self.blend_gate = nn.Parameter(torch.zeros((), **factory))
        else:
            self.blend_proj = None
            self.blend_gate = None
        self._reset_side()

    # ------------------------------------------------------------------ init
    def _reset_side(self) -> None:
        init_weights(self.side, std=self.config.init_std)
        if self.blend_proj is not None:
            init_weights(self.blend_proj, std=self.config.init_std)
            with torch.no_grad():
                self.blend_gate.zero_()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "side", None) is not None:
            self._reset_side()

    # ---------------------------------------------------------------- phases
    def base_modules(self) -> list[nn.Module]:
        """The base decoder's modules (the LM head is tied to ``tok_emb``)."""
        mods = [self.tok_emb, self.layers, self.norm_f, self.lm_head]
        if self.pos_enc is not None:
            mods.append(self.pos_enc)
        return mods

    def base_parameters(self) -> Iterator[nn.Parameter]:
        seen = set()
        for m in self.base_modules():
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def side_parameters(self) -> Iterator[nn.Parameter]:
        """Everything that is not the base: the side path, heads and blend."""
        base = {id(p) for p in self.base_parameters()}
        return (p for p in self.parameters() if id(p) not in base)

    def freeze_base(self) -> "LFormer":
        """Phase A: no gradient for the base decoder (embeddings, layers, final norm, LM head)."""
        for p in self.base_parameters():
            p.requires_grad_(False)
        return self

    def unfreeze_last_k(self, k: Optional[int] = None) -> "LFormer":
        """Phase B: make the last ``k`` base layers trainable (``None``: the whole base). Other base
        parameters keep their current state (so after :meth:`freeze_base`, ``k=1`` trains exactly
        the last layer plus the side path)."""
        if k is None:
            for p in self.base_parameters():
                p.requires_grad_(True)
            return self
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(self.layers):
            raise ValueError(f"k must be None or an int in [0, n_layers={len(self.layers)}], got {k!r}")
        for layer in list(self.layers)[len(self.layers) - k:]:
            layer.requires_grad_(True)
        return self

    def get_alpha_gates(self) -> Optional[Tensor]:
        """The EMA gates sigmoid(alpha_logits), detached: (n_taps,) or (n_taps, d_side); None for
        the gru / attn aggregators."""
        agg = self.side.aggregator
        return agg.alphas().detach() if hasattr(agg, "alphas") else None

    # --------------------------------------------------------------- side path
    def side_states(self, hidden: list[Tensor], key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """From [h_0..h_L] to all side states (n_taps, B, T, d_side) / (n_taps, B, d_side)."""
        c = self.config
        side = self.side
        z = torch.stack([proj(hidden[l]) for proj, l in zip(side.taps, self.tap_layers)])  # (n, B, T, d)
        if c.tap_mode == "sequence":
            n, B, T, d = z.shape
            kpm = None if key_padding_mask is None else key_padding_mask.repeat(n, 1)
            z = _pool(z.reshape(n * B, T, d), kpm, c.pooling, side.pool).view(n, B, d)
        phi = torch.stack([f(z[i]) for i, f in enumerate(side.phi)])
        return self._aggregate(phi)

    def _aggregate(self, phi: Tensor) -> Tensor:
        """Aggregator over depth, with tree checkpoints: the taps are processed in chunks of k;
        at the end of each full chunk (taps k, 2k, ...) S <- S + tree_mlp(concat(S, S_{l-k}))
        (S_0 = zeros), and the corrected state carries on: as the next chunk's initial state for
        the recurrent ema / gru, as an additive offset for attn (whose states are readouts)."""
        k = self.config.tree_checkpoint
        agg = self.side.aggregator
        kind = self.config.aggregator
        if not k:
            return agg(phi)
        L = phi.shape[0]
        full = agg(phi) if kind == "attn" else None
        prev_ckpt = torch.zeros_like(phi[0])
        carry: Optional[Tensor] = None  # init state (ema, gru) or offset (attn)
        chunks = []
        for s in range(0, L, k):
            e = min(s + k, L)
            if kind == "attn":
                chunk = full[s:e] if carry is None else full[s:e] + carry
            elif kind == "ema":
                chunk = agg(phi[s:e], init=carry, start=s)
            else:
                chunk = agg(phi[s:e], init=carry)
            if e - s == k:
                last = chunk[-1]
                delta = self.side.tree_mlp(torch.cat([last, prev_ckpt], dim=-1))
                new = last + delta
                chunk = torch.cat([chunk[:-1], new.unsqueeze(0)])
                prev_ckpt = new
                if kind == "attn":
                    carry = delta if carry is None else carry + delta
                else:
                    carry = new
            chunks.append(chunk)
        return torch.cat(chunks)

    def summary(self, final_state: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """S^L as one vector per sequence (B, d_side): itself when sequence-wise; token-wise, pooled
        over the valid tokens with ``pooling``."""
        if self.config.tap_mode == "sequence":
            return final_state
        return _pool(final_state, key_padding_mask, self.config.pooling, self.side.pool)

    # ----------------------------------------------------------------- forward
    def _check_labels(self, name: str, x: Tensor, shape: tuple, n_classes: int) -> None:
        if x.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
        if not torch.compiler.is_compiling():
            ok = ((x >= 0) & (x < n_classes)) | (x == IGNORE_INDEX)
            if not bool(ok.all()):
                raise ValueError(f"{name} must be in [0, {n_classes}) or -100 (ignored), got values "
                                 f"{sorted(set(x[~ok].tolist()))[:8]}")

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                tool_labels: Optional[Tensor] = None, value_targets: Optional[Tensor] = None,
                plan_targets: Optional[Tensor] = None, value_mask: Optional[Tensor] = None) -> LFormerOutput:
        c = self.config
        side = self.side
        kpm = key_padding_mask
        hidden = self.hidden_states(ids, kpm)  # checks ids and the mask
        B = ids.shape[0]
        states = self.side_states(hidden, kpm)
        final = states[-1]

        x = self.norm_f(hidden[-1])
        if self.blend_gate is not None:
            x = x + self.blend_gate.to(x.dtype) * self.blend_proj(final).to(x.dtype)
        logits = self.lm_head(x)

        need_summary = side.tool_head is not None or side.value_head is not None
        summ = self.summary(final, kpm) if need_summary else None
        tool_logits = side.tool_head(summ) if side.tool_head is not None else None
        values = side.value_head(summ).squeeze(-1) if side.value_head is not None else None

        parts: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        if targets is not None:
            parts["lm"], weights["lm"] = lm_loss(logits, targets, kpm), c.lambda_lm
        if tool_labels is not None:
            if tool_logits is None:
                raise ValueError("tool_labels given but the model has no tool head (n_tools=0)")
            self._check_labels("tool_labels", tool_labels, (B,), c.n_tools)
            parts["tool"], weights["tool"] = classification_loss(tool_logits, tool_labels), c.lambda_tool
        if value_targets is not None:
            if values is None:
                raise ValueError("value_targets given but the model has no value head (value_head=False)")
            if value_targets.shape != (B,):
                raise ValueError(f"value_targets must have shape {(B,)}, got {tuple(value_targets.shape)}")
            if value_mask is not None and (value_mask.shape != (B,) or value_mask.dtype != torch.bool):
                raise ValueError(f"value_mask must be a bool tensor of shape {(B,)} (True = counts)")
            parts["value"], weights["value"] = _value_loss(values, value_targets, value_mask), c.lambda_value
        plan_logits = None
        if plan_targets is not None:
            if side.plan_decoder is None:
                raise ValueError("plan_targets given but the model has no plan decoder (plan_vocab=0)")
            if plan_targets.dim() != 2 or plan_targets.shape[0] != B or not 1 <= plan_targets.shape[1] <= c.plan_len:
                raise ValueError(f"plan_targets must be (B={B}, P) with 1 <= P <= plan_len={c.plan_len}, "
                                 f"got {tuple(plan_targets.shape)}")
            self._check_labels("plan_targets", plan_targets, tuple(plan_targets.shape), c.plan_vocab)
            if c.tap_mode == "token":
                memory, mmask = final, kpm
            else:
                memory, mmask = states.transpose(0, 1), None  # (B, n_taps, d_side)
            plan_logits = side.plan_decoder(plan_targets, memory, mmask)
            parts["plan"], weights["plan"] = lm_loss(plan_logits, plan_targets), c.lambda_plan

        loss = None
        if parts:
            if c.aggregator == "ema":
                alphas = side.aggregator.alphas().float()
                if c.alpha_l1 > 0:
                    parts["alpha_l1"], weights["alpha_l1"] = alphas.abs().mean(), c.alpha_l1
                if c.alpha_l2 > 0:
                    parts["alpha_l2"], weights["alpha_l2"] = alphas.pow(2).mean(), c.alpha_l2
            loss = sum(weights[name] * part for name, part in parts.items())
        return LFormerOutput(logits=logits, loss=loss, aux_losses=parts, tool_logits=tool_logits, values=values,
                             plan_logits=plan_logits, side_states=states)

    # --------------------------------------------------------------- KV cache
    @property
    def supports_kv_cache(self) -> bool:
        """Always: the LM logits are the base decoder's (sequence-wise taps, or no blend), or the base's
        blended per token with the token-wise side path, which mixes no positions."""
        return True

    def forward_step(self, ids: Tensor, cache, start_pos: Optional[int] = None) -> ModelOutput:
        """Cached logits (B, T, vocab) of ``ids`` (B, T) at positions ``start_pos ..`` (default
        ``cache.length``), equal to :meth:`forward`'s. Without ``blend_into_lm`` (always the case with
        sequence-wise taps) this is the base decoder's KV-cached step and the side path is skipped; with it,
        each new token's taps, φ, the depth aggregator and the blend gate run on that token only."""
        if self.blend_gate is None:
            return super().forward_step(ids, cache, start_pos)
        h, pos, ragged = self._embed_step(ids, cache, start_pos)
        hidden = [h]
        for i, layer in enumerate(self.layers):
            hidden.append(layer.forward_cached(hidden[-1], cache.k[i], cache.v[i], pos, ragged))
        cache.length = pos + ids.shape[1]
        final = self.side_states(hidden)[-1]  # token-wise: (B, T, d_side), per token
        x = self.norm_f(hidden[-1])
        x = x + self.blend_gate.to(x.dtype) * self.blend_proj(final).to(x.dtype)
        return ModelOutput(logits=self.lm_head(x))

    def extra_repr(self) -> str:
        c = self.config
        return (f"num_parameters={self.num_parameters()}, taps={list(self.tap_layers)}, tap_mode={c.tap_mode!r}, "
                f"aggregator={c.aggregator!r}, blend_into_lm={c.blend_into_lm}")
