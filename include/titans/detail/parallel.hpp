// SPDX-License-Identifier: Apache-2.0
//
// \file detail/parallel.hpp
// \brief Per-head parallel loops (OpenMP when enabled) that carry exceptions out of the region.
#pragma once

#include "../common.hpp"

#include <exception>
#include <vector>

namespace titans {
namespace detail {

/// Runs fn(h) for h = 0..n−1, in parallel under OpenMP; an exception thrown by any fn(h) is
/// caught inside the parallel region and the first one is rethrown after it.
template <class Fn>
void for_each_head(Index n, Fn&& fn) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n));
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n > 1)
#endif
  for (Index h = 0; h < n; ++h) {
    try {
      fn(h);
    } catch (...) {
      errors[static_cast<std::size_t>(h)] = std::current_exception();
    }
  }
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace detail
}  // namespace titans
