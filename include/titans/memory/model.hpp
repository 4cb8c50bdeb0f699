// SPDX-License-Identifier: Apache-2.0
//
// \file memory/model.hpp
// \brief The memory model M_Θ (docs/MATH.md §1): an MLP of depth L whose weights are the long-term
// memory, its associative inner loss ||M(k) - v||^2 and the loss's analytic gradient.
#pragma once

#include "../common.hpp"
#include "../detail/gemm.hpp"
#include "../detail/random.hpp"

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

/// Metadata text of an Activation and back (detail/metadata.hpp); returns "" or what was expected.
inline std::string metadata_string(Activation a) { return to_string(a); }
inline std::string parse_metadata(const std::string& s, Activation& out) {
  for (Activation a : {Activation::silu, Activation::gelu, Activation::identity})
    if (s == to_string(a)) {
      out = a;
      return "";
    }
  return "silu, gelu or identity";
}

/// \brief The attentional bias: the inner loss ℓ(r) of a token's residual r = M(k) − v
/// (docs/MATH.md §11). Each is a function of r alone, so only δ_L changes and the dual form of
/// §3 stays exact.
enum class AttentionalBias {
  l2,     ///< ‖r‖² (Eq 12, no ½)
  huber,  ///< MIRAS "Yaad": ‖r‖² for ‖r‖ ≤ δ_t, else the ℓ1 loss 2δ_t ‖r‖₁ − δ_t² (δ_t > 0 per token)
  lp,     ///< MIRAS "Moneta": Σ_j |r_j|_ε^p with the smooth |x|_ε = sqrt(x² + ε), p ≥ 1
  /// Huber of the Euclidean norm: ‖r‖² for ‖r‖ ≤ δ_t, else 2δ_t‖r‖ − δ_t² (a step of length 2δ_t
  /// along r). C¹, unlike huber, and its steps are never longer than l2's (docs/MATH.md §11.2).
  huber_radial,
};

/// Whether the bias reads a threshold δ_t per token (KernelInputs::threshold).
inline bool uses_threshold(AttentionalBias b) { return b == AttentionalBias::huber || b == AttentionalBias::huber_radial; }

inline const char* to_string(AttentionalBias b) {
  switch (b) {
    case AttentionalBias::l2: return "l2";
    case AttentionalBias::huber: return "huber";
    case AttentionalBias::lp: return "lp";
    case AttentionalBias::huber_radial: return "huber_radial";
  }
  return "unknown";
}

/// Metadata text of an AttentionalBias and back (detail/metadata.hpp); returns "" or what was expected.
inline std::string metadata_string(AttentionalBias b) { return to_string(b); }
inline std::string parse_metadata(const std::string& s, AttentionalBias& out) {
  for (AttentionalBias b :
       {AttentionalBias::l2, AttentionalBias::huber, AttentionalBias::lp, AttentionalBias::huber_radial})
    if (s == to_string(b)) {
      out = b;
      return "";
    }
  return "l2, huber, huber_radial or lp";
}

/// \brief Shape of one memory MLP: depth L, width d, hidden expansion E, φ, optional residual.
struct MemoryConfig {
  Index dim = 64;        ///< d: key, value and query width (n_0 = n_L = d)
  Index depth = 2;       ///< L >= 1 layers; L = 1 is a linear memory
  Index expansion = 4;   ///< E: hidden layers have E·d units
  Activation activation = Activation::silu;
  /// [choice] M(k) = k + (read-out of z_L) instead of the read-out alone. The skip does not
  /// depend on Θ, so the dual form stays exact.
  bool residual = false;
  /// Read-out of the last layer: γ ⊙ LN(z_L) (LayerNorm over the d features, no shift; γ the
  /// kernel input `gain`, learned by the outer loop) instead of z_L. With `residual` this is the
  /// revised paper's M(k) = k + γ ⊙ LN(z_L): the output is bounded by max|γ|·√d whatever the
  /// weights, and the inner gradient shrinks as they grow (docs/MATH.md §8.3).
  bool output_norm = false;
  double norm_eps = 1e-5;  ///< ε of that LayerNorm: σ = sqrt(var + ε)
  /// c > 0: token i's step θ_i is scaled by min(1, c / ‖u_i‖), the norm of its inner gradient at
  /// the chunk-start weights, so no token moves Θ by more than θ_i·c (docs/MATH.md §8.2); 0 = off.
  double surprise_clamp = 0;
  /// The inner loss ℓ(M(k) − v) (docs/MATH.md §11). With huber the kernel reads a threshold
  /// δ_t > 0 per token (KernelInputs::threshold).
  AttentionalBias bias = AttentionalBias::l2;
  double bias_p = 3;       ///< p >= 1 of the lp bias (read with lp only)
  double bias_eps = 1e-6;  ///< ε > 0 of the lp bias's smooth |x|_ε = sqrt(x² + ε) (read with lp only)

  /// Throws InvalidArgument naming the field if the config is unusable.
  void validate(const char* where = "titans::MemoryConfig") const {
    detail::check_range(where, "dim (d)", dim, 1, limits::dim);
    detail::check_range(where, "depth (L)", depth, 1, limits::depth);
    detail::check_range(where, "expansion (E)", expansion, 1, limits::expansion);
    if (activation != Activation::silu && activation != Activation::gelu && activation != Activation::identity)
      detail::raise<InvalidArgument>(where, "activation has an unknown value");
    if (!(norm_eps > 0) || !std::isfinite(norm_eps))
      detail::raise<InvalidArgument>(where, "norm_eps is ", norm_eps, ", expected a finite value > 0");
    if (!(surprise_clamp >= 0) || !std::isfinite(surprise_clamp))
      detail::raise<InvalidArgument>(where, "surprise_clamp is ", surprise_clamp,
                                     ", expected a finite value >= 0 (0 = off)");
    if (bias != AttentionalBias::l2 && bias != AttentionalBias::huber && bias != AttentionalBias::lp &&
        bias != AttentionalBias::huber_radial)
      detail::raise<InvalidArgument>(where, "bias has an unknown value (", static_cast<int>(bias),
                                     "), expected l2, huber, huber_radial or lp");
    if (!(bias_p >= 1) || !std::isfinite(bias_p))
      detail::raise<InvalidArgument>(where, "bias_p is ", bias_p, ", expected a finite value >= 1");
    if (!(bias_eps > 0) || !std::isfinite(bias_eps))
      detail::raise<InvalidArgument>(where, "bias_eps is ", bias_eps, ", expected a finite value > 0");
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

namespace detail {

/// T in a position that template argument deduction skips (so nullptr can be passed for it).
template <class T>
using no_deduce = typename std::enable_if<true, T>::type;

/// The memory MLP's forward on the columns of x (docs/MATH.md §1): a[0] = x, z[l] = w[l] a[l],
/// a[l+1] = φ(z[l]). Every forward of the MLP at fixed weights (the key path at Θ⁰, retrieval,
/// the inner gradient) runs this. a and z have L entries.
template <class Scalar, class DX>
void mlp_forward(const MemoryConfig& cfg, const std::vector<Matrix<Scalar>>& w, const Eigen::MatrixBase<DX>& x,
                 std::vector<Matrix<Scalar>>& a, std::vector<Matrix<Scalar>>& z) {
  const Index L = cfg.depth;
  a.resize(static_cast<std::size_t>(L));
  z.resize(a.size());
  a[0] = x;
  for (Index l = 0; l < L; ++l) {
    product<Trans::no, Trans::no>(w[l], a[l], z[l]);
    if (l + 1 < L) activation_apply(cfg.activation, z[l], a[l + 1]);
  }
}

/// The δ recurrence of the MLP's backward (docs/MATH.md §1): on entry delta[L−1] holds the signal
/// at z_L; fills delta[l−1] = (w[l]ᵀ delta[l]) ⊙ φ'(z[l−1]) for l = L−1 … 1. With `t`, t[l]
/// receives w[l]ᵀ delta[l] (the backward pass of the kernel keeps it).
template <class Scalar>
void mlp_backprop(const MemoryConfig& cfg, const std::vector<Matrix<Scalar>>& w, const std::vector<Matrix<Scalar>>& z,
                  std::vector<Matrix<Scalar>>& delta, no_deduce<std::vector<Matrix<Scalar>>*> t, Matrix<Scalar>& tmp,
                  Matrix<Scalar>& dphi) {
  delta.resize(static_cast<std::size_t>(cfg.depth));
  for (Index l = cfg.depth - 1; l > 0; --l) {
    product<Trans::yes, Trans::no>(w[l], delta[l], tmp);
    if (t) (*t)[l] = tmp;
    activation_derivative(cfg.activation, z[l - 1], dphi);
    delta[l - 1] = tmp.cwiseProduct(dphi);
  }
}

/// LayerNorm of every column of z over its rows (no gain, no shift): zhat = (z − mean) / σ,
/// rsigma(j) = 1/σ_j, σ = sqrt(var + eps).
template <class Scalar, class DZ>
void layer_norm(const Eigen::MatrixBase<DZ>& z, double eps, Matrix<Scalar>& zhat, Vector<Scalar>& rsigma) {
  const Index d = z.rows(), n = z.cols();
  zhat.resize(d, n);
  rsigma.resize(n);
  for (Index j = 0; j < n; ++j) {
    const Scalar mean = z.col(j).mean();
    zhat.col(j) = z.col(j).array() - mean;
    const Scalar var = zhat.col(j).squaredNorm() / static_cast<Scalar>(d);
    rsigma(j) = Scalar(1) / std::sqrt(var + static_cast<Scalar>(eps));
    zhat.col(j) *= rsigma(j);
  }
}

/// The read-out of the last layer (docs/MATH.md §1, §8.3): y = [x +] (output_norm ? γ ⊙ LN(z) : z),
/// column by column; z is z_L (d, n), x the MLP's input (d, n), gain γ (d).
template <class Scalar, class DZ, class DX>
void memory_readout(const MemoryConfig& cfg, const Eigen::MatrixBase<DZ>& z, const Eigen::MatrixBase<DX>& x,
                    const Vector<Scalar>& gain, Matrix<Scalar>& y) {
  if (cfg.output_norm) {
    Vector<Scalar> rsigma;
    layer_norm<Scalar>(z, cfg.norm_eps, y, rsigma);
    y = gain.asDiagonal() * y;
  } else {
    y = z;
  }
  if (cfg.residual) y += x;
}

/// dL/dz_L of the read-out for dL/dy = dy: dy itself, or with output_norm
/// J_LN(z)ᵀ (γ ⊙ dy) = (g − mean(g) − ẑ · mean(g ⊙ ẑ)) / σ with g = γ ⊙ dy (J_LN is symmetric).
/// `dgain`, when given, accumulates Σ_columns dy ⊙ ẑ. The residual's dL/dx = dy is the caller's.
template <class Scalar, class DZ, class DD>
void memory_readout_backward(const MemoryConfig& cfg, const Eigen::MatrixBase<DZ>& z, const Vector<Scalar>& gain,
                             const Eigen::MatrixBase<DD>& dy, Matrix<Scalar>& dz, Vector<Scalar>* dgain = nullptr) {
  if (!cfg.output_norm) {
    dz = dy;
    return;
  }
  Matrix<Scalar> zhat;
  Vector<Scalar> rsigma;
  layer_norm<Scalar>(z, cfg.norm_eps, zhat, rsigma);
  if (dgain) *dgain += (dy.array() * zhat.array()).rowwise().sum().matrix();
  dz = gain.asDiagonal() * dy;
  const Scalar dinv = Scalar(1) / static_cast<Scalar>(z.rows());
  for (Index j = 0; j < z.cols(); ++j) {
    const Scalar mg = dz.col(j).sum() * dinv, mgz = dz.col(j).dot(zhat.col(j)) * dinv;
    dz.col(j) = (dz.col(j).array() - mg - zhat.col(j).array() * mgz) * rsigma(j);
  }
}

/// Throws unless `gain` fits `cfg`: (d) finite values with output_norm, anything (unused) without.
template <class Scalar>
void check_memory_gain(const char* where, const MemoryConfig& cfg, const Vector<Scalar>& gain) {
  if (!cfg.output_norm) return;
  check_shape(where, "gain", gain, cfg.dim, 1);
  check_finite(where, "gain", gain);
}

}  // namespace detail

/// \brief M_Θ applied to every column of `x`: returns `(d, T)`. This is also retrieval without
/// update (M*, Eq 15) for a fixed state. `gain` is γ (d) of the output norm (cfg.output_norm);
/// without it, it is not read and may be empty.
template <class Scalar>
Matrix<Scalar> memory_apply(const MemoryConfig& cfg, const std::vector<Matrix<Scalar>>& w,
                            const ConstMatrixRef<Scalar>& x /* (d, T) */,
                            const Vector<Scalar>& gain /* (d) or empty */) {
  constexpr const char* where = "titans::memory_apply";
  cfg.validate(where);
  check_memory_weights(where, "weights", cfg, w);
  detail::check_shape(where, "x", x, cfg.dim, -1);
  detail::check_memory_gain(where, cfg, gain);
  std::vector<Matrix<Scalar>> a, z;
  detail::mlp_forward(cfg, w, x, a, z);
  Matrix<Scalar> y;
  detail::memory_readout(cfg, z.back(), x, gain, y);
  return y;
}

namespace detail {

/// Throws unless `threshold` fits `cfg` for T tokens: (T) finite values > 0 with the huber biases,
/// empty or (T) (unused) with the others.
template <class Scalar>
void check_bias_threshold(const char* where, const char* what, const MemoryConfig& cfg, const Vector<Scalar>& threshold,
                          Index tokens) {
  if (!uses_threshold(cfg.bias)) {
    if (threshold.size() != 0) check_shape(where, what, threshold, tokens, 1);  // unused, but never out of range
    return;
  }
  check_shape(where, what, threshold, tokens, 1);
  check_finite(where, what, threshold);
  for (Index t = 0; t < tokens; ++t)
    if (!(threshold(t) > 0))
      raise<InvalidArgument>(where, what, " has value ", static_cast<double>(threshold(t)), " at token ", t,
                             ", expected a value > 0 (the huber bias's threshold)");
}

/// ℓ(r) summed over the columns of the residuals r (d, n) (docs/MATH.md §11); `thr` holds δ_t (n)
/// with the huber bias and is not read otherwise.
template <class Scalar, class DR, class DT>
Scalar bias_loss(const MemoryConfig& cfg, const Eigen::MatrixBase<DR>& r, const Eigen::MatrixBase<DT>& thr) {
  switch (cfg.bias) {
    case AttentionalBias::l2: break;
    case AttentionalBias::huber: {
      Scalar sum = 0;
      for (Index j = 0; j < r.cols(); ++j) {
        const Scalar n = r.col(j).norm(), d = Scalar(thr(j));
        sum += n <= d ? n * n : Scalar(2) * d * r.col(j).template lpNorm<1>() - d * d;
      }
      return sum;
    }
    case AttentionalBias::huber_radial: {
      Scalar sum = 0;
      for (Index j = 0; j < r.cols(); ++j) {
        const Scalar n = r.col(j).norm(), d = Scalar(thr(j));
        sum += n <= d ? n * n : Scalar(2) * d * n - d * d;
      }
      return sum;
    }
    case AttentionalBias::lp: {
      const auto p = static_cast<Scalar>(cfg.bias_p), eps = static_cast<Scalar>(cfg.bias_eps);
      return (r.array().square() + eps).pow(p / Scalar(2)).sum();
    }
  }
  return r.squaredNorm();
}

/// The bias's gradient e = ∇_r ℓ(r) column by column, in place: `r` holds the residuals (d, n) on
/// entry and e on exit (docs/MATH.md §11): 2r (l2); 2r, or the ℓ1 step 2δ_t sign(r) when
/// ‖r‖ > δ_t (huber); 2r, or 2δ_t r/‖r‖ when ‖r‖ > δ_t (huber_radial); p |r_j|_ε^{p−2} r_j (lp). `thr`
/// holds δ_t (n) with the huber biases and is not read otherwise.
template <class Scalar, class DT>
void bias_gradient(const MemoryConfig& cfg, const Eigen::MatrixBase<DT>& thr, Matrix<Scalar>& r) {
  switch (cfg.bias) {
    case AttentionalBias::l2:
      r *= Scalar(2);
      return;
    case AttentionalBias::huber:
      for (Index j = 0; j < r.cols(); ++j) {
        const Scalar n = r.col(j).norm(), d = Scalar(thr(j));
        if (n > d)
          r.col(j) = (Scalar(2) * d * r.col(j).array().sign()).matrix();
        else
          r.col(j) *= Scalar(2);
      }
      return;
    case AttentionalBias::huber_radial:
      for (Index j = 0; j < r.cols(); ++j) {
        const Scalar n = r.col(j).norm(), d = Scalar(thr(j));
        r.col(j) *= n > d ? Scalar(2) * d / n : Scalar(2);
      }
      return;
    case AttentionalBias::lp: {
      const auto p = static_cast<Scalar>(cfg.bias_p), eps = static_cast<Scalar>(cfg.bias_eps);
      r = (p * (r.array().square() + eps).pow((p - Scalar(2)) / Scalar(2)) * r.array()).matrix();
      return;
    }
  }
}

/// The Jacobian of bias_gradient applied to x (both (d, n)), column by column: out = H(r_j) x_j,
/// H = ∂e/∂r = ∇²ℓ(r) (symmetric; docs/MATH.md §11): 2I (l2); 2I, or 0 when ‖r‖ > δ (huber: the
/// sign is constant wherever it is differentiable); diag(p (r_i² + ε)^{(p−4)/2} (ε + (p − 1) r_i²))
/// (lp); 2I, or (2δ/‖r‖)(I − r̂r̂ᵀ) with r̂ = r/‖r‖ when ‖r‖ > δ (huber_radial). With the huber
/// biases `dthr` (n), when given, accumulates x_jᵀ ∂e_j/∂δ_j where ‖r_j‖ > δ_j: 2 x_jᵀ sign(r_j)
/// (huber), 2 x_jᵀ r̂_j (huber_radial).
template <class Scalar, class DR, class DT, class DX>
void bias_hessian_apply(const MemoryConfig& cfg, const Eigen::MatrixBase<DR>& r, const Eigen::MatrixBase<DT>& thr,
                        const Eigen::MatrixBase<DX>& x, Matrix<Scalar>& out, Scalar* dthr) {
  switch (cfg.bias) {
    case AttentionalBias::l2:
      out = Scalar(2) * x;
      return;
    case AttentionalBias::huber:
      out.resize(x.rows(), x.cols());
      for (Index j = 0; j < r.cols(); ++j) {
        const Scalar n = r.col(j).norm(), d = Scalar(thr(j));
        if (n > d) {
          out.col(j).setZero();
          if (dthr) dthr[j] += Scalar(2) * x.col(j).dot(r.col(j).array().sign().matrix());
        } else {
          out.col(j) = Scalar(2) * x.col(j);
        }
      }
      return;
    case AttentionalBias::huber_radial:
      out.resize(x.rows(), x.cols());
      for (Index j = 0; j < r.cols(); ++j) {
        const Scalar n = r.col(j).norm(), d = Scalar(thr(j));
        if (n > d) {
          const Scalar rx = r.col(j).dot(x.col(j)) / n;  // r̂ᵀx
          out.col(j) = (Scalar(2) * d / n) * (x.col(j) - (rx / n) * r.col(j));
          if (dthr) dthr[j] += Scalar(2) * rx;
        } else {
          out.col(j) = Scalar(2) * x.col(j);
        }
      }
      return;
    case AttentionalBias::lp: {
      const auto p = static_cast<Scalar>(cfg.bias_p), eps = static_cast<Scalar>(cfg.bias_eps);
      const auto r2 = r.array().square();
      out = (p * (r2 + eps).pow((p - Scalar(4)) / Scalar(2)) * (eps + (p - Scalar(1)) * r2) * x.array()).matrix();
      return;
    }
  }
}

}  // namespace detail

/// \brief Inner loss Σ_t ℓ(M(k_t) − v_t) over the columns of k and v: Σ_t ||M(k_t) − v_t||² (Eq 12,
/// no ½) with the default l2 bias, else the bias of cfg (docs/MATH.md §11). `threshold` is δ_t (T)
/// with the huber bias; without it, it is not read and may be empty.
template <class Scalar>
Scalar inner_loss(const MemoryConfig& cfg, const std::vector<Matrix<Scalar>>& w,
                  const ConstMatrixRef<Scalar>& k /* (d, T) */,
                  const ConstMatrixRef<Scalar>& v /* (d, T) */, const Vector<Scalar>& gain /* (d) or empty */,
                  const Vector<Scalar>& threshold /* (T) or empty */) {
  constexpr const char* where = "titans::inner_loss";
  detail::check_shape(where, "v", v, cfg.dim, k.cols());
  detail::check_bias_threshold(where, "threshold", cfg, threshold, k.cols());
  const Matrix<Scalar> r = memory_apply(cfg, w, k, gain) - v;
  return detail::bias_loss<Scalar>(cfg, r, threshold);
}

namespace detail {

/// The inner-gradient signal at the last layer, δ_L = ∂ℓ(M(k) − v)/∂z_L through the read-out,
/// from z_L (d, n); `thr` is δ_t (n) with the huber bias (else not read); `m` is scratch (it ends
/// holding ∇_r ℓ at r = M(k) − v, 2(M(k) − v) for l2).
template <class Scalar, class DZ, class DK, class DV, class DT>
void inner_signal(const MemoryConfig& cfg, const Eigen::MatrixBase<DZ>& z, const Eigen::MatrixBase<DK>& k,
                  const Eigen::MatrixBase<DV>& v, const Eigen::MatrixBase<DT>& thr, const Vector<Scalar>& gain,
                  Matrix<Scalar>& m, Matrix<Scalar>& delta) {
  memory_readout(cfg, z, k, gain, m);
  m -= v;
  bias_gradient(cfg, thr, m);
  memory_readout_backward(cfg, z, gain, m, delta);
}

/// The key path at weights w (docs/MATH.md §1): the forward a, z and the inner-gradient signals
/// δ_l of ℓ(M(k) − v), δ_L = ∂ℓ/∂z_L through the read-out (`thr`: δ_t with the huber bias). The inner gradient of token i is
/// u_i^{W_l} = δ_{l,i} a_{l−1,i}ᵀ. The kernel's forward and backward and inner_loss_gradient all
/// run this one function; t (optional) receives w[l]ᵀ δ_l for l ≥ 1.
template <class Scalar, class DK, class DV, class DT>
void key_path(const MemoryConfig& cfg, const std::vector<Matrix<Scalar>>& w, const Eigen::MatrixBase<DK>& k,
              const Eigen::MatrixBase<DV>& v, const Eigen::MatrixBase<DT>& thr, const Vector<Scalar>& gain,
              std::vector<Matrix<Scalar>>& a, std::vector<Matrix<Scalar>>& z, std::vector<Matrix<Scalar>>& delta,
              no_deduce<std::vector<Matrix<Scalar>>*> t, Matrix<Scalar>& tmp, Matrix<Scalar>& dphi) {
  mlp_forward(cfg, w, k, a, z);
  delta.resize(a.size());
  inner_signal(cfg, z.back(), k, v, thr, gain, tmp, delta.back());
  mlp_backprop(cfg, w, z, delta, t, tmp, dphi);
}

}  // namespace detail

/// \brief Adds ∂/∂Θ Σ_t ℓ(M(k_t) − v_t) into `grad` (same shapes as the weights), by backprop:
/// δ_L = ∂ℓ/∂z_L, u^{W_l} = δ_l a_{l−1}ᵀ, δ_{l−1} = (W_lᵀ δ_l) ⊙ φ'(z_{l−1}). `threshold` as inner_loss.
template <class Scalar>
void inner_loss_gradient(const MemoryConfig& cfg, const std::vector<Matrix<Scalar>>& w,
                         const ConstMatrixRef<Scalar>& k /* (d, T) */,
                         const ConstMatrixRef<Scalar>& v /* (d, T) */,
                         const Vector<Scalar>& gain /* (d) or empty */,
                         const Vector<Scalar>& threshold /* (T) or empty */,
                         std::vector<Matrix<Scalar>>& grad /* shapes of w, accumulated */) {
  constexpr const char* where = "titans::inner_loss_gradient";
  cfg.validate(where);
  check_memory_weights(where, "weights", cfg, w);
  check_memory_weights(where, "grad", cfg, grad);
  detail::check_shape(where, "k", k, cfg.dim, -1);
  detail::check_shape(where, "v", v, cfg.dim, k.cols());
  detail::check_memory_gain(where, cfg, gain);
  detail::check_bias_threshold(where, "threshold", cfg, threshold, k.cols());
  std::vector<Matrix<Scalar>> a, z, delta;
  Matrix<Scalar> tmp, dphi;
  detail::key_path(cfg, w, k, v, threshold, gain, a, z, delta, nullptr, tmp, dphi);
  for (Index l = 0; l < cfg.depth; ++l) detail::product_add<detail::Trans::no, detail::Trans::yes>(Scalar(1), delta[l], a[l], grad[l]);
}

/// \brief Backward of memory_apply (retrieval M*): adds ∂L/∂Θ into `dw` (shapes of the weights),
/// ∂L/∂x into `dx` (d, T) and, with output_norm, ∂L/∂γ into `dgain` (d), given dy = ∂L/∂M(x)
/// (d, T). The forward is recomputed.
template <class Scalar>
void memory_apply_backward(const MemoryConfig& cfg, const std::vector<Matrix<Scalar>>& w,
                           const ConstMatrixRef<Scalar>& x /* (d, T) */,
                           const Vector<Scalar>& gain /* (d) or empty */,
                           const ConstMatrixRef<Scalar>& dy /* (d, T) */,
                           std::vector<Matrix<Scalar>>& dw /* shapes of w, accumulated */,
                           MatrixRef<Scalar> dx /* (d, T), accumulated */,
                           Vector<Scalar>* dgain /* (d), accumulated; output_norm only */) {
  constexpr const char* where = "titans::memory_apply_backward";
  cfg.validate(where);
  check_memory_weights(where, "weights", cfg, w);
  check_memory_weights(where, "dw", cfg, dw);
  detail::check_shape(where, "x", x, cfg.dim, -1);
  detail::check_shape(where, "dy", dy, cfg.dim, x.cols());
  detail::check_shape(where, "dx", dx, cfg.dim, x.cols());
  detail::check_memory_gain(where, cfg, gain);
  if (cfg.output_norm && dgain) detail::check_shape(where, "dgain", *dgain, cfg.dim, 1);
  std::vector<Matrix<Scalar>> a, z, delta(static_cast<std::size_t>(cfg.depth));
  Matrix<Scalar> tmp, dphi;
  detail::mlp_forward(cfg, w, x, a, z);
  detail::memory_readout_backward(cfg, z.back(), gain, dy, delta.back(), dgain);
  detail::mlp_backprop(cfg, w, z, delta, nullptr, tmp, dphi);
  for (Index l = 0; l < cfg.depth; ++l) detail::product_add<detail::Trans::no, detail::Trans::yes>(Scalar(1), delta[l], a[l], dw[l]);
  detail::product_add<detail::Trans::yes, detail::Trans::no>(Scalar(1), w[0], delta[0], dx);
  if (cfg.residual) dx += dy;
}

// The float and double instantiations (README, "Faster builds: titans::compiled"): PREFIX is `extern` for the
// declarations below and empty in src/instantiate_*.cpp, which define them.
#define TITANS_INSTANTIATE_MEMORY_MODEL(PREFIX, S) \
  PREFIX template MemoryWeights<S> zero_memory_weights<S>(const MemoryConfig&);                                 \
  PREFIX template MemoryWeights<S> init_memory_weights<S>(const MemoryConfig&, std::uint64_t, double);           \
  PREFIX template void check_memory_weights<S>(const char*, const char*, const MemoryConfig&,                    \
                                               const std::vector<Matrix<S>>&);                                  \
  PREFIX template Matrix<S> memory_apply<S>(const MemoryConfig&, const std::vector<Matrix<S>>&,                  \
                                            const ConstMatrixRef<S>&, const Vector<S>&);              \
  PREFIX template S inner_loss<S>(const MemoryConfig&, const std::vector<Matrix<S>>&,                            \
                                  const ConstMatrixRef<S>&, const ConstMatrixRef<S>&,       \
                                  const Vector<S>&, const Vector<S>&);                                                            \
  PREFIX template void inner_loss_gradient<S>(const MemoryConfig&, const std::vector<Matrix<S>>&,                \
                                              const ConstMatrixRef<S>&,                              \
                                              const ConstMatrixRef<S>&, const Vector<S>&,            \
                                              const Vector<S>&, std::vector<Matrix<S>>&);                                        \
  PREFIX template void memory_apply_backward<S>(const MemoryConfig&, const std::vector<Matrix<S>>&,              \
                                                const ConstMatrixRef<S>&, const Vector<S>&,          \
                                                const ConstMatrixRef<S>&, std::vector<Matrix<S>>&,   \
                                                MatrixRef<S>, Vector<S>*);

#ifdef TITANS_EXTERN_FLOAT
TITANS_INSTANTIATE_MEMORY_MODEL(extern, float)
#endif
#ifdef TITANS_EXTERN_DOUBLE
TITANS_INSTANTIATE_MEMORY_MODEL(extern, double)
#endif

}  // namespace titans
