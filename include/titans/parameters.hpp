// SPDX-License-Identifier: Apache-2.0
//
// \file parameters.hpp
// \brief Named-parameter enumeration: the one interface optimizers, checkpoints and gradient
// checks use to see a module's tensors.
//
// A *parameter set* is any type `P` with
//
//     template <class F> void for_each(F&& f);        // f(const std::string& name, Matrix<Scalar>& t)
//     template <class F> void for_each(F&& f) const;  // f(const std::string& name, const Matrix<Scalar>& t)
//     using scalar_type = Scalar;
//
// visiting every tensor once, in a fixed order, under a unique dotted name ("w_k", "memory.h0.w1").
// Gradients have the same type as the parameters they belong to (llm.c): backward *adds* into them,
// and zeroing is a separate call (set_zero).
#pragma once

#include "common.hpp"

#include <set>
#include <string>
#include <vector>

namespace titans {

/// \brief Sets every tensor of a parameter set (or gradient) to zero, keeping the shapes.
template <class P>
void set_zero(P& params) {
  params.for_each([](const std::string&, auto& t) { t.setZero(); });
}

/// \brief A copy of `params` with every tensor zero: a fresh gradient accumulator.
template <class P>
P zeros_like(const P& params) {
  P out = params;
  set_zero(out);
  return out;
}

/// \brief Total number of scalars in a parameter set.
template <class P>
Index parameter_count(const P& params) {
  Index n = 0;
  params.for_each([&](const std::string&, const auto& t) { n += t.size(); });
  return n;
}

/// \brief The names of a parameter set's tensors, in enumeration order.
template <class P>
std::vector<std::string> parameter_names(const P& params) {
  std::vector<std::string> names;
  params.for_each([&](const std::string& name, const auto&) { names.push_back(name); });
  return names;
}

/// \brief Throws InvalidArgument if two tensors share a name (a programming error in a module).
template <class P>
void check_unique_names(const char* where, const P& params) {
  std::set<std::string> seen;
  params.for_each([&](const std::string& name, const auto&) {
    if (!seen.insert(name).second) detail::raise<InvalidArgument>(where, "duplicate parameter name '", name, "'");
  });
}

/// \brief Throws ShapeError unless `b` has the same tensor names and shapes as `a`.
template <class P>
void check_same_layout(const char* where, const P& a, const P& b) {
  std::vector<std::pair<std::string, std::pair<Index, Index>>> la, lb;
  a.for_each([&](const std::string& n, const auto& t) { la.push_back({n, {t.rows(), t.cols()}}); });
  b.for_each([&](const std::string& n, const auto& t) { lb.push_back({n, {t.rows(), t.cols()}}); });
  if (la.size() != lb.size()) {
    detail::raise<ShapeError>(where, "parameter sets hold ", la.size(), " and ", lb.size(), " tensors");
  }
  for (std::size_t i = 0; i < la.size(); ++i) {
    if (la[i] != lb[i]) {
      detail::raise<ShapeError>(where, "tensor ", i, " is '", la[i].first, "' (", la[i].second.first, ", ",
                                la[i].second.second, ") in one set and '", lb[i].first, "' (", lb[i].second.first,
                                ", ", lb[i].second.second, ") in the other");
    }
  }
}

/// \brief Throws NumericError naming the first tensor of `set` that holds a NaN or an
/// infinity, and the entry: "<kind> '<name>' has a non-finite value … at (i, j)".
template <class P>
void check_finite_tensors(const char* where, const char* kind, const P& set) {
  set.for_each([&](const std::string& name, const auto& t) {
    if (!t.allFinite()) detail::check_finite(where, (std::string(kind) + " '" + name + "'").c_str(), t);
  });
}

namespace detail {

/// Runs fn() and returns its result. Parameters are not scanned on every call (a decode step
/// would pay for it); only when fn throws NumericError are they looked at, and a non-finite
/// parameter, the cause, is then named instead; otherwise the error is rethrown unchanged.
template <class P, class Fn>
decltype(auto) naming_bad_parameters(const char* where, const P& params, Fn&& fn) {
  try {
    return fn();
  } catch (const NumericError&) {
    check_finite_tensors(where, "parameter", params);
    throw;
  }
}

/// Throws NumericError if the output of a layer whose inputs were checked is not finite: a
/// non-finite parameter is named if there is one, otherwise the output entry.
template <class P, class Derived>
void check_finite_output(const char* where, const P& params, const Eigen::DenseBase<Derived>& out) {
  if (out.allFinite()) return;
  check_finite_tensors(where, "parameter", params);
  check_finite(where, "the output (inputs and parameters are finite: an overflow)", out);
}

}  // namespace detail

/// \brief dst += src, tensor by tensor (same names and shapes, checked).
template <class P>
void add_to(P& dst, const P& src) {
  check_same_layout("titans::add_to", dst, src);
  std::vector<const Matrix<typename P::scalar_type>*> from;
  src.for_each([&](const std::string&, const auto& t) { from.push_back(&t); });
  std::size_t i = 0;
  dst.for_each([&](const std::string&, auto& t) { t += *from[i++]; });
}

}  // namespace titans
