"""Triton backend of ``window2_attention`` (short name ``w2a``).

How it works
------------
q, k, v are (B, 2, T, H, D) -- usually strided views of a bigger projection. Every (b, t, h) is an
independent "row": two query / key / value vectors (window elements 0 = previous layer, 1 = current
layer). One program handles BLOCK_R rows x BLOCK_D (= next_pow2(D), padded with masked loads) head
dims; grid = cdiv(B*T*H, BLOCK_R). The row index is split into (b, t, h) and every tensor is read
through its own five strides (no copies, no contiguity assumed; stride-0 dout works). The 2x2
scores s_ij = scale * q_i . k_j (row sums over D), the 2-way softmax and the weighted sums are all
done in fp32 registers -- no tl.dot. Causal: out_0 = v_0 (q_0 and k for row 0 are not even read),
out_1 = softmax(s_10, s_11) . (v_0, v_1). Non-causal: both rows see both elements.

Backward recomputes the softmax P:  dv_j = sum_i P_ij dout_i ; dP_ij = dout_i . v_j ;
dS = P * (dP - rowsum(P * dP)) ; dq_i = scale sum_j dS_ij k_j ; dk_j = scale sum_i dS_ij q_i.
Causal: row 0 has P = (1, 0), so dS_0j = 0 and dq_0 = 0 (written as zeros).

It is purely bandwidth bound: forward reads 6 (causal: 5) vectors and writes 2 per row, backward
reads 8 and writes 6.

Limits
------
- dtypes fp16 / bf16 / fp32 (q, k, v share one); fp64 is not supported.
- D <= 1024 (a whole head vector lives in registers); any D >= 1 (padded to a power of two).
- B*T*H < 2**31 rows; addresses are computed in int64.
- On GPU (BLOCK_R, num_warps) come from ``triton.autotune`` keyed on (D, causal, dtypes), among
  at most 8 candidates with 8..16 (forward) / 4..8 (backward) fp32 elements per thread per vector
  (``CANDIDATES``, ``prune_fwd`` / ``prune_bwd``); under TRITON_INTERPRET=1 or
  HILT_TRITON_FIXED_CONFIG=1 the first kept candidate runs (``_launch.py``).
- Row indices are int64 (``pid * BLOCK_R + arange`` would wrap near 2**31).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from hilt_kernels._alloc import empty
from hilt_kernels.triton._launch import Tuned

__all__ = ["unsupported", "forward", "backward"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_D = 1024


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(r, TH, H, sb, st, sh):
    """int64 offset of (b, 0, t, h, 0) for row r = (b * T + t) * H + h."""
    b = r // TH
    rem = r - b * TH
    t = rem // H
    h = rem - t * H
    return b.to(tl.int64) * sb + t.to(tl.int64) * st + h.to(tl.int64) * sh


@triton.jit
def _softmax2(s0, s1):
    m = tl.maximum(s0, s1)
    e0 = tl.exp(s0 - m)
    e1 = tl.exp(s1 - m)
    inv = 1.0 / (e0 + e1)
    return e0 * inv, e1 * inv


@triton.jit
def _w2a_fwd_kernel(
    Q, K, V, O,
    N, TH, H, D, scale,
    q_sb, q_sw, q_st, q_sh, q_sd,
    k_sb, k_sw, k_st, k_sh, k_sd,
    v_sb, v_sw, v_st, v_sh, v_sd,
    o_sb, o_sw, o_st, o_sh, o_sd,
    CAUSAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < N
    d = tl.arange(0, BLOCK_D)
    d64 = d.to(tl.int64)
    mask = r_mask[:, None] & (d < D)[None, :]

    q_p = Q + (_row_offsets(r, TH, H, q_sb, q_st, q_sh)[:, None] + d64[None, :] * q_sd)
    k_p = K + (_row_offsets(r, TH, H, k_sb, k_st, k_sh)[:, None] + d64[None, :] * k_sd)
    v_p = V + (_row_offsets(r, TH, H, v_sb, v_st, v_sh)[:, None] + d64[None, :] * v_sd)
    o_p = O + (_row_offsets(r, TH, H, o_sb, o_st, o_sh)[:, None] + d64[None, :] * o_sd)

    q1 = tl.load(q_p + q_sw, mask=mask, other=0.0).to(tl.float32)
    k0 = tl.load(k_p, mask=mask, other=0.0).to(tl.float32)
    k1 = tl.load(k_p + k_sw, mask=mask, other=0.0).to(tl.float32)
    v0 = tl.load(v_p, mask=mask, other=0.0)
    v1 = tl.load(v_p + v_sw, mask=mask, other=0.0).to(tl.float32)

    p10, p11 = _softmax2(tl.sum(q1 * k0, axis=1) * scale, tl.sum(q1 * k1, axis=1) * scale)
    v0f = v0.to(tl.float32)
    out1 = p10[:, None] * v0f + p11[:, None] * v1
    if CAUSAL:
        tl.store(o_p, v0.to(O.dtype.element_ty), mask=mask)
    else:
        q0 = tl.load(q_p, mask=mask, other=0.0).to(tl.float32)
        p00, p01 = _softmax2(tl.sum(q0 * k0, axis=1) * scale, tl.sum(q0 * k1, axis=1) * scale)
        out0 = p00[:, None] * v0f + p01[:, None] * v1
        tl.store(o_p, out0.to(O.dtype.element_ty), mask=mask)
    tl.store(o_p + o_sw, out1.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _w2a_bwd_kernel(
    DO, Q, K, V, DQ, DK, DV,
    N, TH, H, D, scale,
    do_sb, do_sw, do_st, do_sh, do_sd,
    q_sb, q_sw, q_st, q_sh, q_sd,
    k_sb, k_sw, k_st, k_sh, k_sd,
    v_sb, v_sw, v_st, v_sh, v_sd,
    g_sb, g_sw, g_st, g_sh, g_sd,  # strides of dq, dk, dv (all contiguous, same shape)
    CAUSAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < N
    d = tl.arange(0, BLOCK_D)
    d64 = d.to(tl.int64)
    mask = r_mask[:, None] & (d < D)[None, :]

    do_p = DO + (_row_offsets(r, TH, H, do_sb, do_st, do_sh)[:, None] + d64[None, :] * do_sd)
    q_p = Q + (_row_offsets(r, TH, H, q_sb, q_st, q_sh)[:, None] + d64[None, :] * q_sd)
    k_p = K + (_row_offsets(r, TH, H, k_sb, k_st, k_sh)[:, None] + d64[None, :] * k_sd)
    v_p = V + (_row_offsets(r, TH, H, v_sb, v_st, v_sh)[:, None] + d64[None, :] * v_sd)
    g_off = _row_offsets(r, TH, H, g_sb, g_st, g_sh)[:, None] + d64[None, :] * g_sd

    q1 = tl.load(q_p + q_sw, mask=mask, other=0.0).to(tl.float32)
    k0 = tl.load(k_p, mask=mask, other=0.0).to(tl.float32)
    k1 = tl.load(k_p + k_sw, mask=mask, other=0.0).to(tl.float32)
    v0 = tl.load(v_p, mask=mask, other=0.0).to(tl.float32)
    v1 = tl.load(v_p + v_sw, mask=mask, other=0.0).to(tl.float32)
    do0 = tl.load(do_p, mask=mask, other=0.0).to(tl.float32)
    do1 = tl.load(do_p + do_sw, mask=mask, other=0.0).to(tl.float32)

    # row 1 (attends to both elements in both modes)
    p10, p11 = _softmax2(tl.sum(q1 * k0, axis=1) * scale, tl.sum(q1 * k1, axis=1) * scale)
    dp10 = tl.sum(do1 * v0, axis=1)
    dp11 = tl.sum(do1 * v1, axis=1)
    delta1 = p10 * dp10 + p11 * dp11
    ds10 = (p10 * (dp10 - delta1) * scale)[:, None]
    ds11 = (p11 * (dp11 - delta1) * scale)[:, None]
    dq1 = ds10 * k0 + ds11 * k1

    if CAUSAL:
        dq0 = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        dk0 = ds10 * q1
        dk1 = ds11 * q1
        dv0 = do0 + p10[:, None] * do1
        dv1 = p11[:, None] * do1
    else:
        q0 = tl.load(q_p, mask=mask, other=0.0).to(tl.float32)
        p00, p01 = _softmax2(tl.sum(q0 * k0, axis=1) * scale, tl.sum(q0 * k1, axis=1) * scale)
        dp00 = tl.sum(do0 * v0, axis=1)
        dp01 = tl.sum(do0 * v1, axis=1)
        delta0 = p00 * dp00 + p01 * dp01
        ds00 = (p00 * (dp00 - delta0) * scale)[:, None]
        ds01 = (p01 * (dp01 - delta0) * scale)[:, None]
        dq0 = ds00 * k0 + ds01 * k1
        dk0 = ds00 * q0 + ds10 * q1
        dk1 = ds01 * q0 + ds11 * q1
        dv0 = p00[:, None] * do0 + p10[:, None] * do1
        dv1 = p01[:, None] * do0 + p11[:, None] * do1

    ty = DQ.dtype.element_ty
    tl.store(DQ + g_off, dq0.to(ty), mask=mask)
    tl.store(DQ + g_off + g_sw, dq1.to(ty), mask=mask)
    tl.store(DK + g_off, dk0.to(ty), mask=mask)
    tl.store(DK + g_off + g_sw, dk1.to(ty), mask=mask)
    tl.store(DV + g_off, dv0.to(ty), mask=mask)
    tl.store(DV + g_off + g_sw, dv1.to(ty), mask=mask)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------

CANDIDATES = [
    triton.Config({"BLOCK_R": br}, num_warps=w)
    for w, br in itertools.product((4, 8, 2), (1, 2, 4, 8, 16, 32, 64, 128, 256))
]
_MAX_TUNED = 8


def _make_prune(per_thread: tuple[int, ...]):
    """Keep configs whose (BLOCK_R, BLOCK_D) tile gives each thread one of `per_thread` fp32
    elements per loaded vector (register budget: the backward holds 8 inputs + 6 outputs)."""

    def prune(configs, named_args, **kwargs):
        bd = int(kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 1)))
        out = [c for c in configs
               if c.kwargs["BLOCK_R"] * bd >= 32 * c.num_warps
               and c.kwargs["BLOCK_R"] * bd // (32 * c.num_warps) in per_thread]
        if not out:  # D = 1 or 2
            out = [triton.Config({"BLOCK_R": max(1, min(256, 1024 // bd))}, num_warps=4)]
        return out[:_MAX_TUNED]

    return prune


prune_fwd = _make_prune((8, 16))
prune_bwd = _make_prune((4, 8))
_KEY = ["D", "BLOCK_D", "CAUSAL"]
fwd_kernel = Tuned(_w2a_fwd_kernel, CANDIDATES, _KEY, prune_fwd)
bwd_kernel = Tuned(_w2a_bwd_kernel, CANDIDATES, _KEY, prune_bwd)
KERNELS = (fwd_kernel, bwd_kernel)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------


def unsupported(q, k, v, causal, scale) -> list[str]:
    """Reasons this backend cannot run the case ([] = supported)."""
    reasons = []
    if q.dtype not in _DTYPES:
        reasons.append(f"dtype {q.dtype} not in fp16/bf16/fp32")
    if q.dim() == 5:
        B, _, T, H, D = q.shape
        if D > _MAX_D:
            reasons.append(f"head dim D must be <= {_MAX_D} (got {D})")
        if B * T * H >= 2**31:
            reasons.append("B * T * H must be < 2**31")
    return reasons


def _grid(N):
    return lambda meta: (triton.cdiv(N, meta["BLOCK_R"]),)


def forward(q, k, v, causal: bool, scale: float):
    B, _, T, H, D = q.shape
    out = empty(q.shape, dtype=q.dtype, device=q.device)
    N = B * T * H
    if out.numel() == 0:
        return out
    kw = dict(CAUSAL=bool(causal), BLOCK_D=_p2(D))
    fwd_kernel[_grid(N)](
        q, k, v, out, N, T * H, H, D, float(scale),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), **kw)
    return out


def backward(dout, q, k, v, causal: bool, scale: float):
    B, _, T, H, D = q.shape
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(q.shape, dtype=q.dtype, device=q.device)
    dv = empty(q.shape, dtype=q.dtype, device=q.device)
    N = B * T * H
    if dq.numel() == 0:
        return dq, dk, dv
    kw = dict(CAUSAL=bool(causal), BLOCK_D=_p2(D))
    bwd_kernel[_grid(N)](
        dout, q, k, v, dq, dk, dv, N, T * H, H, D, float(scale),
        *dout.stride(), *q.stride(), *k.stride(), *v.stride(), *dq.stride(), **kw)
    return dq, dk, dv
