// block_local_attention: fp32-accumulating SIMT tiled kernels (NO tensor cores: written without a
// GPU to test on, the simple, obviously-correct form was chosen over mma.sync; see "Limits").
//
// Semantics (hilt_kernels/BACKENDS.md): q, k, v (B, T, H, D); query t attends to key s iff
// s / bs == t / bs, (s <= t if causal) and key s is not padding (kpm[b, s] != 0 = padding).
// out (B, T, H, D) contiguous; lse (B, H, T) fp32 contiguous, +inf for a query with no valid key
// (its output is exactly 0 and, in the backward, exp(score - lse) = 0 kills its contributions).
//
// How it works
// ------------
// * A CTA of 256 threads owns a TILE of up to R = 256 / G consecutive rows (tokens) of one (batch,
//   head); G threads ("a group", G in {4, 8}, aligned inside a warp) own one row, each holding DPT
//   interleaved dims (d = j + G * u) of the row's vectors in fp32 registers (D <= G * DPT <= 128).
//   Tiles pack WHOLE blocks when bs <= R ((R / bs) * bs rows, e.g. 8 blocks of 8), else they split
//   one block into ceil(bs / R) tiles, so a tile never straddles a partial block.
// * The "partner" rows of the tile (keys for forward / dq, queries for dk/dv) are the union of the
//   rows' block ranges (trimmed by causality). They are staged through shared memory in chunks of
//   kChunk = 32 rows converted to fp32 (padded dims zeroed); each group then loops ONLY over its own
//   row's partners inside the chunk (its block, causal bound), so packed small blocks cost no
//   wasted FLOPs. A dot product is a per-thread partial over DPT dims + a G-lane __shfl_xor
//   butterfly (bit-identical result in every lane of the group, so the groups' control flow stays
//   uniform). Shuffles use the group's own lane mask (groups of one warp may run different trip
//   counts), which is legal on sm_70+.
// * forward: online softmax per row (running max m, sum l, acc), one exp per key.
// * backward, two kernels, no atomics (every output element has exactly one writer):
//   1. dq kernel (rows = queries): delta = dout . out (stored to an fp32 scratch (B, H, T)),
//      p = exp(scale q.k - lse), dp = dout . v, ds = p (dp - delta), dq += ds k; dq *= scale.
//   2. dk/dv kernel (rows = keys, partners = the queries that see the key): reads q, dout, lse and
//      delta of the partner chunk; dv += p dout, dk += p (dout . v - delta) q; dk *= scale.
//      A padding key writes dk = dv = 0.
// * All loads go through the (B, T, H, D) element strides (non-contiguous inputs and stride-0
//   expanded gradients are read in place); the padding mask through its (B, T) strides (uint8).
//
// Limits: D <= 128 (configs D<=32: G4xDPT8, D<=64: G4xDPT16, D<=128: G8xDPT16); fp32/fp16/bf16 with
// fp32 accumulation; exp is expf (full precision). SIMT FMAs, not tensor cores: for bs >= 64 this
// is compute-bound well below the bandwidth roofline; a tensor-core (mma.sync) version is future work.
// Grid: one CTA per (tile, head, batch) flattened into gridDim.x (< 2^31 CTAs).
#pragma once

#include <math.h>

#include "../common/hilt_common.cuh"

namespace hilt {
namespace bla {

constexpr int kThreads = 256;
constexpr int kChunk = 32;

// Minimum resident CTAs per SM asked of the compiler for the backward kernels (__launch_bounds__):
// 1 by default (108-168 registers); 2 caps them at 128 registers (may spill). A/B:
// `python -m hilt_kernels.cuda.ab_launch_bounds` (benchmarks/gpu_suite.sh); the default changes
// only on a measured GPU gain.
#ifndef HILT_BLA_BWD_MIN_BLOCKS
#define HILT_BLA_BWD_MIN_BLOCKS 1
#endif

// Rows [start, end) of tile `tile` (R rows max; whole blocks when bs <= R). bs <= T is assumed.
__host__ __device__ inline void tile_rows(int64_t tile, int64_t T, int64_t bs, int R, int64_t& start, int64_t& end) {
  if (bs <= R) {
    int64_t rows = (R / bs) * bs;
    start = tile * rows;
    end = start + rows < T ? start + rows : T;
  } else {
    int64_t tpb = (bs + R - 1) / R;
    int64_t n = tile / tpb, j = tile % tpb;
    start = n * bs + j * R;
    int64_t e = start + R;
    if (e > n * bs + bs) e = n * bs + bs;
    end = e < T ? e : T;
  }
}

inline int64_t num_tiles(int64_t T, int64_t bs, int R) {
  if (bs <= R) return ceil_div(T, (R / bs) * bs);
  return ceil_div(T, bs) * ceil_div(bs, R);
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

template <int G> __device__ __forceinline__ float group_sum(float x, unsigned mask) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) x += __shfl_xor_sync(mask, x, off);
  return x;
}

template <int G> __device__ __forceinline__ unsigned group_mask() {
  unsigned lane = threadIdx.x & 31u;
  return ((1u << G) - 1u) << (lane & ~unsigned(G - 1));
}

// ------------------------------------------------------------------------------------------ forward
template <typename T, int G, int DPT>
__global__ void __launch_bounds__(kThreads, 1) bla_fwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const uint8_t* __restrict__ kpm,
    T* __restrict__ out, float* __restrict__ lse, int64_t Tn, int64_t H, int D, int64_t bs, int64_t tiles,
    Strides4 sq, Strides4 sk, Strides4 sv, Strides2 sm, float scale, int causal) {
  constexpr int DM = G * DPT;
  constexpr int LDS = DM + 4;  // padded row: rows read by different groups hit different banks
  __shared__ float ks[kChunk * LDS];
  __shared__ float vs[kChunk * LDS];
  __shared__ int kok[kChunk];

  const int64_t bid = blockIdx.x;
  const int64_t tile = bid % tiles;
  const int64_t h = (bid / tiles) % H;
  const int64_t b = bid / (tiles * H);
  int64_t start, end;
  tile_rows(tile, Tn, bs, kThreads / G, start, end);
  if (start >= end) return;  // uniform over the CTA

  const int tid = threadIdx.x, grp = tid / G, j = tid % G;
  const int64_t row = start + grp;
  const bool active = row < end;
  const unsigned gmask = group_mask<G>();

  float qf[DPT], acc[DPT];
#pragma unroll
  for (int u = 0; u < DPT; ++u) {
    const int d = j + G * u;
    qf[u] = (active && d < D) ? ld<T>(q + b * sq.s0 + row * sq.s1 + h * sq.s2 + d * sq.s3) : 0.f;
    acc[u] = 0.f;
  }
  float m = -INFINITY, l = 0.f;

  const int64_t pstart = (start / bs) * bs;
  const int64_t pend = causal ? end : imin(((end - 1) / bs) * bs + bs, Tn);
  const int64_t rs = (row / bs) * bs;
  const int64_t re = causal ? row + 1 : imin(rs + bs, Tn);

  for (int64_t c0 = pstart; c0 < pend; c0 += kChunk) {
    __syncthreads();
    for (int i = tid; i < kChunk * DM; i += kThreads) {
      const int r = i / DM, d = i % DM;
      const int64_t s = c0 + r;
      float kx = 0.f, vx = 0.f;
      if (s < pend && d < D) {
        kx = ld<T>(k + b * sk.s0 + s * sk.s1 + h * sk.s2 + d * sk.s3);
        vx = ld<T>(v + b * sv.s0 + s * sv.s1 + h * sv.s2 + d * sv.s3);
      }
      ks[r * LDS + d] = kx;
      vs[r * LDS + d] = vx;
    }
    if (tid < kChunk) {
      const int64_t s = c0 + tid;
      kok[tid] = (s < pend) && (kpm == nullptr || kpm[b * sm.s0 + s * sm.s1] == 0);
    }
    __syncthreads();
    if (active) {
      const int64_t lo = imax(c0, rs), hi = imin(c0 + kChunk, re);
      for (int64_t s = lo; s < hi; ++s) {
        const int i = (int)(s - c0);
        if (!kok[i]) continue;  // same s for the whole group: uniform
        const float* kr = ks + i * LDS;
        const float* vr = vs + i * LDS;
        float part = 0.f;
#pragma unroll
        for (int u = 0; u < DPT; ++u) part += qf[u] * kr[j + G * u];
        const float sc = group_sum<G>(part, gmask) * scale;
        if (sc > m) {
          const float c = expf(m - sc);  // m = -inf on the first key: c = 0
          l = l * c + 1.f;
#pragma unroll
          for (int u = 0; u < DPT; ++u) acc[u] = acc[u] * c + vr[j + G * u];
          m = sc;
        } else {
          const float p = expf(sc - m);
          l += p;
#pragma unroll
          for (int u = 0; u < DPT; ++u) acc[u] += p * vr[j + G * u];
        }
      }
    }
  }

  if (active) {
    const bool has = l > 0.f;
    const float inv = has ? 1.f / l : 0.f;
    T* orow = out + ((b * Tn + row) * H + h) * (int64_t)D;
#pragma unroll
    for (int u = 0; u < DPT; ++u) {
      const int d = j + G * u;
      if (d < D) st<T>(orow + d, acc[u] * inv);
    }
    if (j == 0) lse[(b * H + h) * Tn + row] = has ? m + logf(l) : INFINITY;
  }
}

// ------------------------------------------------------------------------------ backward: dq, delta
template <typename T, int G, int DPT>
__global__ void __launch_bounds__(kThreads, HILT_BLA_BWD_MIN_BLOCKS) bla_bwd_dq_kernel(
    const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ out, const float* __restrict__ lse, const uint8_t* __restrict__ kpm, T* __restrict__ dq,
    float* __restrict__ delta, int64_t Tn, int64_t H, int D, int64_t bs, int64_t tiles, Strides4 sdo, Strides4 sq,
    Strides4 sk, Strides4 sv, Strides4 so, Strides2 sm, float scale, int causal) {
  constexpr int DM = G * DPT;
  constexpr int LDS = DM + 4;
  __shared__ float ks[kChunk * LDS];
  __shared__ float vs[kChunk * LDS];
  __shared__ int kok[kChunk];

  const int64_t bid = blockIdx.x;
  const int64_t tile = bid % tiles;
  const int64_t h = (bid / tiles) % H;
  const int64_t b = bid / (tiles * H);
  int64_t start, end;
  tile_rows(tile, Tn, bs, kThreads / G, start, end);
  if (start >= end) return;

  const int tid = threadIdx.x, grp = tid / G, j = tid % G;
  const int64_t row = start + grp;
  const bool active = row < end;
  const unsigned gmask = group_mask<G>();

  float qf[DPT], gf[DPT], dqa[DPT];
  float dpart = 0.f;
#pragma unroll
  for (int u = 0; u < DPT; ++u) {
    const int d = j + G * u;
    const bool ok = active && d < D;
    qf[u] = ok ? ld<T>(q + b * sq.s0 + row * sq.s1 + h * sq.s2 + d * sq.s3) : 0.f;
    gf[u] = ok ? ld<T>(dout + b * sdo.s0 + row * sdo.s1 + h * sdo.s2 + d * sdo.s3) : 0.f;
    const float o = ok ? ld<T>(out + b * so.s0 + row * so.s1 + h * so.s2 + d * so.s3) : 0.f;
    dpart += gf[u] * o;
    dqa[u] = 0.f;
  }
  float dl = 0.f, lr = INFINITY;
  if (active) {
    dl = group_sum<G>(dpart, gmask);
    lr = lse[(b * H + h) * Tn + row];
    if (j == 0) delta[(b * H + h) * Tn + row] = dl;
  }

  const int64_t pstart = (start / bs) * bs;
  const int64_t pend = causal ? end : imin(((end - 1) / bs) * bs + bs, Tn);
  const int64_t rs = (row / bs) * bs;
  const int64_t re = causal ? row + 1 : imin(rs + bs, Tn);
  const bool has_key = active && lr != INFINITY;  // no valid key: p = 0 everywhere, dq = 0

  for (int64_t c0 = pstart; c0 < pend; c0 += kChunk) {
    __syncthreads();
    for (int i = tid; i < kChunk * DM; i += kThreads) {
      const int r = i / DM, d = i % DM;
      const int64_t s = c0 + r;
      float kx = 0.f, vx = 0.f;
      if (s < pend && d < D) {
        kx = ld<T>(k + b * sk.s0 + s * sk.s1 + h * sk.s2 + d * sk.s3);
        vx = ld<T>(v + b * sv.s0 + s * sv.s1 + h * sv.s2 + d * sv.s3);
      }
      ks[r * LDS + d] = kx;
      vs[r * LDS + d] = vx;
    }
    if (tid < kChunk) {
      const int64_t s = c0 + tid;
      kok[tid] = (s < pend) && (kpm == nullptr || kpm[b * sm.s0 + s * sm.s1] == 0);
    }
    __syncthreads();
    if (has_key) {
      const int64_t lo = imax(c0, rs), hi = imin(c0 + kChunk, re);
      for (int64_t s = lo; s < hi; ++s) {
        const int i = (int)(s - c0);
        if (!kok[i]) continue;
        const float* kr = ks + i * LDS;
        const float* vr = vs + i * LDS;
        float sp = 0.f, gp = 0.f;
#pragma unroll
        for (int u = 0; u < DPT; ++u) {
          sp += qf[u] * kr[j + G * u];
          gp += gf[u] * vr[j + G * u];
        }
        sp = group_sum<G>(sp, gmask);
        gp = group_sum<G>(gp, gmask);
        const float p = expf(sp * scale - lr);
        const float ds = p * (gp - dl);
#pragma unroll
        for (int u = 0; u < DPT; ++u) dqa[u] += ds * kr[j + G * u];
      }
    }
  }

  if (active) {
    T* drow = dq + ((b * Tn + row) * H + h) * (int64_t)D;
#pragma unroll
    for (int u = 0; u < DPT; ++u) {
      const int d = j + G * u;
      if (d < D) st<T>(drow + d, dqa[u] * scale);
    }
  }
}

// ------------------------------------------------------------------------------- backward: dk, dv
template <typename T, int G, int DPT>
__global__ void __launch_bounds__(kThreads, HILT_BLA_BWD_MIN_BLOCKS) bla_bwd_dkdv_kernel(
    const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const float* __restrict__ lse, const float* __restrict__ delta, const uint8_t* __restrict__ kpm,
    T* __restrict__ dk, T* __restrict__ dv, int64_t Tn, int64_t H, int D, int64_t bs, int64_t tiles, Strides4 sdo,
    Strides4 sq, Strides4 sk, Strides4 sv, Strides2 sm, float scale, int causal) {
  constexpr int DM = G * DPT;
  constexpr int LDS = DM + 4;
  __shared__ float qs[kChunk * LDS];
  __shared__ float gs[kChunk * LDS];
  __shared__ float ls[kChunk];
  __shared__ float dls[kChunk];

  const int64_t bid = blockIdx.x;
  const int64_t tile = bid % tiles;
  const int64_t h = (bid / tiles) % H;
  const int64_t b = bid / (tiles * H);
  int64_t start, end;
  tile_rows(tile, Tn, bs, kThreads / G, start, end);
  if (start >= end) return;

  const int tid = threadIdx.x, grp = tid / G, j = tid % G;
  const int64_t row = start + grp;  // this group's KEY
  const bool active = row < end;
  const bool key_ok = active && (kpm == nullptr || kpm[b * sm.s0 + row * sm.s1] == 0);
  const unsigned gmask = group_mask<G>();

  float kf[DPT], vf[DPT], dka[DPT], dva[DPT];
#pragma unroll
  for (int u = 0; u < DPT; ++u) {
    const int d = j + G * u;
    const bool ok = key_ok && d < D;
    kf[u] = ok ? ld<T>(k + b * sk.s0 + row * sk.s1 + h * sk.s2 + d * sk.s3) : 0.f;
    vf[u] = ok ? ld<T>(v + b * sv.s0 + row * sv.s1 + h * sv.s2 + d * sv.s3) : 0.f;
    dka[u] = 0.f;
    dva[u] = 0.f;
  }

  const int64_t bstart = (start / bs) * bs;
  const int64_t pstart = causal ? start : bstart;
  const int64_t pend = imin(((end - 1) / bs) * bs + bs, Tn);
  const int64_t rb = (row / bs) * bs;
  const int64_t rs = causal ? row : rb;
  const int64_t re = imin(rb + bs, Tn);

  for (int64_t c0 = pstart; c0 < pend; c0 += kChunk) {
    __syncthreads();
    for (int i = tid; i < kChunk * DM; i += kThreads) {
      const int r = i / DM, d = i % DM;
      const int64_t t = c0 + r;
      float qx = 0.f, gx = 0.f;
      if (t < pend && d < D) {
        qx = ld<T>(q + b * sq.s0 + t * sq.s1 + h * sq.s2 + d * sq.s3);
        gx = ld<T>(dout + b * sdo.s0 + t * sdo.s1 + h * sdo.s2 + d * sdo.s3);
      }
      qs[r * LDS + d] = qx;
      gs[r * LDS + d] = gx;
    }
    if (tid < kChunk) {
      const int64_t t = c0 + tid;
      const bool in = t < pend;
      ls[tid] = in ? lse[(b * H + h) * Tn + t] : INFINITY;
      dls[tid] = in ? delta[(b * H + h) * Tn + t] : 0.f;
    }
    __syncthreads();
    if (key_ok) {
      const int64_t lo = imax(c0, rs), hi = imin(c0 + kChunk, re);
      for (int64_t t = lo; t < hi; ++t) {
        const int i = (int)(t - c0);
        const float lt = ls[i];
        if (lt == INFINITY) continue;  // that query has no valid key: p = 0
        const float* qr = qs + i * LDS;
        const float* gr = gs + i * LDS;
        float sp = 0.f, gp = 0.f;
#pragma unroll
        for (int u = 0; u < DPT; ++u) {
          sp += kf[u] * qr[j + G * u];
          gp += vf[u] * gr[j + G * u];
        }
        sp = group_sum<G>(sp, gmask);
        gp = group_sum<G>(gp, gmask);
        const float p = expf(sp * scale - lt);
        const float ds = p * (gp - dls[i]);
#pragma unroll
        for (int u = 0; u < DPT; ++u) {
          dva[u] += p * gr[j + G * u];
          dka[u] += ds * qr[j + G * u];
        }
      }
    }
  }

  if (active) {
    const int64_t o = ((b * Tn + row) * H + h) * (int64_t)D;
#pragma unroll
    for (int u = 0; u < DPT; ++u) {
      const int d = j + G * u;
      if (d < D) {
        st<T>(dk + o + d, dka[u] * scale);
        st<T>(dv + o + d, dva[u]);
      }
    }
  }
}

}  // namespace bla
}  // namespace hilt
