// sparsekit CUDA kernels: plain C++ launch API (no pybind11, no CUDA headers).
//
// Math: y (N, M) = x (N, K) @ W^T + bias, W (M, K) sparse (CSR or BSR), fp32 accumulation.
// Every pointer in SpmmParams is a DEVICE pointer on the current CUDA device:
//   CSR: indptr [M + 1] (I32|I64), indices [nnz] (U16|I32), values [nnz] (F32|F16|BF16)
//   BSR: indptr [Mb + 1], indices [nnzb] block columns, values [nnzb * r * c] row-major blocks
//   x [N, ldx] (F32 or the value dtype), y [N, ldy] (same dtype as x, caller-allocated),
//   bias [M] fp32 or nullptr.
// The structure is trusted (validated when the matrix was built) and the sizes are trusted
// (checked in csrc/bindings.cpp). Kernels are enqueued on `stream` (a cudaStream_t passed as an
// integer; 0 = legacy default stream) and the call returns without synchronising. Launch
// errors (and sticky errors from earlier work, seen by cudaGetLastError) are returned in
// Status, naming the kernel; nothing throws across this API.
#pragma once

#include <cstdint>
#include <string>

#include "common/format.h"

namespace sparsekit {
namespace cuda {

struct Status {
  int code = 0;         // cudaError_t value (0 = cudaSuccess); -1 = rejected argument
  std::string message;  // "<kernel>: <cuda error string>" when code != 0
  bool ok() const { return code == 0; }
};

// CSR SpMM. Dispatch: N <= 8 -> warp-per-row kernel with N (1/2/4/8) accumulators per lane,
// 128-bit loads of values/indices; N > 8 -> the same kernel tiled over N in slices of 8
// (grid.y). `row_order` (device, int32 [M], a permutation of 0..M-1, or nullptr) is the
// row-swizzle order: rows sorted by decreasing length so that long rows start first and the
// warps of one block see similar work (Sputnik). Cost: O(N * nnz) FMAs, reads each stored
// value/index ceil(N / 8) times (from L2 after the first slice), writes N * M outputs.
Status csr_linear(const SpmmParams& p, const int32_t* row_order, std::uintptr_t stream);

// BSR SpMM. Tensor cores (wmma m16n16k16, fp32 accumulate) when the values are F16/BF16,
// x has the value dtype, block_r % 16 == 0, block_c % 16 == 0, N >= 16 and the values are
// 32-byte aligned; otherwise a CUDA-core warp-per-row kernel (any block shape and dtype).
// Cost: O(N * nnzb * r * c) multiply-adds.
Status bsr_linear(const SpmmParams& p, std::uintptr_t stream);

// Which path bsr_linear would take ("tensor_core" | "cuda_core") for these parameters.
const char* bsr_path(const SpmmParams& p);

// Number of visible CUDA devices. Creates no context (cudaGetDeviceCount only initialises the
// driver); returns 0 when no driver/device is present, with the reason in `why`.
int device_count(std::string* why);

// CUDA runtime version this module was built with (e.g. 13000) and the archs compiled.
int runtime_version();
const char* archs_compiled();

}  // namespace cuda
}  // namespace sparsekit
