// SPDX-License-Identifier: Apache-2.0
//
// Random inputs for the memory-kernel tests: unit-norm keys and queries (as the layer makes
// them), values of order one, gates in range, optionally many at the extremes.
#pragma once

#include <titans/detail/random.hpp>
#include <titans/memory/kernel.hpp>

namespace titans_test {

// The kernel's inputs (k, v, q (d, T); alpha, eta, theta (T); gain (d) for output_norm).
using MemoryProblem = titans::KernelInputs<double>;

// gate_mode 1 puts many gates at the extremes: α = 0 and 1, η = 0 and 1, θ = 0. `floor` lifts
// α by floor and θ by floor / 2 (0 keeps gates that may come arbitrarily close to 0). The gain
// γ is drawn around 1 (used only by memories with output_norm).
inline MemoryProblem make_memory_problem(titans::Index d, titans::Index T, std::uint64_t seed, int gate_mode = 0,
                                         double floor = 0.0) {
  titans::detail::Rng rng(seed);
  MemoryProblem p;
  p.k.resize(d, T);
  p.v.resize(d, T);
  p.q.resize(d, T);
  rng.fill_normal(p.k, 1.0);
  rng.fill_normal(p.v, 1.0);
  rng.fill_normal(p.q, 1.0);
  p.k.colwise().normalize();
  p.q.colwise().normalize();
  p.alpha.resize(T);
  p.eta.resize(T);
  p.theta.resize(T);
  for (titans::Index t = 0; t < T; ++t) {
    p.alpha(t) = floor + 0.2 * rng.uniform();
    p.eta(t) = 0.3 + 0.6 * rng.uniform();
    p.theta(t) = floor / 2 + 0.1 * rng.uniform();
    if (gate_mode == 1) {
      const std::uint64_t r = rng.below(6);
      p.alpha(t) = r == 0 ? 1.0 : (r < 3 ? 0.0 : p.alpha(t));
      p.eta(t) = r == 1 ? 0.0 : (r == 2 || r == 3 ? 1.0 : p.eta(t));
      p.theta(t) = r == 4 ? 0.0 : 0.5 * p.theta(t);  // runs of η = 1, α = 0 must not diverge
    }
  }
  p.gain.resize(d);
  for (titans::Index i = 0; i < d; ++i) p.gain(i) = 0.5 + rng.uniform();
  return p;
}

}  // namespace titans_test
