// The one table of CPU kernel variants. A variant is a real alternative loop nest (or tiling)
// for one kernel family and batch class; which one is fastest depends on the microarchitecture
// (e.g. hardware gathers are fast on recent Intel cores and microcoded on AMD Zen 2/3), so
// sparsekit/kernels/planner.py times the candidates on the machine at hand and remembers the
// winner (FFTW wisdom / LIBXSMM style). Variant 0 ("auto") is the built-in heuristic choice.
//
// A variant applies to calls of its family and batch class only; any other call runs the
// built-in choice. Plain data, no dependencies: included by the bindings and by every ISA TU.
#pragma once

#include <cstdint>

namespace sparsekit {
namespace cpu {

enum class Variant : int {
  Auto = 0,
  // CSR, N <= 2 (SpMV: weights read once, x indexed per nonzero).
  CsrSpmvGather = 1,    // x lanes from a hardware gather (vpgatherdd), 2W nonzeros per step
  CsrSpmvAssemble = 2,  // x lanes from W scalar loads + shuffles; bf16 values widened in pairs
  CsrSpmvScalar = 3,    // scalar FMAs, 4 independent sums (no vector unit for x at all)
  CsrSpmvGather4 = 4,   // hardware gather, 4W nonzeros per step (4 accumulator chains)
  // CSR, N > 2 (packed x tiles of V vectors: V * W batch columns per pass over the weights).
  CsrTileV4 = 5,  // up to 4 vectors (needs 32 vector registers to stay out of spills at W=8)
  CsrTileV2 = 6,  // up to 2 vectors (fits 16 registers)
  CsrTileV1 = 7,  // 1 vector
  // BSR, N > 1 (RB x V register-blocked micro-kernel).
  BsrTileV4 = 8,  // up to 4 vectors
  BsrTileV2 = 9,  // up to 2 vectors (the built-in choice on 8-lane ISAs for block_r >= 2)
  BsrTileV1 = 10,
  // CSR, N > 2: 8 vectors (64 batch columns at W = 8, so one K-blocked pass over the weights per
  // 64 columns on 16-register files, as V4 gives 32-register files).
  CsrTileV8 = 11,
  // Compressed CSR (int8 values and/or uint8 column gaps), N <= 2 (csr_q_impl.h).
  CsrqRows2 = 12,   // two rows in lockstep, hardware gather of x (the built-in choice)
  CsrqRow1 = 13,    // one row at a time, hardware gather of x
  CsrqBitmap = 14,  // int8 values expanded by a 64-bit occupancy word per 64 columns; x read
                    // contiguously: no gathers, cost per column rather than per nonzero
  // CSR, N <= 2: values placed by occupancy words (SpmmParams::bitmap), x read contiguously.
  CsrSpmvBitmap = 15,
  // Compressed CSR, int8 values, N <= 2: as CsrqBitmap with x as 32-bit fixed point in byte
  // planes and VNNI byte dot products (AVX-512 VNNI + VBMI2 CPUs only).
  CsrqBitmapVnni = 16,
  // Compressed CSR, N <= 2: as CsrqRow1 with x assembled from scalar loads (no gathers).
  CsrqAssemble = 17,
  kCount = 18,
};

// Bit per ISA (Isa::Generic = 0, AVX2 = 1, AVX512 = 2 in cpu_features.h).
constexpr unsigned kIsaGeneric = 1u, kIsaAvx2 = 2u, kIsaAvx512 = 4u;
constexpr unsigned kIsaSimd = kIsaAvx2 | kIsaAvx512;
constexpr unsigned kIsaAll = kIsaGeneric | kIsaSimd;

// CPU features beyond an ISA level that a variant may need (bits of VariantInfo::features;
// cpu::cpu_feature_bits() in cpu_features.h reports which this CPU has). Names as in kFeatureNames.
constexpr unsigned kFeatAvx512Vnni = 1u, kFeatAvx512Vbmi2 = 2u;
inline constexpr const char* kFeatureNames[] = {"avx512vnni", "avx512vbmi2"};
constexpr int kFeatureCount = static_cast<int>(sizeof(kFeatureNames) / sizeof(kFeatureNames[0]));

struct VariantInfo {
  Variant id;
  const char* name;     // what SPARSEKIT_KERNEL and the wisdom file use
  const char* family;   // "csr" | "bsr" | "" (auto)
  int n_min, n_max;     // batch sizes N it applies to (n_max < 0: unbounded)
  unsigned isas;        // kIsa* bits it is compiled for
  const char* dtypes;   // value dtypes
  const char* summary;  // one line: what differs
  unsigned features = 0;  // kFeat* bits it needs beyond its ISA level
};

inline constexpr VariantInfo kVariants[] = {
    {Variant::Auto, "auto", "", 1, -1, kIsaAll, "f32,bf16,f16", "built-in heuristic choice"},
    {Variant::CsrSpmvGather, "csr_spmv_gather", "csr", 1, 2, kIsaSimd, "f32,bf16,f16",
     "hardware gather of x, 2 vectors of nonzeros per step"},
    {Variant::CsrSpmvAssemble, "csr_spmv_assemble", "csr", 1, 2, kIsaSimd, "f32,bf16,f16",
     "x assembled from scalar loads (no gather), bf16 widened by interleaving with zeros"},
    {Variant::CsrSpmvScalar, "csr_spmv_scalar", "csr", 1, 2, kIsaAll, "f32,bf16,f16",
     "scalar multiply-adds, 4 independent sums"},
    {Variant::CsrSpmvGather4, "csr_spmv_gather4", "csr", 1, 2, kIsaSimd, "f32,bf16,f16",
     "hardware gather of x, 4 vectors of nonzeros per step"},
    {Variant::CsrTileV4, "csr_tile_v4", "csr", 3, -1, kIsaAll, "f32,bf16,f16",
     "packed x tiles up to 4 vectors wide (32-register files)"},
    {Variant::CsrTileV2, "csr_tile_v2", "csr", 3, -1, kIsaAll, "f32,bf16,f16",
     "packed x tiles up to 2 vectors wide (16-register files)"},
    {Variant::CsrTileV1, "csr_tile_v1", "csr", 3, -1, kIsaAll, "f32,bf16,f16",
     "packed x tiles 1 vector wide"},
    {Variant::BsrTileV4, "bsr_tile_v4", "bsr", 2, -1, kIsaAll, "f32,bf16,f16",
     "register-blocked BSR, tiles up to 4 vectors wide"},
    {Variant::BsrTileV2, "bsr_tile_v2", "bsr", 2, -1, kIsaAll, "f32,bf16,f16",
     "register-blocked BSR, tiles up to 2 vectors wide"},
    {Variant::BsrTileV1, "bsr_tile_v1", "bsr", 2, -1, kIsaAll, "f32,bf16,f16",
     "register-blocked BSR, tiles 1 vector wide"},
    {Variant::CsrTileV8, "csr_tile_v8", "csr", 3, -1, kIsaAll, "f32,bf16,f16",
     "packed x tiles up to 8 vectors wide, 1 nonzero in flight (fewer passes over the weights)"},
    {Variant::CsrqRows2, "csrq_rows2", "csrq", 1, 2, kIsaAll, "i8,f32,bf16,f16",
     "compressed formats: two rows in lockstep, x gathered (scalar loads in the generic build)"},
    {Variant::CsrqRow1, "csrq_row1", "csrq", 1, 2, kIsaSimd, "i8,f32,bf16,f16",
     "compressed formats: one row at a time, hardware gather of x"},
    {Variant::CsrqBitmap, "csrq_bitmap", "csrq", 1, 2, kIsaAll, "i8",
     "int8 values placed by a 64-bit occupancy word per 64 columns, x read contiguously (no gathers)"},
    {Variant::CsrSpmvBitmap, "csr_spmv_bitmap", "csr", 1, 2, kIsaAll, "f32,bf16,f16",
     "values placed by a 64-bit occupancy word per 64 columns, x read contiguously (no gathers)"},
    {Variant::CsrqBitmapVnni, "csrq_bitmap_vnni", "csrq", 1, 2, kIsaAvx512, "i8",
     "csrq_bitmap with x as 32-bit fixed point in 4 byte planes and VNNI byte dot products "
     "(CPUs with AVX-512 VNNI + VBMI2)", kFeatAvx512Vnni | kFeatAvx512Vbmi2},
    {Variant::CsrqAssemble, "csrq_assemble", "csrq", 1, 2, kIsaSimd, "i8,f32,bf16,f16",
     "compressed formats: one row at a time, x assembled from scalar loads (no gather)"},
};
static_assert(sizeof(kVariants) / sizeof(kVariants[0]) == static_cast<int>(Variant::kCount),
              "one kVariants row per Variant");

inline const VariantInfo& variant_info(Variant v) { return kVariants[static_cast<int>(v)]; }

// True when variant v is meant for a call of `family` ("csr" / "bsr") with batch N.
inline bool variant_applies(Variant v, const char* family, int64_t N) {
  const VariantInfo& vi = variant_info(v);
  if (v == Variant::Auto) return true;
  const char* f = vi.family;
  const char* g = family;
  while (*f && *f == *g) ++f, ++g;
  if (*f != *g) return false;
  return N >= vi.n_min && (vi.n_max < 0 || N <= vi.n_max);
}

}  // namespace cpu
}  // namespace sparsekit
