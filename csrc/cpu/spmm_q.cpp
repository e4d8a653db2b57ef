// Runtime ISA dispatch for the compressed-format CSR kernels.
#include "cpu/spmm_q.h"

namespace sparsekit {
namespace cpu {

void csrq_linear(const SpmmParams& p, Isa isa) {
  switch (isa) {
#if defined(SPARSEKIT_HAVE_ISA_avx512)
    case Isa::AVX512: return csrq_linear_avx512(p);
#endif
#if defined(SPARSEKIT_HAVE_ISA_avx2)
    case Isa::AVX2: return csrq_linear_avx2(p);
#endif
    default: return csrq_linear_generic(p);
  }
}

}  // namespace cpu
}  // namespace sparsekit
