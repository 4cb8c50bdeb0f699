// SPDX-License-Identifier: Apache-2.0
// The one routine the library's large products go through (detail/gemm.hpp), and the chunk's
// one-pass state update (detail/state_passes.hpp), against plain Eigen products: every pair of transposes, β = 0 (C not read, even when it holds NaN), 1 and other
// values, blocks as operands and as the destination, empty shapes. Runs with whichever backend the
// build selected (TITANS_GEMM), so under openblas or blis it checks the CBLAS calls, under libxsmm
// libxsmm's (its own kernels for the small products, OpenBLAS for the others).
#include <titans/detail/gemm.hpp>
#include <titans/detail/random.hpp>
#include <titans/detail/state_passes.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>

namespace {

using titans::Index;
using titans::detail::Trans;

template <class Scalar>
titans::Matrix<Scalar> random(Index rows, Index cols, std::uint64_t seed) {
  titans::Matrix<Scalar> m(rows, cols);
  titans::detail::Rng rng(seed);
  rng.fill_normal(m, 1.0);
  return m;
}

template <class Scalar>
class Gemm : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Gemm, Scalars);

// m, n, k: a small product and one above libxsmm's threshold for its own kernels (m·n·k > 64³),
// so that with that backend both of its paths run.
template <class Scalar, Trans TA, Trans TB>
void check_against_eigen(Index m, Index n, Index k) {
  using Mat = titans::Matrix<Scalar>;
  const Scalar tol = std::is_same_v<Scalar, float> ? Scalar(1e-4) : Scalar(1e-12);
  for (Scalar beta : {Scalar(0), Scalar(1), Scalar(-0.5)}) {
    const Mat a = TA == Trans::no ? random<Scalar>(m, k, 1) : random<Scalar>(k, m, 1);
    const Mat b = TB == Trans::no ? random<Scalar>(k, n, 2) : random<Scalar>(n, k, 2);
    Mat c = random<Scalar>(m, n, 3);
    const Mat c0 = c;
    if (beta == Scalar(0)) c.setConstant(std::numeric_limits<Scalar>::quiet_NaN());  // must not be read
    const Mat opa = TA == Trans::no ? a : Mat(a.transpose());
    const Mat opb = TB == Trans::no ? b : Mat(b.transpose());
    const Scalar alpha(-1.25);
    const Mat want = alpha * opa * opb + (beta == Scalar(0) ? Mat(Mat::Zero(m, n)) : Mat(beta * c0));
    titans::detail::gemm<TA, TB>(alpha, a, b, beta, c);
    const std::string at = std::string("ta ") + (TA == Trans::yes ? "T" : "N") + ", tb " +
                           (TB == Trans::yes ? "T" : "N") + ", beta " + std::to_string(beta) + ", m n k " +
                           std::to_string(m) + " " + std::to_string(n) + " " + std::to_string(k);
    ASSERT_TRUE(c.allFinite()) << at;
    EXPECT_LT((c - want).cwiseAbs().maxCoeff(), tol * std::max(Scalar(1), want.cwiseAbs().maxCoeff())) << at;
  }
}

TYPED_TEST(Gemm, MatchesEigenForEveryTransposeAndBeta) {
  for (const auto [m, n, k] : {std::array<Index, 3>{7, 5, 9}, std::array<Index, 3>{70, 65, 90}}) {
    check_against_eigen<TypeParam, Trans::no, Trans::no>(m, n, k);
    check_against_eigen<TypeParam, Trans::no, Trans::yes>(m, n, k);
    check_against_eigen<TypeParam, Trans::yes, Trans::no>(m, n, k);
    check_against_eigen<TypeParam, Trans::yes, Trans::yes>(m, n, k);
  }
}

TYPED_TEST(Gemm, BlocksAsOperandsAndDestination) {
  using Scalar = TypeParam;
  using Mat = titans::Matrix<Scalar>;
  const Scalar tol = std::is_same_v<Scalar, float> ? Scalar(1e-4) : Scalar(1e-12);
  const Mat big_a = random<Scalar>(12, 10, 4), big_b = random<Scalar>(11, 9, 5);
  Mat big_c = random<Scalar>(8, 13, 6);
  const Mat c0 = big_c;
  // A block of C += (block of A) · (block of B): every operand a strided block.
  const auto a = big_a.block(2, 1, 5, 3);
  const auto b = big_b.block(3, 4, 3, 4);
  titans::detail::product_add<Trans::no, Trans::no>(Scalar(1), a, b, big_c.block(1, 2, 5, 4));
  Mat want = c0;
  want.block(1, 2, 5, 4) += Mat(a) * Mat(b);
  EXPECT_LT((big_c - want).cwiseAbs().maxCoeff(), tol);  // and nothing outside the block moved
  // A transposed block operand into middle columns.
  Mat d = random<Scalar>(3, 6, 7);
  const Mat d0 = d;
  titans::detail::gemm<Trans::yes, Trans::no>(Scalar(2), big_a.block(0, 0, 4, 3), big_b.block(0, 0, 4, 2), Scalar(0),
                       d.middleCols(1, 2));
  Mat want_d = d0;
  want_d.middleCols(1, 2) = 2 * Mat(big_a.block(0, 0, 4, 3)).transpose() * Mat(big_b.block(0, 0, 4, 2));
  EXPECT_LT((d - want_d).cwiseAbs().maxCoeff(), tol);
}

TYPED_TEST(Gemm, EmptyShapes) {
  using Scalar = TypeParam;
  using Mat = titans::Matrix<Scalar>;
  // k = 0: C = β C (and 0 when β = 0); m or n = 0: nothing to do.
  Mat c = random<Scalar>(3, 2, 8);
  const Mat c0 = c;
  titans::detail::gemm<Trans::no, Trans::no>(Scalar(1), Mat(3, 0), Mat(0, 2), Scalar(0.5), c);
  EXPECT_LT((c - Scalar(0.5) * c0).cwiseAbs().maxCoeff(), Scalar(1e-6));
  Mat p;
  titans::detail::product<Trans::no, Trans::no>(Mat(3, 0), Mat(0, 2), p);
  EXPECT_EQ(p, Mat::Zero(3, 2));
  titans::detail::product<Trans::no, Trans::no>(Mat(0, 4), Mat(4, 2), p);
  EXPECT_EQ(p.rows(), 0);
  EXPECT_EQ(p.cols(), 2);
}

// W ← βW + cS − T Aᵀ, S ← pS − U Aᵀ in one pass, against the same in Eigen expressions: row counts
// around the register block (2 packets: 16 or 32 floats, 8 or 16 doubles), column counts around
// the column group (2 or 4), and the n of one token up to a chunk of 64.
TYPED_TEST(Gemm, StatePairUpdateMatchesEigen) {
  using Scalar = TypeParam;
  using Mat = titans::Matrix<Scalar>;
  const Scalar tol = std::is_same_v<Scalar, float> ? Scalar(2e-5) : Scalar(1e-13);
  std::uint64_t seed = 11;
  for (Index rows : {1, 7, 16, 31, 32, 33, 65, 256})
    for (Index cols : {1, 2, 3, 4, 5, 9})
      for (Index n : {1, 2, 5, 16, 64}) {
        Mat w = random<Scalar>(rows, cols, ++seed), s = random<Scalar>(rows, cols, ++seed);
        const Mat t = random<Scalar>(rows, n, ++seed), u = random<Scalar>(rows, n, ++seed);
        const Mat a = random<Scalar>(cols, n, ++seed);
        const Scalar beta = Scalar(0.9), c = Scalar(-0.3), p = Scalar(0.7);
        const Mat w_ref = beta * w + c * s - t * a.transpose();
        const Mat s_ref = p * s - u * a.transpose();
        const Mat at = a.transpose();
        titans::detail::update_state_pair(w, s, beta, c, p, t, u, at);
        const Scalar scale = Scalar(1) + Scalar(n);
        EXPECT_LE((w - w_ref).cwiseAbs().maxCoeff(), tol * scale) << rows << "x" << cols << " n=" << n;
        EXPECT_LE((s - s_ref).cwiseAbs().maxCoeff(), tol * scale) << rows << "x" << cols << " n=" << n;
      }
}

TEST(Gemm, NamesItsBackend) {
  const std::string backend = titans::gemm_backend();
#if defined(TITANS_GEMM_CBLAS)
  EXPECT_EQ(backend.rfind("cblas", 0), 0u) << backend;
#elif defined(TITANS_GEMM_LIBXSMM)
  EXPECT_EQ(backend.rfind("libxsmm", 0), 0u) << backend;
#else
  EXPECT_EQ(backend, "eigen");
#endif
}

}  // namespace
