// SPDX-License-Identifier: Apache-2.0
// The layer's backward through the test-time updates: finite-difference gradient checks of every
// parameter tensor and the input, streaming training (state gradient carried back between
// calls), recomputation (checkpoint_every) and the accumulation contract.
#include <titans/train/gradcheck.hpp>
#include <titans/neural_memory.hpp>

#include <gtest/gtest.h>

#include <algorithm>

#include "support/random_matrix.hpp"
#include "support/sampling.hpp"

namespace {

using titans::Index;
using titans::Matrix;
using titans::NeuralMemory;
using titans::NeuralMemoryConfig;
using Params = titans::NeuralMemoryParams<double>;
using State = titans::NeuralMemoryState<double>;

// Two heads of width 4. (Width 2 made these checks vacuous: the default read-out LayerNorm of a
// 2-vector is ±(1, −1), flat almost everywhere, so every gradient upstream of it was ~1e-8 and
// passed on the absolute tolerance alone; gradient_check now fails such unexercised tensors.)
constexpr Index kDim = 8;

NeuralMemoryConfig tiny(Index depth, Index b, bool per_chunk, bool residual) {
  NeuralMemoryConfig c;
  c.dim = kDim;
  c.heads = 2;
  c.depth = depth;
  c.expansion = 2;
  c.chunk_size = b;
  c.conv_kernel = 3;
  c.per_chunk_gates = per_chunk;
  c.residual = residual;
  return c;
}

using titans_test::random_matrix;

// Larger gate projections and θ so the gates and the updates matter for the gradients.
Params lively_params(const NeuralMemory<double>& layer, std::uint64_t seed) {
  Params p = layer.init(seed);
  titans::detail::Rng rng(seed + 1);
  rng.fill_normal(p.w_alpha, 0.5);
  rng.fill_normal(p.w_eta, 0.5);
  rng.fill_normal(p.w_theta, 0.5);
  p.b_alpha.setConstant(-1);
  p.b_theta.setConstant(0);
  rng.fill_normal(p.conv_k, 0.5);
  rng.fill_normal(p.norm_gain, 1.0);
  return p;
}

struct Case {
  Index depth, b;
  bool per_chunk, residual;
  Index T, prefix;  // prefix tokens run (without gradient) before the checked call
  bool extreme = false;  // gate biases that push α, η, θ to within ~1e-3 of 0 or 1 (θ_max)
  // Central-difference step. Measured on the saturated-gate cases: at L = 2, b = 3 the forward's
  // rounding, amplified by θ / (1 − η), dominates (worst error 6e-4 at h = 3e-6, 2e-3 at 1e-6,
  // below rtol at 1e-5); at L = 3, b = 2 the truncation error does (5e-5 at 1e-5, below rtol
  // from 3e-6 down).
  double step = 1e-6;
  // The gate bounds: α = α_max σ(·), η = η_max σ(·). At 0 the gate is exactly 0 (the paper's
  // no-forgetting and no-momentum ablations), and its projection and bias get no gradient.
  double alpha_max = 1.0, eta_max = 0.95;
  titans::AttentionalBias bias = titans::AttentionalBias::l2;  // docs/MATH.md §11
};

class LayerGradCheck : public ::testing::TestWithParam<Case> {};

TEST_P(LayerGradCheck, MatchesFiniteDifferences) {
  const Case cs = GetParam();
  NeuralMemoryConfig cfg = tiny(cs.depth, cs.b, cs.per_chunk, cs.residual);
  cfg.alpha_max = cs.alpha_max;
  cfg.eta_max = cs.eta_max;
  cfg.bias = cs.bias;
  // With w_delta below, δ_t spreads over the residuals' range, so both of huber's branches run:
  // the check below proves it, since w_v is exercised only through ℓ2-branch tokens (the ℓ1
  // step's derivative in r is 0) and w_delta only through ℓ1-branch ones. The residual form's
  // residuals are larger (k + γ ⊙ LN(z) − v), hence its larger δ_max.
  cfg.threshold_max = cs.residual ? 8 : 3;
  NeuralMemory<double> layer(cfg);
  Params p = lively_params(layer, 3);
  if (titans::uses_threshold(cs.bias)) {
    titans::detail::Rng rng(17);
    rng.fill_normal(p.w_delta, 0.5);
  }
  if (cs.extreme) {  // head 0: α ≈ 0, η ≈ 1, θ ≈ 0; head 1: α ≈ 1, η ≈ 0, θ ≈ θ_max
    p.b_alpha << -7, 7;
    p.b_eta << 7, -7;
    p.b_theta << -7, 7;
  }
  Matrix<double> x = random_matrix<double>(kDim, cs.T, 5);
  const Matrix<double> pre = random_matrix<double>(kDim, cs.prefix, 6);
  // The checked function: a fresh state, `prefix` tokens, then x; output of the x call. The
  // prefix makes the call start inside a chunk and a conv window when prefix % b != 0.
  auto fresh = [&](const Params& pp) {
    State s = layer.initial_state(pp);
    if (cs.prefix > 0) layer.forward(pp, pre, s);
    return s;
  };
  auto fwd = [&](const Params& pp, const Matrix<double>& xx) {
    State s = fresh(pp);
    return layer.forward(pp, xx, s);
  };
  auto bwd = [&](const Params& pp, const Matrix<double>& xx, const Matrix<double>& dy, Params& g, Matrix<double>& dx) {
    // Forward through the prefix with a cache too, so the gradient reaches memory_init through it.
    State s0 = layer.initial_state(pp);
    titans::NeuralMemoryCache<double> c0, c1;
    State s = s0;
    if (cs.prefix > 0) layer.forward_train(pp, pre, s, c0);
    State s1 = s;
    layer.forward_train(pp, xx, s, c1);
    State d1 = titans::zeros_like(s1);
    layer.backward(pp, c1, dy, nullptr, g, dx, &d1);
    if (cs.prefix > 0) {
      State d0 = titans::zeros_like(s0);
      Matrix<double> dpre = Matrix<double>::Zero(kDim, cs.prefix);
      layer.backward(pp, c0, Matrix<double>::Zero(kDim, cs.prefix), &d1, g, dpre, &d0);
      layer.initial_state_backward(d0, g);
    } else {
      layer.initial_state_backward(d1, g);
    }
  };
  titans::GradCheckOptions opt;
  opt.rtol = 2e-5;
  opt.step = cs.step;
  // The default memory's LayerNorm read-out has large third derivatives where its z_L is small,
  // so central differences at h = 1e-6 are good to ~1e-7 absolute here; the memory forms' exact
  // derivatives are checked against forward mode to 1e-10 in test_memory_backward.
  opt.atol = 2e-7;
  if (cs.alpha_max == 0) opt.may_be_zero.insert(opt.may_be_zero.end(), {"w_alpha", "b_alpha"});
  if (cs.eta_max == 0) opt.may_be_zero.insert(opt.may_be_zero.end(), {"w_eta", "b_eta"});
  opt = titans_test::sampled(opt);
  const auto r = titans::gradient_check(p, x, fwd, bwd, opt);
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_EQ(r.checked, titans_test::expected_checked(p, x, opt));
  RecordProperty("worst", r.report());
}

INSTANTIATE_TEST_SUITE_P(Layer, LayerGradCheck,
                         ::testing::Values(Case{1, 1, false, false, 5, 0}, Case{2, 1, false, false, 5, 0},
                                           Case{2, 3, false, false, 7, 0}, Case{3, 2, false, true, 5, 0},
                                           Case{2, 3, true, false, 7, 0}, Case{2, 3, true, false, 5, 2},
                                           Case{2, 4, false, true, 6, 3}, Case{1, 3, true, true, 4, 1},
                                           Case{2, 3, false, false, 7, 0, true, 1e-5}, Case{3, 2, true, false, 5, 1, true},
                                           // α_max < 1 (the gate's chain rule α_max σ(1 − σ)), and
                                           // the ablations α ≡ 0 and η ≡ 0
                                           Case{2, 3, false, false, 7, 2, false, 1e-6, 0.5},
                                           Case{2, 3, true, true, 7, 2, false, 1e-6, 0.0, 0.0},
                                           Case{1, 2, false, false, 5, 0, false, 1e-6, 0.0, 0.95},
                                           Case{2, 3, false, false, 6, 1, false, 1e-6, 1.0, 0.0},
                                           // the other attentional biases, huber's threshold projection
                                           Case{2, 3, false, false, 7, 2, false, 1e-6, 1.0, 0.95, titans::AttentionalBias::huber},
                                           Case{1, 2, true, true, 5, 1, false, 1e-6, 1.0, 0.95, titans::AttentionalBias::huber},
                                           Case{3, 2, false, true, 5, 1, false, 1e-6, 1.0, 0.95, titans::AttentionalBias::huber},
                                           Case{2, 3, false, false, 7, 2, false, 1e-6, 1.0, 0.95, titans::AttentionalBias::huber_radial},
                                           Case{1, 2, true, true, 5, 1, false, 1e-6, 1.0, 0.95, titans::AttentionalBias::huber_radial},
                                           Case{2, 3, false, false, 7, 2, false, 1e-6, 1.0, 0.95, titans::AttentionalBias::lp},
                                           Case{1, 1, true, true, 5, 0, false, 1e-6, 1.0, 0.95, titans::AttentionalBias::lp}));

TEST(LayerBackward, TwoCallsEqualOneCall) {
  for (bool per_chunk : {false, true}) {
    NeuralMemory<double> layer(tiny(2, 3, per_chunk, false));
    const Params p = lively_params(layer, 4);
    const Index T = 11, cut = 5;  // the cut is inside a chunk (b = 3) and a conv window
    const Matrix<double> x = random_matrix<double>(kDim, T, 7), dy = random_matrix<double>(kDim, T, 8);

    Params g1 = titans::zeros_like(p);
    Matrix<double> dx1 = Matrix<double>::Zero(kDim, T);
    State s = layer.initial_state(p);
    State d_init1 = titans::zeros_like(s);
    titans::NeuralMemoryCache<double> c;
    layer.forward_train(p, x, s, c);
    layer.backward(p, c, dy, nullptr, g1, dx1, &d_init1);

    Params g2 = titans::zeros_like(p);
    Matrix<double> dx2 = Matrix<double>::Zero(kDim, T);
    State sa = layer.initial_state(p);
    const State s_start = sa;
    titans::NeuralMemoryCache<double> ca, cb;
    layer.forward_train(p, x.leftCols(cut), sa, ca);
    const State s_mid = sa;
    layer.forward_train(p, x.rightCols(T - cut), sa, cb);
    State d_mid = titans::zeros_like(s_mid), d_init2 = titans::zeros_like(s_start);
    Matrix<double> dxb = Matrix<double>::Zero(kDim, T - cut), dxa = Matrix<double>::Zero(kDim, cut);
    layer.backward(p, cb, dy.rightCols(T - cut), nullptr, g2, dxb, &d_mid);
    layer.backward(p, ca, dy.leftCols(cut), &d_mid, g2, dxa, &d_init2);
    dx2 << dxa, dxb;

    // Relative to each gradient's size (they are O(10) here): the two ways sum in different orders.
    EXPECT_LT((dx1 - dx2).cwiseAbs().maxCoeff(), 1e-12 * std::max(1.0, dx1.cwiseAbs().maxCoeff()));
    std::vector<const Matrix<double>*> a, b;
    g1.for_each([&](const std::string&, const Matrix<double>& m) { a.push_back(&m); });
    g2.for_each([&](const std::string& n, const Matrix<double>& m) {
      b.push_back(&m);
      const double scale = std::max(1.0, m.size() > 0 ? m.cwiseAbs().maxCoeff() : 0.0);
      EXPECT_LT((*a[b.size() - 1] - m).cwiseAbs().maxCoeff(), 1e-12 * scale) << n << " per_chunk " << per_chunk;
    });
    EXPECT_LT((d_init1.heads[1].weights[0] - d_init2.heads[1].weights[0]).cwiseAbs().maxCoeff(), 1e-12);
  }
}

// A zero-length training call between two calls is no call: its backward passes the state
// gradient through unchanged (and touches no parameter gradient).
TEST(LayerBackward, ZeroLengthCallPassesTheStateGradientThrough) {
  NeuralMemory<double> layer(tiny(2, 3, false, true));
  const Params p = lively_params(layer, 14);
  const Index T = 8, cut = 4;
  const Matrix<double> x = random_matrix<double>(kDim, T, 17), dy = random_matrix<double>(kDim, T, 18);
  State s = layer.initial_state(p);
  const State s0 = s;
  titans::NeuralMemoryCache<double> ca, ce, cb;
  layer.forward_train(p, x.leftCols(cut), s, ca);
  const State s1 = s;
  EXPECT_EQ(layer.forward_train(p, x.leftCols(0), s, ce).cols(), 0);
  layer.forward_train(p, x.rightCols(T - cut), s, cb);

  Params g = titans::zeros_like(p);
  State d2 = titans::zeros_like(s1), d1 = titans::zeros_like(s1), d0 = titans::zeros_like(s0);
  Matrix<double> dxb = Matrix<double>::Zero(kDim, T - cut), dxa = Matrix<double>::Zero(kDim, cut), dxe(kDim, 0);
  layer.backward(p, cb, dy.rightCols(T - cut), nullptr, g, dxb, &d2);
  auto tensors = [](const Params& q) {
    std::vector<Matrix<double>> t;
    q.for_each([&](const std::string&, const Matrix<double>& m) { t.push_back(m); });
    return t;
  };
  const auto g_after_b = tensors(g);
  layer.backward(p, ce, dy.leftCols(0), &d2, g, dxe, &d1);
  EXPECT_EQ(tensors(g), g_after_b) << "a parameter gradient changed in the zero-length backward";
  EXPECT_EQ(d1.heads[0].weights[1], d2.heads[0].weights[1]);
  EXPECT_EQ(d1.conv_tail, d2.conv_tail);
  layer.backward(p, ca, dy.leftCols(cut), &d1, g, dxa, &d0);

  // The same gradients as the two calls without the empty one.
  State sr = layer.initial_state(p);
  titans::NeuralMemoryCache<double> ra, rb;
  layer.forward_train(p, x.leftCols(cut), sr, ra);
  layer.forward_train(p, x.rightCols(T - cut), sr, rb);
  Params gr = titans::zeros_like(p);
  State r1 = titans::zeros_like(s1), r0 = titans::zeros_like(s0);
  Matrix<double> rxb = Matrix<double>::Zero(kDim, T - cut), rxa = Matrix<double>::Zero(kDim, cut);
  layer.backward(p, rb, dy.rightCols(T - cut), nullptr, gr, rxb, &r1);
  layer.backward(p, ra, dy.leftCols(cut), &r1, gr, rxa, &r0);
  EXPECT_EQ(dxa, rxa);
  EXPECT_EQ(d0.heads[1].weights[0], r0.heads[1].weights[0]);
  EXPECT_EQ(tensors(gr), tensors(g));
}

TEST(LayerBackward, CheckpointingGivesTheSameGradientsWithLessCache) {
  NeuralMemory<double> layer(tiny(2, 2, false, false));
  const Params p = layer.init(5);  // default gates: the memory stays bounded over 24 tokens
  const Index T = 24;
  const Matrix<double> x = random_matrix<double>(kDim, T, 9), dy = random_matrix<double>(kDim, T, 10);
  auto run = [&](Index r, std::size_t& bytes) {
    Params g = titans::zeros_like(p);
    Matrix<double> dx = Matrix<double>::Zero(kDim, T);
    State s = layer.initial_state(p);
    titans::NeuralMemoryCache<double> c;
    titans::MemoryTrainOptions o;
    o.checkpoint_every = r;
    layer.forward_train(p, x, s, c, o);
    bytes = 0;  // the memory-state part of the cache, which checkpointing shrinks
    for (const auto& h : c.heads) bytes += h.bytes();
    EXPECT_GT(c.bytes(), bytes);
    layer.backward(p, c, dy, nullptr, g, dx);
    return std::make_pair(g, dx);
  };
  std::size_t b1 = 0, b4 = 0;
  const auto [g1, dx1] = run(1, b1);
  const auto [g4, dx4] = run(4, b4);
  EXPECT_LT(b4, b1);
  EXPECT_LT((dx1 - dx4).cwiseAbs().maxCoeff(), 1e-12);
  EXPECT_LT((g1.w_k - g4.w_k).cwiseAbs().maxCoeff(), 1e-12);
  EXPECT_LT((g1.b_theta - g4.b_theta).cwiseAbs().maxCoeff(), 1e-12);
}

TEST(LayerBackward, ForwardTrainMatchesForwardAndChecksItsArguments) {
  NeuralMemory<float> layer(tiny(2, 3, true, false));
  const auto p = layer.init(1);
  titans::detail::Rng rng(3);
  Matrix<float> x(kDim, 7);
  rng.fill_normal(x, 1.0);
  auto s1 = layer.initial_state(p), s2 = s1;
  titans::NeuralMemoryCache<float> c;
  EXPECT_EQ(layer.forward(p, x, s1), layer.forward_train(p, x, s2, c));
  // forward leaves the last chunk's tokens pending (docs/MATH.md §3.3); settled, it is the same state.
  auto settled = s1.heads[0];
  titans::memory_state_settle(layer.config().memory(), layer.config().chunk_size, settled);
  EXPECT_EQ(settled.weights[1], s2.heads[0].weights[1]);
  EXPECT_EQ(settled.momentum[0], s2.heads[0].momentum[0]);
  auto g = titans::zeros_like(p);
  Matrix<float> dx = Matrix<float>::Zero(kDim, 7);
  EXPECT_THROW(layer.backward(p, c, Matrix<float>::Zero(kDim, 6), nullptr, g, dx), titans::ShapeError);
  Matrix<float> dx_bad = Matrix<float>::Zero(3, 7);
  EXPECT_THROW(layer.backward(p, c, Matrix<float>::Zero(kDim, 7), nullptr, g, dx_bad), titans::ShapeError);
  titans::MemoryTrainOptions o;
  o.checkpoint_every = 0;
  EXPECT_THROW(layer.forward_train(p, x, s2, c, o), titans::InvalidArgument);
}

}  // namespace
