// SPDX-License-Identifier: Apache-2.0
//
// The slow, obviously-right formulation of the memory update (MATH.md §1–2), independent of the
// library's kernel: per-token weights are materialised, gradients are taken token by token with
// a hand-written backprop over std::vector-based per-token activations, and the chunked rule is
// the literal recurrence with gradients at the chunk-start weights.
#pragma once

#include <titans/memory_model.hpp>

#include <cmath>
#include <vector>

namespace titans_test {

using titans::Index;

template <class S>
using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;
template <class S>
using Vec = Eigen::Matrix<S, Eigen::Dynamic, 1>;

template <class S>
S ref_phi(titans::Activation a, S z) {
  switch (a) {
    case titans::Activation::silu: return z / (S(1) + std::exp(-z));
    case titans::Activation::gelu: return S(0.5) * z * (S(1) + std::erf(z / std::sqrt(S(2))));
    case titans::Activation::identity: return z;
  }
  return z;
}

template <class S>
S ref_dphi(titans::Activation a, S z) {
  switch (a) {
    case titans::Activation::silu: {
      const S s = S(1) / (S(1) + std::exp(-z));
      return s + z * s * (S(1) - s);
    }
    case titans::Activation::gelu: {
      const S pi = S(3.14159265358979323846);
      return S(0.5) * (S(1) + std::erf(z / std::sqrt(S(2)))) + z * std::exp(-z * z / S(2)) / std::sqrt(S(2) * pi);
    }
    case titans::Activation::identity: return S(1);
  }
  return S(1);
}

/// M_W(x) for one token.
template <class S>
Vec<S> ref_apply(const titans::MemoryConfig& cfg, const std::vector<Mat<S>>& w, const Vec<S>& x) {
  Vec<S> a = x;
  for (std::size_t l = 0; l < w.size(); ++l) {
    Vec<S> z = w[l] * a;
    if (l + 1 < w.size()) {
      for (Index i = 0; i < z.size(); ++i) z(i) = ref_phi(cfg.activation, z(i));
    }
    a = z;
  }
  if (cfg.residual) a += x;
  return a;
}

/// ∇_W ||M_W(k) − v||² for one token.
template <class S>
std::vector<Mat<S>> ref_grad(const titans::MemoryConfig& cfg, const std::vector<Mat<S>>& w, const Vec<S>& k,
                             const Vec<S>& v) {
  const std::size_t L = w.size();
  std::vector<Vec<S>> acts(L + 1), pre(L);
  acts[0] = k;
  for (std::size_t l = 0; l < L; ++l) {
    pre[l] = w[l] * acts[l];
    acts[l + 1] = pre[l];
    if (l + 1 < L)
      for (Index i = 0; i < pre[l].size(); ++i) acts[l + 1](i) = ref_phi(cfg.activation, pre[l](i));
  }
  Vec<S> out = pre[L - 1];
  if (cfg.residual) out += k;
  Vec<S> delta = S(2) * (out - v);
  std::vector<Mat<S>> g(L);
  for (std::size_t l = L; l-- > 0;) {
    g[l] = delta * acts[l].transpose();
    if (l > 0) {
      Vec<S> back = w[l].transpose() * delta;
      for (Index i = 0; i < back.size(); ++i) back(i) *= ref_dphi(cfg.activation, pre[l - 1](i));
      delta = back;
    }
  }
  return g;
}

/// The chunked rule literally: per token, u_t at the chunk-start weights, S and Θ updated,
/// output read at the weights after the token's own write. Chunks aligned to `start_position`
/// continuing from the given chunk-start weights when `start_position % b != 0`.
template <class S>
struct RefResult {
  Mat<S> y;
  std::vector<Mat<S>> w, s;
};

template <class S>
RefResult<S> ref_chunk_loop(const titans::MemoryConfig& cfg, Index b, const Mat<S>& k, const Mat<S>& v,
                            const Mat<S>& q, const Vec<S>& alpha, const Vec<S>& eta, const Vec<S>& theta,
                            std::vector<Mat<S>> w, std::vector<Mat<S>> s) {
  const Index T = k.cols();
  RefResult<S> r;
  r.y.resize(k.rows(), T);
  std::vector<Mat<S>> w0 = w;
  for (Index t = 0; t < T; ++t) {
    if (t % b == 0) w0 = w;  // chunk start
    const auto u = ref_grad<S>(cfg, w0, k.col(t), v.col(t));
    for (std::size_t l = 0; l < w.size(); ++l) {
      s[l] = eta(t) * s[l] - theta(t) * u[l];
      w[l] = (S(1) - alpha(t)) * w[l] + s[l];
    }
    r.y.col(t) = ref_apply<S>(cfg, w, q.col(t));
  }
  r.w = w;
  r.s = s;
  return r;
}

}  // namespace titans_test
