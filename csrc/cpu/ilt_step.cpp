// ilt_step.cpp: the decoding step of an Inter-Layer Transformer (ILT) in one call, fp32, on the CPU.
//
// Torch-free C ABI (loaded with ctypes by hilt_kernels/cpu/_lib.py, built by g++ in setup.py).
// HILT's cached decoding runs one ILT per layer boundary for every new token; in PyTorch that is ~30
// tiny ops per ILT, each paying ~2 us of dispatch for a few hundred nanoseconds of arithmetic. This
// file runs the whole ILT of InterLayerTransformer.forward for N tokens in one call:
//
//   x_r   = LN0(proj_in(state_r) + window_emb[r])             r = 0 (prev), 1 (cur)
//   per window layer (pre-LN):
//     h_r = LN1(x_r); q, k, v = split(h_r W_qkv + b_qkv)        (q pre-scaled by head_dim^-1/2)
//     y_r = per head: softmax over the window's two keys; causal: row 0 sees only itself (y_0 = v_0)
//           and row 1 gives v_1 + p (v_0 - v_1), p = sigmoid(q_1 . (k_0 - k_1)); non-causal: both rows
//           so, with p = sigmoid(q_r . (k_0 - k_1))
//     x_r += y_r W_o + b_o
//     x_r += gelu(LN2(x_r) W_1 + b_1) W_2 + b_2                  (exact GELU; erf by erf_poly below)
//   out = base + scale * (mean_r(x_r) W_out + b_out)   (out = the modulation alone when base is NULL)
//
// Tokens are processed in tiles of TILE tokens (2*TILE window rows), so every weight row is read once
// per tile. The matmuls are row-tile x weight loops over 64-column chunks that the compiler
// vectorises; on x86-64 they are compiled for AVX-512, AVX2+FMA and baseline (target_clones, chosen at
// load time). Summation order differs from BLAS, so results agree with PyTorch to rounding (~1e-6
// relative), not bit for bit.
//
// Limits: fp32 only; contiguous row-major (N, d) inputs; eval mode (no dropout); single-threaded (it is
// meant for decoding, a few rows at a time; large N are faster through BLAS, and the Python side sends
// them there). `out` may alias `cur` or `base` (each tile is read before it is written).
//
// Weights: one contiguous float buffer, laid out by hilt_ilt_weights_floats() (see the loop in
// hilt_ilt_step_f32 for the order; hilt_kernels/cpu/ilt_step.py packs it).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t TILE = 8;   // tokens per tile (2 * TILE window rows)
constexpr int64_t JB = 64;    // output columns per chunk of a matmul

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define HILT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HILT_CLONES
#endif

#if defined(__GNUC__)
// Register-blocked tile: Y[r, 0:16] (+)= X[r, :] @ W[:, 0:16] (+ bias) for r < RB, with the 16 columns as two
// 8-float vectors per row held in registers across the whole K loop (GCC/clang vector extensions: AVX2/AVX-512
// registers in those clones, SSE pairs in the baseline one). W, Y and bias point at the tile's first column.
typedef float v8f __attribute__((vector_size(32)));

template <int RB>
__attribute__((always_inline)) inline void tile16(int64_t K, const float* __restrict X, int64_t ldx,
                                                  const float* __restrict W, int64_t M,
                                                  const float* __restrict bias, float* __restrict Y, int64_t ldy,
                                                  bool accumulate) {
  v8f acc[RB][2];
  for (int r = 0; r < RB; ++r) {
    for (int h = 0; h < 2; ++h) {
      v8f b{}, y{};
      if (bias) std::memcpy(&b, bias + 8 * h, sizeof(v8f));
      if (accumulate) std::memcpy(&y, Y + r * ldy + 8 * h, sizeof(v8f));
      acc[r][h] = accumulate ? y + b : b;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    v8f w0, w1;
    std::memcpy(&w0, W + k * M, sizeof(v8f));
    std::memcpy(&w1, W + k * M + 8, sizeof(v8f));
    for (int r = 0; r < RB; ++r) {
      const v8f a = v8f{} + X[r * ldx + k];
      acc[r][0] += a * w0;
      acc[r][1] += a * w1;
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int h = 0; h < 2; ++h) std::memcpy(Y + r * ldy + 8 * h, &acc[r][h], sizeof(v8f));
}
#endif

// Y[r, :] (+)= X[r, :] @ W + bias for r < R.  X (R, K) with row stride ldx, W (K, M) row-major,
// Y (R, M) with row stride ldy; bias (M) or NULL; accumulate: add to Y instead of overwriting it.
// Every output starts from (Y +) bias and adds the K products in order.
HILT_CLONES
void rows_matmul(int64_t R, int64_t K, int64_t M, const float* __restrict X, int64_t ldx,
                 const float* __restrict W, const float* __restrict bias, float* __restrict Y,
                 int64_t ldy, bool accumulate) {
  int64_t j0 = 0;
#if defined(__GNUC__)
  for (; j0 + 16 <= M; j0 += 16) {  // 16-column tiles, 4 rows at a time
    const float* bj = bias ? bias + j0 : nullptr;
    int64_t r0 = 0;
    for (; r0 + 4 <= R; r0 += 4)
      tile16<4>(K, X + r0 * ldx, ldx, W + j0, M, bj, Y + r0 * ldy + j0, ldy, accumulate);
    switch (R - r0) {
      case 3: tile16<3>(K, X + r0 * ldx, ldx, W + j0, M, bj, Y + r0 * ldy + j0, ldy, accumulate); break;
      case 2: tile16<2>(K, X + r0 * ldx, ldx, W + j0, M, bj, Y + r0 * ldy + j0, ldy, accumulate); break;
      case 1: tile16<1>(K, X + r0 * ldx, ldx, W + j0, M, bj, Y + r0 * ldy + j0, ldy, accumulate); break;
      default: break;
    }
  }
#endif
  if (j0 == M) return;
  // the last M - j0 (< 16 with the tiles) columns
  float acc[2 * TILE][JB];
  for (; j0 < M; j0 += JB) {
    const int64_t jn = std::min(JB, M - j0);
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t j = 0; j < jn; ++j) {
        float a = bias ? bias[j0 + j] : 0.0f;
        acc[r][j] = accumulate ? Y[r * ldy + j0 + j] + a : a;
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      const float* __restrict w = W + k * M + j0;
      for (int64_t r = 0; r < R; ++r) {
        const float a = X[r * ldx + k];
        for (int64_t j = 0; j < jn; ++j) acc[r][j] += a * w[j];
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < jn; ++j) Y[r * ldy + j0 + j] = acc[r][j];
  }
}

// y = (x - mean) / sqrt(var + eps) * g + b over n elements (biased variance, as torch's layer_norm).
void layer_norm(const float* x, float* y, int64_t n, const float* g, const float* b, float eps) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += x[i];
  const double mean = s / n;
  double v = 0.0;
  for (int64_t i = 0; i < n; ++i) v += (x[i] - mean) * (x[i] - mean);
  const float rstd = static_cast<float>(1.0 / std::sqrt(v / n + static_cast<double>(eps)));
  const float m = static_cast<float>(mean);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - m) * rstd * g[i] + b[i];
}

struct Layout {  // offsets (in floats) of every weight in the packed buffer
  int64_t w_in, b_in, ln0_g, ln0_b, layers, per_layer, w_out, b_out, eps, total;
  // inside one layer, relative to its start
  int64_t ln1_g, ln1_b, w_qkv, b_qkv, w_o, b_o, ln2_g, ln2_b, w_1, b_1, w_2, b_2;
};

Layout layout(int64_t d, int64_t I, int64_t F, int64_t L) {
  Layout o{};
  int64_t p = 0;
  o.w_in = p; p += d * I;
  o.b_in = p; p += 2 * I;
  o.ln0_g = p; p += I;
  o.ln0_b = p; p += I;
  int64_t q = 0;
  o.ln1_g = q; q += I;
  o.ln1_b = q; q += I;
  o.w_qkv = q; q += I * 3 * I;
  o.b_qkv = q; q += 3 * I;
  o.w_o = q; q += I * I;
  o.b_o = q; q += I;
  o.ln2_g = q; q += I;
  o.ln2_b = q; q += I;
  o.w_1 = q; q += I * F;
  o.b_1 = q; q += F;
  o.w_2 = q; q += F * I;
  o.b_2 = q; q += I;
  o.per_layer = q;
  o.layers = p; p += L * q;
  o.w_out = p; p += I * d;
  o.b_out = p; p += d;
  o.eps = p; p += 1 + 2 * L;
  o.total = p;
  return o;
}

inline float sigmoid(float s) { return 1.0f / (1.0f + std::exp(-s)); }

// erf(x) in float without a libm call, so that the GELU loop vectorises (libm's erff is ~4 ns a value
// and GELU runs on every MLP unit of both window rows): |x| < 1: x P(x^2), P of degree 6; 1 <= |x| < 4: a
// degree-14 polynomial in |x| - 2.5; |x| >= 4: 1 (erf(4) rounds to 1 in float). Both are least-squares
// fits on Chebyshev nodes made for this file; evaluated in float, the error is at most 1.3e-7 absolute
// (2 ulp of 1; libm's: 3e-8) and 1.8e-7 relative for |x| < 1. NaN stays NaN.
inline float erf_poly(float x) {
  const float ax = std::fabs(x);
  const float t = ax * ax;
  float a = 7.882497199e-05f;
  a = a * t - 8.018855020e-04f;
  a = a * t + 5.189311946e-03f;
  a = a * t - 2.685432880e-02f;
  a = a * t + 1.128359746e-01f;
  a = a * t - 3.761262690e-01f;
  a = a * t + 1.128379166e+00f;
  a *= ax;
  const float u = (ax < 4.0f ? ax : 4.0f) - 2.5f;
  float b = 8.901371531e-07f;
  b = b * u + 4.985671917e-07f;
  b = b * u - 1.571927088e-05f;
  b = b * u + 1.776023737e-05f;
  b = b * u + 8.110047310e-05f;
  b = b * u - 2.706181954e-04f;
  b = b * u + 2.587301170e-04f;
  b = b * u + 5.603601419e-04f;
  b = b * u - 2.797554688e-03f;
  b = b * u + 6.109109628e-03f;
  b = b * u - 8.622604298e-03f;
  b = b * u + 8.351769677e-03f;
  b = b * u - 5.445688652e-03f;
  b = b * u + 2.178184613e-03f;
  b = b * u + 9.995930476e-01f;
  float r = ax < 1.0f ? a : (ax < 4.0f ? b : 1.0f);
  r = std::copysign(r, x);
  return x != x ? x : r;
}

// g = gelu(g) = g/2 (1 + erf(g / sqrt 2)) over n values (exact GELU, erf as above)
HILT_CLONES
void gelu_inplace(float* __restrict g, int64_t n) {
  const float inv_sqrt2 = 0.70710678118654752440f;
  for (int64_t i = 0; i < n; ++i) g[i] = 0.5f * g[i] * (1.0f + erf_poly(g[i] * inv_sqrt2));
}

}  // namespace

extern "C" {

int hilt_cpu_abi_version() { return 1; }

// Number of floats of the packed weights of an ILT with d_model d, ilt_dim I, MLP width F, L layers.
int64_t hilt_ilt_weights_floats(int64_t d, int64_t I, int64_t F, int64_t L) {
  if (d < 1 || I < 1 || F < 1 || L < 0) return -1;
  return layout(d, I, F, L).total;
}

// The ILT step for n tokens: see the header. prev, cur (n, d); base (n, d) or NULL; out (n, d);
// scale_ptr: one float (NULL: 1). Returns 0, or -1 for bad arguments (nothing written).
int hilt_ilt_step_f32(const float* prev, const float* cur, const float* base, float* out,
                      const float* scale_ptr, const float* w, int64_t n, int64_t d, int64_t I, int64_t H, int64_t F, int64_t L,
                      int causal) {
  if (n < 0 || d < 1 || I < 1 || H < 1 || I % H != 0 || F < 1 || L < 0 || !prev || !cur || !out || !w)
    return -1;
  const Layout o = layout(d, I, F, L);
  const float scale = scale_ptr ? *scale_ptr : 1.0f;
  const int64_t D = I / H, C = 3 * I, R = 2 * TILE;
  // per-thread workspace, reused across calls: x, h (R, I); qkv (R, 3I); y (R, I); g (R, F); m (TILE, I);
  // mod (TILE, d)
  thread_local std::vector<float> ws;
  const size_t need = static_cast<size_t>(R * (3 * I + C + F) + TILE * (I + d));
  if (ws.size() < need) ws.resize(need);
  float* x = ws.data();
  float* h = x + R * I;
  float* qkv = h + R * I;
  float* y = qkv + R * C;
  float* g = y + R * I;
  float* m = g + R * F;
  float* mod = m + TILE * I;
  const float* eps = w + o.eps;

  for (int64_t t0 = 0; t0 < n; t0 += TILE) {
    const int64_t nt = std::min(TILE, n - t0), nr = 2 * nt;
    // rows 0..nt-1: prev of tokens t0..; rows nt..2nt-1: cur
    rows_matmul(nt, d, I, prev + t0 * d, d, w + o.w_in, w + o.b_in, x, I, false);
    rows_matmul(nt, d, I, cur + t0 * d, d, w + o.w_in, w + o.b_in + I, x + nt * I, I, false);
    for (int64_t r = 0; r < nr; ++r) layer_norm(x + r * I, x + r * I, I, w + o.ln0_g, w + o.ln0_b, eps[0]);
    for (int64_t l = 0; l < L; ++l) {
      const float* lw = w + o.layers + l * o.per_layer;
      for (int64_t r = 0; r < nr; ++r)
        layer_norm(x + r * I, h + r * I, I, lw + o.ln1_g, lw + o.ln1_b, eps[1 + 2 * l]);
      rows_matmul(nr, I, C, h, I, lw + o.w_qkv, lw + o.b_qkv, qkv, C, false);
      for (int64_t t = 0; t < nt; ++t) {
        const float* r0 = qkv + t * C;          // prev row: q | k | v
        const float* r1 = qkv + (nt + t) * C;   // cur row
        float* y0 = y + t * I;
        float* y1 = y + (nt + t) * I;
        for (int64_t hh = 0; hh < H; ++hh) {
          const int64_t a = hh * D;
          float s1 = 0.0f, s0 = 0.0f;
          for (int64_t e = 0; e < D; ++e) {
            const float dk = r0[I + a + e] - r1[I + a + e];
            s1 += r1[a + e] * dk;
            s0 += r0[a + e] * dk;
          }
          const float p1 = sigmoid(s1);
          const float p0 = causal ? 1.0f : sigmoid(s0);
          for (int64_t e = 0; e < D; ++e) {
            const float v0 = r0[2 * I + a + e], v1 = r1[2 * I + a + e];
            y1[a + e] = v1 + p1 * (v0 - v1);
            y0[a + e] = causal ? v0 : v1 + p0 * (v0 - v1);
          }
        }
      }
      rows_matmul(nr, I, I, y, I, lw + o.w_o, lw + o.b_o, x, I, true);
      for (int64_t r = 0; r < nr; ++r)
        layer_norm(x + r * I, h + r * I, I, lw + o.ln2_g, lw + o.ln2_b, eps[2 + 2 * l]);
      rows_matmul(nr, I, F, h, I, lw + o.w_1, lw + o.b_1, g, F, false);
      gelu_inplace(g, nr * F);
      rows_matmul(nr, F, I, g, F, lw + o.w_2, lw + o.b_2, x, I, true);
    }
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t i = 0; i < I; ++i) m[t * I + i] = 0.5f * (x[t * I + i] + x[(nt + t) * I + i]);
    rows_matmul(nt, I, d, m, I, w + o.w_out, w + o.b_out, mod, d, false);  // the modulation (nt, d)
    for (int64_t t = 0; t < nt; ++t) {
      const float* src = mod + t * d;
      float* dst = out + (t0 + t) * d;
      if (base) {
        const float* b = base + (t0 + t) * d;
        for (int64_t c = 0; c < d; ++c) dst[c] = b[c] + scale * src[c];
      } else {
        std::memcpy(dst, src, static_cast<size_t>(d) * sizeof(float));
      }
    }
  }
  return 0;
}

}  // extern "C"
