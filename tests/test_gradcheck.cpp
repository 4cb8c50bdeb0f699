// SPDX-License-Identifier: Apache-2.0
// The gradient checker must pass a correct backward and catch each kind of wrong one.
#include <titans/train/gradcheck.hpp>

#include <gtest/gtest.h>

namespace {

using titans::Matrix;

// y = W tanh(x) + b 1ᵀ: a tiny module with a matrix and a vector parameter.
struct Affine {
  using scalar_type = double;
  Matrix<double> w, b;
  template <class F>
  void for_each(F&& f) {
    f("w", w);
    f("b", b);
  }
  template <class F>
  void for_each(F&& f) const {
    f("w", w);
    f("b", b);
  }
};

Matrix<double> fwd(const Affine& p, const Matrix<double>& x) {
  return (p.w * x.array().tanh().matrix()).colwise() + p.b.col(0);
}

enum class Bug { none, scale_w, overwrite_b, forget_dx, drop_tiny_b };

void bwd(const Affine& p, const Matrix<double>& x, const Matrix<double>& dy, Affine& g, Matrix<double>& dx, Bug bug) {
  const Matrix<double> t = x.array().tanh().matrix();
  g.w += (bug == Bug::scale_w ? 1.01 : 1.0) * dy * t.transpose();
  if (bug == Bug::drop_tiny_b) {
    // b's gradient left out: caught even when every one of its entries is below atol
  } else if (bug == Bug::overwrite_b) {
    g.b = dy.rowwise().sum();
  } else {
    g.b += dy.rowwise().sum();
  }
  if (bug != Bug::forget_dx) dx += ((p.w.transpose() * dy).array() * (1 - t.array().square())).matrix();
}

struct Problem {
  Affine p;
  Matrix<double> x;
  Problem() {
    titans::detail::Rng rng(3);
    p.w.resize(3, 4);
    p.b.resize(3, 1);
    x.resize(4, 5);
    rng.fill_normal(p.w, 1.0);
    rng.fill_normal(p.b, 1.0);
    rng.fill_normal(x, 1.0);
  }
  titans::GradCheckResult run(Bug bug, titans::GradCheckOptions opt = {}) {
    return titans::gradient_check(
        p, x, fwd,
        [&](const Affine& pp, const Matrix<double>& xx, const Matrix<double>& dy, Affine& g, Matrix<double>& dx) {
          bwd(pp, xx, dy, g, dx, bug);
        },
        opt);
  }
};

TEST(GradCheck, PassesACorrectBackward) {
  Problem s;
  const Matrix<double> w = s.p.w, x = s.x;
  const auto r = s.run(Bug::none);
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_EQ(r.checked, 12 + 3 + 20);
  EXPECT_LT(r.max_error, 1e-6);
  EXPECT_EQ(s.p.w, w);  // perturbations are undone
  EXPECT_EQ(s.x, x);
}

TEST(GradCheck, NamesTheWrongTensor) {
  Problem s;
  const auto r = s.run(Bug::scale_w);
  ASSERT_FALSE(r.ok);
  ASSERT_FALSE(r.failures.empty());
  for (const auto& f : r.failures) EXPECT_EQ(f.tensor, "w");
  EXPECT_NE(r.report().find("FAILED"), std::string::npos);
}

TEST(GradCheck, CatchesOverwriteInsteadOfAccumulate) {
  Problem s;
  const auto r = s.run(Bug::overwrite_b);
  ASSERT_FALSE(r.ok);
  EXPECT_EQ(r.failures.front().tensor, "b");
}

TEST(GradCheck, ChecksTheInputGradient) {
  Problem s;
  const auto r = s.run(Bug::forget_dx);
  ASSERT_FALSE(r.ok);
  EXPECT_EQ(r.failures.front().tensor, "input");
  titans::GradCheckOptions opt;
  opt.check_input = false;
  EXPECT_TRUE(s.run(Bug::forget_dx, opt).ok);
}

// The absolute tolerance forgives finite-difference noise on near-zero entries; it must not let a
// tensor whose true gradient is small everywhere pass with a wrong (here: missing) gradient.
TEST(GradCheck, CatchesAWrongGradientBelowTheAbsoluteTolerance) {
  Problem s;
  titans::GradCheckOptions opt;
  opt.atol = 1e3;  // far above every entry of every gradient here
  auto r = s.run(Bug::drop_tiny_b, opt);
  ASSERT_FALSE(r.ok);
  bool named_b = false;
  for (const auto& f : r.failures) named_b = named_b || (f.tensor == "b" && f.row < 0);
  EXPECT_TRUE(named_b) << r.report();
  EXPECT_NE(r.report().find("b: not exercised"), std::string::npos) << r.report();
  // Allowed to be zero: then the entries are compared on atol alone, and pass.
  opt.may_be_zero = {"w", "b", "input"};
  r = s.run(Bug::drop_tiny_b, opt);
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_GT(r.near_zero, 0);
  // At the default atol, the same bug fails entry by entry.
  EXPECT_FALSE(s.run(Bug::drop_tiny_b).ok);
  opt = {};
  opt.atol = -1;
  EXPECT_THROW(s.run(Bug::none, opt), titans::InvalidArgument);
}

TEST(GradCheck, SamplesEntries) {
  Problem s;
  titans::GradCheckOptions opt;
  opt.max_entries = 2;
  const auto r = s.run(Bug::none, opt);
  EXPECT_TRUE(r.ok);
  EXPECT_EQ(r.checked, 2 + 2 + 2);
  opt.step = 0;
  EXPECT_THROW(s.run(Bug::none, opt), titans::InvalidArgument);
}

}  // namespace

namespace {

// The generator behind every init() and test input is xoshiro256** seeded by splitmix64: pinned
// to the published reference outputs, so that a change to it (which would silently change every
// model's initial weights) fails here. splitmix64 from 0 gives the state E220A8397B1DCDAF,
// 6E789E6AA1B965F4, 06C45D188009454F, F88BB8A8724C81EC; xoshiro256** then outputs these.
TEST(Rng, MatchesThePublishedReferenceOutputs) {
  titans::detail::Rng r0(0);
  for (std::uint64_t want : {0x99ec5f36cb75f2b4ULL, 0xbf6e1f784956452aULL, 0x1a5f849d4933e6e0ULL,
                             0x6aa594f1262d2d2cULL, 0xbba5ad4a1f842e59ULL, 0xffef8375d9ebcacaULL})
    EXPECT_EQ(r0.next_u64(), want);
  titans::detail::Rng r1(1);
  EXPECT_EQ(r1.next_u64(), 0xb3f2af6d0fc710c5ULL);
  EXPECT_EQ(r1.next_u64(), 0x853b559647364ceaULL);
  // Uniforms take the top 53 bits: the first of seed 0 is 0x99ec5f36cb75f2b4 >> 11 over 2^53.
  titans::detail::Rng u(0);
  EXPECT_EQ(u.uniform(), static_cast<double>(0x99ec5f36cb75f2b4ULL >> 11) * 0x1.0p-53);
}

}  // namespace
