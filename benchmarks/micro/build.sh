#!/usr/bin/env bash
# Builds benchmarks/micro/kernel_micro.cpp into build/micro/ with one ISA's flags
# (ISA=avx512 (default) | avx2 | generic), the same flags CMakeLists.txt uses for that TU.
# OUT=<dir> puts the binary elsewhere (default build/micro).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ISA="${ISA:-avx512}"
case "$ISA" in
  avx512) FLAGS=(-DSPARSEKIT_ISA_AVX512 -mavx512f -mavx512bw -mavx512vl -mavx2 -mfma -mf16c) ;;
  avx2) FLAGS=(-DSPARSEKIT_ISA_AVX2 -mavx2 -mfma -mf16c) ;;
  generic) FLAGS=(-DSPARSEKIT_ISA_GENERIC) ;;
  *) echo "ISA must be avx512, avx2 or generic, got '$ISA'" >&2; exit 2 ;;
esac
OUT="${OUT:-$ROOT/build/micro}"
mkdir -p "$OUT"
"${CXX:-g++}" -std=c++17 -O3 -fopenmp "${FLAGS[@]}" -I"$ROOT/csrc" "$@" \
  -o "$OUT/kernel_micro" "$ROOT/benchmarks/micro/kernel_micro.cpp"
echo "built $OUT/kernel_micro ($ISA)"
