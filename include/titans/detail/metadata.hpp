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

}  // namespace detail
}  // namespace titans
