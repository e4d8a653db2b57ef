// Device-side helpers shared by the sparsekit CUDA kernels (types, loads, error handling).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "common/format.h"
#include "cuda/spmm_cuda.h"

namespace sparsekit {
namespace cuda {

// Storage type (common/format.h) -> CUDA device type. Same size and bit layout.
template <class T> struct DevType { using type = T; };
template <> struct DevType<f16_t> { using type = __half; };
template <> struct DevType<bf16_t> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Read-only-cache load of one element (x is re-read by many warps: keep it in L1/tex).
template <class T> __device__ __forceinline__ T ldg(const T* p) { return __ldg(p); }
template <> __device__ __forceinline__ uint16_t ldg<uint16_t>(const uint16_t* p) {
  return __ldg(reinterpret_cast<const unsigned short*>(p));
}

// Streaming (evict-first) loads of N contiguous elements, 16 bytes at a time: weights are read
// once per call, so they should not evict x from L1. Requires p aligned to min(16, N*sizeof(T)).
template <class T, int N>
__device__ __forceinline__ void load_stream(const T* __restrict__ p, T (&out)[N]) {
  constexpr int BYTES = N * static_cast<int>(sizeof(T));
  static_assert(BYTES % 8 == 0 && (BYTES <= 8 || BYTES % 16 == 0), "unsupported vector width");
  if constexpr (BYTES >= 16) {
    constexpr int PER = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < BYTES / 16; ++i) {
      const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p) + i);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int j = 0; j < PER; ++j) {
        // Extract element j of the 16-byte word with shifts (keeps everything in registers).
        if constexpr (sizeof(T) == 4) {
          out[i * PER + j] = __builtin_bit_cast(T, w[j]);
        } else {
          const uint16_t h = static_cast<uint16_t>(w[j / 2] >> (16 * (j % 2)));
          out[i * PER + j] = __builtin_bit_cast(T, h);
        }
      }
    }
  } else {
    const uint2 u = __ldcs(reinterpret_cast<const uint2*>(p));
    const uint32_t w[2] = {u.x, u.y};
    constexpr int PER = 8 / sizeof(T);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      if constexpr (sizeof(T) == 4) {
        out[j] = __builtin_bit_cast(T, w[j]);
      } else {
        const uint16_t h = static_cast<uint16_t>(w[j / 2] >> (16 * (j % 2)));
        out[j] = __builtin_bit_cast(T, h);
      }
    }
  }
}

// Element loads of sparse-structure arrays with the streaming hint.
template <class T> __device__ __forceinline__ T ld_stream(const T* p) { return *p; }
template <> __device__ __forceinline__ float ld_stream<float>(const float* p) { return __ldcs(p); }
template <> __device__ __forceinline__ int32_t ld_stream<int32_t>(const int32_t* p) {
  return __ldcs(p);
}

// Explicit 64-bit min/max (no reliance on which CUDA math overload `min` resolves to).
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ int64_t load_ptr(const void* indptr, bool idx64, int64_t i) {
  return idx64 ? static_cast<const int64_t*>(indptr)[i]
               : static_cast<int64_t>(static_cast<const int32_t*>(indptr)[i]);
}

inline bool aligned(const void* p, std::uintptr_t bytes) {
  return (reinterpret_cast<std::uintptr_t>(p) % bytes) == 0;
}

// Launch-error check: a launch can fail synchronously (bad configuration, no kernel image for
// this device) or report a sticky error left by earlier asynchronous work.
inline Status check_launch(const char* kernel) {
  cudaError_t err = cudaGetLastError();
  Status st;
  if (err != cudaSuccess) {
    st.code = static_cast<int>(err);
    st.message = std::string(kernel) + ": " + cudaGetErrorName(err) + ": " +
                 cudaGetErrorString(err);
  }
  return st;
}

inline Status reject(const std::string& msg) {
  Status st;
  st.code = -1;
  st.message = msg;
  return st;
}

// The (value type, x type) pairs the kernels are built for: x is fp32 or the value type.
// Calls fn.template operator()<V, X>() with device types. Uses the one value-dtype switch of
// common/dispatch.h for V.
#define SPARSEKIT_CUDA_VX_SWITCH(P, V, X, ...)                                        \
  SPARSEKIT_VALUE_SWITCH((P).value_dtype, VS_, [&] {                                   \
    using V = typename ::sparsekit::cuda::DevType<VS_>::type;                          \
    if ((P).x_dtype == ::sparsekit::DType::F32) {                                      \
      using X = float;                                                                 \
      return __VA_ARGS__();                                                            \
    }                                                                                  \
    using X = V;                                                                       \
    return __VA_ARGS__();                                                              \
  })

}  // namespace cuda
}  // namespace sparsekit
