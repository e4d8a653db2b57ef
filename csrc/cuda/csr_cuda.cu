// sparsekit CUDA CSR SpMM: y (N, M) = x (N, K) @ W^T + bias.
//
// One warp per sparse row (rows visited in the optional row-swizzle order), NT batch rows per
// warp held in NT fp32 accumulators per lane. Values and column indices are read with 128-bit
// streaming loads on the aligned body of each row (scalar head/tail), x is gathered through
// the read-only cache, and the NT partial sums are reduced with warp shuffles at the end.
// N > 8 is tiled over grid.y in slices of 8 batch rows. Techniques after Sputnik (Gale et al.,
// SC'20: row swizzle, vector memory instructions); the code is our own.
#include <algorithm>
#include <exception>

#include "common/dispatch.h"
#include "cuda/cuda_common.cuh"

namespace sparsekit {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;  // 256 threads: 8 rows per block
constexpr int kMaxGridY = 65535;

template <class V, class X, class I>
struct CsrArgs {
  const void* indptr;       // [M + 1], int32 or int64 (idx64)
  const I* indices;         // [nnz]
  const V* values;          // [nnz]
  const X* x;               // [N, ldx]
  X* y;                     // [N, ldy]
  const float* bias;        // [M] or nullptr
  const int32_t* row_order; // [M] or nullptr
  int64_t M, N, ldx, ldy;
  bool idx64;
  bool vec_ok;  // values/indices bases aligned for VEC-wide loads
};

template <class V, class X, class I, int NT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
csr_rowwarp_kernel(const CsrArgs<V, X, I> a) {
  constexpr int VEC = 16 / sizeof(V);  // elements per 128-bit load of values
  const int lane = threadIdx.x & 31;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (slot >= a.M) return;  // warp-uniform
  const int64_t row = a.row_order ? static_cast<int64_t>(a.row_order[slot]) : slot;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * NT;
  const int nv = static_cast<int>(min64(NT, a.N - n0));
  const int64_t s = load_ptr(a.indptr, a.idx64, row);
  const int64_t e = load_ptr(a.indptr, a.idx64, row + 1);
  const X* __restrict__ xb = a.x + n0 * a.ldx;

  float acc[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n] = 0.f;

  auto fma_elem = [&](float v, int64_t col) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      if (NT == 1 || n < nv) acc[n] += v * to_f32(ldg(xb + n * a.ldx + col));
    }
  };

  int64_t tail = s;
  if (a.vec_ok && e - s >= VEC) {
    const int64_t head_end = min64(e, (s + VEC - 1) / VEC * VEC);
    if (s + lane < head_end) {
      fma_elem(to_f32(ld_stream(a.values + s + lane)),
               static_cast<int64_t>(ld_stream(a.indices + s + lane)));
    }
    const int64_t body_end = e / VEC * VEC;
    // Unrolled twice so a lane has two 128-bit loads of values and of indices in flight
    // before the first FMA (rows of a few hundred nonzeros take 1-3 trips).
#pragma unroll 2
    for (int64_t q = head_end + static_cast<int64_t>(lane) * VEC; q < body_end;
         q += 32 * VEC) {
      V vv[VEC];
      I ii[VEC];
      load_stream<V, VEC>(a.values + q, vv);
      load_stream<I, VEC>(a.indices + q, ii);
#pragma unroll
      for (int j = 0; j < VEC; ++j) fma_elem(to_f32(vv[j]), static_cast<int64_t>(ii[j]));
    }
    tail = max64(head_end, body_end);
  }
  for (int64_t q = tail + lane; q < e; q += 32) {
    fma_elem(to_f32(ld_stream(a.values + q)), static_cast<int64_t>(ld_stream(a.indices + q)));
  }

#pragma unroll
  for (int n = 0; n < NT; ++n) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[n] += __shfl_xor_sync(0xffffffffu, acc[n], off);
  }
  const float b = a.bias ? a.bias[row] : 0.f;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    if (lane == n && n < nv) a.y[(n0 + n) * a.ldy + row] = from_f32<X>(acc[n] + b);
  }
}

template <class V, class X, class I, int NT>
Status launch_csr(const SpmmParams& p, const int32_t* row_order, cudaStream_t stream) {
  CsrArgs<V, X, I> a;
  a.indptr = p.indptr;
  a.indices = static_cast<const I*>(p.indices);
  a.values = static_cast<const V*>(p.values);
  a.bias = p.bias;
  a.row_order = row_order;
  a.M = p.M;
  a.ldx = p.ldx;
  a.ldy = p.ldy;
  a.idx64 = p.indptr_type == IndexType::I64;
  constexpr int VEC = 16 / sizeof(V);
  a.vec_ok = aligned(p.values, 16) &&
             aligned(p.indices, std::min<std::uintptr_t>(16, VEC * sizeof(I)));
  const int64_t grid_x = (p.M + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (grid_x > 0x7fffffffLL) return reject("csr_rowwarp_kernel: M too large for one launch");
  // grid.y is limited to 65535 slices: launch successive chunks of the batch.
  const int64_t rows_per_launch = static_cast<int64_t>(kMaxGridY) * NT;
  for (int64_t nb = 0; nb < p.N; nb += rows_per_launch) {
    a.N = std::min(rows_per_launch, p.N - nb);
    a.x = static_cast<const X*>(p.x) + nb * p.ldx;
    a.y = static_cast<X*>(p.y) + nb * p.ldy;
    dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>((a.N + NT - 1) / NT));
    csr_rowwarp_kernel<V, X, I, NT><<<grid, kWarpsPerBlock * 32, 0, stream>>>(a);
    Status st = check_launch("csr_rowwarp_kernel");
    if (!st.ok()) return st;
  }
  return Status{};
}

}  // namespace

Status csr_linear(const SpmmParams& p, const int32_t* row_order, std::uintptr_t stream_int) {
  if (p.M == 0 || p.N == 0) return Status{};
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_int);
  try {
    return SPARSEKIT_INDEX_SWITCH(p.indptr_type, p.index_type, PT_, IT, [&] {
      // indptr width is a run-time flag inside the kernel (one uniform branch per row), so
      // PT_ does not multiply the instantiations.
      return SPARSEKIT_CUDA_VX_SWITCH(p, V, X, [&] {
        if (p.N == 1) return launch_csr<V, X, IT, 1>(p, row_order, stream);
        if (p.N == 2) return launch_csr<V, X, IT, 2>(p, row_order, stream);
        if (p.N <= 4) return launch_csr<V, X, IT, 4>(p, row_order, stream);
        return launch_csr<V, X, IT, 8>(p, row_order, stream);
      });
    });
  } catch (const std::exception& ex) {
    return reject(std::string("csr_linear: ") + ex.what());
  }
}

}  // namespace cuda
}  // namespace sparsekit
