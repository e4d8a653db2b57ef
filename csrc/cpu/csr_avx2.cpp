// CSR kernels compiled for the avx2 ISA (flags set per file in CMakeLists.txt).
#define SPARSEKIT_ISA_AVX2 1
#include "cpu/kernels_impl.h"
#include "cpu/spmm_cpu.h"

SPARSEKIT_DEFINE_CSR_ENTRY(csr_linear_avx2)
SPARSEKIT_DEFINE_CSR_PROBE(csr_probe_avx2)
