// SPDX-License-Identifier: Apache-2.0
//
// The slow, obviously-right formulation of the memory update (docs/MATH.md §1–2, §8), independent
// of the library's kernel: per-token weights are materialised, the inner gradient is taken token by
// token by a hand-written backprop (the read-out LayerNorm through its explicit d×d Jacobian), the
// surprise clamp uses the Frobenius norm of the materialised gradient, and the chunked rule is the
// literal recurrence with gradients at the chunk-start weights. The attentional biases (docs/MATH.md
// §11) are written out from their definitions: the loss's gradient in r, entry by entry. Chunks are aligned to
// `start_position`; a call starting inside a chunk continues from the given chunk-start weights.
//
// Everything is templated on the scalar S with unqualified math calls, so the same loop runs in
// double (the kernel tests) and in forward-mode dual numbers (support/autodiff_reference.hpp, the
// backward tests). Nothing here shares code with the library; only its config type is used.
#pragma once

#include <titans/memory/kernel.hpp>

#include <cmath>
#include <vector>

namespace titans_test {

using titans::Index;

template <class S>
using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;
template <class S>
using Vec = Eigen::Matrix<S, Eigen::Dynamic, 1>;

template <class S>
S ref_phi(titans::Activation a, const S& z) {
  using std::erf;
  using std::exp;
  switch (a) {
    case titans::Activation::silu: return z / (S(1) + exp(-z));
    case titans::Activation::gelu: return S(0.5) * z * (S(1) + erf(z * S(0.70710678118654752440)));
    case titans::Activation::identity: return z;
  }
  return z;
}

template <class S>
S ref_dphi(titans::Activation a, const S& z) {
  using std::erf;
  using std::exp;
  switch (a) {
    case titans::Activation::silu: {
      const S s = S(1) / (S(1) + exp(-z));
      return s * (S(1) + z * (S(1) - s));
    }
    case titans::Activation::gelu:
      return S(0.5) * (S(1) + erf(z * S(0.70710678118654752440))) +
             z * exp(S(-0.5) * z * z) * S(0.39894228040143267794);
    case titans::Activation::identity: return S(1);
  }
  return S(1);
}

/// The kernel's inputs in the reference's scalar type.
template <class S>
struct RefInputs {
  Mat<S> k, v, q;            // (d, T)
  Vec<S> alpha, eta, theta;  // (T)
  Vec<S> gain;               // (d), read with output_norm
  Vec<S> threshold;          // (T), read with the huber bias
};

inline RefInputs<double> ref_inputs(const titans::KernelInputs<double>& in) {
  return {in.k, in.v, in.q, in.alpha, in.eta, in.theta, in.gain, in.threshold};
}

/// ∂ℓ(r)/∂r of the attentional bias for one residual r = M(k) − v: 2r (l2); Huber with threshold
/// δ: 2r for ‖r‖ ≤ δ, else the ℓ1 step 2δ sign(r_i); radial Huber: 2r, else 2δ r/‖r‖; ℓp:
/// p (r_i² + ε)^{p/2 − 1} r_i.
template <class S>
Vec<S> ref_bias_grad(const titans::MemoryConfig& cfg, const Vec<S>& r, const S& delta) {
  using std::pow;
  using std::sqrt;
  Vec<S> g = r;
  switch (cfg.bias) {
    case titans::AttentionalBias::l2:
      for (Index i = 0; i < r.size(); ++i) g(i) = S(2) * r(i);
      break;
    case titans::AttentionalBias::huber: {
      S n2 = S(0);
      for (Index i = 0; i < r.size(); ++i) n2 += r(i) * r(i);
      const S n = sqrt(n2);
      for (Index i = 0; i < r.size(); ++i)
        g(i) = n <= delta ? S(2) * r(i) : S(2) * delta * S(r(i) > S(0) ? 1 : r(i) < S(0) ? -1 : 0);
      break;
    }
    case titans::AttentionalBias::huber_radial: {
      S n2 = S(0);
      for (Index i = 0; i < r.size(); ++i) n2 += r(i) * r(i);
      const S n = sqrt(n2);
      for (Index i = 0; i < r.size(); ++i) g(i) = n <= delta ? S(2) * r(i) : S(2) * delta * r(i) / n;
      break;
    }
    case titans::AttentionalBias::lp:
      for (Index i = 0; i < r.size(); ++i)
        g(i) = S(cfg.bias_p) * pow(r(i) * r(i) + S(cfg.bias_eps), cfg.bias_p / 2 - 1) * r(i);
      break;
  }
  return g;
}

/// LayerNorm of one column and its Jacobian d LN(z) / dz, built entry by entry.
template <class S>
void ref_layer_norm(const Vec<S>& z, double eps, Vec<S>& zhat, Mat<S>& jac) {
  using std::sqrt;
  const Index d = z.size();
  S mean = S(0);
  for (Index i = 0; i < d; ++i) mean += z(i);
  mean = mean / S(static_cast<double>(d));
  S var = S(0);
  for (Index i = 0; i < d; ++i) var += (z(i) - mean) * (z(i) - mean);
  var = var / S(static_cast<double>(d));
  const S sigma = sqrt(var + S(eps));
  zhat.resize(d);
  for (Index i = 0; i < d; ++i) zhat(i) = (z(i) - mean) / sigma;
  jac.resize(d, d);
  for (Index i = 0; i < d; ++i)
    for (Index j = 0; j < d; ++j)
      jac(i, j) = ((i == j ? S(1) : S(0)) - S(1.0 / static_cast<double>(d)) -
                   zhat(i) * zhat(j) / S(static_cast<double>(d))) /
                  sigma;
}

/// The read-out of z_L for input x: [x +] (output_norm ? γ ⊙ LN(z) : z).
template <class S>
Vec<S> ref_readout(const titans::MemoryConfig& cfg, const Vec<S>& z, const Vec<S>& x, const Vec<S>& gain) {
  Vec<S> out = z;
  if (cfg.output_norm) {
    Vec<S> zhat;
    Mat<S> jac;
    ref_layer_norm<S>(z, cfg.norm_eps, zhat, jac);
    for (Index i = 0; i < z.size(); ++i) out(i) = gain(i) * zhat(i);
  }
  if (cfg.residual) out += x;
  return out;
}

/// M_W(x) for one token.
template <class S>
Vec<S> ref_apply(const titans::MemoryConfig& cfg, const std::vector<Mat<S>>& w, const Vec<S>& x, const Vec<S>& gain) {
  Vec<S> a = x;
  for (std::size_t l = 0; l < w.size(); ++l) {
    Vec<S> z = w[l] * a;
    if (l + 1 < w.size())
      for (Index i = 0; i < z.size(); ++i) z(i) = ref_phi(cfg.activation, z(i));
    a = z;
  }
  return ref_readout<S>(cfg, a, x, gain);
}

/// ∇_W ℓ(M_W(k) − v) for one token, by per-token backprop (`delta`: the huber threshold δ_t).
template <class S>
std::vector<Mat<S>> ref_grad(const titans::MemoryConfig& cfg, const std::vector<Mat<S>>& w, const Vec<S>& k,
                             const Vec<S>& v, const Vec<S>& gain, const S& threshold = S(1)) {
  const std::size_t L = w.size();
  std::vector<Vec<S>> in(L), pre(L);
  Vec<S> a = k;
  for (std::size_t l = 0; l < L; ++l) {
    in[l] = a;
    pre[l] = w[l] * a;
    a = pre[l];
    if (l + 1 < L)
      for (Index i = 0; i < a.size(); ++i) a(i) = ref_phi(cfg.activation, pre[l](i));
  }
  const Vec<S> err = ref_bias_grad<S>(cfg, ref_readout<S>(cfg, a, k, gain) - v, threshold);  // dℓ/dM
  Vec<S> delta = err;
  if (cfg.output_norm) {  // dℓ/dz_L = J_LNᵀ (γ ⊙ dℓ/dM)
    Vec<S> zhat;
    Mat<S> jac;
    ref_layer_norm<S>(a, cfg.norm_eps, zhat, jac);
    Vec<S> g = err;
    for (Index i = 0; i < g.size(); ++i) g(i) = gain(i) * err(i);
    delta = jac.transpose() * g;
  }
  std::vector<Mat<S>> grad(L);
  for (std::size_t l = L; l-- > 0;) {
    grad[l] = delta * in[l].transpose();
    if (l > 0) {
      Vec<S> back = w[l].transpose() * delta;
      for (Index i = 0; i < back.size(); ++i) back(i) = back(i) * ref_dphi(cfg.activation, pre[l - 1](i));
      delta = back;
    }
  }
  return grad;
}

template <class S>
struct RefResult {
  Mat<S> y;
  std::vector<Mat<S>> w, s, c;  // final weights, momentum, chunk-start weights (empty at a boundary)
};

/// The chunked rule, token by token, for a call whose first token has absolute index
/// `start_position`; `c` are the chunk-start weights when that index is inside a chunk. Per token:
/// u at the chunk-start weights, the clamp θ·min(1, c/‖u‖_F), S and Θ updated, and the output
/// read at the weights after the token's own write.
template <class S>
RefResult<S> ref_chunk_loop(const titans::MemoryConfig& cfg, Index b, Index start_position, const RefInputs<S>& in,
                            std::vector<Mat<S>> w, std::vector<Mat<S>> s, std::vector<Mat<S>> c) {
  using std::sqrt;
  const Index T = in.k.cols();
  RefResult<S> r;
  r.y.resize(in.k.rows(), T);
  std::vector<Mat<S>> w0 = start_position % b == 0 ? w : c;
  for (Index t = 0; t < T; ++t) {
    if ((start_position + t) % b == 0) w0 = w;
    const auto u = ref_grad<S>(cfg, w0, in.k.col(t), in.v.col(t), in.gain,
                               in.threshold.size() > 0 ? S(in.threshold(t)) : S(1));
    S theta = in.theta(t);
    if (cfg.surprise_clamp > 0) {
      S norm2 = S(0);
      for (const auto& m : u)
        for (Index i = 0; i < m.size(); ++i) norm2 += m(i) * m(i);
      const S norm = sqrt(norm2);
      if (norm > S(cfg.surprise_clamp)) theta = theta * S(cfg.surprise_clamp) / norm;
    }
    for (std::size_t l = 0; l < w.size(); ++l) {
      s[l] = in.eta(t) * s[l] - theta * u[l];
      w[l] = (S(1) - in.alpha(t)) * w[l] + s[l];
    }
    r.y.col(t) = ref_apply<S>(cfg, w, in.q.col(t), in.gain);
  }
  r.w = w;
  r.s = s;
  if ((start_position + T) % b != 0) r.c = w0;
  return r;
}

/// The same from position 0 (a fresh chunk), in double.
inline RefResult<double> ref_chunk_loop(const titans::MemoryConfig& cfg, Index b, const titans::KernelInputs<double>& in,
                                        std::vector<Mat<double>> w, std::vector<Mat<double>> s) {
  return ref_chunk_loop<double>(cfg, b, 0, ref_inputs(in), std::move(w), std::move(s), {});
}

}  // namespace titans_test
