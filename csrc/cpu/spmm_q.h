// Plain C++ entry points of the compressed-format CPU kernels (no pybind11).
#pragma once

#include "common/format.h"
#include "cpu/cpu_features.h"

namespace sparsekit {
namespace cpu {

// y = x @ W^T (* p.scales per row) + bias for W in CSR with int8 / fp32 / bf16 / fp16 values
// and uint16 / int32 / D8 (uint8 gap) indices. O(nnz * N); weights read once per vector.
void csrq_linear(const SpmmParams& p, Isa isa);

void csrq_linear_generic(const SpmmParams& p);
void csrq_linear_avx2(const SpmmParams& p);
void csrq_linear_avx512(const SpmmParams& p);

}  // namespace cpu
}  // namespace sparsekit
