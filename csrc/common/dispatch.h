// sparsekit: THE one runtime-code -> template-parameter switch (style of flash-attention's
// static_switch.h). Every kernel family uses these macros, so adding a type is one edit.
//
//   SPARSEKIT_VALUE_SWITCH(p.value_dtype, VT, [&] { kernel<VT>(...); });
//   SPARSEKIT_INDEX_SWITCH(p.indptr_type, p.index_type, PT, IT, [&] { kernel<PT, IT>(...); });
#pragma once

#include <stdexcept>

#include "common/format.h"

#define SPARSEKIT_VALUE_SWITCH(CODE, TYPE, ...)                                   \
  [&] {                                                                           \
    switch (CODE) {                                                               \
      case ::sparsekit::DType::F32: { using TYPE = float; return __VA_ARGS__(); } \
      case ::sparsekit::DType::BF16: {                                            \
        using TYPE = ::sparsekit::bf16_t; return __VA_ARGS__(); }                 \
      case ::sparsekit::DType::F16: {                                             \
        using TYPE = ::sparsekit::f16_t; return __VA_ARGS__(); }                  \
      default: break; /* I8: csrq kernels only */                                 \
    }                                                                             \
    throw std::invalid_argument("sparsekit: unknown value dtype code");           \
  }()

#define SPARSEKIT_INDEX_SWITCH(PTR_CODE, IDX_CODE, PTR_TYPE, IDX_TYPE, ...)         \
  [&] {                                                                             \
    if ((PTR_CODE) == ::sparsekit::IndexType::I32) {                                \
      using PTR_TYPE = int32_t;                                                     \
      if ((IDX_CODE) == ::sparsekit::IndexType::U16) {                              \
        using IDX_TYPE = uint16_t; return __VA_ARGS__(); }                          \
      if ((IDX_CODE) == ::sparsekit::IndexType::I32) {                              \
        using IDX_TYPE = int32_t; return __VA_ARGS__(); }                           \
    } else if ((PTR_CODE) == ::sparsekit::IndexType::I64) {                         \
      using PTR_TYPE = int64_t;                                                     \
      if ((IDX_CODE) == ::sparsekit::IndexType::U16) {                              \
        using IDX_TYPE = uint16_t; return __VA_ARGS__(); }                          \
      if ((IDX_CODE) == ::sparsekit::IndexType::I32) {                              \
        using IDX_TYPE = int32_t; return __VA_ARGS__(); }                           \
    }                                                                               \
    throw std::invalid_argument("sparsekit: unsupported indptr/index type codes");  \
  }()
