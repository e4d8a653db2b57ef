// CSR kernels for the compressed formats (sparsekit/_compress.py): int8 values with per-row fp32
// scales and/or uint8 column gaps (IndexType::D8), next to uint16/int32 column ids and
// fp32/bf16/fp16 values. Compiled once per ISA (csrc/cpu/csr_q_{generic,avx2,avx512}.cpp).
//
// Gap coding: within row m the column of stored entry j is the sum of the gaps of the row's
// entries up to and including j (the first gap is the first column). Larger gaps are split by
// escape entries (gap 255, value 0), so the kernels never branch on them.
//
// Strategy: y[n][m] = scale[m] * sum_j v[j] * x_n[col(j)] + bias[m]. Threads own nnz-balanced
// row ranges; each row is one pass over (indices, values) per vector with gathers of x (or, in
// csrq_assemble, x assembled from scalar loads: hardware gathers are microcoded on AMD cores),
// the int8 -> fp32 widening and the gap prefix sum done in registers (simd.h), so the bytes read
// per nonzero are 1 (gap) + 1 (int8) instead of 2 + 4. Meant for small N (SpMV): for larger N the
// caller decodes once to the float/plain format and runs the tiled kernels.
//
// Bitmap variant (Variant::CsrqBitmap, int8 values with plain indices): the columns of row m
// are read from SpmmParams::bitmap (one 64-bit occupancy word per 64 columns) instead of the
// index array, and each word's stored values are expanded into place in registers and
// multiplied with x read contiguously. It costs per column (0.125 byte of bitmap plus the
// expansion), not per nonzero, and needs no gathers: faster than the gather kernels at
// moderate sparsity, slower at high sparsity; the planner measures which.
#pragma once

#include <type_traits>

#include "cpu/cpu_features.h"
#include "cpu/kernels_impl.h"

namespace sparsekit {
namespace cpu {
namespace {

inline int64_t scalar_col(uint8_t g, int64_t prev) { return prev + g; }
inline int64_t scalar_col(uint16_t i, int64_t) { return i; }
inline int64_t scalar_col(int32_t i, int64_t) { return i; }
inline float q_to_f32(int8_t v) { return static_cast<float>(v); }
template <class VT> inline float q_to_f32(VT v) { return to_f32(v); }

#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
// x at the W columns `cols` of stored entries [idx, idx + W): one hardware gather, or (kAssemble)
// W scalar loads, of column ids read straight from the index array when it holds them (plain
// coding) or from a stack copy of the decoded columns (gap coding; the vector store forwards to
// the scalar index loads).
template <bool kAssemble, class IT>
inline typename Vec::T q_fetch(const float* x, const IT* idx, IdxV cols) {
  if constexpr (!kAssemble) {
    (void)idx;
    return q_gather(x, cols);
  } else if constexpr (std::is_same<IT, uint8_t>::value) {
    alignas(64) int32_t c[Vec::W];
    idx_store(c, cols);
    return Vec::assemble(x, c);
  } else {
    (void)cols;
    return Vec::assemble(x, idx);
  }
}
#endif
#if defined(SPARSEKIT_ISA_AVX512)
// The masked tail's x: n < W valid lanes of `cols` (q_cols_n: the lanes beyond repeat a valid
// column), the rest zero.
template <bool kAssemble>
inline typename Vec::T q_fetch_n(const float* x, IdxV cols, int n) {
  if constexpr (!kAssemble) {
    return q_gather_n(x, cols, n);
  } else {
    alignas(64) int32_t c[Vec::W];
    idx_store(c, cols);
    return q_keep_n(Vec::assemble(x, c), n);
  }
}
#endif

// Contract (micro-kernel). Returns sum_{j in [j0, e)} v(val[j]) * x[col(j)] in fp32 for one row,
// unscaled (the driver multiplies by the row's scale). col(j) is idx[j] for IT uint16_t / int32_t;
// for IT uint8_t (gap coding) it is the running sum of the gaps idx[j0..j], so j0 (the argument j)
// must be the row start. v widens int8 / fp32 / bf16 / fp16. Sizes: any stored length e - j0 >= 0,
// escape entries (gap 255, value 0) included. Layout: one CSR row's stored indices and values. x
// is fp32 with at least K entries. Alignment: none. Assumes: every decoded column < K (validated
// when the matrix was built). Reads exactly [j0, e) of idx and val (the prefetches may name
// addresses beyond e). No allocation, no state. Cost: O(e - j0); steps of 4W stored entries (4
// gathers in flight, 2 gap-decode chains), then 2W, W, and the tail (masked on AVX-512, scalar
// elsewhere), so the edges are lengths around W, 2W and 4W. kAssemble: x is assembled from W
// scalar loads per vector instead of gathered (q_fetch), same steps and tails.
template <bool kAssemble, class VT, class IT>
inline float q_row_dot(const IT* idx, const VT* val, int64_t j, const int64_t e, const float* x) {
  int64_t col = 0;
  float sum = 0.f;
#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
  constexpr int W = Vec::W;
  IdxV carry = idx_zero();
  typename Vec::T a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
  for (; j + 4 * W <= e; j += 4 * W) {  // 4 gathers in flight, 2 gap-decode chains
    prefetch_stream<4 * W>(val, idx, j);
    IdxV c0, c1, c2, c3;
    q_cols2(idx + j, carry, c0, c1);
    q_cols2(idx + j + 2 * W, carry, c2, c3);
    a0 = Vec::fma(q_vals(val + j), q_fetch<kAssemble>(x, idx + j, c0), a0);
    a1 = Vec::fma(q_vals(val + j + W), q_fetch<kAssemble>(x, idx + j + W, c1), a1);
    a2 = Vec::fma(q_vals(val + j + 2 * W), q_fetch<kAssemble>(x, idx + j + 2 * W, c2), a2);
    a3 = Vec::fma(q_vals(val + j + 3 * W), q_fetch<kAssemble>(x, idx + j + 3 * W, c3), a3);
  }
  a0 = Vec::add(a0, a2);
  a1 = Vec::add(a1, a3);
  for (; j + 2 * W <= e; j += 2 * W) {
    prefetch_stream<2 * W>(val, idx, j);
    IdxV c0, c1;
    q_cols2(idx + j, carry, c0, c1);
    a0 = Vec::fma(q_vals(val + j), q_fetch<kAssemble>(x, idx + j, c0), a0);
    a1 = Vec::fma(q_vals(val + j + W), q_fetch<kAssemble>(x, idx + j + W, c1), a1);
  }
  if (j + W <= e) {
    const auto c0 = q_cols(idx + j, carry);
    a0 = Vec::fma(q_vals(val + j), q_fetch<kAssemble>(x, idx + j, c0), a0);
    j += W;
  }
#if defined(SPARSEKIT_ISA_AVX512)
  if (j < e) {
    const int n = static_cast<int>(e - j);
    const auto c0 = q_cols_n(idx + j, n, carry);
    a1 = Vec::fma(q_vals_n(val + j, n), q_fetch_n<kAssemble>(x, c0, n), a1);
    j = e;
  }
#endif
  sum = Vec::reduce(Vec::add(a0, a1));
  col = idx_last(carry);
#endif
  for (; j < e; ++j) {
    col = scalar_col(idx[j], col);
    sum += q_to_f32(val[j]) * x[col];
  }
  return sum;
}

// Contract (micro-kernel). Returns sum_k v(k) * x[k] in fp32 for one CSR row given by
// occupancy words: bit t of words[b] set means column 64b + t is stored, and the row's stored
// int8 values val[0 .. popcount) are those columns' values in column order (unscaled; the
// driver multiplies by the row's scale). Sizes: K >= 0; words holds ceil(K / 64) entries whose
// bits at columns >= K are 0; x has K fp32 entries (every column is read, the last partial
// block through masked loads: nothing at or beyond x[K]). Reads the row's popcount values; the
// AVX2 expansion may also read up to 7 bytes after them where they lie before `val_end` (the
// end of the whole value array). Alignment: none. No allocation, no state. Cost: O(K) vector
// work whatever the row's nonzero count (16 columns per expansion on AVX-512, 8 on AVX2, one
// step per stored value in the generic build); the edges are K around multiples of 64 and of
// the expansion width, empty and full words.
inline float q_row_bitmap_dot(const uint64_t* words, int64_t K, const int8_t* val,
                              const int8_t* val_end, const float* x) {
  float sum = 0.f;
  spmv_bitmap<1>(words, K, val, val_end, x, 0, &sum);
  return sum;
}

#if defined(SPARSEKIT_ISA_AVX512)
// q_row_bitmap_dot with AVX-512 VBMI2: one byte expand-load per 64-column word instead of four
// 16-lane dword expansions (about half the shuffle-port work). Same contract, except that it
// reads exactly the row's values (val_end is not needed); callers check has_avx512_vbmi2().
SPARSEKIT_TARGET_VBMI2 inline float q_row_bitmap_dot_vbmi2(const uint64_t* words, int64_t K,
                                                           const int8_t* val, const float* x) {
  Vec::T a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
  const int8_t* p = val;
  const int64_t full = K / 64;
  for (int64_t b = 0; b < full; ++b) {
    const auto v = q_bitmap_expand64(p, words[b]);
    const float* xb = x + 64 * b;
    a0 = Vec::fma(q_bitmap_lane16<0>(v), Vec::load(xb), a0);
    a1 = Vec::fma(q_bitmap_lane16<1>(v), Vec::load(xb + 16), a1);
    a2 = Vec::fma(q_bitmap_lane16<2>(v), Vec::load(xb + 32), a2);
    a3 = Vec::fma(q_bitmap_lane16<3>(v), Vec::load(xb + 48), a3);
  }
  const int rem = static_cast<int>(K - 64 * full);
  if (rem > 0) {  // bits at columns >= K are 0, so only x needs masking
    const auto v = q_bitmap_expand64(p, words[full]);
    const float* xb = x + 64 * full;
    a0 = Vec::fma(q_bitmap_lane16<0>(v), Vec::load_n(xb, rem), a0);
    if (rem > 16) a1 = Vec::fma(q_bitmap_lane16<1>(v), Vec::load_n(xb + 16, rem - 16), a1);
    if (rem > 32) a2 = Vec::fma(q_bitmap_lane16<2>(v), Vec::load_n(xb + 32, rem - 32), a2);
    if (rem > 48) a3 = Vec::fma(q_bitmap_lane16<3>(v), Vec::load_n(xb + 48, rem - 48), a3);
  }
  return Vec::reduce(Vec::add(Vec::add(a0, a1), Vec::add(a2, a3)));
}

// Contract (micro-kernel). Returns the exact integer sum_c v(c) * xu[c] for one CSR row given by
// occupancy words (as q_row_bitmap_dot: bit t of words[b] set means column 64b + t is stored,
// its int8 value next in val), where xu is x as unsigned 32-bit fixed point in four byte planes
// (pack_x_fixed_planes: byte k of xu[c] at planes[k * stride + c]). The driver removes the 2^31
// offset (minus 2^31 times the row's value sum) and the scale 2^e. Why: an fp32 multiply-add
// per column needs the int8 widened and converted first (three vector operations per 16
// columns); a VNNI byte dot product (vpdpbusd: 64 unsigned x bytes times 64 signed weights,
// summed four to a lane) takes the expanded weights as they are, one per plane per 64 columns.
// Sizes: 0 <= K < 2^24 (the 64-bit total is exact below that); words: ceil(K / 64), bits at
// columns >= K are 0; planes: 4 * stride bytes, stride >= 64 * ceil(K / 64), zero at columns >= K
// (each word's 64 plane bytes are read whole). Exactness: each vpdpbusd adds at most 130560 to
// a lane, so lanes are moved to 64-bit totals every 512 words. Reads exactly the row's popcount
// values. Alignment: none. No allocation, no state. Needs AVX-512 VNNI + VBMI2 (callers check
// has_avx512_vnni_vbmi2()). Cost: O(K): one byte expand-load and four vpdpbusd per 64 columns
// whatever the nonzero count; the edges are K around multiples of 64 and of 512 * 64.
SPARSEKIT_TARGET_VNNI inline int64_t q_row_bitmap_dot_vnni(const uint64_t* words, int64_t K,
                                                          const int8_t* val, const uint8_t* planes,
                                                          int64_t stride) {
  constexpr int64_t kChunk = 512;  // words per 32-bit accumulation (lane bound above)
  // Prefetch distances: 128 words (1 KiB, into the next rows) and 2 KiB of values; a core's
  // own streams are latency-bound without them (docs/compression.md).
  constexpr int64_t kPfWords = 128, kPfValBytes = 2048;
  const uint8_t* p0 = planes;
  const uint8_t* p1 = planes + stride;
  const uint8_t* p2 = planes + 2 * stride;
  const uint8_t* p3 = planes + 3 * stride;
  const int8_t* p = val;
  const int64_t nw = (K + 63) / 64;
  int64_t t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  for (int64_t b0 = 0; b0 < nw; b0 += kChunk) {
    const int64_t b1 = imin(nw, b0 + kChunk);
    auto a0 = i32_zero(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t b = b0; b < b1; ++b) {
      if ((b & 7) == 0) prefetch_t0(words + b + kPfWords);  // one line per 8 words
      prefetch_t0(p + kPfValBytes);
      const auto v = q_bitmap_expand64(p, words[b]);
      a0 = dot_u8s8(a0, p0 + 64 * b, v);
      a1 = dot_u8s8(a1, p1 + 64 * b, v);
      a2 = dot_u8s8(a2, p2 + 64 * b, v);
      a3 = dot_u8s8(a3, p3 + 64 * b, v);
    }
    t0 += reduce_i32_exact(a0);
    t1 += reduce_i32_exact(a1);
    t2 += reduce_i32_exact(a2);
    t3 += reduce_i32_exact(a3);
  }
  return t0 + t1 * 256 + t2 * 65536 + t3 * 16777216;  // products: the totals may be negative
}
#endif

#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
// Running state of one row in the interleaved kernel below: next stored entry j, end e, gap
// carry (the last decoded column, broadcast) and two accumulators.
struct QRowState {
  int64_t j, e;
  IdxV carry;
  typename Vec::T a0, a1;
};

inline QRowState q_row_begin(int64_t s, int64_t e) {
  return QRowState{s, e, idx_zero(), Vec::zero(), Vec::zero()};
}

// 2W stored entries of one row; needs r.j + 2W <= r.e.
template <class VT, class IT>
inline void q_row_step(const IT* idx, const VT* val, QRowState& r, const float* x) {
  constexpr int W = Vec::W;
  prefetch_stream<2 * W>(val, idx, r.j);
  IdxV c0, c1;
  q_cols2(idx + r.j, r.carry, c0, c1);
  r.a0 = Vec::fma(q_vals(val + r.j), q_gather(x, c0), r.a0);
  r.a1 = Vec::fma(q_vals(val + r.j + W), q_gather(x, c1), r.a1);
  r.j += 2 * W;
}

// The rest of the row after the interleaved steps (fewer than 2W entries once the partner row
// is done, or more for the longer row): 2W steps, one W step, the masked (AVX-512) or scalar
// tail, then the horizontal sum.
template <class VT, class IT>
inline float q_row_finish(const IT* idx, const VT* val, QRowState& r, const float* x) {
  constexpr int W = Vec::W;
  while (r.j + 2 * W <= r.e) q_row_step(idx, val, r, x);
  if (r.j + W <= r.e) {
    const auto c0 = q_cols(idx + r.j, r.carry);
    r.a0 = Vec::fma(q_vals(val + r.j), q_gather(x, c0), r.a0);
    r.j += W;
  }
#if defined(SPARSEKIT_ISA_AVX512)
  if (r.j < r.e) {
    const int n = static_cast<int>(r.e - r.j);
    const auto c0 = q_cols_n(idx + r.j, n, r.carry);
    r.a1 = Vec::fma(q_vals_n(val + r.j, n), q_gather_n(x, c0, n), r.a1);
    r.j = r.e;
  }
#endif
  float sum = Vec::reduce(Vec::add(r.a0, r.a1));
  int64_t col = idx_last(r.carry);
  for (int64_t j = r.j; j < r.e; ++j) {
    col = scalar_col(idx[j], col);
    sum += q_to_f32(val[j]) * x[col];
  }
  return sum;
}
#endif

// Contract (micro-kernel). The dot products of two rows, [s0, e0) and [s1, e1), with one vector
// x, unscaled: d0 = q_row_dot(idx, val, s0, e0, x) and d1 likewise, up to the fp32 summation
// order. Sizes: any lengths >= 0 (empty rows, rows of different lengths). Layout, alignment,
// assumptions and reads as q_row_dot (s0 and s1 must be row starts for gap coding). Cost:
// O(e0 - s0 + e1 - s1). Why: a row of a 90%-sparse 4096-wide matrix is about 26 vectors of
// nonzeros, so each row's horizontal sum, tail and gap-carry chain are a large share of its
// time; stepping two independent rows in lockstep (2W entries of each per step: 4 gathers and
// two gap-decode chains in flight) overlaps one row's serial parts with the other's work.
template <class VT, class IT>
inline void q_rows2_dot(const IT* idx, const VT* val, int64_t s0, int64_t e0, int64_t s1,
                        int64_t e1, const float* x, float& d0, float& d1) {
#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
  constexpr int W = Vec::W;
  QRowState r0 = q_row_begin(s0, e0), r1 = q_row_begin(s1, e1);
  while (r0.j + 2 * W <= r0.e && r1.j + 2 * W <= r1.e) {
    q_row_step(idx, val, r0, x);
    q_row_step(idx, val, r1, x);
  }
  d0 = q_row_finish(idx, val, r0, x);
  d1 = q_row_finish(idx, val, r1, x);
#else
  d0 = q_row_dot<false, VT, IT>(idx, val, s0, e0, x);
  d1 = q_row_dot<false, VT, IT>(idx, val, s1, e1, x);
#endif
}

// Kernel choice of csrq_linear_t (SpmmParams::variant, variants.h): Auto and CsrqRows2 = rows in
// pairs (q_rows2_dot), CsrqRow1 = one row at a time (q_row_dot), CsrqAssemble = one row at a
// time with x assembled from scalar loads (q_row_dot<true>), CsrqBitmap = q_row_bitmap_dot over
// SpmmParams::bitmap (int8 values, plain indices; the index array is not read), CsrqBitmapVnni =
// q_row_bitmap_dot_vnni over the same bitmap and SpmmParams::bitmap_row_sums.
constexpr int kQRow1 = static_cast<int>(Variant::CsrqRow1);
constexpr int kQAssemble = static_cast<int>(Variant::CsrqAssemble);
constexpr int kQBitmap = static_cast<int>(Variant::CsrqBitmap);
constexpr int kQBitmapVnni = static_cast<int>(Variant::CsrqBitmapVnni);

// x of the VNNI bitmap kernel: each of the N vectors as fixed-point byte planes
// (pack_x_fixed_planes), packed once per call and shared by every thread (N = 0: nothing).
// `ok` is false when nothing was packed or the kernel cannot run exactly (no VNNI / VBMI2 on
// this CPU, K >= 2^24, N > 2, or an inf or NaN in x); the driver then runs the fp32 bitmap
// kernel, which propagates inf and NaN as fp32 does.
struct XFixedPlanes {
  int64_t stride;  // bytes per plane: K rounded up to 64
  Scratch buf;     // 4 planes per vector (no STL containers in ISA-specific TUs: threading.h)
  int e[kMaxGatherBatch] = {};
  bool ok = false;
  static bool usable(int64_t N, int64_t K) {
#if defined(SPARSEKIT_ISA_AVX512)
    return N >= 1 && N <= kMaxGatherBatch && K < (int64_t(1) << 24) && has_avx512_vnni_vbmi2();
#else
    (void)N, (void)K;
    return false;
#endif
  }
  XFixedPlanes(const float* x, int64_t ldx, int64_t N, int64_t K)
      : stride((K + 63) / 64 * 64), buf(usable(N, K) ? static_cast<size_t>(stride * N) : 1) {
#if defined(SPARSEKIT_ISA_AVX512)
    if (!usable(N, K)) return;
    ok = true;
    for (int64_t n = 0; n < N && ok; ++n)
      ok = pack_x_fixed_planes(x + n * ldx, K, stride, planes(n), e[n]);
#else
    (void)x, (void)ldx;
#endif
  }
  // buf holds stride * N floats: the 4 * stride * N plane bytes
  uint8_t* planes(int64_t n) const { return reinterpret_cast<uint8_t*>(buf.p) + 4 * stride * n; }
};

// Driver: y = x @ W^T (* scales) + bias for row chunks claimed by the threads; any N (each vector
// is a separate pass over a row pair, which stays in L1 between the vectors).
template <class VT, class PT, class IT>
void csrq_linear_t(const SpmmParams& p) {
  const PT* indptr = static_cast<const PT*>(p.indptr);
  const IT* idx = static_cast<const IT*>(p.indices);
  const VT* val = static_cast<const VT*>(p.values);
  const int64_t nnz = static_cast<int64_t>(indptr[p.M]);
  const XRowsF32 xr(p);
  const float* x = xr.x;
  const int64_t ldx = xr.ldx;
  const bool assemble = p.variant == kQAssemble;
  const bool pairs = p.variant != kQRow1 && !assemble;
  const bool vnni = p.variant == kQBitmapVnni;
  const bool bitmap = p.variant == kQBitmap || vnni;
  if (bitmap && (p.bitmap == nullptr || !std::is_same<VT, int8_t>::value ||
                 std::is_same<IT, uint8_t>::value || (vnni && p.bitmap_row_sums == nullptr)))
    throw std::invalid_argument(
        "sparsekit: the bitmap variants of csrq need int8 values, plain indices and the bitmap");
  const int64_t words_per_row = (p.K + 63) / 64;
#if defined(SPARSEKIT_ISA_AVX512)
  const bool vbmi2 = bitmap && has_avx512_vbmi2();
#endif
  const XFixedPlanes xq(x, ldx, vnni ? p.N : 0, p.K);
  // The bitmap kernel's work grows with the columns, not the nonzeros (a vector multiply-add per
  // W columns, counted as about W / 4 scalar ones).
  const int threads = threads_for(p.num_threads, (bitmap ? p.M * p.K / 4 : nnz + p.M) * p.N);
  auto finish = [&](int64_t n, int64_t m, float d) {
    const float sc = p.scales ? p.scales[m] : 1.f;
    store_out(p.y, n * p.ldy + m, activate(d * sc + bias_at(p.bias, m), p.activation), p.x_dtype);
  };
  // Rows in chunks with tail stealing rather than a static split (threading.h, RowChunks): at
  // N <= 2 a call lasts tens of microseconds, and on a machine where another process holds part
  // of one core a static split waits for the slowest thread (measured: 2 threads slower than 1).
  const int64_t chunk = imax(8, p.M / (static_cast<int64_t>(threads) * 32));
  auto rows = [&](int64_t r0, int64_t r1) {
    int64_t m = r0;
    if constexpr (std::is_same<VT, int8_t>::value) {
      if (bitmap) {
        for (; m < r1; ++m) {
          const uint64_t* words = p.bitmap + m * words_per_row;
          const int8_t* v = val + static_cast<int64_t>(indptr[m]);
          for (int64_t n = 0; n < p.N; ++n) {
#if defined(SPARSEKIT_ISA_AVX512)
            if (xq.ok) {  // exact integer sum, then the offset and the fixed-point scale removed
              const int64_t t = q_row_bitmap_dot_vnni(words, p.K, v, xq.planes(n), xq.stride) -
                                p.bitmap_row_sums[m] * (int64_t(1) << 31);
              finish(n, m, static_cast<float>(__builtin_ldexp(static_cast<double>(t), -xq.e[n])));
              continue;
            }
            if (vbmi2) {
              finish(n, m, q_row_bitmap_dot_vbmi2(words, p.K, v, x + n * ldx));
              continue;
            }
#endif
            finish(n, m, q_row_bitmap_dot(words, p.K, v, val + nnz, x + n * ldx));
          }
        }
        return;
      }
    }
    if (pairs) {
      for (; m + 2 <= r1; m += 2) {
        const int64_t s0 = static_cast<int64_t>(indptr[m]), s1 = static_cast<int64_t>(indptr[m + 1]);
        const int64_t e1 = static_cast<int64_t>(indptr[m + 2]);
        for (int64_t n = 0; n < p.N; ++n) {  // the two rows stay in L1 across the vectors
          float d0, d1;
          q_rows2_dot<VT, IT>(idx, val, s0, s1, s1, e1, x + n * ldx, d0, d1);
          finish(n, m, d0);
          finish(n, m + 1, d1);
        }
      }
    }
    for (; m < r1; ++m) {
      const int64_t s = static_cast<int64_t>(indptr[m]), e = static_cast<int64_t>(indptr[m + 1]);
      for (int64_t n = 0; n < p.N; ++n)
        finish(n, m, assemble ? q_row_dot<true, VT, IT>(idx, val, s, e, x + n * ldx)
                              : q_row_dot<false, VT, IT>(idx, val, s, e, x + n * ldx));
    }
  };
  parallel_row_chunks(threads, indptr, p.M, chunk, rows);
}

}  // namespace
}  // namespace cpu
}  // namespace sparsekit

// Exported entry point for this TU's ISA: every (value, indptr, index) combination, including
// the plain float ones (the caller uses it for int8 values or D8 indices).
#define SPARSEKIT_DEFINE_CSRQ_ENTRY(NAME)                                                   \
  namespace sparsekit { namespace cpu {                                                    \
  void NAME(const SpmmParams& p) {                                                         \
    if (handle_trivial(p)) return;                                                         \
    auto by_index = [&](auto vt) {                                                         \
      using VT = decltype(vt);                                                             \
      auto by_ptr = [&](auto pt) {                                                         \
        using PT = decltype(pt);                                                           \
        switch (p.index_type) {                                                            \
          case IndexType::U16: return csrq_linear_t<VT, PT, uint16_t>(p);                   \
          case IndexType::I32: return csrq_linear_t<VT, PT, int32_t>(p);                    \
          case IndexType::D8: return csrq_linear_t<VT, PT, uint8_t>(p);                     \
          default: throw std::invalid_argument("sparsekit: unsupported index type code");  \
        }                                                                                  \
      };                                                                                   \
      if (p.indptr_type == IndexType::I64) return by_ptr(int64_t{});                       \
      return by_ptr(int32_t{});                                                            \
    };                                                                                     \
    switch (p.value_dtype) {                                                               \
      case DType::I8: return by_index(int8_t{});                                           \
      case DType::F32: return by_index(float{});                                           \
      case DType::BF16: return by_index(bf16_t{});                                         \
      case DType::F16: return by_index(f16_t{});                                           \
    }                                                                                      \
    throw std::invalid_argument("sparsekit: unknown value dtype code");                    \
                                                                                 \
  } } }
