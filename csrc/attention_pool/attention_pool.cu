// attention_pool: per (batch, block n, head) softmax of the block's scores weighting its values.
//
// scores (B, T, H) (own dtype tag, read with a runtime-dtype load: it is D times smaller than the
// values); values (B, T, H, D), or shared (B, T, D) passed as (B, T, H, D) with head stride 0;
// kpm (B, T) uint8 or NULL. All read through element strides. Outputs contiguous.
//
// Forward (one warp per (b, n, h), 8 warps per CTA):
//   1. lanes stride over the block's tokens: max and sum of exp over the valid (non-padding)
//      scores, butterfly-reduced (every lane ends with the identical values). A fully padded block
//      writes zeros.
//   2. the warp is split into TG = 32 / LPR token groups of LPR lanes; a lane owns chunks of
//      VEC = 16 / sizeof(T) consecutive dims (ci = dl + LPR * kk, kk < 2, so D <= 64 * VEC) and
//      accumulates w_t v_t over the tokens t = tg, tg + TG, ... of the block. Values are loaded 16
//      bytes at a time when `vec_ok` (the host checked: d-stride 1 and base + every other stride
//      16-byte aligned), else element by element through the strides. The token groups' partial
//      sums are combined by a shuffle butterfly over the high lane bits; token group 0 stores
//      (16-byte stores when the output rows are aligned).
// Backward (one warp per (b, n, h) for per-head values; per (b, n) looping over all heads for
//   shared values, since dvalues_t = sum_h w_t,h dout_h then has a single writer):
//   per head: max / sum (as above) and gout_h = dout_h . out_h, kept in shared memory per warp;
//   per token t (token-group split): w = softmax weight (0 for padding / fully padded blocks),
//   dot = dout_h . v_t (LPR-lane butterfly), dscores_t,h = w (dot - gout_h), dvalues_t += w dout_h.
//   No atomics: deterministic. dout/out are read element-wise through their strides (dout may be
//   an expanded stride-0 gradient).
// Limits: D <= 64 * VEC (fp32: 256, 16-bit: 512); shared values: the backward keeps 3 floats per
//   head per warp in dynamic shared memory (96 H bytes per CTA); above 48 KiB (H > 512) it opts in
//   with cudaFuncSetAttribute, up to the device's limit (sm_80: 163 KiB, H <= 1738; sm_90: 227 KiB,
//   H <= 2421; hilt_kernels/cuda/attention_pool.py allows H <= 1700). B * nb * H warps < 2^31 * 8.
#include <math.h>

#include "../common/hilt_common.cuh"

using namespace hilt;

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kCH = 2;  // dim chunks per lane
// Minimum resident CTAs per SM for the backward kernel (__launch_bounds__): 1 by default (~180
// registers); a variant behind this flag (see bla_kernels.cuh, HILT_BLA_BWD_MIN_BLOCKS).
#ifndef HILT_APOOL_BWD_MIN_BLOCKS
#define HILT_APOOL_BWD_MIN_BLOCKS 1
#endif
constexpr size_t kDefaultSmem = 48 * 1024;  // dynamic shared memory without the opt-in attribute

__device__ __forceinline__ float wmax(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
__device__ __forceinline__ float wsum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

struct Geo {
  int64_t B, T, H, D, bs, nb;
  int LPR, TG, nch;  // lanes per token group, token groups, 16-byte chunks per row
};

struct PoolIn {
  const void* scores;
  int sdtype;
  Strides3 ss;
  const uint8_t* kpm;
  Strides2 sm;
};

__device__ __forceinline__ bool valid_tok(const PoolIn& in, int64_t b, int64_t t) {
  return in.kpm == nullptr || in.kpm[b * in.sm.s0 + t * in.sm.s1] == 0;
}
__device__ __forceinline__ float score(const PoolIn& in, int64_t b, int64_t t, int64_t h) {
  return ld_any(in.scores, in.sdtype, b * in.ss.s0 + t * in.ss.s1 + h * in.ss.s2);
}

// Max and sum of exp(s - max) over the valid tokens [t0, t0 + len) of head h (identical in all lanes).
__device__ __forceinline__ void block_stats(const PoolIn& in, int64_t b, int64_t h, int64_t t0, int64_t len,
                                            float& m, float& l) {
  const int lane = threadIdx.x & 31;
  m = -INFINITY;
  for (int64_t i = lane; i < len; i += 32)
    if (valid_tok(in, b, t0 + i)) m = fmaxf(m, score(in, b, t0 + i, h));
  m = wmax(m);
  l = 0.f;
  if (m != -INFINITY) {
    for (int64_t i = lane; i < len; i += 32)
      if (valid_tok(in, b, t0 + i)) l += expf(score(in, b, t0 + i, h) - m);
  }
  l = wsum(l);
}

// Load chunk `ci` (VEC dims starting at ci * VEC) of a row; out-of-range dims read as 0.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* row, int64_t sd, int64_t D, int ci, bool vec_ok, float* x) {
  constexpr int V = Vec<T>::N;
  const int64_t d0 = (int64_t)ci * V;
  if (vec_ok && d0 + V <= D) {
    ld16<T>(row + d0, x);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] = (d0 + e < D) ? ld<T>(row + (d0 + e) * sd) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* row, int64_t D, int ci, bool vec_ok, const float* x) {
  constexpr int V = Vec<T>::N;
  const int64_t d0 = (int64_t)ci * V;
  if (vec_ok && d0 + V <= D) {
    st16<T>(row + d0, x);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (d0 + e < D) st<T>(row + d0 + e, x[e]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) apool_fwd_kernel(PoolIn in, const T* __restrict__ values, Strides4 sv,
                                                              T* __restrict__ out, Geo g, int vin_vec, int vout_vec) {
  constexpr int V = Vec<T>::N;
  const int64_t w = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  if (w >= g.B * g.nb * g.H) return;  // whole warp
  const int lane = threadIdx.x & 31;
  const int64_t h = w % g.H, n = (w / g.H) % g.nb, b = w / (g.H * g.nb);
  const int64_t t0 = n * g.bs;
  const int64_t len = (g.T - t0) < g.bs ? (g.T - t0) : g.bs;
  T* orow = out + ((b * g.nb + n) * g.H + h) * g.D;

  float m, l;
  block_stats(in, b, h, t0, len, m, l);
  const int tg = lane / g.LPR, dl = lane % g.LPR;
  float acc[kCH][V];
#pragma unroll
  for (int kk = 0; kk < kCH; ++kk)
#pragma unroll
    for (int e = 0; e < V; ++e) acc[kk][e] = 0.f;

  if (m != -INFINITY) {
    const float inv = 1.f / l;
    for (int64_t i = tg; i < len; i += g.TG) {
      const int64_t t = t0 + i;
      if (!valid_tok(in, b, t)) continue;
      const float wt = expf(score(in, b, t, h) - m) * inv;
      const T* vrow = values + b * sv.s0 + t * sv.s1 + h * sv.s2;
#pragma unroll
      for (int kk = 0; kk < kCH; ++kk) {
        const int ci = dl + g.LPR * kk;
        if (ci < g.nch) {
          float x[V];
          load_chunk<T>(vrow, sv.s3, g.D, ci, vin_vec, x);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[kk][e] += wt * x[e];
        }
      }
    }
  }
  // combine the token groups (lanes with the same dl): butterfly over the high lane bits
  for (int o = g.LPR; o < 32; o <<= 1) {
#pragma unroll
    for (int kk = 0; kk < kCH; ++kk)
#pragma unroll
      for (int e = 0; e < V; ++e) acc[kk][e] += __shfl_xor_sync(0xffffffffu, acc[kk][e], o);
  }
  if (tg == 0) {
#pragma unroll
    for (int kk = 0; kk < kCH; ++kk) {
      const int ci = dl + g.LPR * kk;
      if (ci < g.nch) store_chunk<T>(orow, g.D, ci, vout_vec, acc[kk]);
    }
  }
}

// One warp per (b, n, head range [h0, h0 + hc)): hc = 1 (per-head values) or H (shared values).
template <typename T>
__global__ void __launch_bounds__(kThreads, HILT_APOOL_BWD_MIN_BLOCKS) apool_bwd_kernel(PoolIn in, const T* __restrict__ values, Strides4 sv,
                                                              const T* __restrict__ dout, Strides4 sdo,
                                                              const T* __restrict__ out, Strides4 so,
                                                              void* __restrict__ dscores, T* __restrict__ dvalues,
                                                              Geo g, int shared_values, int vin_vec) {
  constexpr int V = Vec<T>::N;
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t hc = shared_values ? g.H : 1;
  float* sm_m = smem + warp * 3 * hc;
  float* sm_inv = sm_m + hc;
  float* sm_go = sm_inv + hc;

  const int64_t w = (int64_t)blockIdx.x * kWarps + warp;
  const int64_t nh = shared_values ? 1 : g.H;
  if (w >= g.B * g.nb * nh) return;
  const int64_t h0 = w % nh, n = (w / nh) % g.nb, b = w / (nh * g.nb);
  const int64_t t0 = n * g.bs;
  const int64_t len = (g.T - t0) < g.bs ? (g.T - t0) : g.bs;

  for (int64_t hh = 0; hh < hc; ++hh) {
    const int64_t h = h0 + hh;
    float m, l;
    block_stats(in, b, h, t0, len, m, l);
    float go = 0.f;
    const T* grow = dout + b * sdo.s0 + n * sdo.s1 + h * sdo.s2;
    const T* orow = out + b * so.s0 + n * so.s1 + h * so.s2;
    for (int64_t d = lane; d < g.D; d += 32) go += ld<T>(grow + d * sdo.s3) * ld<T>(orow + d * so.s3);
    go = wsum(go);
    if (lane == 0) {
      sm_m[hh] = m;
      sm_inv[hh] = (m == -INFINITY) ? 0.f : 1.f / l;
      sm_go[hh] = go;
    }
  }
  __syncwarp();

  const int tg = lane / g.LPR, dl = lane % g.LPR;
  const int64_t vh = shared_values ? 0 : h0;  // head index of the values row
  for (int64_t i0 = 0; i0 < len; i0 += g.TG) {  // same trip count in every lane
    const int64_t i = i0 + tg;
    const bool act = i < len;
    const int64_t t = t0 + i;
    const bool ok = act && valid_tok(in, b, t);
    float xv[kCH][V], dva[kCH][V];
    const T* vrow = values + b * sv.s0 + t * sv.s1 + vh * sv.s2;
#pragma unroll
    for (int kk = 0; kk < kCH; ++kk) {
      const int ci = dl + g.LPR * kk;
      if (act && ci < g.nch) {
        load_chunk<T>(vrow, sv.s3, g.D, ci, vin_vec, xv[kk]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) xv[kk][e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < V; ++e) dva[kk][e] = 0.f;
    }
    for (int64_t hh = 0; hh < hc; ++hh) {
      const int64_t h = h0 + hh;
      const float mh = sm_m[hh];
      const float wt = (ok && mh != -INFINITY) ? expf(score(in, b, t, h) - mh) * sm_inv[hh] : 0.f;
      const T* grow = dout + b * sdo.s0 + n * sdo.s1 + h * sdo.s2;
      float gd[kCH][V];
      float part = 0.f;
#pragma unroll
      for (int kk = 0; kk < kCH; ++kk) {
        const int ci = dl + g.LPR * kk;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const int64_t d = (int64_t)ci * V + e;
          gd[kk][e] = (act && ci < g.nch && d < g.D) ? ld<T>(grow + d * sdo.s3) : 0.f;
          part += gd[kk][e] * xv[kk][e];
        }
      }
      for (int o = 1; o < g.LPR; o <<= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
      if (act && dl == 0) st_any(dscores, in.sdtype, (b * g.T + t) * g.H + h, wt * (part - sm_go[hh]));
#pragma unroll
      for (int kk = 0; kk < kCH; ++kk)
#pragma unroll
        for (int e = 0; e < V; ++e) dva[kk][e] += wt * gd[kk][e];
    }
    if (act) {
      T* drow = shared_values ? dvalues + (b * g.T + t) * g.D : dvalues + ((b * g.T + t) * g.H + h0) * g.D;
#pragma unroll
      for (int kk = 0; kk < kCH; ++kk) {
        const int ci = dl + g.LPR * kk;
        if (ci < g.nch) store_chunk<T>(drow, g.D, ci, false, dva[kk]);
      }
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T> Geo make_geo(int64_t B, int64_t T_, int64_t H, int64_t D, int64_t bs) {
  Geo g;
  g.B = B;
  g.T = T_;
  g.H = H;
  g.D = D;
  g.bs = bs;
  g.nb = ceil_div(T_, bs);
  g.nch = (int)ceil_div(D, Vec<T>::N);
  g.LPR = next_pow2(g.nch < 1 ? 1 : (g.nch > 32 ? 32 : g.nch));
  g.TG = 32 / g.LPR;
  return g;
}

// Values rows can be read 16 bytes at a time: unit d-stride, base and all other strides aligned.
template <typename T> bool vec_ok(const void* p, Strides4 s, int64_t D) {
  constexpr int V = Vec<T>::N;
  return aligned16(p) && (s.s3 == 1 || D <= 1) && s.s0 % V == 0 && s.s1 % V == 0 && s.s2 % V == 0;
}

template <typename T>
int run_fwd(const PoolIn& in, const void* values, Strides4 sv, void* out, int64_t B, int64_t T_, int64_t H, int64_t D,
            int64_t bs, cudaStream_t s) {
  Geo g = make_geo<T>(B, T_, H, D, bs);
  if (g.nch > 32 * kCH)
    return hilt_fail(HILT_ERR_UNSUPPORTED, "hilt_apool_forward: D=%lld too large (max %d for this dtype)", (long long)D,
                     32 * kCH * Vec<T>::N);
  const int64_t grid = ceil_div(B * g.nb * H, kWarps);
  if (grid > kMaxGridX) return hilt_fail(HILT_ERR_UNSUPPORTED, "hilt_apool_forward: too many blocks");
  const int vin = vec_ok<T>(values, sv, D);
  const int vout = aligned16(out) && D % Vec<T>::N == 0;
  apool_fwd_kernel<T><<<(unsigned)grid, kThreads, 0, s>>>(in, static_cast<const T*>(values), sv, static_cast<T*>(out),
                                                          g, vin, vout);
  return hilt_check_launch("hilt_apool_forward");
}

template <typename T>
int run_bwd(const PoolIn& in, const void* values, Strides4 sv, const void* dout, Strides4 sdo, const void* out,
            Strides4 so, void* dscores, void* dvalues, int64_t B, int64_t T_, int64_t H, int64_t D, int64_t bs,
            int shared_values, cudaStream_t s) {
  Geo g = make_geo<T>(B, T_, H, D, bs);
  if (g.nch > 32 * kCH)
    return hilt_fail(HILT_ERR_UNSUPPORTED, "hilt_apool_backward: D=%lld too large (max %d for this dtype)",
                     (long long)D, 32 * kCH * Vec<T>::N);
  const int64_t warps = B * g.nb * (shared_values ? 1 : H);
  const int64_t grid = ceil_div(warps, kWarps);
  if (grid > kMaxGridX) return hilt_fail(HILT_ERR_UNSUPPORTED, "hilt_apool_backward: too many blocks");
  const size_t smem = (size_t)kWarps * 3 * (shared_values ? H : 1) * sizeof(float);
  if (smem > kDefaultSmem) {  // shared values, H > 512: opt in to more dynamic shared memory
    int dev = 0, optin = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e != cudaSuccess)
      return hilt_fail(HILT_ERR_CUDA, "hilt_apool_backward: cannot query the shared memory limit: %s",
                       cudaGetErrorString(e));
    if (smem > (size_t)optin)
      return hilt_fail(HILT_ERR_UNSUPPORTED,
                       "hilt_apool_backward: shared values with H=%lld need %zu bytes of shared memory > %d on this "
                       "device (H <= %d)",
                       (long long)H, smem, optin, optin / (kWarps * 3 * (int)sizeof(float)));
    e = cudaFuncSetAttribute(apool_bwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess)
      return hilt_fail(HILT_ERR_CUDA, "hilt_apool_backward: cudaFuncSetAttribute(%zu bytes) failed: %s", smem,
                       cudaGetErrorString(e));
  }
  const int vin = vec_ok<T>(values, sv, D);
  apool_bwd_kernel<T><<<(unsigned)grid, kThreads, smem, s>>>(
      in, static_cast<const T*>(values), sv, static_cast<const T*>(dout), sdo, static_cast<const T*>(out), so, dscores,
      static_cast<T*>(dvalues), g, shared_values, vin);
  return hilt_check_launch("hilt_apool_backward");
}

}  // namespace

// scores: (B, T, H) of scores_dtype through scores_strides[3]; values: (B, T, H, D) of values_dtype
// through values_strides[4] (shared (B, T, D) values: head stride 0); kpm: (B, T) uint8 or NULL;
// out: contiguous (B, ceil(T / block_size), H, D) of values_dtype.
HILT_API int hilt_apool_forward(const void* scores, const void* values, const void* kpm, void* out, int64_t B,
                                int64_t T, int64_t H, int64_t D, int64_t block_size, const int64_t* scores_strides,
                                const int64_t* values_strides, const int64_t* kpm_strides, int scores_dtype,
                                int values_dtype, int device, void* stream) {
  if (B < 0 || T < 0 || H < 0 || D < 0) return hilt_fail(HILT_ERR_ARG, "hilt_apool_forward: negative size");
  if (block_size < 1) return hilt_fail(HILT_ERR_ARG, "hilt_apool_forward: block_size must be >= 1");
  if (scores_dtype < 0 || scores_dtype > 2 || values_dtype < 0 || values_dtype > 2)
    return hilt_fail(HILT_ERR_ARG, "hilt_apool_forward: bad dtype tag");
  if (!scores_strides || !values_strides || (kpm && !kpm_strides))
    return hilt_fail(HILT_ERR_ARG, "hilt_apool_forward: null strides");
  if (B == 0 || T == 0 || H == 0 || D == 0) return HILT_OK;
  if (!scores || !values || !out) return hilt_fail(HILT_ERR_ARG, "hilt_apool_forward: null data pointer");
  hilt::DeviceGuard guard(device, "hilt_apool_forward");
  if (guard.rc) return guard.rc;
  const int64_t bs = block_size < T ? block_size : T;
  PoolIn in{scores, scores_dtype, strides3(scores_strides), static_cast<const uint8_t*>(kpm),
            strides2(kpm ? kpm_strides : nullptr)};
  Strides4 sv = strides4(values_strides);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (values_dtype) {
    case HILT_F32: return run_fwd<float>(in, values, sv, out, B, T, H, D, bs, s);
    case HILT_F16: return run_fwd<__half>(in, values, sv, out, B, T, H, D, bs, s);
    default: return run_fwd<__nv_bfloat16>(in, values, sv, out, B, T, H, D, bs, s);
  }
}

// dout, out: (B, nb, H, D) of values_dtype through strides[4]; dscores: contiguous (B, T, H) of
// scores_dtype; dvalues: contiguous (B, T, H, D), or (B, T, D) when shared_values (values_strides
// then has head stride 0).
HILT_API int hilt_apool_backward(const void* dout, const void* scores, const void* values, const void* out,
                                 const void* kpm, void* dscores, void* dvalues, int64_t B, int64_t T, int64_t H,
                                 int64_t D, int64_t block_size, const int64_t* dout_strides,
                                 const int64_t* scores_strides, const int64_t* values_strides,
                                 const int64_t* out_strides, const int64_t* kpm_strides, int shared_values,
                                 int scores_dtype, int values_dtype, int device, void* stream) {
  if (B < 0 || T < 0 || H < 0 || D < 0) return hilt_fail(HILT_ERR_ARG, "hilt_apool_backward: negative size");
  if (block_size < 1) return hilt_fail(HILT_ERR_ARG, "hilt_apool_backward: block_size must be >= 1");
  if (scores_dtype < 0 || scores_dtype > 2 || values_dtype < 0 || values_dtype > 2)
    return hilt_fail(HILT_ERR_ARG, "hilt_apool_backward: bad dtype tag");
  if (!dout_strides || !scores_strides || !values_strides || !out_strides || (kpm && !kpm_strides))
    return hilt_fail(HILT_ERR_ARG, "hilt_apool_backward: null strides");
  if (B == 0 || T == 0 || H == 0) return HILT_OK;
  if (D == 0)
    return hilt_fail(HILT_ERR_UNSUPPORTED, "hilt_apool_backward: D = 0 (the caller returns zeros without a launch)");
  if (!dout || !scores || !values || !out || !dscores || !dvalues)
    return hilt_fail(HILT_ERR_ARG, "hilt_apool_backward: null data pointer");
  hilt::DeviceGuard guard(device, "hilt_apool_backward");
  if (guard.rc) return guard.rc;
  const int64_t bs = block_size < T ? block_size : T;
  PoolIn in{scores, scores_dtype, strides3(scores_strides), static_cast<const uint8_t*>(kpm),
            strides2(kpm ? kpm_strides : nullptr)};
  Strides4 sv = strides4(values_strides), sdo = strides4(dout_strides), so = strides4(out_strides);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int sh = shared_values ? 1 : 0;
  switch (values_dtype) {
    case HILT_F32: return run_bwd<float>(in, values, sv, dout, sdo, out, so, dscores, dvalues, B, T, H, D, bs, sh, s);
    case HILT_F16: return run_bwd<__half>(in, values, sv, dout, sdo, out, so, dscores, dvalues, B, T, H, D, bs, sh, s);
    default:
      return run_bwd<__nv_bfloat16>(in, values, sv, dout, sdo, out, so, dscores, dvalues, B, T, H, D, bs, sh, s);
  }
}
