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
fp32; 16-bit inputs feed the tensor cores. fp32 inputs use ``input_precision="tf32x3"`` on a GPU
(about fp32 accuracy on tensor cores: plain "ieee" dots lower to FMA loops that spill heavily and
take minutes to compile at these tile sizes) and "ieee" under the interpreter.
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
* Path choice (``_SMALL_MAX_FWD`` / ``_SMALL_MAX_BWD``): on a GPU the forward uses the small path
  for b <= 128 (fp32: 64) and the backward for b <= 64 (fp32: 32) (the backward holds ~3x the
  forward's registers); bigger blocks use the large path. These limits and the config pruning
  below come from ptxas register/spill reports for sm_90 at D = 64 and 128 (compiled here, not
  run). Under ``TRITON_INTERPRET=1`` (CPU tests) both use the small path for b <= 32 with
  BLOCK_M = max(16, next_pow2(b)), and the large path with 16 x 16 tiles above that.
* Configs: on a GPU every kernel is ``triton.autotune``d (small path: BLOCK_M 32/64/128 x
  num_warps 4/8; large path: (BLOCK_M, BLOCK_N) in 3 shapes x num_warps 4/8 x num_stages 2/3)
  keyed on (b, D, causal) (+ dtypes, added by Triton); configs a case cannot use (BLOCK_M < b on
  the small path) or that spill are pruned. Every config computes the same masks, so the choice
  only changes speed. Under the interpreter one fixed config is used, and the large-path loops run
  a constexpr trip count (``STATIC_ITERS``, see ``_interp_large``) because triton 3.6's interpreter
  with numpy >= 2.4 cannot run loops with runtime bounds (triton-lang/triton#9171).

Limits: fp16 / bf16 / fp32 only (fp64 -> reference backend), head dim D <= 128. Empty inputs
(B, T or H = 0) return empty outputs without a launch. Deterministic (no atomics).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hilt_kernels._alloc import empty

__all__ = ["unsupported", "forward", "backward"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_MAX_HEAD_DIM = 128
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

# Largest block size handled by the small-block (whole blocks per tile) kernels, by element size:
# above it the large-block (FlashAttention-2 style) kernels run. The limits keep the register
# footprint of a whole (BLOCK_M x BLOCK_M) score tile and its operands free of heavy spills on an
# H100 (checked with ptxas for D = 64 and 128); fp32 operands take twice the registers.
if _INTERPRET:
    _SMALL_MAX_FWD = {2: 32, 4: 32}
    _SMALL_MAX_BWD = {2: 32, 4: 32}
else:
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
    ld_mask = _rows_mask(tok_ok, d_ok, EVEN_D)
    t64 = offs_t.to(tl.int64)
    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)

    q = tl.load(Q + b64 * sqb + h64 * sqh + t64[:, None] * sqt + offs_d[None, :] * sqd, mask=ld_mask, other=0.0)
    k = tl.load(K + b64 * skb + h64 * skh + t64[:, None] * skt + offs_d[None, :] * skd, mask=ld_mask, other=0.0)
    v = tl.load(V + b64 * svb + h64 * svh + t64[:, None] * svt + offs_d[None, :] * svd, mask=ld_mask, other=0.0)

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

    tl.store(O + b64 * sob + h64 * soh + t64[:, None] * sot + offs_d[None, :] * sod,
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
    kv_mask = _rows_mask(col_ok, d_ok, EVEN_D)
    k = tl.load(K_base + n64[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V_base + n64[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
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
    STATIC_ITERS: tl.constexpr,
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
    m64 = offs_m.to(tl.int64)
    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)
    q_mask = _rows_mask(row_ok, d_ok, EVEN_D)
    q = tl.load(Q + b64 * sqb + h64 * sqh + m64[:, None] * sqt + offs_d[None, :] * sqd, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    kv_end = blk_end
    if CAUSAL:
        kv_end = tl.minimum(blk_end, q_start + BLOCK_M)
    K_base = K + b64 * skb + h64 * skh
    V_base = V + b64 * svb + h64 * svh
    M_base = KPM + b64 * smb
    if STATIC_ITERS > 0:
        # interpreter: constexpr trip count (tiles past kv_end are fully masked no-ops)
        for it in range(STATIC_ITERS):
            m_i, l_i, acc = _fwd_kv_tile(
                q, m_i, l_i, acc, K_base, V_base, M_base, blk_start + it * BLOCK_N, kv_end,
                offs_m, row_ok, offs_d, d_ok, skt, skd, svt, svd, smt, qk_scale,
                CAUSAL, HAS_KPM, DOT_PREC, BLOCK_N, EVEN_D)
    else:
        for k_start in range(blk_start, kv_end, BLOCK_N):
            m_i, l_i, acc = _fwd_kv_tile(
                q, m_i, l_i, acc, K_base, V_base, M_base, k_start, kv_end,
                offs_m, row_ok, offs_d, d_ok, skt, skd, svt, svd, smt, qk_scale,
                CAUSAL, HAS_KPM, DOT_PREC, BLOCK_N, EVEN_D)

    has_key = l_i > 0.0
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
    out = acc * inv_l[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(O + b64 * sob + h64 * soh + m64[:, None] * sot + offs_d[None, :] * sod,
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
    ld_mask = _rows_mask(tok_ok, d_ok, EVEN_D)
    t64 = offs_t.to(tl.int64)
    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)
    od = offs_d[None, :]

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
    kv_mask = _rows_mask(col_ok, d_ok, EVEN_D)
    k = tl.load(K_base + n64[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V_base + n64[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
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
    STATIC_ITERS: tl.constexpr,
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
    od = offs_d[None, :]
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
    if STATIC_ITERS > 0:
        for it in range(STATIC_ITERS):
            dq = _dq_kv_tile(
                dq, q, do, lse2, delta, K_base, V_base, M_base, blk_start + it * BLOCK_N, kv_end,
                offs_m, row_ok, offs_d, d_ok, skt, skd, svt, svd, smt, qk_scale,
                CAUSAL, HAS_KPM, DOT_PREC, BLOCK_N, EVEN_D)
    else:
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
    q_mask = _rows_mask(row_ok, d_ok, EVEN_D)
    q = tl.load(Q_base + m64[:, None] * sqt + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(DO_base + m64[:, None] * sdot + offs_d[None, :] * sdod, mask=q_mask, other=0.0)
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
    STATIC_ITERS: tl.constexpr,
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
    od = offs_d[None, :]
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
    if STATIC_ITERS > 0:
        for it in range(STATIC_ITERS):
            dk, dv = _dkdv_q_tile(
                dk, dv, k, v, key_ok, Q_base, DO_base, LSE + row_base, DELTA + row_base,
                q_lo + it * BLOCK_M, blk_end, offs_n, offs_d, d_ok, sqt, sqd, sdot, sdod, qk_scale,
                CAUSAL, DOT_PREC, BLOCK_M, EVEN_D)
    else:
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
# Configs: autotuned on a GPU, one fixed config under the interpreter
# ----------------------------------------------------------------------------------------------

_KEY = ["bs", "D", "CAUSAL"]


def _prune_small_fwd(configs, named_args, **kwargs):
    bs = named_args["bs"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] >= bs]
    return kept or [max(configs, key=lambda c: c.kwargs["BLOCK_M"])]


def _prune_small_bwd(configs, named_args, **kwargs):
    bs = named_args["bs"]
    D = named_args["D"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] >= bs]
    # 64 rows with a 128-wide head dim spill with 4 warps.
    lean = [c for c in kept if not (c.kwargs["BLOCK_M"] >= 64 and D > 64 and c.num_warps < 8)]
    return lean or kept or [max(configs, key=lambda c: c.kwargs["BLOCK_M"])]


def _prune_large(configs, named_args, **kwargs):
    # With a 128-wide head dim, tiles of >= 4096 score entries spill with 4 warps (ptxas, sm_90).
    # fp32 operands double the registers and shared memory: keep their tiles and pipelines small.
    D = named_args["D"]
    fp32 = named_args["Q"].element_size() == 4
    kept = []
    for c in configs:
        tile = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
        if D > 64 and c.num_warps < 8 and tile >= 4096:
            continue
        if fp32 and (c.num_stages > 2 or (D > 64 and tile > 4096)):
            continue
        kept.append(c)
    return kept or configs


if _INTERPRET:
    _fwd_small = _bla_fwd_small
    _fwd_large = _bla_fwd_large
    _bwd_small = _bla_bwd_small
    _bwd_dq_large = _bla_bwd_dq_large
    _bwd_dkdv_large = _bla_bwd_dkdv_large
else:
    # No loop in the small-block kernels: num_stages is irrelevant there. A 128-row tile needs 8 warps
    # (4 warps spill); the backward stops at 64 rows (128 spills with any warp count).
    _fwd_small = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=1)
                 for (bm, w) in ((32, 4), (32, 8), (64, 4), (64, 8), (128, 8))],
        key=_KEY, prune_configs_by={"early_config_prune": _prune_small_fwd})(_bla_fwd_small)
    _bwd_small = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=1)
                 for (bm, w) in ((32, 4), (32, 8), (64, 4), (64, 8))],
        key=_KEY, prune_configs_by={"early_config_prune": _prune_small_bwd})(_bla_bwd_small)
    _fwd_large = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                 for (bm, bn) in ((64, 64), (128, 64), (128, 32)) for w in (4, 8) for st in (2, 3)],
        key=_KEY, prune_configs_by={"early_config_prune": _prune_large})(_bla_fwd_large)
    _bwd_dq_large = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                 for (bm, bn) in ((64, 64), (128, 32), (64, 32)) for w in (4, 8) for st in (2, 3)],
        key=_KEY, prune_configs_by={"early_config_prune": _prune_large})(_bla_bwd_dq_large)
    _bwd_dkdv_large = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                 for (bm, bn) in ((64, 64), (32, 128), (32, 64)) for w in (4, 8) for st in (2, 3)],
        key=_KEY, prune_configs_by={"early_config_prune": _prune_large})(_bla_bwd_dkdv_large)


def _interp_small_block_m(bs: int) -> int:
    return max(16, triton.next_power_of_2(bs))


_INTERP_TILE = 16


def _interp_large(bs: int) -> dict:
    # The interpreter (triton 3.6 with numpy >= 2.4) cannot run loops whose bounds are runtime
    # values (triton-lang/triton#9171: int() of a 1-element array), so under TRITON_INTERPRET=1
    # the large-block kernels loop a constexpr number of tiles (all tiles of a block; the ones
    # past the causal diagonal or the block end are fully masked no-ops). GPUs use the runtime
    # bounds (STATIC_ITERS=0), which skip those tiles.
    return {"BLOCK_M": _INTERP_TILE, "BLOCK_N": _INTERP_TILE,
            "STATIC_ITERS": triton.cdiv(bs, _INTERP_TILE), "num_warps": 4}


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
    return reasons


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs: "ieee" under the interpreter (exact fp32 products, matches the reference tightly);
    # on a GPU "tf32x3" (3 tensor-core TF32 products, about fp32 accuracy): plain "ieee" dots lower
    # to FMA loops that spill thousands of bytes and take minutes to compile for these tile sizes.
    # 16-bit inputs ignore the setting (tensor cores, fp32 accumulation).
    if dtype == torch.float32:
        return "ieee" if _INTERPRET else "tf32x3"
    return "tf32"


def _strides4(t: torch.Tensor):
    return tuple(t.stride())


def _kpm_args(key_padding_mask, device):
    if key_padding_mask is None:
        dummy = torch.zeros(1, dtype=torch.uint8, device=device)
        return dummy, (0, 0), False
    m = key_padding_mask
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    elif m.dtype != torch.uint8:
        m = (m != 0).view(torch.uint8)
    return m, tuple(m.stride()), True


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(max(D, 1)))


def forward(q, k, v, block_size: int, causal: bool, scale: float, key_padding_mask):
    B, T, H, D = q.shape
    out = empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse = empty((B, H, T), dtype=torch.float32, device=q.device)
    if B == 0 or T == 0 or H == 0:
        return out, lse
    bs = int(min(int(block_size), T))
    kpm, (smb, smt), has_kpm = _kpm_args(key_padding_mask, q.device)
    BLOCK_D = _block_d(D)
    qk_scale = float(scale) * _LOG2E
    args = (q, k, v, out, lse, kpm,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(out),
            smb, smt, T, H, D, bs, qk_scale)
    meta = dict(CAUSAL=bool(causal), HAS_KPM=has_kpm, DOT_PREC=_dot_prec(q.dtype), BLOCK_D=BLOCK_D,
                EVEN_D=(BLOCK_D == D))

    if bs <= _SMALL_MAX_FWD[q.element_size()]:
        def grid(META):
            return (triton.cdiv(T, (META["BLOCK_M"] // bs) * bs), H, B)
        if _INTERPRET:
            _fwd_small[grid](*args, **meta, BLOCK_M=_interp_small_block_m(bs), num_warps=4)
        else:
            _fwd_small[grid](*args, **meta)
    else:
        nb = triton.cdiv(T, bs)

        def grid(META):
            return (nb * triton.cdiv(bs, META["BLOCK_M"]), H, B)
        if _INTERPRET:
            _fwd_large[grid](*args, **meta, **_interp_large(bs))
        else:
            _fwd_large[grid](*args, **meta, STATIC_ITERS=0)
    return out, lse


def backward(dout, q, k, v, out, lse, block_size: int, causal: bool, scale: float, key_padding_mask):
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
    kpm, (smb, smt), has_kpm = _kpm_args(key_padding_mask, q.device)
    BLOCK_D = _block_d(D)
    qk_scale = float(scale) * _LOG2E
    meta = dict(CAUSAL=bool(causal), HAS_KPM=has_kpm, DOT_PREC=_dot_prec(q.dtype), BLOCK_D=BLOCK_D,
                EVEN_D=(BLOCK_D == D))
    sq, sk, sv, so, sdo, sg = (_strides4(q), _strides4(k), _strides4(v), _strides4(out),
                               _strides4(dout), _strides4(dq))

    if bs <= _SMALL_MAX_BWD[q.element_size()]:
        args = (q, k, v, out, dout, lse, dq, dk, dv, kpm,
                *sq, *sk, *sv, *so, *sdo, *sg, smb, smt, T, H, D, bs, qk_scale, float(scale))

        def grid(META):
            return (triton.cdiv(T, (META["BLOCK_M"] // bs) * bs), H, B)
        if _INTERPRET:
            _bwd_small[grid](*args, **meta, BLOCK_M=_interp_small_block_m(bs), num_warps=4)
        else:
            _bwd_small[grid](*args, **meta)
        return dq, dk, dv

    nb = triton.cdiv(T, bs)
    # delta = rowsum(dout * out), fp32 scratch written by the dq kernel for every row < T.
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    dq_args = (q, k, v, out, dout, lse, delta, dq, kpm,
               *sq, *sk, *sv, *so, *sdo, *sg, smb, smt, T, H, D, bs, qk_scale, float(scale))

    def grid_q(META):
        return (nb * triton.cdiv(bs, META["BLOCK_M"]), H, B)

    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, kpm,
                 *sq, *sk, *sv, *sdo, *sg, smb, smt, T, H, D, bs, qk_scale, float(scale))

    def grid_k(META):
        return (nb * triton.cdiv(bs, META["BLOCK_N"]), H, B)

    if _INTERPRET:
        _bwd_dq_large[grid_q](*dq_args, **meta, **_interp_large(bs))
        _bwd_dkdv_large[grid_k](*dkdv_args, **meta, **_interp_large(bs))
    else:
        _bwd_dq_large[grid_q](*dq_args, **meta, STATIC_ITERS=0)
        _bwd_dkdv_large[grid_k](*dkdv_args, **meta, STATIC_ITERS=0)
    return dq, dk, dv
