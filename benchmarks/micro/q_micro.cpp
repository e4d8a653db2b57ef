// Stand-alone timing of the compressed-format CSR kernels (csrc/cpu/csr_q_impl.h) at N = 1,
// without Python: the per-nonzero cost with the matrix resident in cache ("warm") and streamed
// from DRAM (copies rotating over more than `MB` megabytes, default 1300 > 4x a 300 MiB LLC).
// Every case checks its result against a float64 reference before timing (max relative error).
//
//   build:  SRC=benchmarks/micro/q_micro.cpp bash benchmarks/micro/build.sh   (ISA=avx2 too)
//   run:    build/micro/q_micro M K density [threads] [warm] [u16|d8] [f32|i8] [v=<id>[,<id>...]]
//           [MB=<n>]
//           v=<id>: a csrq variant of csrc/cpu/variants.h (12 csrq_rows2, 13 csrq_row1,
//           17 csrq_assemble, 14 csrq_bitmap, 16 csrq_bitmap_vnni: u16 i8 only; they read
//           occupancy words instead of the indices). Several ids: timed in alternating rounds
//           in this one process (the order reversed every other round), so their ratios see
//           the same machine state.
// Prints, per variant, the median of 21 timings (each over all copies, or 20 calls when warm):
// ms, ns per nonzero (wall time x threads / nnz, i.e. per core; the minimum in parentheses, less
// exposed to other processes on a shared machine) and GB/s on the stored bytes.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/csr_q_impl.h"

using namespace sparsekit;
using namespace sparsekit::cpu;

namespace {

struct QMat {
  std::vector<int64_t> indptr;
  std::vector<uint8_t> gaps;     // D8 coding, escapes included
  std::vector<uint16_t> cols;    // plain coding
  std::vector<int8_t> q8, q8p;   // int8 values for D8 (escapes = 0) and plain
  std::vector<float> f32, f32p;  // the same as fp32
  std::vector<float> scale;
  int64_t nnz = 0;
};

QMat make(int M, int K, double d, std::mt19937& g) {
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::uniform_int_distribution<int> qv(-127, 127);
  QMat a;
  a.indptr.push_back(0);
  std::vector<int64_t> ip_plain{0};
  for (int m = 0; m < M; ++m) {
    int prev = 0;
    bool first = true;
    for (int k = 0; k < K; ++k) {
      if (u(g) >= d) continue;
      int gap = first ? k : k - prev;
      // escapes: gap 255, value 0, until the rest fits (first entry: column itself)
      while (gap > 255) {
        a.gaps.push_back(255);
        a.q8.push_back(0);
        gap -= 255;
      }
      const int8_t q = static_cast<int8_t>(qv(g));
      a.gaps.push_back(static_cast<uint8_t>(gap));
      a.q8.push_back(q);
      a.cols.push_back(static_cast<uint16_t>(k));
      a.q8p.push_back(q);
      prev = k;
      first = false;
      ++a.nnz;
    }
    a.indptr.push_back(static_cast<int64_t>(a.gaps.size()));
    ip_plain.push_back(static_cast<int64_t>(a.cols.size()));
    a.scale.push_back(0.01f + 0.001f * (m % 7));
  }
  // plain coding shares indptr only when there are no escapes; keep a separate copy
  a.f32.assign(a.q8.begin(), a.q8.end());
  a.f32p.assign(a.q8p.begin(), a.q8p.end());
  a.indptr.insert(a.indptr.end(), ip_plain.begin(), ip_plain.end());  // [M+1 d8 | M+1 plain]
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: q_micro M K density [threads] [warm] [u16|d8] [f32|i8] "
                         "[v=<id>[,<id>...]] [MB=<n>]\n");
    return 2;
  }
  const int M = std::atoi(argv[1]), K = std::atoi(argv[2]);
  const double d = std::atof(argv[3]);
  int threads = argc > 4 ? std::atoi(argv[4]) : 1;
  bool warm = false, d8 = true, i8 = true;
  std::vector<int> variants;
  double mb = 1300;
  for (int i = 5; i < argc; ++i) {
    warm |= !std::strcmp(argv[i], "warm");
    if (!std::strcmp(argv[i], "u16")) d8 = false;
    if (!std::strcmp(argv[i], "f32")) i8 = false;
    if (!std::strncmp(argv[i], "v=", 2))
      for (const char* q = argv[i] + 2; *q;) {
        char* end = nullptr;
        const long v = std::strtol(q, &end, 10);
        if (end == q || v < 0 || v >= static_cast<long>(Variant::kCount) ||
            (*end != ',' && *end != '\0')) {
          std::fprintf(stderr, "v: expected variant ids in [0, %d) separated by commas, got '%s'\n",
                       static_cast<int>(Variant::kCount), argv[i] + 2);
          return 2;
        }
        variants.push_back(static_cast<int>(v));
        q = *end ? end + 1 : end;
      }
    if (!std::strncmp(argv[i], "MB=", 3)) mb = std::atof(argv[i] + 3);
  }
  if (K > 65536) {
    std::fprintf(stderr, "K: expected <= 65536 (the plain coding stores uint16 columns), got %d\n", K);
    return 2;
  }
  if (variants.empty()) variants.push_back(0);
  std::mt19937 g(7);
  QMat a = make(M, K, d, g);
  bool bitmap = false;  // some variant reads occupancy words
  for (int variant : variants) {
    const bool bm = variant == static_cast<int>(Variant::CsrqBitmap) ||
                    variant == static_cast<int>(Variant::CsrqBitmapVnni);
    if (bm && (d8 || !i8)) {
      std::fprintf(stderr, "v=%d (a bitmap variant): expected u16 i8, got %s %s\n", variant,
                   d8 ? "d8" : "u16", i8 ? "i8" : "f32");
      return 2;
    }
    bitmap |= bm;
  }
  const int64_t stored = d8 ? static_cast<int64_t>(a.gaps.size()) : a.nnz;
  const int64_t words = static_cast<int64_t>(M) * ((K + 63) / 64);
  // bytes a call reads: the bitmap variant reads the occupancy words instead of the indices
  const int64_t bytes = (bitmap ? words * 8 + stored : stored * ((d8 ? 1 : 2) + (i8 ? 1 : 4))) +
                        (M + 1) * 8 + (i8 ? M * 4 : 0);
  const int copies = warm ? 1 : std::max(2, static_cast<int>(mb * 1e6 / bytes) + 1);
  // Rotating copies of the index (or bitmap) and value streams (indptr / scales shared: they
  // are small).
  std::vector<std::vector<uint8_t>> idx_c(copies), val_c(copies);
  std::vector<std::vector<uint64_t>> bits_c(bitmap ? copies : 0);
  for (int c = 0; c < copies && bitmap; ++c) {  // words, then the int64 row sums
    bits_c[c].assign(words + M, 0);
    const int64_t* ip = a.indptr.data() + M + 1;
    for (int m = 0; m < M; ++m)
      for (int64_t j = ip[m]; j < ip[m + 1]; ++j) {
        bits_c[c][m * ((K + 63) / 64) + a.cols[j] / 64] |= uint64_t(1) << (a.cols[j] % 64);
        bits_c[c][words + m] += static_cast<uint64_t>(static_cast<int64_t>(a.q8p[j]));
      }
  }
  for (int c = 0; c < copies; ++c) {
    if (d8) idx_c[c].assign(a.gaps.begin(), a.gaps.end());
    else idx_c[c].assign(reinterpret_cast<const uint8_t*>(a.cols.data()),
                         reinterpret_cast<const uint8_t*>(a.cols.data() + a.cols.size()));
    const void* vp = i8 ? (d8 ? static_cast<const void*>(a.q8.data()) : a.q8p.data())
                        : (d8 ? static_cast<const void*>(a.f32.data()) : a.f32p.data());
    const size_t vb = static_cast<size_t>(stored) * (i8 ? 1 : 4);
    val_c[c].assign(static_cast<const uint8_t*>(vp), static_cast<const uint8_t*>(vp) + vb);
  }
  std::vector<float> x(K), y(M);
  std::uniform_real_distribution<float> ux(-1.f, 1.f);
  for (auto& v : x) v = ux(g);
  // float64 reference
  std::vector<double> ref(M, 0.0);
  for (int m = 0; m < M; ++m) {
    for (int64_t j = a.indptr[M + 1 + m]; j < a.indptr[M + 1 + m + 1]; ++j)
      ref[m] += static_cast<double>(a.q8p[j]) * x[a.cols[j]];
    if (i8) ref[m] *= a.scale[m];
  }
  SpmmParams p;
  p.M = M;
  p.K = K;
  p.N = 1;
  p.indptr = d8 ? a.indptr.data() : a.indptr.data() + M + 1;
  p.indptr_type = IndexType::I64;
  p.index_type = d8 ? IndexType::D8 : IndexType::U16;
  p.value_dtype = i8 ? DType::I8 : DType::F32;
  p.x = x.data();
  p.ldx = K;
  p.y = y.data();
  p.ldy = M;
  p.scales = i8 ? a.scale.data() : nullptr;
  p.num_threads = threads;
  auto run = [&](int c) {
    p.indices = idx_c[c].data();
    p.values = val_c[c].data();
    p.bitmap = bitmap ? bits_c[c].data() : nullptr;
    p.bitmap_row_sums = bitmap ? reinterpret_cast<const int64_t*>(bits_c[c].data() + words) : nullptr;
    auto by_idx = [&](auto vt) {
      using VT = decltype(vt);
      if (d8) csrq_linear_t<VT, int64_t, uint8_t>(p);
      else csrq_linear_t<VT, int64_t, uint16_t>(p);
    };
    if (i8) by_idx(int8_t{});
    else by_idx(float{});
  };
  const size_t nv = variants.size();
  std::vector<double> errs(nv, 0.0);
  double nrm = 0;
  for (int m = 0; m < M; ++m) nrm = std::max(nrm, std::fabs(ref[m]));
  for (size_t v = 0; v < nv; ++v) {
    p.variant = variants[v];
    std::fill(y.begin(), y.end(), std::nanf(""));
    run(0);
    for (int m = 0; m < M; ++m) errs[v] = std::max(errs[v], std::fabs(y[m] - ref[m]));
  }
  std::vector<std::vector<double>> ts(nv);
  int c = 0;
  for (int r = 0; r < 21; ++r)
    for (size_t k = 0; k < nv; ++k) {
      const size_t v = r % 2 ? nv - 1 - k : k;
      p.variant = variants[v];
      const int inner = warm ? 20 : copies;
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < inner; ++i) {
        run(c);
        c = (c + 1) % copies;
      }
      ts[v].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
                      inner);
    }
  for (size_t v = 0; v < nv; ++v) {
    std::sort(ts[v].begin(), ts[v].end());
    const double t = ts[v][ts[v].size() / 2], tmin = ts[v][0];
    std::printf("q_micro %dx%d density=%.2f %s+%s threads=%d v=%d %s: %.4f ms, %.3f ns/nnz/core "
                "(min %.3f), %.1f GB/s, max rel err %.1e\n",
                M, K, d, i8 ? "i8" : "f32", d8 ? "d8" : "u16", threads, variants[v],
                warm ? "warm" : "rotating", t * 1e3, t * threads / a.nnz * 1e9,
                tmin * threads / a.nnz * 1e9, bytes / t / 1e9, errs[v] / (nrm > 0 ? nrm : 1));
  }
  const double worst = *std::max_element(errs.begin(), errs.end());
  return worst / (nrm > 0 ? nrm : 1) < 1e-4 ? 0 : 1;
}
