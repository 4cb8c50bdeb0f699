// SPDX-License-Identifier: Apache-2.0
//
// \file train/optimizer.hpp
// \brief Outer-loop training tools over any parameter set (parameters.hpp): the AdamW optimizer
// with its state enumerable by name, global gradient-norm clipping and a warmup + cosine learning
// rate schedule.
//
// These train the *outer* parameters (projections, gates, attention, persistent memory). The
// neural memory's test-time update (the inner loop, docs/MATH.md §2) is not an optimizer in this sense and
// lives with the memory itself.
//
// Typical loop:
//
//     titans::AdamW<MyParams> opt(params, titans::AdamWConfig{});
//     titans::CosineSchedule lr(3e-4, /*warmup_steps=*/100, /*total_steps=*/10000);
//     for (titans::Index s = 0; s < 10000; ++s) {
//       titans::set_zero(grads);
//       backward(params, batch(s), grads);          // accumulates into grads
//       titans::clip_grad_norm(grads, 1.0);
//       opt.step(params, grads, lr(opt.steps()));
//     }
#pragma once

#include "../common.hpp"
#include "../parameters.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace titans {

// =============================================================================================
// AdamW
// =============================================================================================

/// \brief Hyper-parameters of AdamW (Loshchilov & Hutter, decoupled weight decay).
///
/// Validated by the AdamW constructor (validate()): `lr` finite and >= 0, `beta1` and `beta2`
/// in [0, 1), `eps` finite and > 0, `weight_decay` finite and >= 0.
struct AdamWConfig {
  double lr = 1e-3;            ///< learning rate used by `AdamW::step(params, grads)`
  double beta1 = 0.9;          ///< decay of the first moment (mean of the gradient)
  double beta2 = 0.999;        ///< decay of the second moment (mean of the squared gradient)
  double eps = 1e-8;           ///< added to sqrt(v̂) in the denominator
  double weight_decay = 0.01;  ///< decoupled decay: p -= lr * weight_decay * p, before the Adam update
  /// Which tensors (by name) receive weight decay. Empty (the default) means: a tensor decays
  /// exactly when it is a matrix, `rows > 1 && cols > 1`; vectors (biases, gains, scalars) do
  /// not. Set it to `[](const std::string&) { return true; }` to decay everything.
  std::function<bool(const std::string&)> decay_filter;

  /// \brief Throws InvalidArgument naming the first invalid field and its value.
  void validate(const char* where = "titans::AdamWConfig") const {
    if (!(std::isfinite(lr) && lr >= 0))
      detail::raise<InvalidArgument>(where, "lr is ", lr, ", expected a finite value >= 0");
    if (!(beta1 >= 0 && beta1 < 1))
      detail::raise<InvalidArgument>(where, "beta1 is ", beta1, ", expected a value in [0, 1)");
    if (!(beta2 >= 0 && beta2 < 1))
      detail::raise<InvalidArgument>(where, "beta2 is ", beta2, ", expected a value in [0, 1)");
    if (!(std::isfinite(eps) && eps > 0))
      detail::raise<InvalidArgument>(where, "eps is ", eps, ", expected a finite value > 0");
    if (!(std::isfinite(weight_decay) && weight_decay >= 0))
      detail::raise<InvalidArgument>(where, "weight_decay is ", weight_decay, ", expected a finite value >= 0");
  }
};

/// \brief AdamW's state as a parameter set, so a checkpoint writer can save and load it like any
/// module's parameters.
///
/// `for_each` visits, in this order: `"step"`, a `(1, 1)` tensor holding the number of steps
/// taken; then, for each parameter `<name>` in the parameter set's order, `"m.<name>"` (first
/// moment) followed by `"v.<name>"` (second moment), each of the parameter's shape.
///
/// The step count is stored as a Scalar; with `float` it is exact up to 2^24 steps.
/// `names` (the parameter names) is structure, not state: it is not visited by `for_each`.
template <class Scalar>
struct AdamWState {
  static_assert(std::is_floating_point_v<Scalar>, "titans: Scalar must be a floating-point type");
  using scalar_type = Scalar;

  Matrix<Scalar> step = Matrix<Scalar>::Zero(1, 1);  ///< (1, 1): steps taken so far
  std::vector<std::string> names;                    ///< parameter names, in enumeration order
  std::vector<Matrix<Scalar>> m;                     ///< first moments, one per parameter
  std::vector<Matrix<Scalar>> v;                     ///< second moments, one per parameter

  TITANS_DEFINE_FOR_EACH()

 private:
  template <class Self, class F>
  static void for_each_impl(Self& self, F& f) {
    f(std::string("step"), self.step);
    const std::size_t n = std::min(self.names.size(), std::min(self.m.size(), self.v.size()));
    for (std::size_t i = 0; i < n; ++i) {
      f("m." + self.names[i], self.m[i]);
      f("v." + self.names[i], self.v[i]);
    }
  }
};

/// \brief AdamW over any parameter set type `P` (see parameters.hpp).
///
/// One step with gradient g, learning rate lr and step number t (1-based) does, per tensor:
///
///     p -= lr * weight_decay * p                (only for tensors the decay filter selects)
///     m  = beta1 * m + (1 - beta1) * g
///     v  = beta2 * v + (1 - beta2) * g²
///     p -= lr * m̂ / (sqrt(v̂) + eps),   m̂ = m / (1 - beta1^t),   v̂ = v / (1 - beta2^t)
///
/// The learning rate is an argument of step() so schedules stay outside (CosineSchedule).
/// Every check (learning rate, layouts of params, grads and state, finiteness of the gradients,
/// validity of a loaded state) runs before anything is modified, so a step that throws leaves
/// parameters and state untouched.
///
/// \tparam P a parameter set: `for_each` over `(const std::string&, Matrix<Scalar>&)`, and
///           `using scalar_type = Scalar;` with Scalar a floating-point type.
template <class P>
class AdamW {
 public:
  using params_type = P;
  using scalar_type = typename P::scalar_type;
  using state_type = AdamWState<scalar_type>;
  static_assert(std::is_floating_point_v<scalar_type>, "titans: Scalar must be a floating-point type");

  /// \brief Zero moments shaped like `params_for_shapes` (its values are not used).
  /// Throws InvalidArgument for an invalid config or duplicate tensor names.
  explicit AdamW(const P& params_for_shapes, AdamWConfig config = {}) : config_(std::move(config)) {
    constexpr const char* where = "titans::AdamW";
    config_.validate(where);
    check_unique_names(where, params_for_shapes);
    params_for_shapes.for_each([&](const std::string& name, const auto& t) {
      state_.names.push_back(name);
      state_.m.push_back(Matrix<scalar_type>::Zero(t.rows(), t.cols()));
      state_.v.push_back(Matrix<scalar_type>::Zero(t.rows(), t.cols()));
    });
    refresh_decay_mask();
  }

  /// \brief One AdamW step with the config's learning rate.
  void step(P& params, const P& grads) { step(params, grads, config_.lr); }

  /// \brief One AdamW step with learning rate `lr` (finite, >= 0).
  ///
  /// Throws InvalidArgument for a bad `lr` or an invalid loaded state, ShapeError naming the
  /// tensor if `params`, `grads` and the state disagree in names or shapes, NumericError naming
  /// the tensor if a gradient holds a NaN or an infinity.
  void step(P& params, const P& grads, double lr) {
    constexpr const char* where = "titans::AdamW::step";
    using S = scalar_type;
    if (!(std::isfinite(lr) && lr >= 0))
      detail::raise<InvalidArgument>(where, "lr is ", lr, ", expected a finite value >= 0");
    check_same_layout(where, params, grads);
    sync_state(where, params);
    check_state_layout(where, params);

    std::vector<const Matrix<S>*> g;
    grads.for_each([&](const std::string& name, const Matrix<S>& t) {
      const std::string what = "gradient '" + name + "'";
      detail::check_finite(where, what.c_str(), t);
      g.push_back(&t);
    });

    // ---- nothing above modifies anything; the update follows ----
    const Index t = steps_ + 1;
    const double b1 = config_.beta1, b2 = config_.beta2;
    const double bias1 = 1.0 - std::pow(b1, static_cast<double>(t));
    const double bias2 = 1.0 - std::pow(b2, static_cast<double>(t));
    const S decay = static_cast<S>(1.0 - lr * config_.weight_decay);
    const S step_size = static_cast<S>(lr / bias1);
    const S inv_bias2 = static_cast<S>(1.0 / bias2);
    const S eps = static_cast<S>(config_.eps);
    std::size_t i = 0;
    params.for_each([&](const std::string&, Matrix<S>& p) {
      const Matrix<S>& grad = *g[i];
      Matrix<S>& m = state_.m[i];
      Matrix<S>& v = state_.v[i];
      if (decay_[i] && config_.weight_decay > 0) p *= decay;
      m.array() = S(b1) * m.array() + S(1.0 - b1) * grad.array();
      v.array() = S(b2) * v.array() + S(1.0 - b2) * grad.array().square();
      p.array() -= step_size * m.array() / ((v.array() * inv_bias2).sqrt() + eps);
      ++i;
    });
    steps_ = t;
    state_.step(0, 0) = static_cast<S>(t);
  }

  /// \brief Number of steps taken (read from the state's "step" tensor after it was modified
  /// through the non-const state(); throws InvalidArgument if that value is not a
  /// non-negative integer).
  Index steps() const { return state_dirty_ ? read_step_tensor("titans::AdamW::steps") : steps_; }

  /// \brief The configuration (validated).
  const AdamWConfig& config() const { return config_; }

  /// \brief Replaces the weight-decay filter; an empty function restores the default
  /// (matrices decay, vectors do not).
  void set_decay_filter(std::function<bool(const std::string&)> filter) {
    config_.decay_filter = std::move(filter);
    refresh_decay_mask();
  }

  /// \brief Whether the tensor named `name` receives weight decay; throws InvalidArgument for a
  /// name the optimizer does not know.
  bool decays(const std::string& name) const {
    for (std::size_t i = 0; i < state_.names.size(); ++i)
      if (state_.names[i] == name) return decay_filter_says(i);
    detail::raise<InvalidArgument>("titans::AdamW::decays", "no parameter named '", name, "'");
  }

  /// \brief The optimizer state (step count and moments) as a parameter set.
  const state_type& state() const { return state_; }

  /// \brief Mutable access to the state, for loading a checkpoint into it. The state is
  /// validated again (step count a non-negative integer, moments finite, v >= 0, shapes
  /// matching the parameters) before the next step. Each call marks the state for one
  /// revalidation, so call it again for every load rather than keeping the reference across steps.
  state_type& state() {
    state_dirty_ = true;
    return state_;
  }

  /// \brief Zeroes the moments and the step count, keeping the shapes.
  void reset() {
    for (auto& t : state_.m) t.setZero();
    for (auto& t : state_.v) t.setZero();
    state_.step.setZero(1, 1);
    steps_ = 0;
    state_dirty_ = false;
  }

 private:
  bool decay_filter_says(std::size_t i) const {
    if (config_.decay_filter) return config_.decay_filter(state_.names[i]);
    return state_.m[i].rows() > 1 && state_.m[i].cols() > 1;
  }

  void refresh_decay_mask() {
    decay_.assign(state_.names.size(), false);
    for (std::size_t i = 0; i < decay_.size() && i < state_.m.size(); ++i) decay_[i] = decay_filter_says(i);
  }

  Index read_step_tensor(const char* where) const {
    detail::check_shape(where, "state tensor 'step'", state_.step, 1, 1);
    const double x = static_cast<double>(state_.step(0, 0));
    // 2^53: the largest range in which every integer is a double.
    if (!(std::isfinite(x) && x >= 0 && x <= 9007199254740992.0 && std::floor(x) == x))
      detail::raise<InvalidArgument>(where, "state tensor 'step' holds ", x, ", expected a non-negative integer");
    return static_cast<Index>(x);
  }

  // After the state was exposed for writing: validate its values, then adopt it. Shapes and
  // names are compared with the parameters by check_state_layout on every step.
  void sync_state(const char* where, const P& params) {
    if (!state_dirty_) return;
    const Index steps = read_step_tensor(where);
    if (state_.m.size() != state_.names.size() || state_.v.size() != state_.names.size())
      detail::raise<ShapeError>(where, "optimizer state holds ", state_.names.size(), " names, ", state_.m.size(),
                                " first moments and ", state_.v.size(), " second moments");
    check_state_layout(where, params);  // shapes before values: a resized tensor holds garbage
    for (std::size_t i = 0; i < state_.names.size(); ++i) {
      const std::string mname = "state tensor 'm." + state_.names[i] + "'";
      const std::string vname = "state tensor 'v." + state_.names[i] + "'";
      detail::check_finite(where, mname.c_str(), state_.m[i]);
      detail::check_finite(where, vname.c_str(), state_.v[i]);
      detail::check_range(where, vname.c_str(), state_.v[i], 0.0, std::numeric_limits<double>::max());
    }
    steps_ = steps;
    refresh_decay_mask();
    state_dirty_ = false;
  }

  void check_state_layout(const char* where, const P& params) const {
    std::size_t i = 0;
    params.for_each([&](const std::string& name, const auto& t) {
      if (i >= state_.names.size())
        detail::raise<ShapeError>(where, "parameter '", name, "' has no optimizer state (the state holds ",
                                  state_.names.size(), " tensors)");
      if (state_.names[i] != name)
        detail::raise<ShapeError>(where, "parameter ", i, " is '", name, "' but the optimizer state has '",
                                  state_.names[i], "'");
      const Matrix<scalar_type>* moments[2] = {&state_.m[i], &state_.v[i]};
      const char* prefix[2] = {"m.", "v."};
      for (int k = 0; k < 2; ++k) {
        if (moments[k]->rows() != t.rows() || moments[k]->cols() != t.cols())
          detail::raise<ShapeError>(where, "parameter '", name, "' has shape (", t.rows(), ", ", t.cols(),
                                    ") but state tensor '", prefix[k], name, "' has shape (", moments[k]->rows(),
                                    ", ", moments[k]->cols(), ")");
      }
      ++i;
    });
    if (i != state_.names.size())
      detail::raise<ShapeError>(where, "the parameters hold ", i, " tensors but the optimizer state holds ",
                                state_.names.size());
  }

  AdamWConfig config_;
  state_type state_;
  std::vector<bool> decay_;
  Index steps_ = 0;
  bool state_dirty_ = false;
};

// =============================================================================================
// Gradient clipping
// =============================================================================================

/// \brief Clips the global L2 norm of all tensors of `grads` to at most `max_norm`.
///
/// The norm is sqrt(Σ over every tensor and entry of g²), accumulated in double (rescaled if
/// the sum would overflow). When it exceeds `max_norm`, every tensor is multiplied by
/// `max_norm / (norm + 1e-6)`. Returns the norm before clipping.
///
/// Throws InvalidArgument unless `max_norm > 0` (+infinity is accepted and never clips), and
/// NumericError naming the tensor if a gradient holds a NaN or an infinity (`grads` is then
/// unchanged).
template <class P>
double clip_grad_norm(P& grads, double max_norm) {
  constexpr const char* where = "titans::clip_grad_norm";
  using S = typename P::scalar_type;
  static_assert(std::is_floating_point_v<S>, "titans: Scalar must be a floating-point type");
  if (!(max_norm > 0)) detail::raise<InvalidArgument>(where, "max_norm is ", max_norm, ", expected a value > 0");

  double sum = 0.0;
  const P& cgrads = grads;
  cgrads.for_each([&](const std::string&, const Matrix<S>& t) {
    for (Index j = 0; j < t.cols(); ++j)
      for (Index r = 0; r < t.rows(); ++r) {
        const double x = static_cast<double>(t(r, j));
        sum += x * x;
      }
  });
  double norm = std::sqrt(sum);
  if (!std::isfinite(norm)) {
    // Either a non-finite entry (name it) or an overflow of the sum of squares (rescale).
    double scale = 0.0;
    cgrads.for_each([&](const std::string& name, const Matrix<S>& t) {
      const std::string what = "gradient '" + name + "'";
      detail::check_finite(where, what.c_str(), t);
      for (Index j = 0; j < t.cols(); ++j)
        for (Index r = 0; r < t.rows(); ++r) scale = std::max(scale, std::abs(static_cast<double>(t(r, j))));
    });
    double scaled = 0.0;
    cgrads.for_each([&](const std::string&, const Matrix<S>& t) {
      for (Index j = 0; j < t.cols(); ++j)
        for (Index r = 0; r < t.rows(); ++r) {
          const double x = static_cast<double>(t(r, j)) / scale;
          scaled += x * x;
        }
    });
    norm = scale * std::sqrt(scaled);
    if (!std::isfinite(norm))
      detail::raise<NumericError>(where, "the gradient norm is not representable as a double");
  }
  if (norm > max_norm) {
    const S factor = static_cast<S>(max_norm / (norm + 1e-6));
    grads.for_each([&](const std::string&, Matrix<S>& t) { t *= factor; });
  }
  return norm;
}

// =============================================================================================
// Learning-rate schedule
// =============================================================================================

/// \brief Linear warmup then cosine decay, as a function of the 0-based step index.
///
/// With W = warmup_steps, N = total_steps:
///
///     step < W        : peak_lr * (step + 1) / W                   (reaches peak_lr at step W - 1)
///     W <= step < N   : min_lr + (peak_lr - min_lr) * (1 + cos(pi * (step - W) / (N - W))) / 2
///     step >= N       : min_lr
///
/// so the cosine phase starts at peak_lr at step W and would reach min_lr at step N.
/// Valid when warmup_steps >= 0, total_steps > 0, total_steps >= warmup_steps and
/// peak_lr >= min_lr >= 0 (all finite); checked by the constructor and by every call.
struct CosineSchedule {
  double peak_lr = 1e-3;    ///< the largest learning rate, reached at the end of warmup
  Index warmup_steps = 0;   ///< number of linear-warmup steps (0: start at peak_lr)
  Index total_steps = 1;    ///< step at which min_lr is reached and held
  double min_lr = 0;        ///< the floor of the cosine decay

  CosineSchedule() = default;
  /// \brief Throws InvalidArgument naming the first invalid field.
  CosineSchedule(double peak, Index warmup, Index total, double min = 0)
      : peak_lr(peak), warmup_steps(warmup), total_steps(total), min_lr(min) {
    validate("titans::CosineSchedule");
  }

  /// \brief Throws InvalidArgument naming the first invalid field and its value.
  void validate(const char* where = "titans::CosineSchedule") const {
    if (warmup_steps < 0)
      detail::raise<InvalidArgument>(where, "warmup_steps is ", warmup_steps, ", expected >= 0");
    if (total_steps <= 0) detail::raise<InvalidArgument>(where, "total_steps is ", total_steps, ", expected > 0");
    if (total_steps < warmup_steps)
      detail::raise<InvalidArgument>(where, "total_steps is ", total_steps, ", expected >= warmup_steps (",
                                     warmup_steps, ")");
    if (!(std::isfinite(min_lr) && min_lr >= 0))
      detail::raise<InvalidArgument>(where, "min_lr is ", min_lr, ", expected a finite value >= 0");
    if (!(std::isfinite(peak_lr) && peak_lr >= min_lr))
      detail::raise<InvalidArgument>(where, "peak_lr is ", peak_lr, ", expected a finite value >= min_lr (", min_lr,
                                     ")");
  }

  /// \brief The learning rate at 0-based step `step` (>= 0, else InvalidArgument).
  double operator()(Index step) const {
    constexpr const char* where = "titans::CosineSchedule";
    validate(where);
    if (step < 0) detail::raise<InvalidArgument>(where, "step is ", step, ", expected >= 0");
    if (step < warmup_steps)
      return peak_lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
    if (step >= total_steps) return min_lr;
    const double progress =
        static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps);
    constexpr double pi = 3.14159265358979323846;
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + std::cos(pi * progress));
  }
};

}  // namespace titans
