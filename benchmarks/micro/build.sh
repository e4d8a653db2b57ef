#!/usr/bin/env bash
# Builds benchmarks/micro/kernel_micro.cpp into build/micro/ with one ISA's flags
# (ISA=avx512 (default) | avx2 | generic), the same flags CMakeLists.txt uses for that TU.
# OUT=<dir> puts the binary elsewhere (default build/micro). SRC=<file> builds another
# stand-alone kernel program the same way (e.g. tests/cpp/ukernel_test.cpp), named after it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ISA="${ISA:-avx512}"
case "$ISA" in
  avx512) FLAGS=(-DSPARSEKIT_ISA_AVX512 -mavx512f -mavx512bw -mavx512vl -mavx2 -mfma -mf16c -mpopcnt
          -Wno-maybe-uninitialized -Wno-uninitialized) ;;  # GCC 12: false positives in avx512fintrin.h
  avx2) FLAGS=(-DSPARSEKIT_ISA_AVX2 -mavx2 -mfma -mf16c -mpopcnt) ;;
  generic) FLAGS=(-DSPARSEKIT_ISA_GENERIC) ;;
  *) echo "ISA must be avx512, avx2 or generic, got '$ISA'" >&2; exit 2 ;;
esac
OUT="${OUT:-$ROOT/build/micro}"
SRC="${SRC:-$ROOT/benchmarks/micro/kernel_micro.cpp}"
NAME="$(basename "$SRC" .cpp)"
mkdir -p "$OUT"
"${CXX:-g++}" -std=c++17 -O3 -fopenmp -Wall -Wextra -Wno-unused-parameter "${FLAGS[@]}" \
  -I"$ROOT/csrc" "$@" -o "$OUT/$NAME" "$SRC"
echo "built $OUT/$NAME ($ISA)"
