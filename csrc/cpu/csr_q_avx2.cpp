// Compressed-format CSR kernels compiled for the avx2 ISA (flags set per file in CMakeLists.txt).
#define SPARSEKIT_ISA_AVX2 1
#include "cpu/csr_q_impl.h"
#include "cpu/spmm_q.h"

SPARSEKIT_DEFINE_CSRQ_ENTRY(csrq_linear_avx2)
