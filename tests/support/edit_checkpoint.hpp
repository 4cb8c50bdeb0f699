// SPDX-License-Identifier: Apache-2.0
//
// A safetensors file's tensors and metadata, decoded to double for a test to edit and write back
// (hostile and corrupt files built from real ones).
#pragma once

#include <titans/checkpoint.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace titans_test {

struct EditedCheckpoint {
  using scalar_type = double;
  std::map<std::string, titans::Matrix<double>> tensors;
  std::map<std::string, std::string> metadata;

  template <class F>
  void for_each(F&& f) {
    for (auto& [n, t] : tensors) f(n, t);
  }
  template <class F>
  void for_each(F&& f) const {
    for (const auto& [n, t] : tensors) f(n, t);
  }
  /// Written back (F64).
  std::vector<std::uint8_t> bytes() const { return titans::save_checkpoint_to_memory(*this, metadata); }
};

inline EditedCheckpoint edit_checkpoint(const std::vector<std::uint8_t>& bytes) {
  EditedCheckpoint e;
  e.metadata = titans::read_checkpoint_metadata_from_memory(bytes.data(), bytes.size());
  for (const auto& info : titans::list_checkpoint_from_memory(bytes.data(), bytes.size())) {
    const auto r = static_cast<titans::Index>(info.shape.at(0)), c = static_cast<titans::Index>(info.shape.at(1));
    e.tensors[info.name] = titans::Matrix<double>::Zero(r, c);
  }
  titans::load_checkpoint_from_memory(bytes, e);
  return e;
}

}  // namespace titans_test
