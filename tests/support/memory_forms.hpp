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
    const double thr = p.threshold.size() > 0 ? p.threshold(t) : 1.0;
    for (const auto& u : ref_grad<double>(cfg, w, p.k.col(t), p.v.col(t), p.gain, thr)) n2 += u.squaredNorm();
    norms.push_back(std::sqrt(n2));
  }
  // Midway between two neighbouring norms: no token sits on the clamp's kink (‖u‖ = c), where the
  // derivative jumps and forward mode and backward may take different sides.
  std::sort(norms.begin(), norms.end());
  const std::size_t m = norms.size() / 2;
  cfg.surprise_clamp = m > 0 ? 0.5 * (norms[m - 1] + norms[m]) : 0.5 * norms[0];
}

/// With the huber bias, sets the problem's thresholds δ_t from its residuals r_t = M(k_t) − v_t at
/// weights w (by the reference): alternately well below ‖r_t‖ (0.3–0.7 of it: the ℓ1 branch)
/// and well above it (1.5–3×: the quadratic branch), so both branches run and no token sits on
/// the kink ‖r‖ = δ. Empty thresholds for the other biases.
inline void calibrate_threshold(const titans::MemoryConfig& cfg, const std::vector<titans::Matrix<double>>& w,
                                MemoryProblem& p, std::uint64_t seed = 3) {
  p.threshold.resize(0);
  if (!titans::uses_threshold(cfg.bias)) return;
  titans::detail::Rng rng(seed);
  p.threshold.resize(p.tokens());
  for (titans::Index t = 0; t < p.tokens(); ++t) {
    const double r = (ref_apply<double>(cfg, w, p.k.col(t), p.gain) - p.v.col(t)).norm();
    const double u = rng.uniform();
    p.threshold(t) = std::max(1e-3, t % 2 == 0 ? (0.3 + 0.4 * u) * r : (1.5 + 1.5 * u) * r);
  }
}

/// Scales the problem's steps for cfg's bias: lp's step grows as |r|^{p−1} (superlinearly for
/// p > 2), and at the steps of make_memory_problem a deep memory written token by token amplifies
/// rounding about 2× per token (measured: 4e-16 at token 0, 3e-10 at token 28; L = 3, b = 1,
/// residual_norm) or diverges (residual form, no norm), which would hide real differences.
/// A quarter of the step keeps it at rounding. The other biases' steps are unchanged.
inline void scale_steps_for_bias(const titans::MemoryConfig& cfg, MemoryProblem& p) {
  if (cfg.bias == titans::AttentionalBias::lp) p.theta *= 0.25;
}

/// Sets cfg's attentional bias (docs/MATH.md §11); lp with p = 3 (the paper's) and ε = 1e-6.
inline void apply_bias(titans::MemoryConfig& cfg, titans::AttentionalBias bias) {
  cfg.bias = bias;
  cfg.bias_p = 3;
  cfg.bias_eps = 1e-6;
}

inline std::string form_name(int form) { return kMemoryForms[form].name; }

}  // namespace titans_test
