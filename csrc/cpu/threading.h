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

// Per-call aligned scratch of n elements of T, freed on scope exit (no STL containers in
// ISA-specific TUs).
template <class T>
struct ScratchOf {
  T* p = nullptr;
  explicit ScratchOf(size_t n) {
    size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
    if (bytes == 0) bytes = 64;
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (p == nullptr) throw std::bad_alloc();
  }
  ~ScratchOf() { std::free(p); }
  ScratchOf(const ScratchOf&) = delete;
  ScratchOf& operator=(const ScratchOf&) = delete;
};
using Scratch = ScratchOf<float>;

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

// Cost of a row beyond its nonzeros in the partitions below, in nonzeros (loop setup,
// reduction, output store).
constexpr int64_t kRowCost = 8;

// First row r in [0, rows] with cost(r) = indptr[r] + r * kRowCost >= target.
// Monotone in r, so a binary search gives contiguous, nnz(+rows)-balanced partitions.
template <class PT>
inline int64_t split_point(const PT* indptr, int64_t rows, int64_t part, int64_t parts) {
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

// Row chunks of a parallel pass with tail stealing. Part t owns the contiguous nnz(+rows)-
// balanced range split_point gives it and takes its chunks front to back, so its memory streams
// stay sequential; a part that has finished its range takes chunks from the back of the range
// with the most chunks left. On a shared host the cores of one call often run 10-20% apart
// (median |t0 - t1| / max of 11-22% over 300 calls of a 4096x4096 SpMV at 95% sparsity, which
// core was the slower one changing between runs), and a static split waits for the slower core.
// Each part's (front, back) chunk counters are one 64-bit word on its own cache line, claimed
// by compare-and-swap: the owner touches only its own line until it runs out. Construct before
// the parallel region; next() is safe from any thread, and if fewer threads than parts run,
// the missing parts' ranges are taken by stealing.
template <class PT>
class RowChunks {
 public:
  // parts >= 1; rows_per_chunk >= 1, raised where needed so that a range has < 2^32 chunks.
  RowChunks(const PT* indptr, int64_t rows, int parts, int64_t rows_per_chunk)
      : parts_(parts), rows_per_chunk_(imax(rows_per_chunk, rows / 0xffffffffLL + 1)) {
    // Up to kInlineParts slots live in the object (no allocation for the usual thread counts).
    slots_ = parts <= kInlineParts ? inline_slots_
                                   : static_cast<Slot*>(std::aligned_alloc(
                                         64, sizeof(Slot) * static_cast<size_t>(parts)));
    if (slots_ == nullptr) throw std::bad_alloc();
    for (int t = 0; t < parts; ++t) {
      Slot& s = slots_[t];
      s.begin = split_point(indptr, rows, t, parts);
      s.end = split_point(indptr, rows, t + 1, parts);
      const uint64_t chunks =
          static_cast<uint64_t>((s.end - s.begin + rows_per_chunk_ - 1) / rows_per_chunk_);
      s.front_back = chunks << 32;  // front 0 (low half), back = chunk count (high half)
    }
  }
  ~RowChunks() {
    if (slots_ != inline_slots_) std::free(slots_);
  }
  RowChunks(const RowChunks&) = delete;
  RowChunks& operator=(const RowChunks&) = delete;

  // The next chunk [r0, r1) for part t: its own front chunk, else the back chunk of the range
  // with the most left. False when no chunk is left anywhere.
  bool next(int t, int64_t& r0, int64_t& r1) {
    if (take(t, false, r0, r1)) return true;
    for (;;) {
      int victim = -1;
      uint64_t most = 0;
      for (int u = 0; u < parts_; ++u) {
        const uint64_t v = __atomic_load_n(&slots_[u].front_back, __ATOMIC_RELAXED);
        const uint64_t left = (v >> 32) > (v & 0xffffffffu) ? (v >> 32) - (v & 0xffffffffu) : 0;
        if (left > most) most = left, victim = u;
      }
      if (victim < 0) return false;
      if (take(victim, true, r0, r1)) return true;  // else lost a race: look again
    }
  }

 private:
  struct alignas(64) Slot {
    uint64_t front_back;  // chunks [front, back) of the range are still unclaimed
    int64_t begin, end;   // the range's rows
  };
  bool take(int u, bool from_back, int64_t& r0, int64_t& r1) {
    Slot& s = slots_[u];
    uint64_t v = __atomic_load_n(&s.front_back, __ATOMIC_RELAXED);
    for (;;) {
      const uint64_t front = v & 0xffffffffu, back = v >> 32;
      if (front >= back) return false;
      const uint64_t c = from_back ? back - 1 : front;
      const uint64_t nv = from_back ? ((back - 1) << 32) | front : (back << 32) | (front + 1);
      if (__atomic_compare_exchange_n(&s.front_back, &v, nv, false, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED)) {
        r0 = s.begin + static_cast<int64_t>(c) * rows_per_chunk_;
        r1 = imin(r0 + rows_per_chunk_, s.end);
        return true;
      }
    }
  }
  static constexpr int kInlineParts = 8;
  Slot inline_slots_[kInlineParts];
  Slot* slots_ = nullptr;
  int parts_;
  int64_t rows_per_chunk_;
};

// body(r0, r1) over rows [0, rows) on `threads` threads in RowChunks of rows_per_chunk rows
// (all rows in one call when threads is 1).
template <class PT, class F>
inline void parallel_row_chunks(int threads, const PT* indptr, int64_t rows,
                                int64_t rows_per_chunk, F&& body) {
  if (threads <= 1) return body(int64_t{0}, rows);
  RowChunks<PT> chunks(indptr, rows, threads, rows_per_chunk);
  parallel_run(threads, [&](int tid, int) {  // fewer threads than parts: the rest is stolen
    int64_t r0 = 0, r1 = 0;
    while (chunks.next(tid, r0, r1)) body(r0, r1);
  });
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
