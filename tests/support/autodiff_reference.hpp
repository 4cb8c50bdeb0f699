// SPDX-License-Identifier: Apache-2.0
//
// Forward-mode derivatives of the literal memory update, as an independent check of the
// kernel's backward pass. A tiny dual-number type (value + one directional derivative) and the
// chunk/token loop of reference_memory.hpp written once more with unqualified math calls (so
// they resolve to the dual overloads by argument-dependent lookup), extended to calls that start
// inside a chunk: chunks are aligned to `start_position`, and a call starting inside one
// continues from the given chunk-start weights. Nothing here shares code with the library's
// kernel; only its configuration type and activation enum are used.
#pragma once

#include <titans/memory_model.hpp>

#include <cmath>
#include <vector>

namespace titans_test {

/// v + ε d with ε² = 0: one directional derivative carried alongside the value.
struct Dual {
  double v = 0, d = 0;
  Dual() = default;
  Dual(double value) : v(value) {}  // NOLINT: implicit, so literals and Eigen's constants work
  Dual(double value, double deriv) : v(value), d(deriv) {}
  Dual& operator+=(const Dual& o) { v += o.v; d += o.d; return *this; }
  Dual& operator-=(const Dual& o) { v -= o.v; d -= o.d; return *this; }
  Dual& operator*=(const Dual& o) { d = d * o.v + v * o.d; v *= o.v; return *this; }
  Dual& operator/=(const Dual& o) { d = (d * o.v - v * o.d) / (o.v * o.v); v /= o.v; return *this; }
};
inline Dual operator+(Dual a, const Dual& b) { return a += b; }
inline Dual operator-(Dual a, const Dual& b) { return a -= b; }
inline Dual operator*(Dual a, const Dual& b) { return a *= b; }
inline Dual operator/(Dual a, const Dual& b) { return a /= b; }
inline Dual operator-(const Dual& a) { return {-a.v, -a.d}; }
inline Dual operator+(const Dual& a) { return a; }
inline bool operator==(const Dual& a, const Dual& b) { return a.v == b.v && a.d == b.d; }
inline bool operator!=(const Dual& a, const Dual& b) { return !(a == b); }
inline bool operator<(const Dual& a, const Dual& b) { return a.v < b.v; }
inline bool operator>(const Dual& a, const Dual& b) { return a.v > b.v; }
inline bool operator<=(const Dual& a, const Dual& b) { return a.v <= b.v; }
inline bool operator>=(const Dual& a, const Dual& b) { return a.v >= b.v; }
inline Dual exp(const Dual& a) {
  const double e = std::exp(a.v);
  return {e, e * a.d};
}
inline Dual erf(const Dual& a) {
  return {std::erf(a.v), 1.12837916709551257390 * std::exp(-a.v * a.v) * a.d};  // 2/√π e^{−x²}
}
inline Dual sqrt(const Dual& a) {
  const double s = std::sqrt(a.v);
  return {s, a.d / (2 * s)};
}
inline Dual abs(const Dual& a) { return a.v < 0 ? -a : a; }

}  // namespace titans_test

namespace Eigen {
template <>
struct NumTraits<titans_test::Dual> : GenericNumTraits<titans_test::Dual> {
  using Real = titans_test::Dual;
  using NonInteger = titans_test::Dual;
  using Literal = titans_test::Dual;
  using Nested = titans_test::Dual;
  enum {
    IsComplex = 0,
    IsInteger = 0,
    IsSigned = 1,
    RequireInitialization = 1,
    ReadCost = 2,
    AddCost = 2,
    MulCost = 3
  };
  static Real epsilon() { return NumTraits<double>::epsilon(); }
  static Real dummy_precision() { return NumTraits<double>::dummy_precision(); }
  static Real highest() { return NumTraits<double>::highest(); }
  static Real lowest() { return NumTraits<double>::lowest(); }
  static int digits10() { return NumTraits<double>::digits10(); }
};
}  // namespace Eigen

namespace titans_test {

using titans::Index;

template <class S>
using DMat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;
template <class S>
using DVec = Eigen::Matrix<S, Eigen::Dynamic, 1>;

template <class S>
S ad_phi(titans::Activation a, const S& z) {
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
S ad_dphi(titans::Activation a, const S& z) {
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

/// M_W(x) for one token.
template <class S>
DVec<S> ad_apply(const titans::MemoryConfig& cfg, const std::vector<DMat<S>>& w, const DVec<S>& x) {
  DVec<S> a = x;
  for (std::size_t l = 0; l < w.size(); ++l) {
    DVec<S> z = w[l] * a;
    if (l + 1 < w.size())
      for (Index i = 0; i < z.size(); ++i) z(i) = ad_phi(cfg.activation, z(i));
    a = z;
  }
  if (cfg.residual) a += x;
  return a;
}

/// ∇_W ||M_W(k) − v||² for one token, by per-token backprop.
template <class S>
std::vector<DMat<S>> ad_grad(const titans::MemoryConfig& cfg, const std::vector<DMat<S>>& w, const DVec<S>& k,
                             const DVec<S>& v) {
  const std::size_t L = w.size();
  std::vector<DVec<S>> in(L), pre(L);
  DVec<S> a = k;
  for (std::size_t l = 0; l < L; ++l) {
    in[l] = a;
    pre[l] = w[l] * a;
    a = pre[l];
    if (l + 1 < L)
      for (Index i = 0; i < a.size(); ++i) a(i) = ad_phi(cfg.activation, pre[l](i));
  }
  if (cfg.residual) a += k;
  DVec<S> delta = S(2) * (a - v);
  std::vector<DMat<S>> g(L);
  for (std::size_t l = L; l-- > 0;) {
    g[l] = delta * in[l].transpose();
    if (l > 0) {
      DVec<S> back = w[l].transpose() * delta;
      for (Index i = 0; i < back.size(); ++i) back(i) = back(i) * ad_dphi(cfg.activation, pre[l - 1](i));
      delta = back;
    }
  }
  return g;
}

template <class S>
struct AdResult {
  DMat<S> y;
  std::vector<DMat<S>> w, s, c;  // final weights, momentum, chunk-start weights (empty at a boundary)
};

/// The chunked rule, token by token, for a call whose first token has absolute index
/// `start_position`; `c` are the chunk-start weights when that index is inside a chunk.
template <class S>
AdResult<S> ad_chunk_loop(const titans::MemoryConfig& cfg, Index b, Index start_position, const DMat<S>& k,
                          const DMat<S>& v, const DMat<S>& q, const DVec<S>& alpha, const DVec<S>& eta,
                          const DVec<S>& theta, std::vector<DMat<S>> w, std::vector<DMat<S>> s,
                          std::vector<DMat<S>> c) {
  const Index T = k.cols();
  AdResult<S> r;
  r.y.resize(k.rows(), T);
  std::vector<DMat<S>> w0 = start_position % b == 0 ? w : c;
  for (Index t = 0; t < T; ++t) {
    if ((start_position + t) % b == 0) w0 = w;
    const auto u = ad_grad<S>(cfg, w0, k.col(t), v.col(t));
    for (std::size_t l = 0; l < w.size(); ++l) {
      s[l] = eta(t) * s[l] - theta(t) * u[l];
      w[l] = (S(1) - alpha(t)) * w[l] + s[l];
    }
    r.y.col(t) = ad_apply<S>(cfg, w, q.col(t));
  }
  r.w = w;
  r.s = s;
  if ((start_position + T) % b != 0) r.c = w0;
  return r;
}

}  // namespace titans_test
