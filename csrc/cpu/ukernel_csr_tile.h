// CSR micro-kernel for N > 1: one sparse row against one packed x tile (NT = V * W batch
// columns). Contract below; the row/tile loops live in kernels_impl.h (csr_batch_rows[_kb]).
#pragma once

#include <cstdint>

#include "cpu/simd.h"

namespace sparsekit {
namespace cpu {
namespace {

// One CSR row against one packed tile: out[0..NT) = sum_j values[j] * xt[indices[j]][0..NT)
// over the nonzeros j in [j, e); with kBounded only over those with column < kend (the row's
// indices are sorted, so these come first). Returns the first nonzero not used.
// U nonzeros in flight x V vectors = independent accumulator chains (hides FMA latency).
// If `init` is not null the sums start from init[0..NT) (it may alias `out`).
template <int V, bool kBounded = false, class VT, class IT>
inline int64_t csr_row_tile(const IT* idx, const VT* val, int64_t j, int64_t e, const float* xt,
                            float* out, const float* init = nullptr, int64_t kend = 0) {
  constexpr int W = Vec::W;
  constexpr int NT = V * W;
  constexpr int U = V >= 4 ? 2 : 4;
  typename Vec::T acc[U][V];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < V; ++v) acc[u][v] = Vec::zero();
  if (init != nullptr)
    for (int v = 0; v < V; ++v) acc[0][v] = Vec::load(init + v * W);
  // The bound test is fused into the loop conditions (a separate scan for the block end
  // measured 1.6x slower in the K-blocked walk).
  for (; j + U <= e && (!kBounded || idx_of(idx[j + U - 1]) < kend); j += U) {
    for (int u = 0; u < U; ++u) {
      const typename Vec::T b = Vec::set1(to_f32(val[j + u]));
      const float* xr = xt + idx_of(idx[j + u]) * NT;
      for (int v = 0; v < V; ++v) acc[u][v] = Vec::fma(b, Vec::load(xr + v * W), acc[u][v]);
    }
  }
  for (; j < e && (!kBounded || idx_of(idx[j]) < kend); ++j) {
    const typename Vec::T b = Vec::set1(to_f32(val[j]));
    const float* xr = xt + idx_of(idx[j]) * NT;
    for (int v = 0; v < V; ++v) acc[0][v] = Vec::fma(b, Vec::load(xr + v * W), acc[0][v]);
  }
  for (int v = 0; v < V; ++v) {
    typename Vec::T s = acc[0][v];
    for (int u = 1; u < U; ++u) s = Vec::add(s, acc[u][v]);
    Vec::store(out + v * W, s);
  }
  return j;
}

}  // namespace
}  // namespace cpu
}  // namespace sparsekit
