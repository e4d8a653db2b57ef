#include "cpu/cpu_features.h"

#include <cstdint>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace sparsekit {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512: return "avx512";
    case Isa::AVX2: return "avx2";
    default: return "generic";
  }
}

Isa parse_isa(const std::string& name, const char* what) {
  if (name == "generic") return Isa::Generic;
  if (name == "avx2") return Isa::AVX2;
  if (name == "avx512") return Isa::AVX512;
  throw std::invalid_argument(std::string(what) +
                              ": expected one of 'generic', 'avx2', 'avx512', got '" + name + "'");
}

static Isa detect() {
  Isa best = Isa::Generic;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wide registers (XGETBV).
#if defined(SPARSEKIT_HAVE_ISA_avx2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt"))
    best = Isa::AVX2;
#endif
#if defined(SPARSEKIT_HAVE_ISA_avx512)
  if (best == Isa::AVX2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    best = Isa::AVX512;
#endif
#endif
  return best;
}

Isa hardware_isa() {
  static const Isa hw = detect();  // immutable after first use
  return hw;
}

static Isa env_isa() {
  const char* env = std::getenv("SPARSEKIT_ISA");
  Isa hw = hardware_isa();
  if (env == nullptr || *env == '\0' || std::string(env) == "auto") return hw;
  Isa want = parse_isa(env, "SPARSEKIT_ISA");
  return static_cast<int>(want) < static_cast<int>(hw) ? want : hw;
}

Isa default_isa() {
  static const Isa isa = env_isa();  // throws (and retries next call) on a bad value
  return isa;
}

Isa resolve_isa(const std::string& name, const char* what) {
  if (name == "auto") return default_isa();
  Isa want = parse_isa(name, what);
  Isa hw = hardware_isa();
  if (static_cast<int>(want) > static_cast<int>(hw))
    throw std::invalid_argument(std::string(what) + ": expected an ISA supported by this CPU (up to '" +
                                isa_name(hw) + "'), got '" + name + "'");
  return want;
}

#if defined(__x86_64__) || defined(__i386__)
// clflushopt (Skylake and later, Zen and later): flushes are not ordered among themselves, so
// they overlap; clflush serialises them (about 50x slower: 135 MiB flushed in 370 ms against
// 7.5 ms on a Xeon), which made the planner's cache flushes most of its cost.
static bool has_clflushopt() {
  static const bool supported = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) != 0 && (b & (1u << 23)) != 0;
  }();
  return supported;
}

__attribute__((target("clflushopt"))) static void flush_lines_unordered(uintptr_t first,
                                                                        uintptr_t end) {
  for (uintptr_t a = first; a < end; a += 64)
    __builtin_ia32_clflushopt(reinterpret_cast<void*>(a));
}
#endif

void evict_from_caches(const void* p, size_t nbytes) {
#if defined(__x86_64__) || defined(__i386__)
  if (p == nullptr || nbytes == 0) return;
  // Line size 64 on every x86-64 core; flushing a line twice (a smaller real line) is harmless.
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + nbytes;
  if (has_clflushopt()) {
    flush_lines_unordered(first, end);
  } else {
    for (uintptr_t a = first; a < end; a += 64) __builtin_ia32_clflush(reinterpret_cast<const void*>(a));
  }
  __builtin_ia32_mfence();  // the flushes complete before the timed call starts
#else
  (void)p;
  (void)nbytes;
#endif
}

}  // namespace cpu
}  // namespace sparsekit
