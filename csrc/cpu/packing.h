// Packing of activations (x -> fp32 rows / transposed batch tiles) and the batch-major output
// writer used by the N > 1 drivers. Written against simd.h; compiled per ISA.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/format.h"
#include "cpu/simd.h"
#include "cpu/threading.h"

namespace sparsekit {
namespace cpu {
namespace {

inline float bias_at(const float* bias, int64_t m) { return bias ? bias[m] : 0.f; }

// Converts `n` activations of dtype t starting at x to fp32.
inline float x_at(const void* x, DType t, int64_t off) {
  switch (t) {
    case DType::BF16: return to_f32(static_cast<const bf16_t*>(x)[off]);
    case DType::F16: return to_f32(static_cast<const f16_t*>(x)[off]);
    default: return static_cast<const float*>(x)[off];
  }
}

// Fills xs[k0..k1) from x row n converted to fp32, zero-padded for k >= K (up to len). O(k1 - k0).
inline void load_x_row(const SpmmParams& p, int64_t n, float* xs, int64_t len, int64_t k0,
                       int64_t k1) {
  const int64_t kend = imin(k1, p.K);
  const int64_t row = n * p.ldx;
  if (p.x_dtype == DType::F32) {
    const float* x = static_cast<const float*>(p.x) + row;
    for (int64_t k = k0; k < kend; ++k) xs[k] = x[k];
  } else {
    for (int64_t k = k0; k < kend; ++k) xs[k] = x_at(p.x, p.x_dtype, row + k);
  }
  for (int64_t k = imax(k0, p.K); k < imin(k1, len); ++k) xs[k] = 0.f;
}

// All N rows of x as fp32 for the per-row (SpMV-style) drivers: x itself when it is fp32
// (row stride p.ldx), else converted once into owned scratch (row stride K). O(N * K) when
// converting, O(1) otherwise.
struct XRowsF32 {
  Scratch xs;
  const float* x;
  int64_t ldx;
  explicit XRowsF32(const SpmmParams& p)
      : xs(p.x_dtype == DType::F32 ? 1 : static_cast<size_t>(p.N * p.K)) {
    if (p.x_dtype == DType::F32) {
      x = static_cast<const float*>(p.x);
      ldx = p.ldx;
    } else {
      for (int64_t n = 0; n < p.N; ++n) load_x_row(p, n, xs.p + n * p.K, p.K, 0, p.K);
      x = xs.p;
      ldx = p.K;
    }
  }
};

#if defined(SPARSEKIT_ISA_AVX512)
// x (K fp32 values) as unsigned 32-bit fixed point in four byte planes for the VNNI bitmap
// kernel (csr_q_impl.h, q_row_bitmap_dot_vnni): xu[c] = round(x[c] * 2^e) + 2^31 with e the
// largest exponent for which max |x| * 2^e < 2^30 (e = 0 when x is all zeros), and
// planes[k * stride + c] = byte k of xu[c] for c < K, 0 for K <= c < stride (stride >= K).
// Every element within a factor 2^6 of max |x| is represented exactly (fp32 carries 24
// significant bits, the fixed point 30 for the largest); smaller ones are rounded to a
// multiple of 2^-e. Returns false, writing nothing, when x holds an inf or NaN. O(stride).
inline bool pack_x_fixed_planes(const float* x, int64_t K, int64_t stride, uint8_t* planes, int& e) {
  bool finite = true;
  const float mx = absmax_finite(x, K, finite);
  if (!finite) return false;
  int ex = 0;
  // libm builtins rather than the inline std:: overloads, whose out-of-line copies would be
  // compiled with this TU's ISA flags
  if (mx > 0.f) __builtin_frexpf(mx, &ex);  // mx < 2^ex
  e = mx > 0.f ? 30 - ex : 0;  // in [-98, 178]: applied as two float powers of two
  const int e1 = e > 127 ? 127 : e;
  const float s1 = __builtin_ldexpf(1.f, e1), s2 = __builtin_ldexpf(1.f, e - e1);
  for (int64_t c = 0; c < K; c += 16)
    fixed_planes16(x, c, static_cast<int>(imin(16, K - c)), s1, s2, planes, stride);
  if (stride > K)  // (planes may be null when stride = K = 0)
    for (int k = 0; k < 4; ++k)
      std::memset(planes + k * stride + K, 0, static_cast<size_t>(stride - K));
  return true;
}
#endif

// Packs x rows [n0, n0 + NT) for k in [k0, k1) into xt[k * NT + t] (fp32, zero-padded for rows
// >= N and for k >= K, up to k < kpad). O((k1 - k0) * NT).
inline void pack_x_tile(const SpmmParams& p, float* xt, int NT, int64_t n0, int64_t k0,
                        int64_t k1) {
  const int64_t nn = imin(NT, p.N - n0);
  const int64_t kend = imin(k1, p.K);
#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
  // fp32 x: one strided gather per (k, W batch rows) and a contiguous store; the scalar
  // transpose below is a measurable share of a large call (docs/kernels.md).
  if (p.x_dtype == DType::F32 && p.ldx < (int64_t{1} << 31) / Vec::W) {
    constexpr int64_t W = Vec::W;
    const float* x = static_cast<const float*>(p.x);
    for (int64_t g = 0; g < NT; g += W) {
      const int n = static_cast<int>(imax(0, imin(W, nn - g)));  // batch rows present
      if (n == 0) {
        for (int64_t k = k0; k < kend; ++k) Vec::store(xt + k * NT + g, Vec::zero());
      } else {
        const float* base = x + (n0 + g) * p.ldx;
        for (int64_t k = k0; k < kend; ++k)
          Vec::store(xt + k * NT + g, Vec::gather_column(base + k, p.ldx, n));
      }
    }
    for (int64_t k = imax(k0, p.K); k < k1; ++k)
      for (int64_t t = 0; t < NT; ++t) xt[k * NT + t] = 0.f;
    return;
  }
#endif
  constexpr int64_t KB = 64;  // k block: NT x KB reads stay in L1 while transposing
  for (int64_t kb = k0; kb < kend; kb += KB) {
    const int64_t ke = imin(kb + KB, kend);
    for (int64_t t = 0; t < nn; ++t) {
      const int64_t row = (n0 + t) * p.ldx;
      if (p.x_dtype == DType::F32) {
        const float* x = static_cast<const float*>(p.x) + row;
        for (int64_t k = kb; k < ke; ++k) xt[k * NT + t] = x[k];
      } else {
        for (int64_t k = kb; k < ke; ++k) xt[k * NT + t] = x_at(p.x, p.x_dtype, row + k);
      }
    }
    for (int64_t t = nn; t < NT; ++t)
      for (int64_t k = kb; k < ke; ++k) xt[k * NT + t] = 0.f;
  }
  for (int64_t k = imax(k0, p.K); k < k1; ++k)
    for (int64_t t = 0; t < NT; ++t) xt[k * NT + t] = 0.f;
}

constexpr int64_t kOutRows = 64;  // rows per output flush: 4 cache lines of fp32 per y row

// Writes y[n0 + t][m0 + i] = act(part[i * ldp + t] + bias[m0 + i]) for t < nn, i < rows (part: a
// rows x NT fp32 partial-sum tile, tbuf: scratch of >= rows * nn floats). y is written
// batch-major, in runs of `rows` consecutive outputs, instead of each row's NT outputs with
// NT-strided scalar stores (y rows are M * 4 bytes apart; docs/kernels.md); callers pass at least
// 32 rows so every y row gets whole cache lines. O(rows * nn).
inline void store_rows_tile(const SpmmParams& p, const float* part, int64_t ldp, int64_t rows,
                            int64_t nn, int64_t n0, int64_t m0, float* tbuf) {
#if defined(SPARSEKIT_ISA_AVX512)
  // fp32 y: read each run of W rows of one batch column with a strided gather (in L1) and
  // store it contiguously; no transpose buffer. Masked stores would be needed for the ragged
  // run, so only AVX-512 takes this path.
  if (p.x_dtype == DType::F32) {
    constexpr int64_t W = Vec::W;
    const bool relu = p.activation == Activation::Relu;
    for (int64_t t = 0; t < nn; ++t) {
      float* dst = static_cast<float*>(p.y) + (n0 + t) * p.ldy + m0;
      for (int64_t i = 0; i < rows; i += W) {
        const int n = static_cast<int>(imin(W, rows - i));
        Vec::T v = Vec::gather_column(part + i * ldp + t, ldp, n);
        if (p.bias != nullptr) v = Vec::add(v, Vec::load_n(p.bias + m0 + i, n));
        if (relu) v = Vec::relu(v);
        Vec::store_n(dst + i, v, n);
      }
    }
    return;
  }
#endif
  for (int64_t i = 0; i < rows; ++i) {
    const float* src = part + i * ldp;
    for (int64_t t = 0; t < nn; ++t) tbuf[t * rows + i] = src[t];
  }
  for (int64_t t = 0; t < nn; ++t) {
    const float* src = tbuf + t * rows;
    const int64_t off = (n0 + t) * p.ldy + m0;
    if (p.x_dtype == DType::F32) {
      float* dst = static_cast<float*>(p.y) + off;
      const Activation act = p.activation;
      if (p.bias != nullptr) {
        const float* b = p.bias + m0;
        for (int64_t i = 0; i < rows; ++i) dst[i] = activate(src[i] + b[i], act);
      } else {
        for (int64_t i = 0; i < rows; ++i) dst[i] = activate(src[i], act);
      }
    } else {
      for (int64_t i = 0; i < rows; ++i)
        store_out(p.y, off + i, activate(src[i] + bias_at(p.bias, m0 + i), p.activation),
                  p.x_dtype);
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace sparsekit
