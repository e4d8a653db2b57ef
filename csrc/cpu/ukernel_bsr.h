// BSR micro-kernels: one block row at N = 1 (bsr_spmv_blockrow) and the RB x V register-blocked
// block-row kernel for N > 1 (bsr_tile_rows). Contracts below; drivers in kernels_impl.h.
#pragma once

#include <cstdint>

#include "cpu/simd.h"

namespace sparsekit {
namespace cpu {
namespace {

// N == 1, one block row: out[i] = sum over blocks b, j < c of B_b[i0 + i][j] * xs[col_b + j]
// for i < rows. acc holds rows x CC partial sums (CC = compile-time c, or c when 0) so the
// inner loop is a contiguous, vectorisable multiply-add; reduced once per block row.
template <int CC, class VT, class IT>
inline void bsr_spmv_blockrow(const IT* idx, const VT* val, int64_t s, int64_t e, int r, int c_rt,
                              int rows, const float* xs, float* acc, float* out) {
  const int c = CC > 0 ? CC : c_rt;
  for (int i = 0; i < rows * c; ++i) acc[i] = 0.f;
  for (int64_t b = s; b < e; ++b) {
    const VT* B = val + b * static_cast<int64_t>(r) * c;
    const float* xb = xs + idx_of(idx[b]) * c;
    for (int i = 0; i < rows; ++i) {
      float* a = acc + i * c;
      const VT* Bi = B + i * c;
      for (int j = 0; j < c; ++j) a[j] += to_f32(Bi[j]) * xb[j];
    }
  }
  for (int i = 0; i < rows; ++i) {
    float sum = 0.f;
    for (int j = 0; j < c; ++j) sum += acc[i * c + j];
    out[i] = sum;
  }
}

// N > 1 micro-kernel: block rows [i0, i0 + RB) of the blocks [s, e) of one block row against
// one packed tile: out[i][0..NT) = sum_b sum_j B_b[i0 + i][j] * xt[col_b + j][0..NT).
// RB x V accumulators; each xt vector is loaded once and used RB times. With `accumulate` the
// sums start from out[i][0..NT) instead of zero.
template <int RB, int V, class VT, class IT>
inline void bsr_tile_rows(const IT* idx, const VT* val, int64_t s, int64_t e, int r, int c,
                          int i0, const float* xt, float* out, bool accumulate) {
  constexpr int W = Vec::W;
  constexpr int NT = V * W;
  typename Vec::T acc[RB][V];
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < V; ++v)
      acc[i][v] = accumulate ? Vec::load(out + i * NT + v * W) : Vec::zero();
  const int64_t bsz = static_cast<int64_t>(r) * c;
  for (int64_t b = s; b < e; ++b) {
    const VT* B = val + b * bsz + static_cast<int64_t>(i0) * c;
    const float* xb = xt + idx_of(idx[b]) * c * NT;
    for (int j = 0; j < c; ++j) {
      typename Vec::T xv[V];
      for (int v = 0; v < V; ++v) xv[v] = Vec::load(xb + j * NT + v * W);
      for (int i = 0; i < RB; ++i) {
        const typename Vec::T w = Vec::set1(to_f32(B[i * c + j]));
        for (int v = 0; v < V; ++v) acc[i][v] = Vec::fma(w, xv[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < V; ++v) Vec::store(out + i * NT + v * W, acc[i][v]);
}

// Largest register block for V vectors given the register file (32 zmm / 16 ymm).
template <int V>
constexpr int max_rb() {
#if defined(SPARSEKIT_ISA_AVX512)
  return V >= 4 ? 4 : 8;
#else
  return V >= 4 ? 2 : (V == 2 ? 4 : 8);
#endif
}

}  // namespace
}  // namespace cpu
}  // namespace sparsekit
