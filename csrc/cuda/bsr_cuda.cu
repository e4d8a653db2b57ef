// sparsekit CUDA BSR SpMM: y (N, M) = x (N, K) @ W^T + bias, W in r x c blocks.
//
// Tensor-core path (fp16/bf16 values, x of the same dtype, r % 16 == 0, c % 16 == 0,
// N >= 16): one CTA = 4 independent warps for a 16-row slab of one block row; each warp owns
// 16 * NF batch rows and keeps NF 16x16 fp32 accumulator fragments. For every stored block
// and 16-wide k step it stages the x tile (16 k x 16*NF n, zero-filled beyond K and N, so the
// ragged edges are never read) in warp-private shared memory and issues NF wmma m16n16k16
// MMAs with the W block (row-major, ldm = c) as the A operand read straight from global.
// There is no CTA-wide barrier, so warps past the end of the batch simply exit.
// CUDA-core path (anything else): one warp per output row, lanes over the (block, column)
// pairs of the row, NT batch rows per warp (grid.y tiles the batch), shuffle reduction.
// Tensor-core tiling after Flash-LLM / SpInfer's "load sparse, compute dense on tensor cores";
// the code is our own.
#include <mma.h>

#include <algorithm>
#include <exception>

#include "common/dispatch.h"
#include "cuda/cuda_common.cuh"

namespace sparsekit {
namespace cuda {
namespace {

constexpr int kMaxGridY = 65535;

// ------------------------------------------------------------------------------------------
// CUDA-core path
// ------------------------------------------------------------------------------------------
constexpr int kWarpsPerBlock = 8;

template <class V, class X, class I>
struct BsrArgs {
  const void* indptr;  // [Mb + 1], int32 or int64 (idx64)
  const I* indices;    // [nnzb] block-column ids
  const V* values;     // [nnzb * r * c]
  const X* x;          // [N, ldx]
  X* y;                // [N, ldy]
  const float* bias;   // [M] or nullptr
  int64_t M, K, N, ldx, ldy;
  int r, c;
  bool idx64;
};

template <class V, class X, class I, int NT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
bsr_rowwarp_kernel(const BsrArgs<V, X, I> a) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= a.M) return;  // warp-uniform
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * NT;
  const int nv = static_cast<int>(min64(NT, a.N - n0));
  const int64_t br = row / a.r;
  const int i = static_cast<int>(row - br * a.r);
  const int64_t s = load_ptr(a.indptr, a.idx64, br);
  const int64_t e = load_ptr(a.indptr, a.idx64, br + 1);
  const X* __restrict__ xb = a.x + n0 * a.ldx;

  float acc[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n] = 0.f;

  const int64_t total = (e - s) * a.c;
  for (int64_t t = lane; t < total; t += 32) {
    const int64_t b = s + t / a.c;
    const int j = static_cast<int>(t % a.c);
    const int64_t col = static_cast<int64_t>(a.indices[b]) * a.c + j;
    if (col < a.K) {  // padding columns of the ragged last block column: x is not read
      const float v = to_f32(ld_stream(a.values + (b * a.r + i) * a.c + j));
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        if (NT == 1 || n < nv) acc[n] += v * to_f32(ldg(xb + n * a.ldx + col));
      }
    }
  }
#pragma unroll
  for (int n = 0; n < NT; ++n) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[n] += __shfl_xor_sync(0xffffffffu, acc[n], off);
  }
  const float bv = a.bias ? a.bias[row] : 0.f;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    if (lane == n && n < nv) a.y[(n0 + n) * a.ldy + row] = from_f32<X>(acc[n] + bv);
  }
}

template <class V, class X, class I, int NT>
Status launch_bsr_rowwarp(const SpmmParams& p, cudaStream_t stream) {
  BsrArgs<V, X, I> a;
  a.indptr = p.indptr;
  a.indices = static_cast<const I*>(p.indices);
  a.values = static_cast<const V*>(p.values);
  a.bias = p.bias;
  a.M = p.M;
  a.K = p.K;
  a.ldx = p.ldx;
  a.ldy = p.ldy;
  a.r = p.block_r;
  a.c = p.block_c;
  a.idx64 = p.indptr_type == IndexType::I64;
  const int64_t grid_x = (p.M + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (grid_x > 0x7fffffffLL) return reject("bsr_rowwarp_kernel: M too large for one launch");
  const int64_t rows_per_launch = static_cast<int64_t>(kMaxGridY) * NT;
  for (int64_t nb = 0; nb < p.N; nb += rows_per_launch) {
    a.N = std::min(rows_per_launch, p.N - nb);
    a.x = static_cast<const X*>(p.x) + nb * p.ldx;
    a.y = static_cast<X*>(p.y) + nb * p.ldy;
    dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>((a.N + NT - 1) / NT));
    bsr_rowwarp_kernel<V, X, I, NT><<<grid, kWarpsPerBlock * 32, 0, stream>>>(a);
    Status st = check_launch("bsr_rowwarp_kernel");
    if (!st.ok()) return st;
  }
  return Status{};
}

// ------------------------------------------------------------------------------------------
// Tensor-core path (wmma m16n16k16, fp32 accumulation)
// ------------------------------------------------------------------------------------------
constexpr int kTcWarps = 4;    // warps per CTA, each independent
constexpr int kLdb = 16 + 8;   // x tile row stride (elements): 48 bytes, keeps 16B alignment
constexpr int kLdc = 16 + 4;   // fp32 staging stride for the accumulators

template <class V, class I>
struct BsrTcArgs {
  const void* indptr;
  const I* indices;
  const V* values;  // 32-byte aligned
  const V* x;       // [N, ldx]
  V* y;             // [N, ldy]
  const float* bias;
  int64_t M, K, N, ldx, ldy;
  int r, c;
  bool idx64;
  bool x_vec_ok;  // x base and ldx allow 16-byte loads of 8 elements
};

template <class V, class I, int NF>
__global__ void __launch_bounds__(kTcWarps * 32)
bsr_tc_kernel(const BsrTcArgs<V, I> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int NW = 16 * NF;  // batch rows per warp
  // Union-free layout: x tile for B, then fp32 staging for the epilogue, per warp.
  __shared__ __align__(32) V xs_all[kTcWarps][NW * kLdb];
  __shared__ __align__(32) float cs_all[kTcWarps][NW * kLdc];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t n_base = (static_cast<int64_t>(blockIdx.y) * kTcWarps + warp) * NW;
  if (n_base >= a.N) return;  // no CTA-wide barriers below
  V* xs = xs_all[warp];
  float* cs = cs_all[warp];

  const int slabs = a.r / 16;
  const int64_t br = blockIdx.x / slabs;
  const int sub = static_cast<int>(blockIdx.x - br * slabs);
  const int64_t s = load_ptr(a.indptr, a.idx64, br);
  const int64_t e = load_ptr(a.indptr, a.idx64, br + 1);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, V, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, V, wmma::col_major> fb;

  const V zero = from_f32<V>(0.f);
  for (int64_t b = s; b < e; ++b) {
    const int64_t kcol0 = static_cast<int64_t>(a.indices[b]) * a.c;
    const V* wblk = a.values + b * a.r * a.c + static_cast<int64_t>(sub) * 16 * a.c;
    for (int kk = 0; kk < a.c; kk += 16) {
      const int64_t k0 = kcol0 + kk;
      if (k0 >= a.K) break;  // the rest of this block is padding
      // Stage x[n_base + nn, k0 .. k0+16) as xs[nn * kLdb + 0..16): 2 chunks of 8 per row.
      for (int t = lane; t < 2 * NW; t += 32) {
        const int nn = t >> 1;
        const int part = t & 1;
        const int64_t n = n_base + nn;
        const int64_t kq = k0 + part * 8;
        V* dst = xs + nn * kLdb + part * 8;
        if (n < a.N && kq + 8 <= a.K && a.x_vec_ok) {
          *reinterpret_cast<uint4*>(dst) =
              __ldg(reinterpret_cast<const uint4*>(a.x + n * a.ldx + kq));
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            dst[j] = (n < a.N && kq + j < a.K) ? a.x[n * a.ldx + kq + j] : zero;
          }
        }
      }
      __syncwarp();
      wmma::load_matrix_sync(fa, wblk + kk, a.c);
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        wmma::load_matrix_sync(fb, xs + f * 16 * kLdb, kLdb);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
      __syncwarp();  // xs is overwritten by the next step
    }
  }

  // Epilogue: acc[f](m, n) -> cs[n * kLdc + m]; each lane then writes 16 contiguous outputs
  // y[n, m0 .. m0+16) of one batch row (bounds-checked against M and N).
#pragma unroll
  for (int f = 0; f < NF; ++f) {
    wmma::store_matrix_sync(cs + f * 16 * kLdc, acc[f], kLdc, wmma::mem_col_major);
  }
  __syncwarp();
  const int64_t m0 = br * a.r + static_cast<int64_t>(sub) * 16;
  for (int nn = lane; nn < NW; nn += 32) {
    const int64_t n = n_base + nn;
    if (n >= a.N) break;
    V* yrow = a.y + n * a.ldy;
#pragma unroll
    for (int mi = 0; mi < 16; ++mi) {
      const int64_t m = m0 + mi;
      if (m < a.M) {
        const float bv = a.bias ? a.bias[m] : 0.f;
        yrow[m] = from_f32<V>(cs[nn * kLdc + mi] + bv);
      }
    }
  }
#else
  __trap();  // tensor-core path needs sm_80+ (the launcher never selects it below that)
#endif
}

template <class V, class I, int NF>
Status launch_bsr_tc(const SpmmParams& p, cudaStream_t stream) {
  BsrTcArgs<V, I> a;
  a.indptr = p.indptr;
  a.indices = static_cast<const I*>(p.indices);
  a.values = static_cast<const V*>(p.values);
  a.bias = p.bias;
  a.M = p.M;
  a.K = p.K;
  a.ldx = p.ldx;
  a.ldy = p.ldy;
  a.r = p.block_r;
  a.c = p.block_c;
  a.idx64 = p.indptr_type == IndexType::I64;
  a.x_vec_ok = aligned(p.x, 16) && (p.ldx % 8 == 0);
  const int64_t Mb = (p.M + p.block_r - 1) / p.block_r;
  const int64_t grid_x = Mb * (p.block_r / 16);
  if (grid_x > 0x7fffffffLL) return reject("bsr_tc_kernel: M too large for one launch");
  const int64_t rows_per_cta = static_cast<int64_t>(kTcWarps) * 16 * NF;
  const int64_t rows_per_launch = static_cast<int64_t>(kMaxGridY) * rows_per_cta;
  for (int64_t nb = 0; nb < p.N; nb += rows_per_launch) {
    a.N = std::min(rows_per_launch, p.N - nb);
    a.x = static_cast<const V*>(p.x) + nb * p.ldx;
    a.y = static_cast<V*>(p.y) + nb * p.ldy;
    // x_vec_ok must hold for the shifted base too (nb * ldx * sizeof(V) keeps 16B alignment
    // when ldx % 8 == 0).
    dim3 grid(static_cast<unsigned>(grid_x),
              static_cast<unsigned>((a.N + rows_per_cta - 1) / rows_per_cta));
    bsr_tc_kernel<V, I, NF><<<grid, kTcWarps * 32, 0, stream>>>(a);
    Status st = check_launch("bsr_tc_kernel");
    if (!st.ok()) return st;
  }
  return Status{};
}

bool tc_eligible(const SpmmParams& p) {
  return p.value_dtype != DType::F32 && p.x_dtype == p.value_dtype && p.block_r % 16 == 0 &&
         p.block_c % 16 == 0 && p.N >= 16 && aligned(p.values, 32);
}

}  // namespace

const char* bsr_path(const SpmmParams& p) {
  return tc_eligible(p) ? "tensor_core" : "cuda_core";
}

Status bsr_linear(const SpmmParams& p, std::uintptr_t stream_int) {
  if (p.M == 0 || p.N == 0) return Status{};
  if (p.block_r <= 0 || p.block_c <= 0) return reject("bsr_linear: block shape must be >= 1");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_int);
  try {
    return SPARSEKIT_INDEX_SWITCH(p.indptr_type, p.index_type, PT_, IT, [&] {
      if (tc_eligible(p)) {
        // x has the value dtype here; only the 16-bit value types reach this branch.
        if (p.value_dtype == DType::F16) {
          return p.N >= 128 ? launch_bsr_tc<__half, IT, 4>(p, stream)
                            : launch_bsr_tc<__half, IT, 1>(p, stream);
        }
        return p.N >= 128 ? launch_bsr_tc<__nv_bfloat16, IT, 4>(p, stream)
                          : launch_bsr_tc<__nv_bfloat16, IT, 1>(p, stream);
      }
      return SPARSEKIT_CUDA_VX_SWITCH(p, V, X, [&] {
        if (p.N == 1) return launch_bsr_rowwarp<V, X, IT, 1>(p, stream);
        return launch_bsr_rowwarp<V, X, IT, 8>(p, stream);
      });
    });
  } catch (const std::exception& ex) {
    return reject(std::string("bsr_linear: ") + ex.what());
  }
}

}  // namespace cuda
}  // namespace sparsekit
