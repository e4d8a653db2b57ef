// CSR / BSR SpMM drivers (partitioning, threads, tile and block loops), written once against
// the Vec wrapper of csrc/cpu/simd.h and compiled once per ISA
// (csrc/cpu/{csr,bsr}_{generic,avx2,avx512}.cpp). Micro-kernels: ukernel_csr_spmv.h,
// ukernel_csr_tile.h, ukernel_bsr.h; packing: packing.h; threading: threading.h; variants:
// variants.h. Internal linkage throughout; each TU exports only its entry points.
//
// Strategy (y (N, M) = x (N, K) @ W^T + bias, fp32 accumulation):
//  * Threads own nnz-balanced contiguous row ranges (binary search in indptr, a small per-row
//    cost added so many short rows are balanced too). No shared scratch is written after the
//    packing barrier, no global state; every buffer is allocated per call.
//  * N <= 2 (SpMV, memory bound): one pass over (indices, values) for all vectors; CSR runs
//    one of the SpMV micro-kernel variants (hardware gather, gather-free assembly, scalar),
//    chosen by the caller through SpmmParams::variant (variants.h).
//  * N > 1: x is packed per call, transposed and converted to fp32, into tiles
//    xt[tile][k][0..NT) (NT = V * W batch columns, zero-padded), so that one nonzero w_mk
//    updates NT outputs with V broadcast-FMAs from one contiguous row of xt.
//      - Narrow tiles (xt in L2): rows are walked in chunks small enough for their weights to
//        stay in L2 while every tile is applied, so the weights stream from memory once. Each
//        thread packs its own copy of the tiles when they fit the tile budget.
//      - 64-wide CSR tiles and BSR: one tile at a time (the weights stream once per tile), K
//        walked in L1-sized blocks with fp32 partial sums (csr_batch_rows_kb, bsr_batch_rows).
//    BSR uses an RB x V register-blocked micro-kernel that reuses each loaded xt vector for RB
//    block rows. Outputs are written batch-major in runs of at least 32 rows (store_rows_tile).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/dispatch.h"
#include "common/format.h"
#include "cpu/packing.h"
#include "cpu/spmm_cpu.h"  // Probe
#include "cpu/simd.h"
#include "cpu/threading.h"
#include "cpu/ukernel_bsr.h"
#include "cpu/ukernel_csr_spmv.h"
#include "cpu/ukernel_csr_tile.h"
#include "cpu/variants.h"

namespace sparsekit {
namespace cpu {
namespace {

// Batch tile width (in vectors) for N > 1: as wide as the batch needs (<= vmax vectors, at most
// 8) while one packed tile (kpad x NT fp32) stays within ~1.5 MiB of L2.
#ifndef SPARSEKIT_TILE_BYTES
#define SPARSEKIT_TILE_BYTES (3 << 19)  // xt tile budget (bytes) for N > 1
#endif
constexpr int64_t kTileBytes = SPARSEKIT_TILE_BYTES;
inline int choose_v(int64_t N, int64_t kpad, int vmax = 4) {
  const int64_t W = Vec::W;
  int v = N > 4 * W ? 8 : (N > 2 * W ? 4 : (N > W ? 2 : 1));
  while (v > vmax) v /= 2;
  while (v > 1 && kpad * v * W * 4 > kTileBytes) v /= 2;
  return v;
}

// ============================================================================================
// CSR
// ============================================================================================

// Largest batch run by indexing x per vector (csr_spmv_rows) instead of packed tiles: each extra
// vector costs a full indexed load of x per nonzero, so beyond N = 2 the packed tiles win
// (measurements: docs/kernels.md, "Design measurements").
constexpr int64_t kMaxGatherBatch = 2;

// Driver for N <= 2: rows [r0, r1), y[n][m] = act(row_m . x_n + bias[m]) with one SpMV micro-kernel
// (ukernel_csr_spmv.h) chosen by `variant`; x is fp32 with row stride ldx. The weights are read
// once for all NB vectors. O(NB * nnz in range).
template <int NB, class VT, class PT, class IT>
void csr_spmv_rows(const SpmmParams& p, Variant variant, const float* x, int64_t ldx, int64_t r0,
                   int64_t r1) {
  const PT* indptr = static_cast<const PT*>(p.indptr);
  const IT* idx = static_cast<const IT*>(p.indices);
  const VT* val = static_cast<const VT*>(p.values);
  // row_dot(m, sums) adds row m's dot products with the NB vectors to sums
  auto each_row = [&](auto&& row_dot) {
    for (int64_t m = r0; m < r1; ++m) {
      float sums[NB];
      for (int n = 0; n < NB; ++n) sums[n] = 0.f;
      row_dot(m, sums);
      const float b = bias_at(p.bias, m);
      for (int n = 0; n < NB; ++n)
        store_out(p.y, n * p.ldy + m, activate(sums[n] + b, p.activation), p.x_dtype);
    }
  };
  if (variant == Variant::CsrSpmvBitmap) {
    // occupancy words instead of the index array (SpmmParams::bitmap; the binding builds them)
    const int64_t nw = (p.K + 63) / 64;
    const VT* val_end = val + static_cast<int64_t>(indptr[p.M]);
    return each_row([&](int64_t m, float* sums) {
      spmv_bitmap<NB>(p.bitmap + m * nw, p.K, val + static_cast<int64_t>(indptr[m]), val_end, x,
                      ldx, sums);
    });
  }
  auto rows = [&](auto&& ukernel) {
    each_row([&](int64_t m, float* sums) {
      ukernel(idx, val, static_cast<int64_t>(indptr[m]), static_cast<int64_t>(indptr[m + 1]), x,
              ldx, sums);
    });
  };
#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
  switch (variant) {
    case Variant::CsrSpmvScalar: return rows([](auto... a) { spmv_scalar<NB>(a...); });
    case Variant::CsrSpmvAssemble: return rows([](auto... a) { spmv_assemble<NB>(a...); });
    case Variant::CsrSpmvGather4: return rows([](auto... a) { spmv_gather<4, NB>(a...); });
    default: return rows([](auto... a) { spmv_gather<2, NB>(a...); });
  }
#else
  (void)variant;
  rows([](auto... a) { spmv_scalar<NB>(a...); });
#endif
}

template <int V, class VT, class PT, class IT>
void csr_batch_rows(const SpmmParams& p, const float* xt_all, int64_t kpad, int64_t r0,
                    int64_t r1) {
  constexpr int NT = V * Vec::W;
  constexpr int64_t kChunkNnz = 8192;  // ~48-64 KiB of weights: stays in L2 across tiles
  const PT* indptr = static_cast<const PT*>(p.indptr);
  const IT* idx = static_cast<const IT*>(p.indices);
  const VT* val = static_cast<const VT*>(p.values);
  const int64_t ntiles = (p.N + NT - 1) / NT;
  // Row results are collected kOutRows at a time and written batch-major (store_rows_tile).
  Scratch out(static_cast<size_t>(kOutRows * NT));
  Scratch tbuf(static_cast<size_t>(kOutRows * NT));
  int64_t c0 = r0;
  while (c0 < r1) {
    int64_t c1 = c0 + 1;
    const int64_t lim = static_cast<int64_t>(indptr[c0]) + kChunkNnz;
    while (c1 < r1 && static_cast<int64_t>(indptr[c1 + 1]) <= lim && c1 - c0 < 256) ++c1;
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const float* xt = xt_all + tile * kpad * NT;
      const int64_t n0 = tile * NT;
      const int64_t nn = imin(NT, p.N - n0);
      for (int64_t f0 = c0; f0 < c1; f0 += kOutRows) {
        const int64_t f1 = imin(c1, f0 + kOutRows);
        for (int64_t m = f0; m < f1; ++m)
          csr_row_tile<V>(idx, val, static_cast<int64_t>(indptr[m]),
                          static_cast<int64_t>(indptr[m + 1]), xt, out.p + (m - f0) * NT);
        store_rows_tile(p, out.p, NT, f1 - f0, nn, n0, f0, tbuf.p);
      }
    }
    c0 = c1;
  }
}

// K-blocked walk for wide tiles (V = 4: 64 batch columns, 4 cache lines per xt row) whose
// packed tile is far beyond L1. Rows are taken kb_chunk_rows() at a time; for each block of kb
// xt rows (kL1Tile bytes, L1-resident) every row of the chunk continues from its cursor into its
// sorted indices while the column stays below the block end, adding into an fp32 partial-sum
// tile. Each nonzero then reads its xt row from L1 instead of L2 (measurements:
// docs/kernels.md, "Design measurements"). Cost per (row, block) visit: one mispredicted loop
// exit and a partial-sum load/store; the cursor test is fused into the multiply loop
// (csr_row_tile<V, true>). The batch tile is the outer loop, so the weights stream once per
// tile: keeping several 1 MiB tiles hot spills L2. Same flops; O(rows per chunk * NT) scratch
// per thread.
constexpr int64_t kL1Tile = 48 * 1024;

// Rows per chunk of the K-blocked walk: about kKbChunkDensityRows / density, within [32, 1024].
// Each chunk brings the whole xt tile from L2 into L1 once (block by block) and uses each block
// for the chunk's nonzeros in it, about rows * density * kb of them, so sparser matrices need
// more rows for the same reuse. The partial-sum tile (rows * NT floats: at most 256 KiB at
// NT = 64, 512 KiB at NT = 128) stays in L2. 32 rows at every density took 1.12-1.35x the time
// at 80-95% with 2 threads (N = 128, both ISA builds), the same at 50% or on 1 thread
// (docs/kernels.md).
constexpr int64_t kKbChunkDensityRows = 32;
constexpr int64_t kKbChunkMaxRows = 1024;
inline int64_t kb_chunk_rows(int64_t nnz, int64_t M, int64_t K) {
  return imax(32, imin(kKbChunkMaxRows, kKbChunkDensityRows * M * K / imax(1, nnz)));
}

template <int V, class VT, class PT, class IT>
void csr_batch_rows_kb(const SpmmParams& p, const float* xt_all, int64_t r0, int64_t r1) {
  constexpr int NT = V * Vec::W;
  const int64_t kb = imax(16, kL1Tile / (NT * 4));
  const PT* indptr = static_cast<const PT*>(p.indptr);
  const IT* idx = static_cast<const IT*>(p.indices);
  const VT* val = static_cast<const VT*>(p.values);
  const int64_t ntiles = (p.N + NT - 1) / NT;
  const int64_t rows = kb_chunk_rows(static_cast<int64_t>(indptr[p.M]), p.M, p.K);
  Scratch acc(static_cast<size_t>(rows * NT));
  Scratch tbuf(static_cast<size_t>(rows * NT));
  ScratchOf<int64_t> cur(static_cast<size_t>(rows));
  for (int64_t tile = 0; tile < ntiles; ++tile) {
    const float* xt = xt_all + tile * p.K * NT;
    const int64_t n0 = tile * NT;
    const int64_t nn = imin(NT, p.N - n0);
    for (int64_t c0 = r0; c0 < r1; c0 += rows) {
      const int64_t c1 = imin(r1, c0 + rows);
      for (int64_t m = c0; m < c1; ++m) cur.p[m - c0] = static_cast<int64_t>(indptr[m]);
      for (int64_t i = 0; i < (c1 - c0) * NT; ++i) acc.p[i] = 0.f;
      for (int64_t k0 = 0; k0 < p.K; k0 += kb) {
        const int64_t kend = k0 + kb;
        for (int64_t m = c0; m < c1; ++m) {
          const int64_t j = cur.p[m - c0];
          const int64_t e = static_cast<int64_t>(indptr[m + 1]);
          if (j >= e || idx_of(idx[j]) >= kend) continue;
          float* a = acc.p + (m - c0) * NT;
          cur.p[m - c0] = csr_row_tile<V, true>(idx, val, j, e, xt, a, a, kend);
        }
      }
      store_rows_tile(p, acc.p, NT, c1 - c0, nn, n0, c0, tbuf.p);
    }
  }
}

// Rows per RowChunks chunk of the N <= 2 drivers: about kSpmvChunkCost (nnz + kRowCost per
// row), a few microseconds each, so the cores finish within one chunk of each other
// (threading.h, RowChunks).
inline int64_t spmv_rows_per_chunk(int64_t nnz, int64_t rows) {
  constexpr int64_t kSpmvChunkCost = 8192;
  return imax(1, kSpmvChunkCost * rows / imax(1, nnz + kRowCost * rows));
}

// Probe driver (benchmarks: the floors of the N = 1 SpMV in the same run), over the same threads
// and row chunks as the N = 1 driver; y is fp32 whatever x_dtype says (M entries, ldy ignored).
// Probe::Read: y[m] = row_read_probe(row m) as an fp32 integer, O(bytes of the rows).
// Probe::Gather / Probe::Assemble: y[m] = row_gather_probe<false / true>(row m) over x (fp32, K
// entries, p.x; x_dtype ignored), O(nnz) indexed loads.
template <class VT, class PT, class IT>
void csr_probe_t(const SpmmParams& p, Probe kind) {
  const PT* indptr = static_cast<const PT*>(p.indptr);
  const IT* idx = static_cast<const IT*>(p.indices);
  const VT* val = static_cast<const VT*>(p.values);
  float* y = static_cast<float*>(p.y);
  const int64_t nnz = static_cast<int64_t>(indptr[p.M]);
  const float* x = static_cast<const float*>(p.x);
  const int threads = threads_for(p.num_threads, nnz + p.M);
  parallel_row_chunks(threads, indptr, p.M, spmv_rows_per_chunk(nnz, p.M),
                      [&](int64_t r0, int64_t r1) {
                        for (int64_t m = r0; m < r1; ++m) {
                          const int64_t j = static_cast<int64_t>(indptr[m]);
                          const int64_t e = static_cast<int64_t>(indptr[m + 1]);
                          switch (kind) {
                            case Probe::Read:
                              y[m] = static_cast<float>(row_read_probe(idx, val, j, e));
                              break;
                            case Probe::Gather: y[m] = row_gather_probe<false>(idx, j, e, x); break;
                            case Probe::Assemble: y[m] = row_gather_probe<true>(idx, j, e, x); break;
                          }
                        }
                      });
}

// Packed x per thread (csr_linear_t without the K-blocked walk, bsr_linear_t at N > 1). There
// every multiply-add reads its xt row from L2 at random, and with one packed copy read by both
// cores the call ran up to 1.6x the time on the Intel 6/167 (CSR N = 4-32: 0.97-1.59x, mostly
// 1.1-1.25x; BSR N = 4-64 with 1 x 16 to 4 x 4 blocks: 1.02-1.34x, 8 x 8 and 16 x 16 0.99-1.05x;
// 2 threads, both ISA builds; docs/kernels.md), for one extra packing of x per thread. A thread
// then packs all of x instead of 1/threads of it, so this is kept to calls where the tiles fit
// the tile budget, the copies stay within kOwnTilesBytes together and each thread has at least
// kOwnTilesMinNnzPerColumn multiply-adds per column of x it packs (many-core calls keep the
// shared copy; only 2 threads were measured). `work` counts the matrix's stored values.
constexpr int64_t kOwnTilesBytes = 8 << 20;
constexpr int64_t kOwnTilesMinNnzPerColumn = 16;
inline bool own_x_tiles(int threads, int64_t xt_floats, int64_t K, int64_t work) {
  return threads > 1 && xt_floats * 4 <= kTileBytes && threads * xt_floats * 4 <= kOwnTilesBytes &&
         threads * K * kOwnTilesMinNnzPerColumn <= work;
}

template <class VT, class PT, class IT>
void csr_linear_t(const SpmmParams& p) {
  const PT* indptr = static_cast<const PT*>(p.indptr);
  const int64_t nnz = static_cast<int64_t>(indptr[p.M]);
  if (p.N <= kMaxGatherBatch) {
    // 1-2 vectors: weights read once, x gathered per vector (see csr_spmv_rows).
    if (p.variant == static_cast<int>(Variant::CsrSpmvBitmap) && p.bitmap == nullptr)
      throw std::invalid_argument("sparsekit: the csr_spmv_bitmap variant needs the bitmap");
    const int threads = threads_for(p.num_threads, (nnz + p.M) * p.N);
    const XRowsF32 xr(p);
    const float* x = xr.x;
    const int64_t ldx = xr.ldx;
    const Variant v = static_cast<Variant>(p.variant);
    auto rows = [&](int64_t r0, int64_t r1) {
      static_assert(kMaxGatherBatch == 2, "instantiate csr_spmv_rows for each gathered batch");
      if (p.N == 1) csr_spmv_rows<1, VT, PT, IT>(p, v, x, ldx, r0, r1);
      else csr_spmv_rows<2, VT, PT, IT>(p, v, x, ldx, r0, r1);
    };
    return parallel_row_chunks(threads, indptr, p.M, spmv_rows_per_chunk(nnz, p.M), rows);
  }
  const Variant variant = static_cast<Variant>(p.variant);
  int vmax = 4;
  if (variant == Variant::CsrTileV8) vmax = 8;
  if (variant == Variant::CsrTileV2) vmax = 2;
  if (variant == Variant::CsrTileV1) vmax = 1;
  const int V = choose_v(p.N, p.K, vmax);
  const int64_t NT = V * Vec::W;
  const int64_t ntiles = (p.N + NT - 1) / NT;
  const int64_t xt_floats = ntiles * p.K * NT;
  const int threads = threads_for(p.num_threads, (nnz + p.M) * p.N + p.N * p.K);
  // Wide tiles (>= 64 batch columns, >= 4 lines per xt row) far beyond L1: K-blocked walk.
  // For narrower tiles the per-visit overhead measured higher than the L2 traffic it saves.
  const bool kb_walk = NT >= 64 && p.K * NT * 4 > 2 * kL1Tile;
  // Without the K-blocked walk each thread packs x into tiles of its own where that pays
  // (own_x_tiles); the walk keeps the shared copy (own copies measured 0.92-0.97x there).
  const bool own_tiles = !kb_walk && own_x_tiles(threads, xt_floats, p.K, nnz);
  // allocated here: an exception must not leave the parallel region
  Scratch xt_all(static_cast<size_t>(own_tiles ? threads * xt_floats : xt_floats));
  parallel_run(threads, [&](int tid, int nt) {
    float* xt = xt_all.p + (own_tiles ? tid * xt_floats : 0);
    const int64_t k0 = own_tiles ? 0 : p.K * tid / nt, k1 = own_tiles ? p.K : p.K * (tid + 1) / nt;
    for (int64_t tile = 0; tile < ntiles; ++tile)
      pack_x_tile(p, xt + tile * p.K * NT, static_cast<int>(NT), tile * NT, k0, k1);
    if (!own_tiles) barrier(nt);
    const int64_t r0 = split_point(indptr, p.M, tid, nt), r1 = split_point(indptr, p.M, tid + 1, nt);
    if (kb_walk) {
      if (V == 8) csr_batch_rows_kb<8, VT, PT, IT>(p, xt, r0, r1);
      else csr_batch_rows_kb<4, VT, PT, IT>(p, xt, r0, r1);
      return;
    }
    switch (V) {
      case 8: csr_batch_rows<8, VT, PT, IT>(p, xt, p.K, r0, r1); break;
      case 4: csr_batch_rows<4, VT, PT, IT>(p, xt, p.K, r0, r1); break;
      case 2: csr_batch_rows<2, VT, PT, IT>(p, xt, p.K, r0, r1); break;
      default: csr_batch_rows<1, VT, PT, IT>(p, xt, p.K, r0, r1); break;
    }
  });
}

// ============================================================================================
// BSR
// ============================================================================================

// N > 1 for block rows [br0, br1). The batch tile is the outer loop (one 1 MiB tile hot in L2
// instead of all of them; the weights stream once per tile). Within a block row the blocks are
// taken in groups whose xt rows fit in L1 (kL1Tile bytes); every register block of rows runs
// over one group, adding into an fp32 partial-sum tile (r x NT, L1), so the xt rows of a group
// are read from L2 once instead of once per register block (measurements: docs/kernels.md,
// "Design measurements").
template <int V, class VT, class PT, class IT>
void bsr_batch_rows(const SpmmParams& p, const float* xt_all, int64_t kpad, int64_t br0,
                    int64_t br1) {
  constexpr int NT = V * Vec::W;
  constexpr int RBM = max_rb<V>();
  const PT* indptr = static_cast<const PT*>(p.indptr);
  const IT* idx = static_cast<const IT*>(p.indices);
  const VT* val = static_cast<const VT*>(p.values);
  const int r = p.block_r, c = p.block_c;
  const int64_t ntiles = (p.N + NT - 1) / NT;
  const int64_t group = imax(1, kL1Tile / (static_cast<int64_t>(c) * NT * 4));  // blocks
  const int64_t bsz = static_cast<int64_t>(r) * c;
  const int64_t nnzb = static_cast<int64_t>(indptr[(p.M + r - 1) / r]);
  // Block rows per output flush: >= kOutRows rows, so each y row gets whole cache lines.
  const int64_t flush_brs = imax(1, (kOutRows + r - 1) / r);
  Scratch part(static_cast<size_t>(flush_brs * r * NT));
  Scratch tbuf(static_cast<size_t>(flush_brs * r * NT));
  for (int64_t tile = 0; tile < ntiles; ++tile) {
    const float* xt = xt_all + tile * kpad * NT;
    const int64_t n0 = tile * NT;
    const int64_t nn = imin(NT, p.N - n0);
    for (int64_t f0 = br0; f0 < br1; f0 += flush_brs) {
      const int64_t f1 = imin(br1, f0 + flush_brs);
      for (int64_t br = f0; br < f1; ++br) {
        const int64_t s = static_cast<int64_t>(indptr[br]), e = static_cast<int64_t>(indptr[br + 1]);
        const int rows = static_cast<int>(imin(r, p.M - br * r));  // ragged bottom edge
        int64_t rb_calls = 0;  // register blocks per block group
        for (int i0 = 0; i0 < rows; i0 += next_rb<RBM>(rows - i0)) ++rb_calls;
        float* pr = part.p + (br - f0) * r * NT;
        if (s == e)
          for (int64_t i = 0; i < static_cast<int64_t>(rows) * NT; ++i) pr[i] = 0.f;
        for (int64_t gs = s; gs < e; gs += group) {
          const int64_t ge = imin(e, gs + group);
          const bool acc = gs > s;
          // The weights arrive from memory once per tile; fetch the next group's values into
          // L2 while this group computes (the hardware streamers alone leave a cold/warm gap),
          // a few lines per block over all of this group's register blocks.
          const int64_t next_blocks = imax(0, imin(group, nnzb - ge));
          L2Trickle pf(val + ge * bsz, next_blocks * bsz * static_cast<int64_t>(sizeof(VT)),
                       (ge - gs) * rb_calls);
          for (int i0 = 0; i0 < rows;) {
            float* out = pr + static_cast<int64_t>(i0) * NT;
            const int rb = next_rb<RBM>(rows - i0);
            constexpr int kRb8 = RBM >= 8 ? 8 : 1, kRb4 = RBM >= 4 ? 4 : 1;
            // bsr_block_unroll: accumulator sets by register block (ukernel_bsr.h)
            constexpr int kU8 = bsr_block_unroll<kRb8, V>(), kU4 = bsr_block_unroll<kRb4, V>();
            constexpr int kU2 = bsr_block_unroll<2, V>(), kU1 = bsr_block_unroll<1, V>();
            switch (rb) {
              case 8:
                bsr_tile_rows<kRb8, V, kU8>(idx, val, gs, ge, r, c, i0, xt, out, acc, pf);
                break;
              case 4:
                bsr_tile_rows<kRb4, V, kU4>(idx, val, gs, ge, r, c, i0, xt, out, acc, pf);
                break;
              case 2: bsr_tile_rows<2, V, kU2>(idx, val, gs, ge, r, c, i0, xt, out, acc, pf); break;
              default:
                bsr_tile_rows<1, V, kU1>(idx, val, gs, ge, r, c, i0, xt, out, acc, pf);
                break;
            }
            i0 += rb;
          }
        }
      }
      const int64_t m0 = f0 * r;
      store_rows_tile(p, part.p, NT, imin(p.M, f1 * r) - m0, nn, n0, m0, tbuf.p);
    }
  }
}

#ifndef SPARSEKIT_BSR_VMAX
#define SPARSEKIT_BSR_VMAX 4  // cap on the batch tile width (vectors) for BSR
#endif
// bsr_spmv_blockrow_vec<CC, NV> where it takes that shape (bsr_blockrow_vec_takes); false
// otherwise.
template <int CC, int NV, class VT, class IT>
bool bsr_blockrow_vec_if(const IT* idx, const VT* val, int64_t s, int64_t e, const float* xs,
                         float* out) {
#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
  if constexpr (bsr_blockrow_vec_takes<CC, NV>()) {
    bsr_spmv_blockrow_vec<CC, NV>(idx, val, s, e, xs, out);
    return true;
  }
#endif
  (void)idx, (void)val, (void)s, (void)e, (void)xs, (void)out;
  return false;
}
template <int CC, class VT, class IT>
bool bsr_blockrow_vec_nv(int64_t nv, const IT* idx, const VT* val, int64_t s, int64_t e,
                         const float* xs, float* out) {
  switch (nv) {
    case 1: return bsr_blockrow_vec_if<CC, 1>(idx, val, s, e, xs, out);
    case 2: return bsr_blockrow_vec_if<CC, 2>(idx, val, s, e, xs, out);
    case 4: return bsr_blockrow_vec_if<CC, 4>(idx, val, s, e, xs, out);
    case 8: return bsr_blockrow_vec_if<CC, 8>(idx, val, s, e, xs, out);
    default: return false;
  }
}
// One full block row at N = 1 with its blocks in registers (bsr_spmv_blockrow_vec) when the
// r x c shape allows it (c = 4, 8 or 16 and r * c 1, 2, 4 or 8 vectors: 4x4, 8x8, 1x8, 2x8,
// 1x16 on AVX2, 4x4, 8x8, 2x8, 1x16 on AVX-512, among others); returns false, having computed
// nothing, for other shapes and in the generic build.
template <class VT, class IT>
bool bsr_blockrow_in_registers(int r, int c, const IT* idx, const VT* val, int64_t s, int64_t e,
                               const float* xs, float* out) {
  const int64_t values = static_cast<int64_t>(r) * c;
  if (values % Vec::W != 0) return false;
  const int64_t nv = values / Vec::W;
  switch (c) {
    case 4: return bsr_blockrow_vec_nv<4>(nv, idx, val, s, e, xs, out);
    case 8: return bsr_blockrow_vec_nv<8>(nv, idx, val, s, e, xs, out);
    case 16: return bsr_blockrow_vec_nv<16>(nv, idx, val, s, e, xs, out);
    default: return false;
  }
}

template <class VT, class PT, class IT>
void bsr_linear_t(const SpmmParams& p) {
  const PT* indptr = static_cast<const PT*>(p.indptr);
  const int r = p.block_r, c = p.block_c;
  const int64_t Mb = (p.M + r - 1) / r, Kb = (p.K + c - 1) / c;
  const int64_t kpad = Kb * c;  // x is zero-padded to whole blocks: no edge tests in kernels
  const int64_t nnzb = static_cast<int64_t>(indptr[Mb]);
  const int64_t work_per_n = nnzb * r * c + p.M;
  const IT* idx = static_cast<const IT*>(p.indices);
  const VT* val = static_cast<const VT*>(p.values);
  if (p.N == 1) {
    Scratch xs(static_cast<size_t>(kpad));
    load_x_row(p, 0, xs.p, kpad, 0, kpad);
    const int threads = threads_for(p.num_threads, work_per_n);
    parallel_run(threads, [&](int tid, int nt) {
      Scratch acc(static_cast<size_t>(r) * c);
      Scratch out(static_cast<size_t>(r));
      const int64_t b0 = split_point(indptr, Mb, tid, nt), b1 = split_point(indptr, Mb, tid + 1, nt);
      for (int64_t br = b0; br < b1; ++br) {
        const int64_t s = static_cast<int64_t>(indptr[br]), e = static_cast<int64_t>(indptr[br + 1]);
        const int rows = static_cast<int>(imin(r, p.M - br * r));
        const bool in_registers =
            rows == r && bsr_blockrow_in_registers(r, c, idx, val, s, e, xs.p, out.p);
        if (!in_registers) switch (c) {
          case 1: bsr_spmv_blockrow<1>(idx, val, s, e, r, c, rows, xs.p, acc.p, out.p); break;
          case 2: bsr_spmv_blockrow<2>(idx, val, s, e, r, c, rows, xs.p, acc.p, out.p); break;
          case 4: bsr_spmv_blockrow<4>(idx, val, s, e, r, c, rows, xs.p, acc.p, out.p); break;
          case 8: bsr_spmv_blockrow<8>(idx, val, s, e, r, c, rows, xs.p, acc.p, out.p); break;
          case 16: bsr_spmv_blockrow<16>(idx, val, s, e, r, c, rows, xs.p, acc.p, out.p); break;
          default: bsr_spmv_blockrow<0>(idx, val, s, e, r, c, rows, xs.p, acc.p, out.p); break;
        }
        for (int i = 0; i < rows; ++i) {
          const int64_t m = br * r + i;
          store_out(p.y, m, activate(out.p[i] + bias_at(p.bias, m), p.activation), p.x_dtype);
        }
      }
    });
    return;
  }
  // 8-lane ISAs (16 vector registers): with block rows to share each x load, 2-vector tiles and
  // 4-row register blocks beat 4-vector tiles and 2-row blocks; single-row blocks keep the wider
  // tile (measurements: docs/kernels.md, "Design measurements").
  const Variant variant = static_cast<Variant>(p.variant);
  int vmax = (Vec::W == 8 && r >= 2) ? imin(2, SPARSEKIT_BSR_VMAX) : SPARSEKIT_BSR_VMAX;
  if (variant == Variant::BsrTileV4) vmax = 4;
  if (variant == Variant::BsrTileV2) vmax = 2;
  if (variant == Variant::BsrTileV1) vmax = 1;
  const int V = imin(choose_v(p.N, kpad), vmax);
  const int64_t NT = V * Vec::W;
  const int64_t ntiles = (p.N + NT - 1) / NT;
  const int64_t xt_floats = ntiles * kpad * NT;
  const int threads = threads_for(p.num_threads, work_per_n * p.N + p.N * p.K);
  const bool own_tiles = own_x_tiles(threads, xt_floats, kpad, nnzb * r * c);
  // allocated here: an exception must not leave the parallel region
  Scratch xt_all(static_cast<size_t>(own_tiles ? threads * xt_floats : xt_floats));
  parallel_run(threads, [&](int tid, int nt) {
    float* xt = xt_all.p + (own_tiles ? tid * xt_floats : 0);
    const int64_t k0 = own_tiles ? 0 : kpad * tid / nt;
    const int64_t k1 = own_tiles ? kpad : kpad * (tid + 1) / nt;
    for (int64_t tile = 0; tile < ntiles; ++tile)
      pack_x_tile(p, xt + tile * kpad * NT, static_cast<int>(NT), tile * NT, k0, k1);
    if (!own_tiles) barrier(nt);
    const int64_t b0 = split_point(indptr, Mb, tid, nt), b1 = split_point(indptr, Mb, tid + 1, nt);
    switch (V) {
      case 4: bsr_batch_rows<4, VT, PT, IT>(p, xt, kpad, b0, b1); break;
      case 2: bsr_batch_rows<2, VT, PT, IT>(p, xt, kpad, b0, b1); break;
      default: bsr_batch_rows<1, VT, PT, IT>(p, xt, kpad, b0, b1); break;
    }
  });
}

// Zero nonzeros: y = bias broadcast (or 0). O(N * M).
inline bool handle_trivial(const SpmmParams& p) {
  if (p.N == 0 || p.M == 0) return true;
  return false;
}

}  // namespace
}  // namespace cpu
}  // namespace sparsekit

// Defines the exported entry points for this TU's ISA.
#define SPARSEKIT_DEFINE_CSR_ENTRY(NAME)                                              \
  namespace sparsekit { namespace cpu {                                              \
  void NAME(const SpmmParams& p) {                                                   \
    if (handle_trivial(p)) return;                                                   \
    SPARSEKIT_VALUE_SWITCH(p.value_dtype, VT, [&] {                                  \
      SPARSEKIT_INDEX_SWITCH(p.indptr_type, p.index_type, PT, IT,                    \
                             [&] { csr_linear_t<VT, PT, IT>(p); });                  \
    });                                                                              \
  } } }

#define SPARSEKIT_DEFINE_CSR_PROBE(NAME)                                              \
  namespace sparsekit { namespace cpu {                                              \
  void NAME(const SpmmParams& p, Probe kind) {                                       \
    if (p.M == 0) return;                                                            \
    SPARSEKIT_VALUE_SWITCH(p.value_dtype, VT, [&] {                                  \
      SPARSEKIT_INDEX_SWITCH(p.indptr_type, p.index_type, PT, IT,                    \
                             [&] { csr_probe_t<VT, PT, IT>(p, kind); });                  \
    });                                                                              \
  } } }

#define SPARSEKIT_DEFINE_BSR_ENTRY(NAME)                                              \
  namespace sparsekit { namespace cpu {                                              \
  void NAME(const SpmmParams& p) {                                                   \
    if (handle_trivial(p)) return;                                                   \
    SPARSEKIT_VALUE_SWITCH(p.value_dtype, VT, [&] {                                  \
      SPARSEKIT_INDEX_SWITCH(p.indptr_type, p.index_type, PT, IT,                    \
                             [&] { bsr_linear_t<VT, PT, IT>(p); });                  \
    });                                                                              \
  } } }
