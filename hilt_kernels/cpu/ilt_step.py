"""The Inter-Layer Transformer's decoding step in one call of the CPU library (``csrc/cpu/ilt_step.cpp``).

HILT runs one ILT per layer boundary for every decoded token. Through PyTorch that is ~30 ops of a few
hundred nanoseconds of arithmetic and ~2 us of dispatch each; the library runs the whole ILT in one call.
:class:`PackedILT` packs an ILT's weights once (fp32, on the CPU) and runs
``base + scale * ILT(prev, cur)`` for up to :func:`max_tokens` tokens per call (:data:`MAX_TOKENS` divided by
PyTorch's thread count); beyond that :meth:`hilt.nn.InterLayerTransformer.step` runs it as PyTorch ops, whose
BLAS catches up with the library's single thread on larger calls: on the development CPU, with 1 thread, at
~64 tokens for d_model 216 / ilt_dim 104 and beyond 256 for d_model 128 / ilt_dim 64; with 2 threads at ~16 and
~32 (``python benchmarks/bench_ilt_step.py [--threads N]``, results in benchmarks/results/ilt_step_cpu*.md).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _lib

__all__ = ["MAX_TOKENS", "PackedILT", "max_tokens", "pack", "unavailable_reason"]

MAX_TOKENS = 16
"""Most tokens (rows of ``prev``) per call that go to the library when PyTorch runs one thread."""


def max_tokens() -> int:
    """Tokens per call that go to the library: ``MAX_TOKENS // torch.get_num_threads()`` (at least 1), since
    the library runs on one thread and PyTorch's BLAS on all of them."""
    return max(1, MAX_TOKENS // torch.get_num_threads())


def unavailable_reason(ilt) -> Optional[str]:
    """None when :func:`pack` can pack ``ilt`` for the library, else why not."""
    lib, why = _lib.load()
    if lib is None:
        return why
    w = ilt.proj_in.weight
    if w.device.type != "cpu":
        return f"the ILT's parameters are on {w.device}, the library runs on the CPU"
    if w.dtype != torch.float32:
        return f"the ILT's parameters are {w.dtype}, the library runs fp32 only"
    return None


def pack(ilt) -> Optional["PackedILT"]:
    """A :class:`PackedILT` of ``ilt`` (an :class:`~hilt.nn.InterLayerTransformer`), or None when the
    library cannot run it (see :func:`unavailable_reason`)."""
    return None if unavailable_reason(ilt) is not None else PackedILT(ilt)


class PackedILT:
    """An ILT's weights packed for ``hilt_ilt_step_f32`` (detached copies: pack again after the
    parameters change). Calling it runs the step; :meth:`accepts` says whether a call can go here."""

    def __init__(self, ilt) -> None:
        lib, why = _lib.load()
        if lib is None:
            raise RuntimeError(why)
        self._fn = lib.hilt_ilt_step_f32
        I, d, L = ilt.ilt_dim, ilt.d_model, ilt.n_layers
        F = ilt.layers[0].mlp.d_ff if L else 1
        self.d, self.I, self.H, self.F, self.L, self.causal = d, I, ilt.n_heads, F, L, bool(ilt.causal)
        with torch.no_grad():
            self.weights = _pack_weights(ilt, I, d, F)
        want = lib.hilt_ilt_weights_floats(d, I, F, L)
        if self.weights.numel() != want:  # the Python and C layouts must agree
            raise RuntimeError(f"packed {self.weights.numel()} floats, the library expects {want} (rebuild it)")
        self._args = (self.weights.data_ptr(), d, I, self.H, F, L, int(self.causal))
        self.max_tokens: Optional[int] = None  # per call (None: max_tokens()); the library takes any number

    def accepts(self, prev: Tensor, cur: Tensor, base: Optional[Tensor]) -> bool:
        """True when (prev, cur, base) can run here: fp32 CPU, contiguous, (..., d), at most ``self.max_tokens``
        (default: :func:`max_tokens`) rows."""
        limit = self.max_tokens if self.max_tokens is not None else max_tokens()
        return (prev.dtype == torch.float32 and prev.is_cpu and cur.dtype == torch.float32 and cur.is_cpu
                and prev.shape == cur.shape and prev.shape[-1] == self.d and prev.numel() <= limit * self.d
                and prev.is_contiguous() and cur.is_contiguous()
                and (base is None or (base.dtype == torch.float32 and base.is_cpu and base.shape == cur.shape
                                      and base.is_contiguous())))

    def __call__(self, prev: Tensor, cur: Tensor, base: Optional[Tensor] = None,
                 scale: Optional[Tensor] = None) -> Tensor:
        """``base + scale * ILT(prev, cur)`` (``base`` given) or ``ILT(prev, cur)``, a new (..., d) tensor.
        ``prev``, ``cur``, ``base``: fp32 CPU contiguous (..., d) (see :meth:`accepts`); ``scale``: a
        one-element tensor or number (default 1)."""
        if not self.accepts(prev, cur, base):
            raise ValueError(
                f"prev, cur (and base) must be contiguous fp32 CPU tensors of one shape (..., {self.d}) with at "
                f"most {self.max_tokens or max_tokens()} rows; got prev {tuple(prev.shape)} {prev.dtype} "
                f"{prev.device}, cur {tuple(cur.shape)} {cur.dtype} {cur.device}"
                + ("" if base is None else f", base {tuple(base.shape)} {base.dtype} {base.device}"))
        return self.run(prev, cur, base, scale)

    def run(self, prev: Tensor, cur: Tensor, base: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> Tensor:
        """:meth:`__call__` without checking the tensors: for callers that asked :meth:`accepts` already."""
        if scale is not None and not (isinstance(scale, Tensor) and scale.dtype == torch.float32
                                      and scale.is_cpu and scale.numel() == 1):
            scale = torch.tensor(float(scale), dtype=torch.float32)
        out = torch.empty_like(cur)
        rc = self._fn(prev.data_ptr(), cur.data_ptr(), None if base is None else base.data_ptr(), out.data_ptr(),
                      None if scale is None else scale.data_ptr(), self._args[0], prev.numel() // self.d,
                      *self._args[1:])
        if rc != 0:  # the sizes were checked when packing: this is a bug
            raise RuntimeError(f"hilt_ilt_step_f32 rejected its arguments (code {rc})")
        return out


def _pack_weights(ilt, I: int, d: int, F: int) -> Tensor:
    """The flat fp32 buffer in csrc/cpu/ilt_step.cpp's layout (``layout()`` there): proj_in transposed,
    its bias plus each window position's embedding, the first norm, per window layer (norm1, qkv
    transposed with the query part scaled by head_dim^-1/2, out_proj transposed, its bias, norm2, fc1
    transposed, fc2 transposed, their biases), proj_out transposed, its bias, and the layer norms' eps."""
    def vec(t: Optional[Tensor], n: int, fill: float = 0.0) -> Tensor:
        return t.detach().reshape(-1) if t is not None else torch.full((n,), fill)

    emb = ilt.window_emb.detach()
    b_in = vec(ilt.proj_in.bias, I)
    parts = [ilt.proj_in.weight.detach().t(), b_in + emb[0], b_in + emb[1],
             vec(ilt.norm.weight, I, 1.0), vec(ilt.norm.bias, I)]
    eps = [ilt.norm.eps]
    for layer in ilt.layers:
        a, m = layer.attn, layer.mlp
        s = a.head_dim ** -0.5
        w_qkv = a.qkv.weight.detach().t().clone()
        b_qkv = vec(a.qkv.bias, 3 * I).clone()
        w_qkv[:, :I] *= s
        b_qkv[:I] *= s
        parts += [vec(layer.norm1.weight, I, 1.0), vec(layer.norm1.bias, I), w_qkv, b_qkv,
                  a.out_proj.weight.detach().t(), vec(a.out_proj.bias, I),
                  vec(layer.norm2.weight, I, 1.0), vec(layer.norm2.bias, I),
                  m.fc1.weight.detach().t(), vec(m.fc1.bias, F), m.fc2.weight.detach().t(), vec(m.fc2.bias, I)]
        eps += [layer.norm1.eps, layer.norm2.eps]
    parts += [ilt.proj_out.weight.detach().t(), vec(ilt.proj_out.bias, d), torch.tensor(eps)]
    return torch.cat([p.reshape(-1).to(torch.float32) for p in parts]).contiguous()
