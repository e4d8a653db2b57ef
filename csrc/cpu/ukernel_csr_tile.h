// CSR micro-kernel for N > 1: one sparse row against one packed x tile (NT = V * W batch
// columns). Contract below; the row/tile loops live in kernels_impl.h (csr_batch_rows[_kb]);
// edge tester: tests/cpp/ukernel_test.cpp.
#pragma once

#include <cstdint>

#include "cpu/simd.h"

namespace sparsekit {
namespace cpu {
namespace {

// Contract. Computes out[t] = init[t] (0 when init is null) + sum_{j in [j0, jend)}
// to_f32(val[j]) * xt[idx[j] * NT + t] for t < NT = V * W, in fp32, and returns jend: e, or with
// kBounded the first j in [j0, e) with idx[j] >= kend (e if none). Sizes: any row length
// e - j0 >= 0 (j0 is the argument j); V = 1, 2, 4 or 8 vectors. Layout: xt is one packed tile
// (packing.h pack_x_tile): row k holds the NT batch columns of x at position k, contiguous fp32;
// out and init hold NT fp32. Alignment: none (unaligned vector loads and stores). Assumes:
// idx[j] < the rows of xt; with kBounded, idx ascending within the row (CSR rows are sorted), so
// the used nonzeros come first. init may alias out; out must not overlap xt. Reads idx within [j0,
// e) and val within [j0, jend); writes out[0..NT). No allocation, no state. Cost:
// O((jend - j0) * V) vector multiply-adds; U = 4 (V < 4), 2 (V = 4) or 1 (V = 8) nonzeros in
// flight times V vectors are independent accumulator chains (hiding the FMA latency), then one
// nonzero at a time, so the edges are row lengths around U.
template <int V, bool kBounded = false, class VT, class IT>
inline int64_t csr_row_tile(const IT* idx, const VT* val, int64_t j, int64_t e, const float* xt,
                            float* out, const float* init = nullptr, int64_t kend = 0) {
  constexpr int W = Vec::W;
  constexpr int NT = V * W;
  // U * V >= 8 chains cover a 4-cycle FMA on 2 ports; U * V <= 8 keeps them in 16 registers.
  constexpr int U = V >= 8 ? 1 : (V >= 4 ? 2 : 4);
  typename Vec::T acc[U][V];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < V; ++v) acc[u][v] = Vec::zero();
  if (init != nullptr)
    for (int v = 0; v < V; ++v) acc[0][v] = Vec::load(init + v * W);
  // The bound test is fused into the loop conditions: a separate scan for the block end costs
  // more than it saves in the K-blocked walk (docs/kernels.md).
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
