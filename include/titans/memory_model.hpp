// SPDX-License-Identifier: Apache-2.0
//
// \file memory_model.hpp
// \brief The memory model M_Θ (MATH.md §1): an MLP of depth L whose weights are the long-term
// memory, its associative inner loss ||M(k) - v||^2 and the loss's analytic gradient.
#pragma once

#include "common.hpp"
#include "detail/random.hpp"

#include <unsupported/Eigen/SpecialFunctions>  // vectorised erf for the exact GELU

#include <cmath>
#include <string>
#include <vector>

namespace titans {

/// \brief The memory MLP's nonlinearity φ.
enum class Activation {
  silu,      ///< z σ(z)
  gelu,      ///< z Φ(z), the exact (erf) form
  identity,  ///< z: with L = 1 the memory is online linear regression
};

inline const char* to_string(Activation a) {
  switch (a) {
    case Activation::silu: return "silu";
    case Activation::gelu: return "gelu";
    case Activation::identity: return "identity";
  }
  return "unknown";
}

/// \brief Shape of one memory MLP: depth L, width d, hidden expansion E, φ, optional residual.
struct MemoryConfig {
  Index dim = 64;        ///< d: key, value and query width (n_0 = n_L = d)
  Index depth = 2;       ///< L >= 1 layers; L = 1 is a linear memory
  Index expansion = 4;   ///< E: hidden layers have E·d units
  Activation activation = Activation::silu;
  /// [choice] M(k) = k + z_L instead of z_L. The gradient with respect to the weights is the
  /// same expression (the skip does not depend on Θ), so the dual form stays exact.
  bool residual = false;

  /// Throws InvalidArgument naming the field if the config is unusable.
  void validate(const char* where = "titans::MemoryConfig") const {
    if (dim < 1) detail::raise<InvalidArgument>(where, "dim (d) is ", dim, ", expected >= 1");
    if (depth < 1) detail::raise<InvalidArgument>(where, "depth (L) is ", depth, ", expected >= 1");
    if (expansion < 1) detail::raise<InvalidArgument>(where, "expansion (E) is ", expansion, ", expected >= 1");
    if (activation != Activation::silu && activation != Activation::gelu && activation != Activation::identity)
      detail::raise<InvalidArgument>(where, "activation has an unknown value");
  }
  /// n_l, the output width of layer l (0-based l = 0..L-1).
  Index layer_out(Index l) const { return l == depth - 1 ? dim : expansion * dim; }
  /// n_{l-1}, the input width of layer l (0-based).
  Index layer_in(Index l) const { return l == 0 ? dim : expansion * dim; }
  /// Number of scalars in Θ.
  Index weight_count() const {
    Index n = 0;
    for (Index l = 0; l < depth; ++l) n += layer_out(l) * layer_in(l);
    return n;
  }
};

/// \brief Θ = (W_1 … W_L), W_l of shape (n_l, n_{l-1}). A parameter set (names "w1" … "wL").
template <class Scalar>
struct MemoryWeights {
  static_assert(std::is_floating_point_v<Scalar>, "titans: Scalar must be a floating-point type");
  using scalar_type = Scalar;
  std::vector<Matrix<Scalar>> w;

  TITANS_DEFINE_FOR_EACH()

 private:
  template <class Self, class F>
  static void for_each_impl(Self& s, F& f) {
    for (std::size_t l = 0; l < s.w.size(); ++l) f("w" + std::to_string(l + 1), s.w[l]);
  }
};

/// \brief Zero weights of the right shapes.
template <class Scalar>
MemoryWeights<Scalar> zero_memory_weights(const MemoryConfig& cfg) {
  cfg.validate("titans::zero_memory_weights");
  MemoryWeights<Scalar> out;
  for (Index l = 0; l < cfg.depth; ++l) out.w.push_back(Matrix<Scalar>::Zero(cfg.layer_out(l), cfg.layer_in(l)));
  return out;
}

/// \brief Random weights, W_l ~ N(0, gain^2 / n_{l-1}), reproducible from `seed` on every platform.
template <class Scalar>
MemoryWeights<Scalar> init_memory_weights(const MemoryConfig& cfg, std::uint64_t seed, double gain = 1.0) {
  MemoryWeights<Scalar> out = zero_memory_weights<Scalar>(cfg);
  detail::Rng rng(seed);
  for (auto& w : out.w) rng.fill_normal(w, gain / std::sqrt(static_cast<double>(w.cols())));
  return out;
}

/// \brief Throws ShapeError unless `weights` has exactly the shapes `cfg` asks for.
template <class Scalar>
void check_memory_weights(const char* where, const char* what, const MemoryConfig& cfg,
                          const std::vector<Matrix<Scalar>>& w) {
  if (static_cast<Index>(w.size()) != cfg.depth)
    detail::raise<ShapeError>(where, what, " has ", w.size(), " layers, expected depth ", cfg.depth);
  for (Index l = 0; l < cfg.depth; ++l) {
    const std::string name = std::string(what) + "[" + std::to_string(l) + "]";
    detail::check_shape(where, name.c_str(), w[l], cfg.layer_out(l), cfg.layer_in(l));
  }
}

namespace detail {

/// out = φ(z), elementwise.
template <class Z, class Out>
void activation_apply(Activation a, const Eigen::MatrixBase<Z>& z, Out& out) {
  using S = typename Z::Scalar;
  switch (a) {
    case Activation::silu:
      out = (z.array() / (S(1) + (-z.array()).exp())).matrix();
      break;
    case Activation::gelu:
      out = (z.array() * (S(0.5) * (S(1) + (z.array() * S(0.70710678118654752440)).erf()))).matrix();
      break;
    case Activation::identity:
      out = z;
      break;
  }
}

/// out = φ'(z), elementwise.
template <class Z, class Out>
void activation_derivative(Activation a, const Eigen::MatrixBase<Z>& z, Out& out) {
  using S = typename Z::Scalar;
  switch (a) {
    case Activation::silu: {
      // σ(z) (1 + z (1 − σ(z)))
      auto sig = (S(1) / (S(1) + (-z.array()).exp()));
      out = (sig * (S(1) + z.array() * (S(1) - sig))).matrix();
      break;
    }
    case Activation::gelu:
      // Φ(z) + z ϕ(z)
      out = (S(0.5) * (S(1) + (z.array() * S(0.70710678118654752440)).erf()) +
                       z.array() * (S(-0.5) * z.array().square()).exp() * S(0.39894228040143267794))
                          .matrix();
      break;
    case Activation::identity:
      out.setOnes(z.rows(), z.cols());
      break;
  }
}

}  // namespace detail

/// \brief M_Θ applied to every column of `x`: returns `(d, T)`. This is also retrieval without
/// update (M*, Eq 15) for a fixed state.
template <class Scalar>
Matrix<Scalar> memory_apply(const MemoryConfig& cfg, const std::vector<Matrix<Scalar>>& w,
                            const Eigen::Ref<const Matrix<Scalar>>& x /* (d, T) */) {
  constexpr const char* where = "titans::memory_apply";
  cfg.validate(where);
  check_memory_weights(where, "weights", cfg, w);
  detail::check_shape(where, "x", x, cfg.dim, -1);
  Matrix<Scalar> a = x, z;
  for (Index l = 0; l < cfg.depth; ++l) {
    z.noalias() = w[l] * a;
    if (l + 1 < cfg.depth) detail::activation_apply(cfg.activation, z, a);
  }
  if (cfg.residual) z += x;
  return z;
}

/// \brief Inner loss Σ_t ||M(k_t) − v_t||² (Eq 12, no ½) over the columns of k and v.
template <class Scalar>
Scalar inner_loss(const MemoryConfig& cfg, const std::vector<Matrix<Scalar>>& w,
                  const Eigen::Ref<const Matrix<Scalar>>& k /* (d, T) */,
                  const Eigen::Ref<const Matrix<Scalar>>& v /* (d, T) */) {
  detail::check_shape("titans::inner_loss", "v", v, cfg.dim, k.cols());
  return (memory_apply(cfg, w, k) - v).squaredNorm();
}

/// \brief Adds ∂/∂Θ Σ_t ||M(k_t) − v_t||² into `grad` (same shapes as the weights), by backprop:
/// δ_L = 2 (M(k) − v), u^{W_l} = δ_l a_{l−1}ᵀ, δ_{l−1} = (W_lᵀ δ_l) ⊙ φ'(z_{l−1}).
template <class Scalar>
void inner_loss_gradient(const MemoryConfig& cfg, const std::vector<Matrix<Scalar>>& w,
                         const Eigen::Ref<const Matrix<Scalar>>& k /* (d, T) */,
                         const Eigen::Ref<const Matrix<Scalar>>& v /* (d, T) */,
                         std::vector<Matrix<Scalar>>& grad /* shapes of w, accumulated */) {
  constexpr const char* where = "titans::inner_loss_gradient";
  cfg.validate(where);
  check_memory_weights(where, "weights", cfg, w);
  check_memory_weights(where, "grad", cfg, grad);
  detail::check_shape(where, "k", k, cfg.dim, -1);
  detail::check_shape(where, "v", v, cfg.dim, k.cols());
  std::vector<Matrix<Scalar>> a(static_cast<std::size_t>(cfg.depth)), z(a.size());
  a[0] = k;
  for (Index l = 0; l < cfg.depth; ++l) {
    z[l].noalias() = w[l] * a[l];
    if (l + 1 < cfg.depth) detail::activation_apply(cfg.activation, z[l], a[l + 1]);
  }
  Matrix<Scalar> delta = Scalar(2) * (z.back() - v);
  if (cfg.residual) delta += Scalar(2) * k;
  Matrix<Scalar> dphi;
  for (Index l = cfg.depth - 1; l >= 0; --l) {
    grad[l].noalias() += delta * a[l].transpose();
    if (l > 0) {
      detail::activation_derivative(cfg.activation, z[l - 1], dphi);
      Matrix<Scalar> back = w[l].transpose() * delta;
      delta = back.cwiseProduct(dphi);
    }
  }
}

/// \brief Backward of memory_apply (retrieval M*): adds ∂L/∂Θ into `dw` (shapes of the weights)
/// and ∂L/∂x into `dx` (d, T), given dy = ∂L/∂M(x) (d, T). The forward is recomputed.
template <class Scalar>
void memory_apply_backward(const MemoryConfig& cfg, const std::vector<Matrix<Scalar>>& w,
                           const Eigen::Ref<const Matrix<Scalar>>& x /* (d, T) */,
                           const Eigen::Ref<const Matrix<Scalar>>& dy /* (d, T) */,
                           std::vector<Matrix<Scalar>>& dw /* shapes of w, accumulated */,
                           Eigen::Ref<Matrix<Scalar>> dx /* (d, T), accumulated */) {
  constexpr const char* where = "titans::memory_apply_backward";
  cfg.validate(where);
  check_memory_weights(where, "weights", cfg, w);
  check_memory_weights(where, "dw", cfg, dw);
  detail::check_shape(where, "x", x, cfg.dim, -1);
  detail::check_shape(where, "dy", dy, cfg.dim, x.cols());
  detail::check_shape(where, "dx", dx, cfg.dim, x.cols());
  std::vector<Matrix<Scalar>> a(static_cast<std::size_t>(cfg.depth)), z(a.size());
  a[0] = x;
  for (Index l = 0; l < cfg.depth; ++l) {
    z[l].noalias() = w[l] * a[l];
    if (l + 1 < cfg.depth) detail::activation_apply(cfg.activation, z[l], a[l + 1]);
  }
  Matrix<Scalar> delta = dy, dphi;
  for (Index l = cfg.depth - 1; l >= 0; --l) {
    dw[l].noalias() += delta * a[l].transpose();
    Matrix<Scalar> back = w[l].transpose() * delta;
    if (l > 0) {
      detail::activation_derivative(cfg.activation, z[l - 1], dphi);
      delta = back.cwiseProduct(dphi);
    } else {
      dx += back;
    }
  }
  if (cfg.residual) dx += dy;
}

// The float and double instantiations (README, "Build time"): PREFIX is `extern` for the
// declarations below and empty in src/instantiate_*.cpp, which define them.
#define TITANS_INSTANTIATE_MEMORY_MODEL(PREFIX, S) \
  PREFIX template MemoryWeights<S> zero_memory_weights<S>(const MemoryConfig&);                                 \
  PREFIX template MemoryWeights<S> init_memory_weights<S>(const MemoryConfig&, std::uint64_t, double);           \
  PREFIX template void check_memory_weights<S>(const char*, const char*, const MemoryConfig&,                    \
                                               const std::vector<Matrix<S>>&);                                  \
  PREFIX template Matrix<S> memory_apply<S>(const MemoryConfig&, const std::vector<Matrix<S>>&,                  \
                                            const Eigen::Ref<const Matrix<S>>&);                                \
  PREFIX template S inner_loss<S>(const MemoryConfig&, const std::vector<Matrix<S>>&,                            \
                                  const Eigen::Ref<const Matrix<S>>&, const Eigen::Ref<const Matrix<S>>&);      \
  PREFIX template void inner_loss_gradient<S>(const MemoryConfig&, const std::vector<Matrix<S>>&,                \
                                              const Eigen::Ref<const Matrix<S>>&,                              \
                                              const Eigen::Ref<const Matrix<S>>&, std::vector<Matrix<S>>&);    \
  PREFIX template void memory_apply_backward<S>(const MemoryConfig&, const std::vector<Matrix<S>>&,              \
                                                const Eigen::Ref<const Matrix<S>>&,                            \
                                                const Eigen::Ref<const Matrix<S>>&, std::vector<Matrix<S>>&,   \
                                                Eigen::Ref<Matrix<S>>);

#ifdef TITANS_EXTERN_TEMPLATES
TITANS_INSTANTIATE_MEMORY_MODEL(extern, float)
TITANS_INSTANTIATE_MEMORY_MODEL(extern, double)
#endif

}  // namespace titans
