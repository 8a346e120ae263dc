// window2_attention: attention over a window of 2 (previous layer, current layer) per (b, t, h).
//
// q, k, v, dout: (B, 2, T, H, D) read through their 5 element strides (typically strided views of a
// larger projection; dout may have stride-0 dims); outputs contiguous (B, 2, T, H, D).
// A group of G lanes (G = 4, 8, 16 or 32 by D; aligned inside a warp) owns one (b, t, h) row; lane j
// handles dims d = j, j + G, ... (any D, no register arrays):
// * forward: pass 1: the dot products q1.k0, q1.k1 (and q0.k0, q0.k1 when not causal), reduced with
//   a G-lane shuffle butterfly; p_i0 = sigmoid(scale (q_i.k0 - q_i.k1)) (p00 = 1 when causal);
//   pass 2: out_i = v1 + p_i0 (v0 - v1) (the reference's exact formula).
// * backward: pass 1: the q.k dots and dout_i . (v0 - v1); ds_i = p_i0 p_i1 (dout_i . (v0 - v1)) scale;
//   pass 2: dq_i = ds_i (k0 - k1), dk0 = ds0 q0 + ds1 q1 = -dk1, dv0 = p00 g0 + p10 g1,
//   dv1 = p01 g0 + p11 g1. Pass 2 re-reads q, k, v, dout (L1/L2 hits).
// fp32 accumulation; fp32/fp16/bf16. Every lane of a warp runs the same trip counts (rows past the
// end just load nothing), so full-group shuffles are always convergent. Limits: B*T*H*G/256 < 2^31 CTAs.
#include <math.h>

#include "../common/hilt_common.cuh"

using namespace hilt;

namespace {

constexpr int kThreads = 256;

template <int G> __device__ __forceinline__ float gsum(float x) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

struct Row {
  int64_t b, t, h;
};

__device__ __forceinline__ Row row_of(int64_t n, int64_t T, int64_t H) {
  Row r;
  r.h = n % H;
  r.t = (n / H) % T;
  r.b = n / (H * T);
  return r;
}

__device__ __forceinline__ int64_t off(const Strides5& s, const Row& r, int i) {
  return r.b * s.s0 + i * s.s1 + r.t * s.s2 + r.h * s.s3;
}

template <typename T, int G>
__global__ void __launch_bounds__(kThreads) w2a_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                            const T* __restrict__ v, T* __restrict__ out, int64_t N,
                                                            int64_t T_, int64_t H, int64_t D, Strides5 sq, Strides5 sk,
                                                            Strides5 sv, float scale, int causal) {
  const int64_t n = (int64_t)blockIdx.x * (kThreads / G) + threadIdx.x / G;
  const int j = threadIdx.x % G;
  const bool active = n < N;
  const Row r = row_of(active ? n : 0, T_, H);
  const T *q0 = q + off(sq, r, 0), *q1 = q + off(sq, r, 1);
  const T *k0 = k + off(sk, r, 0), *k1 = k + off(sk, r, 1);
  float a10 = 0.f, a11 = 0.f, a00 = 0.f, a01 = 0.f;
  if (active) {
    for (int64_t d = j; d < D; d += G) {
      const float x1 = ld<T>(q1 + d * sq.s4), y0 = ld<T>(k0 + d * sk.s4), y1 = ld<T>(k1 + d * sk.s4);
      a10 += x1 * y0;
      a11 += x1 * y1;
      if (!causal) {
        const float x0 = ld<T>(q0 + d * sq.s4);
        a00 += x0 * y0;
        a01 += x0 * y1;
      }
    }
  }
  a10 = gsum<G>(a10);
  a11 = gsum<G>(a11);
  a00 = gsum<G>(a00);
  a01 = gsum<G>(a01);
  if (!active) return;
  const float p10 = sigmoidf_((a10 - a11) * scale);
  const float p00 = causal ? 1.f : sigmoidf_((a00 - a01) * scale);
  const T *v0 = v + off(sv, r, 0), *v1 = v + off(sv, r, 1);
  T* o0 = out + ((r.b * 2 + 0) * T_ + r.t) * H * D + r.h * D;
  T* o1 = out + ((r.b * 2 + 1) * T_ + r.t) * H * D + r.h * D;
  for (int64_t d = j; d < D; d += G) {
    const float x0 = ld<T>(v0 + d * sv.s4), x1 = ld<T>(v1 + d * sv.s4);
    st<T>(o0 + d, x1 + p00 * (x0 - x1));
    st<T>(o1 + d, x1 + p10 * (x0 - x1));
  }
}

template <typename T, int G>
__global__ void __launch_bounds__(kThreads) w2a_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ q,
                                                            const T* __restrict__ k, const T* __restrict__ v,
                                                            T* __restrict__ dq, T* __restrict__ dk, T* __restrict__ dv,
                                                            int64_t N, int64_t T_, int64_t H, int64_t D, Strides5 sg,
                                                            Strides5 sq, Strides5 sk, Strides5 sv, float scale,
                                                            int causal) {
  const int64_t n = (int64_t)blockIdx.x * (kThreads / G) + threadIdx.x / G;
  const int j = threadIdx.x % G;
  const bool active = n < N;
  const Row r = row_of(active ? n : 0, T_, H);
  const T *q0 = q + off(sq, r, 0), *q1 = q + off(sq, r, 1);
  const T *k0 = k + off(sk, r, 0), *k1 = k + off(sk, r, 1);
  const T *v0 = v + off(sv, r, 0), *v1 = v + off(sv, r, 1);
  const T *g0 = dout + off(sg, r, 0), *g1 = dout + off(sg, r, 1);
  float a10 = 0.f, a11 = 0.f, a00 = 0.f, a01 = 0.f, gd0 = 0.f, gd1 = 0.f;
  if (active) {
    for (int64_t d = j; d < D; d += G) {
      const float x0 = ld<T>(q0 + d * sq.s4), x1 = ld<T>(q1 + d * sq.s4);
      const float y0 = ld<T>(k0 + d * sk.s4), y1 = ld<T>(k1 + d * sk.s4);
      const float vd = ld<T>(v0 + d * sv.s4) - ld<T>(v1 + d * sv.s4);
      a10 += x1 * y0;
      a11 += x1 * y1;
      a00 += x0 * y0;
      a01 += x0 * y1;
      gd0 += ld<T>(g0 + d * sg.s4) * vd;
      gd1 += ld<T>(g1 + d * sg.s4) * vd;
    }
  }
  a10 = gsum<G>(a10);
  a11 = gsum<G>(a11);
  a00 = gsum<G>(a00);
  a01 = gsum<G>(a01);
  gd0 = gsum<G>(gd0);
  gd1 = gsum<G>(gd1);
  if (!active) return;
  const float p10 = sigmoidf_((a10 - a11) * scale);
  const float p00 = causal ? 1.f : sigmoidf_((a00 - a01) * scale);
  const float p01 = 1.f - p00, p11 = 1.f - p10;
  const float ds0 = p00 * p01 * gd0 * scale;
  const float ds1 = p10 * p11 * gd1 * scale;
  const int64_t o0 = ((r.b * 2 + 0) * T_ + r.t) * H * D + r.h * D;
  const int64_t o1 = ((r.b * 2 + 1) * T_ + r.t) * H * D + r.h * D;
  for (int64_t d = j; d < D; d += G) {
    const float x0 = ld<T>(q0 + d * sq.s4), x1 = ld<T>(q1 + d * sq.s4);
    const float kd = ld<T>(k0 + d * sk.s4) - ld<T>(k1 + d * sk.s4);
    const float y0 = ld<T>(g0 + d * sg.s4), y1 = ld<T>(g1 + d * sg.s4);
    const float dk0 = ds0 * x0 + ds1 * x1;
    st<T>(dq + o0 + d, ds0 * kd);
    st<T>(dq + o1 + d, ds1 * kd);
    st<T>(dk + o0 + d, dk0);
    st<T>(dk + o1 + d, -dk0);
    st<T>(dv + o0 + d, p00 * y0 + p10 * y1);
    st<T>(dv + o1 + d, p01 * y0 + p11 * y1);
  }
}

int pick_g(int64_t D) { return D <= 16 ? 4 : D <= 32 ? 8 : D <= 64 ? 16 : 32; }

template <typename T, int G>
int fwd_g(const void* q, const void* k, const void* v, void* out, int64_t N, int64_t T_, int64_t H, int64_t D,
          Strides5 sq, Strides5 sk, Strides5 sv, float scale, int causal, cudaStream_t s) {
  const int64_t grid = ceil_div(N, kThreads / G);
  if (grid > kMaxGridX) return hilt_fail(HILT_ERR_UNSUPPORTED, "hilt_w2a_forward: too many rows");
  w2a_fwd_kernel<T, G><<<(unsigned)grid, kThreads, 0, s>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                                           static_cast<const T*>(v), static_cast<T*>(out), N, T_, H, D,
                                                           sq, sk, sv, scale, causal);
  return hilt_check_launch("hilt_w2a_forward");
}

template <typename T>
int fwd_t(const void* q, const void* k, const void* v, void* out, int64_t N, int64_t T_, int64_t H, int64_t D,
          Strides5 sq, Strides5 sk, Strides5 sv, float scale, int causal, cudaStream_t s) {
  switch (pick_g(D)) {
    case 4: return fwd_g<T, 4>(q, k, v, out, N, T_, H, D, sq, sk, sv, scale, causal, s);
    case 8: return fwd_g<T, 8>(q, k, v, out, N, T_, H, D, sq, sk, sv, scale, causal, s);
    case 16: return fwd_g<T, 16>(q, k, v, out, N, T_, H, D, sq, sk, sv, scale, causal, s);
    default: return fwd_g<T, 32>(q, k, v, out, N, T_, H, D, sq, sk, sv, scale, causal, s);
  }
}

template <typename T, int G>
int bwd_g(const void* g, const void* q, const void* k, const void* v, void* dq, void* dk, void* dv, int64_t N,
          int64_t T_, int64_t H, int64_t D, Strides5 sg, Strides5 sq, Strides5 sk, Strides5 sv, float scale, int causal,
          cudaStream_t s) {
  const int64_t grid = ceil_div(N, kThreads / G);
  if (grid > kMaxGridX) return hilt_fail(HILT_ERR_UNSUPPORTED, "hilt_w2a_backward: too many rows");
  w2a_bwd_kernel<T, G><<<(unsigned)grid, kThreads, 0, s>>>(
      static_cast<const T*>(g), static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
      static_cast<T*>(dq), static_cast<T*>(dk), static_cast<T*>(dv), N, T_, H, D, sg, sq, sk, sv, scale, causal);
  return hilt_check_launch("hilt_w2a_backward");
}

template <typename T>
int bwd_t(const void* g, const void* q, const void* k, const void* v, void* dq, void* dk, void* dv, int64_t N,
          int64_t T_, int64_t H, int64_t D, Strides5 sg, Strides5 sq, Strides5 sk, Strides5 sv, float scale, int causal,
          cudaStream_t s) {
  switch (pick_g(D)) {
    case 4: return bwd_g<T, 4>(g, q, k, v, dq, dk, dv, N, T_, H, D, sg, sq, sk, sv, scale, causal, s);
    case 8: return bwd_g<T, 8>(g, q, k, v, dq, dk, dv, N, T_, H, D, sg, sq, sk, sv, scale, causal, s);
    case 16: return bwd_g<T, 16>(g, q, k, v, dq, dk, dv, N, T_, H, D, sg, sq, sk, sv, scale, causal, s);
    default: return bwd_g<T, 32>(g, q, k, v, dq, dk, dv, N, T_, H, D, sg, sq, sk, sv, scale, causal, s);
  }
}

}  // namespace

// q, k, v: (B, 2, T, H, D) through strides[5] each; out: contiguous (B, 2, T, H, D).
HILT_API int hilt_w2a_forward(const void* q, const void* k, const void* v, void* out, int64_t B, int64_t T, int64_t H,
                              int64_t D, const int64_t* q_strides, const int64_t* k_strides,
                              const int64_t* v_strides, float scale, int causal, int dtype, int device, void* stream) {
  if (B < 0 || T < 0 || H < 0 || D < 0) return hilt_fail(HILT_ERR_ARG, "hilt_w2a_forward: negative size");
  if (dtype < 0 || dtype > 2) return hilt_fail(HILT_ERR_ARG, "hilt_w2a_forward: bad dtype tag %d", dtype);
  if (!q_strides || !k_strides || !v_strides) return hilt_fail(HILT_ERR_ARG, "hilt_w2a_forward: null strides");
  const int64_t N = B * T * H;
  if (N == 0 || D == 0) return HILT_OK;
  if (!q || !k || !v || !out) return hilt_fail(HILT_ERR_ARG, "hilt_w2a_forward: null data pointer");
  hilt::DeviceGuard guard(device, "hilt_w2a_forward");
  if (guard.rc) return guard.rc;
  Strides5 sq = strides5(q_strides), sk = strides5(k_strides), sv = strides5(v_strides);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int c = causal ? 1 : 0;
  switch (dtype) {
    case HILT_F32: return fwd_t<float>(q, k, v, out, N, T, H, D, sq, sk, sv, scale, c, s);
    case HILT_F16: return fwd_t<__half>(q, k, v, out, N, T, H, D, sq, sk, sv, scale, c, s);
    default: return fwd_t<__nv_bfloat16>(q, k, v, out, N, T, H, D, sq, sk, sv, scale, c, s);
  }
}

// dout, q, k, v: (B, 2, T, H, D) through strides[5] each; dq, dk, dv: contiguous (B, 2, T, H, D).
HILT_API int hilt_w2a_backward(const void* dout, const void* q, const void* k, const void* v, void* dq, void* dk,
                               void* dv, int64_t B, int64_t T, int64_t H, int64_t D, const int64_t* dout_strides,
                               const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides,
                               float scale, int causal, int dtype, int device, void* stream) {
  if (B < 0 || T < 0 || H < 0 || D < 0) return hilt_fail(HILT_ERR_ARG, "hilt_w2a_backward: negative size");
  if (dtype < 0 || dtype > 2) return hilt_fail(HILT_ERR_ARG, "hilt_w2a_backward: bad dtype tag %d", dtype);
  if (!dout_strides || !q_strides || !k_strides || !v_strides)
    return hilt_fail(HILT_ERR_ARG, "hilt_w2a_backward: null strides");
  const int64_t N = B * T * H;
  if (N == 0 || D == 0) return HILT_OK;
  if (!dout || !q || !k || !v || !dq || !dk || !dv) return hilt_fail(HILT_ERR_ARG, "hilt_w2a_backward: null data pointer");
  hilt::DeviceGuard guard(device, "hilt_w2a_backward");
  if (guard.rc) return guard.rc;
  Strides5 sg = strides5(dout_strides), sq = strides5(q_strides), sk = strides5(k_strides), sv = strides5(v_strides);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int c = causal ? 1 : 0;
  switch (dtype) {
    case HILT_F32: return bwd_t<float>(dout, q, k, v, dq, dk, dv, N, T, H, D, sg, sq, sk, sv, scale, c, s);
    case HILT_F16: return bwd_t<__half>(dout, q, k, v, dq, dk, dv, N, T, H, D, sg, sq, sk, sv, scale, c, s);
    default: return bwd_t<__nv_bfloat16>(dout, q, k, v, dq, dk, dv, N, T, H, D, sg, sq, sk, sv, scale, c, s);
  }
}
