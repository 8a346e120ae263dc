"""NPT: neuro-plastic layers for a Llama-style decoder (DESIGN.md, "Models" -> NPT).

An NP layer drops the attention residual and lets the attention output ``a`` modulate the MLP's
weights instead, one token at a time::

    standard:  h' = h + a + MLP(RMSNorm_post(h + a))
    NPT:       h' = h + MLP_mod(RMSNorm_post(h))          (the layer's own post-attention norm)

For each modulated projection P of the SwiGLU MLP (``single`` = gate; ``dual`` = gate + up, the default;
``triple`` = gate + up + down), ``a`` generates ``num_ranks`` (k) pairs of vectors through a bottleneck of
width ``np_rank`` (r) shared by all projections::

    z      = W_down a                     W_down: d -> r
    v_a,k  = (W_a,P z)_k                  P's input dim   (k of them)
    v_b,k  = (W_b,P z)_k                  P's output dim
    P_mod(x) = W_P x + sum_k v_b,k (v_a,k . x)

per token; the rank-k update ``sum_k v_b,k v_a,k^T`` is never materialized. The v_b generators start at
zero and the v_a generators (and W_down) random, LoRA-style: the modulation starts at exactly 0 and both
generators receive gradient once training starts.

API: :func:`convert_to_npt`, :func:`freeze_base`, :func:`set_npt_mode` / :func:`standard_mode`,
:func:`save_np_weights` / :func:`load_np_weights` / :func:`load_npt`, :func:`scaffolded_forward` (teacher
scaffolding used by ``hilt npt-train``), :func:`parse_layers`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .llama import LlamaLayer

__all__ = [
    "MODULATE", "NPTConfig", "NPTError", "NPComponent", "NPTLayer", "parse_layers", "convert_to_npt",
    "npt_layers", "freeze_base", "np_parameters", "np_state_dict", "set_npt_mode", "standard_mode",
    "revert_layers", "save_np_weights", "load_np_weights", "load_npt", "scaffolded_forward", "ScaffoldOutput",
    "LayerStats", "lerp_states", "NP_FORMAT_VERSION", "read_np_metadata", "register_converter", "base_identity",
    "layer_stats", "BASE_IDENTITY_ATTR",
]

MODULATE = {"single": ("gate",), "dual": ("gate", "up"), "triple": ("gate", "up", "down")}
PROJ_ATTR = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
NP_FORMAT_VERSION = 1
BASE_IDENTITY_ATTR = "hilt_base_identity"  # a model may carry its identity, computed before any cast


class NPTError(ValueError):
    """A bad NPT request (layer spec, settings) or an NP weights file that does not fit the model."""


@dataclass
class NPTConfig:
    """What :func:`convert_to_npt` did; stored with the NP weights so they can be loaded again."""

    layers: list = field(default_factory=list)
    np_rank: int = 64
    num_ranks: int = 1
    modulate: str = "dual"

    def validate(self) -> "NPTConfig":
        for name in ("np_rank", "num_ranks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise NPTError(f"{name} must be an int >= 1, got {v!r}")
        if self.modulate not in MODULATE:
            raise NPTError(f"modulate must be one of {', '.join(MODULATE)}, got {self.modulate!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------- the NP module

class NPComponent(nn.Module):
    """Generates the per-token rank-k modulation of the MLP projections from the attention output.

    ``W_down`` (d -> r, shared), and per modulated projection P: ``v_a_gen[P]`` (r -> k * in_P) and
    ``v_b_gen[P]`` (r -> k * out_P). :meth:`mlp_mod` computes ``MLP_mod(x)`` for a SwiGLU MLP with
    ``gate_proj``/``up_proj``/``down_proj``/``act_fn`` (ours or Hugging Face's)."""

    def __init__(self, d_model: int, d_ff: int, np_rank: int = 64, num_ranks: int = 1, modulate: str = "dual",
                 device=None, dtype=None) -> None:
        super().__init__()
        NPTConfig(np_rank=np_rank, num_ranks=num_ranks, modulate=modulate).validate()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_ff = d_model, d_ff
        self.np_rank, self.num_ranks, self.modulate = np_rank, num_ranks, modulate
        self.projections = MODULATE[modulate]
        self.dims = {"gate": (d_model, d_ff), "up": (d_model, d_ff), "down": (d_ff, d_model)}
        self.W_down = nn.Linear(d_model, np_rank, bias=False, **factory)
        self.v_a_gen = nn.ModuleDict({p: nn.Linear(np_rank, num_ranks * self.dims[p][0], bias=False, **factory)
                                      for p in self.projections})
        self.v_b_gen = nn.ModuleDict({p: nn.Linear(np_rank, num_ranks * self.dims[p][1], bias=False, **factory)
                                      for p in self.projections})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W_down ~ N(0, 1/d); v_a generators ~ N(0, 1/(r * in_P)) so that ``v_a . x`` has about the scale of
        ``a`` for a unit-RMS ``x``; v_b generators at zero (the modulation starts at exactly 0)."""
        nn.init.normal_(self.W_down.weight, std=self.d_model ** -0.5)
        for p in self.projections:
            nn.init.normal_(self.v_a_gen[p].weight, std=(self.np_rank * self.dims[p][0]) ** -0.5)
            nn.init.zeros_(self.v_b_gen[p].weight)

    def vectors(self, a: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """{P: (v_a (..., k, in_P), v_b (..., k, out_P))} from the attention output ``a`` (..., d)."""
        z = self.W_down(a)
        k = self.num_ranks
        out = {}
        for p in self.projections:
            n_in, n_out = self.dims[p]
            out[p] = (self.v_a_gen[p](z).unflatten(-1, (k, n_in)), self.v_b_gen[p](z).unflatten(-1, (k, n_out)))
        return out

    @staticmethod
    def modulated(linear: nn.Linear, x: Tensor, v_a: Tensor, v_b: Tensor) -> Tensor:
        """``W x (+ b) + sum_k v_b,k (v_a,k . x)`` without forming the rank-k matrix."""
        y = linear(x)
        s = torch.einsum("...ki,...i->...k", v_a, x.to(v_a.dtype))
        return y + torch.einsum("...k,...ko->...o", s, v_b).to(y.dtype)

    def mlp_mod(self, mlp: nn.Module, x: Tensor, a: Tensor, vectors: Optional[dict] = None) -> Tensor:
        """``down(act(gate_mod(x)) * up_mod(x))`` with the projections in ``self.projections`` modulated;
        ``x`` is the normalised MLP input, ``a`` the attention output (or precomputed ``vectors``)."""
        vec = self.vectors(a) if vectors is None else vectors

        def proj(name: str, inp: Tensor) -> Tensor:
            lin = getattr(mlp, PROJ_ATTR[name])
            if name in vec:
                return self.modulated(lin, inp, *vec[name])
            return lin(inp)

        y = proj("down", mlp.act_fn(proj("gate", x)) * proj("up", x))
        drop = getattr(mlp, "dropout", None)
        return drop(y) if isinstance(drop, nn.Module) else y

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, np_rank={self.np_rank}, num_ranks={self.num_ranks}, "
                f"modulate={self.modulate!r}")


class NPTLayer(nn.Module):
    """A :class:`~hilt.models.llama.LlamaLayer` with an NP component. It owns the original layer's modules
    under the same names (``input_norm``, ``attn``, ``post_attn_norm``, ``mlp``), so base weights keep their
    ``state_dict`` names; the NP weights live under ``np.``.

    ``npt_mode`` True (default): ``h + MLP_mod(post_attn_norm(h))`` with ``a = attn(input_norm(h))``;
    False: exactly the original layer. :meth:`npt_forward` takes separate attention and MLP-residual inputs
    (teacher scaffolding); ``forward(x)`` is ``npt_forward(x, x)``."""

    def __init__(self, layer: LlamaLayer, np_rank: int = 64, num_ranks: int = 1, modulate: str = "dual") -> None:
        super().__init__()
        self.input_norm = layer.input_norm
        self.attn = layer.attn
        self.post_attn_norm = layer.post_attn_norm
        self.mlp = layer.mlp
        w = self.mlp.gate_proj.weight
        self.np = NPComponent(w.shape[1], w.shape[0], np_rank, num_ranks, modulate, device=w.device, dtype=w.dtype)
        self.npt_mode = True

    def attention(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``a = attn(input_norm(x))``."""
        return self.attn(self.input_norm(x), key_padding_mask)

    def standard_from(self, x: Tensor, a: Tensor) -> Tensor:
        """The original layer given its attention output: ``h = x + a``; ``h + MLP(post_attn_norm(h))``."""
        h = x + a
        return h + self.mlp(self.post_attn_norm(h))

    def npt_forward(self, attn_in: Tensor, mlp_in: Tensor, key_padding_mask: Optional[Tensor] = None,
                    return_parts: bool = False):
        """``mlp_in + MLP_mod(post_attn_norm(mlp_in))`` with ``a = attn(input_norm(attn_in))``.
        ``return_parts``: also ``(a, delta, vectors)`` where ``delta = MLP_mod(...)``."""
        a = self.attention(attn_in, key_padding_mask)
        vectors = self.np.vectors(a)
        delta = self.np.mlp_mod(self.mlp, self.post_attn_norm(mlp_in), a, vectors)
        out = mlp_in + delta
        return (out, a, delta, vectors) if return_parts else out

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if not self.npt_mode:
            return self.standard_from(x, self.attention(x, key_padding_mask))
        return self.npt_forward(x, x, key_padding_mask)

    def forward_cached(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int, ragged=None) -> Tensor:
        """:meth:`forward` for new tokens at positions ``pos ..`` with a KV cache (either mode): the cached
        attention output ``a`` modulates the MLP in NPT mode, or is added back in standard mode
        (``ragged``: left-padded rows, see :meth:`LlamaAttention.forward_cached`)."""
        a = self.attn.forward_cached(self.input_norm(x), k_cache, v_cache, pos, ragged)
        if not self.npt_mode:
            return self.standard_from(x, a)
        return x + self.np.mlp_mod(self.mlp, self.post_attn_norm(x), a)

    def to_standard_layer(self) -> LlamaLayer:
        """A plain :class:`LlamaLayer` sharing this layer's base modules (the NP component dropped)."""
        layer = LlamaLayer.__new__(LlamaLayer)
        nn.Module.__init__(layer)
        layer.input_norm, layer.attn = self.input_norm, self.attn
        layer.post_attn_norm, layer.mlp = self.post_attn_norm, self.mlp
        return layer

    def extra_repr(self) -> str:
        return f"npt_mode={self.npt_mode}"


# ------------------------------------------------------------------------------------ layer selection

_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?$")


def parse_layers(spec: Union[str, int, Sequence[int]], n_layers: int) -> list[int]:
    """Layer indices (sorted, 0-based) from ``"all"``, ``"upper_half"``, ``"lower_half"``, ``"8-11"``,
    ``"8,9,11"``, ``"0-1,5"``, an int or a list of ints. Raises :class:`NPTError` naming the bad part."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise NPTError(f"the model must have at least one layer, got n_layers={n_layers!r}")
    valid = f"valid layers are 0..{n_layers - 1}"
    if isinstance(spec, bool):
        raise NPTError(f"layers must be a string, an int or a list of ints, got {spec!r}")
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return list(range(n_layers))
        if s in ("upper_half", "upper-half"):
            return list(range(n_layers // 2, n_layers))
        if s in ("lower_half", "lower-half"):
            return list(range(max(1, n_layers // 2)))
        if not s:
            raise NPTError(f"layers must not be empty ('all', 'upper_half', 'lower_half', '8-11', '8,9' or a list; "
                           f"{valid})")
        out: list[int] = []
        for part in s.split(","):
            m = _RANGE.match(part)
            if not m:
                raise NPTError(f"layers {spec!r}: cannot read {part.strip()!r} (use 'all', 'upper_half', "
                               f"'lower_half', 'A-B' or 'A,B,C'; {valid})")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise NPTError(f"layers {spec!r}: range {part.strip()!r} is empty (start > end)")
            out.extend(range(lo, hi + 1))
        idx = out
    else:
        try:
            idx = list(spec)
        except TypeError:
            raise NPTError(f"layers must be a string, an int or a list of ints, got {spec!r}") from None
        if not idx:
            raise NPTError(f"layers must not be empty ({valid})")
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, int):
                raise NPTError(f"layers: {i!r} is not an int")
    for i in idx:
        if not 0 <= i < n_layers:
            raise NPTError(f"layers: {i} is out of range ({valid})")
    if len(set(idx)) != len(idx):
        dup = sorted({i for i in idx if idx.count(i) > 1})
        raise NPTError(f"layers: {dup} given more than once")
    return sorted(idx)


def _layer_list(model: nn.Module) -> nn.ModuleList:
    """The decoder layers: ``model.layers`` (hilt Llama, HF LlamaModel) or ``model.model.layers`` (HF
    LlamaForCausalLM)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise NPTError(f"{type(model).__name__} has no .layers ModuleList (convert_to_npt works on "
                       f"hilt.models.Llama; for Hugging Face models use hilt.hf)")
    return layers


def _is_np_layer(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "np", None), NPComponent)


def npt_layers(model: nn.Module) -> list[int]:
    """Indices of the NP layers of ``model``."""
    return [i for i, layer in enumerate(_layer_list(model)) if _is_np_layer(layer)]


def convert_to_npt(model: nn.Module, layers: Union[str, int, Sequence[int]] = "upper_half", *, np_rank: int = 64,
                   num_ranks: int = 1, modulate: str = "dual") -> list[int]:
    """Replace the chosen :class:`LlamaLayer` s of ``model`` (in place) by :class:`NPTLayer` s sharing their
    weights; returns the converted indices. ``layers``: see :func:`parse_layers`. The model remembers the
    settings in ``model.npt_config`` (all its NP layers must share them)."""
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
        if not isinstance(layer, LlamaLayer):
            raise NPTError(f"layer {i} is a {type(layer).__name__}, not a LlamaLayer")
    for i in idx:
        mlayers[i] = NPTLayer(mlayers[i], np_rank, num_ranks, modulate)
    cfg.layers = npt_layers(model)
    model.npt_config = cfg
    return idx


def revert_layers(model: nn.Module, layers: Union[str, int, Sequence[int], None] = None) -> list[int]:
    """Turn NP layers back into plain :class:`LlamaLayer` s (their NP weights are dropped)."""
    idx = npt_layers(model) if layers is None else parse_layers(layers, len(_layer_list(model)))
    mlayers = _layer_list(model)
    for i in idx:
        if not isinstance(mlayers[i], NPTLayer):
            raise NPTError(f"layer {i} is not an NP layer")
        mlayers[i] = mlayers[i].to_standard_layer()
    if getattr(model, "npt_config", None) is not None:
        model.npt_config.layers = npt_layers(model)
    return idx


def set_npt_mode(model: nn.Module, enabled: bool = True, layers: Union[str, int, Sequence[int], None] = None) -> None:
    """Switch NP layers (all, or ``layers``) between NPT mode (True) and standard mode (False)."""
    mlayers = _layer_list(model)
    idx = npt_layers(model) if layers is None else parse_layers(layers, len(mlayers))
    for i in idx:
        if not _is_np_layer(mlayers[i]):
            raise NPTError(f"layer {i} is not an NP layer")
        mlayers[i].npt_mode = bool(enabled)


@contextlib.contextmanager
def standard_mode(model: nn.Module):
    """Run every NP layer as the original layer inside the block (the teacher), then restore the modes."""
    mlayers = _layer_list(model)
    saved = {i: mlayers[i].npt_mode for i in npt_layers(model)}
    try:
        for i in saved:
            mlayers[i].npt_mode = False
        yield model
    finally:
        for i, m in saved.items():
            mlayers[i].npt_mode = m


def _is_np_name(name: str) -> bool:
    return ".np." in f".{name}"


def np_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if _is_np_name(n)]


def np_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the NP weights (``layers.<i>.np.*``)."""
    return {k: v for k, v in model.state_dict().items() if _is_np_name(k)}


def freeze_base(model: nn.Module) -> int:
    """Freeze everything but the NP weights; returns the number of trainable parameters."""
    if not np_parameters(model):
        raise NPTError("the model has no NP layers: call convert_to_npt first")
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(_is_np_name(name))
        n += p.numel() if p.requires_grad else 0
    return n


# ---------------------------------------------------------------------------------- save / load

def base_identity(model: nn.Module, *, recorded: bool = True) -> dict:
    """The identity of the base model NP weights belong to: ``{"model_type", "num_layers", "hidden_size",
    "sha256"}``, the hash over the base (non-NP) state dict in float32 (sorted names, shapes, values).

    ``recorded``: return ``model.hilt_base_identity`` when the loader stored one (hilt.hf records it as
    loaded, before a cast to bfloat16); otherwise it is computed from the model as it is now."""
    if recorded and isinstance(getattr(model, BASE_IDENTITY_ATTR, None), dict):
        return dict(getattr(model, BASE_IDENTITY_ATTR))
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "num_hidden_layers"):  # Hugging Face
        model_type = f"hf:{getattr(cfg, 'model_type', type(model).__name__)}"
        n_layers, hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    else:
        model_type = f"hilt:{type(model).__name__.lower()}"
        n_layers, hidden = len(_layer_list(model)), int(getattr(cfg, "d_model", 0))
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if _is_np_name(name) or not torch.is_tensor(t):
            continue
        v = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        h.update(f"{name}\0{tuple(v.shape)}\0".encode())
        h.update(v.numpy().tobytes() if v.numel() else b"")
    return {"model_type": model_type, "num_layers": n_layers, "hidden_size": hidden, "sha256": h.hexdigest()}


def _check_identity(model: nn.Module, path: Path, saved: dict) -> None:
    mine = base_identity(model)
    diff = [k for k in ("model_type", "num_layers", "hidden_size", "sha256") if saved.get(k) != mine.get(k)]
    if diff:
        what = ", ".join(f"{k} {saved.get(k)!r} (file) vs {mine.get(k)!r} (model)" for k in diff)
        raise NPTError(f"{path}: these NP weights were trained on a different base model: {what}. Load them onto "
                       "the base they were trained on")


def save_np_weights(model: nn.Module, path: Union[str, os.PathLike], metadata: Optional[dict] = None) -> Path:
    """Write only the NP weights to a safetensors file, atomically (temp file, fsync, rename). The file's
    metadata holds the NPT settings (and the base model's config when it has one)."""
    from safetensors.torch import save_file

    path = Path(path)
    cfg = getattr(model, "npt_config", None)
    sd = {k: v.detach().contiguous().cpu() for k, v in np_state_dict(model).items()}
    if cfg is None or not sd:
        raise NPTError("the model has no NP layers to save")
    meta = {"hilt_npt_format": str(NP_FORMAT_VERSION), "npt_config": json.dumps(cfg.to_dict())}
    meta["base_identity"] = json.dumps(base_identity(model))
    base_cfg = getattr(model, "config", None)
    if base_cfg is not None and hasattr(base_cfg, "to_dict"):
        with contextlib.suppress(TypeError, ValueError):
            meta["base_config"] = json.dumps(base_cfg.to_dict(), default=str)
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def read_np_metadata(path: Union[str, os.PathLike]) -> dict:
    """The metadata of an NP weights file (``npt_config`` etc. decoded)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise NPTError(f"NP weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as h:
            meta = dict(h.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise NPTError(f"{path}: cannot read it ({e})") from None
    if meta.get("hilt_npt_format") != str(NP_FORMAT_VERSION):
        raise NPTError(f"{path}: not a hilt NP weights file (format {meta.get('hilt_npt_format')!r})")
    out = dict(meta)
    for k, v in meta.items():
        if k != "hilt_npt_format":
            with contextlib.suppress(ValueError):
                out[k] = json.loads(v)
    return out


_CONVERTERS: list[tuple[Callable[[nn.Module], bool], Callable[..., list[int]]]] = []


def register_converter(accepts: Callable[[nn.Module], bool], convert: Callable[..., list[int]]) -> None:
    """Teach :func:`load_np_weights` to convert a model whose layers are not :class:`LlamaLayer` s:
    ``accepts(first_layer)`` says whether ``convert(model, layers, np_rank=, num_ranks=, modulate=)`` applies.
    :mod:`hilt.hf` registers the Hugging Face Llama converter when imported (so this module never imports
    the adapter)."""
    _CONVERTERS.append((accepts, convert))


def _converter_for(model: nn.Module) -> Callable[..., list[int]]:
    first = _layer_list(model)[0]
    if isinstance(first, LlamaLayer):
        return convert_to_npt
    for accepts, convert in reversed(_CONVERTERS):
        if accepts(first):
            return convert
    raise NPTError(f"{type(model).__name__}: its layers ({type(first).__name__}) are not hilt Llama layers and no "
                   "converter is registered for them; for a Hugging Face model, `import hilt.hf` first (it "
                   "registers convert_hf_llama_to_npt)")


def load_np_weights(model: nn.Module, path: Union[str, os.PathLike], check_base: bool = True) -> list[int]:
    """Load NP weights saved by :func:`save_np_weights` into ``model``. A model without NP layers is
    converted first with the saved settings; one with NP layers must match them. Returns the NP layers.

    ``check_base``: when the file records the identity of its base (:func:`base_identity`), the model's
    must match, else :class:`NPTError` (files without one load unchecked)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_np_metadata(path)
    saved = meta["npt_config"]
    if check_base and isinstance(meta.get("base_identity"), dict):
        _check_identity(model, path, meta["base_identity"])
    if not npt_layers(model):
        convert = _converter_for(model)
        convert(model, saved["layers"], np_rank=saved["np_rank"], num_ranks=saved["num_ranks"],
                modulate=saved["modulate"])
    cfg = model.npt_config
    mine = {"layers": cfg.layers, "np_rank": cfg.np_rank, "num_ranks": cfg.num_ranks, "modulate": cfg.modulate}
    if mine != {k: saved[k] for k in mine}:
        raise NPTError(f"{path}: NP settings {saved} do not match the model's {mine}")
    sd = load_file(str(path))
    expected = np_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise NPTError(f"{path}: does not fit the model (missing {missing[:4]}, unexpected {unexpected[:4]})")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise NPTError(f"{path}: shape mismatch for {k}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=False)
    return list(cfg.layers)


def load_npt(np_path: Union[str, os.PathLike], base: Union[str, os.PathLike, None] = None,
             device="cpu") -> nn.Module:
    """A base checkpoint (``base``, default: the ``base_checkpoint`` recorded in the NP file) loaded with
    :func:`hilt.load`, converted, with the NP weights loaded; in eval mode, NP layers in NPT mode."""
    from hilt.training.checkpoint import load

    meta = read_np_metadata(np_path)
    base = base if base is not None else meta.get("base_checkpoint")
    if base is None:
        raise NPTError(f"{np_path}: no base_checkpoint recorded; pass base=")
    model = load(base, device="cpu")
    load_np_weights(model, np_path)
    return model.to(device).eval()


# ------------------------------------------------------------------------------ teacher scaffolding

def lerp_states(teacher: Tensor, student: Tensor, ratio: float) -> Tensor:
    """``(1 - r) teacher + r student``: r = 0 is exactly the teacher, r = 1 exactly the student."""
    if ratio == 0.0:
        return teacher
    if ratio == 1.0:
        return student
    return (1.0 - ratio) * teacher + ratio * student


@dataclass
class LayerStats:
    """One NP layer's numbers from a scaffolded forward (tensors, 0-dim unless said)."""

    direct_loss: Tensor                  # MSE(MLP_mod(...), teacher's a + MLP(norm(h + a)))
    reg: Tensor                          # sum over projections of mean ||v_a||^2 + mean ||v_b||^2
    v_a_norm: Tensor                     # mean per-token ||v_a,k|| over projections and ranks
    v_b_norm: Tensor
    v_a_attn_cos: Tensor                 # (num_ranks,): mean cos(v_a,k, a), over tokens and d-input projections


@dataclass
class ScaffoldOutput:
    student_logits: Tensor
    teacher_logits: Tensor
    layers: dict                          # layer index -> LayerStats


def _masked_mean(x: Tensor, keep: Optional[Tensor]) -> Tensor:
    """Mean over every element; ``keep`` (B, T) bool restricts to those tokens (x: (B, T, ...))."""
    if keep is None:
        return x.mean()
    w = keep.to(x.dtype).reshape(keep.shape + (1,) * (x.dim() - 2))
    return (x * w).sum() / (w.sum() * (x[0, 0].numel())).clamp_min(1)


def _v_a_attn_cos(vectors: dict, a: Tensor, keep: Optional[Tensor]) -> Tensor:
    """(k,) mean cosine similarity between each rank's v_a and the attention output, over the projections
    whose v_a lives in the model dim (gate, up), every rank separately."""
    cos = []
    for v_a, _ in vectors.values():
        if v_a.shape[-1] == a.shape[-1]:
            c = F.cosine_similarity(v_a.float(), a.float().unsqueeze(-2).expand_as(v_a), dim=-1, eps=1e-8)  # (B,T,k)
            if keep is None:
                cos.append(c.mean(dim=(0, 1)))
            else:
                w = keep.float().unsqueeze(-1)
                cos.append((c * w).sum(dim=(0, 1)) / w.sum().clamp_min(1))
    if not cos:
        k = next(iter(vectors.values()))[0].shape[-2]
        return torch.zeros(k, device=a.device)
    return torch.stack(cos).mean(0)


def scaffolded_forward(model: nn.Module, ids: Tensor, attn_ratio: float = 1.0, mlp_ratio: float = 1.0,
                       key_padding_mask: Optional[Tensor] = None) -> ScaffoldOutput:
    """One teacher-scaffolded pass (DESIGN.md, NPT).

    The teacher is ``model`` with every NP layer in standard mode, run without gradient: it gives each
    layer's input ``h_t``, attention output ``a_t`` and update ``a_t + MLP(norm(h_t + a_t))``, and the
    teacher logits. The student stream ``h_s`` equals the teacher's below the first NP layer (the base is
    frozen); at NP layer i the attention input is ``(1 - attn_ratio) h_t + attn_ratio h_s`` and the MLP
    residual input ``(1 - mlp_ratio) h_t + mlp_ratio h_s``; the layer's output always propagates to the
    next layer; standard layers run on the student stream. ``attn_ratio = mlp_ratio = 1`` is exactly the
    NPT model's own forward (the same code as generation: RoPE, causal mask)."""
    for name, r in (("attn_ratio", attn_ratio), ("mlp_ratio", mlp_ratio)):
        if not 0.0 <= float(r) <= 1.0:
            raise NPTError(f"{name} must be in [0, 1], got {r}")
    idx = npt_layers(model)
    if not idx:
        raise NPTError("the model has no NP layers: call convert_to_npt first")
    layers = _layer_list(model)
    keep = None if key_padding_mask is None else ~key_padding_mask

    # teacher: standard mode, no gradient
    t_in, t_attn, t_delta = {}, {}, {}
    with torch.no_grad():
        h = model.embed(ids)
        for i, layer in enumerate(layers):
            if isinstance(layer, NPTLayer):
                t_in[i] = h
                a = layer.attention(h, key_padding_mask)
                h_next = layer.standard_from(h, a)
                t_attn[i], t_delta[i] = a, a + layer.mlp(layer.post_attn_norm(h + a))
                h = h_next
            else:
                h = layer(h, key_padding_mask)
        teacher_logits = model.head(h)

    # student: from the first NP layer on (recomputed from the embedding when base weights train)
    first = idx[0]
    base_trains = any(p.requires_grad for n, p in model.named_parameters() if not _is_np_name(n))
    if base_trains:
        h_s = model.embed(ids)
        for i in range(first):
            h_s = layers[i](h_s, key_padding_mask)
    else:
        h_s = t_in[first]
    stats = {}
    for i in range(first, len(layers)):
        layer = layers[i]
        if not isinstance(layer, NPTLayer):
            h_s = layer(h_s, key_padding_mask)
            continue
        attn_in = lerp_states(t_in[i], h_s, float(attn_ratio))
        mlp_in = lerp_states(t_in[i], h_s, float(mlp_ratio))
        h_s, a, delta, vectors = layer.npt_forward(attn_in, mlp_in, key_padding_mask, return_parts=True)
        stats[i] = layer_stats(delta, t_delta[i], vectors, a, keep)
    return ScaffoldOutput(model.head(h_s), teacher_logits, stats)


def layer_stats(delta: Tensor, target: Tensor, vectors: dict, a: Tensor, keep: Optional[Tensor] = None) -> LayerStats:
    """An NP layer's :class:`LayerStats` from its ``delta = MLP_mod(...)`` (B, T, d), the teacher's update
    ``target`` (B, T, d), its v vectors and attention output ``a`` (B, T, d); ``keep`` (B, T) masks tokens."""
    direct = _masked_mean((delta.float() - target.float()) ** 2, keep)
    reg = sum(_masked_mean(v_a.float().pow(2).sum(-1).sum(-1, keepdim=True), keep)
              + _masked_mean(v_b.float().pow(2).sum(-1).sum(-1, keepdim=True), keep)
              for v_a, v_b in vectors.values())
    with torch.no_grad():
        va = torch.stack([_masked_mean(v.float().norm(dim=-1), keep) for v, _ in vectors.values()]).mean()
        vb = torch.stack([_masked_mean(v.float().norm(dim=-1), keep) for _, v in vectors.values()]).mean()
        cos = _v_a_attn_cos(vectors, a.detach(), keep)
    return LayerStats(direct, reg, va, vb, cos)
