// SPDX-License-Identifier: Apache-2.0
//
// \file detail/gemm.hpp
// \brief The one routine the library's large matrix products go through (the memory kernel, its
// backward, the layer's projections, attention and the model's head): C = α op(A) op(B) + β C.
//
// Backends (README, "GEMM backends"):
//   - Eigen (the default): the product is an Eigen expression, as everywhere else.
//   - CBLAS, when TITANS_GEMM_CBLAS is defined (the CMake option TITANS_GEMM=openblas|blis, or
//     the installed package's components `openblas` / `blis`, define it and link the library):
//     float and double products call cblas_sgemm / cblas_dgemm directly.
//   - libxsmm, when TITANS_GEMM_LIBXSMM is defined (TITANS_GEMM=libxsmm, or the component
//     `libxsmm`): float and double products call libxsmm_sgemm / libxsmm_dgemm, which run the
//     small ones (m·n·k up to libxsmm's threshold, 64³ by default) in kernels it generates for
//     this CPU at run time and pass the others to the BLAS linked with it (OpenBLAS).
//   Only these products change: unlike EIGEN_USE_BLAS, no other Eigen product of the program is
//   touched.
// The choice must be the same in every translation unit of a program (the CMake targets set it
// for all their users), since the templates that call gemm are shared between them.
#pragma once

#include "../common.hpp"

#include <algorithm>
#include <type_traits>

#if defined(TITANS_GEMM_CBLAS) && defined(TITANS_GEMM_LIBXSMM)
#error "titans: TITANS_GEMM_CBLAS and TITANS_GEMM_LIBXSMM are both defined; link one GEMM backend"
#endif
#ifdef TITANS_GEMM_CBLAS
#include <cblas.h>
#endif
#ifdef TITANS_GEMM_LIBXSMM
#include <libxsmm.h>
#endif
#if defined(TITANS_GEMM_CBLAS) || defined(TITANS_GEMM_LIBXSMM)
#define TITANS_GEMM_LIBRARY 1  // the products call a library (gemm_detail::library_gemm)
#endif

namespace titans {

/// \brief The backend of the library's large products, as built: "eigen", "cblas (<name>)"
/// where <name> is TITANS_GEMM_CBLAS_NAME (set by the CMake option; e.g. "openblas"), or
/// "libxsmm (larger products through sgemm_ / dgemm_)".
inline const char* gemm_backend() {
#if defined(TITANS_GEMM_LIBXSMM)
  return "libxsmm (larger products through sgemm_ / dgemm_)";
#elif defined(TITANS_GEMM_CBLAS)
#ifdef TITANS_GEMM_CBLAS_NAME
  return "cblas (" TITANS_GEMM_CBLAS_NAME ")";
#else
  return "cblas";
#endif
#else
  return "eigen";
#endif
}

namespace detail {

/// Whether an operand is used as it is or transposed.
enum class Trans : bool { no = false, yes = true };

namespace gemm_detail {

// c = α op(a) op(b) (Assign) or c += α op(a) op(b), as one plain Eigen product. The transposes
// are template arguments, so each call site instantiates only its own product.
template <Trans TA, Trans TB, bool Assign, class Scalar, class DA, class DB, class DC>
void eigen_gemm(Scalar alpha, const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b, Eigen::MatrixBase<DC>& c) {
  auto op = [](const auto& m, auto transposed) -> decltype(auto) {
    if constexpr (decltype(transposed)::value) {
      return m.transpose();
    } else {
      return m;
    }
  };
  const auto& opa = op(a, std::bool_constant<TA == Trans::yes>{});
  const auto& opb = op(b, std::bool_constant<TB == Trans::yes>{});
  if constexpr (Assign) {
    c.noalias() = alpha * (opa * opb);
  } else {
    c.noalias() += alpha * (opa * opb);
  }
}

#ifdef TITANS_GEMM_LIBRARY
// C = α op(A) op(B) + β C, column-major, through the library built in.
#ifdef TITANS_GEMM_CBLAS
inline void library_gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                         int ldb, float beta, float* c, int ldc) {
  cblas_sgemm(CblasColMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b,
              ldb, beta, c, ldc);
}
inline void library_gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                         int ldb, double beta, double* c, int ldc) {
  cblas_dgemm(CblasColMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b,
              ldb, beta, c, ldc);
}
#else
inline void library_gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                         int ldb, float beta, float* c, int ldc) {
  const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
  const libxsmm_blasint lm = m, ln = n, lk = k, la = lda, lb = ldb, lc = ldc;
  libxsmm_sgemm(&tra, &trb, &lm, &ln, &lk, &alpha, a, &la, b, &lb, &beta, c, &lc);
}
inline void library_gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                         int ldb, double beta, double* c, int ldc) {
  const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
  const libxsmm_blasint lm = m, ln = n, lk = k, la = lda, lb = ldb, lc = ldc;
  libxsmm_dgemm(&tra, &trb, &lm, &ln, &lk, &alpha, a, &la, b, &lb, &beta, c, &lc);
}
#endif
#endif

}  // namespace gemm_detail

/// \brief C = α op(A) op(B) + β C, with C of the product's shape (not resized); op(X) is X or
/// Xᵀ as TA / TB say. β = 0 does not read C (it may hold anything, NaN included). A, B and C are
/// column-major dense expressions of one scalar type; with a library backend (CBLAS, libxsmm),
/// operands whose inner stride is not 1 are copied first.
template <Trans TA, Trans TB, class DA, class DB, class DC>
void gemm(typename DA::Scalar alpha, const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b,
          typename DA::Scalar beta, const Eigen::MatrixBase<DC>& c_out) {
  using Scalar = typename DA::Scalar;
  static_assert(std::is_same_v<Scalar, typename DB::Scalar> && std::is_same_v<Scalar, typename DC::Scalar>,
                "titans::detail::gemm: operands of one scalar type");
  auto& c = const_cast<Eigen::MatrixBase<DC>&>(c_out);  // writable block (Eigen's documented idiom)
  const Index m = TA == Trans::no ? a.rows() : a.cols(), k = TA == Trans::no ? a.cols() : a.rows();
  const Index kb = TB == Trans::no ? b.rows() : b.cols(), n = TB == Trans::no ? b.cols() : b.rows();
  eigen_assert(k == kb && c.rows() == m && c.cols() == n && "titans::detail::gemm: shapes do not match");
  (void)m, (void)n, (void)k, (void)kb;  // only the library path and the assertion use them
#ifdef TITANS_GEMM_LIBRARY
  if constexpr (std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>) {
    if (m == 0 || n == 0) return;
    using Stride = Eigen::OuterStride<>;
    const Eigen::Ref<const Matrix<Scalar>, 0, Stride> ar(a.derived()), br(b.derived());
    Eigen::Ref<Matrix<Scalar>, 0, Stride> cr(c.derived());
    const auto ld = [](Index stride, Index rows) { return static_cast<int>(std::max<Index>({stride, rows, 1})); };
    gemm_detail::library_gemm(TA == Trans::yes, TB == Trans::yes, static_cast<int>(m), static_cast<int>(n),
                              static_cast<int>(k), alpha, ar.data(), ld(ar.outerStride(), ar.rows()), br.data(),
                              ld(br.outerStride(), br.rows()), beta, cr.data(), ld(cr.outerStride(), cr.rows()));
    return;
  }
#endif
  if (beta == Scalar(0)) {
    gemm_detail::eigen_gemm<TA, TB, true>(alpha, a, b, c);
  } else {
    if (beta != Scalar(1)) c *= beta;
    gemm_detail::eigen_gemm<TA, TB, false>(alpha, a, b, c);
  }
}

/// c = op(a) op(b), c resized to the product's shape.
template <Trans TA, Trans TB, class DA, class DB>
void product(const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b, Matrix<typename DA::Scalar>& c) {
  using Scalar = typename DA::Scalar;
  c.resize(TA == Trans::no ? a.rows() : a.cols(), TB == Trans::no ? b.cols() : b.rows());
  gemm<TA, TB>(Scalar(1), a, b, Scalar(0), c);
}

/// c += α op(a) op(b).
template <Trans TA, Trans TB, class DA, class DB, class DC>
void product_add(typename DA::Scalar alpha, const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b,
                 const Eigen::MatrixBase<DC>& c) {
  gemm<TA, TB>(alpha, a, b, typename DA::Scalar(1), c);
}

}  // namespace detail
}  // namespace titans
