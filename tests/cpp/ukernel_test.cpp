// Stand-alone edge tester of the CPU micro-kernels, called directly (not through the drivers)
// against a float64 reference. Built once per ISA with that ISA's flags
// (benchmarks/micro/build.sh with SRC=tests/cpp/ukernel_test.cpp), driven by
// tests/test_ukernels.py and, under ASan + UBSan, by tools/sanitize.sh.
//
// Covered, each over the value types fp32 / bf16 / fp16 (int8 for the csr_q kernel) and the
// index types uint16 / int32 (uint8 gaps for csr_q):
//   spmv_scalar / spmv_gather<2> / spmv_gather<4> / spmv_assemble (NB = 1, 2)
//       row lengths 0 .. 5W + 3 (around W, 2W, 4W), long rows, unaligned row starts, short rows
//       after W + 1 NaN-valued entries (the AVX2 tail window reads and masks them), x with a
//       row stride, uint16 column 65535 and int32 columns beyond it;
//   row_read_probe, row_gather_probe (benchmarks' probes)
//       row lengths 0 .. 5W + 67 (read) / 5W + 3 (gather), exactly sized and padded rows,
//       byte-exact XOR / the float64 sum of x at the row's columns;
//   csr_row_tile<V, kBounded> (V = 1, 2, 4, 8)
//       lengths around the U-nonzero step, with / without / aliased init, K-block bounds,
//       unaligned tiles, index limits;
//   bsr_spmv_blockrow<CC> (CC = c and CC = 0) and bsr_tile_rows<RB, V, KU>
//       block shapes 1..8 x 1..16, ragged bottom (rows < r) and right (zero padding) edges,
//       empty block rows, accumulate, index limits, the L2 trickle stepped once per block;
//       KU = 1, 2, 4, 8 accumulator sets for one-vector tiles, block counts around the KU step;
//   bsr_spmv_blockrow_vec<CC, NV> (SIMD builds): every block shape the driver gives it (CC = 4,
//       8, 16; NV = 1, 2, 4, 8 vectors), 0 to 17 blocks (around the U-block step), ragged right
//       edge, index limits;
//   L2Trickle (simd.h): ranges around 0, one line and kBurstLines lines, 0 to 1000 steps;
//   q_row_dot, q_rows2_dot (csr_q_impl.h)
//       int8 values (full range, scales applied as the driver does), uint8 gaps with escapes;
//   spmv_bitmap (NB = 1, 2; fp32 / bf16 / fp16) and q_row_bitmap_dot (int8, and its VBMI2 and
//   VNNI versions where the CPU has them)
//       K around the expansion width and 64, empty / full / random words, single columns at the
//       word and chunk edges, values at the end of the array or followed by other bytes; the
//       VNNI integer sum exactly, at the magnitude limits and across its 512-word chunks;
//   pack_x_fixed_planes (AVX-512 with VNNI)
//       every plane byte, the exponent, zero / subnormal / float-max / inf / NaN x;
//   RowChunks (threading.h)
//       every row claimed once under random and concurrent schedules, chunks within one range;
//   pack_x_tile / load_x_row / store_rows_tile (packing.h)
//       N around the tile width, ragged K, bf16 / fp16 activations and outputs, bias, the fused
//       relu epilogue (SpmmParams::activation).
// Values outside the range a kernel may read are NaN, so a kernel that reads past its tail
// reports a mismatch (and ASan sees over-reads of the exactly sized buffers).
//
// Usage: ukernel_test [-v]. Prints one line per kernel and a total; exit 1 on any mismatch.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/csr_q_impl.h"

using namespace sparsekit;
using namespace sparsekit::cpu;

namespace {

#if defined(SPARSEKIT_ISA_AVX512)
const char* kIsaName = "avx512";
#elif defined(SPARSEKIT_ISA_AVX2)
const char* kIsaName = "avx2";
#else
const char* kIsaName = "generic";
#endif
constexpr int W = Vec::W;
const float kNaN = std::numeric_limits<float>::quiet_NaN();
bool g_verbose = false;

// ---- bookkeeping -----------------------------------------------------------------------------
struct Tally {
  const char* name;
  long cases = 0, mismatches = 0;
};
std::vector<Tally> g_tally;
Tally* cur = nullptr;

void begin(const char* name) {
  g_tally.push_back(Tally{name});
  cur = &g_tally.back();
}
// One compared number: |got - ref| <= tol (NaN fails).
void check(double got, double ref, double tol, const std::string& what) {
  ++cur->cases;
  if (std::fabs(got - ref) <= tol) return;
  if (++cur->mismatches <= 5 || g_verbose)
    std::fprintf(stderr, "MISMATCH %s: %s: got %.9g want %.9g (tol %.3g)\n", cur->name,
                 what.c_str(), got, ref, tol);
}
// fp32 accumulation of n terms whose magnitudes sum to s.
double tol_sum(int64_t n, double s) { return 6e-8 * static_cast<double>(n + 16) * s + 1e-30; }

// ---- random numbers (fast, reproducible) -------------------------------------------------------
uint64_t g_state = 0x9e3779b97f4a7c15ull;
uint64_t next_u64() {
  g_state ^= g_state << 13;
  g_state ^= g_state >> 7;
  g_state ^= g_state << 17;
  return g_state;
}
int64_t rnd(int64_t n) { return static_cast<int64_t>(next_u64() % static_cast<uint64_t>(n)); }
// +-[0.5, 1): no term is small enough to hide inside the tolerance.
float rnd_mag() {
  const float m = 0.5f + 0.5f * static_cast<float>(next_u64() >> 40) / 16777216.0f;
  return (next_u64() & 1) ? m : -m;
}

// ---- value types: encode a random value, decode independently to double ---------------------
template <class VT> struct Val;
template <> struct Val<float> {
  static float make() { return rnd_mag(); }
  static float nan() { return kNaN; }
  static double dec(float v) { return v; }
  static const char* name() { return "f32"; }
};
template <> struct Val<bf16_t> {
  static bf16_t make() {  // exponent 126 (|v| in [0.5, 1)), random mantissa and sign
    const uint16_t b = static_cast<uint16_t>((126u << 7) | rnd(128) | (rnd(2) << 15));
    return bf16_t{b};
  }
  static bf16_t nan() { return bf16_t{0x7fc0}; }
  static double dec(bf16_t v) {
    const uint32_t b = static_cast<uint32_t>(v.bits) << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  }
  static const char* name() { return "bf16"; }
};
template <> struct Val<f16_t> {
  static f16_t make() {  // exponent 14 (|v| in [0.5, 1)), random mantissa and sign
    return f16_t{static_cast<uint16_t>((14u << 10) | rnd(1024) | (rnd(2) << 15))};
  }
  static f16_t nan() { return f16_t{0x7e00}; }
  static double dec(f16_t v) {
    const int e = (v.bits >> 10) & 31, m = v.bits & 1023;
    const double mag = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
    return (v.bits & 0x8000) ? -mag : mag;
  }
  static const char* name() { return "f16"; }
};
template <> struct Val<int8_t> {
  static int8_t make() {  // the full range except 0, -128 included
    int v = static_cast<int>(rnd(255)) - 128;
    if (v == 0) v = 127;
    return static_cast<int8_t>(v);
  }
  static int8_t nan() { return 127; }
  static double dec(int8_t v) { return v; }
  static const char* name() { return "i8"; }
};
template <class IT> const char* idx_name();
template <> const char* idx_name<uint16_t>() { return "u16"; }
template <> const char* idx_name<int32_t>() { return "i32"; }
template <> const char* idx_name<uint8_t>() { return "d8"; }

// L distinct sorted columns in [0, K); with `last` the column K - 1 is one of them.
std::vector<int64_t> sorted_cols(int64_t L, int64_t K, bool last) {
  std::vector<char> used(static_cast<size_t>(K), 0);
  std::vector<int64_t> cols;
  if (last && L > 0) {
    used[static_cast<size_t>(K - 1)] = 1;
    cols.push_back(K - 1);
  }
  while (static_cast<int64_t>(cols.size()) < L) {
    const int64_t k = rnd(K);
    if (!used[static_cast<size_t>(k)]) used[static_cast<size_t>(k)] = 1, cols.push_back(k);
  }
  std::vector<int64_t> out;
  for (int64_t k = 0; k < K; ++k)
    if (used[static_cast<size_t>(k)]) out.push_back(k);
  return out;
}

std::vector<float> rnd_floats(size_t n) {
  std::vector<float> v(n);
  for (auto& f : v) f = rnd_mag();
  return v;
}

// A row of L nonzeros stored in a buffer with `pad` NaN-valued entries on both sides (index 0),
// or in exactly sized heap arrays when pad < 0 (ASan sees any over-read).
template <class VT, class IT>
struct Row {
  std::vector<IT> idx;
  std::vector<VT> val;
  int64_t j0 = 0, e = 0;
  Row(const std::vector<int64_t>& cols, int pad) {
    const int64_t L = static_cast<int64_t>(cols.size());
    const int64_t p = pad < 0 ? 0 : pad;
    idx.assign(static_cast<size_t>(L + 2 * p), IT(0));
    val.assign(static_cast<size_t>(L + 2 * p), Val<VT>::nan());
    for (int64_t j = 0; j < L; ++j) {
      idx[static_cast<size_t>(p + j)] = static_cast<IT>(cols[static_cast<size_t>(j)]);
      val[static_cast<size_t>(p + j)] = Val<VT>::make();
    }
    j0 = p;
    e = p + L;
  }
};

// ================================================================================================
// CSR SpMV micro-kernels (ukernel_csr_spmv.h)
// ================================================================================================
// inf0: x is +inf at column 0 when the row does not store it (where masked tails fetch their
// unused lanes), so a kernel that lets 0 * inf into the sum fails.
template <int NB, class VT, class IT, class F>
void spmv_case(F&& kernel, int64_t L, int64_t K, bool last, int pad, const char* kname,
               bool inf0 = false) {
  const std::vector<int64_t> cols = sorted_cols(L, K, last);
  Row<VT, IT> row(cols, pad);
  const int64_t ldx = NB == 1 ? K : K + 3;
  std::vector<float> x(static_cast<size_t>((NB - 1) * ldx + K), kNaN);  // row padding: NaN
  for (int n = 0; n < NB; ++n)
    for (int64_t k = 0; k < K; ++k) x[static_cast<size_t>(n * ldx + k)] = rnd_mag();
  if (inf0 && (cols.empty() || cols[0] != 0))
    for (int n = 0; n < NB; ++n) x[static_cast<size_t>(n * ldx)] = std::numeric_limits<float>::infinity();
  float sums[NB];
  for (int n = 0; n < NB; ++n) sums[n] = 0.25f * static_cast<float>(n + 1);  // adds to sums
  kernel(row.idx.data(), row.val.data(), row.j0, row.e, x.data(), ldx, sums);
  for (int n = 0; n < NB; ++n) {
    double ref = 0.25 * (n + 1), mag = std::fabs(ref);
    for (int64_t j = row.j0; j < row.e; ++j) {
      const double t = Val<VT>::dec(row.val[static_cast<size_t>(j)]) *
                       x[static_cast<size_t>(n * ldx + static_cast<int64_t>(row.idx[static_cast<size_t>(j)]))];
      ref += t;
      mag += std::fabs(t);
    }
    char what[256];
    std::snprintf(what, sizeof what, "%s NB=%d %s/%s L=%lld K=%lld pad=%d n=%d%s", kname, NB,
                  Val<VT>::name(), idx_name<IT>(), static_cast<long long>(L),
                  static_cast<long long>(K), pad, n, inf0 ? " (inf x at column 0)" : "");
    check(sums[n], ref, tol_sum(L, mag), what);
  }
}

template <int NB, class VT, class IT, class F>
void spmv_sweep(F&& kernel, const char* kname) {
  for (int64_t L = 0; L <= 5 * W + 3; ++L)
    // pad W + 1: short rows whose AVX2 tail window reaches into the NaN-valued padding before j0
    for (int pad : {-1, 3, W + 1}) {
      spmv_case<NB, VT, IT>(kernel, L, 2 * L + 7, L % 3 == 0, pad, kname);
      if (pad == 3) spmv_case<NB, VT, IT>(kernel, L, 2 * L + 7, L % 3 == 0, pad, kname, true);
    }
  for (int64_t L : {97, 1025}) spmv_case<NB, VT, IT>(kernel, L, 4 * L + 1, true, 5, kname);
  // Index limits: uint16 column 65535, int32 columns beyond 65535.
  const int64_t K = sizeof(IT) == 2 ? 65536 : 70001;
  for (int64_t L : {1, W - 1, 2 * W + 1, 4 * W + 3, 300})
    spmv_case<NB, VT, IT>(kernel, L, K, true, 1, kname);
}

template <int NB, class VT, class IT>
void spmv_all() {
  spmv_sweep<NB, VT, IT>([](auto... a) { spmv_scalar<NB>(a...); }, "spmv_scalar");
#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
  spmv_sweep<NB, VT, IT>([](auto... a) { spmv_gather<2, NB>(a...); }, "spmv_gather");
  spmv_sweep<NB, VT, IT>([](auto... a) { spmv_gather<4, NB>(a...); }, "spmv_gather4");
  spmv_sweep<NB, VT, IT>([](auto... a) { spmv_assemble<NB>(a...); }, "spmv_assemble");
#endif
}

template <class VT, class IT>
void spmv_types() {
  spmv_all<1, VT, IT>();
  spmv_all<2, VT, IT>();
}

// Read probe (row_read_probe): the XOR of exactly the row's value bytes (bits 0-7) and index
// bytes (bits 8-15), byte by byte as the reference; exactly sized arrays (pad -1) and padded
// rows whose neighbours hold other bytes.
template <class VT, class IT>
void probe_types() {
  for (int64_t L = 0; L <= 5 * W + 3 + 64; ++L)
    for (int pad : {-1, 1, 3}) {
      Row<VT, IT> row(sorted_cols(L, 3 * L + 5, L % 2 == 0), pad);
      uint32_t ref_v = 0, ref_i = 0;
      const auto* vb = reinterpret_cast<const unsigned char*>(row.val.data());
      const auto* ib = reinterpret_cast<const unsigned char*>(row.idx.data());
      for (int64_t b = row.j0 * static_cast<int64_t>(sizeof(VT));
           b < row.e * static_cast<int64_t>(sizeof(VT)); ++b) ref_v ^= vb[b];
      for (int64_t b = row.j0 * static_cast<int64_t>(sizeof(IT));
           b < row.e * static_cast<int64_t>(sizeof(IT)); ++b) ref_i ^= ib[b];
      const uint32_t got = row_read_probe(row.idx.data(), row.val.data(), row.j0, row.e);
      char what[160];
      std::snprintf(what, sizeof what, "row_read_probe %s/%s L=%lld pad=%d", Val<VT>::name(),
                    idx_name<IT>(), static_cast<long long>(L), pad);
      check(static_cast<double>(got), static_cast<double>(ref_v | (ref_i << 8)), 0, what);
    }
}

// Gather probe (row_gather_probe, both fetches: hardware gathers and scalar-load assembly): the
// fp32 sum of x at the row's column ids against a float64 sum, rows of every length around the
// 2W step (the AVX2 tail reads the W ids ending at e), x exactly K long, padded rows whose
// neighbouring ids are 0.
template <bool kAssemble, class IT>
void gather_probe_types() {
  for (int64_t L = 0; L <= 5 * W + 3; ++L)
    for (int pad : {-1, 1, 2, 5})
      for (int draw = 0; draw < 4; ++draw) {
        const int64_t K = 3 * L + 5;
        Row<float, IT> row(sorted_cols(L, K, (L + draw) % 2 == 1), pad);
        std::vector<float> x(static_cast<size_t>(K));
        for (auto& v : x) v = rnd_mag();
        double ref = 0, mag = 0;
        for (int64_t j = row.j0; j < row.e; ++j) {
          const double v = x[static_cast<size_t>(row.idx[static_cast<size_t>(j)])];
          ref += v;
          mag += std::fabs(v);
        }
        const float got = row_gather_probe<kAssemble>(row.idx.data(), row.j0, row.e, x.data());
        char what[160];
        std::snprintf(what, sizeof what, "row_gather_probe<%s> %s L=%lld pad=%d",
                      kAssemble ? "assemble" : "gather", idx_name<IT>(), static_cast<long long>(L),
                      pad);
        check(static_cast<double>(got), ref, tol_sum(L, mag), what);
      }
}

// ================================================================================================
// CSR row x packed tile (ukernel_csr_tile.h)
// ================================================================================================
// mode 0: init = null; 1: separate init; 2: init aliases out. kend < 0: unbounded.
template <int V, class VT, class IT>
void tile_case(int64_t L, int64_t K, bool last, int mode, int64_t kend_sel, int misalign) {
  constexpr int NT = V * W;
  const std::vector<int64_t> cols = sorted_cols(L, K, last);
  Row<VT, IT> row(cols, 2);
  std::vector<float> xt_buf(static_cast<size_t>(K * NT + misalign));
  for (auto& f : xt_buf) f = rnd_mag();
  const float* xt = xt_buf.data() + misalign;
  std::vector<float> out(NT + 1, kNaN), init = rnd_floats(NT);
  float* o = out.data() + misalign;  // any alignment
  const float* in = nullptr;
  if (mode == 1) in = init.data();
  if (mode == 2) {
    for (int t = 0; t < NT; ++t) o[t] = init[t];
    in = o;
  }
  const bool bounded = kend_sel >= 0;
  // K-block end: before the first column, mid-row, just past the last column, or K.
  int64_t kend = K;
  if (bounded && L > 0) {
    const int64_t sel[4] = {cols[0], cols[static_cast<size_t>(L / 2)], cols.back() + 1, K};
    kend = sel[kend_sel % 4];
  }
  int64_t jend = row.e;
  if (bounded)
    for (jend = row.j0; jend < row.e && static_cast<int64_t>(row.idx[static_cast<size_t>(jend)]) < kend;) ++jend;
  const int64_t got_j =
      bounded ? csr_row_tile<V, true>(row.idx.data(), row.val.data(), row.j0, row.e, xt, o, in, kend)
              : csr_row_tile<V>(row.idx.data(), row.val.data(), row.j0, row.e, xt, o, in);
  char what[256];
  std::snprintf(what, sizeof what, "csr_row_tile V=%d %s/%s L=%lld K=%lld init=%d kend=%lld",
                V, Val<VT>::name(), idx_name<IT>(), static_cast<long long>(L),
                static_cast<long long>(K), mode, static_cast<long long>(bounded ? kend : -1));
  check(static_cast<double>(got_j), static_cast<double>(jend), 0, std::string(what) + " return");
  for (int t = 0; t < NT; ++t) {
    double ref = in ? init[t] : 0.0, mag = std::fabs(ref);
    for (int64_t j = row.j0; j < jend; ++j) {
      const double term = Val<VT>::dec(row.val[static_cast<size_t>(j)]) *
                          xt[static_cast<int64_t>(row.idx[static_cast<size_t>(j)]) * NT + t];
      ref += term;
      mag += std::fabs(term);
    }
    check(o[t], ref, tol_sum(jend - row.j0, mag), std::string(what) + " t=" + std::to_string(t));
  }
}

template <int V, class VT, class IT>
void tile_all() {
  for (int64_t L = 0; L <= 13; ++L)
    for (int mode = 0; mode < 3; ++mode) {
      tile_case<V, VT, IT>(L, 3 * L + 5, L % 2 == 1, mode, -1, static_cast<int>(L % 2));
      for (int s = 0; s < 4; ++s) tile_case<V, VT, IT>(L, 3 * L + 5, false, mode, s, 0);
    }
  tile_case<V, VT, IT>(150, 400, true, 1, -1, 1);
  tile_case<V, VT, IT>(150, 400, true, 2, 1, 0);
  if (V == 1) {  // index limits (the packed tile has K rows of NT floats)
    const int64_t K = sizeof(IT) == 2 ? 65536 : 70001;
    for (int64_t L : {1, 5, 9}) {
      tile_case<V, VT, IT>(L, K, true, 0, -1, 0);
      tile_case<V, VT, IT>(L, K, true, 1, 2, 0);
    }
  }
}

template <class VT, class IT>
void tile_types() {
  tile_all<1, VT, IT>();
  tile_all<2, VT, IT>();
  tile_all<4, VT, IT>();
  tile_all<8, VT, IT>();
}

// ================================================================================================
// BSR (ukernel_bsr.h)
// ================================================================================================
// One block row of nb blocks of r x c over Kb block columns; K = Kb * c - ragged (>= 1). Value
// rows >= rows are NaN (the kernels must not read them); columns >= K are zero (format padding).
template <class VT, class IT>
struct BlockRow {
  std::vector<IT> idx;
  std::vector<VT> val;
  std::vector<int64_t> bcols;
  BlockRow(int64_t nb, int64_t Kb, int r, int c, int rows, int64_t K, bool last) {
    bcols = sorted_cols(nb, Kb, last);
    for (int64_t b = 0; b < nb; ++b) {
      idx.push_back(static_cast<IT>(bcols[static_cast<size_t>(b)]));
      for (int i = 0; i < r; ++i)
        for (int j = 0; j < c; ++j) {
          const int64_t k = bcols[static_cast<size_t>(b)] * c + j;
          VT v = Val<VT>::make();
          if (i >= rows) v = Val<VT>::nan();
          else if (k >= K) v = VT{};  // zero padding (bits 0 for bf16 / fp16)
          val.push_back(v);
        }
    }
  }
  double ref(int i, int c, int r, const float* xcol, int64_t ldt) const {  // row i, one batch col
    double s = 0;
    for (size_t b = 0; b < bcols.size(); ++b)
      for (int j = 0; j < c; ++j)
        s += Val<VT>::dec(val[b * r * c + static_cast<size_t>(i) * c + j]) *
             xcol[(bcols[b] * c + j) * ldt];
    return s;
  }
  double mag(int i, int c, int r, const float* xcol, int64_t ldt) const {
    double s = 0;
    for (size_t b = 0; b < bcols.size(); ++b)
      for (int j = 0; j < c; ++j)
        s += std::fabs(Val<VT>::dec(val[b * r * c + static_cast<size_t>(i) * c + j]) *
                       xcol[(bcols[b] * c + j) * ldt]);
    return s;
  }
};

template <int CC, class VT, class IT>
void blockrow_case(int64_t nb, int r, int c, int rows, int64_t Kb, bool last) {
  const int64_t K = c > 1 ? Kb * c - 1 : Kb * c;  // ragged right edge
  BlockRow<VT, IT> br(nb, Kb, r, c, rows, K, last);
  std::vector<float> xs(static_cast<size_t>(Kb * c), 0.f);  // zero-padded to whole blocks
  for (int64_t k = 0; k < K; ++k) xs[static_cast<size_t>(k)] = rnd_mag();
  std::vector<float> acc(static_cast<size_t>(rows * c), kNaN), out(static_cast<size_t>(rows), kNaN);
  bsr_spmv_blockrow<CC>(br.idx.data(), br.val.data(), 0, nb, r, c, rows, xs.data(), acc.data(),
                        out.data());
  for (int i = 0; i < rows; ++i) {
    char what[256];
    std::snprintf(what, sizeof what, "bsr_spmv_blockrow CC=%d %dx%d rows=%d %s/%s nb=%lld Kb=%lld i=%d",
                  CC, r, c, rows, Val<VT>::name(), idx_name<IT>(), static_cast<long long>(nb),
                  static_cast<long long>(Kb), i);
    check(out[static_cast<size_t>(i)], br.ref(i, c, r, xs.data(), 1),
          tol_sum(nb * c, br.mag(i, c, r, xs.data(), 1)), what);
  }
}

template <int CC, class VT, class IT>
void blockrow_c(int c) {
  for (int r : {1, 2, 3, 4, 8})
    for (int rows : {r, r - 1, 1}) {
      if (rows < 1) continue;
      for (int64_t nb : {0, 1, 2, 3, 5}) blockrow_case<CC, VT, IT>(nb, r, c, rows, 2 * nb + 3, nb == 3);
    }
  const int64_t Kb = sizeof(IT) == 2 ? 65536 : 70001;  // block-column index limits
  if (c <= 2) blockrow_case<CC, VT, IT>(4, 2, c, 2, Kb, true);
}

#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
template <int CC, int NV, class VT, class IT>
void blockrow_vec_case(int64_t nb, int64_t Kb, bool last) {
  constexpr int r = NV * W / CC;
  const int64_t K = Kb * CC - 1;  // ragged right edge: the last column is zero padding
  BlockRow<VT, IT> br(nb, Kb, r, CC, r, K, last);
  std::vector<float> xs(static_cast<size_t>(Kb * CC), 0.f);
  for (int64_t k = 0; k < K; ++k) xs[static_cast<size_t>(k)] = rnd_mag();
  std::vector<float> out(static_cast<size_t>(r), kNaN);
  bsr_spmv_blockrow_vec<CC, NV>(br.idx.data(), br.val.data(), 0, nb, xs.data(), out.data());
  for (int i = 0; i < r; ++i) {
    char what[256];
    std::snprintf(what, sizeof what, "bsr_spmv_blockrow_vec %dx%d NV=%d %s/%s nb=%lld Kb=%lld i=%d",
                  r, CC, NV, Val<VT>::name(), idx_name<IT>(), static_cast<long long>(nb),
                  static_cast<long long>(Kb), i);
    check(out[static_cast<size_t>(i)], br.ref(i, CC, r, xs.data(), 1),
          tol_sum(nb * CC, br.mag(i, CC, r, xs.data(), 1)), what);
  }
}

// Every (CC, NV) the driver can pick (bsr_blockrow_vec_takes).
template <int CC, int NV, class VT, class IT>
void blockrow_vec_nv() {
  if constexpr (bsr_blockrow_vec_takes<CC, NV>()) {
    for (int64_t nb : {0, 1, 2, 3, 5, 17}) blockrow_vec_case<CC, NV, VT, IT>(nb, 2 * nb + 3, nb == 3);
    const int64_t Kb = sizeof(IT) == 2 ? 65536 : 70001;  // block-column index limits
    blockrow_vec_case<CC, NV, VT, IT>(4, Kb, true);
  }
}
template <int CC, class VT, class IT>
void blockrow_vec_cc() {
  blockrow_vec_nv<CC, 1, VT, IT>();
  blockrow_vec_nv<CC, 2, VT, IT>();
  blockrow_vec_nv<CC, 4, VT, IT>();
  blockrow_vec_nv<CC, 8, VT, IT>();
}
template <class VT, class IT>
void blockrow_vec_types() {
  blockrow_vec_cc<4, VT, IT>();
  blockrow_vec_cc<8, VT, IT>();
  blockrow_vec_cc<16, VT, IT>();
}
#endif

template <class VT, class IT>
void blockrow_types() {
  blockrow_c<1, VT, IT>(1);
  blockrow_c<2, VT, IT>(2);
  blockrow_c<4, VT, IT>(4);
  blockrow_c<8, VT, IT>(8);
  blockrow_c<16, VT, IT>(16);
  for (int c : {1, 2, 3, 4, 5, 8, 16}) blockrow_c<0, VT, IT>(c);
}

// L2Trickle over `bytes` in `steps` steps: ranges of up to kBurstLines lines go at once, longer
// ones kLinesPerStep lines per step after what does not fit the steps; after `steps` calls of
// step() every line of the range has been named once (ceil(bytes / 64) lines), and fewer than
// kLinesPerStep beyond it; nothing for bytes <= 0.
void l2_trickle_cases() {
  static const char range[26944] = {};  // the largest case's lines and a step beyond
  constexpr int64_t kStep = L2Trickle::kLinesPerStep;
  const int64_t burst = L2Trickle::kBurstLines * 64;
  for (int64_t bytes : {int64_t{-64}, int64_t{0}, int64_t{1}, int64_t{63}, int64_t{64},
                        int64_t{640}, burst - 1, burst, burst + 1, burst + 64, int64_t{26624},
                        int64_t{26625}})
    for (int64_t steps : {0, 1, 2, 7, 26, 104, 1000}) {
      L2Trickle pf(range, bytes, steps);
      const int64_t lines = bytes > 0 ? (bytes + 63) / 64 : 0;
      const int64_t trickled = lines <= L2Trickle::kBurstLines ? 0 : std::min(lines, kStep * steps);
      const int64_t named = lines - trickled + (trickled + kStep - 1) / kStep * kStep;
      const std::string what = "L2Trickle bytes=" + std::to_string(bytes) +
                               " steps=" + std::to_string(steps);
      check(static_cast<double>((pf.next - range) / 64), static_cast<double>(lines - trickled),
            0.0, what + " (constructor)");
      for (int64_t k = 0; k < steps; ++k) pf.step();
      check(static_cast<double>((pf.next - range) / 64), static_cast<double>(named), 0.0, what);
      check(static_cast<double>(named - lines), (kStep - 1) / 2.0, (kStep - 1) / 2.0,
            what + " (beyond)");
    }
}

template <int RB, int V, int KU, class VT, class IT>
void bsr_tile_case(int64_t nb, int r, int c, int i0, bool accumulate, int64_t Kb, bool last) {
  constexpr int NT = V * W;
  const int rows = i0 + RB;  // rows below i0 + RB are NaN: never read
  const int64_t K = c > 1 ? Kb * c - 1 : Kb * c;
  BlockRow<VT, IT> br(nb, Kb, r, c, rows, K, last);
  std::vector<float> xt(static_cast<size_t>(Kb * c * NT), 0.f);  // packed, zero rows k >= K
  for (int64_t k = 0; k < K; ++k)
    for (int t = 0; t < NT; ++t) xt[static_cast<size_t>(k * NT + t)] = rnd_mag();
  std::vector<float> out = accumulate ? rnd_floats(RB * NT) : std::vector<float>(RB * NT, kNaN);
  const std::vector<float> start = out;
  // The L2 trickle (prefetches of a later group's values) steps once per block, whatever it
  // names: here a random range of up to nb + 2 steps' lines, so it runs dry in some calls.
  const char* pf_base = reinterpret_cast<const char*>(br.val.data());
  const int64_t pf_lines = rnd(L2Trickle::kLinesPerStep * (nb + 2));
  L2Trickle pf;
  pf.next = pf_base;
  pf.end = pf_base + 64 * pf_lines;
  bsr_tile_rows<RB, V, KU>(br.idx.data(), br.val.data(), 0, nb, r, c, i0, xt.data(), out.data(),
                           accumulate, pf);
  const int64_t pf_steps = std::min(nb, (pf_lines + L2Trickle::kLinesPerStep - 1) /
                                            L2Trickle::kLinesPerStep);
  check(static_cast<double>((pf.next - pf_base) / 64),
        static_cast<double>(pf_steps * L2Trickle::kLinesPerStep), 0.0,
        "bsr_tile_rows: prefetch lines issued (one trickle step per block)");
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < NT; ++t) {
      const double s0 = accumulate ? start[static_cast<size_t>(i * NT + t)] : 0.0;
      char what[256];
      std::snprintf(what, sizeof what,
                    "bsr_tile_rows RB=%d V=%d KU=%d %dx%d i0=%d acc=%d %s/%s nb=%lld Kb=%lld i=%d t=%d",
                    RB, V, KU, r, c, i0, accumulate, Val<VT>::name(), idx_name<IT>(),
                    static_cast<long long>(nb), static_cast<long long>(Kb), i, t);
      check(out[static_cast<size_t>(i * NT + t)], s0 + br.ref(i0 + i, c, r, xt.data() + t, NT),
            tol_sum(nb * c, std::fabs(s0) + br.mag(i0 + i, c, r, xt.data() + t, NT)), what);
    }
}

template <int RB, int V, int KU, class VT, class IT>
void bsr_tile_rb_ku() {
  // block counts around the KU-block step of the accumulator sets (and the remainder after it)
  std::vector<int64_t> counts = {0, 1, 2, 5};
  if (KU > 1)
    for (int64_t nb : {KU - 1, KU, KU + 1, 2 * KU + 3}) counts.push_back(nb);
  for (int r : {RB, RB + 1, 16}) {
    if (r < RB) continue;
    for (int c : {1, 3, 4, 8})
      for (int64_t nb : counts)
        for (bool acc : {false, true}) {
          bsr_tile_case<RB, V, KU, VT, IT>(nb, r, c, 0, acc, nb + 2, nb == 2);
          if (r > RB) bsr_tile_case<RB, V, KU, VT, IT>(nb, r, c, r - RB, acc, nb + 2, false);
        }
  }
  if (V == 1) {  // block-column index limits (c = 1 keeps the packed tile small)
    const int64_t Kb = sizeof(IT) == 2 ? 65536 : 70001;
    bsr_tile_case<RB, V, KU, VT, IT>(3 + KU, RB, 1, 0, false, Kb, true);
  }
}

// Every accumulator-set count the kernel takes for one-vector tiles (bsr_block_unroll picks
// among them per ISA and register block), one set for wider tiles as the driver uses them.
template <int RB, int V, class VT, class IT>
void bsr_tile_rb() {
  bsr_tile_rb_ku<RB, V, 1, VT, IT>();
  if constexpr (V == 1) {
    bsr_tile_rb_ku<RB, V, 2, VT, IT>();
    bsr_tile_rb_ku<RB, V, 4, VT, IT>();
    bsr_tile_rb_ku<RB, V, 8, VT, IT>();
  }
  static_assert(V == 1 || bsr_block_unroll<RB, V>() == 1, "test the sets the driver takes");
}

template <int V, class VT, class IT>
void bsr_tile_v() {
  bsr_tile_rb<1, V, VT, IT>();
  bsr_tile_rb<2, V, VT, IT>();
  bsr_tile_rb<4, V, VT, IT>();
  bsr_tile_rb<8, V, VT, IT>();
}

template <class VT, class IT>
void bsr_tile_types() {
  bsr_tile_v<1, VT, IT>();
  bsr_tile_v<2, VT, IT>();
  bsr_tile_v<4, VT, IT>();
}

// ================================================================================================
// Compressed CSR row (csr_q_impl.h): int8 values, uint8 gaps with escapes
// ================================================================================================
template <class VT, class IT>
void q_case(int64_t L, int64_t K, bool last, int pad, float scale) {
  const std::vector<int64_t> cols = sorted_cols(L, K, last);
  std::vector<IT> sidx;   // stored indices (column ids, or gaps with escapes)
  std::vector<int64_t> scol;  // column of each stored entry
  std::vector<VT> sval;
  int64_t prev = 0;
  for (int64_t k : cols) {
    if (std::is_same<IT, uint8_t>::value) {
      while (k - prev > 255) {  // escape: gap 255, value 0
        prev += 255;
        sidx.push_back(static_cast<IT>(255));
        scol.push_back(prev);
        sval.push_back(VT{});
      }
      sidx.push_back(static_cast<IT>(k - prev));
      prev = k;
    } else {
      sidx.push_back(static_cast<IT>(k));
    }
    scol.push_back(k);
    sval.push_back(Val<VT>::make());
  }
  const int64_t n = static_cast<int64_t>(sidx.size());
  const int64_t p = pad < 0 ? 0 : pad;
  std::vector<IT> idx(static_cast<size_t>(n + 2 * p), IT(0));
  std::vector<VT> val(static_cast<size_t>(n + 2 * p), Val<VT>::nan());
  for (int64_t j = 0; j < n; ++j) {
    idx[static_cast<size_t>(p + j)] = sidx[static_cast<size_t>(j)];
    val[static_cast<size_t>(p + j)] = sval[static_cast<size_t>(j)];
  }
  std::vector<float> x(static_cast<size_t>(K));
  for (auto& f : x) f = rnd_mag();
  double ref = 0, mag = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double t = Val<VT>::dec(sval[static_cast<size_t>(j)]) * x[static_cast<size_t>(scol[static_cast<size_t>(j)])];
    ref += t;
    mag += std::fabs(t);
  }
  for (int fetch = 0; fetch < 2; ++fetch) {  // x gathered, then assembled (csrq_assemble)
    // Scaled as csrq_linear_t does (scale after the dot product).
    const float got = (fetch ? q_row_dot<true, VT, IT>(idx.data(), val.data(), p, p + n, x.data())
                             : q_row_dot<false, VT, IT>(idx.data(), val.data(), p, p + n, x.data())) *
                      scale;
    char what[256];
    std::snprintf(what, sizeof what, "q_row_dot<%s> %s/%s L=%lld stored=%lld K=%lld pad=%d",
                  fetch ? "assemble" : "gather", Val<VT>::name(), idx_name<IT>(),
                  static_cast<long long>(L), static_cast<long long>(n), static_cast<long long>(K), pad);
    check(got, ref * scale, tol_sum(n, mag) * std::fabs(scale) + 1e-30, what);
  }
}

template <class VT, class IT>
void q_types() {
  const float scales[3] = {1.f, 0.0078125f, -3.5f};
  for (int64_t L = 0; L <= 5 * W + 3; ++L)
    for (int pad : {-1, 3}) {
      q_case<VT, IT>(L, L + 3, L % 4 == 1, pad, scales[L % 3]);      // dense: gaps of 1-3
      q_case<VT, IT>(L, 40 * L + 300, L % 2 == 0, pad, scales[L % 3]);  // sparse: escapes
    }
  for (int64_t L : {97, 1025}) q_case<VT, IT>(L, 4 * L + 1, true, 5, 1.f);
  const int64_t K = sizeof(IT) == 2 ? 65536 : 70001;  // index limits (gaps: long escape runs)
  for (int64_t L : {1, W + 1, 4 * W + 3, 300}) q_case<VT, IT>(L, K, true, 1, 0.5f);
}

// ================================================================================================
// Packing (packing.h): x -> fp32 rows / tiles, tile -> y
// ================================================================================================
template <class XT>
struct XBuf {  // N x ldx activations of type XT (row padding NaN), with their fp32 values
  std::vector<XT> x;
  std::vector<float> f;
  XBuf(int64_t N, int64_t K, int64_t ldx) : x(static_cast<size_t>(N * ldx), Val<XT>::nan()),
                                           f(static_cast<size_t>(N * ldx), kNaN) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        x[static_cast<size_t>(n * ldx + k)] = Val<XT>::make();
        f[static_cast<size_t>(n * ldx + k)] = static_cast<float>(Val<XT>::dec(x[static_cast<size_t>(n * ldx + k)]));
      }
  }
};
template <class XT> DType dtype_of();
template <> DType dtype_of<float>() { return DType::F32; }
template <> DType dtype_of<bf16_t>() { return DType::BF16; }
template <> DType dtype_of<f16_t>() { return DType::F16; }

template <class XT>
void pack_case(int NT, int64_t N, int64_t K) {
  const int64_t ldx = K + 2, kpad = K + 5;
  XBuf<XT> xb(N, K, ldx);
  SpmmParams p;
  p.N = N;
  p.K = K;
  p.x = xb.x.data();
  p.ldx = ldx;
  p.x_dtype = dtype_of<XT>();
  const int64_t ntiles = (N + NT - 1) / NT;
  for (int64_t tile = 0; tile < ntiles; ++tile) {
    std::vector<float> xt(static_cast<size_t>(kpad * NT), kNaN);
    const int64_t kh = kpad / 2;  // two k ranges, as two threads pack them
    pack_x_tile(p, xt.data(), NT, tile * NT, 0, kh);
    pack_x_tile(p, xt.data(), NT, tile * NT, kh, kpad);
    for (int64_t k = 0; k < kpad; ++k)
      for (int t = 0; t < NT; ++t) {
        const int64_t n = tile * NT + t;
        const double want = (n < N && k < K) ? xb.f[static_cast<size_t>(n * ldx + k)] : 0.0;
        char what[256];
        std::snprintf(what, sizeof what, "pack_x_tile %s NT=%d N=%lld K=%lld tile=%lld k=%lld t=%d",
                      Val<XT>::name(), NT, static_cast<long long>(N), static_cast<long long>(K),
                      static_cast<long long>(tile), static_cast<long long>(k), t);
        check(xt[static_cast<size_t>(k * NT + t)], want, 0, what);
      }
  }
  for (int64_t n = 0; n < N; n += (N > 3 ? N - 1 : 1)) {  // load_x_row: first and last row
    std::vector<float> xs(static_cast<size_t>(kpad), kNaN);
    load_x_row(p, n, xs.data(), kpad, 0, K / 2);
    load_x_row(p, n, xs.data(), kpad, K / 2, kpad);
    for (int64_t k = 0; k < kpad; ++k)
      check(xs[static_cast<size_t>(k)], k < K ? xb.f[static_cast<size_t>(n * ldx + k)] : 0.0, 0,
            std::string("load_x_row ") + Val<XT>::name() + " k=" + std::to_string(k));
  }
}

template <class YT>
double y_value(const std::vector<YT>& y, size_t i) { return Val<YT>::dec(y[i]); }

template <class YT>
void store_case(int NT, int64_t rows, int64_t nn, int64_t n0, int64_t m0, bool with_bias,
                bool relu) {
  const int64_t M = m0 + rows + 2, ldy = M + 3, N = n0 + nn + 1;
  const std::vector<float> part = rnd_floats(static_cast<size_t>(rows * NT));
  const std::vector<float> bias = rnd_floats(static_cast<size_t>(M));
  const YT sentinel = Val<YT>::make();
  std::vector<YT> y(static_cast<size_t>(N * ldy), sentinel);
  std::vector<float> tbuf(static_cast<size_t>(rows * nn), kNaN);
  SpmmParams p;
  p.M = M;
  p.N = N;
  p.y = y.data();
  p.ldy = ldy;
  p.x_dtype = dtype_of<YT>();
  p.bias = with_bias ? bias.data() : nullptr;
  p.activation = relu ? Activation::Relu : Activation::None;
  store_rows_tile(p, part.data(), NT, rows, nn, n0, m0, tbuf.data());
  // bf16 / fp16 outputs are rounded once: allow half an ulp of the stored type.
  const double rel = std::is_same<YT, float>::value ? 0.0 : (std::is_same<YT, bf16_t>::value ? 0x1p-8 : 0x1p-11);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < ldy; ++m) {
      const size_t at = static_cast<size_t>(n * ldy + m);
      const bool written = n >= n0 && n < n0 + nn && m >= m0 && m < m0 + rows;
      double want = Val<YT>::dec(sentinel);
      if (written) {
        const float v = part[static_cast<size_t>((m - m0) * NT + (n - n0))] +
                        (with_bias ? bias[static_cast<size_t>(m)] : 0.f);
        want = relu && v < 0.f ? 0.0 : v;
      }
      char what[256];
      std::snprintf(what, sizeof what, "store_rows_tile %s NT=%d rows=%lld nn=%lld n0=%lld m0=%lld bias=%d relu=%d n=%lld m=%lld",
                    Val<YT>::name(), NT, static_cast<long long>(rows), static_cast<long long>(nn),
                    static_cast<long long>(n0), static_cast<long long>(m0), with_bias, relu,
                    static_cast<long long>(n), static_cast<long long>(m));
      check(y_value(y, at), want, written ? rel * std::fabs(want) : 0.0, what);
    }
}

template <class XT>
void packing_types() {
  for (int V : {1, 2, 4, 8}) {
    const int NT = V * W;
    for (int64_t N : {1, W - 1, W, W + 1, NT - 1, NT, NT + 1, 2 * NT + 3})
      for (int64_t K : {1, 7, 33}) pack_case<XT>(NT, N, K);
    for (int64_t rows : {1, W - 1, W, W + 1, 33, 64})
      for (int64_t nn : {1, W - 1, W, NT}) {
        if (nn < 1 || nn > NT) continue;
        for (bool relu : {false, true})
          store_case<XT>(NT, rows, nn, rows % 2 ? 0 : NT, rows % 3 ? 0 : 5, nn % 2 == 1, relu);
      }
  }
}

// One stored row for the pair test: stored indices (gaps with escapes for uint8), values and the
// float64 dot product with x.
template <class VT, class IT>
double q_stored_row(int64_t L, int64_t K, bool last, const std::vector<float>& x,
                    std::vector<IT>& idx, std::vector<VT>& val, double& mag) {
  int64_t prev = 0;
  double ref = 0;
  mag = 0;
  for (int64_t k : sorted_cols(L, K, last)) {
    if (std::is_same<IT, uint8_t>::value) {
      while (k - prev > 255) {
        prev += 255;
        idx.push_back(static_cast<IT>(255));
        val.push_back(VT{});
      }
      idx.push_back(static_cast<IT>(k - prev));
      prev = k;
    } else {
      idx.push_back(static_cast<IT>(k));
    }
    val.push_back(Val<VT>::make());
    const double t = Val<VT>::dec(val.back()) * x[static_cast<size_t>(k)];
    ref += t;
    mag += std::fabs(t);
  }
  return ref;
}

// q_rows2_dot on two adjacent rows of lengths L0, L1 (any mix of empty, tail-only and long
// rows), each against the float64 reference; NaN values around the rows catch over-reads.
template <class VT, class IT>
void q_pair_case(int64_t L0, int64_t L1, int64_t K, int pad) {
  std::vector<float> x(static_cast<size_t>(K));
  for (auto& f : x) f = rnd_mag();
  std::vector<IT> idx(static_cast<size_t>(pad), IT(0));
  std::vector<VT> val(static_cast<size_t>(pad), Val<VT>::nan());
  double mag0, mag1;
  const double ref0 = q_stored_row<VT, IT>(L0, K, L0 % 2 == 1, x, idx, val, mag0);
  const int64_t mid = static_cast<int64_t>(idx.size());
  const double ref1 = q_stored_row<VT, IT>(L1, K, L1 % 3 == 0, x, idx, val, mag1);
  const int64_t end = static_cast<int64_t>(idx.size());
  idx.resize(static_cast<size_t>(end + pad), IT(0));
  val.resize(static_cast<size_t>(end + pad), Val<VT>::nan());
  float d0 = 0, d1 = 0;
  q_rows2_dot<VT, IT>(idx.data(), val.data(), pad, mid, mid, end, x.data(), d0, d1);
  char what[256];
  std::snprintf(what, sizeof what, "q_rows2_dot %s/%s L0=%lld L1=%lld K=%lld row 0",
                Val<VT>::name(), idx_name<IT>(), static_cast<long long>(L0),
                static_cast<long long>(L1), static_cast<long long>(K));
  check(d0, ref0, tol_sum(mid - pad, mag0) + 1e-30, what);
  what[std::strlen(what) - 1] = '1';
  check(d1, ref1, tol_sum(end - mid, mag1) + 1e-30, what);
}

template <class VT, class IT>
void q_pair_types() {
  const int64_t lens[] = {0, 1, W - 1, W, W + 1, 2 * W - 1, 2 * W, 2 * W + 1, 4 * W + 3, 7 * W};
  for (int64_t L0 : lens)
    for (int64_t L1 : lens) {
      q_pair_case<VT, IT>(L0, L1, 2 * (L0 + L1) + 5, 3);  // dense rows: small gaps
      const int64_t Ks = 300 * (L0 + L1) + 600;  // sparse rows: escapes (gap coding)
      q_pair_case<VT, IT>(L0, L1, sizeof(IT) == 2 ? std::min<int64_t>(Ks, 65536) : Ks, 0);
    }
  q_pair_case<VT, IT>(300, 1, sizeof(IT) == 2 ? 65536 : 70001, 2);
}

// Tails with an infinite x where a masked tail's unused lanes look: column 0 (not stored; plain
// ids load as 0 there) and the last stored column (gap coding repeats it). The sum must be the
// stored entries' (+-inf when the last column's x is inf), never the NaN of 0 * inf. Lengths
// cover every tail after one and two full vectors; both fetches, and the gather pair kernel.
template <class VT, class IT>
void q_tail_inf_cases() {
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t L = 1; L <= 2 * W + W - 1; ++L)
    for (int at_last = 0; at_last < 2; ++at_last) {
      const int64_t K = 2 * L + 2;
      std::vector<IT> idx;
      std::vector<VT> val;
      std::vector<float> x(static_cast<size_t>(K));
      for (auto& f : x) f = rnd_mag();
      int64_t prev = 0;
      double ref = 0, mag = 0;
      for (int64_t i = 0; i < L; ++i) {  // columns 1, 3, 5, ...: gaps 1 then 2, no escapes
        const int64_t k = 2 * i + 1;
        idx.push_back(static_cast<IT>(std::is_same<IT, uint8_t>::value ? k - prev : k));
        prev = k;
        val.push_back(Val<VT>::make());
      }
      x[at_last ? static_cast<size_t>(prev) : 0] = inf;
      for (int64_t i = 0; i < L; ++i) {
        const double t = Val<VT>::dec(val[static_cast<size_t>(i)]) * x[static_cast<size_t>(2 * i + 1)];
        ref += t;
        mag += std::isinf(t) ? 0.0 : std::fabs(t);
      }
      // q_row_dot with either fetch, and the gather pair kernel (csrq_rows2's masked tail) on
      // the row as the second of a pair after an empty row
      float d0 = 1.f, d1 = 0.f;
      q_rows2_dot<VT, IT>(idx.data(), val.data(), 0, 0, 0, L, x.data(), d0, d1);
      const float got[3] = {q_row_dot<false, VT, IT>(idx.data(), val.data(), 0, L, x.data()),
                            q_row_dot<true, VT, IT>(idx.data(), val.data(), 0, L, x.data()), d1};
      const char* kernel[3] = {"q_row_dot<gather>", "q_row_dot<assemble>", "q_rows2_dot"};
      for (int k = 0; k < 3; ++k) {
        char what[160];
        std::snprintf(what, sizeof what, "q tail, inf x at %s, %s %s/%s L=%lld",
                      at_last ? "the last column" : "column 0", kernel[k], Val<VT>::name(),
                      idx_name<IT>(), static_cast<long long>(L));
        if (std::isinf(ref)) check(got[k] == ref ? 0.0 : 1.0, 0.0, 0.0, what);
        else check(got[k], ref, tol_sum(L, mag), what);
      }
      check(d0, 0.0, 0.0, "q tail: the empty first row of the pair");
    }
}

template <class VT>
void q_index_types() {
  q_types<VT, uint16_t>();
  q_types<VT, int32_t>();
  q_types<VT, uint8_t>();
  q_pair_types<VT, uint16_t>();
  q_pair_types<VT, int32_t>();
  q_pair_types<VT, uint8_t>();
  q_tail_inf_cases<VT, uint16_t>();
  q_tail_inf_cases<VT, int32_t>();
  q_tail_inf_cases<VT, uint8_t>();
}

// q_row_bitmap_dot (and the VBMI2 version where the CPU has it) on one row of K columns whose
// stored columns are drawn with probability `density` (plus the forced ones): x and the value
// array exactly sized (ASan sees any over-read), the row's values at the end of the array
// (at_end) or followed by other bytes, which the AVX2 expansion may read but must ignore.
void q_bitmap_case(int64_t K, double density, bool at_end, std::initializer_list<int64_t> forced) {
  const int64_t nw = (K + 63) / 64;
  std::vector<float> x(static_cast<size_t>(K));
  for (auto& f : x) f = rnd_mag();
  std::vector<uint64_t> words(static_cast<size_t>(nw), 0);
  std::vector<int8_t> val;
  double ref = 0, mag = 0;
  for (int64_t k = 0; k < K; ++k) {
    bool on = static_cast<double>(next_u64() % 1000000) < density * 1e6;
    for (int64_t f : forced) on |= f == k;
    if (!on) continue;
    words[static_cast<size_t>(k / 64)] |= uint64_t(1) << (k % 64);
    const int8_t q = static_cast<int8_t>(static_cast<int>(next_u64() % 255) - 127);
    val.push_back(q);
    ref += double(q) * x[static_cast<size_t>(k)];
    mag += std::fabs(double(q) * x[static_cast<size_t>(k)]);
  }
  const int64_t nnz = static_cast<int64_t>(val.size());
  if (!at_end)
    for (int i = 0; i < 11; ++i) val.push_back(static_cast<int8_t>(0x7f - i));
  const int8_t* end = val.data() + val.size();
  char what[200];
  std::snprintf(what, sizeof what, "q_row_bitmap_dot K=%lld nnz=%lld density=%.2f%s",
                static_cast<long long>(K), static_cast<long long>(nnz), density,
                at_end ? " at end" : "");
  check(q_row_bitmap_dot(words.data(), K, val.data(), end, x.data()), ref, tol_sum(nnz, mag), what);
#if defined(SPARSEKIT_ISA_AVX512)
  if (has_avx512_vbmi2())
    check(q_row_bitmap_dot_vbmi2(words.data(), K, val.data(), x.data()), ref, tol_sum(nnz, mag),
          std::string(what) + " (vbmi2)");
  if (has_avx512_vnni_vbmi2()) {
    // exactly sized planes; the integer sum against one computed here from the fixed-point
    // definition (must be equal), then the value against the float64 reference
    const int64_t stride = 64 * nw;
    std::vector<uint8_t> planes(static_cast<size_t>(4 * stride));
    int e = 0;
    if (!pack_x_fixed_planes(x.data(), K, stride, planes.data(), e)) {
      check(1, 0, 0, std::string(what) + " (vnni): finite x rejected");
      return;
    }
    int64_t want = 0, rowsum = 0;
    size_t j = 0;
    for (int64_t k = 0; k < K; ++k)
      if (words[static_cast<size_t>(k / 64)] >> (k % 64) & 1) {
        const int64_t xu = std::llrint(std::ldexp(double(x[static_cast<size_t>(k)]), e)) + (int64_t(1) << 31);
        want += val[j] * xu;
        rowsum += val[j++];
      }
    const int64_t got = q_row_bitmap_dot_vnni(words.data(), K, val.data(), planes.data(), stride);
    check(static_cast<double>(got - want), 0, 0, std::string(what) + " (vnni, integer sum)");
    check(std::ldexp(static_cast<double>(got - rowsum * (int64_t(1) << 31)), -e), ref,
          tol_sum(nnz, mag), std::string(what) + " (vnni)");
  }
#endif
}

#if defined(SPARSEKIT_ISA_AVX512)
// pack_x_fixed_planes against its definition: every byte of every plane (zeros beyond K), the
// exponent (largest with max |x| * 2^e < 2^30), elements within 2^6 of the maximum exact;
// subnormal-only, huge, all-zero and single-element x; inf or NaN anywhere: rejected.
void fixed_planes_case(std::vector<float> x, int64_t stride, const char* what) {
  const int64_t K = static_cast<int64_t>(x.size());
  std::vector<uint8_t> planes(static_cast<size_t>(4 * stride), 0xAB);
  int e = -1000;
  bool finite = true;
  double mx = 0;
  for (float f : x) {
    finite &= std::isfinite(f);
    mx = std::max(mx, std::fabs(double(f)));
  }
  const bool ok = pack_x_fixed_planes(x.data(), K, stride, planes.data(), e);
  check(ok, finite, 0, std::string(what) + ": accepted iff finite");
  if (!ok || !finite) {
    check(planes[0] == 0xAB && e == -1000, 1, 0, std::string(what) + ": nothing written");
    return;
  }
  if (mx > 0) {
    check(std::ldexp(mx, e) < std::ldexp(1.0, 30) && std::ldexp(mx, e + 1) >= std::ldexp(1.0, 30),
          1, 0, std::string(what) + ": exponent");
  } else {
    check(e, 0, 0, std::string(what) + ": exponent of zero x");
  }
  for (int64_t c = 0; c < stride; ++c) {
    const double scaled = c < K ? std::ldexp(double(x[static_cast<size_t>(c)]), e) : 0.0;
    const int64_t xu = c < K ? std::llrint(scaled) + (int64_t(1) << 31) : 0;
    if (c < K && std::fabs(double(x[static_cast<size_t>(c)])) * 64 >= mx)
      check(double(std::llrint(scaled)), scaled, 0, std::string(what) + ": exact near the max");
    for (int k = 0; k < 4; ++k)
      check(planes[static_cast<size_t>(k * stride + c)], (xu >> (8 * k)) & 0xFF, 0,
            std::string(what) + ": plane " + std::to_string(k) + " column " + std::to_string(c));
  }
}

void fixed_planes_cases() {
  for (int64_t K : {0, 1, 15, 16, 17, 63, 64, 65, 200}) {
    std::vector<float> x(static_cast<size_t>(K));
    for (auto& f : x) f = rnd_mag() * std::ldexp(1.f, static_cast<int>(rnd(40)) - 20);
    fixed_planes_case(x, 64 * ((K + 63) / 64), "random");
    fixed_planes_case(x, 64 * ((K + 63) / 64) + 64, "random, wider stride");
    if (K == 0) continue;
    std::vector<float> z(static_cast<size_t>(K), 0.f);
    fixed_planes_case(z, 64 * ((K + 63) / 64), "zeros");
    std::vector<float> t(static_cast<size_t>(K), std::numeric_limits<float>::denorm_min());
    t[0] = -t[0];
    fixed_planes_case(t, 64 * ((K + 63) / 64), "subnormal");
    std::vector<float> h(x);
    h[static_cast<size_t>(K - 1)] = -std::numeric_limits<float>::max();
    fixed_planes_case(h, 64 * ((K + 63) / 64), "float max");
    for (float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(), kNaN}) {
      std::vector<float> b(x);
      b[static_cast<size_t>(rnd(K))] = bad;
      fixed_planes_case(b, 64 * ((K + 63) / 64), "non-finite");
    }
  }
  // The exactness boundary: with a full 24-bit significand, max / 2^6 scales to 2^24 - 1 (exact)
  // and max / 2^7 to a half-integer, so the claim stops at a factor 2^6.
  const float mx = std::nextafter(2.f, 0.f);
  fixed_planes_case({mx, mx / 64, -mx / 64, mx / 128}, 64, "exactness boundary");
}

// q_row_bitmap_dot_vnni at the magnitude limits: every weight -128 and every plane byte 255
// over more than one 512-word accumulation chunk (the largest per-lane sums there are), and a
// row long enough that lanes never moved to 64 bits would overflow.
void vnni_extreme_cases() {
  for (int64_t K : {64 * 512, 64 * 512 + 1, 64 * 1100 + 37, 64 * 17000 + 5}) {  // 17000 words: 32-bit lanes would overflow
    const int64_t nw = (K + 63) / 64, stride = 64 * nw;
    std::vector<uint64_t> words(static_cast<size_t>(nw), ~uint64_t(0));
    if (K % 64) words.back() = (uint64_t(1) << (K % 64)) - 1;
    std::vector<int8_t> val(static_cast<size_t>(K), int8_t(-128));
    std::vector<uint8_t> planes(static_cast<size_t>(4 * stride), 0xFF);
    const int64_t want = -128 * K * int64_t(0xFFFFFFFF);
    check(static_cast<double>(q_row_bitmap_dot_vnni(words.data(), K, val.data(), planes.data(), stride) - want),
          0, 0, "q_row_bitmap_dot_vnni extreme K=" + std::to_string(K));
  }
}
#endif

// spmv_bitmap<NB, VT> with float values: NB rows of x with a row stride, the values after the
// row NaN (the AVX2 expansion may read them and must discard them).
template <int NB, class VT>
void bitmap_case(int64_t K, double density, bool at_end) {
  const int64_t nw = (K + 63) / 64, ldx = K + 3;
  std::vector<float> x(static_cast<size_t>(NB * ldx), kNaN);
  for (int n = 0; n < NB; ++n)
    for (int64_t k = 0; k < K; ++k) x[static_cast<size_t>(n * ldx + k)] = rnd_mag();
  std::vector<uint64_t> words(static_cast<size_t>(nw), 0);
  std::vector<VT> val;
  double ref[NB] = {}, mag[NB] = {};
  for (int64_t k = 0; k < K; ++k) {
    if (static_cast<double>(next_u64() % 1000000) >= density * 1e6) continue;
    words[static_cast<size_t>(k / 64)] |= uint64_t(1) << (k % 64);
    val.push_back(Val<VT>::make());
    for (int n = 0; n < NB; ++n) {
      const double t = Val<VT>::dec(val.back()) * x[static_cast<size_t>(n * ldx + k)];
      ref[n] += t;
      mag[n] += std::fabs(t);
    }
  }
  const int64_t nnz = static_cast<int64_t>(val.size());
  if (!at_end)
    for (int i = 0; i < 9; ++i) val.push_back(Val<VT>::nan());
  float sums[NB];
  for (int n = 0; n < NB; ++n) sums[n] = 0.5f;  // the kernel adds to sums
  spmv_bitmap<NB>(words.data(), K, val.data(), val.data() + val.size(), x.data(), ldx, sums);
  for (int n = 0; n < NB; ++n) {
    char what[200];
    std::snprintf(what, sizeof what, "spmv_bitmap NB=%d %s K=%lld nnz=%lld density=%.2f%s n=%d",
                  NB, Val<VT>::name(), static_cast<long long>(K), static_cast<long long>(nnz),
                  density, at_end ? " at end" : "", n);
    check(sums[n], ref[n] + 0.5, tol_sum(nnz, mag[n]) + 1e-6, what);
  }
}

template <class VT>
void bitmap_types() {
  for (int64_t K = 0; K <= 140; ++K)
    for (double d : {0.0, 0.3, 1.0})
      for (bool at_end : {true, false}) {
        bitmap_case<1, VT>(K, d, at_end);
        bitmap_case<2, VT>(K, d, at_end);
      }
  for (int64_t K : {1025, 4096}) {
    bitmap_case<1, VT>(K, 0.1, true);
    bitmap_case<2, VT>(K, 0.5, false);
  }
}

void q_bitmap_cases() {
  // every K up to 3 words (all edges of the 8 / 16-column chunks), then some long rows
  std::vector<int64_t> Ks;
  for (int64_t K = 0; K <= 192; ++K) Ks.push_back(K);
  for (int64_t K : {255, 256, 257, 1025, 4096}) Ks.push_back(K);
  for (int64_t K : Ks)
    for (double d : {0.0, 0.1, 0.5, 0.9, 1.0})
      for (bool at_end : {true, false}) q_bitmap_case(K, d, at_end, {});
  for (int64_t K : {64, 65, 130, 4096})  // single columns at the word and chunk edges
    for (int64_t c : {int64_t(0), int64_t(7), int64_t(8), int64_t(15), int64_t(16), int64_t(63),
                      K - 1})
      if (c < K) q_bitmap_case(K, 0.0, true, {c});
}

}  // namespace

// ================================================================================================
// RowChunks (threading.h): the chunked row partition with tail stealing
// ================================================================================================
// Every row claimed exactly once, in chunks of at most rows_per_chunk rows that never cross the
// static split points, whatever order the parts call next() in (random schedules, parts that
// stop early and leave their chunks to the others); then with OpenMP threads claiming at once.
void row_chunks_cases() {
  for (int parts : {1, 2, 3, 5, 8, 9, 13})  // 8 slots inline, more on the heap
    for (int64_t rows : {0, 1, 7, 97, 1025})
      for (int64_t rpc : {1, 3, 64}) {
        std::vector<int32_t> indptr(static_cast<size_t>(rows + 1), 0);
        for (int64_t r = 0; r < rows; ++r)
          indptr[static_cast<size_t>(r + 1)] = indptr[static_cast<size_t>(r)] + static_cast<int32_t>(rnd(4) == 0 ? 0 : rnd(40));
        std::vector<int64_t> splits;
        for (int t = 0; t <= parts; ++t) splits.push_back(split_point(indptr.data(), rows, t, parts));
        RowChunks<int32_t> chunks(indptr.data(), rows, parts, rpc);
        std::vector<int> seen(static_cast<size_t>(rows), 0);
        std::vector<int> active;
        for (int t = 0; t < parts; ++t) active.push_back(t);
        const std::string what = "parts=" + std::to_string(parts) + " rows=" + std::to_string(rows) +
                                 " rows_per_chunk=" + std::to_string(rpc);
        bool ok = true;
        while (!active.empty()) {
          const size_t pick = static_cast<size_t>(rnd(static_cast<int64_t>(active.size())));
          int64_t r0 = -1, r1 = -1;
          // done, or stops early while another part is still there to take its chunks
          if (!chunks.next(active[pick], r0, r1) || (active.size() > 1 && rnd(50) == 0)) {
            active.erase(active.begin() + static_cast<std::ptrdiff_t>(pick));
            if (r0 < 0) continue;
          }
          bool inside = false;
          for (int t = 0; t < parts; ++t) inside |= splits[static_cast<size_t>(t)] <= r0 && r1 <= splits[static_cast<size_t>(t + 1)];
          ok &= 0 <= r0 && r0 < r1 && r1 <= rows && r1 - r0 <= rpc && inside;
          for (int64_t r = r0; ok && r < r1; ++r) ++seen[static_cast<size_t>(r)];
        }
        int64_t once = 0;
        for (int c : seen) once += c == 1;
        check(ok, 1, 0, what + ": chunks inside one range, at most rows_per_chunk rows");
        check(static_cast<double>(once), static_cast<double>(rows), 0, what + ": every row exactly once");
      }
  for (int rep = 0; rep < 20; ++rep) {  // concurrent claims
    const int64_t rows = 5000 + rnd(3000);
    std::vector<int32_t> indptr(static_cast<size_t>(rows + 1), 0);
    for (int64_t r = 0; r < rows; ++r)
      indptr[static_cast<size_t>(r + 1)] = indptr[static_cast<size_t>(r)] + static_cast<int32_t>(rnd(30));
    const int parts = 4;
    RowChunks<int32_t> chunks(indptr.data(), rows, parts, 1 + rnd(8));
    std::vector<int> seen(static_cast<size_t>(rows), 0);
    int* s = seen.data();
#pragma omp parallel num_threads(parts)
    {
      int64_t r0 = 0, r1 = 0;
      while (chunks.next(omp_get_thread_num() % parts, r0, r1))
        for (int64_t r = r0; r < r1; ++r) __atomic_add_fetch(&s[r], 1, __ATOMIC_RELAXED);
    }
    int64_t once = 0;
    for (int c : seen) once += c == 1;
    check(static_cast<double>(once), static_cast<double>(rows), 0, "concurrent claims: every row exactly once");
  }
}

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "-v")) {
      g_verbose = true;
    } else {
      std::fprintf(stderr, "usage: ukernel_test [-v]\n");
      return 2;
    }
  }
  // Grouped per kernel family so each line of the report names one micro-kernel group.
  begin("csr_spmv");
  spmv_types<float, uint16_t>();
  spmv_types<float, int32_t>();
  spmv_types<bf16_t, uint16_t>();
  spmv_types<bf16_t, int32_t>();
  spmv_types<f16_t, uint16_t>();
  spmv_types<f16_t, int32_t>();
  begin("row_read_probe");
  probe_types<float, uint16_t>();
  probe_types<float, int32_t>();
  probe_types<bf16_t, uint16_t>();
  probe_types<f16_t, int32_t>();
  begin("row_gather_probe");
  gather_probe_types<false, uint16_t>();
  gather_probe_types<false, int32_t>();
  gather_probe_types<true, uint16_t>();
  gather_probe_types<true, int32_t>();
  begin("csr_row_tile");
  tile_types<float, uint16_t>();
  tile_types<float, int32_t>();
  tile_types<bf16_t, uint16_t>();
  tile_types<f16_t, int32_t>();
  begin("bsr_spmv_blockrow");
  blockrow_types<float, uint16_t>();
  blockrow_types<float, int32_t>();
  blockrow_types<bf16_t, uint16_t>();
  blockrow_types<f16_t, int32_t>();
#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
  begin("bsr_spmv_blockrow_vec");
  blockrow_vec_types<float, uint16_t>();
  blockrow_vec_types<float, int32_t>();
  blockrow_vec_types<bf16_t, uint16_t>();
  blockrow_vec_types<f16_t, int32_t>();
#endif
  begin("bsr_tile_rows");
  bsr_tile_types<float, uint16_t>();
  bsr_tile_types<float, int32_t>();
  bsr_tile_types<bf16_t, uint16_t>();
  bsr_tile_types<f16_t, int32_t>();
  begin("l2_trickle");
  l2_trickle_cases();
  begin("q_row_dot");
  q_index_types<int8_t>();
  q_index_types<float>();
  q_index_types<bf16_t>();
  q_index_types<f16_t>();
  begin("q_row_bitmap_dot");
  q_bitmap_cases();
#if defined(SPARSEKIT_ISA_AVX512)
  if (has_avx512_vnni_vbmi2()) vnni_extreme_cases();
#endif
  begin("spmv_bitmap");
  bitmap_types<float>();
  bitmap_types<bf16_t>();
  bitmap_types<f16_t>();
  begin("packing");
  packing_types<float>();
  packing_types<bf16_t>();
  packing_types<f16_t>();
#if defined(SPARSEKIT_ISA_AVX512)
  if (has_avx512_vnni_vbmi2()) fixed_planes_cases();
#endif
  begin("row_chunks");
  row_chunks_cases();
  long cases = 0, bad = 0;
  for (const Tally& t : g_tally) {
    std::printf("%-18s %8ld checks, %ld mismatches\n", t.name, t.cases, t.mismatches);
    cases += t.cases;
    bad += t.mismatches;
  }
  std::printf("ukernel_test %s (W=%d): %ld checks, %ld mismatches\n", kIsaName, W, cases, bad);
  return bad == 0 ? 0 : 1;
}
