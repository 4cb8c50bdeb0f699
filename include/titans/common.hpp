// titans: Titans neural long-term memory (Behrouz, Zhong, Mirrokni, arXiv:2501.00663) in C++.
// SPDX-License-Identifier: Apache-2.0
//
// \file common.hpp
// \brief Types, exceptions and argument checks shared by every titans header.
//
// Layout (docs/MATH.md §0): a sequence is a matrix with one token per column, `(features, T)`,
// column-major; weights act from the left, `y = W x` with `W` of shape `(out, in)`.
#pragma once

#include <Eigen/Dense>

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// Explicit instantiations (cmake/TitansCompiled.cmake): under TITANS_EXTERN_FLOAT and/or
// TITANS_EXTERN_DOUBLE every heavy template's float / double instantiation is declared
// `extern template`, to be found in titans::compiled, which defines the macros for the scalar
// types it holds. TITANS_EXTERN_TEMPLATES means both.
#ifdef TITANS_EXTERN_TEMPLATES
#ifndef TITANS_EXTERN_FLOAT
#define TITANS_EXTERN_FLOAT 1
#endif
#ifndef TITANS_EXTERN_DOUBLE
#define TITANS_EXTERN_DOUBLE 1
#endif
#endif

/// Inside a struct that defines `template <class Self, class F> static void for_each_impl(Self&, F&)`
/// (calling f(name, tensor) for each of its tensors), declares the const and non-const
/// `for_each(f)` of the parameter-set concept (parameters.hpp) that forward to it.
#define TITANS_DEFINE_FOR_EACH()          \
  template <class F>                      \
  void for_each(F&& f) {                  \
    for_each_impl(*this, f);              \
  }                                       \
  template <class F>                      \
  void for_each(F&& f) const {            \
    for_each_impl(*this, f);              \
  }

/// Inside a state struct that defines `template <class Self, class Ar> static void fields(Self&, Ar&)`
/// (listing, once, everything the state holds: ar.tensor, ar.tensor_list, ar.nested, ar.count,
/// ar.flag), declares `for_each(f)` (its tensors, as a parameter set: parameters.hpp) and
/// `visit(ar)` (every field, for saving and loading a session: io/session.hpp).
#define TITANS_DEFINE_STATE_FIELDS()                   \
  template <class F>                                   \
  void for_each(F&& f) {                               \
    ::titans::detail::TensorVisitor<F> v{f, {}};       \
    fields(*this, v);                                  \
  }                                                    \
  template <class F>                                   \
  void for_each(F&& f) const {                         \
    ::titans::detail::TensorVisitor<F> v{f, {}};       \
    fields(*this, v);                                  \
  }                                                    \
  template <class Ar>                                  \
  void visit(Ar& ar) {                                 \
    fields(*this, ar);                                 \
  }                                                    \
  template <class Ar>                                  \
  void visit(Ar& ar) const {                           \
    fields(*this, ar);                                 \
  }

namespace titans {

using Index = Eigen::Index;

namespace detail {

/// The field visitor behind a state's for_each: calls f(name, tensor) for each tensor (lists
/// as name1, name2, …; nested states under their prefix) and skips counters and flags.
template <class F>
struct TensorVisitor {
  F& f;
  std::string prefix;
  template <class M>
  void tensor(const std::string& name, M& t) {
    f(prefix + name, t);
  }
  /// `like`: the list is optional and, when present, has the count and shapes of *like.
  template <class L, class Like = L>
  void tensor_list(const std::string& name, L& list, const Like* /*like*/ = nullptr) {
    for (std::size_t l = 0; l < list.size(); ++l) f(prefix + name + std::to_string(l + 1), list[l]);
  }
  /// A tensor that may be absent (a memory's pending tokens): listed only when it holds values,
  /// so that states without it, their gradients and their files have no such entry.
  template <class M>
  void optional_tensor(const std::string& name, M& t) {
    if (t.size() > 0) f(prefix + name, t);
  }
  template <class S>
  void nested(const std::string& name, S& s) {
    const std::size_t n = prefix.size();
    prefix += name;
    s.visit(*this);
    prefix.resize(n);
  }
  template <class I>
  void count(const std::string&, I&) {}
  template <class B>
  void flag(const std::string&, B&) {}
};

}  // namespace detail

/// \brief Dense column-major matrix; every tensor in titans is one (vectors are `(n, 1)`).
template <class Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

/// \brief Dense column vector.
template <class Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// \brief A read-only / writable view of a matrix argument: the same types as
/// `Eigen::Ref<const Matrix<Scalar>>` and `Eigen::Ref<Matrix<Scalar>>`, with the stride spelled out. Function templates
/// take these rather than the two-argument spelling: there the default stride is a dependent
/// expression, which clang 14 mangles differently in different translation units, so an
/// explicitly instantiated function (titans::compiled) would not link.
template <class Scalar>
using ConstMatrixRef = Eigen::Ref<const Matrix<Scalar>, 0, Eigen::OuterStride<>>;
template <class Scalar>
using MatrixRef = Eigen::Ref<Matrix<Scalar>, 0, Eigen::OuterStride<>>;
static_assert(std::is_same_v<ConstMatrixRef<double>, Eigen::Ref<const Matrix<double>>> &&
                  std::is_same_v<MatrixRef<float>, Eigen::Ref<Matrix<float>>>,
              "titans: ConstMatrixRef / MatrixRef must be Eigen's default Ref types");

// ---------------------------------------------------------------------------------------------
// Exceptions. Every public entry point checks its arguments in every build type and throws one
// of these; the message names the function, the argument, what was found and what was expected.
// ---------------------------------------------------------------------------------------------

/// \brief A configuration field or function argument has an invalid value.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// \brief A matrix argument has the wrong shape.
class ShapeError : public InvalidArgument {
 public:
  using InvalidArgument::InvalidArgument;
};

/// \brief An input holds a non-finite value (NaN or infinity) or a value outside its domain.
class NumericError : public std::domain_error {
 public:
  using std::domain_error::domain_error;
};

/// \brief A file (checkpoint) is malformed, truncated or does not match the model.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// \brief A file could not be opened, read or written.
class IoError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  return os.str();
}

template <class Exception, class... Parts>
[[noreturn]] void raise(const char* where, Parts&&... parts) {
  throw Exception(concat(where, ": ", std::forward<Parts>(parts)...));
}

/// Throws InvalidArgument unless lo <= v <= hi, naming the field.
inline void check_range(const char* where, const char* field, Index v, Index lo, Index hi) {
  if (v < lo || v > hi) raise<InvalidArgument>(where, field, " is ", v, ", expected a value in [", lo, ", ", hi, "]");
}

}  // namespace detail

/// \brief Upper bounds of the config integers, far above any model this library runs well, and
/// low enough that sizes computed from them cannot overflow: a file's config is checked against
/// them (and its parameter count against the bytes the file holds) before anything is allocated.
namespace limits {
inline constexpr Index dim = Index(1) << 16;          ///< model width D, memory width
inline constexpr Index vocab = Index(1) << 24;        ///< vocabulary
inline constexpr Index layers = 1024;                 ///< blocks of a model
inline constexpr Index depth = 16;                    ///< memory MLP depth L
inline constexpr Index expansion = 64;                ///< memory hidden-width factor E
inline constexpr Index chunk_size = Index(1) << 16;   ///< memory chunk b
inline constexpr Index conv_kernel = 1024;            ///< convolution width K
inline constexpr Index span = Index(1) << 24;         ///< attention window w, MAC segment C
inline constexpr Index persistent = Index(1) << 16;   ///< persistent tokens N_p
inline constexpr Index memory_tokens = Index(1) << 16;  ///< MAC memory tokens N_l
inline constexpr Index ffn_hidden = Index(1) << 20;   ///< SwiGLU hidden width
inline constexpr Index block = Index(1) << 16;        ///< attention query block; checkpoint_every
}  // namespace limits

namespace detail {

/// Throws ShapeError unless `m` is `(rows, cols)`; a negative expected size matches anything.
template <class Derived>
void check_shape(const char* where, const char* what, const Eigen::EigenBase<Derived>& m, Index rows,
                 Index cols) {
  if ((rows >= 0 && m.rows() != rows) || (cols >= 0 && m.cols() != cols)) {
    raise<ShapeError>(where, what, " has shape (", m.rows(), ", ", m.cols(), "), expected (",
                      rows >= 0 ? std::to_string(rows) : std::string("any"), ", ",
                      cols >= 0 ? std::to_string(cols) : std::string("any"), ")");
  }
}

/// Throws NumericError if `m` holds a NaN or an infinity, naming the first such entry.
template <class Derived>
void check_finite(const char* where, const char* what, const Eigen::DenseBase<Derived>& m) {
  for (Index j = 0; j < m.cols(); ++j) {
    for (Index i = 0; i < m.rows(); ++i) {
      if (!std::isfinite(static_cast<double>(m(i, j)))) {
        raise<NumericError>(where, what, " has a non-finite value ", static_cast<double>(m(i, j)),
                            " at (", i, ", ", j, ")");
      }
    }
  }
}

/// Throws NumericError unless every entry of `m` lies in [lo, hi] (and is finite).
template <class Derived>
void check_range(const char* where, const char* what, const Eigen::DenseBase<Derived>& m, double lo,
                 double hi) {
  for (Index j = 0; j < m.cols(); ++j) {
    for (Index i = 0; i < m.rows(); ++i) {
      const double x = static_cast<double>(m(i, j));
      if (!(x >= lo && x <= hi)) {  // also rejects NaN
        raise<NumericError>(where, what, " has value ", x, " at (", i, ", ", j, "), expected a value in [",
                            lo, ", ", hi, "]");
      }
    }
  }
}

/// forward_batch of a layer or a block: every xs[i] (dim rows, finite) and states[i] is checked
/// before any state advances, then module.forward runs on each pair in turn.
template <class Module, class Params, class Mat, class State>
std::vector<Mat> forward_each(const char* where, const Module& module, Index dim, const Params& p,
                              const std::vector<Mat>& xs, std::vector<State>& states) {
  if (xs.size() != states.size())
    raise<InvalidArgument>(where, "got ", xs.size(), " sequences and ", states.size(), " states");
  module.check_params(p, where);
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const std::string x = concat("xs[", i, "]"), at = concat(where, " (states[", i, "])");
    check_shape(where, x.c_str(), xs[i], dim, -1);
    check_finite(where, x.c_str(), xs[i]);
    module.check_state(states[i], at.c_str());
  }
  std::vector<Mat> ys(xs.size());
  for (std::size_t i = 0; i < xs.size(); ++i) ys[i] = module.forward(p, xs[i], states[i]);
  return ys;
}

template <class Scalar>
constexpr void static_check_scalar() {
  static_assert(std::is_floating_point_v<Scalar>, "titans: Scalar must be float, double or long double");
}

}  // namespace detail
}  // namespace titans
