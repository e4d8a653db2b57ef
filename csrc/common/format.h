// sparsekit: the one parameter struct shared by every CPU and CUDA kernel.
//
// Math: y (N, M) = x (N, K) @ W^T + bias, W (M, K) sparse in CSR or BSR.
// Accumulation is always fp32. Kernels trust the sparse structure (validated once by
// validate_csr / validate_bsr when the matrix is built) and the sizes below (checked by
// csrc/bindings.cpp); they never allocate the output and never keep state between calls.
#pragma once

#include <cstdint>

namespace sparsekit {

// Element type of values / activations / outputs.
// I8: weight values only (int8 with per-row fp32 scales, SpmmParams::scales).
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2, I8 = 3 };
// Element type of indptr (I32/I64) and of indices (U16/I32; D8: uint8 column gaps, see
// csrc/cpu/csr_q_impl.h).
enum class IndexType : int { U16 = 0, I32 = 1, I64 = 2, D8 = 3 };

// 16-bit storage types; distinct structs so templates can dispatch on them.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline int dtype_size(DType t) { return t == DType::F32 ? 4 : (t == DType::I8 ? 1 : 2); }
inline const char* dtype_name(DType t) {
  return t == DType::F32 ? "f32" : (t == DType::BF16 ? "bf16" : (t == DType::I8 ? "i8" : "f16"));
}

// Elementwise function applied to every output after the bias (and the int8 scales), in fp32
// before the conversion to y's dtype: the fused epilogue of a layer followed by its activation.
// Relu keeps NaN (max(0, v) with NaN in, NaN out, as torch.relu).
enum class Activation : int { None = 0, Relu = 1 };
constexpr int kActivationCount = 2;

struct SpmmParams {
  // Problem size: W is (M, K) = (out_features, in_features); x has N rows.
  int64_t M = 0;  // rows of W = columns of y
  int64_t K = 0;  // columns of W = columns of x
  int64_t N = 0;  // rows of x and y (batch)

  // Sparse structure.
  //  CSR:  indptr  [M + 1]   (indptr_type: I32 | I64), indptr[0] = 0, indptr[M] = nnz
  //        indices [nnz]     (index_type: U16 | I32), column ids, sorted per row, in [0, K)
  //        values  [nnz]     (value_dtype)
  //  BSR (block_r x block_c, Mb = ceil(M / block_r), Kb = ceil(K / block_c)):
  //        indptr  [Mb + 1]  over blocks, indices [nnzb] block-column ids in [0, Kb),
  //        values  [nnzb * block_r * block_c], each block row-major; entries of blocks on
  //        the ragged right/bottom edge that fall outside (M, K) are zero padding.
  // All arrays are host pointers for CPU kernels and device pointers for CUDA kernels.
  const void* indptr = nullptr;
  const void* indices = nullptr;
  const void* values = nullptr;

  // Dense operands, row-major.
  const void* x = nullptr;  // [N, ldx] (x_dtype), only the first K columns are read
  int64_t ldx = 0;          // row stride of x in elements (>= K)
  void* y = nullptr;        // [N, ldy] (y_dtype == x_dtype), only the first M columns written
  int64_t ldy = 0;          // row stride of y in elements (>= M)
  const float* bias = nullptr;  // [M] fp32, or nullptr
  // [M] fp32 per-row scales of int8 values (value_dtype == I8): row m's sum is multiplied by
  // scales[m] before the bias is added. nullptr otherwise.
  const float* scales = nullptr;
  // [M * ceil(K / 64)] occupancy words of a CSR matrix with plain (U16 / I32) indices, read by
  // the bitmap variants only (csrq_bitmap: int8 values; csr_spmv_bitmap: float values): bit t
  // of word b of row m is set iff column 64 * b + t is stored in row m (bits at columns >= K
  // are 0). nullptr otherwise.
  const uint64_t* bitmap = nullptr;
  // [M] sums of each row's stored int8 values, read by csrq_bitmap_vnni only (with bitmap).
  const int64_t* bitmap_row_sums = nullptr;

  DType value_dtype = DType::F32;  // F32 | BF16 | F16
  DType x_dtype = DType::F32;      // F32 or == value_dtype; y has the same dtype
  IndexType indptr_type = IndexType::I32;  // I32 | I64
  IndexType index_type = IndexType::U16;   // U16 | I32

  int block_r = 1;  // BSR block shape (1 x 1 for CSR)
  int block_c = 1;
  int num_threads = 1;  // CPU: OpenMP threads for this call (>= 1); ignored by CUDA
  int variant = 0;  // CPU: kernel variant id (csrc/cpu/variants.h), 0 = built-in choice; CUDA ignores it
  Activation activation = Activation::None;  // CPU kernels; the CUDA bindings leave it None
};

}  // namespace sparsekit
