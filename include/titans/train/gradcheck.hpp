// SPDX-License-Identifier: Apache-2.0
//
// \file train/gradcheck.hpp
// \brief A gradient checker for any module: one random projection of the output, central finite
// differences in double for every parameter tensor and the input, gradients pre-filled with junk
// to prove that backward accumulates (+=), failures named by tensor and index. A tensor whose
// gradient is below the absolute tolerance everywhere it was checked fails as "not exercised"
// (unless listed in GradCheckOptions::may_be_zero): the absolute tolerance, which forgives the
// finite differences' noise on near-zero entries, must not let a whole tensor pass unchecked.
//
//     auto result = titans::gradient_check(params, x,
//         [&](const P& p, const Matrix<double>& x) { /* return the output */ },
//         [&](const P& p, const Matrix<double>& x, const Matrix<double>& dy, P& grads, Matrix<double>& dx) {
//           /* accumulate dL/dp into grads and dL/dx into dx, for L = <dy, output> */ });
//     EXPECT_TRUE(result.ok) << result.report();
#pragma once

#include "../common.hpp"
#include "../detail/random.hpp"
#include "../parameters.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

namespace titans {

/// \brief Settings of gradient_check.
struct GradCheckOptions {
  double step = 1e-6;          ///< central-difference step h
  double rtol = 1e-6;          ///< allowed |analytic − numeric| / max(|analytic|, |numeric|, scale)
  double atol = 1e-9;          ///< allowed absolute difference (for entries whose gradient is ~0)
  /// A tensor is exercised when some checked entry's numeric gradient exceeds exercised·atol; one
  /// that is not fails the check (its entries all passed on atol alone, so nothing was verified).
  double exercised = 100;
  std::vector<std::string> may_be_zero;  ///< tensors whose gradient may be zero (entries still compared)
  Index max_entries = -1;      ///< entries checked per tensor (chosen at random); −1 = all
  std::uint64_t seed = 1234;   ///< seeds the projection and the choice of entries
  double junk = 0.375;         ///< value the gradients are pre-filled with
  bool check_input = true;     ///< also check dL/dx
  Index max_failures = 20;     ///< failures kept in the result
};

/// \brief One entry where analytic and numeric gradients disagree.
struct GradCheckFailure {
  std::string tensor;  ///< parameter name, or "input"
  Index row = 0, col = 0;  ///< −1, −1: the whole tensor (not exercised)
  double analytic = 0, numeric = 0;
};

/// \brief Outcome of gradient_check.
struct GradCheckResult {
  bool ok = true;
  Index checked = 0;             ///< entries compared
  Index near_zero = 0;           ///< entries that passed on atol alone (their relative error was above rtol)
  double max_error = 0;          ///< worst |analytic − numeric| / max(|analytic|, |numeric|) seen
  std::string worst;             ///< "tensor(row, col)" of the worst error
  std::vector<GradCheckFailure> failures;

  /// A readable summary: the worst error and every kept failure.
  std::string report() const {
    std::ostringstream os;
    os << (ok ? "gradient check passed" : "gradient check FAILED") << ": " << checked
       << " entries (" << near_zero << " passed on atol alone), worst normalised error " << max_error << " at "
       << worst << "\n";
    for (const auto& f : failures) {
      if (f.row < 0) {
        os << "  " << f.tensor << ": not exercised (largest |numeric| gradient " << f.numeric
           << ", largest |analytic| " << f.analytic << ", at most exercised * atol)\n";
      } else {
        os << "  " << f.tensor << "(" << f.row << ", " << f.col << "): analytic " << f.analytic << ", numeric "
           << f.numeric << "\n";
      }
    }
    return os.str();
  }
};

/// \brief Checks a module's backward against central differences of L = ⟨R, forward(p, x)⟩ for a
/// random R. `forward(p, x)` returns the output (any shape); `backward(p, x, R, grads, dx)` must
/// *add* dL/dp into `grads` (same type as p) and dL/dx into `dx`. Parameters and input are
/// perturbed in place and restored.
template <class P, class Forward, class Backward>
GradCheckResult gradient_check(P& params, Matrix<double>& x, Forward&& forward, Backward&& backward,
                               const GradCheckOptions& opt = {}) {
  static_assert(std::is_same_v<typename P::scalar_type, double>, "titans::gradient_check works in double");
  constexpr const char* where = "titans::gradient_check";
  if (!(opt.step > 0)) detail::raise<InvalidArgument>(where, "options.step is ", opt.step, ", expected > 0");
  if (!(opt.atol >= 0)) detail::raise<InvalidArgument>(where, "options.atol is ", opt.atol, ", expected >= 0");
  if (!(opt.exercised >= 0))
    detail::raise<InvalidArgument>(where, "options.exercised is ", opt.exercised, ", expected >= 0");
  detail::Rng rng(opt.seed);

  const Matrix<double> y0 = forward(static_cast<const P&>(params), static_cast<const Matrix<double>&>(x));
  Matrix<double> proj(y0.rows(), y0.cols());
  rng.fill_normal(proj, 1.0);
  auto loss = [&]() {
    const Matrix<double> y = forward(static_cast<const P&>(params), static_cast<const Matrix<double>&>(x));
    if (y.rows() != proj.rows() || y.cols() != proj.cols())
      detail::raise<ShapeError>(where, "forward changed its output shape between calls");
    return (y.array() * proj.array()).sum();
  };

  P grads = params;
  grads.for_each([&](const std::string&, Matrix<double>& t) { t.setConstant(opt.junk); });
  Matrix<double> dx = Matrix<double>::Constant(x.rows(), x.cols(), opt.junk);
  backward(static_cast<const P&>(params), static_cast<const Matrix<double>&>(x), static_cast<const Matrix<double>&>(proj),
           grads, dx);

  GradCheckResult result;
  auto check_tensor = [&](const std::string& name, Matrix<double>& t, const Matrix<double>& g) {
    if (g.rows() != t.rows() || g.cols() != t.cols())
      detail::raise<ShapeError>(where, "gradient of '", name, "' has shape (", g.rows(), ", ", g.cols(),
                                "), expected (", t.rows(), ", ", t.cols(), ")");
    std::vector<Index> entries(static_cast<std::size_t>(t.size()));
    for (Index i = 0; i < t.size(); ++i) entries[static_cast<std::size_t>(i)] = i;
    if (opt.max_entries >= 0 && opt.max_entries < t.size()) {
      for (Index i = 0; i < opt.max_entries; ++i) {  // partial Fisher-Yates
        const Index j = i + static_cast<Index>(rng.below(static_cast<std::uint64_t>(t.size() - i)));
        std::swap(entries[static_cast<std::size_t>(i)], entries[static_cast<std::size_t>(j)]);
      }
      entries.resize(static_cast<std::size_t>(opt.max_entries));
    }
    double largest_numeric = 0, largest_analytic = 0;
    for (Index e : entries) {
      double& v = t.data()[e];
      const double saved = v;
      v = saved + opt.step;
      const double up = loss();
      v = saved - opt.step;
      const double down = loss();
      v = saved;
      const double numeric = (up - down) / (2 * opt.step);
      const double analytic = g.data()[e] - opt.junk;
      const double diff = std::abs(analytic - numeric);
      const double scale = std::max({std::abs(analytic), std::abs(numeric), 1e-300});
      const double err = diff / scale;
      ++result.checked;
      largest_numeric = std::max(largest_numeric, std::abs(numeric));
      largest_analytic = std::max(largest_analytic, std::abs(analytic));
      const Index row = e % t.rows(), col = e / t.rows();
      if (err >= result.max_error) {
        result.max_error = err;
        result.worst = name + "(" + std::to_string(row) + ", " + std::to_string(col) + ")";
      }
      if (err > opt.rtol && diff > opt.atol) {
        result.ok = false;
        if (static_cast<Index>(result.failures.size()) < opt.max_failures)
          result.failures.push_back({name, row, col, analytic, numeric});
      } else if (err > opt.rtol) {
        ++result.near_zero;
      }
    }
    const bool zero_allowed =
        std::find(opt.may_be_zero.begin(), opt.may_be_zero.end(), name) != opt.may_be_zero.end();
    if (!entries.empty() && !zero_allowed && !(largest_numeric > opt.exercised * opt.atol)) {
      result.ok = false;
      if (static_cast<Index>(result.failures.size()) < opt.max_failures)
        result.failures.push_back({name, -1, -1, largest_analytic, largest_numeric});
    }
  };

  std::vector<const Matrix<double>*> grad_tensors;
  grads.for_each([&](const std::string&, const Matrix<double>& g) { grad_tensors.push_back(&g); });
  std::size_t i = 0;
  params.for_each([&](const std::string& name, Matrix<double>& t) { check_tensor(name, t, *grad_tensors[i++]); });
  if (opt.check_input) check_tensor("input", x, dx);
  return result;
}

}  // namespace titans
