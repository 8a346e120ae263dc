// block_local_attention forward launcher (kernel: bla_kernels.cuh, which documents the algorithm
// and its limits). C ABI, no torch:
//
// int hilt_bla_forward(q, k, v, kpm, out, lse, B, T, H, D, block_size,
//                      q_strides[4], k_strides[4], v_strides[4], kpm_strides[2] (or NULL),
//                      scale, dtype, causal, device, stream)
//   q, k, v: (B, T, H, D) of `dtype` (0 fp32, 1 fp16, 2 bf16) read through their element strides;
//   kpm: (B, T) uint8 (nonzero = padding) or NULL; out: contiguous (B, T, H, D) of `dtype`;
//   lse: contiguous (B, H, T) fp32. stream: a cudaStream_t (as void*). Returns 0 or an error code
//   (message: hilt_last_error()).
#include "bla_kernels.cuh"

using namespace hilt;
using namespace hilt::bla;

namespace {

struct FwdArgs {
  const void *q, *k, *v;
  const uint8_t* kpm;
  void* out;
  float* lse;
  int64_t B, T, H, D, bs;
  Strides4 sq, sk, sv;
  Strides2 sm;
  float scale;
  int causal;
  cudaStream_t stream;
};

template <typename T, int G, int DPT> int run(const FwdArgs& a) {
  const int64_t tiles = num_tiles(a.T, a.bs, kThreads / G);
  const int64_t grid = tiles * a.H * a.B;
  if (grid > kMaxGridX) return hilt_fail(HILT_ERR_UNSUPPORTED, "hilt_bla_forward: too many CTAs (%lld)", (long long)grid);
  bla_fwd_kernel<T, G, DPT><<<(unsigned)grid, kThreads, 0, a.stream>>>(
      static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v), a.kpm, static_cast<T*>(a.out),
      a.lse, a.T, a.H, (int)a.D, a.bs, tiles, a.sq, a.sk, a.sv, a.sm, a.scale, a.causal);
  return hilt_check_launch("hilt_bla_forward");
}

template <typename T> int run_d(const FwdArgs& a) {
  if (a.D <= 32) return run<T, 4, 8>(a);
  if (a.D <= 64) return run<T, 4, 16>(a);
  return run<T, 8, 16>(a);
}

}  // namespace

HILT_API int hilt_bla_forward(const void* q, const void* k, const void* v, const void* kpm, void* out, float* lse,
                              int64_t B, int64_t T, int64_t H, int64_t D, int64_t block_size, const int64_t* q_strides,
                              const int64_t* k_strides, const int64_t* v_strides, const int64_t* kpm_strides,
                              float scale, int dtype, int causal, int device, void* stream) {
  if (B < 0 || T < 0 || H < 0 || D < 0) return hilt_fail(HILT_ERR_ARG, "hilt_bla_forward: negative size");
  if (block_size < 1) return hilt_fail(HILT_ERR_ARG, "hilt_bla_forward: block_size must be >= 1");
  if (D > 128) return hilt_fail(HILT_ERR_UNSUPPORTED, "hilt_bla_forward: head dim D=%lld > 128", (long long)D);
  if (dtype < 0 || dtype > 2) return hilt_fail(HILT_ERR_ARG, "hilt_bla_forward: bad dtype tag %d", dtype);
  if (!q_strides || !k_strides || !v_strides || (kpm && !kpm_strides))
    return hilt_fail(HILT_ERR_ARG, "hilt_bla_forward: null stride array");
  if (B == 0 || T == 0 || H == 0) return HILT_OK;  // nothing to compute
  if (!q || !k || !v || !out || !lse) return hilt_fail(HILT_ERR_ARG, "hilt_bla_forward: null data pointer");
  hilt::DeviceGuard guard(device, "hilt_bla_forward");
  if (guard.rc) return guard.rc;
  FwdArgs a{q, k, v, static_cast<const uint8_t*>(kpm), out, lse, B, T, H, D, block_size < T ? block_size : T,
            strides4(q_strides), strides4(k_strides), strides4(v_strides), strides2(kpm ? kpm_strides : nullptr),
            scale, causal ? 1 : 0, static_cast<cudaStream_t>(stream)};
  switch (dtype) {
    case HILT_F32: return run_d<float>(a);
    case HILT_F16: return run_d<__half>(a);
    default: return run_d<__nv_bfloat16>(a);
  }
}
