// SPDX-License-Identifier: Apache-2.0
//
// The memory forms every kernel test runs (docs/MATH.md §1, §8): the plain MLP, the residual form,
// the LayerNorm read-out with and without the residual, and the surprise clamp on its own and with
// the normalised residual memory.
#pragma once

#include "memory_problem.hpp"
#include "reference_memory.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace titans_test {

struct MemoryForm {
  const char* name;
  bool residual, output_norm;
  bool clamp;  // MemoryConfig::surprise_clamp on (set by calibrate_clamp)
};

inline constexpr MemoryForm kMemoryForms[] = {
    {"plain", false, false, false},        {"residual", true, false, false}, {"norm", false, true, false},
    {"residual_norm", true, true, false}, {"clamp", false, false, true},   {"residual_norm_clamp", true, true, true},
};
inline constexpr int kMemoryFormCount = static_cast<int>(sizeof(kMemoryForms) / sizeof(kMemoryForms[0]));

/// Sets cfg's form. The norm's ε is 1e-2 here: the extreme gates (α = 1) wipe a memory to zero
/// weights, where LN(z ≈ 0) amplifies rounding by up to 1/√ε, which would hide real differences.
/// A clamp form gets c = 1 until calibrate_clamp sets it from the data.
inline void apply_form(titans::MemoryConfig& cfg, int form) {
  const MemoryForm& f = kMemoryForms[form];
  cfg.residual = f.residual;
  cfg.output_norm = f.output_norm;
  if (f.output_norm) cfg.norm_eps = 1e-2;
  cfg.surprise_clamp = f.clamp ? 1.0 : 0.0;
}

/// With the clamp on, sets c near the median inner-gradient norm of the problem's tokens at
/// weights w (by the reference), so that about half the tokens are clamped and half are not.
inline void calibrate_clamp(titans::MemoryConfig& cfg, const std::vector<titans::Matrix<double>>& w,
                            const MemoryProblem& p) {
  if (!(cfg.surprise_clamp > 0) || p.tokens() == 0) return;
  std::vector<double> norms;
  for (titans::Index t = 0; t < p.tokens(); ++t) {
    double n2 = 0;
    for (const auto& u : ref_grad<double>(cfg, w, p.k.col(t), p.v.col(t), p.gain)) n2 += u.squaredNorm();
    norms.push_back(std::sqrt(n2));
  }
  // Midway between two neighbouring norms: no token sits on the clamp's kink (‖u‖ = c), where the
  // derivative jumps and forward mode and backward may take different sides.
  std::sort(norms.begin(), norms.end());
  const std::size_t m = norms.size() / 2;
  cfg.surprise_clamp = m > 0 ? 0.5 * (norms[m - 1] + norms[m]) : 0.5 * norms[0];
}

inline std::string form_name(int form) { return kMemoryForms[form].name; }

}  // namespace titans_test
