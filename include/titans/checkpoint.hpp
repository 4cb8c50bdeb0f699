// SPDX-License-Identifier: Apache-2.0
//
// \file checkpoint.hpp
// \brief Saving and loading parameter sets (module weights, optimizer state) as safetensors files.
//
// This header and the format layer it is built on (detail/safetensors.hpp: the header parser,
// file reading, the shape rule and the decoding of tensors) are the titans headers that need
// nlohmann/json (an optional dependency: link `titans::checkpoint`, or just have
// <nlohmann/json.hpp> on the include path). Headers that need it include this one.
//
// ## File format (safetensors)
//
//     [8 bytes]  N, unsigned 64-bit little-endian: the length of the header
//     [N bytes]  header: UTF-8 JSON object
//                  { "<tensor name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
//                    ...,
//                    "__metadata__": {"<key>": "<value>", ...} }        (optional, strings only)
//     [rest]     data buffer: each tensor's bytes at [begin, end) relative to the start of the
//                buffer, little-endian, row-major (C order, as NumPy and PyTorch lay them out)
//
// titans writes tensors back to back in name order with no gaps (the layout the Python
// `safetensors` package itself produces and checks for), the header padded with spaces so the data
// starts 8-byte aligned; `safetensors.numpy.load_file(path)["w_k"]` is then the matrix `w_k` of C++.
// When reading, gaps and trailing bytes in the data buffer are allowed, and fields of a tensor entry
// other than the three above are ignored.
//
// ## Shape rule
//
// titans tensors are column-major matrices `(rows, cols)`. They are written with shape
// `[rows, cols]` (always 2-D, vectors included: a `(n, 1)` vector is `[n, 1]`) and their elements in
// row-major order, so the array Python sees has the same rows and columns. On load, a file tensor
// fits a model tensor `(r, c)` when its shape is
//   - `[r, c]` (2-D), or
//   - `[r]` (1-D) and `c == 1`: a 1-D array is read as a column vector, or
//   - `[]` (0-D, a scalar) and `r == c == 1`.
// Anything else, including rank >= 3, is a ShapeError naming the tensor and both shapes.
//
// ## Dtype rule
//
// Files may hold any standard safetensors dtype (BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16,
// BF16, I32, U32, F32, F64, I64, U64); `list_checkpoint` shows them all. `load_checkpoint` fills
// tensors from F32, F64, BF16 and F16 data, into float, double or long double models. F32, BF16
// and F16 values are widened exactly (every BF16 and F16 value is a float); F64 is converted with
// `static_cast` (rounding to nearest). An F64 value whose magnitude exceeds the model scalar's
// largest finite value is a NumericError (it is never silently turned into infinity); NaN and
// infinity in a file are a NumericError too. Any other dtype in a tensor the model needs is a
// FormatError naming the tensor and the dtype. Saving writes `Dtype::native` (F32 for float
// models, F64 for double and long double), or F32, F64, BF16 or F16 on request: each value is
// rounded to the nearest value of that type (ties to even), and one whose magnitude is beyond the
// type's largest finite value (F16: 65504; BF16: about 3.39e38) is a NumericError naming it.
//
// ## Untrusted input
//
// A checkpoint is treated as hostile: every structural error is a FormatError (never an
// nlohmann exception, a crash or an over-read) that says what was wrong. Memory stays proportional
// to the input: a file is read into one buffer of its own size, the header is capped at
// `checkpoint_max_header_bytes` and parsed event by event (nothing a valid header would not need is
// kept, JSON may nest only three levels deep), and no buffer is ever sized from a number in the
// file: tensors are allocated at the parameter set's shapes after those matched the file. Loads are
// all-or-nothing: everything is decoded and validated into temporaries before any tensor of the
// parameter set is touched, so a failed load leaves the parameters unchanged.
//
// Example:
//
//     // params: any parameter set (module weights, gradients, AdamW state, ...)
//     titans::save_checkpoint("model.safetensors", params, {{"step", "1000"}});
//     auto restored = titans::zeros_like(params);                          // same names and shapes
//     auto meta = titans::load_checkpoint("model.safetensors", restored);  // meta["step"] == "1000"
//     for (const auto& t : titans::list_checkpoint("model.safetensors")) std::cout << t.name << "\n";
#pragma once

#include "common.hpp"
#include "detail/safetensors.hpp"
#include "parameters.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

namespace titans {

/// \brief Element type written to a checkpoint.
enum class Dtype {
  native,  ///< F32 for float parameter sets, F64 for double and long double
  f32,     ///< IEEE binary32 ("F32")
  f64,     ///< IEEE binary64 ("F64")
  bf16,    ///< bfloat16 ("BF16"): float's exponent, 8 significant bits
  f16,     ///< IEEE binary16 ("F16"): 11 significant bits, largest finite value 65504
};

/// \brief Options of load_checkpoint.
struct LoadOptions {
  /// Ignore tensors in the file that the parameter set does not have (otherwise a FormatError).
  bool allow_extra = false;
};

/// \brief One tensor of a checkpoint, as listed by list_checkpoint.
struct TensorInfo {
  std::string name;                  ///< tensor name (a key of the header)
  std::string dtype;                 ///< safetensors dtype string: "F32", "F64", "BF16", ...
  std::vector<std::uint64_t> shape;  ///< row-major shape, as in the file ([] for a scalar)
  std::uint64_t begin = 0;           ///< first byte in the data buffer (after the header)
  std::uint64_t end = 0;             ///< one past the last byte in the data buffer
};

namespace detail {
namespace ckpt {

/// Validates the file against the parameter set, decodes every tensor into temporaries, then
/// swaps them in (no allocation, cannot fail). Returns the metadata.
template <class P>
std::map<std::string, std::string> load_into(const char* where, const Header& h, const std::uint8_t* blob, P& params,
                                             const LoadOptions& opts) {
  using Scalar = typename P::scalar_type;
  static_check_scalar<Scalar>();
  check_unique_names(where, params);
  const P& view = params;

  // Structure first (cheap): every needed tensor present, F32/F64, right shape; no extras.
  std::set<std::string> wanted;
  view.for_each([&](const std::string& name, const Matrix<Scalar>& t) {
    if (name == "__metadata__")
      raise<InvalidArgument>(where, "a parameter is named '__metadata__', which the format reserves");
    const Entry* e = h.find(name);
    if (!e) raise<FormatError>(where, "the checkpoint has no tensor ", quote_name(name), " (the parameters need it)");
    if (e->dtype != "F32" && e->dtype != "F64" && e->dtype != "BF16" && e->dtype != "F16") {
      raise<FormatError>(where, "tensor ", quote_name(name), " has dtype ", e->dtype,
                         "; only F32, F64, BF16 and F16 can be loaded");
    }
    if (!shape_fits(e->shape, t.rows(), t.cols())) {
      raise<ShapeError>(where, "tensor ", quote_name(name), " has shape ", shape_string(e->shape),
                        " in the checkpoint, but the parameter is ", shape_of(t.rows(), t.cols()));
    }
    wanted.insert(name);
  });
  if (!opts.allow_extra) {
    for (const Entry& e : h.entries) {
      if (!wanted.count(e.name)) {
        raise<FormatError>(where, "the checkpoint holds tensor ", quote_name(e.name),
                           " that the parameters do not have (LoadOptions::allow_extra ignores it)");
      }
    }
  }

  // Then the values, into temporaries of the model's shapes (their byte sizes were checked
  // against the file, so these allocations are bounded by the input's size).
  std::vector<Matrix<Scalar>> staged;
  view.for_each([&](const std::string& name, const Matrix<Scalar>& t) {
    Matrix<Scalar> m(t.rows(), t.cols());
    decode(where, *h.find(name), blob, m);
    staged.push_back(std::move(m));
  });

  std::size_t i = 0;
  params.for_each([&](const std::string&, Matrix<Scalar>& t) {
    if (i < staged.size()) t.swap(staged[i++]);
  });
  return h.metadata;
}

/// A validated save: header text and the tensors in data order.
template <class Scalar>
struct SavePlan {
  std::string header;  // padded so that 8 + header.size() is a multiple of 8
  std::uint64_t width = 0;
  bool bf16 = false;   // with width 2: BF16, else F16
  std::vector<const Matrix<Scalar>*> tensors;
};

template <class P>
SavePlan<typename P::scalar_type> plan_save(const char* where, const P& params,
                                            const std::map<std::string, std::string>& metadata, Dtype dtype) {
  using Scalar = typename P::scalar_type;
  static_check_scalar<Scalar>();
  check_unique_names(where, params);
  if (dtype != Dtype::native && dtype != Dtype::f32 && dtype != Dtype::f64 && dtype != Dtype::bf16 &&
      dtype != Dtype::f16) {
    raise<InvalidArgument>(where, "dtype has an unknown value");
  }
  const bool half = dtype == Dtype::bf16 || dtype == Dtype::f16;
  const bool f32 = dtype == Dtype::f32 || (dtype == Dtype::native && sizeof(Scalar) <= sizeof(float));
  const char* dtype_name = dtype == Dtype::bf16 ? "BF16" : dtype == Dtype::f16 ? "F16" : f32 ? "F32" : "F64";

  // Largest magnitude that converts to the file's dtype without overflow, as a Scalar (the smaller
  // of the two types' maxima, so the cast itself is exact and defined). The 16-bit types are
  // checked value by value, by the rounding itself.
  const long double dtype_max = f32 || half ? std::numeric_limits<float>::max() : std::numeric_limits<double>::max();
  const auto limit = static_cast<Scalar>(std::min<long double>(dtype_max, std::numeric_limits<Scalar>::max()));

  std::vector<std::pair<std::string, const Matrix<Scalar>*>> items;
  params.for_each([&](const std::string& name, const Matrix<Scalar>& t) {
    if (name == "__metadata__")
      raise<InvalidArgument>(where, "a parameter is named '__metadata__', which the format reserves");
    for (Index j = 0; j < t.cols(); ++j) {
      for (Index i = 0; i < t.rows(); ++i) {
        const Scalar x = t(i, j);
        if (!std::isfinite(x)) {
          raise<NumericError>(where, "tensor ", quote_name(name), " holds a non-finite value (", x, ") at (", i, ", ",
                              j, ")");
        }
        std::uint16_t bits = 0;
        if (std::fabs(x) > limit || (half && !half_bits(x, dtype == Dtype::bf16, bits))) {
          raise<NumericError>(where, "tensor ", quote_name(name), ": value ", x, " at (", i, ", ", j, ") overflows ",
                              dtype_name);
        }
      }
    }
    items.emplace_back(name, &t);
  });
  std::sort(items.begin(), items.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });  // data in header order

  SavePlan<Scalar> plan;
  plan.width = half ? 2 : f32 ? 4 : 8;
  plan.bf16 = dtype == Dtype::bf16;
  nlohmann::json header = nlohmann::json::object();
  std::uint64_t offset = 0;
  for (const auto& [name, t] : items) {
    const auto rows = static_cast<std::uint64_t>(t->rows()), cols = static_cast<std::uint64_t>(t->cols());
    const std::uint64_t bytes = rows * cols * plan.width;
    nlohmann::json entry = nlohmann::json::object();
    entry["dtype"] = dtype_name;
    entry["shape"] = nlohmann::json::array({rows, cols});
    entry["data_offsets"] = nlohmann::json::array({offset, offset + bytes});
    header[name] = std::move(entry);
    offset += bytes;
    plan.tensors.push_back(t);
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  try {
    plan.header = header.dump();
  } catch (const nlohmann::json::exception& e) {
    raise<InvalidArgument>(where, "a tensor name or metadata string is not valid UTF-8: ", e.what());
  }
  while ((8 + plan.header.size()) % 8 != 0) plan.header.push_back(' ');  // the format allows trailing spaces
  if (plan.header.size() > checkpoint_max_header_bytes) {
    raise<InvalidArgument>(where, "the header would be ", plan.header.size(), " bytes, more than the limit of ",
                           checkpoint_max_header_bytes);
  }
  return plan;
}

/// Streams a planned checkpoint to `sink(const std::uint8_t* bytes, std::size_t n)`.
template <class Scalar, class Sink>
void emit(const SavePlan<Scalar>& plan, Sink&& sink) {
  std::uint8_t prefix[8];
  put_le64(prefix, plan.header.size());
  sink(prefix, 8);
  sink(reinterpret_cast<const std::uint8_t*>(plan.header.data()), plan.header.size());

  std::vector<std::uint8_t> chunk;
  constexpr std::size_t chunk_bytes = std::size_t{1} << 16;
  chunk.reserve(chunk_bytes);
  for (const Matrix<Scalar>* t : plan.tensors) {
    for (Index i = 0; i < t->rows(); ++i) {  // row-major
      for (Index j = 0; j < t->cols(); ++j) {
        std::uint8_t b[8];
        if (plan.width == 2) {
          std::uint16_t bits = 0;
          half_bits((*t)(i, j), plan.bf16, bits);  // in range: plan_save checked every value
          b[0] = static_cast<std::uint8_t>(bits & 0xFF);
          b[1] = static_cast<std::uint8_t>(bits >> 8);
        } else if (plan.width == 4) {
          const float x = static_cast<float>((*t)(i, j));
          std::uint32_t bits;
          std::memcpy(&bits, &x, sizeof bits);
          put_le32(b, bits);
        } else {
          const double x = static_cast<double>((*t)(i, j));
          std::uint64_t bits;
          std::memcpy(&bits, &x, sizeof bits);
          put_le64(b, bits);
        }
        chunk.insert(chunk.end(), b, b + plan.width);
        if (chunk.size() + 8 > chunk_bytes) {
          sink(chunk.data(), chunk.size());
          chunk.clear();
        }
      }
    }
  }
  if (!chunk.empty()) sink(chunk.data(), chunk.size());
}

/// A temporary-file suffix unlikely to collide with a concurrent writer.
inline std::string temp_suffix() {
  std::uint64_t r = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  try {
    std::random_device rd;
    r ^= (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  } catch (const std::exception&) {  // no entropy source: the clock alone will do
  }
  static constexpr char hex[] = "0123456789abcdef";
  std::string s = ".tmp.";
  for (int k = 60; k >= 0; k -= 4) s.push_back(hex[(r >> k) & 0xf]);
  return s;
}

inline std::string where_path(const char* function, const std::string& path) {
  return std::string(function) + "(\"" + path + "\")";
}

}  // namespace ckpt
}  // namespace detail

/// \brief Serialises a parameter set to safetensors bytes (see the file comment for the layout).
///
/// Tensors are written in name order, each with shape `[rows, cols]` and row-major data.
/// \tparam P a parameter set (parameters.hpp): module weights, gradients or optimizer state.
/// \throws InvalidArgument duplicate names, a name "__metadata__", or invalid UTF-8 in a string.
/// \throws NumericError a NaN/infinite value, or one too large for the requested dtype.
template <class P>
std::vector<std::uint8_t> save_checkpoint_to_memory(const P& params,
                                                    const std::map<std::string, std::string>& metadata = {},
                                                    Dtype dtype = Dtype::native) {
  const char* where = "titans::save_checkpoint_to_memory";
  const auto plan = detail::ckpt::plan_save(where, params, metadata, dtype);
  std::vector<std::uint8_t> out;
  detail::ckpt::emit(plan, [&](const std::uint8_t* p, std::size_t n) { out.insert(out.end(), p, p + n); });
  return out;
}

/// \brief Writes a parameter set to the safetensors file `path`, atomically.
///
/// The bytes go to a temporary file beside `path` (`path + ".tmp.<random>"`), which is flushed,
/// closed, checked, and renamed over `path`; readers see either the old file or the complete new
/// one, never a partial write. On any failure the temporary file is removed and `path` is left as
/// it was. A process killed during the save leaves `path` intact too, but cannot remove its
/// temporary file: a leftover `path + ".tmp.*"` is an interrupted save and may be deleted.
/// (Standard C++ cannot fsync, so durability across a power loss is up to the OS.)
/// \param metadata string pairs stored under "__metadata__" (omitted when empty).
/// \param dtype element type on disk; `native` is the parameter set's own width.
/// \throws IoError the file cannot be written or renamed (the message names the path).
/// \throws InvalidArgument, NumericError as save_checkpoint_to_memory; no file is created then.
template <class P>
void save_checkpoint(const std::string& path, const P& params, const std::map<std::string, std::string>& metadata = {},
                     Dtype dtype = Dtype::native) {
  const std::string where_s = detail::ckpt::where_path("titans::save_checkpoint", path);
  const char* where = where_s.c_str();
  if (path.empty()) detail::raise<InvalidArgument>(where, "path is empty");
  const auto plan = detail::ckpt::plan_save(where, params, metadata, dtype);

  const std::string tmp = path + detail::ckpt::temp_suffix();
  std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
  if (!out) {
    std::remove(tmp.c_str());
    detail::raise<IoError>(where, "cannot create the temporary file \"", tmp, "\" (does the directory exist?)");
  }
  try {
    detail::ckpt::emit(plan, [&](const std::uint8_t* p, std::size_t n) {
      out.write(reinterpret_cast<const char*>(p), static_cast<std::streamsize>(n));
      if (!out) detail::raise<IoError>(where, "writing the temporary file \"", tmp, "\" failed");
    });
    out.flush();
    out.close();
    if (out.fail()) detail::raise<IoError>(where, "flushing and closing the temporary file \"", tmp, "\" failed");
  } catch (...) {
    if (out.is_open()) out.close();
    std::remove(tmp.c_str());
    throw;
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    detail::raise<IoError>(where, "cannot rename \"", tmp, "\" to \"", path, "\": ", ec.message());
  }
}

/// \brief Loads safetensors bytes into a parameter set, by name; returns the metadata.
///
/// Every tensor of `params` must be in the input (F32 or F64, shape per the file comment's rule);
/// tensors the parameters lack are an error unless `opts.allow_extra`. All-or-nothing: on any
/// exception `params` is unchanged.
/// \throws FormatError malformed input, a missing or extra tensor, an unsupported dtype.
/// \throws ShapeError a tensor's shape differs from the parameter's (both are named).
/// \throws NumericError a non-finite value, or an F64 value that overflows the scalar type.
/// \throws InvalidArgument the parameter set has duplicate names or one named "__metadata__".
template <class P>
std::map<std::string, std::string> load_checkpoint_from_memory(const std::uint8_t* data, std::size_t size, P& params,
                                                               const LoadOptions& opts = {}) {
  const char* where = "titans::load_checkpoint_from_memory";
  const detail::ckpt::Header h = detail::ckpt::parse_buffer(where, data, size);
  const std::uint64_t n = detail::ckpt::get_le64(data);
  return detail::ckpt::load_into(where, h, data + 8 + n, params, opts);
}

/// \brief load_checkpoint_from_memory on a byte vector.
template <class P>
std::map<std::string, std::string> load_checkpoint_from_memory(const std::vector<std::uint8_t>& bytes, P& params,
                                                               const LoadOptions& opts = {}) {
  return load_checkpoint_from_memory(bytes.data(), bytes.size(), params, opts);
}

/// \brief Loads the safetensors file `path` into a parameter set, by name; returns the metadata.
///
/// Reads the file once (one allocation of the file's size) and behaves as
/// load_checkpoint_from_memory; error messages name the path.
/// \throws IoError the file does not exist, is a directory, or cannot be read.
template <class P>
std::map<std::string, std::string> load_checkpoint(const std::string& path, P& params, const LoadOptions& opts = {}) {
  const std::string where_s = detail::ckpt::where_path("titans::load_checkpoint", path);
  const char* where = where_s.c_str();
  const std::vector<std::uint8_t> bytes = detail::ckpt::read_file(where, path);
  const detail::ckpt::Header h = detail::ckpt::parse_buffer(where, bytes.data(), bytes.size());
  const std::uint64_t n = detail::ckpt::get_le64(bytes.data());
  return detail::ckpt::load_into(where, h, bytes.data() + 8 + n, params, opts);
}

/// \brief The "__metadata__" of safetensors bytes (empty if absent); validates the whole header.
inline std::map<std::string, std::string> read_checkpoint_metadata_from_memory(const std::uint8_t* data,
                                                                               std::size_t size) {
  return detail::ckpt::parse_buffer("titans::read_checkpoint_metadata_from_memory", data, size).metadata;
}

/// \brief The "__metadata__" of a safetensors file (reads and validates only the header).
inline std::map<std::string, std::string> read_checkpoint_metadata(const std::string& path) {
  const std::string where = detail::ckpt::where_path("titans::read_checkpoint_metadata", path);
  return detail::ckpt::read_file_header(where.c_str(), path).metadata;
}

namespace detail {
namespace ckpt {
inline std::vector<TensorInfo> infos(const Header& h) {
  std::vector<TensorInfo> out;
  out.reserve(h.entries.size());
  for (const Entry& e : h.entries) out.push_back(TensorInfo{e.name, e.dtype, e.shape, e.begin, e.end});
  return out;
}
}  // namespace ckpt
}  // namespace detail

/// \brief The tensors of safetensors bytes, sorted by name; validates the whole header.
inline std::vector<TensorInfo> list_checkpoint_from_memory(const std::uint8_t* data, std::size_t size) {
  return detail::ckpt::infos(detail::ckpt::parse_buffer("titans::list_checkpoint_from_memory", data, size));
}

/// \brief The tensors of a safetensors file, sorted by name (reads and validates only the header).
inline std::vector<TensorInfo> list_checkpoint(const std::string& path) {
  const std::string where = detail::ckpt::where_path("titans::list_checkpoint", path);
  return detail::ckpt::infos(detail::ckpt::read_file_header(where.c_str(), path));
}

}  // namespace titans
