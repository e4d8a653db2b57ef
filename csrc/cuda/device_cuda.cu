// sparsekit CUDA runtime queries. Nothing here runs at import: the binding calls these lazily.
#include "cuda/cuda_common.cuh"

#ifndef SPARSEKIT_CUDA_ARCHS
#define SPARSEKIT_CUDA_ARCHS "unknown"
#endif

namespace sparsekit {
namespace cuda {

int device_count(std::string* why) {
  int n = 0;
  // cudaGetDeviceCount initialises the driver but creates no context on any device.
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear: "no driver" / "no device" must not poison later calls
    if (why) *why = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    return 0;
  }
  return n;
}

int runtime_version() { return CUDART_VERSION; }

const char* archs_compiled() { return SPARSEKIT_CUDA_ARCHS; }

}  // namespace cuda
}  // namespace sparsekit
