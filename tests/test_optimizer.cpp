// SPDX-License-Identifier: Apache-2.0
//
// Tests for train/optimizer.hpp: AdamW against an element-by-element reference, convergence on a
// quadratic, state enumeration and checkpoint round trip, gradient clipping, the cosine schedule,
// and the errors raised for bad input.

#include <titans/train/optimizer.hpp>
#include <titans/detail/random.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using titans::Index;
using titans::Matrix;

// A small parameter set: two matrices and a (column) vector.
template <class Scalar>
struct Toy {
  using scalar_type = Scalar;
  Matrix<Scalar> w_in;   // (4, 3)
  Matrix<Scalar> w_out;  // (2, 4)
  Matrix<Scalar> bias;   // (4, 1)

  template <class F>
  void for_each(F&& f) {
    f(std::string("w_in"), w_in);
    f(std::string("w_out"), w_out);
    f(std::string("bias"), bias);
  }
  template <class F>
  void for_each(F&& f) const {
    f(std::string("w_in"), w_in);
    f(std::string("w_out"), w_out);
    f(std::string("bias"), bias);
  }
};

template <class Scalar>
Toy<Scalar> random_toy(std::uint64_t seed, double stddev = 1.0) {
  titans::detail::Rng rng(seed);
  Toy<Scalar> t;
  t.w_in.resize(4, 3);
  t.w_out.resize(2, 4);
  t.bias.resize(4, 1);
  t.for_each([&](const std::string&, Matrix<Scalar>& m) { rng.fill_normal(m, stddev); });
  return t;
}

// Flattened copy in double, tensor by tensor (column-major inside each tensor).
template <class P>
std::vector<std::vector<double>> flatten(const P& p) {
  std::vector<std::vector<double>> out;
  p.for_each([&](const std::string&, const auto& m) {
    std::vector<double> v;
    for (Index j = 0; j < m.cols(); ++j)
      for (Index i = 0; i < m.rows(); ++i) v.push_back(static_cast<double>(m(i, j)));
    out.push_back(v);
  });
  return out;
}

template <class P>
double max_abs_diff(const P& a, const P& b) {
  const auto fa = flatten(a), fb = flatten(b);
  double worst = 0;
  for (std::size_t k = 0; k < fa.size(); ++k)
    for (std::size_t j = 0; j < fa[k].size(); ++j) worst = std::max(worst, std::abs(fa[k][j] - fb[k][j]));
  return worst;
}

template <class P>
double l2_norm(const P& p) {
  long double s = 0;
  for (const auto& t : flatten(p))
    for (double x : t) s += static_cast<long double>(x) * x;
  return static_cast<double>(std::sqrt(s));
}

// AdamW written out independently, one scalar at a time, in double.
struct ReferenceAdamW {
  double beta1, beta2, eps, weight_decay;
  std::vector<bool> decay;  // per tensor
  std::vector<std::vector<double>> m, v;
  long t = 0;

  void step(std::vector<std::vector<double>>& p, const std::vector<std::vector<double>>& g, double lr) {
    if (m.empty()) {
      for (const auto& x : p) {
        m.emplace_back(x.size(), 0.0);
        v.emplace_back(x.size(), 0.0);
      }
    }
    ++t;
    for (std::size_t k = 0; k < p.size(); ++k) {
      for (std::size_t j = 0; j < p[k].size(); ++j) {
        if (decay[k]) p[k][j] = p[k][j] - lr * weight_decay * p[k][j];
        m[k][j] = beta1 * m[k][j] + (1 - beta1) * g[k][j];
        v[k][j] = beta2 * v[k][j] + (1 - beta2) * g[k][j] * g[k][j];
        const double mhat = m[k][j] / (1 - std::pow(beta1, static_cast<double>(t)));
        const double vhat = v[k][j] / (1 - std::pow(beta2, static_cast<double>(t)));
        p[k][j] = p[k][j] - lr * mhat / (std::sqrt(vhat) + eps);
      }
    }
  }
};

// Runs `fn` and checks it throws exactly-or-derived `E` whose message contains `needle`.
template <class E, class Fn>
void expect_throw_with(Fn&& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an exception mentioning '" << needle << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' does not mention '" << needle << "'";
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type; message: " << e.what();
  }
}

template <class Scalar>
constexpr double tight_tol() {
  return std::is_same_v<Scalar, float> ? 2e-6 : 1e-12;
}

template <class T>
class AdamWTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(AdamWTyped, Scalars);

// ---------------------------------------------------------------------------------------------
// AdamW: agreement with the reference
// ---------------------------------------------------------------------------------------------

template <class S>
void compare_with_reference(titans::AdamWConfig cfg, std::vector<bool> decay) {
  Toy<S> params = random_toy<S>(11);
  titans::AdamW<Toy<S>> opt(params, cfg);
  ReferenceAdamW ref{cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, decay, {}, {}, 0};
  auto ref_params = flatten(params);
  const double lrs[] = {0.01, 0.03, 0.02, 0.05, 0.005, 0.04, 0.01, 0.02};
  for (int s = 0; s < 8; ++s) {
    const Toy<S> grads = random_toy<S>(100 + static_cast<std::uint64_t>(s), 0.5 + s);
    opt.step(params, grads, lrs[s]);
    ref.step(ref_params, flatten(grads), lrs[s]);
    const auto got = flatten(params);
    double worst = 0;
    for (std::size_t k = 0; k < got.size(); ++k)
      for (std::size_t j = 0; j < got[k].size(); ++j)
        worst = std::max(worst, std::abs(got[k][j] - ref_params[k][j]) / (1 + std::abs(ref_params[k][j])));
    EXPECT_LE(worst, tight_tol<S>()) << "step " << s + 1 << ": worst relative difference " << worst;
  }
  EXPECT_EQ(opt.steps(), 8);
}

TYPED_TEST(AdamWTyped, MatchesScalarReferenceWithDefaultDecayFilter) {
  titans::AdamWConfig cfg;
  cfg.weight_decay = 0.2;
  cfg.beta1 = 0.8;
  cfg.beta2 = 0.95;
  // Default filter: the matrices w_in, w_out decay, the vector bias does not.
  compare_with_reference<TypeParam>(cfg, {true, true, false});
}

TYPED_TEST(AdamWTyped, MatchesScalarReferenceWithCustomDecayFilter) {
  titans::AdamWConfig cfg;
  cfg.weight_decay = 0.3;
  cfg.decay_filter = [](const std::string& name) { return name != "w_in"; };
  compare_with_reference<TypeParam>(cfg, {false, true, true});
}

TYPED_TEST(AdamWTyped, MatchesScalarReferenceWithoutWeightDecay) {
  titans::AdamWConfig cfg;
  cfg.weight_decay = 0;
  cfg.eps = 1e-3;  // large enough to matter in the denominator
  compare_with_reference<TypeParam>(cfg, {false, false, false});
}

TYPED_TEST(AdamWTyped, ConfigLearningRateIsUsedByTwoArgumentStep) {
  using S = TypeParam;
  titans::AdamWConfig cfg;
  cfg.lr = 0.07;
  Toy<S> a = random_toy<S>(1), b = a;
  const Toy<S> g = random_toy<S>(2);
  titans::AdamW<Toy<S>> oa(a, cfg), ob(b, cfg);
  oa.step(a, g);
  ob.step(b, g, 0.07);
  EXPECT_EQ(max_abs_diff(a, b), 0.0);
  ob.step(b, g, 0.01);
  oa.step(a, g);
  EXPECT_GT(max_abs_diff(a, b), 1e-4);  // a different lr does change the result
}

// ---------------------------------------------------------------------------------------------
// AdamW: weight decay and bias correction in isolation
// ---------------------------------------------------------------------------------------------

// With a zero gradient, m = v = 0 and the Adam part of the update is exactly zero, so only the
// decoupled decay moves the parameters: p <- p - lr * wd * p where the filter says so.
template <class S>
void check_decay_only(titans::AdamW<Toy<S>>& opt, double lr, double wd, std::vector<bool> expect) {
  Toy<S> params = random_toy<S>(5);
  const Toy<S> before = params;
  const Toy<S> zero = titans::zeros_like(params);
  opt.step(params, zero, lr);
  const auto got = flatten(params), was = flatten(before);
  for (std::size_t k = 0; k < got.size(); ++k) {
    for (std::size_t j = 0; j < got[k].size(); ++j) {
      const double want = expect[k] ? was[k][j] * (1 - lr * wd) : was[k][j];
      EXPECT_NEAR(got[k][j], want, 4 * std::numeric_limits<S>::epsilon() * std::abs(was[k][j]))
          << "tensor " << k << " entry " << j;
    }
    if (!expect[k]) {
      EXPECT_EQ(got[k], was[k]) << "tensor " << k << " must not decay";
    }
  }
}

TYPED_TEST(AdamWTyped, DefaultFilterDecaysMatricesOnly) {
  using S = TypeParam;
  titans::AdamWConfig cfg;
  cfg.weight_decay = 0.5;
  titans::AdamW<Toy<S>> opt(random_toy<S>(0), cfg);
  EXPECT_TRUE(opt.decays("w_in"));
  EXPECT_TRUE(opt.decays("w_out"));
  EXPECT_FALSE(opt.decays("bias"));
  check_decay_only<S>(opt, 0.1, 0.5, {true, true, false});
}

TYPED_TEST(AdamWTyped, DecayFilterFromConfigAndSetter) {
  using S = TypeParam;
  titans::AdamWConfig cfg;
  cfg.weight_decay = 0.5;
  cfg.decay_filter = [](const std::string& name) { return name == "bias"; };
  titans::AdamW<Toy<S>> opt(random_toy<S>(0), cfg);
  EXPECT_FALSE(opt.decays("w_in"));
  EXPECT_TRUE(opt.decays("bias"));
  check_decay_only<S>(opt, 0.2, 0.5, {false, false, true});

  opt.set_decay_filter([](const std::string&) { return true; });
  EXPECT_TRUE(opt.decays("w_in"));
  EXPECT_TRUE(opt.decays("bias"));
  check_decay_only<S>(opt, 0.2, 0.5, {true, true, true});

  opt.set_decay_filter({});  // back to the default rule
  EXPECT_TRUE(opt.decays("w_out"));
  EXPECT_FALSE(opt.decays("bias"));
  check_decay_only<S>(opt, 0.2, 0.5, {true, true, false});

  expect_throw_with<titans::InvalidArgument>([&] { (void)opt.decays("nope"); }, "nope");
}

// At step 1, m̂ = g and v̂ = g², so every entry moves by lr * |g| / (|g| + eps) ≈ lr, against the
// sign of g, whatever the gradient's magnitude. Without bias correction the move would be
// lr * (1 - beta1) / sqrt(1 - beta2) ≈ 3.16 lr.
TYPED_TEST(AdamWTyped, FirstStepMovesEachEntryByLr) {
  using S = TypeParam;
  titans::AdamWConfig cfg;
  cfg.weight_decay = 0;
  Toy<S> params = titans::zeros_like(random_toy<S>(0));
  Toy<S> grads = random_toy<S>(7);
  titans::detail::Rng rng(8);
  grads.for_each([&](const std::string&, Matrix<S>& g) {
    for (Index i = 0; i < g.size(); ++i) {
      const double magnitude = std::pow(10.0, -3.0 + 6.0 * rng.uniform());  // 1e-3 .. 1e3
      g(i) = static_cast<S>(g(i) >= 0 ? magnitude : -magnitude);
    }
  });
  titans::AdamW<Toy<S>> opt(params, cfg);
  const double lr = 0.01;
  opt.step(params, grads, lr);
  EXPECT_EQ(opt.steps(), 1);
  const auto p = flatten(params), g = flatten(grads);
  for (std::size_t k = 0; k < p.size(); ++k) {
    for (std::size_t j = 0; j < p[k].size(); ++j) {
      const double tol = lr * (cfg.eps / std::abs(g[k][j]) + 8 * std::numeric_limits<S>::epsilon());
      EXPECT_NEAR(std::abs(p[k][j]), lr, tol) << "gradient " << g[k][j];
      EXPECT_LT(p[k][j] * g[k][j], 0.0) << "the step must go against the gradient";
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AdamW: convergence
// ---------------------------------------------------------------------------------------------

// loss = ½ Σ c_i (p_i − target_i)², c_i spread over two orders of magnitude.
TYPED_TEST(AdamWTyped, MinimisesConvexQuadratic) {
  using S = TypeParam;
  Toy<S> params = random_toy<S>(21, 2.0);
  const Toy<S> target = random_toy<S>(22);
  Toy<S> curvature = random_toy<S>(23);
  curvature.for_each([](const std::string&, Matrix<S>& c) {
    c = c.unaryExpr([](S x) { return static_cast<S>(std::pow(10.0, std::tanh(static_cast<double>(x)))); });
  });  // in (0.1, 10)
  auto loss = [&](const Toy<S>& p) {
    const auto fp = flatten(p), ft = flatten(target), fc = flatten(curvature);
    double l = 0;
    for (std::size_t k = 0; k < fp.size(); ++k)
      for (std::size_t j = 0; j < fp[k].size(); ++j) l += 0.5 * fc[k][j] * std::pow(fp[k][j] - ft[k][j], 2);
    return l;
  };
  titans::AdamWConfig cfg;
  cfg.weight_decay = 0;  // decay would pull the minimiser away from the target
  titans::AdamW<Toy<S>> opt(params, cfg);
  const titans::CosineSchedule schedule(0.05, 20, 1500);
  const double initial = loss(params);
  double at_100 = 0;
  Toy<S> grads = titans::zeros_like(params);
  for (Index s = 0; s < 1500; ++s) {
    grads.w_in = (curvature.w_in.array() * (params.w_in - target.w_in).array()).matrix();
    grads.w_out = (curvature.w_out.array() * (params.w_out - target.w_out).array()).matrix();
    grads.bias = (curvature.bias.array() * (params.bias - target.bias).array()).matrix();
    opt.step(params, grads, schedule(opt.steps()));
    if (s == 99) at_100 = loss(params);
  }
  const double final_loss = loss(params);
  EXPECT_GT(initial, 1.0);
  EXPECT_LT(at_100, initial);
  EXPECT_LT(final_loss, at_100);
  EXPECT_LT(final_loss, 1e-6 * initial) << "initial " << initial << ", after 100 steps " << at_100;
}

// ---------------------------------------------------------------------------------------------
// AdamW: state as a parameter set
// ---------------------------------------------------------------------------------------------

TYPED_TEST(AdamWTyped, StateEnumeratesStepThenMomentsInParameterOrder) {
  using S = TypeParam;
  Toy<S> params = random_toy<S>(3);
  titans::AdamW<Toy<S>> opt(params, {});
  const std::vector<std::string> expected = {"step", "m.w_in", "v.w_in", "m.w_out", "v.w_out", "m.bias", "v.bias"};
  EXPECT_EQ(titans::parameter_names(opt.state()), expected);
  std::vector<std::string> mutable_names;
  opt.state().for_each([&](const std::string& n, Matrix<S>&) { mutable_names.push_back(n); });
  EXPECT_EQ(mutable_names, expected);
  EXPECT_EQ(titans::parameter_count(opt.state()), 1 + 2 * titans::parameter_count(params));

  // Shapes follow the parameters; the step tensor is (1, 1) and counts steps.
  const auto& st = opt.state();
  EXPECT_EQ(st.step.rows(), 1);
  EXPECT_EQ(st.step.cols(), 1);
  EXPECT_EQ(st.step(0, 0), S(0));
  EXPECT_EQ(st.m[1].rows(), 2);
  EXPECT_EQ(st.v[1].cols(), 4);
  EXPECT_EQ(st.m[2].rows(), 4);
  EXPECT_EQ(st.m[2].cols(), 1);
  const Toy<S> g = random_toy<S>(4);
  opt.step(params, g);
  opt.step(params, g);
  EXPECT_EQ(opt.state().step(0, 0), S(2));
  EXPECT_EQ(opt.steps(), 2);
  // After two identical gradients: m = (1 − β1²) g, v = (1 − β2²) g².
  const double b1 = 0.9, b2 = 0.999;
  EXPECT_LE((opt.state().m[0] - S(1 - b1 * b1) * g.w_in).cwiseAbs().maxCoeff(), 10 * tight_tol<S>());
  EXPECT_LE((opt.state().v[2] - S(1 - b2 * b2) * g.bias.cwiseAbs2()).cwiseAbs().maxCoeff(), 10 * tight_tol<S>());

  opt.reset();
  EXPECT_EQ(opt.steps(), 0);
  EXPECT_EQ(opt.state().m[0].cwiseAbs().maxCoeff(), S(0));
}

TYPED_TEST(AdamWTyped, SavedStateRestoredIntoFreshOptimizerGivesIdenticalSteps) {
  using S = TypeParam;
  titans::AdamWConfig cfg;
  cfg.weight_decay = 0.1;
  Toy<S> params = random_toy<S>(31);
  titans::AdamW<Toy<S>> original(params, cfg);
  auto grad_at = [](Index s) { return random_toy<S>(500 + static_cast<std::uint64_t>(s), 1.0 + 0.1 * s); };
  for (Index s = 0; s < 3; ++s) original.step(params, grad_at(s), 0.02);

  // "Checkpoint": everything by name, as a checkpoint writer would see it.
  std::map<std::string, Matrix<S>> saved;
  original.state().for_each([&](const std::string& n, const Matrix<S>& t) { saved[n] = t; });
  const Toy<S> params_at_save = params;

  titans::AdamW<Toy<S>> restored(params, cfg);
  restored.state().for_each([&](const std::string& n, Matrix<S>& t) { t = saved.at(n); });
  EXPECT_EQ(restored.steps(), 3);

  titans::AdamW<Toy<S>> fresh(params, cfg);  // control: same params, no restored state
  Toy<S> p_original = params_at_save, p_restored = params_at_save, p_fresh = params_at_save;
  for (Index s = 3; s < 7; ++s) {
    const Toy<S> g = grad_at(s);
    original.step(p_original, g, 0.02);
    restored.step(p_restored, g, 0.02);
    fresh.step(p_fresh, g, 0.02);
  }
  EXPECT_EQ(max_abs_diff(p_original, p_restored), 0.0);
  EXPECT_EQ(restored.steps(), 7);
  EXPECT_EQ(max_abs_diff(original.state(), restored.state()), 0.0);
  EXPECT_GT(max_abs_diff(p_original, p_fresh), 1e-4) << "the state must matter, or this test proves nothing";
}

TYPED_TEST(AdamWTyped, LoadedStateIsValidatedBeforeTheNextStep) {
  using S = TypeParam;
  Toy<S> params = random_toy<S>(41);
  const Toy<S> g = random_toy<S>(42);
  titans::AdamW<Toy<S>> opt(params, {});
  opt.step(params, g);
  const Toy<S> before = params;

  opt.state().step(0, 0) = S(2.5);
  expect_throw_with<titans::InvalidArgument>([&] { (void)opt.steps(); }, "'step' holds 2.5");
  expect_throw_with<titans::InvalidArgument>([&] { opt.step(params, g); }, "'step' holds 2.5");
  opt.state().step(0, 0) = S(-1);
  expect_throw_with<titans::InvalidArgument>([&] { opt.step(params, g); }, "'step' holds -1");
  opt.state().step(0, 0) = std::numeric_limits<S>::quiet_NaN();
  expect_throw_with<titans::InvalidArgument>([&] { opt.step(params, g); }, "'step'");
  opt.state().step(0, 0) = S(5);

  opt.state().v[1](0, 0) = S(-0.5);
  expect_throw_with<titans::NumericError>([&] { opt.step(params, g); }, "v.w_out");
  opt.state().v[1](0, 0) = S(0.5);
  opt.state().m[2](1, 0) = std::numeric_limits<S>::infinity();
  expect_throw_with<titans::NumericError>([&] { opt.step(params, g); }, "m.bias");
  opt.state().m[2](1, 0) = S(0);
  opt.state().m[0].resize(3, 3);
  expect_throw_with<titans::ShapeError>([&] { opt.step(params, g); }, "m.w_in");
  opt.state().m[0].setZero(4, 3);
  opt.state().step.resize(2, 1);
  expect_throw_with<titans::ShapeError>([&] { opt.step(params, g); }, "'step'");
  opt.state().step.setConstant(1, 1, S(5));

  EXPECT_EQ(max_abs_diff(params, before), 0.0) << "failed steps must not touch the parameters";
  opt.step(params, g);  // the repaired state is adopted
  EXPECT_EQ(opt.steps(), 6);
}

// ---------------------------------------------------------------------------------------------
// AdamW: bad input
// ---------------------------------------------------------------------------------------------

TEST(AdamWConfig, InvalidFieldsThrowNamingTheField) {
  const Toy<double> params = random_toy<double>(0);
  auto with = [&](auto edit) {
    titans::AdamWConfig cfg;
    edit(cfg);
    return [&params, cfg] { titans::AdamW<Toy<double>> opt(params, cfg); };
  };
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  expect_throw_with<titans::InvalidArgument>(with([](auto& c) { c.lr = -1; }), "lr is -1");
  expect_throw_with<titans::InvalidArgument>(with([&](auto& c) { c.lr = inf; }), "lr is inf");
  expect_throw_with<titans::InvalidArgument>(with([](auto& c) { c.beta1 = 1; }), "beta1 is 1");
  expect_throw_with<titans::InvalidArgument>(with([](auto& c) { c.beta1 = -0.1; }), "beta1 is -0.1");
  expect_throw_with<titans::InvalidArgument>(with([&](auto& c) { c.beta1 = nan; }), "beta1");
  expect_throw_with<titans::InvalidArgument>(with([](auto& c) { c.beta2 = 1.5; }), "beta2 is 1.5");
  expect_throw_with<titans::InvalidArgument>(with([](auto& c) { c.eps = 0; }), "eps is 0");
  expect_throw_with<titans::InvalidArgument>(with([](auto& c) { c.weight_decay = -0.01; }),
                                             "weight_decay is -0.01");
  // Boundary values that are valid.
  titans::AdamWConfig ok;
  ok.lr = 0;
  ok.beta1 = 0;
  ok.beta2 = 0;
  ok.weight_decay = 0;
  EXPECT_NO_THROW((titans::AdamW<Toy<double>>(params, ok)));
}

struct DuplicateNames {
  using scalar_type = double;
  Matrix<double> a = Matrix<double>::Zero(2, 2), b = Matrix<double>::Zero(2, 2);
  template <class F>
  void for_each(F&& f) {
    f(std::string("x"), a);
    f(std::string("x"), b);
  }
  template <class F>
  void for_each(F&& f) const {
    f(std::string("x"), a);
    f(std::string("x"), b);
  }
};

TEST(AdamWConfig, DuplicateParameterNamesAreRejected) {
  expect_throw_with<titans::InvalidArgument>([] { titans::AdamW<DuplicateNames> opt(DuplicateNames{}, {}); },
                                             "duplicate parameter name 'x'");
}

TYPED_TEST(AdamWTyped, MismatchedShapesThrowShapeErrorNamingTheTensor) {
  using S = TypeParam;
  Toy<S> params = random_toy<S>(51);
  titans::AdamW<Toy<S>> opt(params, {});
  const Toy<S> before = params;

  Toy<S> bad_grads = random_toy<S>(52);
  bad_grads.w_out.resize(3, 4);
  expect_throw_with<titans::ShapeError>([&] { opt.step(params, bad_grads); }, "w_out");

  // Params and grads agree with each other but not with the optimizer's state.
  Toy<S> other = random_toy<S>(53);
  other.bias.resize(5, 1);
  Toy<S> other_grads = other;
  expect_throw_with<titans::ShapeError>([&] { opt.step(other, other_grads); }, "bias");

  EXPECT_EQ(max_abs_diff(params, before), 0.0);
  EXPECT_EQ(opt.steps(), 0);
}

TYPED_TEST(AdamWTyped, NonFiniteGradientThrowsAndLeavesEverythingUntouched) {
  using S = TypeParam;
  Toy<S> params = random_toy<S>(61);
  titans::AdamW<Toy<S>> opt(params, {});
  opt.step(params, random_toy<S>(62));
  opt.step(params, random_toy<S>(63));
  const Toy<S> params_before = params;
  const auto state_before = opt.state();

  Toy<S> grads = random_toy<S>(64);
  grads.w_out(1, 2) = std::numeric_limits<S>::quiet_NaN();
  expect_throw_with<titans::NumericError>([&] { opt.step(params, grads); }, "gradient 'w_out'");
  grads.w_out(1, 2) = 0;
  grads.bias(3, 0) = -std::numeric_limits<S>::infinity();
  expect_throw_with<titans::NumericError>([&] { opt.step(params, grads); }, "gradient 'bias'");

  EXPECT_EQ(max_abs_diff(params, params_before), 0.0);
  EXPECT_EQ(max_abs_diff(opt.state(), state_before), 0.0);
  EXPECT_EQ(opt.steps(), 2);
}

TYPED_TEST(AdamWTyped, InvalidStepLearningRateThrows) {
  using S = TypeParam;
  Toy<S> params = random_toy<S>(71);
  const Toy<S> grads = random_toy<S>(72), before = params;
  titans::AdamW<Toy<S>> opt(params, {});
  expect_throw_with<titans::InvalidArgument>([&] { opt.step(params, grads, -0.5); }, "lr is -0.5");
  expect_throw_with<titans::InvalidArgument>(
      [&] { opt.step(params, grads, std::numeric_limits<double>::quiet_NaN()); }, "lr is");
  EXPECT_EQ(max_abs_diff(params, before), 0.0);
  EXPECT_EQ(opt.steps(), 0);
}

// ---------------------------------------------------------------------------------------------
// clip_grad_norm
// ---------------------------------------------------------------------------------------------

template <class T>
class ClipTyped : public ::testing::Test {};
TYPED_TEST_SUITE(ClipTyped, Scalars);

TYPED_TEST(ClipTyped, ReturnsTheGlobalNormAndLeavesSmallGradientsAlone) {
  using S = TypeParam;
  Toy<S> grads = random_toy<S>(81);
  const Toy<S> before = grads;
  const double expected = l2_norm(grads);
  const double returned = titans::clip_grad_norm(grads, 1.5 * expected);
  EXPECT_NEAR(returned, expected, 1e-12 * expected);
  EXPECT_EQ(max_abs_diff(grads, before), 0.0);
  // A norm exactly at the limit is not clipped either.
  EXPECT_EQ(titans::clip_grad_norm(grads, returned), returned);
  EXPECT_EQ(max_abs_diff(grads, before), 0.0);
  // Infinity never clips.
  titans::clip_grad_norm(grads, std::numeric_limits<double>::infinity());
  EXPECT_EQ(max_abs_diff(grads, before), 0.0);
  // Zero gradients: norm 0, nothing changes.
  Toy<S> zero = titans::zeros_like(grads);
  EXPECT_EQ(titans::clip_grad_norm(zero, 1.0), 0.0);
  EXPECT_EQ(l2_norm(zero), 0.0);
}

TYPED_TEST(ClipTyped, ClipsToMaxNormKeepingTheDirection) {
  using S = TypeParam;
  Toy<S> grads = random_toy<S>(82, 3.0);
  const Toy<S> before = grads;
  const double norm = l2_norm(grads);
  const double max_norm = norm / 4;
  EXPECT_NEAR(titans::clip_grad_norm(grads, max_norm), norm, 1e-12 * norm);
  const double after = l2_norm(grads);
  const double type_tol = std::is_same_v<S, float> ? 1e-6 : 1e-13;
  EXPECT_NEAR(after, max_norm, max_norm * (1e-6 / norm + type_tol));
  EXPECT_LE(after, max_norm * (1 + type_tol));
  // Every entry scaled by the same factor.
  const double factor = after / norm;
  const auto a = flatten(grads), b = flatten(before);
  for (std::size_t k = 0; k < a.size(); ++k)
    for (std::size_t j = 0; j < a[k].size(); ++j)
      EXPECT_NEAR(a[k][j], factor * b[k][j], 4 * std::numeric_limits<S>::epsilon() * std::abs(b[k][j]));
}

TYPED_TEST(ClipTyped, NonFiniteGradientThrowsNamingTheTensor) {
  using S = TypeParam;
  Toy<S> grads = random_toy<S>(83);
  grads.bias(2, 0) = std::numeric_limits<S>::quiet_NaN();
  expect_throw_with<titans::NumericError>([&] { titans::clip_grad_norm(grads, 1.0); }, "gradient 'bias'");
  grads.bias(2, 0) = 0;
  grads.w_in(0, 1) = std::numeric_limits<S>::infinity();
  expect_throw_with<titans::NumericError>([&] { titans::clip_grad_norm(grads, 1.0); }, "gradient 'w_in'");
}

TYPED_TEST(ClipTyped, NonPositiveMaxNormThrows) {
  using S = TypeParam;
  Toy<S> grads = random_toy<S>(84);
  const Toy<S> before = grads;
  expect_throw_with<titans::InvalidArgument>([&] { titans::clip_grad_norm(grads, 0.0); }, "max_norm is 0");
  expect_throw_with<titans::InvalidArgument>([&] { titans::clip_grad_norm(grads, -2.0); }, "max_norm is -2");
  expect_throw_with<titans::InvalidArgument>(
      [&] { titans::clip_grad_norm(grads, std::numeric_limits<double>::quiet_NaN()); }, "max_norm");
  EXPECT_EQ(max_abs_diff(grads, before), 0.0);
}

// In double the squares of 1e200 overflow; the norm must still come out right.
TEST(Clip, HugeDoubleGradientsDoNotOverflow) {
  Toy<double> grads = random_toy<double>(85);
  grads.for_each([](const std::string&, Matrix<double>& t) { t.setConstant(-1e200); });
  const double n = static_cast<double>(titans::parameter_count(grads));  // 24
  const double expected = 1e200 * std::sqrt(n);
  EXPECT_NEAR(titans::clip_grad_norm(grads, 1.0), expected, 1e-13 * expected);
  EXPECT_NEAR(grads.w_in(0, 0), -1.0 / std::sqrt(n), 1e-12);
}

// ---------------------------------------------------------------------------------------------
// CosineSchedule
// ---------------------------------------------------------------------------------------------

TEST(CosineSchedule, ValuesAtTheBoundaries) {
  const titans::CosineSchedule s(1.0, 10, 110, 0.1);
  EXPECT_DOUBLE_EQ(s(0), 0.1);    // peak * 1 / 10
  EXPECT_DOUBLE_EQ(s(4), 0.5);
  EXPECT_DOUBLE_EQ(s(9), 1.0);    // last warmup step reaches the peak
  EXPECT_DOUBLE_EQ(s(10), 1.0);   // cosine phase starts at the peak
  EXPECT_DOUBLE_EQ(s(60), 0.55);  // midpoint: (peak + min) / 2
  const double quarter = 0.1 + 0.9 * 0.5 * (1 + std::cos(3.14159265358979323846 / 4));
  EXPECT_NEAR(s(35), quarter, 1e-15);
  EXPECT_GT(s(109), 0.1);
  EXPECT_LT(s(109), 0.1 + 1e-3);
  EXPECT_DOUBLE_EQ(s(110), 0.1);  // end
  EXPECT_DOUBLE_EQ(s(100000), 0.1);
}

TEST(CosineSchedule, IncreasesDuringWarmupAndDecreasesAfter) {
  const titans::CosineSchedule s(3e-4, 25, 400, 1e-5);
  for (Index t = 1; t < 25; ++t) EXPECT_GT(s(t), s(t - 1)) << "warmup step " << t;
  for (Index t = 26; t <= 400; ++t) EXPECT_LT(s(t), s(t - 1)) << "decay step " << t;
  for (Index t = 0; t < 500; ++t) {
    EXPECT_LE(s(t), 3e-4);
    EXPECT_GE(s(t), 1e-5);
  }
}

TEST(CosineSchedule, DegenerateButValidShapes) {
  const titans::CosineSchedule no_warmup(2.0, 0, 4);
  EXPECT_DOUBLE_EQ(no_warmup(0), 2.0);
  EXPECT_DOUBLE_EQ(no_warmup(2), 1.0);
  EXPECT_DOUBLE_EQ(no_warmup(4), 0.0);
  const titans::CosineSchedule warmup_only(1.0, 4, 4, 0.25);
  EXPECT_DOUBLE_EQ(warmup_only(3), 1.0);
  EXPECT_DOUBLE_EQ(warmup_only(4), 0.25);
  const titans::CosineSchedule constant(0.5, 0, 10, 0.5);
  for (Index t = 0; t < 20; ++t) EXPECT_DOUBLE_EQ(constant(t), 0.5);
}

TEST(CosineSchedule, InvalidFieldsThrowNamingTheField) {
  using S = titans::CosineSchedule;
  expect_throw_with<titans::InvalidArgument>([] { S(1.0, -1, 10); }, "warmup_steps is -1");
  expect_throw_with<titans::InvalidArgument>([] { S(1.0, 0, 0); }, "total_steps is 0");
  expect_throw_with<titans::InvalidArgument>([] { S(1.0, 20, 10); }, "total_steps is 10");
  expect_throw_with<titans::InvalidArgument>([] { S(1.0, 0, 10, -0.1); }, "min_lr is -0.1");
  expect_throw_with<titans::InvalidArgument>([] { S(0.1, 0, 10, 0.2); }, "peak_lr is 0.1");
  expect_throw_with<titans::InvalidArgument>([] { S(std::numeric_limits<double>::infinity(), 0, 10); },
                                             "peak_lr is inf");
  const S ok(1.0, 2, 10);
  expect_throw_with<titans::InvalidArgument>([&] { (void)ok(-1); }, "step is -1");
  S edited = ok;
  edited.total_steps = 1;  // fields are public; a later call re-validates
  expect_throw_with<titans::InvalidArgument>([&] { (void)edited(0); }, "total_steps is 1");
}

}  // namespace
