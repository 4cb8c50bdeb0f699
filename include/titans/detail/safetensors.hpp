// SPDX-License-Identifier: Apache-2.0
//
// \file detail/safetensors.hpp
// \brief The safetensors format itself, apart from any parameter set: dtypes, the 8-byte prefix,
// the header's event-by-event JSON parser, reading files, the shape rule and the decoding of one
// tensor's bytes into a matrix. checkpoint.hpp (saving and loading parameter sets) is built on
// it; its file comment documents the format, the shape and dtype rules and how untrusted input is
// treated, which are this header's.
#pragma once

#include "../common.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

namespace titans {

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

}  // namespace ckpt
}  // namespace detail
}  // namespace titans
