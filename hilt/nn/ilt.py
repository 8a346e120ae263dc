"""Inter-Layer Transformer (ILT): attention over the window (previous, current) layer state."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import _check_dropout, _check_heads
from .layers import TransformerLayer

__all__ = ["InterLayerTransformer"]


class InterLayerTransformer(nn.Module):
    """ILT(prev, cur) -> modulation (B, T, d_model).

    ``proj_in`` (d_model -> ilt_dim) of both states, plus a learned embedding of the two window
    positions (``window_emb``; otherwise a non-causal ILT could not tell them apart), LayerNorm,
    ``n_layers`` pre-LN transformer layers over the length-2 window (``Window2Attention``, i.e.
    :func:`hilt.functional.window2_attention`, causal per ``causal``: the current state attends to
    the previous one and itself, the previous one to itself), dropout, mean over the window,
    ``proj_out`` (-> d_model). Tokens never mix. ``proj_out`` is initialised normally, not at zero:
    the caller's scale controls the modulation's magnitude.
    """

    def __init__(self, d_model: int, ilt_dim: int = 128, n_heads: int = 2, n_layers: int = 2,
                 dropout: float = 0.1, causal: bool = True, d_ff: Optional[int] = None,
                 bias: bool = True, layer_norm_eps: float = 1e-5, init_std: float = 0.02,
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        _check_heads(ilt_dim, n_heads)
        if n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {n_layers}")
        self.d_model = d_model
        self.ilt_dim = ilt_dim
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.dropout_p = _check_dropout(dropout)
        self.causal = causal
        self.init_std = init_std
        self.proj_in = nn.Linear(d_model, ilt_dim, bias=bias, **factory)
        self.window_emb = nn.Parameter(torch.empty(2, ilt_dim, **factory))
        self.norm = nn.LayerNorm(ilt_dim, eps=layer_norm_eps, bias=bias, **factory)
        self.layers = nn.ModuleList(
            TransformerLayer(ilt_dim, n_heads, d_ff=d_ff, dropout=dropout, attention="window2",
                             causal=causal, bias=bias, layer_norm_eps=layer_norm_eps,
                             backend=backend, **factory)
            for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(ilt_dim, d_model, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases, LayerNorms at identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=self.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        nn.init.normal_(self.window_emb, std=self.init_std)

    def forward(self, prev: Tensor, cur: Tensor) -> Tensor:
        if prev.shape != cur.shape or prev.dim() != 3:
            raise ValueError(f"prev and cur must both be (B, T, d_model), got {tuple(prev.shape)} "
                             f"and {tuple(cur.shape)}")
        x = torch.stack([self.proj_in(prev), self.proj_in(cur)], dim=1)  # (B, 2, T, I)
        x = x + self.window_emb.view(1, 2, 1, self.ilt_dim).to(x.dtype)
        x = self.norm(x)
        for layer in self.layers:
            x = layer(x)
        x = self.dropout(x)
        return self.proj_out(x.mean(dim=1))

    def step_weights(self) -> "_StepWeights":
        """The weights of :meth:`step`'s fast paths, packed once (detached copies, so rebuild them after
        the parameters change; ``HILT.init_cache`` packs them with each cache). On the CPU in fp32, with
        the CPU library built (:mod:`hilt_kernels.cpu`), also the flat buffer of its fused step
        (:class:`hilt_kernels.cpu.ilt_step.PackedILT`). For the PyTorch-ops path: ``proj_in``'s weight
        transposed, its bias plus each window position's embedding, per window layer the qkv weight
        with the query part pre-scaled by ``head_dim ** -0.5``, transposed linear weights, zeros for absent
        biases, the first MLP weight and bias divided by sqrt(2) (GELU as ``a (1 + erf a)``, the sqrt(2)
        moved into the second MLP weight) and ``proj_out``'s weight halved and stacked twice (the mean over
        the window is part of its matmul)."""
        with torch.no_grad():
            return _StepWeights(self)

    def step(self, prev: Tensor, cur: Tensor, out: Optional[Tensor] = None, scale: Optional[Tensor] = None,
             fused: bool = True, weights: Optional["_StepWeights"] = None) -> Tensor:
        """:meth:`forward`'s math with few ops, for decoding (eval mode: no dropout).

        ``prev``, ``cur`` (B, T, d_model). Under ``torch.no_grad`` (with ``fused``, the dtype of the
        parameters) it runs on packed weights (``weights`` from :meth:`step_weights`; packed here when not
        given, which is slow: pass them when stepping repeatedly). fp32 CPU calls of at most
        :func:`hilt_kernels.cpu.ilt_step.max_tokens` tokens (16 with one thread) run the whole ILT in one
        call of the CPU library (``csrc/cpu/ilt_step.cpp``; ``HILT_CPU_KERNELS=0`` turns it off); otherwise
        the window is two row blocks, (2·B·T, ilt_dim): the ``prev`` rows, then the ``cur`` rows, and each
        window layer is 12 ops writing into reused buffers: layer norm; one qkv matmul for both rows;
        ``k0 - k1`` and ``v0 - v1`` in one subtraction; the per-head scores ``q . (k0 - k1)`` as one batched
        matmul, only for the current row when causal (the previous row attends to itself: its weight stays
        1), and a sigmoid (the softmax over two scores is ``sigmoid(s0 - s1)``); ``v1 + p (v0 - v1)`` for
        both rows in one op; the output projection added to the residual in place; layer norm, the first MLP
        matmul, an ``erf`` and an ``addcmul`` (GELU), the second MLP matmul added in place (both biases come
        out of their matmuls).
        With gradients enabled or ``fused=False``: the functional per-module path (autograd). Returns the
        modulation (B, T, d_model), or, with ``out`` and ``scale``, ``out + scale · modulation``.
        """
        if fused and not torch.is_grad_enabled():
            if weights is None:
                weights = self.step_weights()
            if prev.dtype == weights.dtype:
                return weights(prev, cur, out, scale)
        return self._step_functional(prev, cur, out, scale)

    def _step_functional(self, prev: Tensor, cur: Tensor, out: Optional[Tensor], scale: Optional[Tensor]) -> Tensor:
        I = self.ilt_dim
        x = F.linear(torch.stack((prev, cur), dim=-2), self.proj_in.weight, self.proj_in.bias)
        x = F.layer_norm(x + self.window_emb.to(x.dtype), (I,), self.norm.weight, self.norm.bias, self.norm.eps)
        lead = x.shape[:-2]
        x = x.reshape(-1, 2, I)
        for layer in self.layers:
            x = _window_layer(layer, x)
        mod = F.linear(x.mean(-2).view(*lead, I), self.proj_out.weight, self.proj_out.bias)
        if out is None:
            return mod
        return torch.addcmul(out, scale.to(out.dtype), mod)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, ilt_dim={self.ilt_dim}, n_heads={self.n_heads}, "
                f"n_layers={self.n_layers}, dropout={self.dropout_p}, causal={self.causal}")


class _StepWeights:
    """Packed weights of one ILT for :meth:`InterLayerTransformer.step`; calling it runs the step
    (no autograd: detached tensors, the layer norms' parameters shared, the rest transformed copies, so
    rebuild it after the parameters change).

    Layout: the window is two row blocks, x (2·N, I) = (rows of ``prev``; rows of ``cur``), N = B·T.
    """

    _ONE = 8.0  # the constant MLP column: erf(8) == 1 in every float format, so a + a erf(a) == 16 exactly

    def __init__(self, ilt: InterLayerTransformer) -> None:
        from hilt_kernels.cpu import ilt_step as _cpu_ilt_step

        self.cpu = _cpu_ilt_step.pack(ilt)  # the CPU library's fused step, or None
        I, d = ilt.ilt_dim, ilt.d_model
        w = ilt.proj_in.weight.detach()
        dt, dev = w.dtype, w.device
        zeros = lambda n: torch.zeros(n, dtype=dt, device=dev)  # noqa: E731

        def bias(lin: nn.Linear, n: int) -> Tensor:
            return lin.bias.detach() if lin.bias is not None else zeros(n)

        def ln(norm: nn.LayerNorm):
            return (norm.weight.detach(), None if norm.bias is None else norm.bias.detach(), norm.eps)

        self.I, self.d, self.dtype, self.causal = I, d, dt, ilt.causal
        self.w_in = w.t().expand(2, d, I)                                           # (2, d, I)
        self.b_in = (bias(ilt.proj_in, I) + ilt.window_emb.detach()).view(2, 1, I)  # (2, 1, I)
        self.norm = ln(ilt.norm)
        self.layers = []
        r2, c = 2.0 ** -0.5, self._ONE
        for layer in ilt.layers:
            a, m = layer.attn, layer.mlp
            H, D = a.n_heads, a.head_dim
            w_qkv = a.qkv.weight.detach().t().clone()                            # (I, 3I): q | k | v
            b_qkv = bias(a.qkv, 3 * I).clone()
            w_qkv[:, :I] *= D ** -0.5
            b_qkv[:I] *= D ** -0.5
            # MLP: g = a / sqrt(2) (fc1 scaled), gelu(a) = (g + g erf g) / sqrt(2) (fc2 scaled); one more
            # fc1 column, constant c (zero weights), gives g + g erf g = 2c there, and fc2's row for it is
            # bias / (2c): fc2's bias comes out of the matmul (exactly: 2c is a power of two)
            w_1 = torch.cat((m.fc1.weight.detach().t() * r2, zeros(I)[:, None]), 1).contiguous()
            b_1 = torch.cat((bias(m.fc1, m.d_ff) * r2, torch.full((1,), c, dtype=dt, device=dev)))
            w_2 = torch.cat((m.fc2.weight.detach().t() * r2, bias(m.fc2, I)[None] / (2 * c))).contiguous()
            # out_proj with its bias as a last row (the attention output gets a constant-1 column)
            w_o = torch.cat((a.out_proj.weight.detach().t(), bias(a.out_proj, I)[None])).contiguous()
            self.layers.append((ln(layer.norm1), w_qkv, b_qkv, H, D, w_o, ln(layer.norm2), w_1, b_1, w_2))
        w_out = ilt.proj_out.weight.detach().t() * 0.5                               # (I, d): mean of 2 rows
        self.w_out = torch.cat((w_out, w_out)).contiguous()                          # (2I, d)
        self.b_out = bias(ilt.proj_out, d)
        self._ws = None

    def _workspace(self, shape: torch.Size) -> tuple:
        """Buffers (and their views) for inputs of ``shape``: every op of the step writes into one of
        them (``out=``), so a step makes no views and few allocations. One shape is kept (the last)."""
        if self._ws is not None and self._ws[0] == shape:
            return self._ws[1]
        I, d = self.I, self.d
        N = shape.numel() // d
        new = lambda *size: torch.empty(size, dtype=self.dtype, device=self.w_in.device)  # noqa: E731
        stacked, x0, mod = new(2, *shape), new(2, N, I), new(N, d)
        per_layer = []
        for (n1, w_qkv, b_qkv, H, D, w_o, n2, w_1, b_1, w_2) in self.layers:
            C = w_qkv.shape[1]
            t, dt = new(2 * N, C), new(N, C)
            y = torch.ones(2 * N, I + 1, dtype=self.dtype, device=self.w_in.device)  # last column stays 1
            p = torch.ones(2, N, H, 1, dtype=self.dtype, device=self.w_in.device)  # causal: p[0] stays 1
            g, e = new(2 * N, w_1.shape[1]), new(2 * N, w_1.shape[1])
            # per-head scores q_r . (k0 - k1) as one batched matmul over (token, head): with one token the
            # (token, head) batch is a plain 3-D view (bmm); otherwise 4-D (matmul)
            rows = 1 if self.causal else 2
            if N == 1:
                mm = torch.bmm
                q = t.as_strided((H, rows, D), (D, C, 1), (2 - rows) * C)
                dk = dt.as_strided((H, D, 1), (D, 1, 1), I)
                s = p.as_strided((H, rows, 1), (1, H, 1), (2 - rows) * H)
            else:
                mm = torch.matmul
                q = t.as_strided((N, H, rows, D), (C, D, N * C, 1), (2 - rows) * N * C)
                dk = dt.as_strided((N, H, D, 1), (C, D, 1, 1), I)
                s = p.as_strided((N, H, rows, 1), (H, 1, N * H, 1), (2 - rows) * N * H)
            per_layer.append((
                t, t[:N], t[N:], dt, mm, q, dk, s,
                t.as_strided((N, H, D), (C, D, 1), N * C + 2 * I),               # v1
                dt[:, 2 * I:].view(N, H, D), p, y[:, :I].view(2, N, H, D), y, g, e))  # v0 - v1
        ws = (stacked, stacked.view(2, N, d), x0, x0.view(2 * N, I), per_layer, mod, mod.view(shape))
        self._ws = (shape, ws)
        return ws

    def __call__(self, prev: Tensor, cur: Tensor, out: Optional[Tensor] = None,
                 scale: Optional[Tensor] = None) -> Tensor:
        I, d = self.I, self.d
        if prev.shape != cur.shape or prev.shape[-1] != d:
            raise ValueError(f"prev and cur must both be (..., {d}), got {tuple(prev.shape)} and {tuple(cur.shape)}")
        if self.cpu is not None and self.cpu.accepts(prev, cur, out):
            return self.cpu.run(prev, cur, out, None if out is None else scale)
        stacked, stacked3, x0, x0_2d, per_layer, mod, mod_view = self._workspace(prev.shape)
        layer_norm, addmm, addcmul = torch.layer_norm, torch.addmm, torch.addcmul
        torch.stack((prev, cur), out=stacked)
        torch.baddbmm(self.b_in, stacked3, self.w_in, out=x0)
        x = layer_norm(x0_2d, (I,), *self.norm)                                   # (2N, I): prev rows; cur rows
        for (n1, w_qkv, b_qkv, H, D, w_o, n2, w_1, b_1, w_2), \
                (t, t0, t1, dt, mm, q, dk, s, v1, dv, p, y, y1, g, e) in zip(self.layers, per_layer):
            addmm(b_qkv, layer_norm(x, (I,), *n1), w_qkv, out=t)                 # q | k | v of both rows
            torch.sub(t0, t1, out=dt)                                             # ., k0 - k1, v0 - v1
            mm(q, dk, out=s).sigmoid_()                                           # p = softmax over 2 = sigmoid
            addcmul(v1, p, dv, out=y)                                             # (2, N, H, D): v1 + p (v0 - v1)
            x.addmm_(y1, w_o)                                                     # x += out_proj(.) (+ bias: y1's 1s)
            addmm(b_1, layer_norm(x, (I,), *n2), w_1, out=g)                      # g = fc1(.) / sqrt(2)
            torch.erf(g, out=e)
            x.addmm_(g.addcmul_(g, e), w_2)                                       # x += fc2(gelu(.)): (g + g erf g) W2'
        N = mod.shape[0]
        xc = x.view(1, 2 * I) if N == 1 else x.view(2, N, I).transpose(0, 1).reshape(N, 2 * I)
        addmm(self.b_out, xc, self.w_out, out=mod)                                # proj_out(mean of the 2 rows)
        if out is None:
            return mod_view.clone()
        return addcmul(out, scale if scale.dtype == out.dtype else scale.to(out.dtype), mod_view)


def _window_layer(layer: TransformerLayer, x: Tensor) -> Tensor:
    """One pre-LN window layer on x (N, 2, I) in functional ops (eval)."""
    attn, mlp = layer.attn, layer.mlp
    I, H, D = x.shape[-1], attn.n_heads, attn.head_dim
    h = F.layer_norm(x, (I,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).view(-1, 2, 3, H, D)
    diff = qkv[:, 0] - qkv[:, 1]  # (N, 3, H, D): q0 - q1, k0 - k1, v0 - v1
    dk, dv, v1 = diff[:, 1], diff[:, 2], qkv[:, 1, 2]
    scale = D ** -0.5
    if attn.causal:  # row 0 sees itself: v0; row 1: v1 + sigmoid(s (q1 . (k0 - k1))) (v0 - v1)
        p1 = torch.sigmoid((qkv[:, 1, 0] * dk).sum(-1, keepdim=True) * scale)
        y = torch.stack((qkv[:, 0, 2], torch.addcmul(v1, p1, dv)), dim=1)
    else:
        p = torch.sigmoid((qkv[:, :, 0] * dk.unsqueeze(1)).sum(-1, keepdim=True) * scale)  # (N, 2, H, 1)
        y = torch.addcmul(v1.unsqueeze(1), p, dv.unsqueeze(1))
    x = x + F.linear(y.reshape(-1, 2, I), attn.out_proj.weight, attn.out_proj.bias)
    h = F.layer_norm(x, (I,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    return x + F.linear(F.gelu(F.linear(h, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
