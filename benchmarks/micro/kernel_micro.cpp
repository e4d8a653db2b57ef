// Stand-alone timing of the CPU kernels in csrc/cpu/kernels_impl.h, without Python, for kernel
// work (the figures in docs/kernels.md "Measured here" come from here). Every case checks its
// result against a float64 reference before timing and prints the max error. Intrinsics only
// through the csrc/cpu/simd.h wrappers.
//
//   build:  bash benchmarks/micro/build.sh            (AVX-512; ISA=avx2 for the AVX2 path)
//   run:    build/micro/kernel_micro csr  M K N density [threads] [v=<variant id>]  CSR, N > 1
//           build/micro/kernel_micro bsr  M K N density r c [threads] BSR, N > 1
//           build/micro/kernel_micro spmv M K density [threads] [warm] [bf16] [v=<variant id>]  CSR N = 1,
//                                         weights rotating over > 2x the LLC unless warm
//           build/micro/kernel_micro spmv-no-gather M K density [threads] [bf16]   the spmv loop
//                                         with x read contiguously: streaming bound (no check)
//           build/micro/kernel_micro spmv-cascade M K density [threads]   fp32, in one process,
//                                         rounds alternating: a plain read of the same bytes, the
//                                         spmv loop without gathers, the library kernel
//           build/micro/kernel_micro spmv-bounds M K density [threads] [v=<variant id>]  one
//                                         process, rounds alternating: plain reads of the fp32 and
//                                         bf16 matrices, the kernel on each streamed and warm
//                                         (both kernels checked first)
//           build/micro/kernel_micro spmv-gather-only M K density [threads] [warm]   the gathers
//                                         of csr_spmv_gather alone: compute bound (no check)
//           build/micro/kernel_micro read streams prefetch [threads]  read bandwidth probe
//           build/micro/kernel_micro gather [n] [threads] [fma]        hardware-gather floor per
//                                         entry (indices, x and values resident)
//           build/micro/kernel_micro rowtile K nnz                    L1/L2 row-tile loop
//           build/micro/kernel_micro peak [threads]                   register-only FMA rate
// Times are medians of 15 calls (wall clock); "G vec/s" counts W-lane FMAs (W = 16 / 8).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "cpu/kernels_impl.h"

using namespace sparsekit;
using namespace sparsekit::cpu;

namespace {

// Largest data/unified cache in bytes, from sysfs (32 MiB when unreadable), as
// sparsekit.timing.llc_bytes reads it: rotating sets are sized from it.
double llc_bytes() {
  double best = 0;
  for (int i = 0; i < 8; ++i) {
    char path[96], type[32] = {0}, size[32] = {0};
    std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/type", i);
    FILE* f = std::fopen(path, "r");
    if (!f) continue;
    const bool ok = std::fscanf(f, "%31s", type) == 1;
    std::fclose(f);
    if (!ok || !std::strcmp(type, "Instruction")) continue;
    std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
    if (!(f = std::fopen(path, "r"))) continue;
    if (std::fscanf(f, "%31s", size) == 1) {
      char* end = nullptr;
      double v = std::strtod(size, &end);
      if (*end == 'K') v *= 1024;
      if (*end == 'M') v *= 1048576;
      best = std::max(best, v);
    }
    std::fclose(f);
  }
  return best > 0 ? best : 32.0 * 1048576;
}

double median_time(int reps, const std::function<void(int)>& f) {
  std::vector<double> ts;
  for (int i = 0; i < reps; ++i) {
    auto t = std::chrono::steady_clock::now();
    f(i);
    ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

// Random (block-)sparse structure: each (block) entry kept with probability `density`.
struct Sparse {
  std::vector<int32_t> indptr;
  std::vector<uint16_t> idx;
  std::vector<float> val;
};

Sparse random_sparse(int rows, int cols, double density, int block_elems, std::mt19937& g) {
  std::uniform_real_distribution<float> u(0.f, 1.f);
  Sparse s;
  s.indptr.assign(rows + 1, 0);
  for (int m = 0; m < rows; ++m) {
    for (int k = 0; k < cols; ++k)
      if (u(g) < density) {
        s.idx.push_back(static_cast<uint16_t>(k));
        for (int i = 0; i < block_elems; ++i) s.val.push_back(u(g) - 0.5f);
      }
    s.indptr[m + 1] = static_cast<int32_t>(s.idx.size());
  }
  return s;
}

SpmmParams params(const Sparse& s, int M, int K, int N, const float* x, float* y, int threads) {
  SpmmParams p;
  p.M = M; p.K = K; p.N = N;
  p.indptr = s.indptr.data(); p.indices = s.idx.data(); p.values = s.val.data();
  p.x = x; p.ldx = K; p.y = y; p.ldy = M;
  p.index_type = IndexType::U16;
  p.num_threads = threads;
  return p;
}

int run_csr(int M, int K, int N, double d, int threads, int variant) {
  std::mt19937 g(0);
  Sparse s = random_sparse(M, K, d, 1, g);
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  std::vector<float> x(static_cast<size_t>(N) * K), y(static_cast<size_t>(N) * M);
  for (auto& v : x) v = u(g);
  SpmmParams p = params(s, M, K, N, x.data(), y.data(), threads);
  p.variant = variant;
  csr_linear_t<float, int32_t, uint16_t>(p);
  double err = 0;
  for (int n = 0; n < N; ++n)
    for (int m = 0; m < M; ++m) {
      double ref = 0;
      for (int j = s.indptr[m]; j < s.indptr[m + 1]; ++j) ref += double(s.val[j]) * x[size_t(n) * K + s.idx[j]];
      err = std::max(err, std::abs(ref - y[size_t(n) * M + m]));
    }
  const double t = median_time(15, [&](int) { csr_linear_t<float, int32_t, uint16_t>(p); });
  std::printf("csr %dx%d N=%d density=%.2f threads=%d %s: %.3f ms, %.2f G vec/s, max err %.1e\n",
              M, K, N, d, threads, variant_info(static_cast<Variant>(variant)).name, t * 1e3,
              double(s.idx.size()) * N / Vec::W / t / 1e9, err);
  return 0;
}

int run_bsr(int M, int K, int N, double d, int r, int c, int threads) {
  std::mt19937 g(0);
  const int Mb = (M + r - 1) / r, Kb = (K + c - 1) / c;
  Sparse s = random_sparse(Mb, Kb, d, r * c, g);
  // zero the padding of ragged edge blocks (format contract)
  for (int bm = 0; bm < Mb; ++bm)
    for (int b = s.indptr[bm]; b < s.indptr[bm + 1]; ++b)
      for (int i = 0; i < r; ++i)
        for (int j = 0; j < c; ++j)
          if (bm * r + i >= M || s.idx[b] * c + j >= K) s.val[size_t(b) * r * c + i * c + j] = 0.f;
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  std::vector<float> x(static_cast<size_t>(N) * K), y(static_cast<size_t>(N) * M);
  for (auto& v : x) v = u(g);
  SpmmParams p = params(s, M, K, N, x.data(), y.data(), threads);
  p.block_r = r; p.block_c = c;
  bsr_linear_t<float, int32_t, uint16_t>(p);
  double err = 0;
  for (int n = 0; n < N; n += 7)
    for (int bm = 0; bm < Mb; ++bm)
      for (int i = 0; i < r && bm * r + i < M; ++i) {
        double ref = 0;
        for (int b = s.indptr[bm]; b < s.indptr[bm + 1]; ++b)
          for (int j = 0; j < c && s.idx[b] * c + j < K; ++j)
            ref += double(s.val[size_t(b) * r * c + i * c + j]) * x[size_t(n) * K + s.idx[b] * c + j];
        err = std::max(err, std::abs(ref - y[size_t(n) * M + bm * r + i]));
      }
  const double t = median_time(15, [&](int) { bsr_linear_t<float, int32_t, uint16_t>(p); });
  std::printf("bsr %dx%d N=%d density=%.2f block %dx%d threads=%d: %.3f ms, %.2f G vec/s, max err %.1e\n",
              M, K, N, d, r, c, threads, t * 1e3, double(s.idx.size()) * r * c * N / Vec::W / t / 1e9, err);
  return 0;
}

// bf16 = true: values rounded to bf16 (the reference uses the rounded values).
// A random M x K CSR matrix (uint16 columns) of density d and its copies for an N = 1 run:
// one copy when warm, else enough to rotate over > 2x the LLC. bf16 = true: the values are
// rounded to bf16 (s0.val holds the rounded values, vals16 each copy's bf16 bits).
struct SpmvCopies {
  Sparse s0;
  double bytes = 0;  // compressed bytes of one copy
  std::vector<Sparse> mats;
  std::vector<std::vector<uint16_t>> vals16;
};

SpmvCopies spmv_copies(int M, int K, double d, bool bf16, bool warm, std::mt19937& g) {
  SpmvCopies c;
  c.s0 = random_sparse(M, K, d, 1, g);
  std::vector<uint16_t> v16;
  if (bf16) {
    for (float& v : c.s0.val) {
      v16.push_back(f32_to_bf16(v));
      v = to_f32(bf16_t{v16.back()});
    }
  }
  c.bytes = c.s0.idx.size() * (bf16 ? 4.0 : 6.0) + c.s0.indptr.size() * 4.0;
  const int copies = warm ? 1 : std::max(2, int(2 * llc_bytes() / c.bytes) + 1);
  c.mats.assign(copies, c.s0);
  c.vals16.assign(bf16 ? copies : 0, v16);
  return c;
}

int run_spmv(int M, int K, double d, int threads, bool warm, bool bf16, int variant) {
  std::mt19937 g(0);
  SpmvCopies cs = spmv_copies(M, K, d, bf16, warm, g);
  const Sparse& s0 = cs.s0;
  const double bytes = cs.bytes;
  const int copies = static_cast<int>(cs.mats.size());
  std::vector<Sparse>& mats = cs.mats;
  std::vector<std::vector<uint16_t>>& vals16 = cs.vals16;
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  std::vector<float> x(K), y(M);
  for (auto& v : x) v = u(g);
  auto call = [&](int c) {
    SpmmParams p = params(mats[c], M, K, 1, x.data(), y.data(), threads);
    p.variant = variant;
    if (bf16) {
      p.values = vals16[c].data();
      p.value_dtype = DType::BF16;
      csr_linear_t<bf16_t, int32_t, uint16_t>(p);
    } else {
      csr_linear_t<float, int32_t, uint16_t>(p);
    }
  };
  for (int c = 0; c < copies; ++c) call(c);
  double err = 0;
  for (int m = 0; m < M; ++m) {
    double ref = 0;
    for (int j = s0.indptr[m]; j < s0.indptr[m + 1]; ++j) ref += double(s0.val[j]) * x[s0.idx[j]];
    err = std::max(err, std::abs(ref - y[m]));
  }
  const double t = median_time(std::max(15, 2 * copies), [&](int i) { call(i % copies); });
  std::printf("spmv %dx%d density=%.2f %s threads=%d %s %s: %.3f ms, %.1f GB/s on compressed bytes, max err %.1e\n",
              M, K, d, bf16 ? "bf16" : "fp32", threads, warm ? "warm" : "rotating",
              variant_info(static_cast<Variant>(variant)).name, t * 1e3,
              bytes / t / 1e9, err);
  return 0;
}

#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
// The loop of csr_spmv_gather (2 vectors of nonzeros per step, the same software prefetch) with
// x read contiguously instead of gathered: the rate at which that loop streams the compressed
// bytes when the gathers cost nothing. A bound for the bandwidth-fraction target, not a result
// (the sums are not the product; no check). Rows split evenly between threads.
template <class VT>
void stream_bound_rows(const Sparse& s, const VT* val, const float* xpad, int64_t kmask, int r0,
                       int r1, float* y) {
  constexpr int W = Vec::W;
  const uint16_t* idx = s.idx.data();
  for (int m = r0; m < r1; ++m) {
    int64_t j = s.indptr[m];
    const int64_t e = s.indptr[m + 1];
    typename Vec::T a0 = Vec::zero(), a1 = Vec::zero();
    for (; j + 2 * W <= e; j += 2 * W) {
      prefetch_stream<2 * W>(val, idx, j);
      a0 = Vec::fma(Vec::load_vals(val + j), Vec::load(xpad + (j & kmask)), a0);
      a1 = Vec::fma(Vec::load_vals(val + j + W), Vec::load(xpad + ((j + W) & kmask)), a1);
    }
    float t = Vec::reduce(Vec::add(a0, a1));
    for (; j < e; ++j) t += to_f32(val[j]) * xpad[idx[j]];
    y[m] = t;
  }
}

int run_stream_bound(int M, int K, double d, int threads, bool bf16) {
  std::mt19937 g(0);
  SpmvCopies cs = spmv_copies(M, K, d, bf16, /*warm=*/false, g);
  const double bytes = cs.bytes;
  const int copies = static_cast<int>(cs.mats.size());
  const std::vector<Sparse>& mats = cs.mats;
  const std::vector<std::vector<uint16_t>>& vals16 = cs.vals16;
  int64_t kpow = 1;
  while (kpow * 2 <= K) kpow *= 2;
  std::vector<float> xpad(K + 2 * Vec::W, 0.5f), y(M);
  const int64_t kmask = kpow - 1;
  auto call = [&](int c) {
#pragma omp parallel num_threads(threads)
    {
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      const int r0 = M * tid / nt, r1 = M * (tid + 1) / nt;
      if (bf16)
        stream_bound_rows(mats[c], reinterpret_cast<const bf16_t*>(vals16[c].data()), xpad.data(),
                          kmask, r0, r1, y.data());
      else
        stream_bound_rows(mats[c], mats[c].val.data(), xpad.data(), kmask, r0, r1, y.data());
    }
  };
  for (int c = 0; c < copies; ++c) call(c);
  const double t = median_time(std::max(15, 2 * copies), [&](int i) { call(i % copies); });
  std::printf("spmv-no-gather %dx%d density=%.2f %s threads=%d rotating: %.3f ms, %.1f GB/s on "
              "compressed bytes (bound: x read contiguously, no check)\n",
              M, K, d, bf16 ? "bf16" : "fp32", threads, t * 1e3, bytes / t / 1e9);
  return 0;
}
#endif

#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
// The gathers of csr_spmv_gather alone: per row, 2W column ids per step and a hardware gather
// of x for each W of them, no values read or multiplied (the tail below 2W skipped). Its time
// is the floor the gather kernel cannot go under whatever the value type: with bf16 values
// the full kernel runs close to it (docs/kernels.md, "What bounds the misses"). No check.
int run_gather_bound(int M, int K, double d, int threads, bool warm) {
  std::mt19937 g(0);
  SpmvCopies cs = spmv_copies(M, K, d, /*bf16=*/false, warm, g);
  const int copies = static_cast<int>(cs.mats.size());
  std::vector<float> x(K, 0.5f), y(M);
  auto call = [&](int c) {
    const Sparse& s = cs.mats[c];
    const uint16_t* idx = s.idx.data();
#pragma omp parallel num_threads(threads)
    {
      constexpr int W = Vec::W;
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      const int r0 = M * tid / nt, r1 = M * (tid + 1) / nt;
      for (int m = r0; m < r1; ++m) {
        typename Vec::T a0 = Vec::zero(), a1 = Vec::zero();
        int64_t j = s.indptr[m];
        for (const int64_t e = s.indptr[m + 1]; j + 2 * W <= e; j += 2 * W) {
          prefetch_t0(idx + j + kPfDist);
          a0 = Vec::add(a0, Vec::gather(x.data(), idx + j));
          a1 = Vec::add(a1, Vec::gather(x.data(), idx + j + W));
        }
        y[m] = Vec::reduce(Vec::add(a0, a1));
      }
    }
  };
  for (int c = 0; c < copies; ++c) call(c);
  const double t = median_time(std::max(15, 2 * copies), [&](int i) { call(i % copies); });
  std::printf("spmv-gather-only %dx%d density=%.2f threads=%d %s: %.3f ms (bound: gathers only, "
              "no values, no check)\n", M, K, d, threads, warm ? "warm" : "rotating", t * 1e3);
  return 0;
}
#endif

#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
// A plain read of one matrix copy: its value array (val_bytes at val; bf16 values read as
// their 2-byte words) and its uint16 index array, summed as floats in 4W-float steps with the
// kernels' software prefetch, each thread its share of each array. sink: 16 * threads floats.
void read_bytes(const void* val, size_t val_bytes, const Sparse& s, int threads, float* sink) {
#pragma omp parallel num_threads(threads)
  {
    constexpr int W = Vec::W;
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    typename Vec::T a0 = Vec::zero(), a1 = Vec::zero();
    for (int arr = 0; arr < 2; ++arr) {
      const float* p = arr ? reinterpret_cast<const float*>(s.idx.data())
                           : static_cast<const float*>(val);
      const size_t n = (arr ? s.idx.size() * 2 : val_bytes) / 4;
      const size_t b = n * tid / nt / (4 * W) * (4 * W);
      const size_t e = tid + 1 == nt ? n / (4 * W) * (4 * W) : n * (tid + 1) / nt / (4 * W) * (4 * W);
      for (size_t k = b; k < e; k += 4 * W) {
        for (int l = 0; l < 4 * W; l += 16) prefetch_t0(p + k + kPfDist + l);
        a0 = Vec::add(a0, Vec::add(Vec::load(p + k), Vec::load(p + k + W)));
        a1 = Vec::add(a1, Vec::add(Vec::load(p + k + 2 * W), Vec::load(p + k + 3 * W)));
      }
    }
    sink[16 * tid] = Vec::reduce(Vec::add(a0, a1));
  }
}

// Where the bandwidth goes (fp32 values, uint16 columns, rotating copies): rounds alternate
// between (0) a plain read of the copy's value and index arrays (each thread a contiguous half,
// 4 vector loads per step, the kernel's software prefetch), (1) the spmv loop with x read
// contiguously (stream_bound_rows: the row structure, no gathers) and (2) the library kernel
// (csr_linear_t, planner default), one call each per round, so the three rates see the same
// machine state. Prints each median and its rate on the compressed bytes relative to (0).
int run_cascade(int M, int K, double d, int threads) {
  std::mt19937 g(0);
  SpmvCopies cs = spmv_copies(M, K, d, /*bf16=*/false, /*warm=*/false, g);
  const int copies = static_cast<int>(cs.mats.size());
  int64_t kpow = 1;
  while (kpow * 2 <= K) kpow *= 2;
  std::vector<float> x(K), xpad(K + 2 * Vec::W, 0.5f), y(M), sink(16 * threads);
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  for (auto& v : x) v = u(g);
  auto read = [&](const Sparse& s) {
    read_bytes(s.val.data(), s.val.size() * 4, s, threads, sink.data());
  };
  auto call = [&](int mode, int c) {
    const Sparse& s = cs.mats[c];
    if (mode == 0) return read(s);
    if (mode == 1) {
#pragma omp parallel num_threads(threads)
      {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        stream_bound_rows(s, s.val.data(), xpad.data(), kpow - 1, M * tid / nt,
                          M * (tid + 1) / nt, y.data());
      }
      return;
    }
    SpmmParams p = params(s, M, K, 1, x.data(), y.data(), threads);
    csr_linear_t<float, int32_t, uint16_t>(p);
  };
  for (int c = 0; c < copies; ++c) call(2, c);
  std::vector<double> ts[3];
  const int rounds = 45;
  for (int r = 0; r < rounds; ++r)
    for (int mode = 0; mode < 3; ++mode) {
      const auto t0 = std::chrono::steady_clock::now();
      call(mode, (3 * r + mode) % copies);
      ts[mode].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  const char* names[3] = {"plain read of the bytes", "spmv loop, no gathers", "spmv kernel"};
  double med[3];
  for (int mode = 0; mode < 3; ++mode) {
    std::sort(ts[mode].begin(), ts[mode].end());
    med[mode] = ts[mode][ts[mode].size() / 2];
  }
  for (int mode = 0; mode < 3; ++mode)
    std::printf("spmv-cascade %dx%d density=%.2f threads=%d %-24s %.3f ms, %.1f GB/s, %.2f of the read\n",
                M, K, d, threads, names[mode], med[mode] * 1e3, cs.bytes / med[mode] / 1e9,
                med[0] / med[mode]);
  return 0;
}
#endif

#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
// What bounds one N = 1 variant, fp32 against bf16 values, in one process (rounds alternate, so
// the host's phase moves every figure alike): a plain read of each matrix's compressed bytes
// (streamed), the kernel on rotating copies (streamed) and on one copy run twice in a row, the
// second call timed (warm in the caches: its compute cost). When the warm time of the bf16
// kernel is not below its streamed time, the bf16 / fp32 ratio is bound by the kernel's work per
// nonzero, not by the bytes it reads.
int run_spmv_bounds(int M, int K, double d, int threads, int variant) {
  std::mt19937 g(0);
  SpmvCopies c32 = spmv_copies(M, K, d, /*bf16=*/false, /*warm=*/false, g);
  std::mt19937 g16(0);
  SpmvCopies c16 = spmv_copies(M, K, d, /*bf16=*/true, /*warm=*/false, g16);
  const int copies = static_cast<int>(c32.mats.size());
  std::vector<float> x(K), y(M), sink(16 * threads);
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  for (auto& v : x) v = u(g);
  auto read = [&](const void* val, size_t val_bytes, const Sparse& s) {
    read_bytes(val, val_bytes, s, threads, sink.data());
  };
  auto kernel = [&](bool bf16, int c) {
    const SpmvCopies& cs = bf16 ? c16 : c32;
    SpmmParams p = params(cs.mats[c], M, K, 1, x.data(), y.data(), threads);
    p.variant = variant;
    if (bf16) {
      p.values = cs.vals16[c].data();
      p.value_dtype = DType::BF16;
      csr_linear_t<bf16_t, int32_t, uint16_t>(p);
    } else {
      csr_linear_t<float, int32_t, uint16_t>(p);
    }
  };
  const size_t nnz = c32.s0.idx.size();
  auto call = [&](int mode, int c) {
    switch (mode) {
      case 0: return read(c32.mats[c].val.data(), nnz * 4, c32.mats[c]);
      case 1: return read(c16.vals16[c].data(), nnz * 2, c16.mats[c]);
      case 2: return kernel(false, c);
      case 3: return kernel(true, c);
      case 4: return kernel(false, 0);
      default: return kernel(true, 0);
    }
  };
  for (int c = 0; c < copies; ++c) call(2, c), call(3, c);
  double err = 0;  // both kernels against a float64 reference (bf16: of the rounded values)
  for (const bool bf16 : {false, true}) {
    const Sparse& s0 = (bf16 ? c16 : c32).s0;
    kernel(bf16, 0);
    for (int m = 0; m < M; ++m) {
      double ref = 0;
      for (int j = s0.indptr[m]; j < s0.indptr[m + 1]; ++j) ref += double(s0.val[j]) * x[s0.idx[j]];
      err = std::max(err, std::abs(ref - y[m]));
    }
  }
  constexpr int kModes = 6;
  std::vector<double> ts[kModes];
  for (int r = 0; r < 45; ++r)
    for (int mode = 0; mode < kModes; ++mode) {
      if (mode >= 4) call(mode, 0);  // the streamed rounds evicted it: bring it back untimed
      const auto t0 = std::chrono::steady_clock::now();
      call(mode, (kModes * r + mode) % copies);
      ts[mode].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  const char* names[kModes] = {"read fp32 bytes",   "read bf16 bytes",  "kernel fp32 streamed",
                               "kernel bf16 streamed", "kernel fp32 warm", "kernel bf16 warm"};
  std::printf("spmv-bounds %dx%d density=%.2f threads=%d %s (%zu nonzeros), max err %.1e\n", M,
              K, d, threads, variant_info(static_cast<Variant>(variant)).name, nnz, err);
  for (int mode = 0; mode < kModes; ++mode) {
    std::sort(ts[mode].begin(), ts[mode].end());
    const double t = ts[mode][ts[mode].size() / 2];
    std::printf("  %-22s %.3f ms  %.3f ns per nonzero per thread\n", names[mode], t * 1e3,
                t * 1e9 * threads / nnz);
  }
  return 0;
}
#endif

#if defined(SPARSEKIT_ISA_AVX512)
// Reads 180 MB (11008 x 4096 fp32) per call as `streams` interleaved sequential streams per
// thread, optionally with software prefetch `pf` floats ahead; rotating copies over > 2x the LLC.
int run_read(int streams, int pf, int threads) {
  const size_t n = size_t(11008) * 4096;
  const int copies = std::max(2, int(2 * llc_bytes() / (n * 4.0)) + 1);
  std::vector<float*> bufs(copies);
  for (auto& b : bufs) {
    b = static_cast<float*>(std::aligned_alloc(64, n * 4));
    for (size_t i = 0; i < n; ++i) b[i] = 1.f;
  }
  float sink = 0.f;
  const double t = median_time(15, [&](int rep) {
    const float* d = bufs[rep % copies];
    float tot = 0.f;
#pragma omp parallel num_threads(threads) reduction(+ : tot)
    {
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      const size_t b0 = n / nt * tid, len = (n / nt) / streams / 64 * 64;
      Vec::T acc = Vec::zero();  // W = 16: one cache line per load
      for (size_t o = 0; o < len; o += 64)
        for (int s = 0; s < streams; ++s) {
          const float* q = d + b0 + s * len + o;
          if (pf)
            for (int l = 0; l < 64; l += 16) prefetch_t0(q + pf + l);
          acc = Vec::add(acc, Vec::add(Vec::add(Vec::load(q), Vec::load(q + 16)),
                                       Vec::add(Vec::load(q + 32), Vec::load(q + 48))));
        }
      tot += Vec::reduce(acc);
    }
    sink += tot;
  });
  std::printf("read streams=%d prefetch=%d threads=%d: %.1f GB/s (checksum %g)\n", streams, pf,
              threads, n * 4 / t / 1e9, double(sink));
  for (auto b : bufs) std::free(b);
  return 0;
}
#endif

// The N > 1 CSR inner loop alone (csr_row_tile, 64-wide tile) over an aligned xt of K rows:
// K <= 192 stays in L1, K = 4096 (1 MiB) in L2. nnz nonzeros per visit.
int run_rowtile(int K, int nnz) {
  constexpr int V = 64 / Vec::W, NT = 64;
  float* xt = static_cast<float*>(std::aligned_alloc(64, size_t(K) * NT * 4));
  for (int i = 0; i < K * NT; ++i) xt[i] = 1.f;
  const int rows = 4096;
  std::mt19937 g(0);
  std::vector<uint16_t> idx(size_t(rows) * nnz);
  for (auto& i : idx) i = static_cast<uint16_t>(g() % K);
  std::vector<float> val(idx.size(), 0.5f);
  float* acc = static_cast<float*>(std::aligned_alloc(64, 32 * NT * 4));  // partial sums, L1
  for (int i = 0; i < 32 * NT; ++i) acc[i] = 0.f;
  const double t = median_time(15, [&](int) {
    for (int r = 0; r < rows; ++r) {
      float* a = acc + (r % 32) * NT;
      csr_row_tile<V>(idx.data(), val.data(), int64_t(r) * nnz, int64_t(r + 1) * nnz, xt, a, a);
    }
  });
  const double visits = double(rows) * nnz;
  std::printf("rowtile K=%d nnz/visit=%d: %.2f ns per nonzero x 64 columns, %.2f G vec/s (acc %g)\n",
              K, nnz, t / visits * 1e9, visits * V / t / 1e9, double(acc[0]));
  std::free(acc);
  std::free(xt);
  return 0;
}

#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
// The hardware-gather floor: per thread, `n` uint16 column ids (resident in L1/L2) widened and
// used to gather x (K = 4096 floats, resident), 4 independent sums; with `fma`, each gathered
// vector is also multiplied by a resident fp32 value vector, as the SpMV kernels do. No value or
// index stream from memory, no row boundaries: what any kernel that gathers x once per stored
// entry pays at the least on this core.
int run_gather_floor(int n, int threads, bool fma) {
  constexpr int W = Vec::W, K = 4096;
  n = std::max(4 * W, n / (4 * W) * (4 * W));
  std::mt19937 g(0);
  std::vector<float> x(K), val(n, 0.5f);
  std::vector<uint16_t> idx(n);
  for (auto& v : x) v = float(g() % 100) * 0.01f;
  for (auto& i : idx) i = static_cast<uint16_t>(g() % K);
  float sink = 0.f;
  const double t = median_time(25, [&](int) {
    float tot = 0.f;
#pragma omp parallel num_threads(threads) reduction(+ : tot)
    {
      typename Vec::T a[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
      for (int rep = 0; rep < 8; ++rep)
        for (int j = 0; j < n; j += 4 * W)
          for (int u = 0; u < 4; ++u) {
            const typename Vec::T gx = Vec::gather(x.data(), idx.data() + j + u * W);
            a[u] = fma ? Vec::fma(Vec::load(val.data() + j + u * W), gx, a[u]) : Vec::add(a[u], gx);
          }
      tot += Vec::reduce(Vec::add(Vec::add(a[0], a[1]), Vec::add(a[2], a[3])));
    }
    sink += tot;
  });
  std::printf("gather floor W=%d threads=%d %s: %.3f ns per entry per core (checksum %g)\n", W,
              threads, fma ? "gather+fma" : "gather", t / (8.0 * n) * 1e9, double(sink));
  return 0;
}
#endif

// The FMA ceiling of this ISA path: 12 independent accumulator chains per thread (enough to
// cover 4-cycle latency on 2 FMA ports), register operands only, 2 * W flops per FMA.
int run_peak(int threads) {
  constexpr int C = 12;
  const int64_t iters = 20000000;
  float sink = 0.f;
  const double t = median_time(5, [&](int rep) {
    float tot = 0.f;
#pragma omp parallel num_threads(threads) reduction(+ : tot)
    {
      typename Vec::T acc[C];
      const typename Vec::T a = Vec::set1(0.999f + 1e-6f * rep), b = Vec::set1(1e-7f);
      for (int c = 0; c < C; ++c) acc[c] = Vec::set1(float(c));
      for (int64_t i = 0; i < iters; ++i)
        for (int c = 0; c < C; ++c) acc[c] = Vec::fma(acc[c], a, b);
      typename Vec::T s = acc[0];
      for (int c = 1; c < C; ++c) s = Vec::add(s, acc[c]);
      tot += Vec::reduce(s);
    }
    sink += tot;
  });
  const double fmas = double(iters) * C * threads;
  std::printf("peak W=%d threads=%d: %.2f G vec FMA/s, %.1f GFLOP/s fp32 (checksum %g)\n", Vec::W,
              threads, fmas / t / 1e9, fmas * 2 * Vec::W / t / 1e9, double(sink));
  return 0;
}

int usage() {
  std::fprintf(stderr, "see the header of benchmarks/micro/kernel_micro.cpp for usage\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  const char* mode = argv[1];
  auto ai = [&](int i, int def) { return argc > i ? std::atoi(argv[i]) : def; };
  auto ad = [&](int i) { return argc > i ? std::atof(argv[i]) : 0.0; };
  if (!std::strcmp(mode, "csr") && argc >= 6)
    return run_csr(ai(2, 0), ai(3, 0), ai(4, 0), ad(5), ai(6, 1),
                   argc > 7 && !std::strncmp(argv[7], "v=", 2) ? std::atoi(argv[7] + 2) : 0);
  if (!std::strcmp(mode, "bsr") && argc >= 8)
    return run_bsr(ai(2, 0), ai(3, 0), ai(4, 0), ad(5), ai(6, 1), ai(7, 1), ai(8, 1));
  if (!std::strcmp(mode, "spmv") && argc >= 5)
  {
    bool warm = false, bf16 = false;
    int variant = 0;
    for (int i = 6; i < argc; ++i) {
      warm |= !std::strcmp(argv[i], "warm");
      bf16 |= !std::strcmp(argv[i], "bf16");
      if (!std::strncmp(argv[i], "v=", 2)) variant = std::atoi(argv[i] + 2);
    }
    return run_spmv(ai(2, 0), ai(3, 0), ad(4), ai(5, 1), warm, bf16, variant);
  }
#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
  if (!std::strcmp(mode, "spmv-no-gather") && argc >= 5)
    return run_stream_bound(ai(2, 0), ai(3, 0), ad(4), ai(5, 1), argc > 6 && !std::strcmp(argv[6], "bf16"));
  if (!std::strcmp(mode, "spmv-cascade") && argc >= 5)
    return run_cascade(ai(2, 0), ai(3, 0), ad(4), ai(5, 1));
  if (!std::strcmp(mode, "spmv-bounds") && argc >= 5)
    return run_spmv_bounds(ai(2, 0), ai(3, 0), ad(4), ai(5, 1),
                           argc > 6 && !std::strncmp(argv[6], "v=", 2) ? std::atoi(argv[6] + 2) : 0);
  if (!std::strcmp(mode, "spmv-gather-only") && argc >= 5)
    return run_gather_bound(ai(2, 0), ai(3, 0), ad(4), ai(5, 1), argc > 6 && !std::strcmp(argv[6], "warm"));
#endif
#if defined(SPARSEKIT_ISA_AVX512) || defined(SPARSEKIT_ISA_AVX2)
  if (!std::strcmp(mode, "gather"))
    return run_gather_floor(ai(2, 16384), ai(3, 1), argc > 4 && !std::strcmp(argv[4], "fma"));
#endif
#if defined(SPARSEKIT_ISA_AVX512)
  if (!std::strcmp(mode, "read") && argc >= 4) return run_read(ai(2, 1), ai(3, 0), ai(4, 2));
#endif
  if (!std::strcmp(mode, "peak")) return run_peak(ai(2, 1));
  if (!std::strcmp(mode, "rowtile") && argc >= 4) return run_rowtile(ai(2, 0), ai(3, 0));
  return usage();
}
