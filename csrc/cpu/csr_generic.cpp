// CSR kernels compiled for the generic ISA (flags set per file in CMakeLists.txt).
#define SPARSEKIT_ISA_GENERIC 1
#include "cpu/kernels_impl.h"
#include "cpu/spmm_cpu.h"

SPARSEKIT_DEFINE_CSR_ENTRY(csr_linear_generic)
SPARSEKIT_DEFINE_CSR_PROBE(csr_probe_generic)
