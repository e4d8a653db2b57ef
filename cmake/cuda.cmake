# sparsekit: optional CUDA kernels (csrc/cuda/*.cu), included by CMakeLists.txt.
#
#   SPARSEKIT_CUDA=AUTO  build them when a CUDA compiler is found, else say so loudly
#   SPARSEKIT_CUDA=ON    require them (FATAL_ERROR without a CUDA compiler)
#   SPARSEKIT_CUDA_ARCHS CMAKE_CUDA_ARCHITECTURES list, default "80;90" (A100, H100/H200;
#                        each plain number embeds SASS + PTX, so newer GPUs JIT from PTX)
#
# The runtime is linked statically (CUDA::cudart_static): the module then imports on machines
# without a GPU or driver, and no CUDA context is created until a kernel runs. libtorch is
# never linked; the Python side passes raw device pointers and the stream handle.
#
# Language detection runs here at file scope (enable_language() must not be called from a
# function); sparsekit_add_cuda(target) then attaches the sources to the target.
include(CheckLanguage)

set(SPARSEKIT_CUDA_ARCHS "80;90" CACHE STRING "CUDA architectures for the sparsekit kernels")
set(_SK_CUDA_OK OFF)

if(NOT CMAKE_CUDA_COMPILER)
  check_language(CUDA)
endif()
if(CMAKE_CUDA_COMPILER)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR "${CMAKE_CUDA_ARCHITECTURES}" STREQUAL "")
    # Must be set before enable_language(CUDA), or CMake probes the compiler's default arch.
    set(CMAKE_CUDA_ARCHITECTURES "${SPARSEKIT_CUDA_ARCHS}")
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  set(_SK_CUDA_OK ON)
elseif(SPARSEKIT_CUDA STREQUAL "ON")
  message(FATAL_ERROR
    "sparsekit: SPARSEKIT_CUDA=ON but no CUDA compiler was found (put nvcc on PATH or set "
    "CMAKE_CUDA_COMPILER / CUDACXX).")
endif()

function(sparsekit_add_cuda target)
  if(NOT _SK_CUDA_OK)
    message(STATUS "sparsekit: ***************************************************************")
    message(STATUS "sparsekit: *** CUDA kernels NOT built: no CUDA compiler (nvcc) found.    ***")
    message(STATUS "sparsekit: *** sparsekit._C.cuda_built() will return False.              ***")
    message(STATUS "sparsekit: ***************************************************************")
    # Recorded so tests can tell "AUTO found no nvcc" from "CUDA explicitly OFF".
    target_compile_definitions(${target} PRIVATE SPARSEKIT_CUDA_REQUESTED="${SPARSEKIT_CUDA}")
    set(SPARSEKIT_CUDA_BUILT OFF PARENT_SCOPE)
    return()
  endif()

  file(GLOB _sk_cuda_sources CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu)
  target_sources(${target} PRIVATE ${_sk_cuda_sources})
  set_target_properties(${target} PROPERTIES
    CUDA_ARCHITECTURES "${SPARSEKIT_CUDA_ARCHS}"
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON
    CUDA_SEPARABLE_COMPILATION OFF
    CUDA_RUNTIME_LIBRARY Static)
  string(REPLACE ";" "," _sk_archs_csv "${SPARSEKIT_CUDA_ARCHS}")
  target_compile_definitions(${target} PRIVATE
    SPARSEKIT_WITH_CUDA=1
    SPARSEKIT_CUDA_REQUESTED="${SPARSEKIT_CUDA}"
    SPARSEKIT_CUDA_ARCHS="${_sk_archs_csv}")
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -O3 -lineinfo -Xcompiler=-fvisibility=hidden>)
  target_link_libraries(${target} PRIVATE CUDA::cudart_static)
  set(SPARSEKIT_CUDA_BUILT ON PARENT_SCOPE)
  message(STATUS "sparsekit: CUDA kernels enabled (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, "
                 "archs ${SPARSEKIT_CUDA_ARCHS})")
endfunction()
