// Self-test kernels of the CUDA emulator (tests/cuda/test_emulator.py): each extern "C" function
// launches one small kernel and returns the launch's cudaError_t; the emulator's message is copied
// into `msg`. Built like csrc/ (the same source rewrite), with AddressSanitizer + UBSan.
#include <cuda_runtime.h>
#include <stdio.h>

#define SELFTEST extern "C" __attribute__((visibility("default")))

static int finish(char* msg, int len) {
  cudaError_t e = cudaGetLastError();
  snprintf(msg, (size_t)len, "%s", e == cudaSuccess ? "" : cudaGetErrorString(e));
  return (int)e;
}

// A correct block reduction (shuffles + shared memory + barriers): out[0] = sum of 0..n-1.
__global__ void reduce_kernel(int* out) {
  __shared__ int partial[8];
  int x = (int)threadIdx.x;
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x / 32] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (int w = 0; w < (int)(blockDim.x / 32); ++w) s += partial[w];
    out[blockIdx.x] = s;
  }
}
SELFTEST int selftest_reduce(int* out, char* msg, int len) {
  reduce_kernel<<<2, 256>>>(out);
  return finish(msg, len);
}

// Threads of one block reach different __syncthreads.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}
SELFTEST int selftest_divergent_barrier(int* out, char* msg, int len) {
  divergent_barrier_kernel<<<1, 64>>>(out);
  return finish(msg, len);
}

// A full-warp mask in a partial warp (48 threads: warp 1 has 16 lanes).
__global__ void partial_warp_kernel(float* out) {
  float x = (float)threadIdx.x;
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  out[threadIdx.x] = x;
}
SELFTEST int selftest_partial_warp(float* out, char* msg, int len) {
  partial_warp_kernel<<<1, 48>>>(out);
  return finish(msg, len);
}

// A lane named in the mask exited before the shuffle.
__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x == 3) return;
  float x = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 1);
  out[threadIdx.x] = x;
}
SELFTEST int selftest_exited_lane(float* out, char* msg, int len) {
  exited_lane_kernel<<<1, 32>>>(out);
  return finish(msg, len);
}

// Lane 0 waits at a barrier while the rest of its warp shuffles.
__global__ void barrier_vs_shuffle_kernel(float* out) {
  float x = (float)threadIdx.x;
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    x = __shfl_xor_sync(0xffffffffu, x, 2);  // names lane 0, which is at the barrier
    __syncthreads();
  }
  out[threadIdx.x] = x;
}
SELFTEST int selftest_barrier_vs_shuffle(float* out, char* msg, int len) {
  barrier_vs_shuffle_kernel<<<1, 32>>>(out);
  return finish(msg, len);
}

// Dynamic shared memory: `bytes` requested, `optin` > 0 sets the opt-in attribute first.
__global__ void dyn_smem_kernel(float* out, int n) {
  extern __shared__ float buf[];
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = (float)i;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = buf[n - 1];
}
SELFTEST int selftest_dyn_smem(float* out, int bytes, int optin, char* msg, int len) {
  if (optin > 0) {
    cudaError_t e = cudaFuncSetAttribute(dyn_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
    if (e != cudaSuccess) {
      finish(msg, len);
      return (int)e;
    }
  }
  dyn_smem_kernel<<<1, 128, (size_t)bytes>>>(out, bytes / 4);
  return finish(msg, len);
}

// One element past the end of `out` (n elements): AddressSanitizer must abort the process.
__global__ void overflow_kernel(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 1.f;  // the bounds guard should be i < n
}
SELFTEST int selftest_overflow(float* out, int n, char* msg, int len) {
  overflow_kernel<<<(n + 63) / 64 + 1, 64>>>(out, n);
  return finish(msg, len);
}
