// ema_depth_scan: S^l = (1 - a_l) S^{l-1} + a_l values_l over the depth axis L, fp32 state.
//
// Layout: values (L, *S) is seen as (L, R, C) with C = S[-1] (R = prod(S[:-1])), read through three
// element strides (l, r, c); the Python side collapses S[:-1] to one stride when possible and makes
// the tensor contiguous otherwise. grad likewise (stride-0 expanded grads are read in place), init
// as (R, C) strides (an init broadcast from (C,) has r-stride 0). alpha is passed ALREADY as
// sigmoid(alpha_logits) in fp32, contiguous (L,) or (L, C) (tiny; computed by torch, so it matches
// the reference bit for bit).
//
// Kernels
// * ema_fwd_kernel: one thread per (r, c) element, loops over l; writes all states (L, R*C) or the
//   last (R*C), contiguous, in the values' dtype. The update is torch.lerp's formula.
// * ema_bwd_kernel: CTA = TX x TY threads (TX = min(32, next_pow2(C)) columns, TY = 256 / TX rows);
//   each thread owns one (r, c) element: a forward loop recomputes the fp32 states into a scratch
//   (L, N) (never rebuilt by dividing by 1 - a; no cumprod closed form), then the reverse loop
//   G_l = g_l + (1 - a_{l+1}) G_{l+1}, dvalues_l = a_l G_l, and per step the CTA sums
//   G_l (v_l - S^{l-1}) over its TY rows (fixed order, shared memory) into partial[l, row block, c].
//   dinit = (1 - a_1) G_1 (fp32, shape S) when init is given.
// * ema_dalpha_kernel: one CTA per output (dalpha[l, c] or dalpha[l]) sums its partials in a fixed
//   order (strided per thread, then a shared-memory tree) and multiplies by a (1 - a).
//   Deterministic: no atomics anywhere.
// The `states` saved by the forward are not used (they are rounded to 16 bits for 16-bit inputs);
// the backward always recomputes in fp32. Workspace: hilt_ema_workspace_floats(L, R, C) floats.
// Limits: ceil(C / TX) < 65536; fp32/fp16/bf16 values (alpha fp32).
#include <math.h>

#include "../common/hilt_common.cuh"

using namespace hilt;

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float lerp_(float s, float x, float a) {
  // torch.lerp(start, end, weight) for fp32
  return a < 0.5f ? s + a * (x - s) : x - (x - s) * (1.f - a);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ema_fwd_kernel(const T* __restrict__ values, const float* __restrict__ alpha,
                                                            const T* __restrict__ init, T* __restrict__ out, int64_t L,
                                                            int64_t R, int64_t C, Strides3 sv, Strides2 si,
                                                            int per_channel, int return_all) {
  const int64_t n = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  const int64_t N = R * C;
  if (n >= N) return;
  const int64_t r = n / C, c = n % C;
  float s = init ? ld<T>(init + r * si.s0 + c * si.s1) : 0.f;
  const T* vp = values + r * sv.s1 + c * sv.s2;
  for (int64_t l = 0; l < L; ++l) {
    const float a = alpha[per_channel ? l * C + c : l];
    s = lerp_(s, ld<T>(vp + l * sv.s0), a);
    if (return_all) st<T>(out + l * N + n, s);
  }
  if (!return_all) st<T>(out + n, s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ema_bwd_kernel(
    const T* __restrict__ grad, const T* __restrict__ values, const float* __restrict__ alpha, const T* __restrict__ init,
    T* __restrict__ dvalues, float* __restrict__ dinit, float* __restrict__ states, float* __restrict__ partial,
    int64_t L, int64_t R, int64_t C, int64_t nRB, Strides3 sg, Strides3 sv, Strides2 si, int per_channel,
    int return_all) {
  __shared__ float red[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t r = (int64_t)blockIdx.x * TY + ty;
  const int64_t c = (int64_t)blockIdx.y * TX + tx;
  const bool active = r < R && c < C;
  const int64_t N = R * C;
  const int64_t n = r * C + c;
  const T* vp = values + r * sv.s1 + c * sv.s2;
  const T* gp = grad + r * sg.s1 + c * sg.s2;

  float s0 = 0.f;
  if (active) {
    if (init) s0 = ld<T>(init + r * si.s0 + c * si.s1);
    float s = s0;
    for (int64_t l = 0; l < L; ++l) {
      s = lerp_(s, ld<T>(vp + l * sv.s0), alpha[per_channel ? l * C + c : l]);
      states[l * N + n] = s;
    }
  }

  float G = 0.f;
  for (int64_t l = L - 1; l >= 0; --l) {
    float contrib = 0.f;
    if (active) {
      const float a = alpha[per_channel ? l * C + c : l];
      float g;
      if (return_all) g = ld<T>(gp + l * sg.s0);
      else g = (l == L - 1) ? ld<T>(gp) : 0.f;
      if (l < L - 1) {
        const float an = alpha[per_channel ? (l + 1) * C + c : l + 1];
        G = g + (1.f - an) * G;
      } else {
        G = g;
      }
      st<T>(dvalues + l * N + n, a * G);
      const float prev = l > 0 ? states[(l - 1) * N + n] : s0;
      contrib = G * (ld<T>(vp + l * sv.s0) - prev);
    }
    red[ty * TX + tx] = contrib;
    __syncthreads();
    if (ty == 0 && c < C) {
      float acc = 0.f;
      for (int y = 0; y < TY; ++y) acc += red[y * TX + tx];
      partial[(l * nRB + blockIdx.x) * C + c] = acc;
    }
    __syncthreads();
  }
  if (active && dinit) dinit[n] = (1.f - alpha[per_channel ? c : 0]) * G;
}

__global__ void __launch_bounds__(kThreads) ema_dalpha_kernel(const float* __restrict__ partial,
                                                               const float* __restrict__ alpha,
                                                               float* __restrict__ dalpha, int64_t nRB, int64_t C,
                                                               int per_channel) {
  __shared__ float red[kThreads];
  const int64_t o = blockIdx.x;
  int64_t count, base, step;
  if (per_channel) {
    const int64_t l = o / C, c = o % C;
    count = nRB;
    base = l * nRB * C + c;
    step = C;
  } else {
    count = nRB * C;
    base = o * nRB * C;
    step = 1;
  }
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) acc += partial[base + i * step];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float a = alpha[o];
    dalpha[o] = a * (1.f - a) * red[0];
  }
}

void bwd_shape(int64_t R, int64_t C, int& TX, int& TY, int64_t& nRB) {
  TX = next_pow2(C < 1 ? 1 : (C > 32 ? 32 : C));
  TY = kThreads / TX;
  nRB = ceil_div(R, TY);
}

template <typename T>
int run_fwd(const void* values, const float* alpha, const void* init, void* out, int64_t L, int64_t R, int64_t C,
            Strides3 sv, Strides2 si, int per_channel, int return_all, cudaStream_t stream) {
  const int64_t grid = ceil_div(R * C, kThreads);
  if (grid > kMaxGridX) return hilt_fail(HILT_ERR_UNSUPPORTED, "hilt_ema_forward: too many elements");
  ema_fwd_kernel<T><<<(unsigned)grid, kThreads, 0, stream>>>(static_cast<const T*>(values), alpha,
                                                             static_cast<const T*>(init), static_cast<T*>(out), L, R,
                                                             C, sv, si, per_channel, return_all);
  return hilt_check_launch("hilt_ema_forward");
}

template <typename T>
int run_bwd(const void* grad, const void* values, const float* alpha, const void* init, void* dvalues, float* dalpha,
            float* dinit, float* workspace, int64_t L, int64_t R, int64_t C, Strides3 sg, Strides3 sv, Strides2 si,
            int per_channel, int return_all, cudaStream_t stream) {
  int TX, TY;
  int64_t nRB;
  bwd_shape(R, C, TX, TY, nRB);
  const int64_t gy = ceil_div(C, TX);
  if (nRB > kMaxGridX || gy > 65535) return hilt_fail(HILT_ERR_UNSUPPORTED, "hilt_ema_backward: grid too large");
  float* states = workspace;
  float* partial = workspace + L * R * C;
  dim3 grid((unsigned)nRB, (unsigned)gy), block(TX, TY);
  ema_bwd_kernel<T><<<grid, block, 0, stream>>>(static_cast<const T*>(grad), static_cast<const T*>(values), alpha,
                                                static_cast<const T*>(init), static_cast<T*>(dvalues), dinit, states,
                                                partial, L, R, C, nRB, sg, sv, si, per_channel, return_all);
  int rc = hilt_check_launch("hilt_ema_backward");
  if (rc) return rc;
  const int64_t outs = per_channel ? L * C : L;
  if (outs > kMaxGridX) return hilt_fail(HILT_ERR_UNSUPPORTED, "hilt_ema_backward: too many alpha outputs");
  ema_dalpha_kernel<<<(unsigned)outs, kThreads, 0, stream>>>(partial, alpha, dalpha, nRB, C, per_channel);
  return hilt_check_launch("hilt_ema_backward (dalpha reduction)");
}

}  // namespace

// Floats of fp32 workspace hilt_ema_backward needs: the recomputed states (L*R*C) + the partial sums.
HILT_API int64_t hilt_ema_workspace_floats(int64_t L, int64_t R, int64_t C) {
  int TX, TY;
  int64_t nRB;
  bwd_shape(R, C, TX, TY, nRB);
  return L * R * C + L * nRB * C;
}

// values: (L, R, C) via strides values_strides[3]; alpha: fp32 contiguous sigmoid(alpha_logits), (L,) or
// (L, C); init: (R, C) via init_strides[2], or NULL (zeros); out: contiguous (L, R*C) or (R*C).
HILT_API int hilt_ema_forward(const void* values, const float* alpha, const void* init, void* out, int64_t L, int64_t R,
                              int64_t C, const int64_t* values_strides, const int64_t* init_strides, int per_channel,
                              int return_all, int dtype, int device, void* stream) {
  if (L < 0 || R < 0 || C < 0) return hilt_fail(HILT_ERR_ARG, "hilt_ema_forward: negative size");
  if (dtype < 0 || dtype > 2) return hilt_fail(HILT_ERR_ARG, "hilt_ema_forward: bad dtype tag %d", dtype);
  if (!values_strides || (init && !init_strides)) return hilt_fail(HILT_ERR_ARG, "hilt_ema_forward: null strides");
  if (L == 0 || R == 0 || C == 0) return HILT_OK;
  if (!values || !alpha || !out) return hilt_fail(HILT_ERR_ARG, "hilt_ema_forward: null data pointer");
  hilt::DeviceGuard guard(device, "hilt_ema_forward");
  if (guard.rc) return guard.rc;
  Strides3 sv = strides3(values_strides);
  Strides2 si = strides2(init ? init_strides : nullptr);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case HILT_F32: return run_fwd<float>(values, alpha, init, out, L, R, C, sv, si, per_channel, return_all, s);
    case HILT_F16: return run_fwd<__half>(values, alpha, init, out, L, R, C, sv, si, per_channel, return_all, s);
    default: return run_fwd<__nv_bfloat16>(values, alpha, init, out, L, R, C, sv, si, per_channel, return_all, s);
  }
}

// grad: (L, R, C) strides grad_strides[3] when return_all, else (R, C) in grad_strides[1..2];
// dvalues: contiguous (L, R*C) in values' dtype; dalpha: fp32 (L,) or (L, C); dinit: fp32 (R*C) or NULL
// (only when init is NULL); workspace: hilt_ema_workspace_floats(L, R, C) fp32.
HILT_API int hilt_ema_backward(const void* grad, const void* values, const float* alpha, const void* init,
                               void* dvalues, float* dalpha, float* dinit, float* workspace, int64_t L, int64_t R,
                               int64_t C, const int64_t* grad_strides, const int64_t* values_strides,
                               const int64_t* init_strides, int per_channel, int return_all, int dtype, int device,
                               void* stream) {
  if (L < 0 || R < 0 || C < 0) return hilt_fail(HILT_ERR_ARG, "hilt_ema_backward: negative size");
  if (dtype < 0 || dtype > 2) return hilt_fail(HILT_ERR_ARG, "hilt_ema_backward: bad dtype tag %d", dtype);
  if (!grad_strides || !values_strides || (init && !init_strides))
    return hilt_fail(HILT_ERR_ARG, "hilt_ema_backward: null strides");
  if (init && !dinit) return hilt_fail(HILT_ERR_ARG, "hilt_ema_backward: init given but dinit is NULL");
  if (L == 0 || R == 0 || C == 0)
    return hilt_fail(HILT_ERR_ARG, "hilt_ema_backward: empty input (the caller handles L = 0 or N = 0)");
  if (!grad || !values || !alpha || !dvalues || !dalpha || !workspace)
    return hilt_fail(HILT_ERR_ARG, "hilt_ema_backward: null data pointer");
  hilt::DeviceGuard guard(device, "hilt_ema_backward");
  if (guard.rc) return guard.rc;
  Strides3 sg = strides3(grad_strides), sv = strides3(values_strides);
  Strides2 si = strides2(init ? init_strides : nullptr);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case HILT_F32:
      return run_bwd<float>(grad, values, alpha, init, dvalues, dalpha, dinit, workspace, L, R, C, sg, sv, si,
                            per_channel, return_all, s);
    case HILT_F16:
      return run_bwd<__half>(grad, values, alpha, init, dvalues, dalpha, dinit, workspace, L, R, C, sg, sv, si,
                             per_channel, return_all, s);
    default:
      return run_bwd<__nv_bfloat16>(grad, values, alpha, init, dvalues, dalpha, dinit, workspace, L, R, C, sg, sv, si,
                                    per_channel, return_all, s);
  }
}
