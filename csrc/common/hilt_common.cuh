// hilt CUDA backend: shared definitions of every kernel file (no torch headers anywhere).
//
// * Error handling: every extern "C" launcher returns an int code (HILT_OK = 0) and, on failure,
//   leaves a message in a per-thread buffer read with `hilt_last_error()` (common.cu).
// * `hilt::DeviceGuard guard(device, op)` makes the caller's device current for the launch and
//   restores the previously current device when the launcher returns: cudaSetDevice (even in this
//   library's static runtime) changes the calling thread's current CUDA context, which torch's
//   runtime reads as its current device. It also clears stale runtime errors. guard.rc != 0: the
//   device could not be selected (message in hilt_last_error()).
//   `hilt_check_launch(op)` turns a failed launch into an error code + message.
// * Dtype helpers: `ld<T>` / `st<T>` convert one element to / from fp32 (T = float, __half,
//   __nv_bfloat16); `ld_any` / `st_any` do the same with a runtime dtype tag (for small side inputs
//   whose dtype may differ from the main one); `ld16<T>` loads 16 aligned bytes as fp32 values.
// * Strides are element strides (int64) as torch reports them; all index math is 64-bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define HILT_ABI_VERSION 1

#define HILT_API extern "C" __attribute__((visibility("default")))

enum HiltStatus { HILT_OK = 0, HILT_ERR_ARG = 1, HILT_ERR_CUDA = 2, HILT_ERR_UNSUPPORTED = 3 };
enum HiltDtype { HILT_F32 = 0, HILT_F16 = 1, HILT_BF16 = 2 };

// Host helpers (common.cu).
int hilt_fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
int hilt_check_launch(const char* op);
const char* hilt_dtype_name(int dtype);

namespace hilt {

struct DeviceGuard {
  int prev = -1;  // device to restore (-1: nothing changed)
  int rc = HILT_OK;
  DeviceGuard(int device, const char* op);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
};

template <typename T> __device__ __forceinline__ float ld(const T* p);
template <> __device__ __forceinline__ float ld<float>(const float* p) { return *p; }
template <> __device__ __forceinline__ float ld<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename T> __device__ __forceinline__ void st(T* p, float x);
template <> __device__ __forceinline__ void st<float>(float* p, float x) { *p = x; }
template <> __device__ __forceinline__ void st<__half>(__half* p, float x) { *p = __float2half_rn(x); }
template <> __device__ __forceinline__ void st<__nv_bfloat16>(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// Element `i` of a buffer whose dtype is only known at run time (tag HILT_F32/F16/BF16).
__device__ __forceinline__ float ld_any(const void* p, int dtype, int64_t i) {
  if (dtype == HILT_F16) return __half2float(static_cast<const __half*>(p)[i]);
  if (dtype == HILT_BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}
__device__ __forceinline__ void st_any(void* p, int dtype, int64_t i, float x) {
  if (dtype == HILT_F16) static_cast<__half*>(p)[i] = __float2half_rn(x);
  else if (dtype == HILT_BF16) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
  else static_cast<float*>(p)[i] = x;
}

// 16 bytes = VEC elements of T.
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };

// Load 16 bytes (p must be 16-byte aligned) as Vec<T>::N fp32 values.
template <typename T> __device__ __forceinline__ void ld16(const T* p, float* x) {
  uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) x[i] = ld<T>(e + i);
}
// Store Vec<T>::N fp32 values as 16 bytes (p must be 16-byte aligned).
template <typename T> __device__ __forceinline__ void st16(T* p, const float* x) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) st<T>(e + i, x[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

struct Strides2 { int64_t s0, s1; };
struct Strides3 { int64_t s0, s1, s2; };
struct Strides4 { int64_t s0, s1, s2, s3; };
struct Strides5 { int64_t s0, s1, s2, s3, s4; };

inline Strides2 strides2(const int64_t* s) { return s ? Strides2{s[0], s[1]} : Strides2{0, 0}; }
inline Strides3 strides3(const int64_t* s) { return s ? Strides3{s[0], s[1], s[2]} : Strides3{0, 0, 0}; }
inline Strides4 strides4(const int64_t* s) { return s ? Strides4{s[0], s[1], s[2], s[3]} : Strides4{0, 0, 0, 0}; }
inline Strides5 strides5(const int64_t* s) {
  return s ? Strides5{s[0], s[1], s[2], s[3], s[4]} : Strides5{0, 0, 0, 0, 0};
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int next_pow2(int64_t x) {
  int p = 1;
  while (p < x && p < (1 << 30)) p <<= 1;
  return p;
}

constexpr int64_t kMaxGridX = 2147483647LL;

}  // namespace hilt
