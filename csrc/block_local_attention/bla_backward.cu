// block_local_attention backward launcher (kernels: bla_kernels.cuh, which documents the algorithm
// and its limits). C ABI, no torch:
//
// int hilt_bla_backward(dout, q, k, v, out, lse, kpm, dq, dk, dv, delta_scratch,
//                       B, T, H, D, block_size, dout_strides[4], q_strides[4], k_strides[4],
//                       v_strides[4], out_strides[4], kpm_strides[2] (or NULL),
//                       scale, dtype, causal, device, stream)
//   dout, q, k, v, out: (B, T, H, D) of `dtype`, any strides (dout may have stride-0 dims);
//   lse: contiguous (B, H, T) fp32 from the forward (+inf = no valid key); kpm: (B, T) uint8 or NULL;
//   dq, dk, dv: contiguous (B, T, H, D) of `dtype`; delta_scratch: fp32 workspace of B*H*T floats.
//   Two kernels on `stream`: dq (also writes delta), then dk/dv. No atomics: deterministic.
#include "bla_kernels.cuh"

using namespace hilt;
using namespace hilt::bla;

namespace {

struct BwdArgs {
  const void *dout, *q, *k, *v, *out;
  const float* lse;
  const uint8_t* kpm;
  void *dq, *dk, *dv;
  float* delta;
  int64_t B, T, H, D, bs;
  Strides4 sdo, sq, sk, sv, so;
  Strides2 sm;
  float scale;
  int causal;
  cudaStream_t stream;
};

template <typename T, int G, int DPT> int run(const BwdArgs& a) {
  const int64_t tiles = num_tiles(a.T, a.bs, kThreads / G);
  const int64_t grid = tiles * a.H * a.B;
  if (grid > kMaxGridX) return hilt_fail(HILT_ERR_UNSUPPORTED, "hilt_bla_backward: too many CTAs (%lld)", (long long)grid);
  const T* dout = static_cast<const T*>(a.dout);
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  bla_bwd_dq_kernel<T, G, DPT><<<(unsigned)grid, kThreads, 0, a.stream>>>(
      dout, q, k, v, static_cast<const T*>(a.out), a.lse, a.kpm, static_cast<T*>(a.dq), a.delta, a.T, a.H, (int)a.D,
      a.bs, tiles, a.sdo, a.sq, a.sk, a.sv, a.so, a.sm, a.scale, a.causal);
  int rc = hilt_check_launch("hilt_bla_backward (dq kernel)");
  if (rc) return rc;
  bla_bwd_dkdv_kernel<T, G, DPT><<<(unsigned)grid, kThreads, 0, a.stream>>>(
      dout, q, k, v, a.lse, a.delta, a.kpm, static_cast<T*>(a.dk), static_cast<T*>(a.dv), a.T, a.H, (int)a.D, a.bs,
      tiles, a.sdo, a.sq, a.sk, a.sv, a.sm, a.scale, a.causal);
  return hilt_check_launch("hilt_bla_backward (dk/dv kernel)");
}

template <typename T> int run_d(const BwdArgs& a) {
  if (a.D <= 32) return run<T, 4, 8>(a);
  if (a.D <= 64) return run<T, 4, 16>(a);
  return run<T, 8, 16>(a);
}

}  // namespace

HILT_API int hilt_bla_backward(const void* dout, const void* q, const void* k, const void* v, const void* out,
                               const float* lse, const void* kpm, void* dq, void* dk, void* dv, float* delta_scratch,
                               int64_t B, int64_t T, int64_t H, int64_t D, int64_t block_size,
                               const int64_t* dout_strides, const int64_t* q_strides, const int64_t* k_strides,
                               const int64_t* v_strides, const int64_t* out_strides, const int64_t* kpm_strides,
                               float scale, int dtype, int causal, int device, void* stream) {
  if (B < 0 || T < 0 || H < 0 || D < 0) return hilt_fail(HILT_ERR_ARG, "hilt_bla_backward: negative size");
  if (block_size < 1) return hilt_fail(HILT_ERR_ARG, "hilt_bla_backward: block_size must be >= 1");
  if (D > 128) return hilt_fail(HILT_ERR_UNSUPPORTED, "hilt_bla_backward: head dim D=%lld > 128", (long long)D);
  if (dtype < 0 || dtype > 2) return hilt_fail(HILT_ERR_ARG, "hilt_bla_backward: bad dtype tag %d", dtype);
  if (!dout_strides || !q_strides || !k_strides || !v_strides || !out_strides || (kpm && !kpm_strides))
    return hilt_fail(HILT_ERR_ARG, "hilt_bla_backward: null stride array");
  if (B == 0 || T == 0 || H == 0 || D == 0) return HILT_OK;  // every gradient is empty
  if (!dout || !q || !k || !v || !out || !lse || !dq || !dk || !dv || !delta_scratch)
    return hilt_fail(HILT_ERR_ARG, "hilt_bla_backward: null data pointer");
  hilt::DeviceGuard guard(device, "hilt_bla_backward");
  if (guard.rc) return guard.rc;
  BwdArgs a{dout, q, k, v, out, lse, static_cast<const uint8_t*>(kpm), dq, dk, dv, delta_scratch, B, T, H, D,
            block_size < T ? block_size : T, strides4(dout_strides), strides4(q_strides), strides4(k_strides),
            strides4(v_strides), strides4(out_strides), strides2(kpm ? kpm_strides : nullptr), scale, causal ? 1 : 0,
            static_cast<cudaStream_t>(stream)};
  switch (dtype) {
    case HILT_F32: return run_d<float>(a);
    case HILT_F16: return run_d<__half>(a);
    default: return run_d<__nv_bfloat16>(a);
  }
}
