// SPDX-License-Identifier: Apache-2.0
//
// A seeded matrix of independent N(0, sd²) entries, the input and noise of most tests.
#pragma once

#include <titans/common.hpp>
#include <titans/detail/random.hpp>

#include <cstdint>

namespace titans_test {

template <class S>
titans::Matrix<S> random_matrix(titans::Index rows, titans::Index cols, std::uint64_t seed, double sd = 1.0) {
  titans::detail::Rng rng(seed);
  titans::Matrix<S> m(rows, cols);
  rng.fill_normal(m, sd);
  return m;
}

}  // namespace titans_test
