"""Triton backend of ``block_local_attention`` (forward and backward kernels).

Semantics (see ``hilt_kernels/BACKENDS.md``): q, k, v are (B, T, H, D); query t attends to key s iff
``s // b == t // b`` (b = block_size), ``s <= t`` when causal, and key s is not padding
(``key_padding_mask[b, s]`` True = padding). The forward returns ``out`` (B, T, H, D) in q.dtype and
``lse`` (B, H, T) float32 = log sum_s exp(scale * q_t . k_s) over the valid keys; a query with no
valid key gets ``out = 0`` and ``lse = +inf``, so ``exp(score - lse) = 0`` in the backward and its
gradient contributions vanish without any special case.

How the kernels work
--------------------
All kernels read q, k, v, out and dout through their (B, T, H, D) strides (no copies; dout may be an
expanded view with stride 0), the padding mask through its (B, T) strides (a zero-copy uint8 view of
the bool tensor), and write fresh contiguous outputs allocated with ``hilt_kernels._alloc.empty``.
The head dimension is padded to ``BLOCK_D = max(16, next_pow2(D))`` with masked loads/stores
(any D <= 128); when D is already a power of two >= 16 (``EVEN_D``) the head-dim mask is dropped
so loads vectorize and the key/query loops pipeline (cp.async). Scores are computed in the exp2
domain (``scale * log2(e)`` folded into one factor); softmax statistics and all accumulators are
fp32; 16-bit inputs feed the tensor cores. fp32 inputs use ``input_precision="tf32x3"`` (about fp32
accuracy on tensor cores: plain "ieee" dots lower to FMA loops that spill heavily and take minutes to
compile at these tile sizes; the interpreter computes every dot exactly in fp32).
Since block membership is all that matters, a block size >= T is treated as b = T; any block size
is supported (the large-block path loops over key tiles).

* Small blocks (b <= BLOCK_M): one program handles a tile of ``BLOCK_M // b`` WHOLE blocks
  (``rows = (BLOCK_M // b) * b`` tokens) of one (batch, head). The whole block-diagonal score tile
  (BLOCK_M x BLOCK_M) lives in registers; the mask (same block: ``r // b == c // b``, causal
  ``c <= r``, key inside the tile and < T, key not padding) is built from iota's, so b = 8..32 packs
  4..16 blocks into a 64..128-row tile instead of wasting most of it. No loop, exact softmax.
  - forward ``_bla_fwd_small``: S = QK^T, P = exp2(S - rowmax), O = PV / rowsum, lse.
  - backward ``_bla_bwd_small``: recomputes P = exp2(S - lse), delta = rowsum(dO * O) in registers,
    dV = P^T dO, dP = dO V^T, dS = P (dP - delta), dQ = dS K * scale, dK = dS^T Q * scale: every
    token's gradient is produced by exactly one program, so no atomics.
* Large blocks (b > BLOCK_M): FlashAttention-2 style, a program per (query tile within a block,
  head, batch). The key loop covers only the keys of the same block, and only up to the diagonal
  when causal; online softmax (running max initialised to a finite -1e30, masked scores -inf, so a
  fully masked tile never produces inf - inf).
  - forward ``_bla_fwd_large``.
  - backward: ``_bla_bwd_dq_large`` (program per query tile, loop over the block's key tiles) also
    computes delta = rowsum(dO * O) for its rows and stores it (fp32 scratch); then
    ``_bla_bwd_dkdv_large`` (program per key tile, loop over the block's query tiles from the
    diagonal on when causal) reads it. No atomics.
* Path choice (``_SMALL_MAX_FWD`` / ``_SMALL_MAX_BWD``): the forward uses the small path for
  b <= 128 (fp32: 64, or 32 with D > 64) and the backward for b <= 64 (fp32: 32, and only with D <= 64) (the backward
  holds ~3x the forward's registers); bigger blocks use the large path, whose fp32 backward has its
  own smaller tiles (every 16-bit backward tile spills in fp32). These limits and the config pruning below come from
  ptxas register/spill reports for sm_90 (compiled here, not run: ``tests/ops/test_triton_compile.py``).
  The same thresholds, tiles and runtime-bound loops run under ``TRITON_INTERPRET=1``.
* Configs: module-level lists (small path: BLOCK_M 32/64/128 x num_warps 4/8; large path:
  (BLOCK_M, BLOCK_N) in 3 shapes x num_warps 4/8 x num_stages 2/3), ``triton.autotune``d on a GPU
  keyed on (b, D, causal) (+ dtypes, added by Triton) after pruning the configs a case cannot use
  (BLOCK_M < b on the small path) and those that spill or overflow shared memory on sm_90. Every
  config computes the same masks, so the choice only changes speed. Under the interpreter or with
  ``HILT_TRITON_FIXED_CONFIG=1`` the first kept config runs (``_launch.py``); tests run every kept one.
* Launches: under ``torch.cuda.device(q.device)``; the batch is grid axis 2 (limit 65,535), so larger
  batches launch in chunks of 65,535; head-dim offsets are int64 (``offs_d * stride`` would wrap).

Limits: fp16 / bf16 / fp32 only (fp64 -> reference backend), head dim D <= 128. Empty inputs
(B, T or H = 0) return empty outputs without a launch. Deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hilt_kernels._alloc import empty
from hilt_kernels.triton import _launch
from hilt_kernels.triton._launch import Tuned

__all__ = ["unsupported", "forward", "backward"]

_MAX_HEAD_DIM = 128
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

# Largest block size handled by the small-block (whole blocks per tile) kernels, by element size:
# above it the large-block (FlashAttention-2 style) kernels run. The limits keep the register
# footprint of a whole (BLOCK_M x BLOCK_M) score tile and its operands free of heavy spills on an
# H100 (checked with ptxas for D = 64 and 128); fp32 operands take twice the registers.
_SMALL_MAX_FWD = {2: 128, 4: 64}
_SMALL_MAX_BWD = {2: 64, 4: 32}


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rows_mask(row_ok, d_ok, EVEN_D: tl.constexpr):
    # Load/store mask of a (rows, BLOCK_D) tile. When D == BLOCK_D the head-dim part is dropped, so
    # the mask is constant along the contiguous dim and loads vectorize (and can be pipelined).
    if EVEN_D:
        m = row_ok[:, None]
    else:
        m = row_ok[:, None] & d_ok[None, :]
    return m


@triton.jit
def _bla_fwd_small(
    Q, K, V, O, LSE, KPM,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sob, sot, soh, sod,
    smb, smt,
    T, H, D, bs, qk_scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)

    rows_per_tile = (BLOCK_M // bs) * bs
    tile_start = pid_m * rows_per_tile
    r = tl.arange(0, BLOCK_M)
    offs_t = tile_start + r
    tok_ok = (r < rows_per_tile) & (offs_t < T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    d64 = offs_d.to(tl.int64)
    ld_mask = _rows_mask(tok_ok, d_ok, EVEN_D)
    t64 = offs_t.to(tl.int64)
    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)

    q = tl.load(Q + b64 * sqb + h64 * sqh + t64[:, None] * sqt + d64[None, :] * sqd, mask=ld_mask, other=0.0)
    k = tl.load(K + b64 * skb + h64 * skh + t64[:, None] * skt + d64[None, :] * skd, mask=ld_mask, other=0.0)
    v = tl.load(V + b64 * svb + h64 * svh + t64[:, None] * svt + d64[None, :] * svd, mask=ld_mask, other=0.0)

    key_ok = tok_ok
    if HAS_KPM:
        pad = tl.load(KPM + b64 * smb + t64 * smt, mask=tok_ok, other=1)
        key_ok = key_ok & (pad == 0)
    blk = r // bs
    valid = (blk[:, None] == blk[None, :]) & key_ok[None, :]
    if CAUSAL:
        valid = valid & (r[None, :] <= r[:, None])

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m = tl.maximum(tl.max(s, 1), -1.0e30)
    p = tl.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    has_key = l > 0.0
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l, 1.0), 0.0)
    out = acc * inv_l[:, None]
    lse = tl.where(has_key, (m + tl.log2(tl.where(has_key, l, 1.0))) * 0.6931471805599453, float("inf"))

    tl.store(O + b64 * sob + h64 * soh + t64[:, None] * sot + d64[None, :] * sod,
             out.to(O.dtype.element_ty), mask=ld_mask)
    tl.store(LSE + (b64 * H + h64) * T + t64, lse, mask=tok_ok)


@triton.jit
def _fwd_kv_tile(q, m_i, l_i, acc, K_base, V_base, M_base, k_start, kv_end,
                 offs_m, row_ok, offs_d, d_ok, skt, skd, svt, svd, smt, qk_scale,
                 CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr):
    # One key tile of the online softmax (keys [k_start, k_start + BLOCK_N) clipped to kv_end).
    offs_n = k_start + tl.arange(0, BLOCK_N)
    col_ok = offs_n < kv_end
    n64 = offs_n.to(tl.int64)
    d64 = offs_d.to(tl.int64)
    kv_mask = _rows_mask(col_ok, d_ok, EVEN_D)
    k = tl.load(K_base + n64[:, None] * skt + d64[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V_base + n64[:, None] * svt + d64[None, :] * svd, mask=kv_mask, other=0.0)
    key_ok = col_ok
    if HAS_KPM:
        pad = tl.load(M_base + n64 * smt, mask=col_ok, other=1)
        key_ok = key_ok & (pad == 0)
    valid = key_ok[None, :] & row_ok[:, None]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _bla_fwd_large(
    Q, K, V, O, LSE, KPM,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sob, sot, soh, sod,
    smb, smt,
    T, H, D, bs, qk_scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    q_tiles = tl.cdiv(bs, BLOCK_M)
    n = pid // q_tiles
    j = pid % q_tiles
    blk_start = n * bs
    blk_end = tl.minimum(blk_start + bs, T)
    q_start = blk_start + j * BLOCK_M

    offs_m = q_start + tl.arange(0, BLOCK_M)
    row_ok = offs_m < blk_end
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    d64 = offs_d.to(tl.int64)
    m64 = offs_m.to(tl.int64)
    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)
    q_mask = _rows_mask(row_ok, d_ok, EVEN_D)
    q = tl.load(Q + b64 * sqb + h64 * sqh + m64[:, None] * sqt + d64[None, :] * sqd, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    kv_end = blk_end
    if CAUSAL:
        kv_end = tl.minimum(blk_end, q_start + BLOCK_M)
    K_base = K + b64 * skb + h64 * skh
    V_base = V + b64 * svb + h64 * svh
    M_base = KPM + b64 * smb
    for k_start in range(blk_start, kv_end, BLOCK_N):
        m_i, l_i, acc = _fwd_kv_tile(
            q, m_i, l_i, acc, K_base, V_base, M_base, k_start, kv_end,
            offs_m, row_ok, offs_d, d_ok, skt, skd, svt, svd, smt, qk_scale,
            CAUSAL, HAS_KPM, DOT_PREC, BLOCK_N, EVEN_D)

    has_key = l_i > 0.0
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
    out = acc * inv_l[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(O + b64 * sob + h64 * soh + m64[:, None] * sot + d64[None, :] * sod,
             out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + (b64 * H + h64) * T + m64, lse, mask=row_ok)


@triton.jit
def _bla_bwd_small(
    Q, K, V, O, DO, LSE, DQ, DK, DV, KPM,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sob, sot, soh, sod,
    sdob, sdot, sdoh, sdod,
    sgb, sgt, sgh, sgd,
    smb, smt,
    T, H, D, bs, qk_scale, scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    # dq/dk/dv share the strides (sgb, sgt, sgh, sgd): they are fresh contiguous (B, T, H, D).
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)

    rows_per_tile = (BLOCK_M // bs) * bs
    tile_start = pid_m * rows_per_tile
    r = tl.arange(0, BLOCK_M)
    offs_t = tile_start + r
    tok_ok = (r < rows_per_tile) & (offs_t < T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    d64 = offs_d.to(tl.int64)
    ld_mask = _rows_mask(tok_ok, d_ok, EVEN_D)
    t64 = offs_t.to(tl.int64)
    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)
    od = d64[None, :]

    q = tl.load(Q + b64 * sqb + h64 * sqh + t64[:, None] * sqt + od * sqd, mask=ld_mask, other=0.0)
    k = tl.load(K + b64 * skb + h64 * skh + t64[:, None] * skt + od * skd, mask=ld_mask, other=0.0)
    v = tl.load(V + b64 * svb + h64 * svh + t64[:, None] * svt + od * svd, mask=ld_mask, other=0.0)
    o = tl.load(O + b64 * sob + h64 * soh + t64[:, None] * sot + od * sod, mask=ld_mask, other=0.0)
    do = tl.load(DO + b64 * sdob + h64 * sdoh + t64[:, None] * sdot + od * sdod, mask=ld_mask, other=0.0)
    lse = tl.load(LSE + (b64 * H + h64) * T + t64, mask=tok_ok, other=float("inf"))
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)

    key_ok = tok_ok
    if HAS_KPM:
        pad = tl.load(KPM + b64 * smb + t64 * smt, mask=tok_ok, other=1)
        key_ok = key_ok & (pad == 0)
    blk = r // bs
    valid = (blk[:, None] == blk[None, :]) & key_ok[None, :] & tok_ok[:, None]
    if CAUSAL:
        valid = valid & (r[None, :] <= r[:, None])

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.exp2(s - (lse * 1.4426950408889634)[:, None])
    p = tl.where(valid, p, 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    ds_c = ds.to(q.dtype)
    dq = tl.dot(ds_c, k, input_precision=DOT_PREC) * scale
    dk = tl.dot(tl.trans(ds_c), q, input_precision=DOT_PREC) * scale

    g_off = b64 * sgb + h64 * sgh + t64[:, None] * sgt + od * sgd
    tl.store(DQ + g_off, dq.to(DQ.dtype.element_ty), mask=ld_mask)
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=ld_mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=ld_mask)


@triton.jit
def _dq_kv_tile(dq, q, do, lse2, delta, K_base, V_base, M_base, k_start, kv_end,
                offs_m, row_ok, offs_d, d_ok, skt, skd, svt, svd, smt, qk_scale,
                CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr):
    offs_n = k_start + tl.arange(0, BLOCK_N)
    col_ok = offs_n < kv_end
    n64 = offs_n.to(tl.int64)
    d64 = offs_d.to(tl.int64)
    kv_mask = _rows_mask(col_ok, d_ok, EVEN_D)
    k = tl.load(K_base + n64[:, None] * skt + d64[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V_base + n64[:, None] * svt + d64[None, :] * svd, mask=kv_mask, other=0.0)
    key_ok = col_ok
    if HAS_KPM:
        pad = tl.load(M_base + n64 * smt, mask=col_ok, other=1)
        key_ok = key_ok & (pad == 0)
    valid = key_ok[None, :] & row_ok[:, None]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    p = tl.where(valid, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)


@triton.jit
def _bla_bwd_dq_large(
    Q, K, V, O, DO, LSE, DELTA, DQ, KPM,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sob, sot, soh, sod,
    sdob, sdot, sdoh, sdod,
    sgb, sgt, sgh, sgd,
    smb, smt,
    T, H, D, bs, qk_scale, scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    q_tiles = tl.cdiv(bs, BLOCK_M)
    n = pid // q_tiles
    j = pid % q_tiles
    blk_start = n * bs
    blk_end = tl.minimum(blk_start + bs, T)
    q_start = blk_start + j * BLOCK_M

    offs_m = q_start + tl.arange(0, BLOCK_M)
    row_ok = offs_m < blk_end
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    d64 = offs_d.to(tl.int64)
    od = d64[None, :]
    m64 = offs_m.to(tl.int64)
    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)
    q_mask = _rows_mask(row_ok, d_ok, EVEN_D)

    q = tl.load(Q + b64 * sqb + h64 * sqh + m64[:, None] * sqt + od * sqd, mask=q_mask, other=0.0)
    o = tl.load(O + b64 * sob + h64 * soh + m64[:, None] * sot + od * sod, mask=q_mask, other=0.0)
    do = tl.load(DO + b64 * sdob + h64 * sdoh + m64[:, None] * sdot + od * sdod, mask=q_mask, other=0.0)
    row_off = (b64 * H + h64) * T + m64
    lse = tl.load(LSE + row_off, mask=row_ok, other=float("inf"))
    lse2 = lse * 1.4426950408889634
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row_off, delta, mask=row_ok)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_end = blk_end
    if CAUSAL:
        kv_end = tl.minimum(blk_end, q_start + BLOCK_M)
    K_base = K + b64 * skb + h64 * skh
    V_base = V + b64 * svb + h64 * svh
    M_base = KPM + b64 * smb
    for k_start in range(blk_start, kv_end, BLOCK_N):
        dq = _dq_kv_tile(
            dq, q, do, lse2, delta, K_base, V_base, M_base, k_start, kv_end,
            offs_m, row_ok, offs_d, d_ok, skt, skd, svt, svd, smt, qk_scale,
            CAUSAL, HAS_KPM, DOT_PREC, BLOCK_N, EVEN_D)

    dq = dq * scale
    tl.store(DQ + b64 * sgb + h64 * sgh + m64[:, None] * sgt + od * sgd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _dkdv_q_tile(dk, dv, k, v, key_ok, Q_base, DO_base, LSE_row, DELTA_row, q_start, blk_end,
                 offs_n, offs_d, d_ok, sqt, sqd, sdot, sdod, qk_scale,
                 CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                 EVEN_D: tl.constexpr):
    offs_m = q_start + tl.arange(0, BLOCK_M)
    row_ok = offs_m < blk_end
    m64 = offs_m.to(tl.int64)
    d64 = offs_d.to(tl.int64)
    q_mask = _rows_mask(row_ok, d_ok, EVEN_D)
    q = tl.load(Q_base + m64[:, None] * sqt + d64[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(DO_base + m64[:, None] * sdot + d64[None, :] * sdod, mask=q_mask, other=0.0)
    lse = tl.load(LSE_row + m64, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA_row + m64, mask=row_ok, other=0.0)
    valid = key_ok[:, None] & row_ok[None, :]
    if CAUSAL:
        valid = valid & (offs_n[:, None] <= offs_m[None, :])
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
    p_t = tl.exp2(s_t - (lse * 1.4426950408889634)[None, :])
    p_t = tl.where(valid, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bla_bwd_dkdv_large(
    Q, K, V, DO, LSE, DELTA, DK, DV, KPM,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sdob, sdot, sdoh, sdod,
    sgb, sgt, sgh, sgd,
    smb, smt,
    T, H, D, bs, qk_scale, scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    k_tiles = tl.cdiv(bs, BLOCK_N)
    n = pid // k_tiles
    j = pid % k_tiles
    blk_start = n * bs
    blk_end = tl.minimum(blk_start + bs, T)
    k_start = blk_start + j * BLOCK_N

    offs_n = k_start + tl.arange(0, BLOCK_N)
    col_ok = offs_n < blk_end
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    d64 = offs_d.to(tl.int64)
    od = d64[None, :]
    n64 = offs_n.to(tl.int64)
    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)
    kv_mask = _rows_mask(col_ok, d_ok, EVEN_D)

    k = tl.load(K + b64 * skb + h64 * skh + n64[:, None] * skt + od * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * svb + h64 * svh + n64[:, None] * svt + od * svd, mask=kv_mask, other=0.0)
    key_ok = col_ok
    if HAS_KPM:
        pad = tl.load(KPM + b64 * smb + n64 * smt, mask=col_ok, other=1)
        key_ok = key_ok & (pad == 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_lo = blk_start
    if CAUSAL:
        q_lo = k_start
    Q_base = Q + b64 * sqb + h64 * sqh
    DO_base = DO + b64 * sdob + h64 * sdoh
    row_base = (b64 * H + h64) * T
    for q_start in range(q_lo, blk_end, BLOCK_M):
        dk, dv = _dkdv_q_tile(
            dk, dv, k, v, key_ok, Q_base, DO_base, LSE + row_base, DELTA + row_base,
            q_start, blk_end, offs_n, offs_d, d_ok, sqt, sqd, sdot, sdod, qk_scale,
            CAUSAL, DOT_PREC, BLOCK_M, EVEN_D)

    dk = dk * scale
    g_off = b64 * sgb + h64 * sgh + n64[:, None] * sgt + od * sgd
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------
# Configs: module-level lists, pruned per launch (on the CPU) and autotuned on a GPU; under the
# interpreter or HILT_TRITON_FIXED_CONFIG=1 the first kept config runs (see _launch.py).
# ----------------------------------------------------------------------------------------------

_KEY = ["bs", "D", "CAUSAL"]

# No loop in the small-block kernels: num_stages is irrelevant there. A 128-row tile needs 8 warps
# (4 warps spill); the backward stops at 64 rows (128 spills with any warp count).
FWD_SMALL_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=1)
                     for (bm, w) in ((32, 4), (32, 8), (64, 4), (64, 8), (128, 8))]
BWD_SMALL_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=1)
                     for (bm, w) in ((32, 4), (32, 8), (64, 4), (64, 8))]
FWD_LARGE_CONFIGS = (
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
     for (bm, bn) in ((64, 64), (128, 64), (128, 32)) for w in (4, 8) for st in (2, 3)]
    + [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)  # fp32 with D > 64 only
       for (bm, bn) in ((32, 32), (32, 16), (16, 32)) for w in (4, 8)])
# The backward lists hold the 16-bit tiles, then smaller tiles used for fp32 only (fp32 operands take
# twice the registers and shared memory: every 16-bit backward tile spills in fp32).
_BWD_DQ_TILES_16 = ((64, 64), (128, 32), (64, 32))
_BWD_DKDV_TILES_16 = ((64, 64), (32, 128), (32, 64))
_BWD_TILES_32 = ((32, 32), (16, 64), (64, 16), (32, 16), (16, 16))
BWD_DQ_LARGE_CONFIGS = (
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
     for (bm, bn) in _BWD_DQ_TILES_16 for w in (4, 8) for st in (2, 3)]
    + [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
       for (bm, bn) in _BWD_TILES_32 for w in (4, 8)])
BWD_DKDV_LARGE_CONFIGS = (
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
     for (bm, bn) in _BWD_DKDV_TILES_16 for w in (4, 8) for st in (2, 3)]
    + [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
       for (bm, bn) in _BWD_TILES_32 for w in (4, 8)])

# fp32 configs free of spills on sm_90 (ptxas, tests/ops/test_triton_compile.py), as
# (BLOCK_M, BLOCK_N, num_warps) for a head dim padded to <= 64 and to 128; num_stages 2 only.
# Measured with and without a padding mask, at D = 32, 64, 80 and 128 (D = 80: masked head dim, the worst case).
_FP32_OK = {
    "_bla_fwd_large": ({(64, 64, 4), (128, 64, 8), (128, 32, 4), (128, 32, 8)},
                       {(32, 32, 8), (32, 16, 8), (16, 32, 4), (16, 32, 8)}),
    "_bla_bwd_dq_large": ({(bm, bn, w) for (bm, bn) in ((32, 32), (16, 64), (64, 16)) for w in (4, 8)},
                          {(16, 64, 8)}),
    "_bla_bwd_dkdv_large": ({(bm, bn, w) for (bm, bn) in ((16, 64), (64, 16)) for w in (4, 8)},  # (32, 32) spills at D = 32
                            {(32, 16, 8), (16, 16, 4), (16, 16, 8)}),
}


def _fp32(named_args) -> bool:
    return named_args["Q"].element_size() == 4


def _small_bwd_ok(fp32: bool, D: int) -> bool:
    """Whether the small-path backward has a spill-free config (fp32 with D > 64 has none)."""
    return not (fp32 and D > 64)


def _small_fwd_max(elem_size: int, D: int) -> int:
    """Largest b on the small-path forward: fp32 with D > 64 spills from 64 rows on."""
    return 32 if (elem_size == 4 and D > 64) else _SMALL_MAX_FWD[elem_size]


def prune_small_fwd(configs, named_args, **kwargs):
    """Small-path forward: tiles that hold at least one whole block (BLOCK_M >= b), minus the fp32
    tiles that spill (128 rows; 64 rows with a head dim > 64)."""
    bs = named_args["bs"]
    cap = (32 if named_args["D"] > 64 else 64) if _fp32(named_args) else 128
    kept = [c for c in configs if bs <= c.kwargs["BLOCK_M"] <= cap]
    return kept or [max(configs, key=lambda c: c.kwargs["BLOCK_M"])]


def prune_small_bwd(configs, named_args, **kwargs):
    """Small-path backward: BLOCK_M >= b, minus the tiles that spill (ptxas, sm_90)."""
    bs = named_args["bs"]
    D = named_args["D"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] >= bs]
    if _fp32(named_args):  # 64 fp32 rows spill with any warp count, 32 with 4 warps and a mask
        lean = [c for c in kept if c.kwargs["BLOCK_M"] <= 32 and c.num_warps == 8]
    else:  # 64 rows with a 128-wide head dim spill with 4 warps; 32 rows, 8 warps and a mask spill too
        has_kpm = kwargs.get("HAS_KPM", False)
        lean = [c for c in kept if not (c.kwargs["BLOCK_M"] >= 64 and D > 64 and c.num_warps < 8)
                and not (has_kpm and c.kwargs["BLOCK_M"] == 32 and c.num_warps == 8)]
    return lean or kept or [max(configs, key=lambda c: c.kwargs["BLOCK_M"])]


def _make_prune_large(name, tiles_16):
    def prune(configs, named_args, **kwargs):
        """Large path: drop the configs that spill or overflow shared memory (ptxas, sm_90)."""
        D = named_args["D"]
        if _fp32(named_args):
            ok = _FP32_OK[name][0 if D <= 64 else 1]
            kept = [c for c in configs if c.num_stages == 2
                    and (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) in ok]
        else:
            # With a 128-wide head dim, tiles of >= 4096 score entries spill with 4 warps; so do the
            # dk/dv kernel's with a padding mask.
            wide = D > 64 or (name == "_bla_bwd_dkdv_large" and kwargs.get("HAS_KPM", False))
            kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) in tiles_16
                    and not (wide and c.num_warps < 8 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 4096)]
        return kept or configs[:1]

    return prune


prune_fwd_large = _make_prune_large("_bla_fwd_large", ((64, 64), (128, 64), (128, 32)))
prune_bwd_dq_large = _make_prune_large("_bla_bwd_dq_large", _BWD_DQ_TILES_16)
prune_bwd_dkdv_large = _make_prune_large("_bla_bwd_dkdv_large", _BWD_DKDV_TILES_16)


fwd_small = Tuned(_bla_fwd_small, FWD_SMALL_CONFIGS, _KEY, prune_small_fwd)
bwd_small = Tuned(_bla_bwd_small, BWD_SMALL_CONFIGS, _KEY, prune_small_bwd)
fwd_large = Tuned(_bla_fwd_large, FWD_LARGE_CONFIGS, _KEY, prune_fwd_large)
bwd_dq_large = Tuned(_bla_bwd_dq_large, BWD_DQ_LARGE_CONFIGS, _KEY, prune_bwd_dq_large)
bwd_dkdv_large = Tuned(_bla_bwd_dkdv_large, BWD_DKDV_LARGE_CONFIGS, _KEY, prune_bwd_dkdv_large)
KERNELS = (fwd_small, bwd_small, fwd_large, bwd_dq_large, bwd_dkdv_large)


# ----------------------------------------------------------------------------------------------
# Python entry points
# ----------------------------------------------------------------------------------------------


def unsupported(q, k, v, block_size, causal, scale, key_padding_mask) -> list[str]:
    """Reasons this backend cannot run the case (empty list = supported)."""
    reasons = []
    if q.dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"dtype {q.dtype} not supported (float16, bfloat16, float32 only)")
    if q.dim() == 4 and q.shape[-1] > _MAX_HEAD_DIM:
        reasons.append(f"head dim D={q.shape[-1]} > {_MAX_HEAD_DIM}")
    if q.dim() == 4 and q.shape[2] > _launch.GRID_YZ_MAX:
        reasons.append(f"H={q.shape[2]} heads > {_launch.GRID_YZ_MAX} (grid axis 1)")
    return reasons


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs: "tf32x3" (3 tensor-core TF32 products, about fp32 accuracy): plain "ieee" dots lower
    # to FMA loops that spill thousands of bytes and take minutes to compile for these tile sizes.
    # 16-bit inputs ignore the setting (tensor cores, fp32 accumulation). The interpreter computes
    # every dot exactly in fp32.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _strides4(t: torch.Tensor):
    return tuple(t.stride())


def _kpm_args(key_padding_mask, q):
    """(mask tensor, its (B, T) strides, has_mask). Without a mask q stands in for the pointer
    (never read: HAS_KPM=False), so nothing is allocated."""
    if key_padding_mask is None:
        return q, (0, 0), False
    m = key_padding_mask
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    elif m.dtype != torch.uint8:
        m = (m != 0).view(torch.uint8)
    return m, tuple(m.stride()), True


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(max(D, 1)))


def _batch_chunks(B: int):
    """Batch ranges of at most GRID_YZ_MAX (the batch is grid axis 2, limited to 65,535)."""
    step = _launch.GRID_YZ_MAX
    return [(b0, min(B, b0 + step)) for b0 in range(0, B, step)]


def forward(q, k, v, block_size: int, causal: bool, scale: float, key_padding_mask):
    """out (B, T, H, D) in q.dtype and lse (B, H, T) fp32 for q, k, v (B, T, H, D)."""
    B, T, H, D = q.shape
    out = empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse = empty((B, H, T), dtype=torch.float32, device=q.device)
    if B == 0 or T == 0 or H == 0:
        return out, lse
    bs = int(min(int(block_size), T))
    BLOCK_D = _block_d(D)
    meta = dict(CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None, DOT_PREC=_dot_prec(q.dtype),
                BLOCK_D=BLOCK_D, EVEN_D=(BLOCK_D == D))
    small = bs <= _small_fwd_max(q.element_size(), D)
    nb = triton.cdiv(T, bs)
    for b0, b1 in _batch_chunks(B):
        qc, kc, vc, oc, lc = q[b0:b1], k[b0:b1], v[b0:b1], out[b0:b1], lse[b0:b1]
        kpm, (smb, smt), _ = _kpm_args(None if key_padding_mask is None else key_padding_mask[b0:b1], qc)
        args = (qc, kc, vc, oc, lc, kpm,
                *_strides4(qc), *_strides4(kc), *_strides4(vc), *_strides4(oc),
                smb, smt, T, H, D, bs, float(scale) * _LOG2E)
        Bc = b1 - b0
        if small:
            fwd_small[lambda META: (triton.cdiv(T, (META["BLOCK_M"] // bs) * bs), H, Bc)](*args, **meta)
        else:
            fwd_large[lambda META: (nb * triton.cdiv(bs, META["BLOCK_M"]), H, Bc)](*args, **meta)
    return out, lse


def backward(dout, q, k, v, out, lse, block_size: int, causal: bool, scale: float, key_padding_mask):
    """dq, dk, dv (B, T, H, D) in q.dtype."""
    B, T, H, D = q.shape
    dq = empty((B, T, H, D), dtype=q.dtype, device=q.device)
    dk = empty((B, T, H, D), dtype=q.dtype, device=q.device)
    dv = empty((B, T, H, D), dtype=q.dtype, device=q.device)
    if B == 0 or T == 0 or H == 0:
        return dq, dk, dv
    if lse.dtype != torch.float32 or not lse.is_contiguous():
        lse = lse.float().contiguous()
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    if out.dtype != q.dtype:
        out = out.to(q.dtype)
    bs = int(min(int(block_size), T))
    BLOCK_D = _block_d(D)
    qk_scale = float(scale) * _LOG2E
    meta = dict(CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None, DOT_PREC=_dot_prec(q.dtype),
                BLOCK_D=BLOCK_D, EVEN_D=(BLOCK_D == D))
    small = bs <= _SMALL_MAX_BWD[q.element_size()] and _small_bwd_ok(q.element_size() == 4, D)
    nb = triton.cdiv(T, bs)
    # delta = rowsum(dout * out), fp32 scratch written by the large-path dq kernel for every row < T.
    delta = None if small else torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    for b0, b1 in _batch_chunks(B):
        Bc = b1 - b0
        qc, kc, vc, oc, doc, lc = q[b0:b1], k[b0:b1], v[b0:b1], out[b0:b1], dout[b0:b1], lse[b0:b1]
        dqc, dkc, dvc = dq[b0:b1], dk[b0:b1], dv[b0:b1]
        kpm, (smb, smt), _ = _kpm_args(None if key_padding_mask is None else key_padding_mask[b0:b1], qc)
        sq, sk, sv, so, sdo, sg = (_strides4(qc), _strides4(kc), _strides4(vc), _strides4(oc),
                                   _strides4(doc), _strides4(dqc))
        if small:
            args = (qc, kc, vc, oc, doc, lc, dqc, dkc, dvc, kpm,
                    *sq, *sk, *sv, *so, *sdo, *sg, smb, smt, T, H, D, bs, qk_scale, float(scale))
            bwd_small[lambda META: (triton.cdiv(T, (META["BLOCK_M"] // bs) * bs), H, Bc)](*args, **meta)
            continue
        dc = delta[b0:b1]
        dq_args = (qc, kc, vc, oc, doc, lc, dc, dqc, kpm,
                   *sq, *sk, *sv, *so, *sdo, *sg, smb, smt, T, H, D, bs, qk_scale, float(scale))
        bwd_dq_large[lambda META: (nb * triton.cdiv(bs, META["BLOCK_M"]), H, Bc)](*dq_args, **meta)
        dkdv_args = (qc, kc, vc, doc, lc, dc, dkc, dvc, kpm,
                     *sq, *sk, *sv, *sdo, *sg, smb, smt, T, H, D, bs, qk_scale, float(scale))
        bwd_dkdv_large[lambda META: (nb * triton.cdiv(bs, META["BLOCK_N"]), H, Bc)](*dkdv_args, **meta)
    return dq, dk, dv
