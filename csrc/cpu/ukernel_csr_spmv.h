// CSR SpMV micro-kernels: the dot products of one sparse row with NB (1 or 2) dense vectors.
// One loop nest each; the row loop, threads and output conversion live in the driver
// (kernels_impl.h, csr_spmv_rows). Written against the Vec wrapper of simd.h, compiled per ISA.
//
// Contract (all variants). Computes sums[n] += sum_{j in [j0, e)}
// to_f32(val[j]) * x[n * ldx + idx[j]] for n < NB (NB = 1 or 2), in fp32 (the summation order
// differs between variants; results agree to fp32 rounding). Sizes: any row length e - j0 >= 0 (j0
// is the argument j; empty rows included); x holds NB rows of fp32 with row stride ldx (only the
// columns idx names are read). Layout: val / idx are one CSR row's stored values (fp32 / bf16 /
// fp16) and column ids (uint16 / int32). Alignment: none for val, idx, x or sums. Assumes:
// idx[j] < the row length of x (validated when the matrix was built); val and idx point at the
// starts of the whole arrays (j0 and e are positions in them). Reads [j0, e) of val and idx; the
// AVX2 row tails also read the entries in [e - W, j0) when e >= W (earlier rows' entries, masked
// out whatever their values: a vector step instead of a scalar loop), and the prefetches may name
// addresses beyond e, which never fault. Writes only sums[0..NB). No allocation, no state.
// Cost: O(NB * (e - j0)) multiply-adds; the steps are 2W nonzeros (gather, assemble) or 4W
// (gather4) with the remainder as described per variant, so the edges are row lengths around W,
// 2W and 4W (tests/cpp/ukernel_test.cpp sweeps 0 .. 5W + 3).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/simd.h"

namespace sparsekit {
namespace cpu {
namespace {

#ifndef SPARSEKIT_PF_DIST
#define SPARSEKIT_PF_DIST 1024
#endif
// Software prefetch distance in nonzeros: the value and index streams are read once, and the
// hardware prefetchers alone leave one core's memory pipeline underused.
constexpr int64_t kPfDist = SPARSEKIT_PF_DIST;

// Prefetches the cache lines that `Entries` entries of one stream from j + kPfDist occupy (one
// line per 64 bytes, at least one), so a step of any width and entry type covers exactly the
// bytes it will consume.
template <int Entries, class T>
inline void prefetch_ahead(const T* stream, int64_t j) {
  constexpr int kLines = Entries * sizeof(T) > 64 ? Entries * sizeof(T) / 64 : 1;
  const char* p = reinterpret_cast<const char*>(stream + j + kPfDist);
  for (int l = 0; l < kLines; ++l) prefetch_t0(p + 64 * l);
}
// The same for both streams of a CSR row: values and column ids.
template <int Entries, class VT, class IT>
inline void prefetch_stream(const VT* val, const IT* idx, int64_t j) {
  prefetch_ahead<Entries>(val, j);
  prefetch_ahead<Entries>(idx, j);
}

// Scalar tail / scalar variant: 4 independent sums per vector (hides the FMA latency).
template <int NB, class VT, class IT>
inline void spmv_scalar(const IT* idx, const VT* val, int64_t j, int64_t e, const float* x,
                        int64_t ldx, float* sums) {
  float s[4][NB];
  for (int u = 0; u < 4; ++u)
    for (int n = 0; n < NB; ++n) s[u][n] = 0.f;
  for (; j + 4 <= e; j += 4) {
    for (int u = 0; u < 4; ++u) {
      const float w = to_f32(val[j + u]);
      const int64_t k = idx_of(idx[j + u]);
      for (int n = 0; n < NB; ++n) s[u][n] += w * x[n * ldx + k];
    }
  }
  for (; j < e; ++j) {
    const float w = to_f32(val[j]);
    const int64_t k = idx_of(idx[j]);
    for (int n = 0; n < NB; ++n) s[0][n] += w * x[n * ldx + k];
  }
  for (int n = 0; n < NB; ++n) sums[n] += (s[0][n] + s[1][n]) + (s[2][n] + s[3][n]);
}

// Read probe (benchmarks only; not a variant, never planned): the memory floor of a row's
// SpMV. Contract: returns the XOR of all bytes of val[j0, e) in bits 0-7 and of all bytes of
// idx[j0, e) in bits 8-15 (j0 is the argument j; 0 for an empty row). Sizes: any row length
// e - j0 >= 0. Layout: val / idx as in the SpMV contract. Alignment: none. Reads exactly those
// bytes, in 64-bit words with the same software prefetch as the gather variants (the prefetches
// may name addresses beyond e, which never fault); no x, no value arithmetic. No allocation, no
// state. Cost: O((e - j0) * (sizeof(VT) + sizeof(IT)) / 8) loads and XORs.
inline uint64_t xor_bytes(const char* p, int64_t n) {
  uint64_t acc = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    acc ^= w;
  }
  for (; i < n; ++i) acc ^= static_cast<unsigned char>(p[i]);
  acc ^= acc >> 32;
  acc ^= acc >> 16;
  acc ^= acc >> 8;
  return acc & 0xffu;
}

template <class VT, class IT>
inline uint32_t row_read_probe(const IT* idx, const VT* val, int64_t j, int64_t e) {
  constexpr int64_t kStep = 32;  // entries per step: the gather variants' prefetch granule
  uint64_t xv = 0, xi = 0;
  for (; j + kStep <= e; j += kStep) {
    prefetch_stream<kStep>(val, idx, j);
    xv ^= xor_bytes(reinterpret_cast<const char*>(val + j), kStep * sizeof(VT));
    xi ^= xor_bytes(reinterpret_cast<const char*>(idx + j), kStep * sizeof(IT));
  }
  xv ^= xor_bytes(reinterpret_cast<const char*>(val + j), (e - j) * sizeof(VT));
  xi ^= xor_bytes(reinterpret_cast<const char*>(idx + j), (e - j) * sizeof(IT));
  return static_cast<uint32_t>(xv | (xi << 8));
}

// Gather probe (benchmarks only; not a variant, never planned): the x-fetch floor of a row's
// SpMV. Contract: returns sum_{j in [j0, e)} x[idx[j]] in fp32 (j0 is the argument j; 0 for an
// empty row), fetched as the N = 1 kernel named by kAssemble fetches x: 2W column ids per step,
// each W through one hardware gather (csr_spmv_gather) or assembled from W scalar loads
// (kAssemble, csr_spmv_assemble), the index stream prefetched as far ahead; the row tail as that
// kernel's: one W step, then a masked gather (AVX-512 gathers), the W ids ending at e with the
// earlier lanes masked (AVX2, either fetch), else the scalar loop (AVX-512 assembly, and AVX2
// rows with e < W); the generic build sums with scalar loads. No values are read, so the probe's
// time is what fetching x and the index stream cost without the value stream. Sizes: any row
// length e - j0 >= 0. Layout: idx as in the SpMV contract; x holds at least max(idx) + 1 fp32.
// Alignment: none. Reads [j0, e) of idx (AVX2 tails also [e - W, j0) as in the kernels; the
// prefetches may name addresses beyond e, which never fault). No allocation, no state.
// Cost: O(e - j0) indexed loads of x. A change to a kernel's steps or tails belongs here too.
template <bool kAssemble, class IT>
inline float row_gather_probe(const IT* idx, int64_t j, int64_t e, const float* x) {
#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
  constexpr int W = Vec::W;
  auto fetch = [x](const IT* i) {
    if constexpr (kAssemble) return Vec::assemble(x, i);
    else return Vec::gather(x, i);
  };
  typename Vec::T a0 = Vec::zero(), a1 = Vec::zero();
  for (; j + 2 * W <= e; j += 2 * W) {
    prefetch_ahead<2 * W>(idx, j);
    a0 = Vec::add(a0, fetch(idx + j));
    a1 = Vec::add(a1, fetch(idx + j + W));
  }
  if (j + W <= e) {
    a0 = Vec::add(a0, fetch(idx + j));
    j += W;
  }
#if defined(SPARSEKIT_ISA_AVX512)
  if (!kAssemble && j < e) {
    a1 = Vec::add(a1, Vec::gather_n(x, idx + j, static_cast<int>(e - j)));
    j = e;
  }
#else
  if (j < e && e >= W) {
    const auto m = Vec::mask_last(static_cast<int>(e - j));
    if constexpr (kAssemble) a1 = Vec::add(a1, Vec::assemble_masked(x, idx + e - W, m));
    else a1 = Vec::add(a1, Vec::gather_masked(x, idx + e - W, m));
    j = e;
  }
#endif
  float s = Vec::reduce(Vec::add(a0, a1));
#else
  float s = 0.f;
#endif
  for (; j < e; ++j) s += x[idx_of(idx[j])];
  return s;
}

// Bitmap variant (csr_spmv_bitmap, and csrq_bitmap through q_row_bitmap_dot). Contract:
// sums[n] += sum_k v(k) * x[n * ldx + k] for n < NB over one CSR row given by occupancy words:
// bit t of words[b] set means column 64b + t is stored, and the row's stored values
// val[0 .. popcount) are those columns' values in column order (fp32 / bf16 / fp16 / int8,
// int8 unscaled). Sizes: K >= 0; words holds ceil(K / 64) entries whose bits at columns >= K
// are 0; x holds NB rows of K fp32 (every column is read, the last partial block through
// masked loads: nothing at or beyond column K). Reads the row's popcount values; the AVX2
// expansion may also read up to 7 values after them where they lie before `val_end` (the end
// of the whole value array). Alignment: none. No allocation, no state. Cost: O(NB * K) vector
// work whatever the row's nonzero count (one expansion per W columns; the generic build steps
// through the set bits): it pays at moderate sparsity, where it reads fewer bytes than
// (index, value) pairs and needs no gathers. Edges: K around multiples of W and 64, empty and
// full words.
template <int NB, class VT>
inline void spmv_bitmap(const uint64_t* words, int64_t K, const VT* val, const VT* val_end,
                        const float* x, int64_t ldx, float* sums) {
#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
  constexpr int W = Vec::W, kChunks = 64 / W;
  constexpr uint32_t kChunkMask = (1u << W) - 1u;
  typename Vec::T acc[4][NB];  // 4 chains: the FMA latency, not the expansion, would bind on 2
  for (int u = 0; u < 4; ++u)
    for (int n = 0; n < NB; ++n) acc[u][n] = Vec::zero();
  const VT* p = val;
  const int64_t full = K / 64;
  for (int64_t b = 0; b < full; ++b) {
    const uint64_t w = words[b];
    for (int c = 0; c < kChunks; ++c) {
      const typename Vec::T v = bitmap_vals(p, static_cast<uint32_t>(w >> (c * W)) & kChunkMask, val_end);
      for (int n = 0; n < NB; ++n)
        acc[c & 3][n] = Vec::fma(v, Vec::load(x + n * ldx + 64 * b + c * W), acc[c & 3][n]);
    }
  }
  const int64_t rem = K - 64 * full;
  if (rem > 0) {
    const uint64_t w = words[full];
    for (int c = 0; c * W < rem; ++c) {
      const typename Vec::T v = bitmap_vals(p, static_cast<uint32_t>(w >> (c * W)) & kChunkMask, val_end);
      const int lanes = static_cast<int>(rem - c * W);
      for (int n = 0; n < NB; ++n)
        acc[c & 3][n] = Vec::fma(v, Vec::load_n(x + n * ldx + 64 * full + c * W, lanes), acc[c & 3][n]);
    }
  }
  for (int n = 0; n < NB; ++n)
    sums[n] += Vec::reduce(Vec::add(Vec::add(acc[0][n], acc[1][n]), Vec::add(acc[2][n], acc[3][n])));
#else
  (void)val_end;
  float s[NB];
  for (int n = 0; n < NB; ++n) s[n] = 0.f;
  const VT* p = val;
  const int64_t nw = (K + 63) / 64;
  for (int64_t b = 0; b < nw; ++b)
    for (uint64_t w = words[b]; w != 0; w &= w - 1) {
      const float v = static_cast<float>(to_f32(*p++));
      const int64_t k = 64 * b + __builtin_ctzll(w);
      for (int n = 0; n < NB; ++n) s[n] += v * x[n * ldx + k];
    }
  for (int n = 0; n < NB; ++n) sums[n] += s[n];
#endif
}

#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
// Hardware-gather variant: U vectors of W nonzeros per step (U = 2: csr_spmv_gather, U = 4:
// csr_spmv_gather4), U independent accumulators per vector of x. Remainder below U * W: one
// vector at a time, then a masked gather (AVX-512: masked loads of exactly the remaining entries;
// AVX2: the W entries ending at e with the earlier lanes masked; the scalar loop only when e < W).
template <int U, int NB, class VT, class IT>
inline void spmv_gather(const IT* idx, const VT* val, int64_t j, int64_t e, const float* x,
                        int64_t ldx, float* sums) {
  constexpr int W = Vec::W;
  typename Vec::T acc[U][NB];
  for (int u = 0; u < U; ++u)
    for (int n = 0; n < NB; ++n) acc[u][n] = Vec::zero();
  // bf16 values with uint16 columns: each 2W block is split by position parity (accumulator u
  // takes the even entries, u + 1 the odd ones), so widening costs bit operations, not shuffles.
  constexpr bool kSplit = std::is_same<VT, bf16_t>::value && std::is_same<IT, uint16_t>::value;
  for (; j + U * W <= e; j += U * W) {
    prefetch_stream<U * W>(val, idx, j);
    if constexpr (kSplit) {
      static_assert(U % 2 == 0, "the parity split needs an even number of vectors per step");
      for (int u = 0; u < U; u += 2) {
        typename Vec::T ve, vo;
        decltype(Vec::load_idx(idx)) ie, io;
        Vec::load_bf16_u16_split(val + j + u * W, idx + j + u * W, ve, vo, ie, io);
        for (int n = 0; n < NB; ++n) {
          acc[u][n] = Vec::fma(ve, Vec::gather_at(x + n * ldx, ie), acc[u][n]);
          acc[u + 1][n] = Vec::fma(vo, Vec::gather_at(x + n * ldx, io), acc[u + 1][n]);
        }
      }
    } else {
      for (int u = 0; u < U; ++u) {
        const typename Vec::T v = Vec::load_vals(val + j + u * W);
        for (int n = 0; n < NB; ++n)
          acc[u][n] = Vec::fma(v, Vec::gather(x + n * ldx, idx + j + u * W), acc[u][n]);
      }
    }
  }
  for (; j + W <= e; j += W) {
    const typename Vec::T v = Vec::load_vals(val + j);
    for (int n = 0; n < NB; ++n) acc[0][n] = Vec::fma(v, Vec::gather(x + n * ldx, idx + j), acc[0][n]);
  }
#if defined(SPARSEKIT_ISA_AVX512)
  if (j < e) {
    const int cnt = static_cast<int>(e - j);
    const typename Vec::T v = Vec::load_vals_n(val + j, cnt);
    for (int n = 0; n < NB; ++n)
      acc[U - 1][n] = Vec::fma(v, Vec::gather_n(x + n * ldx, idx + j, cnt), acc[U - 1][n]);
    j = e;
  }
#else
  if (j < e && e >= W) {  // the W entries ending at e, all but the last e - j masked
    const auto m = Vec::mask_last(static_cast<int>(e - j));
    const typename Vec::T v = Vec::load_vals_masked(val + e - W, m);
    for (int n = 0; n < NB; ++n)
      acc[U - 1][n] = Vec::fma(v, Vec::gather_masked(x + n * ldx, idx + e - W, m), acc[U - 1][n]);
    j = e;
  }
#endif
  for (int n = 0; n < NB; ++n) {
    typename Vec::T s = acc[0][n];
    for (int u = 1; u < U; ++u) s = Vec::add(s, acc[u][n]);
    sums[n] += Vec::reduce(s);
  }
  if (j < e) spmv_scalar<NB>(idx, val, j, e, x, ldx, sums);
}

// Gather-free variant: each vector of x is assembled from W scalar loads (load4_indexed), so
// the load ports do the indexing instead of the microcoded gather. bf16 values: 2W values are
// widened with one load and two unpacks (Vec::load_bf16_pair), and x is assembled in the same
// permuted lane order. Remainder below 2W: one vector of W, then (AVX2) the W entries ending at
// e with the earlier lanes masked, or the scalar loop.
template <int NB, class VT, class IT>
inline void spmv_assemble(const IT* idx, const VT* val, int64_t j, int64_t e, const float* x,
                          int64_t ldx, float* sums) {
  constexpr int W = Vec::W;
  typename Vec::T a0[NB], a1[NB];
  for (int n = 0; n < NB; ++n) a0[n] = a1[n] = Vec::zero();
  for (; j + 2 * W <= e; j += 2 * W) {
    prefetch_stream<2 * W>(val, idx, j);
    typename Vec::T v0, v1;
    constexpr bool kPair = sizeof(VT) == 2 && !std::is_same<VT, f16_t>::value;  // bf16
    if constexpr (kPair) {
      Vec::load_bf16_pair(reinterpret_cast<const bf16_t*>(val + j), v0, v1);
      for (int n = 0; n < NB; ++n) {
        a0[n] = Vec::fma(v0, Vec::assemble(x + n * ldx, idx + j, 0, 8), a0[n]);
        a1[n] = Vec::fma(v1, Vec::assemble(x + n * ldx, idx + j, 4, 8), a1[n]);
      }
    } else {
      v0 = Vec::load_vals(val + j);
      v1 = Vec::load_vals(val + j + W);
      for (int n = 0; n < NB; ++n) {
        a0[n] = Vec::fma(v0, Vec::assemble(x + n * ldx, idx + j), a0[n]);
        a1[n] = Vec::fma(v1, Vec::assemble(x + n * ldx, idx + j + W), a1[n]);
      }
    }
  }
  if (j + W <= e) {
    const typename Vec::T v = Vec::load_vals(val + j);
    for (int n = 0; n < NB; ++n) a0[n] = Vec::fma(v, Vec::assemble(x + n * ldx, idx + j), a0[n]);
    j += W;
  }
#if defined(SPARSEKIT_ISA_AVX2)
  if (j < e && e >= W) {  // the W entries ending at e, all but the last e - j masked
    const auto m = Vec::mask_last(static_cast<int>(e - j));
    const typename Vec::T v = Vec::load_vals_masked(val + e - W, m);
    for (int n = 0; n < NB; ++n)
      a1[n] = Vec::fma(v, Vec::assemble_masked(x + n * ldx, idx + e - W, m), a1[n]);
    j = e;
  }
#endif
  for (int n = 0; n < NB; ++n) sums[n] += Vec::reduce(Vec::add(a0[n], a1[n]));
  if (j < e) spmv_scalar<NB>(idx, val, j, e, x, ldx, sums);
}
#endif

}  // namespace
}  // namespace cpu
}  // namespace sparsekit
