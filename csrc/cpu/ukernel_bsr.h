// BSR micro-kernels: one block row at N = 1 (bsr_spmv_blockrow, and bsr_spmv_blockrow_vec with
// whole blocks in registers) and the RB x V register-blocked block-row kernel for N > 1
// (bsr_tile_rows). Contracts below; drivers in kernels_impl.h; edge tester:
// tests/cpp/ukernel_test.cpp.
#pragma once

#include <cstdint>

#include "cpu/simd.h"

namespace sparsekit {
namespace cpu {
namespace {

// Contract (N = 1, one block row). Computes out[i] = sum_{b in [s, e)} sum_{j < c}
// to_f32(val[(b * r + i) * c + j]) * xs[idx[b] * c + j] for i < rows, in fp32, overwriting out.
// Sizes: r x c blocks with c = CC when CC > 0 (then CC == c_rt; the driver instantiates 1, 2, 4,
// 8, 16) or c = c_rt when CC = 0; 1 <= rows <= r (the last block row of a matrix whose M is not a
// multiple of r passes the rows it has); any block count e - s >= 0. Layout: each block's r * c
// values row-major, blocks consecutive; xs is x in fp32, zero-padded to whole blocks; acc is
// caller scratch of rows * c fp32; out holds rows fp32. Alignment: none. Assumes:
// idx[b] * c + c <= the length of xs; the values of ragged right-edge blocks beyond K are zero
// (format contract) and so is xs there, so there are no edge tests. Reads value rows < rows only.
// No allocation, no state. Cost: O((e - s) * rows * c) multiply-adds; acc keeps one partial sum
// per (row, column) so the inner loop is a contiguous, vectorisable multiply-add, reduced once per
// block row.
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

#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
// The block shapes bsr_spmv_blockrow_vec takes: r x CC blocks of NV vectors with CC = 4, 8 or 16
// at most 2W (x then takes CC / W vectors, which must divide NV) and NV <= 8. Eight accumulators
// leave room for x in 16 ymm; on AVX-512, 16 (16x16 blocks) fit too but measured 10-20% slower
// than bsr_spmv_blockrow (the 256-lane reduction per block row; docs/kernels.md, Zen 4).
template <int CC, int NV>
constexpr bool bsr_blockrow_vec_takes() {
  constexpr int W = Vec::W;
  return (CC == 4 || CC == 8 || CC == 16) && (CC <= W || CC == 2 * W) && NV >= 1 && NV <= 8 &&
         NV % (CC > W ? CC / W : 1) == 0;
}

// Contract (N = 1, one full block row, blocks of NV whole vectors: bsr_spmv_blockrow_vec).
// Computes out[i] = sum_{b in [s, e)} sum_{j < CC} to_f32(val[(b * r + i) * CC + j]) *
// xs[idx[b] * CC + j] for i < r, in fp32, overwriting out. Sizes: r x CC blocks with
// r * CC = NV * W, CC = 4, 8 or 16 and CC <= W or CC = 2W (then x takes two vectors); any block
// count e - s >= 0. Layout: as bsr_spmv_blockrow; out holds r fp32. Alignment: none. Assumes:
// idx[b] * CC + CC <= the length of xs. Reads all r value rows of every block, so the driver
// passes only full block rows (the ragged last one goes to bsr_spmv_blockrow). No allocation,
// no state. Cost: O((e - s) * NV) vector multiply-adds: each block is NV vectors multiplied by
// x's CC columns repeated across the lanes, into NV accumulators kept in registers, reduced to
// the r row sums once per block row. bsr_spmv_blockrow instead adds each block row into an
// r x c array in L1, which for c = 4 is a read-modify-write of 4 lanes per block row.
template <int CC, int NV, class VT, class IT>
inline void bsr_spmv_blockrow_vec(const IT* idx, const VT* val, int64_t s, int64_t e,
                                  const float* xs, float* out) {
  constexpr int W = Vec::W;
  static_assert(bsr_blockrow_vec_takes<CC, NV>(), "bsr_spmv_blockrow_vec: unsupported shape");
  constexpr int kXv = CC > W ? CC / W : 1;  // x vectors per block column range
  constexpr int kBlock = NV * W;             // values per block
  constexpr int R = kBlock / CC;
  // Blocks of fewer than 4 vectors take turns over U sets of accumulators, so at least 4
  // multiply-add chains hide the FMA latency.
  constexpr int U = NV >= 4 ? 1 : 4 / NV;
  typename Vec::T acc[U][NV];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < NV; ++v) acc[u][v] = Vec::zero();
  auto block = [&](int64_t b, typename Vec::T* a) {
    const VT* B = val + b * kBlock;
    const float* xb = xs + idx_of(idx[b]) * CC;
    typename Vec::T xv[kXv];
    if constexpr (CC > W)
      for (int k = 0; k < kXv; ++k) xv[k] = Vec::load(xb + k * W);
    else
      xv[0] = Vec::template load_tiled<CC>(xb);
    for (int v = 0; v < NV; ++v) a[v] = Vec::fma(Vec::load_vals(B + v * W), xv[v % kXv], a[v]);
  };
  int64_t b = s;
  for (; b + U <= e; b += U)
    for (int u = 0; u < U; ++u) block(b + u, acc[u]);
  for (; b < e; ++b) block(b, acc[0]);
  for (int u = 1; u < U; ++u)
    for (int v = 0; v < NV; ++v) acc[0][v] = Vec::add(acc[0][v], acc[u][v]);
  float lanes[kBlock];
  for (int v = 0; v < NV; ++v) Vec::store(lanes + v * W, acc[0][v]);
  for (int i = 0; i < R; ++i) {
    float sum = 0.f;
    for (int j = 0; j < CC; ++j) sum += lanes[i * CC + j];
    out[i] = sum;
  }
}
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SPARSEKIT_NOINLINE __attribute__((noinline))
#else
#define SPARSEKIT_NOINLINE
#endif
// bsr_tile_rows is not inlined. Inlined into the driver's switch over every register block and
// set count, its 2 x 2 path ran 1.1-1.27x slower on the AVX-512 build than the same code as a
// function of its own; as its own function the AVX2 build's 4 x 4 and 8 x 8 paths at N = 8 ran
// 1.15-1.23x faster than inlined before (Intel 6/167, docs/kernels.md). One call per block group
// and register block costs nothing measurable.

// Contract (N > 1, one register block). Computes, for i < RB and t < NT = V * W,
// out[i * NT + t] = (out[i * NT + t] with accumulate, else 0) + sum_{b in [s, e)} sum_{j < c}
// to_f32(val[(b * r + i0 + i) * c + j]) * xt[(idx[b] * c + j) * NT + t], in fp32. Sizes: r x c
// blocks, i0 + RB <= r (RB = 1, 2, 4 or 8, see max_rb), V = 1, 2 or 4, KU = 1, 2, 4 or 8, any
// block count e - s >= 0. Layout: blocks row-major as above; xt is one packed tile (packing.h
// pack_x_tile) of whole block columns (row k holds NT batch columns, contiguous fp32, zero rows
// beyond K); out is RB rows of NT fp32. Alignment: none. Assumes: (idx[b] + 1) * c <= the rows of
// xt; ragged right-edge blocks are zero-padded (format contract). Reads value rows [i0, i0 + RB)
// only. No allocation, no state. Cost: O((e - s) * c * RB * V) vector multiply-adds; KU x RB x V
// accumulators (KU sets taking consecutive blocks in turn, summed at the end, so a small register
// block still has enough independent multiply-add chains to cover the FMA latency; see
// bsr_block_unroll), and each loaded xt vector is used RB times, so KU * RB * V + V registers
// must fit the register file. Prefetch: one pf.step() per block, so the caller's L2 prefetches
// of data for later calls (the driver: the next block group's values) run spread over this call's
// multiply-adds; pf holds the trickle's position on return.
template <int RB, int V, int KU = 1, class VT, class IT>
SPARSEKIT_NOINLINE void bsr_tile_rows(const IT* idx, const VT* val, int64_t s, int64_t e, int r,
                                      int c, int i0, const float* xt, float* out, bool accumulate,
                                      L2Trickle& pf) {
  constexpr int W = Vec::W;
  constexpr int NT = V * W;
  typename Vec::T acc[KU][RB][V];
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < V; ++v) {
      acc[0][i][v] = accumulate ? Vec::load(out + i * NT + v * W) : Vec::zero();
      for (int u = 1; u < KU; ++u) acc[u][i][v] = Vec::zero();
    }
  const int64_t bsz = static_cast<int64_t>(r) * c;
  L2Trickle trickle = pf;  // a local copy stays in registers
  int64_t b = s;
  const int64_t e_sets = s + (e - s) / KU * KU;  // blocks taken by the sets in turn
  for (; b < e_sets; b += KU)
    for (int u = 0; u < KU; ++u) {
      trickle.step();
      const VT* B = val + (b + u) * bsz + static_cast<int64_t>(i0) * c;
      const float* xb = xt + idx_of(idx[b + u]) * c * NT;
      for (int j = 0; j < c; ++j) {
        typename Vec::T xv[V];
        for (int v = 0; v < V; ++v) xv[v] = Vec::load(xb + j * NT + v * W);
        for (int i = 0; i < RB; ++i) {
          const typename Vec::T w = Vec::set1(to_f32(B[i * c + j]));
          for (int v = 0; v < V; ++v) acc[u][i][v] = Vec::fma(w, xv[v], acc[u][i][v]);
        }
      }
    }
  for (int u = 1; u < KU; ++u)
    for (int i = 0; i < RB; ++i)
      for (int v = 0; v < V; ++v) acc[0][i][v] = Vec::add(acc[0][i][v], acc[u][i][v]);
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < V; ++v) Vec::store(out + i * NT + v * W, acc[0][i][v]);
  pf = trickle;
  // the last (e - s) % KU blocks: one set, continuing from out
  if constexpr (KU > 1)
    if (b < e) bsr_tile_rows<RB, V, 1>(idx, val, b, e, r, c, i0, xt, out, true, pf);
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

// Accumulator sets of bsr_tile_rows for an RB x V register block. One-vector tiles (N <= W) give
// only RB multiply-add chains per set, too few to cover the FMA latency for small blocks. On the
// Intel 6/167 (2 threads, 4096 x 4096 at 90%, N = 4-16, old and new alternating in one process;
// docs/kernels.md), blocks taken in turn by several sets ran: 1 x 16 and 1 x 8 (RB = 1, 8 sets)
// 1.17-1.35x faster on both builds; 2 x 2 (RB = 2, 4 sets) 1.5-1.6x faster on AVX2 but 1.3-1.6x
// slower on AVX-512; 4 x 4 (RB = 4, 2 sets) 1.2-1.3x faster on AVX-512, no faster on AVX2 (where
// the broadcast loads bound it). Wider tiles and 8-row blocks keep one set.
template <int RB, int V>
constexpr int bsr_block_unroll() {
  if (V != 1 || RB >= 8) return 1;
  if (RB == 1) return 8;
#if defined(SPARSEKIT_ISA_AVX512)
  return RB == 4 ? 2 : 1;
#else
  return RB == 2 ? 4 : 1;
#endif
}

// The register block the driver takes for the next `rem` rows of a block row: the largest of
// 8, 4, 2, 1 that fits both `rem` and RBM (= max_rb<V>()).
template <int RBM>
constexpr int next_rb(int rem) {
  return RBM >= 8 && rem >= 8 ? 8 : RBM >= 4 && rem >= 4 ? 4 : rem >= 2 ? 2 : 1;
}

}  // namespace
}  // namespace cpu
}  // namespace sparsekit
