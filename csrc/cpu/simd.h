// Thin SIMD wrappers: the only place in csrc/cpu that uses intrinsics (the micro-kernels,
// drivers, packing and csr_q kernels call these; tests/test_ukernels.py checks). Included ONLY
// from a per-ISA translation unit that defines exactly one of SPARSEKIT_ISA_AVX512 / _AVX2 /
// _GENERIC and is compiled with the matching flags (see CMakeLists.txt). Everything here has
// internal linkage (anonymous namespace) so code built for one ISA can never be merged into
// another's by the linker (the classic ODR hazard of per-file -m flags).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
#include <immintrin.h>
#endif

#include "common/format.h"

namespace sparsekit {
namespace cpu {
namespace {

// ---- scalar conversions ------------------------------------------------------------------
inline float bits_to_f32(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

inline float to_f32(float v) { return v; }
inline float to_f32(bf16_t v) { return bits_to_f32(static_cast<uint32_t>(v.bits) << 16); }

// IEEE half -> float, portable (exact, handles subnormals, inf, nan).
inline float half_to_f32_portable(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0) {  // zero / subnormal: man * 2^-24
    float f = static_cast<float>(man) * 5.9604644775390625e-08f;
    return bits_to_f32(f32_to_bits(f) | sign);
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// float -> IEEE half, round to nearest even, portable.
inline uint16_t f32_to_half_portable(float f) {
  uint32_t x = f32_to_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {  // result is subnormal or zero: round(|f| * 2^24) with RNE
    float a = bits_to_f32(ax) * 16777216.0f;  // exact scaling
    // RNE via the 2^23 trick (a < 1024 here).
    float r = (a + 8388608.0f) - 8388608.0f;
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(r));
  }
  uint32_t mant_odd = (ax >> 13) & 1u;
  ax += 0xfffu + mant_odd;  // round to nearest even on the 13 dropped bits
  return static_cast<uint16_t>(sign | ((ax - 0x38000000u) >> 13));
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t x = f32_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
inline float to_f32(f16_t v) { return _cvtsh_ss(v.bits); }
inline uint16_t f32_to_half(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
#else
inline float to_f32(f16_t v) { return half_to_f32_portable(v.bits); }
inline uint16_t f32_to_half(float f) { return f32_to_half_portable(f); }
#endif

// Writes one fp32 result into the output array in its dtype.
inline void store_out(void* y, int64_t off, float v, DType t) {
  switch (t) {
    case DType::F32: static_cast<float*>(y)[off] = v; break;
    case DType::BF16: static_cast<uint16_t*>(y)[off] = f32_to_bf16(v); break;
    case DType::F16: static_cast<uint16_t*>(y)[off] = f32_to_half(v); break;
    case DType::I8: break;  // never an output dtype (bindings reject it)
  }
}

// The fused epilogue (SpmmParams::activation) on one fp32 output; NaN passes through.
inline float activate(float v, Activation a) { return a == Activation::Relu && v < 0.f ? 0.f : v; }

inline int64_t idx_of(uint16_t i) { return static_cast<int64_t>(i); }
inline int64_t idx_of(int32_t i) { return static_cast<int64_t>(i); }

// ---- vector type ---------------------------------------------------------------------------
#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
// {x[i[0]], x[i[1]], x[i[2]], x[i[3]]} from four scalar loads and three shuffles: the
// gather-free way to index x (vpgatherdd is microcoded on AMD Zen; docs/kernels.md).
// The indices are read with one 64-bit load (uint16) or two (int32) and split with integer
// shifts: the kernel is bound by load-port throughput, and this takes it from 2 loads per
// nonzero to 1.25 (1.5 for int32).
inline void split_indices4(const uint16_t* i, int64_t* k) {
  uint64_t q;
  std::memcpy(&q, i, 8);
  k[0] = static_cast<int64_t>(q & 0xffffu);
  k[1] = static_cast<int64_t>((q >> 16) & 0xffffu);
  k[2] = static_cast<int64_t>((q >> 32) & 0xffffu);
  k[3] = static_cast<int64_t>(q >> 48);
}
inline void split_indices4(const int32_t* i, int64_t* k) {
  uint64_t q0, q1;
  std::memcpy(&q0, i, 8);
  std::memcpy(&q1, i + 2, 8);
  k[0] = static_cast<int64_t>(q0 & 0xffffffffu);
  k[1] = static_cast<int64_t>(q0 >> 32);
  k[2] = static_cast<int64_t>(q1 & 0xffffffffu);
  k[3] = static_cast<int64_t>(q1 >> 32);
}
template <class I>
inline __m128 load4_indexed(const float* x, const I* i) {
  int64_t k[4];
  split_indices4(i, k);
  const __m128 ab = _mm_unpacklo_ps(_mm_load_ss(x + k[0]), _mm_load_ss(x + k[1]));
  const __m128 cd = _mm_unpacklo_ps(_mm_load_ss(x + k[2]), _mm_load_ss(x + k[3]));
  return _mm_movelh_ps(ab, cd);
}
#endif
#if defined(SPARSEKIT_ISA_AVX512)
struct Vec {
  static constexpr int W = 16;
  static constexpr bool kSimd = true;
  using T = __m512;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float a) { return _mm512_set1_ps(a); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T a) { _mm512_storeu_ps(p, a); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  // max(0, a) with NaN kept (vmaxps returns its second operand when either is NaN)
  static T relu(T a) { return _mm512_max_ps(_mm512_setzero_ps(), a); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static float reduce(T a) { return _mm512_reduce_add_ps(a); }
  // W consecutive values -> fp32
  static T load_vals(const float* p) { return _mm512_loadu_ps(p); }
  static T load_vals(const bf16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static T load_vals(const f16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __m512i load_idx(const uint16_t* p) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __m512i load_idx(const int32_t* p) { return _mm512_loadu_si512(p); }
  template <class I>
  static T gather(const float* x, const I* idx) {
    return _mm512_i32gather_ps(load_idx(idx), x, 4);
  }
  // Lanes x[idx[first + 8 * (l / 4) + l % 4]] for stride 8 (the lane order of load_bf16_pair),
  // or x[idx[l]] for first = 0, stride = 4; scalar loads, no gather.
  template <class I>
  static T assemble(const float* x, const I* idx, int first = 0, int stride = 4) {
    const __m256 lo = _mm256_insertf128_ps(_mm256_castps128_ps256(load4_indexed(x, idx + first)),
                                           load4_indexed(x, idx + first + stride), 1);
    const __m256 hi = _mm256_insertf128_ps(
        _mm256_castps128_ps256(load4_indexed(x, idx + first + 2 * stride)),
        load4_indexed(x, idx + first + 3 * stride), 1);
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_zextps256_ps512(lo)),
                                                _mm256_castps_pd(hi), 1));  // AVX512F only
  }
  // 2W bf16 values -> two fp32 vectors by interleaving with zeros (one load, two unpacks, no
  // widening conversions). Lane order: lo holds elements 8 * (l / 4) + l % 4, hi the same + 4,
  // so x must be assembled with assemble(x, idx, 0, 8) / assemble(x, idx, 4, 8).
  static void load_bf16_pair(const bf16_t* p, T& lo, T& hi) {
    const __m512i v = _mm512_loadu_si512(p);
    const __m512i z = _mm512_setzero_si512();
    lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, v));
    hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, v));
  }
  // 2W consecutive bf16 values and their 2W uint16 column ids, split by position parity:
  // lane l of ve / ie is entry 2l, of vo / io entry 2l + 1. Each stream is one load and two
  // bit operations (and / shift) instead of two widening shuffles, which share the shuffle port
  // with the gathers.
  static void load_bf16_u16_split(const bf16_t* v, const uint16_t* i, T& ve, T& vo, __m512i& ie,
                                  __m512i& io) {
    const __m512i vv = _mm512_loadu_si512(v), ii = _mm512_loadu_si512(i);
    ve = _mm512_castsi512_ps(_mm512_slli_epi32(vv, 16));
    vo = _mm512_castsi512_ps(_mm512_and_si512(vv, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    ie = _mm512_and_si512(ii, _mm512_set1_epi32(0xffff));
    io = _mm512_srli_epi32(ii, 16);
  }
  static T gather_at(const float* x, __m512i cols) { return _mm512_i32gather_ps(cols, x, 4); }
  // Lane l = p[l % C]: C consecutive floats repeated across the vector (C = 4, 8 or 16).
  template <int C>
  static T load_tiled(const float* p) {
    static_assert(C == 4 || C == 8 || C == 16, "load_tiled: C must be 4, 8 or 16");
    if constexpr (C == 4) return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
    else if constexpr (C == 8)
      return _mm512_castpd_ps(
          _mm512_broadcast_f64x4(_mm256_loadu_pd(reinterpret_cast<const double*>(p))));
    else return _mm512_loadu_ps(p);
  }
  // Masked tails: only the first n (< W) lanes are read; the others are zero.
  static __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static __mmask16 mask16(int n) { return n >= 16 ? __mmask16(0xffff) : mask(n); }
  static T load_vals_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static T load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask16(n), p); }
  static void store_n(float* p, T v, int n) { _mm512_mask_storeu_ps(p, mask16(n), v); }
  static T load_vals_n(const bf16_t* p, int n) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask(n), p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static T load_vals_n(const f16_t* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p));
  }
  static __m512i load_idx_n(const uint16_t* p, int n) {
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask(n), p));
  }
  static __m512i load_idx_n(const int32_t* p, int n) { return _mm512_maskz_loadu_epi32(mask(n), p); }
  template <class I>
  static T gather_n(const float* x, const I* idx, int n) {
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask(n), load_idx_n(idx, n), x, 4);
  }
  // Column read: lane t = base[t * ld] for t < n (n <= W), 0 beyond. Needs W * ld < 2^31.
  static T gather_column(const float* base, int64_t ld, int n) {
    const __m512i off = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int>(ld)));
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask16(n), off, base, 4);
  }
};
#elif defined(SPARSEKIT_ISA_AVX2)
struct Vec {
  static constexpr int W = 8;
  static constexpr bool kSimd = true;
  using T = __m256;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float a) { return _mm256_set1_ps(a); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T a) { _mm256_storeu_ps(p, a); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T relu(T a) { return _mm256_max_ps(_mm256_setzero_ps(), a); }  // NaN kept, as above
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static float reduce(T a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static T load_vals(const float* p) { return _mm256_loadu_ps(p); }
  static T load_vals(const bf16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static T load_vals(const f16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static __m256i load_idx(const uint16_t* p) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static __m256i load_idx(const int32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  template <class I>
  static T gather(const float* x, const I* idx) {
    return _mm256_i32gather_ps(x, load_idx(idx), 4);
  }
  // Lanes x[idx[first + 8 * (l / 4) + l % 4]] for stride 8 (the lane order of load_bf16_pair),
  // or x[idx[l]] for first = 0, stride = 4; scalar loads, no gather.
  template <class I>
  static T assemble(const float* x, const I* idx, int first = 0, int stride = 4) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(load4_indexed(x, idx + first)),
                                load4_indexed(x, idx + first + stride), 1);
  }
  // 2W bf16 values -> two fp32 vectors by interleaving with zeros (one load, two unpacks, no
  // widening conversions). Lane order: lo holds elements 8 * (l / 4) + l % 4, hi the same + 4,
  // so x must be assembled with assemble(x, idx, 0, 8) / assemble(x, idx, 4, 8).
  static void load_bf16_pair(const bf16_t* p, T& lo, T& hi) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i z = _mm256_setzero_si256();
    lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
    hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
  }
  // 2W consecutive bf16 values and their 2W uint16 column ids, split by position parity:
  // lane l of ve / ie is entry 2l, of vo / io entry 2l + 1 (see the AVX-512 version).
  static void load_bf16_u16_split(const bf16_t* v, const uint16_t* i, T& ve, T& vo, __m256i& ie,
                                  __m256i& io) {
    const __m256i vv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
    const __m256i ii = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(i));
    ve = _mm256_castsi256_ps(_mm256_slli_epi32(vv, 16));
    vo = _mm256_castsi256_ps(_mm256_and_si256(vv, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
    ie = _mm256_and_si256(ii, _mm256_set1_epi32(0xffff));
    io = _mm256_srli_epi32(ii, 16);
  }
  static T gather_at(const float* x, __m256i cols) { return _mm256_i32gather_ps(x, cols, 4); }
  // Lane l = p[l % C]: C consecutive floats repeated across the vector (C = 4 or 8).
  template <int C>
  static T load_tiled(const float* p) {
    static_assert(C == 4 || C == 8, "load_tiled: C must be 4 or 8");
    if constexpr (C == 4) return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p));
    else return _mm256_loadu_ps(p);
  }
  // Row tails without a scalar loop: the last n (1 <= n < W) lanes of the W entries at p are
  // kept, the others zeroed (mask_last(n) selects them). All W entries are read, so the caller
  // makes sure they exist; the masked lanes' values may be anything, inf and NaN included.
  static __m256 mask_last(int n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(W - 1 - n)));
  }
  template <class VT>
  static T load_vals_masked(const VT* p, __m256 m) { return _mm256_and_ps(load_vals(p), m); }
  template <class I>
  static T gather_masked(const float* x, const I* idx, __m256 m) {
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, load_idx(idx), m, 4);
  }
  template <class I>
  static T assemble_masked(const float* x, const I* idx, __m256 m) {
    return _mm256_and_ps(assemble(x, idx), m);
  }
  // The first min(n, W) floats at p, zero beyond (only those are read).
  static T load_n(const float* p, int n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
  }
  // Column read: lane t = base[t * ld] for t < n (n <= W), 0 beyond. Needs W * ld < 2^31.
  static T gather_column(const float* base, int64_t ld, int n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i off = _mm256_mullo_epi32(lane, _mm256_set1_epi32(static_cast<int>(ld)));
    const __m256 m = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, off, m, 4);
  }
};
#else  // generic: plain arrays; the compiler vectorises with the baseline ISA (SSE2 on x86-64)
struct Vec {
  static constexpr int W = 8;
  static constexpr bool kSimd = false;
  struct T { float v[8]; };
  static T zero() { T r; for (int i = 0; i < 8; ++i) r.v[i] = 0.f; return r; }
  static T set1(float a) { T r; for (int i = 0; i < 8; ++i) r.v[i] = a; return r; }
  static T load(const float* p) { T r; for (int i = 0; i < 8; ++i) r.v[i] = p[i]; return r; }
  static void store(float* p, T a) { for (int i = 0; i < 8; ++i) p[i] = a.v[i]; }
  static T add(T a, T b) { for (int i = 0; i < 8; ++i) a.v[i] += b.v[i]; return a; }
  static T relu(T a) {
    for (int i = 0; i < 8; ++i) a.v[i] = activate(a.v[i], Activation::Relu);
    return a;
  }
  static T fma(T a, T b, T c) { for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
  static float reduce(T a) {
    float s = 0.f;
    for (int i = 0; i < 8; ++i) s += a.v[i];
    return s;
  }
};
#endif


// ---- compressed CSR streams (csrc/cpu/csr_q_impl.h) ----------------------------------------
// VecQ<I>::cols turns the next W stored indices into column ids: plain uint16/int32 ids are
// widened; uint8 gaps (index coding D8) are prefix-summed within the vector and offset by
// `carry` (the last column decoded, broadcast), which is updated. vals() widens W values of
// any stored type (int8 included) to fp32. The _n variants read only n < W entries (AVX-512:
// masked loads; lanes >= n give zero values and repeat the last column).
#if defined(SPARSEKIT_ISA_AVX512)
using IdxV = __m512i;
inline IdxV idx_zero() { return _mm512_setzero_si512(); }
inline int64_t idx_last(IdxV carry) { return _mm_cvtsi128_si32(_mm512_castsi512_si128(carry)); }
inline __m512 q_vals(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 q_vals_n(const int8_t* p, int n) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(Vec::mask(n), p)));
}
template <class VT> inline __m512 q_vals(const VT* p) { return Vec::load_vals(p); }
template <class VT> inline __m512 q_vals_n(const VT* p, int n) { return Vec::load_vals_n(p, n); }
// In-vector inclusive prefix sum (no carry), so consecutive vectors decode in parallel and
// only one add per vector is loop-carried.
inline __m512i prefix_in(__m512i g) {
  const __m512i z = _mm512_setzero_si512();
  g = _mm512_add_epi32(g, _mm512_alignr_epi32(g, z, 15));  // + lane i-1
  g = _mm512_add_epi32(g, _mm512_alignr_epi32(g, z, 14));  // + lanes i-2, i-3
  g = _mm512_add_epi32(g, _mm512_alignr_epi32(g, z, 12));
  return _mm512_add_epi32(g, _mm512_alignr_epi32(g, z, 8));
}
inline __m512i bcast_last(__m512i p) { return _mm512_permutexvar_epi32(_mm512_set1_epi32(15), p); }
inline __m512i prefix_gaps(__m512i g, IdxV& carry) {
  g = _mm512_add_epi32(prefix_in(g), carry);
  carry = bcast_last(g);
  return g;
}
inline void q_cols2(const uint8_t* p, IdxV& carry, __m512i& c0, __m512i& c1) {
  const __m128i raw0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i raw1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
  const __m512i p0 = prefix_in(_mm512_cvtepu8_epi32(raw0));
  const __m512i p1 = prefix_in(_mm512_cvtepu8_epi32(raw1));
  const __m512i t0 = bcast_last(p0);
  c0 = _mm512_add_epi32(p0, carry);
  c1 = _mm512_add_epi32(p1, _mm512_add_epi32(carry, t0));
  carry = _mm512_add_epi32(carry, _mm512_add_epi32(t0, bcast_last(p1)));
}
template <class I> inline void q_cols2(const I* p, IdxV&, __m512i& c0, __m512i& c1) {
  c0 = Vec::load_idx(p);
  c1 = Vec::load_idx(p + 16);
}
inline __m512i q_cols(const uint8_t* p, IdxV& carry) {
  return prefix_gaps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), carry);
}
inline __m512i q_cols_n(const uint8_t* p, int n, IdxV& carry) {
  return prefix_gaps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(Vec::mask(n), p)), carry);
}
template <class I> inline __m512i q_cols(const I* p, IdxV&) { return Vec::load_idx(p); }
template <class I> inline __m512i q_cols_n(const I* p, int n, IdxV&) { return Vec::load_idx_n(p, n); }
inline __m512 q_gather(const float* x, __m512i cols) { return _mm512_i32gather_ps(cols, x, 4); }
inline __m512 q_gather_n(const float* x, __m512i cols, int n) {
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), Vec::mask(n), cols, x, 4);
}
// Decoded columns to memory, for the scalar-load assembly of x (csrq_assemble).
inline void idx_store(int32_t* p, IdxV cols) { _mm512_storeu_si512(p, cols); }
// v with lanes n and above zeroed (n < W): a masked tail's x lanes, so an inf or NaN at the
// repeated column never meets the zero values of those lanes.
inline __m512 q_keep_n(__m512 v, int n) { return _mm512_maskz_mov_ps(Vec::mask(n), v); }
// Float-value bitmap expansion (ukernel_csr_spmv.h, spmv_bitmap): lane t is the next stored
// value (as fp32) when bit t of m16 is set, else 0; reads exactly popcount(m16) values at p
// (expand-loads and masked loads touch nothing beyond them) and advances p past them.
inline __m512 bitmap_vals(const float*& p, uint32_t m16, const float* /*end*/) {
  const __m512 v = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(m16), p);
  p += __builtin_popcount(m16);
  return v;
}
inline __m512i bitmap_halves(const uint16_t*& p, uint32_t m16) {  // 16-bit values, zero-extended
  const int cnt = __builtin_popcount(m16);
  const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << cnt) - 1u), p);
  p += cnt;
  return _mm512_maskz_expand_epi32(static_cast<__mmask16>(m16), _mm512_cvtepu16_epi32(h));
}
inline __m512 bitmap_vals(const bf16_t*& p, uint32_t m16, const bf16_t* /*end*/) {
  const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
  const __m512i w = bitmap_halves(q, m16);
  p = reinterpret_cast<const bf16_t*>(q);
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 bitmap_vals(const f16_t*& p, uint32_t m16, const f16_t* /*end*/) {
  const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
  const __m512i w = bitmap_halves(q, m16);
  p = reinterpret_cast<const f16_t*>(q);
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(w));
}
// AVX-512 VBMI2 (Ice Lake and later, Zen 4 and later): functions with this attribute may use
// it; callers check cpu::has_avx512_vbmi2() first.
#define SPARSEKIT_TARGET_VBMI2 __attribute__((target("avx512vbmi2,popcnt")))
// Occupancy-bitmap expansion of a whole 64-column word with one byte expand-load: byte t of the
// result is the next stored int8 value when bit t of w is set, else 0. Reads exactly
// popcount(w) bytes at p (the expand-load touches nothing beyond them) and advances p.
SPARSEKIT_TARGET_VBMI2 inline __m512i q_bitmap_expand64(const int8_t*& p, uint64_t w) {
  const __m512i v = _mm512_maskz_expandloadu_epi8(static_cast<__mmask64>(w), p);
  p += _mm_popcnt_u64(w);
  return v;
}
// Bytes 16c .. 16c + 15 of an expanded word as 16 fp32 lanes (c in 0..3).
template <int C>
SPARSEKIT_TARGET_VBMI2 inline __m512 q_bitmap_lane16(__m512i v) {
  const __m128i q = C == 0 ? _mm512_castsi512_si128(v) : _mm512_extracti32x4_epi32(v, C);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
}
// AVX-512 VNNI + VBMI2 (Ice Lake and later, Zen 4 and later): functions with this attribute may
// use both; callers check cpu::has_avx512_vnni_vbmi2() first.
#define SPARSEKIT_TARGET_VNNI __attribute__((target("avx512vnni,avx512vbmi2,popcnt")))
// 16 lanes of 4-byte dot products added to acc: lane i += sum_{t<4} xb[4i+t] (unsigned) *
// w byte 4i+t (signed), exact in 32 bits while |acc| stays below 2^31 - 130560 (vpdpbusd).
SPARSEKIT_TARGET_VNNI inline __m512i dot_u8s8(__m512i acc, const uint8_t* xb, __m512i w) {
  return _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(xb), w);
}
inline __m512i i32_zero() { return _mm512_setzero_si512(); }
// Exact sum of the 16 int32 lanes (as int64: 16 lanes near 2^31 overflow int32).
inline int64_t reduce_i32_exact(__m512i a) {
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(a)),
                                                  _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a, 1))));
}
// max |x[c]| over c < K, and whether every x[c] is finite (false: an inf or NaN). O(K).
inline float absmax_finite(const float* x, int64_t K, bool& finite) {
  const __m512 inf = _mm512_set1_ps(__builtin_inff());
  __m512 mx = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t c = 0; c < K; c += 16) {
    const __mmask16 m = Vec::mask16(static_cast<int>(K - c < 16 ? K - c : 16));
    const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + c));
    bad |= _mm512_mask_cmp_ps_mask(m, a, inf, _CMP_NLT_UQ);  // inf, or unordered (NaN)
    mx = _mm512_max_ps(mx, a);
  }
  finite = bad == 0;
  return _mm512_reduce_max_ps(mx);
}
// Elements c0 .. c0 + n - 1 (n <= 16) of x as unsigned 32-bit fixed point, round(x * s1 * s2) +
// 2^31 (round to nearest even; both scales powers of two, the product below 2^30 in magnitude),
// byte k of each stored at planes[k * stride + c]. O(1).
inline void fixed_planes16(const float* x, int64_t c0, int n, float s1, float s2, uint8_t* planes,
                           int64_t stride) {
  const __mmask16 m = Vec::mask16(n);
  const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + c0),
                                               _mm512_set1_ps(s1)), _mm512_set1_ps(s2));
  const __m512i u = _mm512_xor_si512(_mm512_cvtps_epi32(v), _mm512_set1_epi32(INT32_MIN));
  for (int k = 0; k < 4; ++k)
    _mm512_mask_cvtepi32_storeu_epi8(planes + k * stride + c0, m, _mm512_srli_epi32(u, 8 * k));
}
// Occupancy-bitmap expansion (csr_q_impl.h, q_row_bitmap_dot): lane t of the result is the next
// stored int8 value (as fp32) when bit t of m16 is set, else 0. Reads exactly popcount(m16)
// bytes at p (a masked load: nothing beyond them is touched) and advances p past them.
inline __m512 bitmap_vals(const int8_t*& p, uint32_t m16, const int8_t* /*end*/) {
  const int cnt = __builtin_popcount(m16);
  const __m128i q = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << cnt) - 1u), p);
  p += cnt;
  return _mm512_cvtepi32_ps(
      _mm512_maskz_expand_epi32(static_cast<__mmask16>(m16), _mm512_cvtepi8_epi32(q)));
}
#elif defined(SPARSEKIT_ISA_AVX2)
using IdxV = __m256i;
inline IdxV idx_zero() { return _mm256_setzero_si256(); }
inline int64_t idx_last(IdxV carry) { return _mm_cvtsi128_si32(_mm256_castsi256_si128(carry)); }
inline __m256 q_vals(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
template <class VT> inline __m256 q_vals(const VT* p) { return Vec::load_vals(p); }
inline __m256i prefix_in(__m256i g) {
  g = _mm256_add_epi32(g, _mm256_slli_si256(g, 4));  // prefix within each 128-bit half
  g = _mm256_add_epi32(g, _mm256_slli_si256(g, 8));
  const __m256i lo_total = _mm256_permutevar8x32_epi32(g, _mm256_set1_epi32(3));
  return _mm256_add_epi32(g, _mm256_blend_epi32(_mm256_setzero_si256(), lo_total, 0xF0));
}
inline __m256i bcast_last(__m256i p) { return _mm256_permutevar8x32_epi32(p, _mm256_set1_epi32(7)); }
inline __m256i prefix_gaps(__m256i g, IdxV& carry) {
  g = _mm256_add_epi32(prefix_in(g), carry);
  carry = bcast_last(g);
  return g;
}
inline void q_cols2(const uint8_t* p, IdxV& carry, __m256i& c0, __m256i& c1) {
  const __m256i p0 = prefix_in(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  const __m256i p1 = prefix_in(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  const __m256i t0 = bcast_last(p0);
  c0 = _mm256_add_epi32(p0, carry);
  c1 = _mm256_add_epi32(p1, _mm256_add_epi32(carry, t0));
  carry = _mm256_add_epi32(carry, _mm256_add_epi32(t0, bcast_last(p1)));
}
template <class I> inline void q_cols2(const I* p, IdxV&, __m256i& c0, __m256i& c1) {
  c0 = Vec::load_idx(p);
  c1 = Vec::load_idx(p + 8);
}
inline __m256i q_cols(const uint8_t* p, IdxV& carry) {
  return prefix_gaps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), carry);
}
template <class I> inline __m256i q_cols(const I* p, IdxV&) { return Vec::load_idx(p); }
inline __m256 q_gather(const float* x, __m256i cols) { return _mm256_i32gather_ps(x, cols, 4); }
inline void idx_store(int32_t* p, IdxV cols) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), cols); }
// Byte-shuffle controls of the AVX2 bitmap expansion: byte t of entry m is the rank of bit t
// among the set bits of m, or 0x80 (pshufb writes 0) where bit t is clear.
struct Expand8Table {
  uint64_t ctrl[256];
};
constexpr Expand8Table make_expand8_table() {
  Expand8Table t{};
  for (int m = 0; m < 256; ++m) {
    uint64_t c = 0;
    int r = 0;
    for (int i = 0; i < 8; ++i)
      c |= static_cast<uint64_t>(((m >> i) & 1) ? r++ : 0x80) << (8 * i);
    t.ctrl[m] = c;
  }
  return t;
}
inline constexpr Expand8Table kExpand8 = make_expand8_table();
// Occupancy-bitmap expansion, 8 lanes: lane t is the next stored int8 value (as fp32) when bit
// t of m8 is set, else 0; advances p by popcount(m8). Reads 8 bytes at p when they lie before
// `end` (the bytes past popcount(m8) are ignored), else exactly popcount(m8) bytes.
inline __m256 bitmap_vals(const int8_t*& p, uint32_t m8, const int8_t* end) {
  const int cnt = __builtin_popcount(m8);
  __m128i q;
  if (end - p >= 8) {
    q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  } else {
    int64_t t = 0;
    if (cnt > 0) std::memcpy(&t, p, static_cast<size_t>(cnt));  // p may be null when cnt is 0
    q = _mm_cvtsi64_si128(t);
  }
  p += cnt;
  const __m128i ctrl = _mm_cvtsi64_si128(static_cast<int64_t>(kExpand8.ctrl[m8]));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_shuffle_epi8(q, ctrl)));
}
// Lane permutations of the AVX2 expansion of 32-bit lanes: entry m, lane t = the rank of bit t
// among the set bits of m (0 where bit t is clear; that lane is zeroed separately).
struct Expand8Lanes {
  int32_t perm[256][8];
};
constexpr Expand8Lanes make_expand8_lanes() {
  Expand8Lanes t{};
  for (int m = 0; m < 256; ++m) {
    int r = 0;
    for (int i = 0; i < 8; ++i) t.perm[m][i] = ((m >> i) & 1) ? r++ : 0;
  }
  return t;
}
inline constexpr Expand8Lanes kExpand8Lanes = make_expand8_lanes();
// The packed fp32 lanes d (lane r = the r-th stored value) moved to the set bits of m8, zero
// elsewhere.
inline __m256 expand8_lanes(__m256 d, uint32_t m8) {
  const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kExpand8Lanes.perm[m8]));
  const __m256i bit = _mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(m8)),
                                        _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(d, perm), _mm256_castsi256_ps(_mm256_srai_epi32(bit, 31)));
}
// Float-value bitmap expansion, 8 lanes: as the AVX-512 versions; reads 8 values at p when they
// lie before `end` (those past popcount(m8) are ignored), else exactly popcount(m8) values.
template <class VT>
inline __m256 bitmap_vals(const VT*& p, uint32_t m8, const VT* end) {
  const int cnt = __builtin_popcount(m8);
  __m256 d;
  if (end - p >= 8) {
    d = Vec::load_vals(p);
  } else {
    VT t[8] = {};
    if (cnt > 0) std::memcpy(t, p, static_cast<size_t>(cnt) * sizeof(VT));  // p may be null
    d = Vec::load_vals(t);
  }
  p += cnt;
  return expand8_lanes(d, m8);
}
#endif
// Prefetch of one cache line into L1 (T0) or L2 (T1); no-op on the generic path.
inline void prefetch_t0(const void* p) {
#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
  (void)p;
#endif
}
inline void prefetch_t1(const void* p) {
#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
#else
  (void)p;
#endif
}

// A byte range brought into L2 kLinesPerStep lines per call of step(), interleaved with compute.
// Issued in one burst, a few hundred prefetches fill the core's miss buffers and the core waits
// on them; up to kBurstLines cost nothing measurable and go at once, as do the lines beyond what
// `steps` steps take (docs/kernels.md, "Measured here (AMD EPYC Zen 4)"). step() is straight-line
// code (a loop there cost the BSR micro-kernel registers). The last step may name up to
// kLinesPerStep - 1 lines past the range: prefetches never fault, so the range may name any
// addresses; bytes <= 0 prefetches nothing.
struct L2Trickle {
  static constexpr int64_t kBurstLines = 128;
  static constexpr int kLinesPerStep = 4;
  const char* next = nullptr;
  const char* end = nullptr;
  L2Trickle() = default;
  L2Trickle(const void* begin, int64_t bytes, int64_t steps)
      : next(static_cast<const char*>(begin)), end(next) {
    const int64_t lines = (bytes + 63) / 64;
    if (lines <= 0) return;
    const int64_t most = steps > 0 ? kLinesPerStep * steps : 0;
    const int64_t trickled = lines <= kBurstLines ? 0 : lines < most ? lines : most;
    end = next + 64 * lines;
    for (const char* at_once = end - 64 * trickled; next < at_once; next += 64) prefetch_t1(next);
  }
  void step() {
    if (next >= end) return;
    for (int l = 0; l < kLinesPerStep; ++l) prefetch_t1(next + 64 * l);
    next += 64 * kLinesPerStep;
  }
};

}  // namespace
}  // namespace cpu
}  // namespace sparsekit
