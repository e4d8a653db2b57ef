// Runtime ISA dispatch for the CPU kernels.
#include "cpu/spmm_cpu.h"

#include <stdexcept>

namespace sparsekit {
namespace cpu {

void csr_linear(const SpmmParams& p, Isa isa) {
  switch (isa) {
#if defined(SPARSEKIT_HAVE_ISA_avx512)
    case Isa::AVX512: return csr_linear_avx512(p);
#endif
#if defined(SPARSEKIT_HAVE_ISA_avx2)
    case Isa::AVX2: return csr_linear_avx2(p);
#endif
    default: return csr_linear_generic(p);
  }
}

void csr_probe(const SpmmParams& p, Isa isa, Probe kind) {
  switch (isa) {
#if defined(SPARSEKIT_HAVE_ISA_avx512)
    case Isa::AVX512: return csr_probe_avx512(p, kind);
#endif
#if defined(SPARSEKIT_HAVE_ISA_avx2)
    case Isa::AVX2: return csr_probe_avx2(p, kind);
#endif
    default: return csr_probe_generic(p, kind);
  }
}

void bsr_linear(const SpmmParams& p, Isa isa) {
  switch (isa) {
#if defined(SPARSEKIT_HAVE_ISA_avx512)
    case Isa::AVX512: return bsr_linear_avx512(p);
#endif
#if defined(SPARSEKIT_HAVE_ISA_avx2)
    case Isa::AVX2: return bsr_linear_avx2(p);
#endif
    default: return bsr_linear_generic(p);
  }
}

}  // namespace cpu
}  // namespace sparsekit
