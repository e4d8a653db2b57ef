// Runtime CPU feature detection and ISA selection for the CPU kernels.
#pragma once

#include <cstddef>
#include <string>

#include "cpu/variants.h"

namespace sparsekit {
namespace cpu {

// Ordered: a higher level implies every lower one is usable.
enum class Isa : int { Generic = 0, AVX2 = 1, AVX512 = 2 };

const char* isa_name(Isa isa);

// Parses "generic" | "avx2" | "avx512"; throws std::invalid_argument otherwise,
// naming `what` (e.g. "SPARSEKIT_ISA" or "isa").
Isa parse_isa(const std::string& name, const char* what);

// Best ISA this CPU + OS supports AND this binary was compiled for (ignores SPARSEKIT_ISA).
Isa hardware_isa();

// hardware_isa() capped by the SPARSEKIT_ISA environment variable (read once, at first use;
// a value above the hardware level is capped to it). Throws std::invalid_argument for an
// unknown value.
Isa default_isa();

// Resolves a per-call request: "auto" -> default_isa(); otherwise the named ISA, which must
// not exceed hardware_isa() (std::invalid_argument naming `what` if it does).
Isa resolve_isa(const std::string& name, const char* what);

// True when the CPU and OS support AVX-512 VBMI2 (byte expand/compress), checked once. Only
// meaningful for the AVX-512 kernels, which use it where present (csr_q_impl.h). Header-only so
// the stand-alone kernel programs (benchmarks/micro, tests/cpp) need no other object.
inline bool has_avx512_vbmi2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vbmi2");
  }();
  return supported;
#else
  return false;
#endif
}

// True when the CPU and OS support AVX-512 VNNI (byte dot products), checked once.
inline bool has_avx512_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni");
  }();
  return supported;
#else
  return false;
#endif
}

// True when the CPU has both: the csrq_bitmap_vnni kernel needs them (csr_q_impl.h).
inline bool has_avx512_vnni_vbmi2() { return has_avx512_vnni() && has_avx512_vbmi2(); }

// The kFeat* bits of variants.h this CPU has (which kernel variants it can run beyond its ISA).
inline unsigned cpu_feature_bits() {
  return (has_avx512_vnni() ? kFeatAvx512Vnni : 0u) | (has_avx512_vbmi2() ? kFeatAvx512Vbmi2 : 0u);
}

// Writes back and invalidates every cache line of [p, p + nbytes) at every cache level, so the
// next access comes from memory (x86: one clflushopt per 64-byte line where the CPU has it, else
// clflush, then a fence; elsewhere a no-op). The planner times kernels this way: a model's
// weights stream from memory on every forward pass, while a matrix timed repeatedly stays in a
// large last-level cache, and which variant wins can differ between the two. Cost:
// O(nbytes / 64) flushes.
void evict_from_caches(const void* p, size_t nbytes);

}  // namespace cpu
}  // namespace sparsekit
