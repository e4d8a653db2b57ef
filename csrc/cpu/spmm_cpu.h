// Plain C++ entry points of the CPU kernels (no pybind11). Arguments: see SpmmParams.
#pragma once

#include "common/format.h"
#include "cpu/cpu_features.h"

namespace sparsekit {
namespace cpu {

// y = x @ W^T + bias for W in CSR (p.block_r == p.block_c == 1 is ignored).
// Cost: O(nnz * N) flops, O(nnz * (value+index bytes) * ceil(N / tile)) weight traffic
// (tile = 16..64 batch columns), plus O(N * K) to pack x when N > 1.
void csr_linear(const SpmmParams& p, Isa isa);
// y = x @ W^T + bias for W in BSR with p.block_r x p.block_c blocks.
// Cost: O(nnzb * r * c * N) flops.
void bsr_linear(const SpmmParams& p, Isa isa);
// Benchmarks only: y[m] (fp32, M entries) = XOR of the bytes of row m's values (bits 0-7) and
// column ids (bits 8-15), read the way the N = 1 CSR kernels stream them (same threads, row
// chunks and prefetch; no x, no arithmetic): the memory floor of an SpMV of that matrix.
// Reads p.indptr, p.indices, p.values, p.M, p.num_threads and the dtypes; writes p.y.
// Cost: O(nnz * (value + index bytes)) bytes read.
void csr_read_probe(const SpmmParams& p, Isa isa);

// Per-ISA implementations (csrc/cpu/{csr,bsr}_<isa>.cpp). Only call those the CPU supports.
void csr_linear_generic(const SpmmParams& p);
void csr_linear_avx2(const SpmmParams& p);
void csr_linear_avx512(const SpmmParams& p);
void csr_read_probe_generic(const SpmmParams& p);
void csr_read_probe_avx2(const SpmmParams& p);
void csr_read_probe_avx512(const SpmmParams& p);
void bsr_linear_generic(const SpmmParams& p);
void bsr_linear_avx2(const SpmmParams& p);
void bsr_linear_avx512(const SpmmParams& p);

}  // namespace cpu
}  // namespace sparsekit
