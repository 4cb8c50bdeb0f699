// SPDX-License-Identifier: Apache-2.0
//
// \file detail/metadata.hpp
// \brief Config <-> checkpoint metadata strings: exact number formatting and a reader that
// throws FormatError naming the key.
#pragma once

#include "../common.hpp"

#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace titans {
namespace detail {

/// A double with enough digits to read back the same value.
inline std::string format_real(double v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}

inline const char* format_bool(bool b) { return b ? "true" : "false"; }

/// Typed reads of `prefix + key` from a metadata map; FormatError names the key and the value.
class MetadataReader {
 public:
  MetadataReader(const char* where, const std::map<std::string, std::string>& m, std::string prefix = "")
      : where_(where), m_(m), prefix_(std::move(prefix)) {}

  bool has(const std::string& key) const { return m_.count(prefix_ + key) > 0; }

  const std::string& get(const std::string& key) const {
    const auto it = m_.find(prefix_ + key);
    if (it == m_.end()) raise<FormatError>(where_, "metadata has no '", prefix_, key, "'");
    return it->second;
  }

  Index integer(const std::string& key) const {
    const std::string& s = get(key);
    std::size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != s.size()) raise<FormatError>(where_, "'", prefix_, key, "' is '", s, "', not an integer");
    return static_cast<Index>(v);
  }

  double real(const std::string& key) const {
    const std::string& s = get(key);
    std::size_t used = 0;
    double v = 0;
    try {
      v = std::stod(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != s.size()) raise<FormatError>(where_, "'", prefix_, key, "' is '", s, "', not a number");
    return v;
  }

  bool boolean(const std::string& key) const {
    const std::string& s = get(key);
    if (s != "true" && s != "false")
      raise<FormatError>(where_, "'", prefix_, key, "' is '", s, "', not a bool (true or false)");
    return s == "true";
  }

 private:
  const char* where_;
  const std::map<std::string, std::string>& m_;
  std::string prefix_;
};

// ---------------------------------------------------------------------------------------------
// Config fields listed once. Each config has a `metadata_fields(c, v)` that calls, per field,
//   v("neural_memory.dim", c.dim)                 a required key, or
//   v("neural_memory.eta_max", c.eta_max, 1.0)    a key with the default a file without it means.
// MetadataWriter turns that list into strings (to_metadata), MetadataFieldReader back into the
// config (…_from_metadata), naming every missing required key at once. Values are written by
// metadata_string(value) and read by parse_metadata(text, value), which returns "" or what was
// expected; the enum overloads sit beside their enums (found by argument-dependent lookup).
// ---------------------------------------------------------------------------------------------

inline std::string metadata_string(Index v) { return std::to_string(v); }
inline std::string metadata_string(double v) { return format_real(v); }
inline std::string metadata_string(bool v) { return format_bool(v); }

inline std::string parse_metadata(const std::string& s, Index& out) {
  std::size_t used = 0;
  try {
    out = static_cast<Index>(std::stoll(s, &used));
  } catch (const std::exception&) {
    used = 0;
  }
  return used != 0 && used == s.size() ? "" : "an integer";
}

inline std::string parse_metadata(const std::string& s, double& out) {
  std::size_t used = 0;
  try {
    out = std::stod(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  return used != 0 && used == s.size() ? "" : "a number";
}

inline std::string parse_metadata(const std::string& s, bool& out) {
  if (s != "true" && s != "false") return "a bool (true or false)";
  out = s == "true";
  return "";
}

/// Writes each field as "key" → string.
class MetadataWriter {
 public:
  explicit MetadataWriter(std::map<std::string, std::string>& out) : out_(out) {}
  template <class T>
  void operator()(const char* key, const T& value) {
    out_[key] = metadata_string(value);
  }
  template <class T, class D>
  void operator()(const char* key, const T& value, const D& /*default*/) {
    out_[key] = metadata_string(value);
  }

 private:
  std::map<std::string, std::string>& out_;
};

/// Reads each field; a malformed value throws FormatError at once, naming key and value; missing
/// required keys are collected and finish() names them all.
class MetadataFieldReader {
 public:
  MetadataFieldReader(const char* where, const std::map<std::string, std::string>& m) : where_(where), m_(m) {}

  template <class T>
  void operator()(const char* key, T& dst) {
    const auto it = m_.find(key);
    if (it == m_.end()) {
      missing_.emplace_back(key);
      return;
    }
    parse(key, it->second, dst);
  }
  template <class T, class D>
  void operator()(const char* key, T& dst, const D& fallback) {
    const auto it = m_.find(key);
    if (it == m_.end()) {
      dst = static_cast<T>(fallback);
      return;
    }
    parse(key, it->second, dst);
  }

  /// Throws FormatError listing every missing required key ("metadata has no 'a', 'b'").
  void finish() const {
    if (missing_.empty()) return;
    std::string list;
    for (std::size_t i = 0; i < missing_.size(); ++i) list += (i ? ", '" : "'") + missing_[i] + "'";
    raise<FormatError>(where_, "metadata has no ", list,
                       missing_.size() > 1 ? " (" + std::to_string(missing_.size()) + " required keys missing)" : "");
  }

 private:
  template <class T>
  void parse(const char* key, const std::string& text, T& dst) const {
    const std::string expected = parse_metadata(text, dst);
    if (!expected.empty()) raise<FormatError>(where_, "'", key, "' is '", text, "', not ", expected);
  }

  const char* where_;
  const std::map<std::string, std::string>& m_;
  std::vector<std::string> missing_;
};

}  // namespace detail
}  // namespace titans
