// hilt CUDA backend: the library-wide C ABI that is not tied to one op.
//
//   hilt_abi_version()      -> HILT_ABI_VERSION (the Python side refuses a library of another ABI)
//   hilt_build_info()       -> a static string: ABI version, CUDA runtime version compiled against
//   hilt_last_error()       -> the message of the last failed call on this thread ("" if none)
//   hilt_clear_error()
//   hilt_cuda_device_count(int* count) -> error code; fails gracefully (code + message) when there
//                              is no driver or no device, so the library loads and answers on a
//                              CPU-only machine.
//   hilt_cuda_runtime_version(), hilt_cuda_driver_version(int*)
#include <stdarg.h>
#include <stdio.h>

#include "hilt_common.cuh"

static thread_local char g_err[1024] = "";

int hilt_fail(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_err, sizeof(g_err), fmt, ap);
  va_end(ap);
  return code;
}

const char* hilt_dtype_name(int dtype) {
  switch (dtype) {
    case HILT_F32: return "float32";
    case HILT_F16: return "float16";
    case HILT_BF16: return "bfloat16";
    default: return "unknown dtype";
  }
}

hilt::DeviceGuard::DeviceGuard(int device, const char* op) {
  cudaGetLastError();  // clear a stale (non-sticky) error of this library's runtime
  int cur = -1;
  if (cudaGetDevice(&cur) != cudaSuccess) {
    cudaGetLastError();
    cur = -1;
  }
  if (cur == device) return;  // already current: nothing to change or restore
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) {
    rc = hilt_fail(HILT_ERR_CUDA, "%s: cudaSetDevice(%d) failed: %s (%s)", op, device, cudaGetErrorString(e),
                   cudaGetErrorName(e));
    return;
  }
  prev = cur;
}

hilt::DeviceGuard::~DeviceGuard() {
  if (prev >= 0) cudaSetDevice(prev);
}

int hilt_check_launch(const char* op) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    return hilt_fail(HILT_ERR_CUDA, "%s: kernel launch failed: %s (%s)", op, cudaGetErrorString(e), cudaGetErrorName(e));
  return HILT_OK;
}

#define HILT_STR2(x) #x
#define HILT_STR(x) HILT_STR2(x)

HILT_API int hilt_abi_version(void) { return HILT_ABI_VERSION; }

#ifndef HILT_BUILD_NOTE  // set by hilt_kernels/cuda/_build.py: nvcc, archs built and dropped, defines
#define HILT_BUILD_NOTE "built outside hilt_kernels/cuda/_build.py"
#endif

HILT_API const char* hilt_build_info(void) {
  return "hilt CUDA library, ABI " HILT_STR(HILT_ABI_VERSION) ", built with CUDA runtime " HILT_STR(CUDART_VERSION)
         " (statically linked); " HILT_BUILD_NOTE;
}

HILT_API const char* hilt_last_error(void) { return g_err; }

HILT_API void hilt_clear_error(void) { g_err[0] = '\0'; }

// Test hook: sets the error buffer to `msg` and returns HILT_ERR_ARG (checks the ctypes plumbing).
HILT_API int hilt_set_error_for_test(const char* msg) { return hilt_fail(HILT_ERR_ARG, "%s", msg ? msg : "(null)"); }

HILT_API int hilt_cuda_runtime_version(void) { return CUDART_VERSION; }

HILT_API int hilt_cuda_driver_version(int* version) {
  if (!version) return hilt_fail(HILT_ERR_ARG, "hilt_cuda_driver_version: null pointer");
  *version = 0;
  cudaError_t e = cudaDriverGetVersion(version);
  if (e != cudaSuccess)
    return hilt_fail(HILT_ERR_CUDA, "cudaDriverGetVersion failed: %s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
  return HILT_OK;
}

HILT_API int hilt_cuda_device_count(int* count) {
  if (!count) return hilt_fail(HILT_ERR_ARG, "hilt_cuda_device_count: null pointer");
  *count = 0;
  cudaError_t e = cudaGetDeviceCount(count);
  if (e != cudaSuccess) {
    *count = 0;
    cudaGetLastError();
    return hilt_fail(HILT_ERR_CUDA, "cudaGetDeviceCount failed: %s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
  }
  return HILT_OK;
}
