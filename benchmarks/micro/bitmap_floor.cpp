// Compute floor of the occupancy-bitmap int8 SpMV (csrq_bitmap / csrq_bitmap_vnni): per row, one
// 64-bit occupancy mask per 64 columns plus the kept int8 values in order, expanded to a dense
// 64-byte block in registers (AVX-512 VBMI2 vpexpandb). Mode "f32" (default) widens the block to
// fp32 and multiplies it with x read contiguously, in a loop written out here; mode "vnni" runs
// sparsekit's q_row_bitmap_dot_vnni (x as 32-bit fixed point in byte planes, four vpdpbusd per
// block). Every weight position costs the same, kept or not, so the cost is per weight, not per
// nonzero (docs/compression.md, "Measured bounds"). Matrix and x resident in cache (M rows x
// 4096); the result is checked against a float64 reference before timing.
//
//   build:  SRC=benchmarks/micro/bitmap_floor.cpp bash benchmarks/micro/build.sh -mavx512vbmi2 -mpopcnt
//   run:    build/micro/bitmap_floor [M] [density] [threads] [f32|vnni]   defaults 256 0.3 1 f32
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cpu/csr_q_impl.h"

int main(int argc, char** argv) {
  const int M = argc > 1 ? std::atoi(argv[1]) : 256, K = 4096, B = K / 64;
  const double d = argc > 2 ? std::atof(argv[2]) : 0.3;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 1;
  const bool vnni = argc > 4 && std::string(argv[4]) == "vnni";
  if (vnni && !sparsekit::cpu::has_avx512_vnni_vbmi2()) {
    std::fprintf(stderr, "vnni: this CPU lacks AVX-512 VNNI + VBMI2\n");
    return 2;
  }
  std::mt19937 g(1);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<uint64_t> mask(size_t(M) * B);
  std::vector<int64_t> start(M + 1, 0);  // offset of each row's first kept value
  std::vector<int8_t> vals;
  std::vector<double> ref(M, 0.0);
  std::vector<float> x(K), y(M);
  for (auto& v : x) v = u(g) - 0.5f;
  for (int m = 0; m < M; ++m) {
    for (int b = 0; b < B; ++b) {
      uint64_t w = 0;
      for (int t = 0; t < 64; ++t)
        if (u(g) < d) {
          const int8_t q = static_cast<int8_t>(static_cast<int>(g() % 255) - 127);
          w |= uint64_t(1) << t;
          vals.push_back(q);
          ref[m] += double(q) * x[b * 64 + t];
        }
      mask[size_t(m) * B + b] = w;
    }
    start[m + 1] = static_cast<int64_t>(vals.size());
  }
  vals.resize(vals.size() + 64, 0);  // the expand-load reads up to 64 bytes past the last value

  // mode vnni: x packed once (as the driver does per call), row sums once (as the binding does)
  std::vector<uint8_t> planes(4 * size_t(K));
  int e = 0;
  if (vnni) sparsekit::cpu::pack_x_fixed_planes(x.data(), K, K, planes.data(), e);
  std::vector<int64_t> rowsum(M, 0);
  for (int m = 0; m < M; ++m)
    for (int64_t i = start[m]; i < start[m + 1]; ++i) rowsum[m] += vals[size_t(i)];
  auto run_vnni = [&] {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int m = 0; m < M; ++m) {
      const int64_t t = sparsekit::cpu::q_row_bitmap_dot_vnni(mask.data() + size_t(m) * B, K,
                                                             vals.data() + start[m], planes.data(), K);
      y[m] = static_cast<float>(std::ldexp(double(t - rowsum[m] * (int64_t(1) << 31)), -e));
    }
  };
  auto run_f32 = [&] {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int m = 0; m < M; ++m) {
      const int8_t* vp = vals.data() + start[m];
      const uint64_t* mk = mask.data() + size_t(m) * B;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int b = 0; b < B; ++b) {
        const uint64_t w = mk[b];
        const __m512i v = _mm512_maskz_expandloadu_epi8(w, vp);
        vp += _mm_popcnt_u64(w);
        const float* xb = x.data() + b * 64;
        auto lane = [](__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); };
        a0 = _mm512_fmadd_ps(lane(_mm512_castsi512_si128(v)), _mm512_loadu_ps(xb), a0);
        a1 = _mm512_fmadd_ps(lane(_mm512_extracti32x4_epi32(v, 1)), _mm512_loadu_ps(xb + 16), a1);
        a2 = _mm512_fmadd_ps(lane(_mm512_extracti32x4_epi32(v, 2)), _mm512_loadu_ps(xb + 32), a2);
        a3 = _mm512_fmadd_ps(lane(_mm512_extracti32x4_epi32(v, 3)), _mm512_loadu_ps(xb + 48), a3);
      }
      y[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
  };
  auto run = [&] {
    if (vnni) run_vnni();
    else run_f32();
  };
  run();
  double err = 0, nrm = 0;
  for (int m = 0; m < M; ++m) {
    err = std::max(err, std::fabs(y[m] - ref[m]));
    nrm = std::max(nrm, std::fabs(ref[m]));
  }
  std::vector<double> ts;
  for (int r = 0; r < 41; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    run();
    ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  const double t = ts[ts.size() / 2], weights = double(M) * K;
  std::printf("bitmap_floor %s %dx%d density=%.2f threads=%d: %.4f ns per weight per core (min %.4f), "
              "%.3f ns per kept value, max rel err %.1e\n",
              vnni ? "vnni" : "f32", M, K, d, threads, t * threads / weights * 1e9, ts[0] * threads / weights * 1e9,
              t * threads / (weights * d) * 1e9, err / (nrm > 0 ? nrm : 1));
  return err / (nrm > 0 ? nrm : 1) < 1e-5 ? 0 : 1;
}
