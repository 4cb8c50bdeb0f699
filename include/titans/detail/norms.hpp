// SPDX-License-Identifier: Apache-2.0
//
// \file detail/norms.hpp
// \brief The normalisations the layers share, with their backward passes. "groups" splits the
// rows into equal slices normalised separately (one per head; 1 for the whole column).
#pragma once

#include "../common.hpp"

#include <cmath>

namespace titans {
namespace detail {

template <class Scalar>
Matrix<Scalar> sigmoid(const Matrix<Scalar>& z) {
  return (Scalar(1) / (Scalar(1) + (-z.array()).exp())).matrix();
}

/// n = x / sqrt(mean(x²) + ε) per group of rows and column; rinv (groups, T) keeps the factors.
template <class Scalar>
Matrix<Scalar> rms_normalize(const Matrix<Scalar>& x, Index groups, double eps, Matrix<Scalar>* rinv) {
  const Index T = x.cols(), d = x.rows() / groups;
  const Scalar e = static_cast<Scalar>(eps);
  Matrix<Scalar> n(x.rows(), T);
  if (rinv) rinv->resize(groups, T);
  for (Index t = 0; t < T; ++t)
    for (Index h = 0; h < groups; ++h) {
      const auto seg = x.col(t).segment(h * d, d);
      const Scalar r = Scalar(1) / std::sqrt(seg.squaredNorm() / Scalar(d) + e);
      n.col(t).segment(h * d, d) = r * seg;
      if (rinv) (*rinv)(h, t) = r;
    }
  return n;
}

/// Backward of rms_normalize: dx += rinv (dn − n (dn·n) / d), per group.
template <class Scalar>
void rms_normalize_backward(const Matrix<Scalar>& dn, const Matrix<Scalar>& n, const Matrix<Scalar>& rinv,
                            Index groups, MatrixRef<Scalar> dx) {
  const Index d = n.rows() / groups;
  for (Index t = 0; t < n.cols(); ++t)
    for (Index h = 0; h < groups; ++h) {
      const auto ns = n.col(t).segment(h * d, d);
      const auto dns = dn.col(t).segment(h * d, d);
      dx.col(t).segment(h * d, d) += rinv(h, t) * (dns - ns * (dns.dot(ns) / Scalar(d)));
    }
}

/// RMSNorm with a gain over whole columns: y = g ⊙ x / sqrt(mean(x²) + ε); rinv (1, T).
template <class Scalar>
Matrix<Scalar> rms_norm(const Matrix<Scalar>& x, const Matrix<Scalar>& gain, double eps, Matrix<Scalar>* rinv) {
  return gain.col(0).asDiagonal() * rms_normalize(x, 1, eps, rinv);
}

/// Backward of rms_norm: dx += ∂, dgain += ∂.
template <class Scalar>
void rms_norm_backward(const Matrix<Scalar>& x, const Matrix<Scalar>& gain, const Matrix<Scalar>& rinv,
                       const Matrix<Scalar>& dy, Matrix<Scalar>& dx, Matrix<Scalar>& dgain) {
  const Matrix<Scalar> n = x * rinv.row(0).asDiagonal();
  dgain.col(0) += dy.cwiseProduct(n).rowwise().sum();
  rms_normalize_backward<Scalar>(gain.col(0).asDiagonal() * dy, n, rinv, 1, dx);
}

/// x ← x / sqrt(‖x‖² + ε) per group of rows and column, in place.
template <class Scalar>
void l2_normalize(Matrix<Scalar>& x, Index groups, double eps) {
  const Index d = x.rows() / groups;
  const Scalar e = static_cast<Scalar>(eps);
  for (Index t = 0; t < x.cols(); ++t)
    for (Index h = 0; h < groups; ++h) {
      auto seg = x.col(t).segment(h * d, d);
      seg /= std::sqrt(seg.squaredNorm() + e);
    }
}

/// Backward of l2_normalize: with n = s ρ, ρ = (‖s‖² + ε)^(−1/2), turns d = ∂L/∂n into
/// ∂L/∂s = ρ (d − n (d·n)), in place; `raw` is s.
template <class Scalar>
void l2_normalize_backward(Matrix<Scalar>& d, const Matrix<Scalar>& n, const Matrix<Scalar>& raw, Index groups,
                           double eps) {
  const Index w = n.rows() / groups;
  const Scalar e = static_cast<Scalar>(eps);
  for (Index t = 0; t < n.cols(); ++t)
    for (Index h = 0; h < groups; ++h) {
      auto seg = d.col(t).segment(h * w, w);
      const auto ns = n.col(t).segment(h * w, w);
      const Scalar rho = Scalar(1) / std::sqrt(raw.col(t).segment(h * w, w).squaredNorm() + e);
      seg = rho * (seg - ns * seg.dot(ns));
    }
}

}  // namespace detail
}  // namespace titans
