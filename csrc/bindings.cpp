// sparsekit._C: Python bindings. The ONLY file that includes pybind11; all argument validation
// lives here, so the kernels can trust sizes, dtypes and contiguity.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/format.h"
#include "cpu/cpu_features.h"
#include "cpu/spmm_cpu.h"
#include "cpu/spmm_q.h"
#include "cpu/variants.h"
// ---- CUDA bindings (see also the block before PYBIND11_MODULE) ----
#ifdef SPARSEKIT_WITH_CUDA
#include "cuda/spmm_cuda.h"
#endif
#ifndef SPARSEKIT_CUDA_REQUESTED  // set by cmake/cuda.cmake: "AUTO" | "ON"; absent when OFF
#define SPARSEKIT_CUDA_REQUESTED "OFF"
#endif
// ---- end CUDA block ----

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using sparsekit::DType;
using sparsekit::IndexType;
using sparsekit::SpmmParams;
using sparsekit::Activation;

namespace {

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }

std::string type_name(const py::handle& obj) {
  return py::str(py::type::of(obj).attr("__name__")).cast<std::string>();
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  if (a.ndim() == 1) {
    s << "length " << a.shape(0);
    return s.str();
  }
  s << "shape (";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

// "int64 array of length 1233" / "float32 array of shape (3, 4)"
std::string describe(const py::array& a) {
  if (a.ndim() == 1) return dtype_str(a) + " array of " + shape_str(a);
  std::ostringstream s;
  s << dtype_str(a) << " " << a.ndim() << "-d array of " << shape_str(a);
  return s.str();
}

py::array as_array(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj))
    type_error(std::string(name) + ": expected a numpy.ndarray, got " + type_name(obj));
  return py::reinterpret_borrow<py::array>(obj);
}

bool is_c_contig(const py::array& a) {
  return (a.flags() & py::array::c_style) != 0;
}

// Fast dtype test (this runs on every kernel call): kind + itemsize + native byte order read
// straight from the descriptor, no dtype objects created.
bool dtype_is(const py::array& a, char kind, py::ssize_t size) {
  const auto* d = py::detail::array_descriptor_proxy(py::detail::array_proxy(a.ptr())->descr);
  const char bo = d->byteorder;
  return d->kind == kind && a.itemsize() == size && (bo == '=' || bo == '|' || bo == '<');
}
template <class T> bool has_dtype(const py::array& a);
template <> bool has_dtype<float>(const py::array& a) { return dtype_is(a, 'f', 4); }
template <> bool has_dtype<uint16_t>(const py::array& a) { return dtype_is(a, 'u', 2); }
template <> bool has_dtype<uint8_t>(const py::array& a) { return dtype_is(a, 'u', 1); }
template <> bool has_dtype<int32_t>(const py::array& a) { return dtype_is(a, 'i', 4); }
template <> bool has_dtype<int64_t>(const py::array& a) { return dtype_is(a, 'i', 8); }

DType parse_dtype(const std::string& s, const char* name) {
  if (s == "f32" || s == "float32") return DType::F32;
  if (s == "bf16" || s == "bfloat16") return DType::BF16;
  if (s == "f16" || s == "float16") return DType::F16;
  if (s == "i8" || s == "int8") return DType::I8;
  value_error(std::string(name) + ": expected one of 'f32', 'bf16', 'f16', 'i8', got '" + s + "'");
}

// numpy dtypes accepted for a sparsekit dtype code (bf16 travels as a uint16 view).
bool dtype_matches(const py::array& a, DType t) {
  switch (t) {
    case DType::F32: return has_dtype<float>(a);
    case DType::BF16: return has_dtype<uint16_t>(a);
    case DType::F16:
      return has_dtype<uint16_t>(a) || dtype_is(a, 'f', 2);
    case DType::I8: return dtype_is(a, 'i', 1);
  }
  return false;
}

const char* expected_numpy(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::BF16: return "uint16 (bfloat16 bits)";
    case DType::F16: return "float16 or uint16 (float16 bits)";
    case DType::I8: return "int8";
  }
  return "?";
}

IndexType indptr_type(const py::array& a, int64_t len) {
  if (a.ndim() == 1 && is_c_contig(a) && a.shape(0) == len) {
    if (has_dtype<int32_t>(a)) return IndexType::I32;
    if (has_dtype<int64_t>(a)) return IndexType::I64;
  }
  std::ostringstream s;
  s << "indptr: expected contiguous int32 or int64 array of length " << len << ", got "
    << (is_c_contig(a) ? "" : "non-contiguous ") << describe(a);
  value_error(s.str());
}

IndexType indices_type(const py::array& a, int64_t len, const char* what) {
  if (a.ndim() == 1 && is_c_contig(a) && a.shape(0) == len) {
    if (has_dtype<uint16_t>(a)) return IndexType::U16;
    if (has_dtype<int32_t>(a)) return IndexType::I32;
    if (has_dtype<uint8_t>(a)) return IndexType::D8;
  }
  std::ostringstream s;
  s << "indices: expected contiguous uint16, int32 or uint8 (gaps) array of length " << len << what << ", got "
    << (is_c_contig(a) ? "" : "non-contiguous ") << describe(a);
  value_error(s.str());
}

int64_t read_index(const py::array& a, IndexType t, int64_t i) {
  switch (t) {
    case IndexType::I32: return static_cast<const int32_t*>(a.data())[i];
    case IndexType::I64: return static_cast<const int64_t*>(a.data())[i];
    case IndexType::U16: return static_cast<const uint16_t*>(a.data())[i];
    case IndexType::D8: return static_cast<const uint8_t*>(a.data())[i];
  }
  return 0;
}

void check_dim(int64_t v, const char* name) {
  if (v < 0) value_error(std::string(name) + ": expected a non-negative integer, got " + std::to_string(v));
}

void check_2d(const py::array& a, const char* name, int64_t rows, int64_t cols, DType t,
              const char* shape_desc) {
  std::ostringstream s;
  if (!dtype_matches(a, t)) {
    s << name << ": expected " << expected_numpy(t) << " array (dtype code '"
      << sparsekit::dtype_name(t) << "'), got " << describe(a);
    type_error(s.str());
  }
  if (a.ndim() != 2 || a.shape(0) != rows || a.shape(1) != cols) {
    s << name << ": expected array of shape (" << rows << ", " << cols << ") " << shape_desc
      << ", got " << describe(a);
    value_error(s.str());
  }
  if (!is_c_contig(a)) {
    s << name << ": expected a C-contiguous array, got strides (" << a.strides(0) << ", "
      << a.strides(1) << ")";
    value_error(s.str());
  }
}

// The float kernels read neither int8 values nor uint8 gaps (csrq_linear does, for CSR).
void reject_compressed(const SpmmParams& p, const char* fn) {
  if (p.value_dtype == DType::I8)
    value_error(std::string(fn) + ": value_dtype 'i8' is only taken by csrq_linear (CSR)");
  if (p.index_type == IndexType::D8)
    value_error(std::string(fn) + ": uint8 gap indices are only taken by csrq_linear (CSR)");
}

// CSR values: one per stored entry.
static void check_csr_values(const py::array& values, int64_t nnz) {
  if (values.ndim() != 1 || values.shape(0) != nnz)
    value_error("values: expected array of length " + std::to_string(nnz) + " (= indptr[-1]), got " +
                describe(values));
}

// indptr (n_ptr + 1 entries, starting at 0, last value >= 0), indices (that many entries) and
// values (the dtype p.value_dtype names, C-contiguous): sets p's index types, returns nnz
// (= indptr[-1]). Shared by the per-call entry points and BoundMatrix.
static int64_t check_structure_arrays(const py::array& indptr, const py::array& indices,
                                      const py::array& values, const std::string& value_dtype,
                                      int64_t n_ptr, SpmmParams& p) {
  p.indptr_type = indptr_type(indptr, n_ptr + 1);
  const int64_t first = read_index(indptr, p.indptr_type, 0);
  const int64_t nnz = read_index(indptr, p.indptr_type, n_ptr);
  if (first != 0) value_error("indptr: expected indptr[0] == 0, got " + std::to_string(first));
  if (nnz < 0)
    value_error("indptr: expected a non-negative last value, got " + std::to_string(nnz));
  p.index_type = indices_type(indices, nnz, " (= indptr[-1])");
  if (!dtype_matches(values, p.value_dtype)) {
    std::ostringstream s;
    s << "values: expected " << expected_numpy(p.value_dtype) << " array for value_dtype '"
      << value_dtype << "', got " << describe(values);
    type_error(s.str());
  }
  if (!is_c_contig(values)) value_error("values: expected a C-contiguous array, got " + describe(values));
  return nnz;
}

struct Common {
  SpmmParams p;
  sparsekit::cpu::Isa isa;
  // py::object, not py::array: a default-constructed py::array allocates an empty ndarray,
  // which cost ~0.5 us each on every call.
  py::object keep[6];
  py::array arr(int i) const { return py::reinterpret_borrow<py::array>(keep[i]); }
};

// Validates everything shared by csr_linear and bsr_linear and fills the params.
// Structure arrays: indptr length n_ptr + 1, indices length nnz (read from indptr[-1]).
// num_threads checked (>= 1) and capped at 4096, as every entry point takes it.
int checked_threads(int64_t num_threads) {
  if (num_threads < 1)
    value_error("num_threads: expected an integer >= 1, got " + std::to_string(num_threads));
  return static_cast<int>(num_threads > 4096 ? 4096 : num_threads);
}

// Activation codes of BoundMatrix.run / runner and names of the module-level entry points
// (SpmmParams::activation): 0 'none', 1 'relu'.
constexpr const char* kActivationNames[sparsekit::kActivationCount] = {"none", "relu"};

Activation activation_for_code(int64_t code) {
  if (code < 0 || code >= sparsekit::kActivationCount)
    value_error("activation: expected code 0 (none) or 1 (relu), got " + std::to_string(code));
  return static_cast<Activation>(code);
}

Activation parse_activation(const std::string& name) {
  for (int i = 0; i < sparsekit::kActivationCount; ++i)
    if (name == kActivationNames[i]) return static_cast<Activation>(i);
  value_error("activation: expected 'none' or 'relu', got '" + name + "'");
}

void fill_common(Common& c, const py::handle& indptr_o, const py::handle& indices_o,
                 const py::handle& values_o, const std::string& value_dtype,
                 const py::handle& x_o, const std::string& x_dtype, const py::handle& bias_o,
                 const py::handle& out_o, const std::string& out_dtype, int64_t n_rows,
                 int64_t n_cols, int64_t n_ptr, int64_t num_threads, const std::string& isa) {
  check_dim(n_rows, "n_rows");
  check_dim(n_cols, "n_cols");
  SpmmParams& p = c.p;
  p.M = n_rows;
  p.K = n_cols;
  p.num_threads = checked_threads(num_threads);
  p.value_dtype = parse_dtype(value_dtype, "value_dtype");
  p.x_dtype = parse_dtype(x_dtype, "x_dtype");
  DType od = parse_dtype(out_dtype, "out_dtype");
  if (p.x_dtype != DType::F32 && p.x_dtype != p.value_dtype)
    value_error(std::string("x_dtype: expected 'f32' or the value dtype '") +
                sparsekit::dtype_name(p.value_dtype) + "', got '" + x_dtype + "'");
  if (od != p.x_dtype)
    value_error(std::string("out_dtype: expected the x dtype '") + sparsekit::dtype_name(p.x_dtype) +
                "', got '" + out_dtype + "'");
  c.isa = sparsekit::cpu::resolve_isa(isa, "isa");

  py::array indptr = as_array(indptr_o, "indptr");
  py::array indices = as_array(indices_o, "indices");
  py::array values = as_array(values_o, "values");
  py::array x = as_array(x_o, "x");
  py::array out = as_array(out_o, "out");
  check_structure_arrays(indptr, indices, values, value_dtype, n_ptr, p);

  if (x.ndim() != 2) value_error("x: expected a 2-d array (N, " + std::to_string(n_cols) + "), got " + describe(x));
  const int64_t N = x.shape(0);
  p.N = N;
  check_2d(x, "x", N, n_cols, p.x_dtype, "(N, n_cols)");
  check_2d(out, "out", N, n_rows, od, "(N, n_rows)");
  if (!out.writeable()) value_error("out: expected a writeable array, got a read-only array");
  p.ldx = n_cols;
  p.ldy = n_rows;
  p.indptr = indptr.data();
  p.indices = indices.data();
  p.values = values.data();
  p.x = x.data();
  p.y = out.mutable_data();
  {  // out must not alias any input (the kernels read inputs while writing out)
    const char* o0 = static_cast<const char*>(p.y);
    const char* o1 = o0 + out.nbytes();
    const py::array* ins[] = {&x, &values, &indices, &indptr};
    const char* names[] = {"x", "values", "indices", "indptr"};
    for (int i = 0; i < 4; ++i) {
      const char* a0 = static_cast<const char*>(ins[i]->data());
      const char* a1 = a0 + ins[i]->nbytes();
      if (out.nbytes() > 0 && ins[i]->nbytes() > 0 && a0 < o1 && o0 < a1)
        value_error(std::string("out: expected memory not overlapping ") + names[i] +
                    ", got overlapping arrays");
    }
  }
  if (!bias_o.is_none()) {
    py::array bias = as_array(bias_o, "bias");
    if (!has_dtype<float>(bias) || bias.ndim() != 1 || bias.shape(0) != n_rows || !is_c_contig(bias))
      value_error("bias: expected contiguous float32 array of length " + std::to_string(n_rows) +
                  " or None, got " + describe(bias));
    p.bias = static_cast<const float*>(bias.data());
    c.keep[5] = bias;
  }
  c.keep[0] = indptr; c.keep[1] = indices; c.keep[2] = values; c.keep[3] = x; c.keep[4] = out;
}

// ---- kernel variants (csrc/cpu/variants.h) -----------------------------------------------
using sparsekit::cpu::Variant;
using sparsekit::cpu::Isa;
namespace cpuv = sparsekit::cpu;

unsigned isa_bit(sparsekit::cpu::Isa isa) { return 1u << static_cast<int>(isa); }

// Whether this CPU has the features variant v needs beyond its ISA level (variants.h).
bool cpu_has_features(Variant v) {
  return (cpuv::variant_info(v).features & ~sparsekit::cpu::cpu_feature_bits()) == 0;
}

// The CPU features variant v needs beyond its ISA level, comma-separated ("" when none).
std::string variant_cpu_features(Variant v) {
  std::string s;
  for (int b = 0; b < cpuv::kFeatureCount; ++b)
    if (cpuv::variant_info(v).features & (1u << b))
      s += (s.empty() ? "" : ",") + std::string(cpuv::kFeatureNames[b]);
  return s;
}

std::string variant_names(const char* family, sparsekit::cpu::Isa isa) {
  std::string s;
  for (const auto& v : cpuv::kVariants) {
    if (v.id != Variant::Auto && std::string(v.family) != family) continue;
    if (!(v.isas & isa_bit(isa)) || !cpu_has_features(v.id)) continue;
    s += (s.empty() ? "'" : ", '") + std::string(v.name) + "'";
  }
  return s;
}

// Accepts a variant name or id; it must exist, belong to `family` ("csr" / "bsr" / "csrq") or be
// "auto", and be compiled for `isa` (and usable on this CPU).
Variant parse_variant(const py::handle& obj, const char* family, sparsekit::cpu::Isa isa) {
  int id = -1;
  std::string shown;
  if (obj.is_none()) return Variant::Auto;
  if (py::isinstance<py::str>(obj)) {
    shown = obj.cast<std::string>();
    for (const auto& v : cpuv::kVariants)
      if (shown == v.name) id = static_cast<int>(v.id);
  } else if (py::isinstance<py::int_>(obj)) {
    id = obj.cast<int>();
    shown = std::to_string(id);
    if (id < 0 || id >= static_cast<int>(Variant::kCount)) id = -1;
  } else {
    type_error("variant: expected a variant name (str) or id (int), got " + type_name(obj));
  }
  if (id >= 0) {
    const auto& vi = cpuv::kVariants[id];
    const bool fam_ok = vi.id == Variant::Auto || std::string(vi.family) == family;
    if (fam_ok && (vi.isas & isa_bit(isa)) && cpu_has_features(vi.id)) return vi.id;
  }
  if (id >= 0 && !cpu_has_features(cpuv::kVariants[id].id))
    value_error(std::string("variant: '") + cpuv::kVariants[id].name + "' needs the CPU features " +
                variant_cpu_features(cpuv::kVariants[id].id) + ", which this CPU lacks");
  value_error(std::string("variant: expected one of ") + variant_names(family, isa) + " for " +
              family + " on ISA '" + sparsekit::cpu::isa_name(isa) + "', got '" + shown + "'");
}

py::list cpu_variants() {
  py::list out;
  for (const auto& v : cpuv::kVariants) {
    py::dict d;
    d["id"] = static_cast<int>(v.id);
    d["name"] = v.name;
    d["family"] = v.family;
    d["n_min"] = v.n_min;
    d["n_max"] = v.n_max < 0 ? py::object(py::none()) : py::object(py::int_(v.n_max));
    py::list isas;
    for (int i = 0; i < 3; ++i)
      if (v.isas & (1u << i)) isas.append(sparsekit::cpu::isa_name(static_cast<sparsekit::cpu::Isa>(i)));
    d["isas"] = isas;
    d["cpu_features"] = variant_cpu_features(v.id);  // needed beyond the ISA level
    d["available"] = cpu_has_features(v.id);                 // this CPU has them
    d["dtypes"] = v.dtypes;
    d["summary"] = v.summary;
    out.append(d);
  }
  return out;
}

// Occupancy words of a CSR matrix with plain indices (SpmmParams::bitmap), built and validated
// in one pass: columns in [0, K) and strictly increasing within each row (each stored column
// sets its own bit). For int8 values the M row sums of the stored values follow the words
// (SpmmParams::bitmap_row_sums, as int64). O(nnz + M * K / 64) time, M * ceil(K / 64) words
// (+ M).
std::shared_ptr<const std::vector<uint64_t>> build_occupancy(const SpmmParams& p) {
  const int64_t nw = (p.K + 63) / 64;
  const bool sums = p.value_dtype == DType::I8;
  auto words = std::make_shared<std::vector<uint64_t>>(
      static_cast<size_t>(p.M * nw + (sums ? p.M : 0)), 0);
  auto fill = [&](const auto* ip, const auto* ix) {
    for (int64_t m = 0; m < p.M; ++m) {
      uint64_t* row = words->data() + m * nw;
      int64_t prev = -1, sum = 0;
      for (int64_t j = static_cast<int64_t>(ip[m]); j < static_cast<int64_t>(ip[m + 1]); ++j) {
        const int64_t c = static_cast<int64_t>(ix[j]);
        if (c <= prev || c >= p.K)
          value_error("indices: expected strictly increasing values in [0, " +
                      std::to_string(p.K) + ") within each row, got " + std::to_string(c) +
                      " at position " + std::to_string(j) + " (row " + std::to_string(m) + ")");
        row[c >> 6] |= uint64_t(1) << (c & 63);
        prev = c;
        if (sums) sum += static_cast<const int8_t*>(p.values)[j];
      }
      if (sums) words->data()[p.M * nw + m] = static_cast<uint64_t>(sum);
    }
  };
  auto by_idx = [&](const auto* ip) {
    if (p.index_type == IndexType::U16) fill(ip, static_cast<const uint16_t*>(p.indices));
    else fill(ip, static_cast<const int32_t*>(p.indices));
  };
  if (p.indptr_type == IndexType::I64) by_idx(static_cast<const int64_t*>(p.indptr));
  else by_idx(static_cast<const int32_t*>(p.indptr));
  return words;
}

// The row sums that build_occupancy(p) placed after the words (nullptr for float values).
const int64_t* occupancy_row_sums(const std::vector<uint64_t>& words, const SpmmParams& p) {
  if (p.value_dtype != DType::I8) return nullptr;
  return reinterpret_cast<const int64_t*>(words.data() + p.M * ((p.K + 63) / 64));
}

// A sparse matrix bound once to the kernels: validated buffers (kept alive by this object),
// sizes, dtype codes, the ISA (the highest its calls may use) and the planned variant per batch
// class, with the ISA build of it that the plan chose (the same or a lower one: on some cores
// the AVX2 build of a kernel outruns the AVX-512 one). A call passes only the
// addresses of x / out / bias, the batch size and the thread count, so its cost is a few
// integer conversions (no array objects, no dtype or shape inspection). The caller guarantees
// what an address cannot show: x is C-contiguous (N, n_cols) and out C-contiguous (N, n_rows),
// both of x_dtype, not overlapping each other or the weights; bias is (n_rows,) fp32.
class BoundMatrix {
 public:
  static constexpr int kClasses = 5;  // batch classes: N = 1, 2, 3-8, 9-32, 33+

  BoundMatrix(const std::string& format, const py::handle& indptr, const py::handle& indices,
              const py::handle& values, const std::string& value_dtype, int64_t n_rows,
              int64_t n_cols, int64_t block_r, int64_t block_c, const std::string& isa,
              const py::handle& scales) {
    if (format != "csr" && format != "bsr" && format != "csrq")
      value_error("format: expected 'csr', 'bsr' or 'csrq', got '" + format + "'");
    if (format == "csrq" && (block_r != 1 || block_c != 1))
      value_error("block_r, block_c: expected 1 for format 'csrq', got " + std::to_string(block_r) +
                  ", " + std::to_string(block_c));
    if (block_r < 1 || block_r > 4096)
      value_error("block_r: expected an integer in [1, 4096], got " + std::to_string(block_r));
    if (block_c < 1 || block_c > 4096)
      value_error("block_c: expected an integer in [1, 4096], got " + std::to_string(block_c));
    check_dim(n_rows, "n_rows");
    check_dim(n_cols, "n_cols");
    bsr_ = format == "bsr";
    const int64_t n_ptr = bsr_ ? (n_rows + block_r - 1) / block_r : n_rows;
    p_.M = n_rows;
    p_.K = n_cols;
    p_.block_r = static_cast<int>(block_r);
    p_.block_c = static_cast<int>(block_c);
    p_.value_dtype = parse_dtype(value_dtype, "value_dtype");
    isa_ = sparsekit::cpu::resolve_isa(isa, "isa");
    py::array ip = as_array(indptr, "indptr"), ix = as_array(indices, "indices"),
              v = as_array(values, "values");
    nnz_ = check_structure_arrays(ip, ix, v, value_dtype, n_ptr, p_);
    if (bsr_) {
      if (v.ndim() != 3 || v.shape(0) != nnz_ || v.shape(1) != block_r || v.shape(2) != block_c) {
        std::ostringstream s;
        s << "values: expected array of shape (" << nnz_ << ", " << block_r << ", " << block_c
          << ") (= (indptr[-1], block_r, block_c)), got " << describe(v);
        value_error(s.str());
      }
    } else {
      check_csr_values(v, nnz_);
    }
    q_ = format == "csrq";
    if (!q_) reject_compressed(p_, "BoundMatrix (format 'csr' / 'bsr'; use 'csrq')");
    if (q_ && p_.value_dtype == DType::I8) {
      if (scales.is_none())
        value_error("scales: expected a float32 array of length " + std::to_string(n_rows) +
                    " for int8 values, got None");
      py::array sc = as_array(scales, "scales");
      if (!has_dtype<float>(sc) || sc.ndim() != 1 || sc.shape(0) != n_rows || !is_c_contig(sc))
        value_error("scales: expected contiguous float32 array of length " +
                    std::to_string(n_rows) + ", got " + describe(sc));
      p_.scales = static_cast<const float*>(sc.data());
      keep_[3] = sc;
      spans_[3] = {sc.data(), static_cast<size_t>(sc.nbytes())};
    } else if (!scales.is_none()) {
      value_error("scales: expected None (only int8 values of format 'csrq' take scales), got an array");
    }
    p_.indptr = ip.data();
    p_.indices = ix.data();
    p_.values = v.data();
    keep_[0] = ip;
    keep_[1] = ix;
    keep_[2] = v;
    spans_[0] = {ip.data(), static_cast<size_t>(ip.nbytes())};
    spans_[1] = {ix.data(), static_cast<size_t>(ix.nbytes())};
    spans_[2] = {v.data(), static_cast<size_t>(v.nbytes())};
    for (int& c : variant_) c = -1;
    for (int& t : planned_threads_) t = 0;
    for (auto& i : class_isa_) i = isa_;
  }

  static int n_class(int64_t n) { return n <= 1 ? 0 : (n == 2 ? 1 : (n <= 8 ? 2 : (n <= 32 ? 3 : 4))); }

  // out = x @ W.T + bias. x_code: 0 f32, 1 bf16, 2 f16 (x and out). variant >= 0 runs that
  // variant, built for ISA code isa_code (0 generic, 1 avx2, 2 avx512; -1: the matrix's ISA);
  // -1 runs the one planned for this batch class (and its ISA) and, when there is
  // no such plan, returns false WITHOUT computing (the caller plans, then calls again: every
  // call of a class then runs the same variant, so repeated calls give bit-identical results).
  bool run(uintptr_t x, uintptr_t out, int64_t n, int x_code, uintptr_t bias, int threads,
           int variant, int isa_code = -1, int64_t activation = 0) const {
    if (n < 0) value_error("n: expected a non-negative batch size, got " + std::to_string(n));
    const Activation act = activation_for_code(activation);
    if (x_code < 0 || x_code > 2)
      value_error("x_dtype: expected code 0 (f32), 1 (bf16) or 2 (f16), got " + std::to_string(x_code));
    const DType xd = static_cast<DType>(x_code);
    if (xd != DType::F32 && xd != p_.value_dtype)
      value_error(std::string("x_dtype: expected 'f32' or the value dtype '") +
                  sparsekit::dtype_name(p_.value_dtype) + "', got '" + sparsekit::dtype_name(xd) + "'");
    const int num_threads = checked_threads(threads);
    if (variant >= static_cast<int>(Variant::kCount) || variant < -1)
      value_error("variant: expected -1 or an id below " +
                  std::to_string(static_cast<int>(Variant::kCount)) + ", got " + std::to_string(variant));
    const Isa forced_isa = isa_for_code(isa_code);
    const int cls = n_class(n);
    // One plan per batch class whatever the thread count (the kernels' results do not depend
    // on it, and a variant switch would change the summation order).
    const bool planned = variant_[cls] >= 0;
    if (n == 0 || p_.M == 0) return true;
    if (variant < 0 && !planned) return false;
    if ((p_.K > 0 && x == 0) || out == 0)
      value_error("x / out: expected non-null addresses for a non-empty call, got 0");
    SpmmParams p = p_;
    p.N = n;
    p.x = reinterpret_cast<const void*>(x);
    p.y = reinterpret_cast<void*>(out);
    p.ldx = p.K;
    p.ldy = p.M;
    p.x_dtype = xd;
    p.bias = reinterpret_cast<const float*>(bias);
    p.num_threads = num_threads;
    p.variant = variant >= 0 ? variant : variant_[cls];
    p.activation = act;
    const Isa isa = variant >= 0 ? forced_isa : class_isa_[cls];
    // The bitmap is built on first use, with the GIL held; the call keeps its own reference, so
    // set_variant may drop the matrix's while a call runs.
    std::shared_ptr<const std::vector<uint64_t>> bits;
    if (reads_bitmap(p.variant, n)) {
      bits = bitmap();
      p.bitmap = bits->data();
      p.bitmap_row_sums = occupancy_row_sums(*bits, p);
    }
    {
      py::gil_scoped_release nogil;
      if (bsr_) sparsekit::cpu::bsr_linear(p, isa);
      else if (q_) sparsekit::cpu::csrq_linear(p, isa);
      else sparsekit::cpu::csr_linear(p, isa);
    }
    return true;
  }

  // Benchmarks: out[m] (fp32, n_rows entries) = the read probe of row m (csr_probe with
  // Probe::Read, csrc/cpu/spmm_cpu.h): this matrix's value and index bytes read as its N = 1
  // kernels stream them, nothing computed. Float-valued CSR with plain indices only.
  void read_probe(uintptr_t out, int threads, int isa_code) const {
    probe("read_probe", sparsekit::cpu::Probe::Read, 0, out, threads, isa_code);
  }
  // Benchmarks: out[m] (fp32, n_rows entries) = sum of x[c] over row m's column ids c, x (fp32,
  // n_cols entries at address x) fetched as one N = 1 kernel fetches it and no values read
  // (csr_probe, Probe::Gather: the gathers of csr_spmv_gather; Probe::Assemble: the scalar-load
  // assembly of csr_spmv_assemble): the x-fetch floor of that kernel.
  void gather_probe(uintptr_t x, uintptr_t out, int threads, int isa_code,
                    const std::string& fetch) const {
    sparsekit::cpu::Probe kind;
    if (fetch == "gather") kind = sparsekit::cpu::Probe::Gather;
    else if (fetch == "assemble") kind = sparsekit::cpu::Probe::Assemble;
    else value_error("fetch: expected 'gather' or 'assemble', got '" + fetch + "'");
    probe("gather_probe", kind, x, out, threads, isa_code);
  }
  void probe(const char* what, sparsekit::cpu::Probe kind, uintptr_t x, uintptr_t out,
             int threads, int isa_code) const {
    if (bsr_ || q_)
      value_error(std::string(what) + ": expected a CSR matrix with float values and plain "
                  "indices, got " + (bsr_ ? "a BSR matrix" : "a compressed CSR matrix"));
    const int num_threads = checked_threads(threads);
    const Isa isa = isa_for_code(isa_code);
    if (p_.M == 0) return;
    if (out == 0) value_error("out: expected a non-null address for a non-empty matrix, got 0");
    if (kind != sparsekit::cpu::Probe::Read && x == 0 && p_.K > 0)
      value_error("x: expected a non-null address of n_cols fp32 values, got 0");
    SpmmParams p = p_;
    p.y = reinterpret_cast<void*>(out);
    p.x = reinterpret_cast<const void*>(x);
    p.num_threads = num_threads;
    py::gil_scoped_release nogil;
    sparsekit::cpu::csr_probe(p, isa, kind);
  }

  // Records `variant` (name or id) built for `isa` (a name; None: the matrix's ISA, which
  // bounds it) as the plan for batch class n_cls (measured at `threads`).
  void set_variant(int n_cls, const py::handle& variant, int threads, const py::handle& isa) {
    if (n_cls < 0 || n_cls >= kClasses)
      value_error("n_class: expected an integer in [0, " + std::to_string(kClasses) + "), got " +
                  std::to_string(n_cls));
    Isa vi = isa_;
    if (!isa.is_none()) {
      if (!py::isinstance<py::str>(isa))
        type_error("isa: expected an ISA name (str) or None, got " + type_name(isa));
      vi = sparsekit::cpu::parse_isa(isa.cast<std::string>(), "isa");
      if (vi > isa_)
        value_error(std::string("isa: expected this matrix's ISA '") + sparsekit::cpu::isa_name(isa_) +
                    "' or a lower one, got '" + sparsekit::cpu::isa_name(vi) + "'");
    }
    variant_[n_cls] = static_cast<int>(parse_variant(variant, family(), vi));
    class_isa_[n_cls] = vi;
    planned_threads_[n_cls] = threads;
    bool bitmap_planned = false;
    for (int v : variant_) bitmap_planned |= reads_bitmap(v, 1);
    if (!bitmap_planned) bitmap_.reset();  // planning built it to time it; keep it only if chosen
  }
  // The planned variant id of batch class n_cls, or -1 when none.
  int get_variant(int n_cls) const {
    if (n_cls < 0 || n_cls >= kClasses)
      value_error("n_class: expected an integer in [0, " + std::to_string(kClasses) + "), got " +
                  std::to_string(n_cls));
    return variant_[n_cls];
  }
  // The ISA build the plan of batch class n_cls runs (the matrix's ISA when none is planned).
  std::string get_isa(int n_cls) const {
    if (n_cls < 0 || n_cls >= kClasses)
      value_error("n_class: expected an integer in [0, " + std::to_string(kClasses) + "), got " +
                  std::to_string(n_cls));
    return sparsekit::cpu::isa_name(class_isa_[n_cls]);
  }
  // Flushes indptr, indices and values out of every cache level (cpu::evict_from_caches), so
  // the next call reads them from memory, as a model's layers do; used by the planner.
  void evict() const {
    std::shared_ptr<const std::vector<uint64_t>> bits = bitmap_;
    py::gil_scoped_release nogil;
    for (const auto& s : spans_)
      if (s.first != nullptr) sparsekit::cpu::evict_from_caches(s.first, s.second);
    if (bits) sparsekit::cpu::evict_from_caches(bits->data(), bits->size() * sizeof(uint64_t));
  }
  bool is_bsr() const { return bsr_; }
  // Kernel family of the variants that apply: "csr", "bsr" or "csrq" (compressed CSR).
  const char* family() const { return bsr_ ? "bsr" : (q_ ? "csrq" : "csr"); }
  // Bytes of the occupancy bitmap (and row sums) held for the bitmap variants (0 when none).
  int64_t bitmap_nbytes() const {
    return bitmap_ ? static_cast<int64_t>(bitmap_->size() * sizeof(uint64_t)) : 0;
  }
  int64_t nnz() const { return nnz_; }
  std::string isa() const { return sparsekit::cpu::isa_name(isa_); }

 private:
  // Whether a call with variant id v and batch n runs a kernel that reads SpmmParams::bitmap
  // (a variant of this matrix's family: the csrq ones at any batch, csr_spmv_bitmap up to 2).
  bool reads_bitmap(int v, int64_t n) const {
    if (q_) return v == static_cast<int>(Variant::CsrqBitmap) ||
                   v == static_cast<int>(Variant::CsrqBitmapVnni);
    return !bsr_ && n <= 2 && v == static_cast<int>(Variant::CsrSpmvBitmap);
  }
  // The bitmap variants' occupancy words (SpmmParams::bitmap), built from the plain
  // indices on first use. Validates as it builds: columns in [0, n_cols) and strictly
  // increasing within each row (each stored column sets its own bit). O(nnz + M * K / 64).
  std::shared_ptr<const std::vector<uint64_t>> bitmap() const {
    if (bitmap_) return bitmap_;
    if (bsr_ || (q_ && p_.value_dtype != DType::I8) || p_.index_type == IndexType::D8)
      value_error(std::string("variant: ") + (q_ ? "the csrq bitmap variants expected int8 values" :
                  "csr_spmv_bitmap expected a CSR matrix") + " with plain (uint16 / int32) "
                  "indices, got value_dtype '" + sparsekit::dtype_name(p_.value_dtype) + "'" +
                  (p_.index_type == IndexType::D8 ? " with uint8 gap indices" : "") +
                  (bsr_ ? " in BSR" : ""));
    bitmap_ = build_occupancy(p_);
    return bitmap_;
  }

  SpmmParams p_;
  sparsekit::cpu::Isa isa_ = sparsekit::cpu::Isa::Generic;
  bool bsr_ = false;
  // The ISA build an address-level call names by code (0 generic, 1 avx2, 2 avx512; -1: this
  // matrix's), checked against the matrix's ISA, which bounds it.
  Isa isa_for_code(int isa_code) const {
    if (isa_code < -1 || isa_code > static_cast<int>(isa_))
      value_error("isa: expected -1 or an ISA code in [0, " + std::to_string(static_cast<int>(isa_)) +
                  "] (this matrix's ISA '" + sparsekit::cpu::isa_name(isa_) + "' or below), got " +
                  std::to_string(isa_code));
    return isa_code < 0 ? isa_ : static_cast<Isa>(isa_code);
  }

  bool q_ = false;  // format 'csrq': the compressed-format kernels (csrq_linear)
  int64_t nnz_ = 0;
  int variant_[kClasses];
  Isa class_isa_[kClasses];  // the ISA build each class's plan runs (<= isa_)
  int planned_threads_[kClasses];
  py::object keep_[4];
  std::pair<const void*, size_t> spans_[4] = {};
  mutable std::shared_ptr<const std::vector<uint64_t>> bitmap_;
};

// BoundMatrix.runner(): the same call as BoundMatrix.run(x, out, n, x_dtype, bias, num_threads)
// as a plain CPython METH_FASTCALL builtin bound to one matrix. pybind11's dispatcher (overload
// resolution, one type caster per argument, keyword matching) costs more than the whole 64x64
// product at batch 1; this entry point converts six ints and calls run(), so a small layer's call
// is dominated by its kernel again. The builtin's self is a capsule that owns a reference to the
// BoundMatrix object, so the matrix (and the buffers it keeps alive) outlives every runner.
constexpr const char* kRunnerCapsule = "sparsekit._C.BoundMatrix.runner";

struct Runner {
  PyObject* owner;        // strong reference to the Python BoundMatrix
  const BoundMatrix* bm;  // its C++ object
};

void runner_capsule_free(PyObject* capsule) {
  auto* r = static_cast<Runner*>(PyCapsule_GetPointer(capsule, kRunnerCapsule));
  if (r == nullptr) return;
  Py_XDECREF(r->owner);
  delete r;
}

PyObject* runner_call(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  auto* r = static_cast<Runner*>(PyCapsule_GetPointer(self, kRunnerCapsule));
  if (r == nullptr) return nullptr;
  if (nargs != 6 && nargs != 7) {
    PyErr_Format(PyExc_TypeError,
                 "run: expected 6 or 7 positional arguments (x, out, n, x_dtype, bias, "
                 "num_threads[, activation]), got %zd",
                 nargs);
    return nullptr;
  }
  const unsigned long long x = PyLong_AsUnsignedLongLong(args[0]);
  const unsigned long long out = PyLong_AsUnsignedLongLong(args[1]);
  const long long n = PyLong_AsLongLong(args[2]);
  const long x_code = PyLong_AsLong(args[3]);
  const unsigned long long bias = PyLong_AsUnsignedLongLong(args[4]);
  const long threads = PyLong_AsLong(args[5]);
  const long activation = nargs == 7 ? PyLong_AsLong(args[6]) : 0;
  if (PyErr_Occurred()) return nullptr;
  try {
    const bool ran = r->bm->run(static_cast<uintptr_t>(x), static_cast<uintptr_t>(out),
                                static_cast<int64_t>(n), static_cast<int>(x_code),
                                static_cast<uintptr_t>(bias), static_cast<int>(threads), -1, -1,
                                static_cast<int64_t>(activation));
    return PyBool_FromLong(ran ? 1 : 0);
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyMethodDef runner_def = {
    "run", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(runner_call)),
    METH_FASTCALL,
    "run(x, out, n, x_dtype, bias, num_threads[, activation]) -> bool: BoundMatrix.run with "
    "the planned variant, positional ints only (see BoundMatrix.runner)."};

py::object make_runner(const py::object& self) {
  const BoundMatrix* bm = self.cast<const BoundMatrix*>();
  auto* r = new Runner{self.ptr(), bm};
  Py_INCREF(self.ptr());
  PyObject* capsule = PyCapsule_New(r, kRunnerCapsule, runner_capsule_free);
  if (capsule == nullptr) {
    Py_DECREF(self.ptr());
    delete r;
    throw py::error_already_set();
  }
  PyObject* fn = PyCFunction_New(&runner_def, capsule);
  Py_DECREF(capsule);  // the function holds it now
  if (fn == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(fn);
}

void csr_linear(const py::handle& indptr, const py::handle& indices, const py::handle& values,
                const std::string& value_dtype, const py::handle& x, const std::string& x_dtype,
                const py::handle& bias, const py::handle& out, const std::string& out_dtype,
                int64_t n_rows, int64_t n_cols, int64_t num_threads, const std::string& isa,
                const py::handle& variant, const std::string& activation) {
  Common c;
  fill_common(c, indptr, indices, values, value_dtype, x, x_dtype, bias, out, out_dtype, n_rows,
              n_cols, n_rows, num_threads, isa);
  check_csr_values(c.arr(2), c.arr(1).shape(0));
  reject_compressed(c.p, "csr_linear");
  c.p.activation = parse_activation(activation);
  c.p.variant = static_cast<int>(parse_variant(variant, "csr", c.isa));
  // the bitmap variant needs occupancy words: built for this call (BoundMatrix keeps them)
  std::shared_ptr<const std::vector<uint64_t>> bits;
  if (c.p.variant == static_cast<int>(Variant::CsrSpmvBitmap) && c.p.N <= 2) {
    bits = build_occupancy(c.p);
    c.p.bitmap = bits->data();
  }
  py::gil_scoped_release nogil;
  sparsekit::cpu::csr_linear(c.p, c.isa);
}

// int8 values (with per-row scales) and/or uint8 column gaps; see csrc/cpu/csr_q_impl.h.
void csrq_linear(const py::handle& indptr, const py::handle& indices, const py::handle& values,
                 const std::string& value_dtype, const py::handle& scales_o, const py::handle& x,
                 const std::string& x_dtype, const py::handle& bias, const py::handle& out,
                 const std::string& out_dtype, int64_t n_rows, int64_t n_cols,
                 int64_t num_threads, const std::string& isa, const std::string& activation) {
  Common c;
  fill_common(c, indptr, indices, values, value_dtype, x, x_dtype, bias, out, out_dtype, n_rows,
              n_cols, n_rows, num_threads, isa);
  check_csr_values(c.arr(2), c.arr(1).shape(0));
  c.p.activation = parse_activation(activation);
  if (c.p.x_dtype == DType::I8) value_error("x_dtype: expected 'f32' for int8 weights, got 'i8'");
  py::object keep_scales;
  if (c.p.value_dtype == DType::I8) {
    if (scales_o.is_none()) value_error("scales: expected a float32 array of length " +
                                        std::to_string(n_rows) + " for int8 values, got None");
    py::array sc = as_array(scales_o, "scales");
    if (!has_dtype<float>(sc) || sc.ndim() != 1 || sc.shape(0) != n_rows || !is_c_contig(sc))
      value_error("scales: expected contiguous float32 array of length " + std::to_string(n_rows) +
                  ", got " + describe(sc));
    c.p.scales = static_cast<const float*>(sc.data());
    keep_scales = sc;
  } else if (!scales_o.is_none()) {
    value_error("scales: expected None for float values, got an array");
  }
  py::gil_scoped_release nogil;
  sparsekit::cpu::csrq_linear(c.p, c.isa);
}

void bsr_linear(const py::handle& indptr, const py::handle& indices, const py::handle& values,
                const std::string& value_dtype, const py::handle& x, const std::string& x_dtype,
                const py::handle& bias, const py::handle& out, const std::string& out_dtype,
                int64_t n_rows, int64_t n_cols, int64_t block_r, int64_t block_c,
                int64_t num_threads, const std::string& isa, const py::handle& variant,
                const std::string& activation) {
  if (block_r < 1 || block_r > 4096)
    value_error("block_r: expected an integer in [1, 4096], got " + std::to_string(block_r));
  if (block_c < 1 || block_c > 4096)
    value_error("block_c: expected an integer in [1, 4096], got " + std::to_string(block_c));
  check_dim(n_rows, "n_rows");
  check_dim(n_cols, "n_cols");
  const int64_t Mb = (n_rows + block_r - 1) / block_r;
  Common c;
  fill_common(c, indptr, indices, values, value_dtype, x, x_dtype, bias, out, out_dtype, n_rows,
              n_cols, Mb, num_threads, isa);
  const int64_t nnzb = c.arr(1).shape(0);
  const py::array v = c.arr(2);
  if (v.ndim() != 3 || v.shape(0) != nnzb || v.shape(1) != block_r || v.shape(2) != block_c) {
    std::ostringstream s;
    s << "values: expected array of shape (" << nnzb << ", " << block_r << ", " << block_c
      << ") (= (indptr[-1], block_r, block_c)), got " << describe(v);
    value_error(s.str());
  }
  reject_compressed(c.p, "bsr_linear");
  c.p.activation = parse_activation(activation);
  c.p.block_r = static_cast<int>(block_r);
  c.p.block_c = static_cast<int>(block_c);
  c.p.variant = static_cast<int>(parse_variant(variant, "bsr", c.isa));
  py::gil_scoped_release nogil;
  sparsekit::cpu::bsr_linear(c.p, c.isa);
}


// O(nnz) structural check; returns an empty string when valid. Same checks, order and messages
// as the numpy path in sparsekit/formats.py (_validate_structure_numpy), so both paths report the
// same first violation.
template <class PT, class IT>
std::string validate_impl(const PT* indptr, const IT* idx, int64_t rows, int64_t cols, int64_t nnz) {
  std::ostringstream s;
  if (indptr[0] != 0) {
    s << "indptr: expected indptr[0] == 0, got " << static_cast<int64_t>(indptr[0]);
    return s.str();
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (indptr[r + 1] < indptr[r]) {
      s << "indptr: expected non-decreasing values, got indptr[" << r + 1 << "] = "
        << static_cast<int64_t>(indptr[r + 1]) << " < indptr[" << r << "] = "
        << static_cast<int64_t>(indptr[r]);
      return s.str();
    }
  }
  if (static_cast<int64_t>(indptr[rows]) != nnz) {
    s << "indptr: expected indptr[-1] == len(indices) = " << nnz << ", got "
      << static_cast<int64_t>(indptr[rows]);
    return s.str();
  }
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t v = static_cast<int64_t>(idx[j]);
    if (v < 0 || v >= cols) {
      s << "indices: expected values in [0, " << cols << "), got " << v << " at position " << j;
      return s.str();
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t a = indptr[r], b = indptr[r + 1];
    for (int64_t j = a + 1; j < b; ++j) {
      if (static_cast<int64_t>(idx[j]) <= static_cast<int64_t>(idx[j - 1])) {
        s << "indices: expected sorted unique values within each row, got "
          << static_cast<int64_t>(idx[j]) << " after " << static_cast<int64_t>(idx[j - 1])
          << " at position " << j << " (row " << r << ")";
        return s.str();
      }
    }
  }
  return std::string();
}

// ix_code: 0 uint16, 1 int32, 2 int64. Runs without the GIL (touches no Python object).
template <class PT>
std::string validate_dispatch(const PT* ip, const void* ix, int ix_code, int64_t nnz, int64_t rows,
                              int64_t cols) {
  if (ix_code == 0) return validate_impl(ip, static_cast<const uint16_t*>(ix), rows, cols, nnz);
  if (ix_code == 1) return validate_impl(ip, static_cast<const int32_t*>(ix), rows, cols, nnz);
  return validate_impl(ip, static_cast<const int64_t*>(ix), rows, cols, nnz);
}

// Dtype problems raise TypeError (formats.py then falls back to its numpy path); structural
// problems raise ValueError.
void validate(const py::handle& indptr_o, const py::handle& indices_o, int64_t rows, int64_t cols) {
  check_dim(rows, "n_rows");
  check_dim(cols, "n_cols");
  py::array indptr = as_array(indptr_o, "indptr");
  py::array indices = as_array(indices_o, "indices");
  if (!(has_dtype<int32_t>(indptr) || has_dtype<int64_t>(indptr)) || !is_c_contig(indptr))
    type_error("indptr: expected a contiguous int32 or int64 array, got " +
               std::string(is_c_contig(indptr) ? "" : "non-contiguous ") + describe(indptr));
  if (!(has_dtype<uint16_t>(indices) || has_dtype<int32_t>(indices) ||
        has_dtype<int64_t>(indices)) || !is_c_contig(indices))
    type_error("indices: expected a contiguous uint16, int32 or int64 array, got " +
               std::string(is_c_contig(indices) ? "" : "non-contiguous ") + describe(indices));
  if (indptr.ndim() != 1 || indptr.shape(0) != rows + 1)
    value_error("indptr: expected a 1-D array of length n_rows + 1 = " + std::to_string(rows + 1) +
                ", got " + shape_str(indptr));
  if (indices.ndim() != 1)
    value_error("indices: expected a 1-D array, got " + describe(indices));
  const int ix_code = has_dtype<uint16_t>(indices) ? 0 : (has_dtype<int32_t>(indices) ? 1 : 2);
  const bool ip32 = has_dtype<int32_t>(indptr);
  const void* ip = indptr.data();
  const void* ix = indices.data();
  const int64_t nnz = indices.shape(0);
  std::string err;
  {
    py::gil_scoped_release nogil;
    if (ip32)
      err = validate_dispatch(static_cast<const int32_t*>(ip), ix, ix_code, nnz, rows, cols);
    else
      err = validate_dispatch(static_cast<const int64_t*>(ip), ix, ix_code, nnz, rows, cols);
  }
  if (!err.empty()) value_error(err);
}

py::dict build_info() {
  py::dict d;
  d["version"] = SPARSEKIT_VERSION;
  d["compiler"] = SPARSEKIT_CXX_COMPILER;
  d["build_type"] = SPARSEKIT_BUILD_TYPE;
  d["cxx_standard"] = 17;
  py::list isas;
  std::string csv = SPARSEKIT_ISAS_BUILT;
  size_t pos = 0;
  while (pos <= csv.size()) {
    size_t q = csv.find(',', pos);
    if (q == std::string::npos) q = csv.size();
    if (q > pos) isas.append(csv.substr(pos, q - pos));
    pos = q + 1;
  }
  d["isa_compiled"] = isas;
  d["isa_flags"] = py::dict(py::arg("generic") = "", py::arg("avx2") = "-mavx2 -mfma -mf16c",
                            py::arg("avx512") = "-mavx512f -mavx512bw -mavx512vl -mavx2 -mfma -mf16c");
  d["isa_hardware"] = sparsekit::cpu::isa_name(sparsekit::cpu::hardware_isa());
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_version"] = static_cast<int>(_OPENMP);
#else
  d["openmp"] = false;
#endif
#ifdef SPARSEKIT_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
#if defined(__SANITIZE_ADDRESS__)
  d["sanitize"] = true;
#else
  d["sanitize"] = false;
#endif
  return d;
}

}  // namespace


// ---- CUDA bindings: validation helpers ----------------------------------------------------
#ifdef SPARSEKIT_WITH_CUDA
namespace {

IndexType parse_index_dtype(const std::string& s, const char* name, bool allow_u16,
                            bool allow_i64) {
  if (allow_u16 && (s == "u16" || s == "uint16")) return IndexType::U16;
  if (s == "i32" || s == "int32") return IndexType::I32;
  if (allow_i64 && (s == "i64" || s == "int64")) return IndexType::I64;
  value_error(std::string(name) + ": expected " + (allow_u16 ? "'uint16' or 'int32'" : "'int32' or 'int64'") +
              ", got '" + s + "'");
}

// Device pointers arrive as Python ints: reject null (when the array is non-empty) and
// pointers not aligned to the element size (the kernels would fault with a misaligned access).
const void* device_ptr(uint64_t v, const char* name, int64_t n_elems, int elem_size) {
  if (n_elems > 0 && v == 0)
    value_error(std::string(name) + ": expected a non-null device pointer for " +
                std::to_string(n_elems) + " elements, got 0 (null)");
  if (v % static_cast<uint64_t>(elem_size) != 0)
    value_error(std::string(name) + ": expected a device pointer aligned to " +
                std::to_string(elem_size) + " bytes, got 0x" + [&] {
                  std::ostringstream s; s << std::hex << v; return s.str(); }());
  return reinterpret_cast<const void*>(static_cast<uintptr_t>(v));
}

int index_size(IndexType t) { return t == IndexType::U16 ? 2 : (t == IndexType::I32 ? 4 : 8); }

// Fills and validates the parameters shared by cuda_csr_linear / cuda_bsr_linear.
// n_ptr: entries of indptr minus one (M for CSR, Mb for BSR); nnz_elems: values elements.
SpmmParams cuda_params(uint64_t indptr, uint64_t indices, uint64_t values, uint64_t x,
                       uint64_t out, uint64_t bias, int64_t n_rows, int64_t n_cols,
                       int64_t batch, int64_t nnz, int64_t n_ptr, int64_t nnz_elems,
                       const std::string& value_dtype, const std::string& x_dtype,
                       const std::string& out_dtype, const std::string& indptr_dtype,
                       const std::string& index_dtype, int64_t ldx, int64_t ldy) {
  check_dim(n_rows, "n_rows");
  check_dim(n_cols, "n_cols");
  check_dim(batch, "batch");
  check_dim(nnz, "nnz");
  SpmmParams p;
  p.M = n_rows;
  p.K = n_cols;
  p.N = batch;
  p.value_dtype = parse_dtype(value_dtype, "value_dtype");
  if (p.value_dtype == DType::I8)
    value_error("value_dtype: 'i8' (int8 weights) has no CUDA kernel; decode the matrix to a "
                "float dtype first (CSRMatrix.decoded())");
  p.x_dtype = parse_dtype(x_dtype, "x_dtype");
  const DType od = parse_dtype(out_dtype, "out_dtype");
  if (p.x_dtype != DType::F32 && p.x_dtype != p.value_dtype)
    value_error(std::string("x_dtype: expected 'f32' or the value dtype '") +
                sparsekit::dtype_name(p.value_dtype) + "', got '" + x_dtype + "'");
  if (od != p.x_dtype)
    value_error(std::string("out_dtype: expected the x dtype '") +
                sparsekit::dtype_name(p.x_dtype) + "', got '" + out_dtype + "'");
  p.indptr_type = parse_index_dtype(indptr_dtype, "indptr_dtype", false, true);
  p.index_type = parse_index_dtype(index_dtype, "index_dtype", true, false);
  if (p.indptr_type == IndexType::I32 && nnz > INT32_MAX)
    value_error("indptr_dtype: expected 'int64' for nnz > 2**31 - 1, got 'int32' with nnz = " +
                std::to_string(nnz));
  if (ldx < n_cols) value_error("ldx: expected >= n_cols = " + std::to_string(n_cols) +
                                ", got " + std::to_string(ldx));
  if (ldy < n_rows) value_error("ldy: expected >= n_rows = " + std::to_string(n_rows) +
                                ", got " + std::to_string(ldy));
  p.ldx = ldx;
  p.ldy = ldy;
  p.indptr = device_ptr(indptr, "indptr", n_ptr + 1, index_size(p.indptr_type));
  p.indices = device_ptr(indices, "indices", nnz, index_size(p.index_type));
  p.values = device_ptr(values, "values", nnz_elems, sparsekit::dtype_size(p.value_dtype));
  p.x = device_ptr(x, "x", batch * n_cols, sparsekit::dtype_size(p.x_dtype));
  p.y = const_cast<void*>(device_ptr(out, "out", batch * n_rows, sparsekit::dtype_size(od)));
  p.bias = static_cast<const float*>(device_ptr(bias, "bias", 0, 4));  // 0 = no bias
  return p;
}

void raise_cuda(const sparsekit::cuda::Status& st, const char* fn) {
  if (st.ok()) return;
  if (st.code == -1) value_error(std::string(fn) + ": " + st.message);
  throw std::runtime_error(std::string(fn) + ": CUDA error in " + st.message);
}

}  // namespace
#endif
// ---- end CUDA block ----

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsekit compiled kernels (CPU: OpenMP + runtime-dispatched SIMD).";

  m.def("cpu_isa", [] { return std::string(sparsekit::cpu::isa_name(sparsekit::cpu::default_isa())); },
        "ISA the CPU kernels use by default: 'avx512' | 'avx2' | 'generic' (runtime detected, "
        "capped by the SPARSEKIT_ISA environment variable).");
  m.def("build_info", &build_info, "Compiler, flags, OpenMP, CUDA and compiled ISAs of this build.");
  m.def("validate_csr", &validate, py::arg("indptr"), py::arg("indices"), py::arg("n_rows"),
        py::arg("n_cols"),
        "Checks a CSR structure in O(nnz): indptr (int32/int64, length n_rows + 1) starts at 0, is "
        "non-decreasing and ends at len(indices); indices (uint16/int32) lie in [0, n_cols) and "
        "strictly increase within each row. Raises ValueError naming the first violation.");
  m.def(
      "validate_bsr",
      [](const py::handle& indptr, const py::handle& indices, int64_t n_rows, int64_t n_cols,
         int64_t block_r, int64_t block_c) {
        if (block_r < 1) value_error("block_r: expected an integer >= 1, got " + std::to_string(block_r));
        if (block_c < 1) value_error("block_c: expected an integer >= 1, got " + std::to_string(block_c));
        check_dim(n_rows, "n_rows");
        check_dim(n_cols, "n_cols");
        validate(indptr, indices, (n_rows + block_r - 1) / block_r, (n_cols + block_c - 1) / block_c);
      },
      py::arg("indptr"), py::arg("indices"), py::arg("n_rows"), py::arg("n_cols"), py::arg("block_r"),
      py::arg("block_c"),
      "validate_csr over block rows/columns: indptr has ceil(n_rows / block_r) + 1 entries and "
      "indices are block-column ids in [0, ceil(n_cols / block_c)).");
  m.def("csr_linear", &csr_linear, py::arg("indptr"), py::arg("indices"), py::arg("values"),
        py::arg("value_dtype"), py::arg("x"), py::arg("x_dtype"), py::arg("bias"), py::arg("out"),
        py::arg("out_dtype"), py::arg("n_rows"), py::arg("n_cols"), py::arg("num_threads"),
        py::arg("isa") = "auto", py::arg("variant") = py::none(), py::arg("activation") = "none",
        "out (N, n_rows) = act(x (N, n_cols) @ W.T + bias) for W in CSR (fp32 accumulation; "
        "activation 'none' or 'relu', applied in fp32 before the output's conversion). "
        "The structure must have passed validate_csr. Releases the GIL.");
  m.def("csrq_linear", &csrq_linear, py::arg("indptr"), py::arg("indices"), py::arg("values"),
        py::arg("value_dtype"), py::arg("scales"), py::arg("x"), py::arg("x_dtype"),
        py::arg("bias"), py::arg("out"), py::arg("out_dtype"), py::arg("n_rows"),
        py::arg("n_cols"), py::arg("num_threads"), py::arg("isa") = "auto",
        py::arg("activation") = "none",
        "csr_linear for the compressed formats: int8 values (value_dtype 'i8', with float32 "
        "per-row scales) and/or uint8 column gaps (indices dtype uint8). The structure must "
        "have been validated (sparsekit.CSRMatrix). Releases the GIL.");
  m.def("bsr_linear", &bsr_linear, py::arg("indptr"), py::arg("indices"), py::arg("values"),
        py::arg("value_dtype"), py::arg("x"), py::arg("x_dtype"), py::arg("bias"), py::arg("out"),
        py::arg("out_dtype"), py::arg("n_rows"), py::arg("n_cols"), py::arg("block_r"),
        py::arg("block_c"), py::arg("num_threads"), py::arg("isa") = "auto",
        py::arg("variant") = py::none(), py::arg("activation") = "none",
        "out (N, n_rows) = act(x (N, n_cols) @ W.T + bias) for W in BSR with (block_r, block_c) "
        "blocks (activation as in csr_linear), "
        "values of shape (nnzb, block_r, block_c). The structure must have passed validate_bsr.");

  m.def("cpu_variants", &cpu_variants,
        "The table of CPU kernel variants (csrc/cpu/variants.h): dicts with id, name, family "
        "('csr' / 'bsr' / 'csrq' / '' for auto), n_min / n_max (batch sizes it applies to), isas, dtypes, "
        "summary.");
  py::class_<BoundMatrix>(m, "BoundMatrix",
                          "A CSR/BSR matrix validated once and bound to the CPU kernels; calls "
                          "pass only addresses (see csrc/bindings.cpp).")
      .def(py::init<const std::string&, const py::handle&, const py::handle&, const py::handle&,
                    const std::string&, int64_t, int64_t, int64_t, int64_t, const std::string&,
                    const py::handle&>(),
           py::arg("format"), py::arg("indptr"), py::arg("indices"), py::arg("values"),
           py::arg("value_dtype"), py::arg("n_rows"), py::arg("n_cols"), py::arg("block_r") = 1,
           py::arg("block_c") = 1, py::arg("isa") = "auto", py::arg("scales") = py::none(),
           "format 'csr' / 'bsr' (float values, plain indices) or 'csrq' (CSR in the compressed "
           "formats: int8 values with float32 per-row scales and/or uint8 gap indices).")
      .def("run", &BoundMatrix::run, py::arg("x"), py::arg("out"), py::arg("n"),
           py::arg("x_dtype"), py::arg("bias"), py::arg("num_threads"), py::arg("variant") = -1,
           py::arg("isa") = -1, py::arg("activation") = 0,
           "out (n, n_rows) = act(x (n, n_cols) @ W.T + bias) from addresses (ints; bias 0 = "
           "none), activation code 0 none / 1 relu (applied in fp32 before the output's "
           "conversion), "
           "x_dtype code 0 f32 / 1 bf16 / 2 f16; variant -1 = the planned one (with its ISA build), "
           "else that variant built for ISA code isa (0 generic, 1 avx2, 2 avx512; -1 = the "
           "matrix's, the highest allowed). Returns False, "
           "computing nothing, when variant is -1 and this batch class has no plan yet (plan "
           "with set_variant, then call again). Releases the GIL.")
      .def("read_probe", &BoundMatrix::read_probe, py::arg("out"), py::arg("num_threads"),
           py::arg("isa") = -1,
           "Benchmarks: out (n_rows fp32, an address) = per row, the XOR of its value bytes (bits "
           "0-7) and index bytes (bits 8-15), read as the N = 1 kernels stream them (same threads, "
           "row chunks and prefetch) and nothing computed: the memory floor of the SpMV. CSR with "
           "float values and plain indices only; isa as in run().")
      .def("gather_probe", &BoundMatrix::gather_probe, py::arg("x"), py::arg("out"),
           py::arg("num_threads"), py::arg("isa") = -1, py::arg("fetch") = "gather",
           "Benchmarks: out (n_rows fp32, an address) = per row, the sum of x[c] over its column "
           "ids c, x (n_cols fp32, an address) fetched as one N = 1 kernel fetches it (fetch "
           "'gather': the hardware gathers of csr_spmv_gather; 'assemble': the scalar-load "
           "assembly of csr_spmv_assemble; same threads, row chunks, steps, tails and index "
           "prefetch; scalar loads in the generic build) and no values read: the x-fetch floor "
           "of that kernel. CSR with float values and plain indices only; isa as in run().")
      .def("runner", &make_runner,
           "A builtin run(x, out, n, x_dtype, bias, num_threads[, activation]) -> bool doing "
           "exactly what "
           "run() does with variant -1, for positional ints only, at a fraction of the call "
           "cost (no pybind11 dispatch). It keeps this matrix alive.")
      .def("set_variant", &BoundMatrix::set_variant, py::arg("n_class"), py::arg("variant"),
           py::arg("num_threads"), py::arg("isa") = py::none(),
           "Records `variant` (name or id) built for `isa` (name; None = the matrix's ISA, which "
           "bounds it) as the plan for batch class n_class at num_threads.")
      .def("get_variant", &BoundMatrix::get_variant, py::arg("n_class"))
      .def("get_isa", &BoundMatrix::get_isa, py::arg("n_class"),
           "The ISA build the plan of batch class n_class runs.")
      .def("evict", &BoundMatrix::evict,
           "Flushes the matrix's buffers out of every cache level (x86; a no-op elsewhere), so "
           "the next call reads them from memory. Releases the GIL.")
      .def_static("n_class", &BoundMatrix::n_class, py::arg("n"),
                  "Batch class of N: 0 (N=1), 1 (N=2), 2 (3-8), 3 (9-32), 4 (33+).")
      .def_property_readonly("is_bsr", &BoundMatrix::is_bsr)
      .def_property_readonly("family", [](const BoundMatrix& b) { return std::string(b.family()); })
      .def_property_readonly("bitmap_nbytes", &BoundMatrix::bitmap_nbytes)
      .def_property_readonly("nnz", &BoundMatrix::nnz)
      .def_property_readonly("isa", &BoundMatrix::isa);

  // ---- CUDA bindings ----------------------------------------------------------------------
  // cuda_built() / cuda_device_count() / cuda_available() exist in every build (False / 0
  // without CUDA); the kernels only when compiled with SPARSEKIT_WITH_CUDA.
#ifdef SPARSEKIT_WITH_CUDA
  m.def("cuda_built", [] { return true; }, "True: this module was compiled with CUDA kernels.");
  m.def("cuda_device_count", [] {
        std::string why;
        return sparsekit::cuda::device_count(&why);
      },
      "Number of visible CUDA devices (0 without driver/GPU). Lazy: creates no CUDA context.");
  m.def("cuda_available", [] { return sparsekit::cuda::device_count(nullptr) > 0; },
        "True when built with CUDA and at least one CUDA device is visible.");
  m.def("cuda_info", [] {
        py::dict d;
        std::string why;
        d["built"] = true;
        d["requested"] = SPARSEKIT_CUDA_REQUESTED;
        d["runtime_version"] = sparsekit::cuda::runtime_version();
        d["archs"] = std::string(sparsekit::cuda::archs_compiled());
        d["device_count"] = sparsekit::cuda::device_count(&why);
        d["device_error"] = why;
        return d;
      },
      "CUDA build facts: runtime version, archs compiled, device count (and why 0).");
  // @@CUDA_BINDINGS@@
  m.def(
      "cuda_csr_linear",
      [](uint64_t indptr, uint64_t indices, uint64_t values, uint64_t x, uint64_t out,
         uint64_t bias, uint64_t row_order, int64_t n_rows, int64_t n_cols, int64_t batch,
         int64_t nnz, const std::string& value_dtype, const std::string& x_dtype,
         const std::string& out_dtype, const std::string& indptr_dtype,
         const std::string& index_dtype, int64_t ldx, int64_t ldy, uint64_t stream) {
        SpmmParams p = cuda_params(indptr, indices, values, x, out, bias, n_rows, n_cols, batch,
                                   nnz, n_rows, nnz, value_dtype, x_dtype, out_dtype,
                                   indptr_dtype, index_dtype, ldx < 0 ? n_cols : ldx,
                                   ldy < 0 ? n_rows : ldy);
        const auto* ro = static_cast<const int32_t*>(device_ptr(row_order, "row_order", 0, 4));
        sparsekit::cuda::Status st;
        {
          py::gil_scoped_release nogil;
          st = sparsekit::cuda::csr_linear(p, ro, static_cast<uintptr_t>(stream));
        }
        raise_cuda(st, "cuda_csr_linear");
      },
      py::arg("indptr"), py::arg("indices"), py::arg("values"), py::arg("x"), py::arg("out"),
      py::arg("bias"), py::arg("row_order"), py::arg("n_rows"), py::arg("n_cols"),
      py::arg("batch"), py::arg("nnz"), py::arg("value_dtype"), py::arg("x_dtype"),
      py::arg("out_dtype"), py::arg("indptr_dtype"), py::arg("index_dtype"),
      py::arg("ldx") = -1, py::arg("ldy") = -1, py::arg("stream") = 0,
      "CUDA CSR: out (batch, n_rows) = x (batch, n_cols) @ W.T + bias. All arrays are raw device "
      "pointers (ints) on the current device; bias / row_order may be 0 (none); row_order is an "
      "int32 permutation of the rows (row swizzle). Enqueued on `stream` (cudaStream_t as int), "
      "asynchronous. The structure is trusted (validated when the matrix was built).");
  m.def(
      "cuda_bsr_linear",
      [](uint64_t indptr, uint64_t indices, uint64_t values, uint64_t x, uint64_t out,
         uint64_t bias, int64_t n_rows, int64_t n_cols, int64_t batch, int64_t nnz_blocks,
         int64_t block_r, int64_t block_c, const std::string& value_dtype,
         const std::string& x_dtype, const std::string& out_dtype,
         const std::string& indptr_dtype, const std::string& index_dtype, int64_t ldx,
         int64_t ldy, uint64_t stream) {
        if (block_r < 1 || block_r > 4096)
          value_error("block_r: expected an integer in [1, 4096], got " + std::to_string(block_r));
        if (block_c < 1 || block_c > 4096)
          value_error("block_c: expected an integer in [1, 4096], got " + std::to_string(block_c));
        check_dim(n_rows, "n_rows");
        check_dim(nnz_blocks, "nnz_blocks");
        const int64_t Mb = (n_rows + block_r - 1) / block_r;
        SpmmParams p = cuda_params(indptr, indices, values, x, out, bias, n_rows, n_cols, batch,
                                   nnz_blocks, Mb, nnz_blocks * block_r * block_c, value_dtype,
                                   x_dtype, out_dtype, indptr_dtype, index_dtype,
                                   ldx < 0 ? n_cols : ldx, ldy < 0 ? n_rows : ldy);
        p.block_r = static_cast<int>(block_r);
        p.block_c = static_cast<int>(block_c);
        sparsekit::cuda::Status st;
        {
          py::gil_scoped_release nogil;
          st = sparsekit::cuda::bsr_linear(p, static_cast<uintptr_t>(stream));
        }
        raise_cuda(st, "cuda_bsr_linear");
      },
      py::arg("indptr"), py::arg("indices"), py::arg("values"), py::arg("x"), py::arg("out"),
      py::arg("bias"), py::arg("n_rows"), py::arg("n_cols"), py::arg("batch"),
      py::arg("nnz_blocks"), py::arg("block_r"), py::arg("block_c"), py::arg("value_dtype"),
      py::arg("x_dtype"), py::arg("out_dtype"), py::arg("indptr_dtype"), py::arg("index_dtype"),
      py::arg("ldx") = -1, py::arg("ldy") = -1, py::arg("stream") = 0,
      "CUDA BSR: out (batch, n_rows) = x @ W.T + bias, W in (block_r, block_c) blocks "
      "(values: nnz_blocks * block_r * block_c elements, row-major blocks). Tensor cores for "
      "fp16/bf16 with x of the value dtype, blocks multiple of 16 and batch >= 16.");
  m.def(
      "cuda_bsr_path",
      [](int64_t block_r, int64_t block_c, int64_t batch, const std::string& value_dtype,
         const std::string& x_dtype, uint64_t values) {
        SpmmParams p;
        p.block_r = static_cast<int>(block_r);
        p.block_c = static_cast<int>(block_c);
        p.N = batch;
        p.value_dtype = parse_dtype(value_dtype, "value_dtype");
        p.x_dtype = parse_dtype(x_dtype, "x_dtype");
        p.values = reinterpret_cast<const void*>(static_cast<uintptr_t>(values));
        return std::string(sparsekit::cuda::bsr_path(p));
      },
      py::arg("block_r"), py::arg("block_c"), py::arg("batch"), py::arg("value_dtype"),
      py::arg("x_dtype"), py::arg("values") = 0,
      "Which kernel cuda_bsr_linear picks: 'tensor_core' or 'cuda_core'.");
#else
  m.def("cuda_built", [] { return false; }, "False: this module was compiled without CUDA.");
  m.def("cuda_device_count", [] { return 0; }, "0: this module was compiled without CUDA.");
  m.def("cuda_available", [] { return false; }, "False: this module was compiled without CUDA.");
  m.def("cuda_info", [] {
        py::dict d;
        d["built"] = false;
        d["requested"] = SPARSEKIT_CUDA_REQUESTED;  // "OFF", or "AUTO" when no nvcc was found
        return d;
      },
      "CUDA build facts ({'built': False} without CUDA).");
#endif
  // ---- end CUDA bindings ----
}
