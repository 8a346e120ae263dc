// hilt CUDA emulator: compiles csrc/ kernels as host C++ (g++) so they run on the CPU under
// AddressSanitizer + UndefinedBehaviorSanitizer or ThreadSanitizer. Test-only (tests/cuda/).
//
// Model (implemented in hilt_emu.cpp):
// * Blocks of a grid run one after another; every CUDA thread of a block is a host thread (a pool
//   reused across blocks and launches). Launches are synchronous; streams are ignored.
// * __syncthreads() is a block barrier; threads reaching DIFFERENT __syncthreads call sites in the
//   same phase, or a block where every live thread waits and none can proceed, is an error.
//   Exited threads count as arrived (as on the hardware).
// * __shfl_*_sync / __syncwarp wait until every lane named in the mask arrives at the same call
//   site with the same mask (lock-step); a named lane that exited, does not exist (partial warp)
//   or waits elsewhere, a caller outside its mask, or overlapping different masks is an error.
// * __shared__ variables and dynamic shared memory are per block, freshly allocated (filled with
//   0xFF bytes: NaN floats) so ASan sees overflows and stale reads show up as NaN. Dynamic shared
//   memory above 48 KiB needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize) (at most 227 KiB,
//   static + dynamic).
// * ThreadSanitizer: the emulator's own synchronisation is invisible to it (hilt_emu.cpp is not
//   instrumented and uses raw futexes); it tells TSan exactly the CUDA happens-before edges
//   (barrier: all threads of the block; warp collective: its lanes; launch order), so a missing
//   __syncthreads is reported as a data race. Blocks of one grid get no edge between them.
// An error aborts the block (its threads unwind), skips the rest of the grid, makes the launch
// fail (cudaGetLastError) with the message, and is counted (hilt_emu_error_count()).
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#ifndef CUDART_VERSION
#define CUDART_VERSION 13000
#endif
#define HILT_CUDA_EMULATOR 1

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

extern "C" {
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaDriverGetVersion(int* version);
cudaError_t cudaRuntimeGetVersion(int* version);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
}

// ------------------------------------------------------------------------------------- fp16 / bf16
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.x & 0x8000u) << 16, e = (h.x >> 10) & 0x1fu, m = h.x & 0x3ffu;
  uint32_t bits;
  if (e == 0) {
    float f = ldexpf((float)m, -24);
    return sign ? -f : f;
  } else if (e == 31) {
    bits = sign | 0x7f800000u | (m << 13);
  } else {
    bits = sign | ((e - 15 + 127) << 23) | (m << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline __half __float2half_rn(float f) {  // round to nearest even, subnormals, inf, NaN
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  __half h;
  if (ax >= 0x7f800000u) {
    h.x = (uint16_t)(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  } else if (ax >= 0x47800000u) {  // >= 65536
    h.x = (uint16_t)(sign | 0x7c00u);
  } else if (ax < 0x38800000u) {  // below 2^-14: subnormal half (exact scaling, then RNE)
    float af;
    memcpy(&af, &ax, 4);
    h.x = (uint16_t)(sign | (uint32_t)lrintf(af * 16777216.0f));
  } else {
    uint32_t r = (((ax >> 23) - 127 + 15) << 10) | ((ax & 0x7fffffu) >> 13);
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // may carry into the exponent / inf
    h.x = (uint16_t)(sign | r);
  }
  return h;
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t bits = (uint32_t)b.x << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  __nv_bfloat16 b;
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    b.x = (uint16_t)((x >> 16) | 0x40u);  // quiet NaN
  } else {
    x += 0x7fffu + ((x >> 16) & 1u);
    b.x = (uint16_t)(x >> 16);
  }
  return b;
}

// ------------------------------------------------------------------------------ thread coordinates
namespace emu {
extern thread_local uint3 tl_threadIdx;
extern thread_local uint3 tl_blockIdx;
extern thread_local dim3 tl_blockDim;
extern thread_local dim3 tl_gridDim;

enum CollKind { K_SHFL_IDX = 0, K_SHFL_UP, K_SHFL_DOWN, K_SHFL_XOR, K_SYNCWARP };

void syncthreads(const char* file, int line);
// Warp collective: every lane of `mask` arrives with a 64-bit payload; returns the payload of the
// source lane (per kind / arg / width). K_SYNCWARP ignores payload and result.
uint64_t warp_collective(unsigned mask, int kind, uint64_t payload, int arg, int width, const char* file, int line);
void* shared_static(const void* key, size_t bytes, size_t align, const char* name);
void* shared_dynamic();
void fail_kernel(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

struct Cfg {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
};
inline Cfg cfg(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr) {
  return Cfg{grid, block, smem, stream};
}

typedef void (*ThreadBody)(void* ctx);
// Runs `body(ctx)` as every thread of every block; records the launch error (cudaGetLastError).
void run_grid(const void* fn, const char* name, const Cfg& c, ThreadBody body, void* ctx);
cudaError_t func_set_attribute(const void* fn, int attr, int value);

template <typename... P> struct LaunchCtx {
  void (*kernel)(P...);
  std::tuple<std::decay_t<P>...> args;
  static void call(void* p) {
    auto* self = static_cast<LaunchCtx*>(p);
    std::apply(self->kernel, self->args);
  }
};

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten to
// emu::launch(kernel, "kernel", emu::cfg(grid, block, smem, stream), args...).
template <typename... P, typename... A>
void launch(void (*kernel)(P...), const char* name, const Cfg& c, A&&... a) {
  LaunchCtx<P...> ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...)};
  run_grid(reinterpret_cast<const void*>(kernel), name, c, &LaunchCtx<P...>::call, &ctx);
}

template <typename T> inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of an unsupported type");
  uint64_t u = 0;
  memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T> inline T from_bits(uint64_t u) {
  T v;
  memcpy(&v, &u, sizeof(T));
  return v;
}
}  // namespace emu

#define threadIdx (::emu::tl_threadIdx)
#define blockIdx (::emu::tl_blockIdx)
#define blockDim (::emu::tl_blockDim)
#define gridDim (::emu::tl_gridDim)

constexpr int warpSize = 32;

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu::warp_collective(mask, emu::K_SYNCWARP, 0, 0, 32, file, line);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return emu::from_bits<T>(emu::warp_collective(mask, emu::K_SHFL_IDX, emu::to_bits(v), src, width, file, line));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  return emu::from_bits<T>(emu::warp_collective(mask, emu::K_SHFL_UP, emu::to_bits(v), (int)delta, width, file, line));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  return emu::from_bits<T>(
      emu::warp_collective(mask, emu::K_SHFL_DOWN, emu::to_bits(v), (int)delta, width, file, line));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  return emu::from_bits<T>(emu::warp_collective(mask, emu::K_SHFL_XOR, emu::to_bits(v), lane_mask, width, file, line));
}

template <typename T> inline T __ldg(const T* p) { return *p; }

template <typename F> inline cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  return emu::func_set_attribute(reinterpret_cast<const void*>(fn), (int)attr, value);
}

// __shared__ declarations are rewritten at build time (tests/cuda/emulator/build.py):
//   __shared__ T name[N];      ->  T (&name)[N] = EMU_SHARED_ARRAY(T, name, N);
//   extern __shared__ T name[]; ->  T* name = static_cast<T*>(::emu::shared_dynamic());
#define EMU_SHARED_ARRAY(T, name, N)                                                                          \
  (*static_cast<T(*)[N]>([]() -> void* {                                                                      \
    static const char emu_key = 0;                                                                            \
    return ::emu::shared_static(&emu_key, sizeof(T[N]), alignof(T), #name);                                   \
  }()))
