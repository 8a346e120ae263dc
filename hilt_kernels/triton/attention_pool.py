"""Triton backend of ``attention_pool`` (short name ``apool``).

How it works
------------
out[b, n, h, :] = sum_{t in block n, not padding} w[t, h] * values[b, t, (h), :],
    w[., h] = softmax over the block's valid tokens of scores[b, ., h]

Forward: one program per (batch x block, head group, D tile); grid = (B * nb, cdiv(H, BLOCK_H),
cdiv(D, BLOCK_D)). The program first walks the block's scores in chunks of BLOCK_T tokens with an
online max / sum-of-exp (the scores are D times smaller than the values, so this pass is cheap),
then walks the block again, turning each chunk's scores into the final softmax weights w[t, h] and
accumulating w[t, h] * v[t, (h), d-tile] in fp32 registers: a (BLOCK_T, BLOCK_H, BLOCK_D) tile that
is reduced over t. Values are read exactly once (for shared values one program covers all heads),
through their strides; padding tokens are never loaded. Scores (D times smaller) are re-read per
D tile.

Backward: one program per (batch x block, chunk of BLOCK_T tokens, head group); grid = (B * nb,
cdiv(min(block_size, T), BLOCK_T), cdiv(H, BLOCK_H)). It recomputes the block's softmax statistics
from the scores, the chunk's weights w, and loops over D in BLOCK_D tiles:
  dvalues[t, (h), d] = w[t, h] * dout[n, h, d]       (shared values: summed over the heads inside
                                                       the program -- deterministic, no atomics)
  dp[t, h] += dout[n, h, d-tile] . v[t, (h), d-tile]
  c[h]     += dout[n, h, d-tile] . out[n, h, d-tile]
and finally dscores[t, h] = w[t, h] * (dp[t, h] - c[h]). For blocks longer than
_STATS_INLINE_MAX tokens a small _apool_stats_kernel first stores each block's (max, 1/sum) per
head (fp32 scratch), so the chunk programs do not each re-walk the whole block's scores.
Every output element is written (padding tokens and fully padded blocks get exact zeros: w = 0
there, the block's sum of exps is 0 and its inverse is taken as 0). All math in fp32; outputs are
cast to the input dtypes on store.

Limits
------
- dtypes: scores and values each fp16 / bf16 / fp32 (they may differ); fp64 is not supported.
- shared values (B, T, D): every program holds all heads, next_pow2(H) <= 64 (H <= 64).
  Per-head values: any H (heads are tiled in groups).
- any block_size >= 1 and any D (tiled by BLOCK_D inside a loop / grid dimension).
- B * nb < 2**31 (grid axis 0); addresses are computed in int64.
- min(block_size, T) <= 65535 (backward grid axis 1). Very long blocks work but have little
  forward parallelism (one program per block x head group x D tile).
- H <= 65535 * BLOCK_H (grid axes 1 / 2 hold head groups).
- On GPU the tile sizes (BLOCK_T, BLOCK_D, num_warps) are chosen by ``triton.autotune`` per
  (block_size, D, BLOCK_H, SHARED, HAS_MASK, dtypes) among at most 8 register-budgeted candidates
  (``CANDIDATES``, ``prune_fwd`` / ``prune_bwd``); under TRITON_INTERPRET=1 or
  HILT_TRITON_FIXED_CONFIG=1 the first kept candidate runs (``_launch.py``). The loops have runtime
  bounds everywhere.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from hilt_kernels._alloc import empty
from hilt_kernels.triton import _launch
from hilt_kernels.triton._launch import Tuned

__all__ = ["unsupported", "forward", "backward"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SHARED_HEADS = 64
_MAX_BLOCK_SIZE = 65535  # backward grid axis 1 = cdiv(min(block_size, T), BLOCK_T) <= 65535
# backward: blocks longer than this get their softmax statistics from a separate small kernel
# (one pass over the scores) instead of each token-chunk program recomputing them.
_STATS_INLINE_MAX = 64


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_scores(s_base, m_base, t0, end, s_st, s_sh, m_st, offs_h, h_mask,
                 HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    """Scores of tokens t0 .. t0 + BLOCK_T (clipped to end) as fp32 [BLOCK_T, BLOCK_H];
    -inf where the token is outside the block, padding, or the head does not exist."""
    t = t0 + tl.arange(0, BLOCK_T)
    in_blk = t < end
    t64 = t.to(tl.int64)
    h64 = offs_h.to(tl.int64)
    valid = in_blk
    if HAS_MASK:
        pad = tl.load(m_base + t64 * m_st, mask=in_blk, other=1)
        valid = in_blk & (pad == 0)
    lmask = valid[:, None] & h_mask[None, :]
    s = tl.load(s_base + t64[:, None] * s_st + h64[None, :] * s_sh, mask=lmask,
                other=float("-inf")).to(tl.float32)
    s = tl.where(lmask, s, float("-inf"))
    return s, t64, in_blk, valid


@triton.jit
def _stats_step(m, l, s_base, m_base, t0, end, s_st, s_sh, m_st, offs_h, h_mask,
                HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    s, _t, _ib, _v = _load_scores(s_base, m_base, t0, end, s_st, s_sh, m_st, offs_h, h_mask,
                                  HAS_MASK, BLOCK_T)
    m_new = tl.maximum(m, tl.max(s, axis=0))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    l = l * tl.exp(m - m_use) + tl.sum(tl.exp(s - m_use[None, :]), axis=0)
    return m_new, l


@triton.jit
def _block_stats(s_base, m_base, start, end, s_st, s_sh, m_st, offs_h, h_mask,
                 HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """Per-head max and 1 / sum(exp(s - max)) over the block's valid tokens.
    A head with no valid token gets max 0 and inverse sum 0 (so its weights are exactly 0)."""
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        m, l = _stats_step(m, l, s_base, m_base, t0, end, s_st, s_sh, m_st,
                           offs_h, h_mask, HAS_MASK, BLOCK_T)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    inv_l = tl.where(l > 0.0, 1.0 / tl.where(l > 0.0, l, 1.0), 0.0)
    return m_use, inv_l


@triton.jit
def _fwd_step(acc, s_base, m_base, v_base, t0, end, m_use, inv_l, s_st, s_sh, m_st,
              v_st, v_sh, v_sd, offs_h, h_mask, offs_d, d_mask,
              SHARED: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    s, t64, _ib, valid = _load_scores(s_base, m_base, t0, end, s_st, s_sh, m_st, offs_h,
                                      h_mask, HAS_MASK, BLOCK_T)
    w = tl.exp(s - m_use[None, :]) * inv_l[None, :]  # [BLOCK_T, BLOCK_H], 0 where invalid
    h64 = offs_h.to(tl.int64)
    d64 = offs_d.to(tl.int64)
    if SHARED:
        vp = v_base + t64[:, None] * v_st + d64[None, :] * v_sd
        v = tl.load(vp, mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w[:, :, None] * v[:, None, :], axis=0)
    else:
        vp = (v_base + t64[:, None, None] * v_st + h64[None, :, None] * v_sh
              + d64[None, None, :] * v_sd)
        vm = valid[:, None, None] & h_mask[None, :, None] & d_mask[None, None, :]
        v = tl.load(vp, mask=vm, other=0.0).to(tl.float32)
        acc += tl.sum(w[:, :, None] * v, axis=0)
    return acc


@triton.jit
def _apool_fwd_kernel(
    S, V, M, O,
    T, H, D, NB, block_size,
    s_sb, s_st, s_sh,
    v_sb, v_st, v_sh, v_sd,
    m_sb, m_st,
    o_sb, o_sn, o_sh, o_sd,
    SHARED: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bn = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_d = tl.program_id(2)
    b = (pid_bn // NB).to(tl.int64)
    n = pid_bn % NB
    start = n * block_size
    end = tl.minimum(start + block_size, T)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D

    s_base = S + b * s_sb
    m_base = M + b * m_sb
    v_base = V + b * v_sb

    m_use, inv_l = _block_stats(s_base, m_base, start, end, s_st, s_sh, m_st, offs_h, h_mask,
                                HAS_MASK, BLOCK_T, BLOCK_H)

    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        acc = _fwd_step(acc, s_base, m_base, v_base, t0, end, m_use, inv_l,
                        s_st, s_sh, m_st, v_st, v_sh, v_sd, offs_h, h_mask, offs_d, d_mask,
                        SHARED, HAS_MASK, BLOCK_T)

    op = (O + b * o_sb + n.to(tl.int64) * o_sn + offs_h.to(tl.int64)[:, None] * o_sh
          + offs_d.to(tl.int64)[None, :] * o_sd)
    tl.store(op, acc.to(O.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])


@triton.jit
def _bwd_d_step(dp, c, d0, D, do_base, o_base, v_base, dv_base, w, t64, in_blk, valid,
                offs_h, h_mask, do_sh, do_sd, o_sh, o_sd, v_st, v_sh, v_sd, dv_st, dv_sh, dv_sd,
                SHARED: tl.constexpr, BLOCK_D: tl.constexpr):
    """One BLOCK_D slice of the head dim: stores dvalues, accumulates dout.v and dout.out."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    hd_mask = h_mask[:, None] & d_mask[None, :]
    h64 = offs_h.to(tl.int64)
    d64 = offs_d.to(tl.int64)
    do = tl.load(do_base + h64[:, None] * do_sh + d64[None, :] * do_sd, mask=hd_mask,
                 other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_D]
    o = tl.load(o_base + h64[:, None] * o_sh + d64[None, :] * o_sd, mask=hd_mask,
                other=0.0).to(tl.float32)
    c += tl.sum(do * o, axis=1)
    if SHARED:
        v = tl.load(v_base + t64[:, None] * v_st + d64[None, :] * v_sd,
                    mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        dp += tl.sum(v[:, None, :] * do[None, :, :], axis=2)
        dv = tl.sum(w[:, :, None] * do[None, :, :], axis=1)  # [BLOCK_T, BLOCK_D]
        tl.store(dv_base + t64[:, None] * dv_st + d64[None, :] * dv_sd,
                 dv.to(dv_base.dtype.element_ty), mask=in_blk[:, None] & d_mask[None, :])
    else:
        off3 = h64[None, :, None] * v_sh + d64[None, None, :] * v_sd
        vm = valid[:, None, None] & hd_mask[None, :, :]
        v = tl.load(v_base + t64[:, None, None] * v_st + off3, mask=vm,
                    other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_H, BLOCK_D]
        dp += tl.sum(v * do[None, :, :], axis=2)
        dv = w[:, :, None] * do[None, :, :]
        dvp = (dv_base + t64[:, None, None] * dv_st + h64[None, :, None] * dv_sh
               + d64[None, None, :] * dv_sd)
        tl.store(dvp, dv.to(dv_base.dtype.element_ty),
                 mask=in_blk[:, None, None] & hd_mask[None, :, :])
    return dp, c


@triton.jit
def _apool_stats_kernel(S, M, STATS, n_stats, T, H, NB, block_size, s_sb, s_st, s_sh, m_sb, m_st,
                        HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """Backward helper for long blocks: STATS[0, b*NB+n, h] = max, STATS[1, ...] = 1/sum(exp)."""
    pid_bn = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = (pid_bn // NB).to(tl.int64)
    n = pid_bn % NB
    start = n * block_size
    end = tl.minimum(start + block_size, T)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    m_use, inv_l = _block_stats(S + b * s_sb, M + b * m_sb, start, end, s_st, s_sh, m_st, offs_h,
                                h_mask, HAS_MASK, BLOCK_T, BLOCK_H)
    st = STATS + pid_bn.to(tl.int64) * H + offs_h
    tl.store(st, m_use, mask=h_mask)
    tl.store(st + n_stats, inv_l, mask=h_mask)


@triton.jit
def _apool_bwd_kernel(
    DO, S, V, O, M, DS, DV,
    T, H, D, NB, block_size,
    do_sb, do_sn, do_sh, do_sd,
    s_sb, s_st, s_sh,
    v_sb, v_st, v_sh, v_sd,
    o_sb, o_sn, o_sh, o_sd,
    m_sb, m_st,
    ds_sb, ds_st, ds_sh,
    dv_sb, dv_st, dv_sh, dv_sd,
    STATS, n_stats,
    SHARED: tl.constexpr, HAS_MASK: tl.constexpr, PRECOMP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bn = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_h = tl.program_id(2)
    b = (pid_bn // NB).to(tl.int64)
    n = pid_bn % NB
    n64 = n.to(tl.int64)
    start = n * block_size
    end = tl.minimum(start + block_size, T)
    t0 = start + pid_t * BLOCK_T  # may be >= end for the last (shorter) block: all masked

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H

    s_base = S + b * s_sb
    m_base = M + b * m_sb
    v_base = V + b * v_sb
    do_base = DO + b * do_sb + n64 * do_sn
    o_base = O + b * o_sb + n64 * o_sn

    if PRECOMP:  # long blocks: statistics computed once per block by _apool_stats_kernel
        st = STATS + pid_bn.to(tl.int64) * H + offs_h
        m_use = tl.load(st, mask=h_mask, other=0.0)
        inv_l = tl.load(st + n_stats, mask=h_mask, other=0.0)
    else:
        m_use, inv_l = _block_stats(s_base, m_base, start, end, s_st, s_sh, m_st, offs_h, h_mask,
                                    HAS_MASK, BLOCK_T, BLOCK_H)
    s, t64, in_blk, valid = _load_scores(s_base, m_base, t0, end, s_st, s_sh, m_st, offs_h,
                                         h_mask, HAS_MASK, BLOCK_T)
    w = tl.exp(s - m_use[None, :]) * inv_l[None, :]  # [BLOCK_T, BLOCK_H]

    dp = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    c = tl.zeros([BLOCK_H], dtype=tl.float32)
    dv_base = DV + b * dv_sb
    for d0 in range(0, D, BLOCK_D):
        dp, c = _bwd_d_step(dp, c, d0, D, do_base, o_base, v_base, dv_base, w,
                            t64, in_blk, valid, offs_h, h_mask, do_sh, do_sd, o_sh, o_sd,
                            v_st, v_sh, v_sd, dv_st, dv_sh, dv_sd, SHARED, BLOCK_D)

    ds = w * (dp - c[None, :])
    dsp = DS + b * ds_sb + t64[:, None] * ds_st + offs_h.to(tl.int64)[None, :] * ds_sh
    tl.store(dsp, ds.to(DS.dtype.element_ty), mask=in_blk[:, None] & h_mask[None, :])


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------

CANDIDATES = [
    triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w)
    for bt, bd, w in itertools.product((1, 2, 4, 8, 16, 32), (32, 64, 128, 256), (2, 4, 8))
]
_MAX_TUNED = 8  # configs benchmarked per autotune key


def _make_prune(max_per_thread: int, max_per_thread_fp32: int):
    """Clip each candidate's tile to the problem (BLOCK_T <= next_pow2(block_size), BLOCK_D <=
    next_pow2(D)), keep tiles giving every thread 4..max_per_thread fp32 elements of the
    (BLOCK_T, BLOCK_H, BLOCK_D) tile (register budget; fp32 values: max_per_thread_fp32, since the
    fp32 loads take more registers and 32 per thread spills on sm_90), and bench at most
    _MAX_TUNED of them, widest D tile first (the first kept config is the one a fixed-config launch
    runs)."""

    def prune(configs, named_args, **kwargs):
        bs = int(named_args["block_size"])
        D = int(named_args["D"])
        if named_args["V"].element_size() == 4:
            max_pt = max_per_thread_fp32
        else:
            max_pt = max_per_thread
        bh = int(kwargs.get("BLOCK_H", named_args.get("BLOCK_H", 1)))
        tmax, dmax = _p2(bs), _p2(D)
        lo = min(4, max(1, tmax * bh * dmax // 64))
        seen: dict = {}
        for c in configs:
            bt = min(c.kwargs["BLOCK_T"], tmax)
            bd = min(c.kwargs["BLOCK_D"], dmax)
            w = c.num_warps
            per_thread = bt * bh * bd / (32 * w)
            if lo <= per_thread <= max_pt:
                seen.setdefault((bt, bd, w), triton.Config({"BLOCK_T": bt, "BLOCK_D": bd},
                                                           num_warps=w))
        if not seen:  # tiny problem or huge BLOCK_H: one small tile
            bd = min(32, dmax)
            bt = 1
            while bt * 2 <= tmax and bt * 2 * bh * bd <= 1024:
                bt *= 2
            w = 1
            while w < 8 and 32 * w * 8 <= bt * bh * bd:
                w *= 2
            return [triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w)]
        # prefer wide D tiles (contiguous, fewer programs re-reading scores), then more warps
        keys = sorted(seen, key=lambda k: (-k[1], -k[2], -k[0]))
        return [seen[k] for k in keys[:_MAX_TUNED]]

    return prune


prune_fwd = _make_prune(32, 16)
prune_bwd = _make_prune(16, 16)
_FWD_KEY = ["block_size", "D", "BLOCK_H", "SHARED", "HAS_MASK"]
_BWD_KEY = _FWD_KEY + ["PRECOMP"]

fwd_kernel = Tuned(_apool_fwd_kernel, CANDIDATES, _FWD_KEY, prune_fwd)
bwd_kernel = Tuned(_apool_bwd_kernel, CANDIDATES, _BWD_KEY, prune_bwd)
KERNELS = (fwd_kernel, bwd_kernel)

# backward statistics of long blocks (untuned: one pass over the scores per block and head group)
_STATS_BLOCK_T = 64
_STATS_BLOCK_H = 16
_STATS_WARPS = 4


def _block_h(H: int, D: int, shared: bool) -> int:
    if shared:
        return _p2(H)
    # per-head: a head group whose (BLOCK_H, D) slab is about 1024 elements
    return max(1, min(_p2(H), 1024 // min(_p2(D), 256)))


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------


def unsupported(scores, values, block_size, key_padding_mask) -> list[str]:
    """Reasons this backend cannot run the case ([] = supported)."""
    reasons = []
    if scores.dtype not in _DTYPES:
        reasons.append(f"scores dtype {scores.dtype} not in fp16/bf16/fp32")
    if values.dtype not in _DTYPES:
        reasons.append(f"values dtype {values.dtype} not in fp16/bf16/fp32")
    if scores.dim() == 3 and values.dim() == 3:
        H = scores.shape[2]
        if _p2(H) > _MAX_SHARED_HEADS:
            reasons.append(f"shared values need H <= {_MAX_SHARED_HEADS} (got H = {H})")
    if scores.dim() == 3:
        B, T, H = scores.shape[0], scores.shape[1], scores.shape[2]
        nb = -(-T // max(int(block_size), 1))
        if B * nb >= 2**31:
            reasons.append("B * ceil(T / block_size) must be < 2**31")
        if min(int(block_size), T) > _MAX_BLOCK_SIZE:
            reasons.append(f"min(block_size, T) must be <= {_MAX_BLOCK_SIZE}")
        if values.dim() == 4 and triton.cdiv(H, _block_h(H, values.shape[-1], False)) > _launch.GRID_YZ_MAX:
            reasons.append(f"H = {H} heads need more than {_launch.GRID_YZ_MAX} head groups (grid axis limit)")
    return reasons


def _mask_args(key_padding_mask, scores):
    if key_padding_mask is None:
        return scores, 0, 0, False
    m = key_padding_mask
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)  # same element size: a view, strides kept
    return m, m.stride(0), m.stride(1), True


def _value_strides(values):
    if values.dim() == 3:
        return values.stride(0), values.stride(1), 0, values.stride(2), True
    return values.stride(0), values.stride(1), values.stride(2), values.stride(3), False


def forward(scores, values, block_size: int, key_padding_mask):
    B, T, H = scores.shape
    D = values.shape[-1]
    block_size = int(block_size)
    nb = -(-T // block_size)
    out = empty((B, nb, H, D), dtype=values.dtype, device=values.device)
    if out.numel() == 0:
        return out
    v_sb, v_st, v_sh, v_sd, shared = _value_strides(values)
    m, m_sb, m_st, has_mask = _mask_args(key_padding_mask, scores)
    BLOCK_H = _block_h(H, D, shared)
    args = (scores, values, m, out, T, H, D, nb, block_size,
            scores.stride(0), scores.stride(1), scores.stride(2),
            v_sb, v_st, v_sh, v_sd, m_sb, m_st, *out.stride())
    fwd_kernel[lambda meta: (B * nb, triton.cdiv(H, BLOCK_H), triton.cdiv(D, meta["BLOCK_D"]))](
        *args, SHARED=shared, HAS_MASK=has_mask, BLOCK_H=BLOCK_H)
    return out


def backward(dout, scores, values, out, block_size: int, key_padding_mask):
    B, T, H = scores.shape
    D = values.shape[-1]
    block_size = int(block_size)
    nb = -(-T // block_size)
    dscores = empty(scores.shape, dtype=scores.dtype, device=scores.device)
    dvalues = empty(values.shape, dtype=values.dtype, device=values.device)
    if B * T == 0:
        return dscores, dvalues
    if H == 0 or D == 0:  # nothing flows: every gradient is zero
        return dscores.zero_(), dvalues.zero_()
    v_sb, v_st, v_sh, v_sd, shared = _value_strides(values)
    if shared:
        dv_strides = (dvalues.stride(0), dvalues.stride(1), 0, dvalues.stride(2))
    else:
        dv_strides = tuple(dvalues.stride())
    m, m_sb, m_st, has_mask = _mask_args(key_padding_mask, scores)
    BLOCK_H = _block_h(H, D, shared)
    n_t = min(block_size, T)
    precomp = n_t > _STATS_INLINE_MAX
    n_stats = B * nb * H
    if precomp:
        # every backward program of a long block would otherwise re-walk the block's scores
        stats = torch.empty((2, n_stats), dtype=torch.float32, device=scores.device)
        bh_s = min(_p2(H), _STATS_BLOCK_H)
        _launch.launch(_apool_stats_kernel, (B * nb, triton.cdiv(H, bh_s)),
                       scores, m, stats, n_stats, T, H, nb, block_size, *scores.stride(), m_sb, m_st,
                       HAS_MASK=has_mask, BLOCK_T=min(_p2(n_t), _STATS_BLOCK_T), BLOCK_H=bh_s,
                       num_warps=_STATS_WARPS)
    else:
        stats = scores  # unused pointer
    args = (dout, scores, values, out, m, dscores, dvalues, T, H, D, nb, block_size,
            *dout.stride(), *scores.stride(), v_sb, v_st, v_sh, v_sd, *out.stride(),
            m_sb, m_st, *dscores.stride(), *dv_strides, stats, n_stats)
    kw = dict(SHARED=shared, HAS_MASK=has_mask, PRECOMP=precomp, BLOCK_H=BLOCK_H)
    bwd_kernel[lambda meta: (B * nb, triton.cdiv(n_t, meta["BLOCK_T"]), triton.cdiv(H, BLOCK_H))](*args, **kw)
    return dscores, dvalues
