// SPDX-License-Identifier: Apache-2.0
//
// Forward-mode derivatives of the literal memory update, as an independent check of the
// kernel's backward pass: a tiny dual-number type (value + one directional derivative) in which
// the templated reference loop of reference_memory.hpp runs (its unqualified math calls resolve
// to the dual overloads by argument-dependent lookup). Nothing here shares code with the kernel.
#pragma once

#include "reference_memory.hpp"

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
inline Dual pow(const Dual& a, double p) {
  const double x = std::pow(a.v, p);
  return {x, p * std::pow(a.v, p - 1) * a.d};
}

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
