// SPDX-License-Identifier: Apache-2.0
//
// \file bench_bias.hpp
// \brief The attentional bias (docs/MATH.md §11) a benchmark argument names, so that every
// program numbers them alike: 0 l2, 1 huber, 2 lp, 3 huber_radial.
#pragma once

#include <titans/memory/model.hpp>

#include <stdexcept>
#include <string>

namespace titans_bench {

inline titans::AttentionalBias bias_from_arg(long arg) {
  switch (arg) {
    case 0: return titans::AttentionalBias::l2;
    case 1: return titans::AttentionalBias::huber;
    case 2: return titans::AttentionalBias::lp;
    case 3: return titans::AttentionalBias::huber_radial;
    default: break;
  }
  throw std::invalid_argument("titans_bench::bias_from_arg: bias argument is " + std::to_string(arg) +
                              ", expected 0 (l2), 1 (huber), 2 (lp) or 3 (huber_radial)");
}

}  // namespace titans_bench
