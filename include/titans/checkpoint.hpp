// SPDX-License-Identifier: Apache-2.0
//
// \file checkpoint.hpp
// \brief Saving and loading parameter sets (module weights, optimizer state) as safetensors files.
//
// This is the only titans header that needs nlohmann/json (an optional dependency: link
// `titans::checkpoint`, or just have <nlohmann/json.hpp> on the include path).
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
#include "parameters.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
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

/// \brief Largest header (JSON) length accepted or written, in bytes.
inline constexpr std::uint64_t checkpoint_max_header_bytes = 100'000'000;

namespace detail {
namespace ckpt {

/// Largest tensor rank accepted in a header (NumPy's own limit is 64).
inline constexpr std::size_t max_rank = 64;
/// Containers may nest this deep: root object, tensor entry / metadata object, shape array.
inline constexpr int max_depth = 3;

/// Byte width of a safetensors dtype, or 0 if the string is not one.
inline std::uint64_t dtype_width(const std::string& dtype) {
  struct Known {
    const char* name;
    std::uint64_t width;
  };
  static constexpr std::array<Known, 15> known = {{{"BOOL", 1},
                                                   {"U8", 1},
                                                   {"I8", 1},
                                                   {"F8_E5M2", 1},
                                                   {"F8_E4M3", 1},
                                                   {"I16", 2},
                                                   {"U16", 2},
                                                   {"F16", 2},
                                                   {"BF16", 2},
                                                   {"I32", 4},
                                                   {"U32", 4},
                                                   {"F32", 4},
                                                   {"F64", 8},
                                                   {"I64", 8},
                                                   {"U64", 8}}};
  for (const auto& k : known) {
    if (dtype == k.name) return k.width;
  }
  return 0;
}

/// `'name'`, shortened if very long (names come from untrusted files).
inline std::string quote_name(const std::string& s) {
  constexpr std::size_t limit = 200;
  if (s.size() <= limit) return "'" + s + "'";
  return "'" + s.substr(0, limit) + "...' (" + std::to_string(s.size()) + " bytes)";
}

inline std::string shape_string(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

inline std::uint64_t get_le64(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int k = 7; k >= 0; --k) v = (v << 8) | p[k];
  return v;
}
inline std::uint32_t get_le32(const std::uint8_t* p) {
  std::uint32_t v = 0;
  for (int k = 3; k >= 0; --k) v = (v << 8) | p[k];
  return v;
}
inline void put_le64(std::uint8_t* p, std::uint64_t v) {
  for (int k = 0; k < 8; ++k) p[k] = static_cast<std::uint8_t>(v >> (8 * k));
}
inline void put_le32(std::uint8_t* p, std::uint32_t v) {
  for (int k = 0; k < 4; ++k) p[k] = static_cast<std::uint8_t>(v >> (8 * k));
}

/// a * b, or false on uint64 overflow.
inline bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
  out = a * b;
  return true;
}

/// One validated header entry.
struct Entry {
  std::string name;
  std::string dtype;
  std::uint64_t width = 0;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0, end = 0;
};

/// A validated header: entries sorted by name (unique), and the metadata.
struct Header {
  std::vector<Entry> entries;
  std::map<std::string, std::string> metadata;

  const Entry* find(const std::string& name) const {
    auto it = std::lower_bound(entries.begin(), entries.end(), name,
                               [](const Entry& e, const std::string& n) { return e.name < n; });
    return it != entries.end() && it->name == name ? &*it : nullptr;
  }
};

/// Checks the 8-byte length field against the input size; returns the header length N.
/// `first8` may be null when `size < 8`.
inline std::uint64_t check_prefix(const char* where, const std::uint8_t* first8, std::uint64_t size) {
  if (size < 8) {
    raise<FormatError>(where, "input is ", size, " bytes, shorter than the 8-byte header length field");
  }
  const std::uint64_t n = get_le64(first8);
  if (n > checkpoint_max_header_bytes) {
    raise<FormatError>(where, "header length ", n, " exceeds the limit of ", checkpoint_max_header_bytes, " bytes");
  }
  if (n > size - 8) {
    raise<FormatError>(where, "header length ", n, " runs past the end of the input (", size - 8,
                       " bytes follow the length field)");
  }
  return n;
}

/// Builds and validates a Header from nlohmann's SAX events, one event at a time.
///
/// Nothing is kept that the format does not need: a value of the wrong JSON type is rejected the
/// moment it is seen, unknown fields of a tensor entry are skipped without being stored, shapes
/// longer than `max_rank` and offsets longer than two are cut off at once, and containers may nest
/// only `max_depth` deep. So the memory a hostile header can make us hold is a small multiple of
/// its well-formed part, and the parser stack stays shallow.
class HeaderParser {
 public:
  using json = nlohmann::json;

  HeaderParser(const char* where, std::uint64_t data_size) : where_(where), data_size_(data_size) {}

  /// The result, after a successful parse: entries sorted by name and checked for duplicates.
  Header finish() {
    std::sort(h_.entries.begin(), h_.entries.end(), [](const Entry& a, const Entry& b) { return a.name < b.name; });
    for (std::size_t i = 1; i < h_.entries.size(); ++i) {
      if (h_.entries[i].name == h_.entries[i - 1].name) duplicate(h_.entries[i].name);
    }
    return std::move(h_);
  }

  // --- nlohmann SAX interface ---------------------------------------------------------------
  bool null() { return scalar("null"); }
  bool boolean(bool) { return scalar("boolean"); }
  bool number_integer(json::number_integer_t v) {
    if (v >= 0) return number(static_cast<std::uint64_t>(v), nullptr);
    const std::string problem = "is negative (" + std::to_string(v) + ")";
    return number(0, problem.c_str());
  }
  bool number_unsigned(json::number_unsigned_t v) { return number(v, nullptr); }
  bool number_float(json::number_float_t, const json::string_t& text) {
    const std::string problem = "is not an integer (" + text.substr(0, 64) + ")";
    return number(0, problem.c_str());
  }
  bool string(json::string_t& s) {
    switch (top()) {
      case Ctx::entry:
        if (field_ == Field::dtype) {
          cur_.dtype = std::move(s);
          cur_.width = dtype_width(cur_.dtype);
          if (cur_.width == 0) fail(tensor(), ": unknown dtype ", quote_name(cur_.dtype));
          return true;
        }
        return scalar("string");
      case Ctx::metadata:
        h_.metadata.emplace(std::move(key_), std::move(s));
        return true;
      default:
        return scalar("string");
    }
  }
  bool binary(json::binary_t&) { return scalar("binary"); }  // never produced by the JSON parser

  bool start_object(std::size_t) {
    open("object");
    switch (top()) {
      case Ctx::none:
        stack_.push_back(Ctx::root);
        return true;
      case Ctx::root:
        if (key_ == "__metadata__") {
          stack_.push_back(Ctx::metadata);
        } else {
          cur_ = Entry{};
          cur_.name = std::move(key_);
          seen_ = {false, false, false};
          stack_.push_back(Ctx::entry);
        }
        return true;
      case Ctx::entry:
        if (field_ == Field::other) {
          stack_.push_back(Ctx::skip);
          return true;
        }
        return wrong_type("object");
      case Ctx::skip:
        stack_.push_back(Ctx::skip);
        return true;
      default:
        return wrong_type("object");
    }
  }

  bool key(json::string_t& k) {
    switch (top()) {
      case Ctx::root:
        if (k == "__metadata__") {
          if (metadata_seen_) duplicate(k);
          metadata_seen_ = true;
        }
        key_ = std::move(k);
        return true;
      case Ctx::metadata:
        if (h_.metadata.count(k)) duplicate(k);
        key_ = std::move(k);
        return true;
      case Ctx::entry: {
        field_ = k == "dtype"          ? Field::dtype
                 : k == "shape"        ? Field::shape
                 : k == "data_offsets" ? Field::offsets
                                       : Field::other;
        if (field_ != Field::other) {
          bool& seen = seen_[static_cast<std::size_t>(field_)];
          if (seen) duplicate(k);
          seen = true;
        }
        return true;
      }
      default:  // skip
        return true;
    }
  }

  bool end_object() {
    const Ctx done = top();
    stack_.pop_back();
    if (done == Ctx::entry) finish_entry();
    return true;
  }

  bool start_array(std::size_t) {
    open("array");
    switch (top()) {
      case Ctx::entry:
        if (field_ == Field::shape) {
          stack_.push_back(Ctx::shape);
          return true;
        }
        if (field_ == Field::offsets) {
          offsets_n_ = 0;
          stack_.push_back(Ctx::offsets);
          return true;
        }
        if (field_ == Field::other) {
          stack_.push_back(Ctx::skip);
          return true;
        }
        return wrong_type("array");
      case Ctx::skip:
        stack_.push_back(Ctx::skip);
        return true;
      default:
        return wrong_type("array");
    }
  }

  bool end_array() {
    if (top() == Ctx::offsets && offsets_n_ != 2) {
      fail(tensor(), ": 'data_offsets' has ", offsets_n_, " elements, expected an array [begin, end]");
    }
    stack_.pop_back();
    return true;
  }

  bool parse_error(std::size_t, const std::string&, const json::exception& e) {
    fail("header is not valid JSON: ", e.what());
  }

 private:
  enum class Ctx { none, root, entry, metadata, shape, offsets, skip };
  enum class Field { dtype = 0, shape = 1, offsets = 2, other = 3 };

  template <class... Parts>
  [[noreturn]] void fail(Parts&&... parts) const {
    raise<FormatError>(where_, std::forward<Parts>(parts)...);
  }
  [[noreturn]] void duplicate(const std::string& k) const { fail("header has the duplicate key ", quote_name(k)); }

  Ctx top() const { return stack_.empty() ? Ctx::none : stack_.back(); }
  std::string tensor() const { return "tensor " + quote_name(cur_.name); }
  static const char* field_name(Field f) {
    return f == Field::dtype ? "dtype" : f == Field::shape ? "shape" : "data_offsets";
  }

  void open(const char* kind) const {
    if (stack_.size() >= static_cast<std::size_t>(max_depth)) {
      fail("header nests deeper than ", max_depth, " levels (at an ", kind, ")");
    }
  }

  /// A value of JSON type `type` arrived where the current context does not allow it.
  bool wrong_type(const char* type) const {
    switch (top()) {
      case Ctx::none:
        fail("header is a JSON ", type, ", expected an object");
      case Ctx::root:
        if (key_ == "__metadata__") fail("__metadata__ is a JSON ", type, ", expected an object");
        fail("tensor ", quote_name(key_), ": entry is a JSON ", type, ", expected an object");
      case Ctx::metadata:
        fail("__metadata__[", quote_name(key_), "] is a JSON ", type, ", expected a string");
      case Ctx::entry:
        if (field_ == Field::dtype) fail(tensor(), ": 'dtype' is a JSON ", type, ", expected a string");
        if (field_ == Field::shape) fail(tensor(), ": 'shape' is a JSON ", type, ", expected an array");
        fail(tensor(), ": 'data_offsets' is a JSON ", type, ", expected an array [begin, end]");
      case Ctx::shape:
        fail(tensor(), ": shape[", cur_.shape.size(), "] is a JSON ", type, ", expected a non-negative integer");
      case Ctx::offsets:
        fail(tensor(), ": data_offsets[", offsets_n_, "] is a JSON ", type, ", expected a non-negative integer");
      default:
        return true;  // skipped
    }
  }

  bool scalar(const char* type) {
    if (top() == Ctx::entry && field_ == Field::other) return true;  // unknown field: ignored
    return wrong_type(type);
  }

  /// A JSON number `v`; `problem` says why it is not a non-negative integer, or is null.
  bool number(std::uint64_t v, const char* problem) {
    switch (top()) {
      case Ctx::shape:
        if (problem) fail(tensor(), ": shape[", cur_.shape.size(), "] ", problem);
        if (cur_.shape.size() == max_rank) fail(tensor(), ": shape has more than ", max_rank, " dimensions");
        cur_.shape.push_back(v);
        return true;
      case Ctx::offsets:
        if (problem) fail(tensor(), ": data_offsets[", offsets_n_, "] ", problem);
        if (offsets_n_ >= 2)
          fail(tensor(), ": 'data_offsets' has more than 2 elements, expected an array [begin, end]");
        (offsets_n_ == 0 ? cur_.begin : cur_.end) = v;
        ++offsets_n_;
        return true;
      default:
        return scalar("number");
    }
  }

  void finish_entry() {
    for (Field f : {Field::dtype, Field::shape, Field::offsets}) {
      if (!seen_[static_cast<std::size_t>(f)]) fail(tensor(), " has no field '", field_name(f), "'");
    }
    std::uint64_t count = 1, bytes = 0;
    for (std::uint64_t d : cur_.shape) {
      if (!checked_mul(count, d, count)) {
        fail(tensor(), ": the element count of shape ", shape_string(cur_.shape), " overflows 64 bits");
      }
    }
    if (!checked_mul(count, cur_.width, bytes)) {
      fail(tensor(), ": the byte size of shape ", shape_string(cur_.shape), " in ", cur_.dtype, " overflows 64 bits");
    }
    if (cur_.begin > cur_.end) fail(tensor(), ": data_offsets [", cur_.begin, ", ", cur_.end, "] has begin > end");
    if (cur_.end > data_size_) {
      fail(tensor(), ": data_offsets end ", cur_.end, " is past the end of the data buffer (", data_size_, " bytes)");
    }
    if (cur_.end - cur_.begin != bytes) {
      fail(tensor(), ": shape ", shape_string(cur_.shape), " of ", cur_.dtype, " needs ", bytes,
           " bytes but data_offsets [", cur_.begin, ", ", cur_.end, "] span ", cur_.end - cur_.begin);
    }
    h_.entries.push_back(std::move(cur_));
    cur_ = Entry{};
  }

  const char* where_;
  std::uint64_t data_size_;
  Header h_;
  std::vector<Ctx> stack_;                            // open containers, at most max_depth
  std::string key_;                                   // last key of the innermost root/metadata object
  Entry cur_;                                         // the tensor entry being read
  Field field_ = Field::other;                        // the field of cur_ whose value comes next
  std::array<bool, 3> seen_ = {false, false, false};  // dtype, shape, data_offsets seen in cur_
  std::size_t offsets_n_ = 0;                         // numbers read into data_offsets so far
  bool metadata_seen_ = false;
};

/// Parses and validates the JSON header; `data_size` is the length of the data buffer after it.
inline Header parse_header(const char* where, const char* text, std::size_t n, std::uint64_t data_size) {
  HeaderParser parser(where, data_size);
  try {
    if (!nlohmann::json::sax_parse(text, text + n, &parser)) raise<FormatError>(where, "header is not valid JSON");
  } catch (const nlohmann::json::exception& e) {  // defensive: errors arrive through parse_error
    raise<FormatError>(where, "header is not valid JSON: ", e.what());
  }
  Header h = parser.finish();

  // Byte ranges must not overlap (empty ranges overlap nothing). Gaps and trailing bytes are allowed.
  std::vector<const Entry*> by_offset;
  for (const Entry& e : h.entries) {
    if (e.end > e.begin) by_offset.push_back(&e);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  const Entry* reach = nullptr;  // the range with the largest end so far
  for (const Entry* e : by_offset) {
    if (reach && e->begin < reach->end) {
      raise<FormatError>(where, "tensors ", quote_name(reach->name), " [", reach->begin, ", ", reach->end, ") and ",
                         quote_name(e->name), " [", e->begin, ", ", e->end, ") overlap");
    }
    if (!reach || e->end > reach->end) reach = e;
  }
  return h;
}

/// Validates a whole checkpoint held in memory.
inline Header parse_buffer(const char* where, const std::uint8_t* data, std::size_t size) {
  if (data == nullptr && size != 0) raise<InvalidArgument>(where, "data is null but size is ", size);
  const std::uint64_t n = check_prefix(where, data, size);
  return parse_header(where, reinterpret_cast<const char*>(data) + 8, static_cast<std::size_t>(n), size - 8 - n);
}

/// An open input file and its size.
struct InFile {
  std::ifstream in;
  std::uint64_t size = 0;
};

inline void open_input(const char* where, const std::string& path, InFile& f) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(st)) raise<IoError>(where, "cannot open \"", path, "\": no such file");
  if (std::filesystem::is_directory(st)) raise<IoError>(where, "cannot read \"", path, "\": it is a directory");
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) raise<IoError>(where, "cannot determine the size of \"", path, "\": ", ec.message());
  f.size = static_cast<std::uint64_t>(size);
  f.in.open(path, std::ios::binary);
  if (!f.in) raise<IoError>(where, "cannot open \"", path, "\" for reading");
}

inline void read_exact(const char* where, const std::string& path, InFile& f, void* dst, std::uint64_t n) {
  if (n == 0) return;
  f.in.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
  if (static_cast<std::uint64_t>(f.in.gcount()) != n) {
    raise<IoError>(where, "reading \"", path, "\" failed after ", f.in.gcount(), " of ", n, " bytes");
  }
}

/// Reads a whole checkpoint file (one allocation: the file's size).
inline std::vector<std::uint8_t> read_file(const char* where, const std::string& path) {
  InFile f;
  open_input(where, path, f);
  if (f.size > std::numeric_limits<std::size_t>::max()) raise<IoError>(where, "\"", path, "\" is too large to read");
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(f.size));
  read_exact(where, path, f, bytes.data(), f.size);
  return bytes;
}

/// Reads and validates only the header of a checkpoint file.
inline Header read_file_header(const char* where, const std::string& path) {
  InFile f;
  open_input(where, path, f);
  std::uint8_t prefix[8] = {};
  if (f.size >= 8) read_exact(where, path, f, prefix, 8);
  const std::uint64_t n = check_prefix(where, prefix, f.size);
  std::vector<char> text(static_cast<std::size_t>(n));
  read_exact(where, path, f, text.data(), n);
  return parse_header(where, text.data(), text.size(), f.size - 8 - n);
}

inline std::string shape_of(Index rows, Index cols) {
  return "(" + std::to_string(rows) + ", " + std::to_string(cols) + ")";
}

/// Whether a file shape fits a model tensor (rows, cols) under the documented rule.
inline bool shape_fits(const std::vector<std::uint64_t>& s, Index rows, Index cols) {
  const auto r = static_cast<std::uint64_t>(rows), c = static_cast<std::uint64_t>(cols);
  switch (s.size()) {
    case 0:
      return r == 1 && c == 1;
    case 1:
      return s[0] == r && c == 1;
    case 2:
      return s[0] == r && s[1] == c;
    default:
      return false;
  }
}

/// The value of a BF16 or F16 bit pattern, exactly, as a float (infinity or NaN for those patterns).
inline float half_value(std::uint16_t h, bool bf16) {
  if (bf16) {
    const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
    float x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
  }
  const int exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  const float sign = (h & 0x8000) ? -1.0f : 1.0f;
  if (exponent == 0x1F) return mantissa ? std::numeric_limits<float>::quiet_NaN() : sign * std::numeric_limits<float>::infinity();
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -24);  // subnormal
  return sign * std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
}

/// The BF16 or F16 pattern nearest to x (ties to even), or false when |x| is beyond the type's
/// range (rounds to infinity). Exact for any Scalar: the candidates around float(x) are compared
/// with x itself, so rounding x to float first does not round twice.
template <class Scalar>
bool half_bits(Scalar x, bool bf16, std::uint16_t& out) {
  const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const long double a = std::fabs(static_cast<long double>(x));
  const std::uint16_t inf = bf16 ? 0x7F80 : 0x7C00;
  // Round to nearest overflows from the largest finite value plus half its ulp (ties go to the
  // even neighbour, which there is infinity).
  const long double max = half_value(static_cast<std::uint16_t>(inf - 1), bf16);
  const long double ulp = max - half_value(static_cast<std::uint16_t>(inf - 2), bf16);
  if (!(a < max + ulp / 2)) return false;
  const float f = static_cast<float>(a);  // nearest float, finite (a is below the 16-bit maximum)
  // A first guess from the float, by truncation; the answer is it or the next pattern up.
  std::uint16_t lo;
  if (bf16) {
    std::uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    lo = static_cast<std::uint16_t>(bits >> 16);
  } else {
    lo = 0;
    for (int step = 15; step >= 0; --step) {  // the largest magnitude pattern whose value is <= f
      const auto next = static_cast<std::uint16_t>(lo | (1u << step));
      if (next < 0x7C00 && half_value(next, false) <= f) lo = next;
    }
  }
  std::uint16_t best = lo;
  long double best_d = std::fabs(static_cast<long double>(half_value(lo, bf16)) - a);
  for (std::uint16_t c : {static_cast<std::uint16_t>(lo > 0 ? lo - 1 : 0), static_cast<std::uint16_t>(lo + 1)}) {
    if (c >= inf) continue;
    const long double d = std::fabs(static_cast<long double>(half_value(c, bf16)) - a);
    if (d < best_d || (d == best_d && (c & 1) == 0 && (best & 1) != 0)) {
      best = c;
      best_d = d;
    }
  }
  out = static_cast<std::uint16_t>(best | sign);
  return true;
}

/// Decodes an F32/F64/BF16/F16 entry (already checked against the model's shape) into `m` (rows, cols).
template <class Scalar>
void decode(const char* where, const Entry& e, const std::uint8_t* blob, Matrix<Scalar>& m) {
  const std::uint8_t* p = blob + e.begin;
  for (Index i = 0; i < m.rows(); ++i) {
    for (Index j = 0; j < m.cols(); ++j) {
      if (e.width == 2) {
        const auto bits = static_cast<std::uint16_t>(p[0] | (p[1] << 8));
        const float x = half_value(bits, e.dtype == "BF16");
        if (!std::isfinite(x)) {
          raise<NumericError>(where, "tensor ", quote_name(e.name), " holds a non-finite value (", x, ") at (", i, ", ",
                              j, ")");
        }
        m(i, j) = static_cast<Scalar>(x);
      } else if (e.width == 4) {
        const std::uint32_t bits = get_le32(p);
        float x;
        std::memcpy(&x, &bits, sizeof x);
        if (!std::isfinite(x)) {
          raise<NumericError>(where, "tensor ", quote_name(e.name), " holds a non-finite value (", x, ") at (", i, ", ",
                              j, ")");
        }
        m(i, j) = static_cast<Scalar>(x);
      } else {
        const std::uint64_t bits = get_le64(p);
        double x;
        std::memcpy(&x, &bits, sizeof x);
        if (!std::isfinite(x)) {
          raise<NumericError>(where, "tensor ", quote_name(e.name), " holds a non-finite value (", x, ") at (", i, ", ",
                              j, ")");
        }
        if constexpr (std::numeric_limits<Scalar>::max() < std::numeric_limits<double>::max()) {
          if (std::fabs(x) > static_cast<double>(std::numeric_limits<Scalar>::max())) {
            raise<NumericError>(where, "tensor ", quote_name(e.name), ": F64 value ", x, " at (", i, ", ", j,
                                ") overflows the model's scalar type");
          }
        }
        m(i, j) = static_cast<Scalar>(x);
      }
      p += e.width;
    }
  }
}

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
