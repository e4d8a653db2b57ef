// Threading helpers of the CPU drivers: per-call scratch, the OpenMP region wrapper and the
// nnz-balanced row partition. No global state; no threads are created outside a call.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sparsekit {
namespace cpu {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// Per-call aligned scratch, freed on scope exit (no STL containers in ISA-specific TUs).
struct Scratch {
  float* p = nullptr;
  explicit Scratch(size_t n) {
    size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    if (bytes == 0) bytes = 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (p == nullptr) throw std::bad_alloc();
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Runs body(tid, nthreads) on up to `threads` OpenMP threads (serially when 1).
template <class F>
inline void parallel_run(int threads, F&& body) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    body(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  body(0, 1);
}

inline void barrier(int nthreads) {
#ifdef _OPENMP
  if (nthreads > 1) {
#pragma omp barrier
  }
#endif
}

// First row r in [0, rows] with cost(r) = indptr[r] + r * kRowCost >= target.
// Monotone in r, so a binary search gives contiguous, nnz(+rows)-balanced partitions.
template <class PT>
inline int64_t split_point(const PT* indptr, int64_t rows, int64_t part, int64_t parts) {
  constexpr int64_t kRowCost = 8;
  if (part <= 0) return 0;
  if (part >= parts) return rows;
  const int64_t total = static_cast<int64_t>(indptr[rows]) + rows * kRowCost;
  const int64_t target = static_cast<int64_t>(static_cast<double>(total) * part / parts);
  int64_t lo = 0, hi = rows;
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(indptr[mid]) + mid * kRowCost < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Threads worth using for `work` multiply-adds (a parallel region costs a few microseconds).
inline int threads_for(int requested, int64_t work) {
  constexpr int64_t kMinWorkPerThread = 16384;
  int64_t t = work / kMinWorkPerThread;
  if (t < 1) t = 1;
  return static_cast<int>(imin(t, requested < 1 ? 1 : requested));
}

}  // namespace
}  // namespace cpu
}  // namespace sparsekit
