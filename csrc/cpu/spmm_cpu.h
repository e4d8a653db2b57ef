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
// Benchmarks only: the floors of an N = 1 SpMV of a CSR matrix, over the N = 1 kernels' threads
// and row chunks; writes y[m] (fp32, M entries) and reads p.indptr, p.indices, p.M,
// p.num_threads and the dtypes.
// - Probe::Read: the XOR of the bytes of row m's values (bits 0-7) and column ids (bits 8-15),
//   read the way the N = 1 kernels stream them (same prefetch; no x, no arithmetic): the memory
//   floor. Also reads p.values. Cost: O(nnz * (value + index bytes)) bytes read.
// - Probe::Gather: sum_j x[idx[j]] over row m, x (p.x, fp32, K entries) fetched with the
//   gathers of csr_spmv_gather and no values read: the x-fetch floor. Cost: O(nnz) gathers.
// - Probe::Assemble: the same sum, x assembled from scalar loads as csr_spmv_assemble does:
//   the x-fetch floor of the gather-free kernel. Cost: O(nnz) scalar loads.
enum class Probe { Read = 0, Gather = 1, Assemble = 2 };
void csr_probe(const SpmmParams& p, Isa isa, Probe kind);

// Per-ISA implementations (csrc/cpu/{csr,bsr}_<isa>.cpp). Only call those the CPU supports.
void csr_linear_generic(const SpmmParams& p);
void csr_linear_avx2(const SpmmParams& p);
void csr_linear_avx512(const SpmmParams& p);
void csr_probe_generic(const SpmmParams& p, Probe kind);
void csr_probe_avx2(const SpmmParams& p, Probe kind);
void csr_probe_avx512(const SpmmParams& p, Probe kind);
void bsr_linear_generic(const SpmmParams& p);
void bsr_linear_avx2(const SpmmParams& p);
void bsr_linear_avx512(const SpmmParams& p);

}  // namespace cpu
}  // namespace sparsekit
