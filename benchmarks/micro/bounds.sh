#!/usr/bin/env bash
# The bound measurements behind the "What bounds the misses" tables of docs/kernels.md: builds
# kernel_micro for AVX-512 and AVX2 and prints, per ISA path and at THREADS threads (default 2),
#   - the register-only FMA ceiling (peak),
#   - the read probe (1 and 2 sequential streams per thread, no / software prefetch; AVX-512 build),
#   - CSR SpMV at 70 / 90 / 95% sparsity against the same loop with x read contiguously
#     (spmv-no-gather: what the loop streams when gathers cost nothing),
#   - CSR SpMV, 10% density: weights streamed (rotating over > 2x the LLC) against weights resident
#     in L2 (1024x4096, 2.5 MB over the cores' L2) for fp32 and bf16 values,
#   - CSR N = 128 at 20% density and BSR N = 128 at 10% (16x16 and 8x8 blocks), weights warm,
#     as G vec/s to set against the peak.
# Run it on a quiet machine (timed: under the benchmark lock where one exists). The dense
# baselines (GEMV read rate, GEMM FLOP/s at N = 128) are in the bench_cpu.py result files.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
T="${THREADS:-2}"
OUT="${OUT:-$ROOT/build/micro}"
for isa in avx512 avx2; do
  ISA=$isa OUT="$OUT/$isa" bash "$ROOT/benchmarks/micro/build.sh" >/dev/null
done
for isa in avx512 avx2; do
  B="$OUT/$isa/kernel_micro"
  echo "== $isa"
  "$B" peak "$T"
  if [ "$isa" = avx512 ]; then
    "$B" read 1 0 "$T"; "$B" read 2 0 "$T"; "$B" read 1 1024 "$T"
  fi
  for v in 1 2; do  # csr_spmv_gather, csr_spmv_assemble
    "$B" spmv 4096 4096 0.1 "$T" v=$v
    "$B" spmv 4096 4096 0.1 "$T" bf16 v=$v
  done
  for d in 0.3 0.1 0.05; do  # the gather loop against the same loop without gathers
    "$B" spmv 4096 4096 $d "$T" v=1
    "$B" spmv-no-gather 4096 4096 $d "$T"
  done
  "$B" spmv 1024 4096 0.1 "$T" warm v=1
  "$B" spmv 1024 4096 0.1 "$T" warm bf16 v=1
  "$B" spmv 1024 4096 0.1 1 warm v=1
  "$B" spmv 1024 4096 0.1 1 warm bf16 v=1
  for v in 5 11; do "$B" csr 4096 4096 128 0.2 "$T" v=$v; done  # csr_tile_v4, csr_tile_v8
  "$B" bsr 4096 4096 128 0.1 16 16 "$T"
  "$B" bsr 4096 4096 128 0.1 8 8 "$T"
done
