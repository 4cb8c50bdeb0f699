// SPDX-License-Identifier: Apache-2.0
// The language model (model.hpp): gradient checks of the logits w.r.t. every parameter (tied and
// untied head, every block kind), the batched loss and its gradient against finite differences and
// against per-sequence calls, streaming decode against prefill, generation against teacher forcing,
// sampling (reproducibility, top-k, frequencies), cross-entropy against a hand-written formula,
// bad input and the config's metadata round trip.
#include <titans/train/gradcheck.hpp>
#include <titans/model.hpp>
#include <titans/train/optimizer.hpp>
#include <titans/parameters.hpp>
#include "support/sampling.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <ostream>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace titans {
// Readable test-parameter names in gtest's output (instead of byte dumps).
inline void PrintTo(BlockKind k, std::ostream* os) { *os << to_string(k); }
}  // namespace titans

namespace {

using titans::BlockKind;
using titans::Index;
using titans::ModelConfig;
using titans::SamplingOptions;
using titans::TitansModel;

template <class S>
using Mat = titans::Matrix<S>;
template <class S>
using Params = titans::ModelParams<S>;

// Small enough for finite differences, large enough that every mechanism is exercised: sequences
// longer than a memory chunk (3), a MAC segment (4) and an attention window (3), two heads
// everywhere, attention blocks of 2 queries.
ModelConfig small_config(std::vector<BlockKind> layers, bool tied = true) {
  ModelConfig c;
  c.vocab = 7;
  c.layers = std::move(layers);
  c.tied = tied;
  titans::BlockConfig& b = c.block;
  b.dim = 8;
  b.attention_heads = 2;
  b.window = 3;
  b.segment = 4;
  b.persistent = 2;
  b.ffn_hidden = 12;
  b.attention_block = 2;
  b.rope_base = 100;  // every rotary pair turns noticeably over a few tokens
  b.memory.dim = 8;
  b.memory.heads = 2;
  b.memory.expansion = 2;
  b.memory.chunk_size = 3;
  return c;
}

std::string name_of(const std::vector<BlockKind>& layers) {
  std::string s;
  for (BlockKind k : layers) s += (s.empty() ? "" : "_") + std::string(titans::to_string(k));
  return s;
}

bool is_gain(const std::string& name) {
  for (const char* suffix : {"norm_mixer", "norm_ffn", "y_gain", "m_gain", "retrieve.gain", "norm_gain", "norm_final"}) {
    const std::string s = suffix;
    if (name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0) return true;
  }
  return false;
}

// init() plus: the forgetting gate's bias at −2 instead of −8 (σ(−8) ≈ 3e-4 makes α nearly
// constant, so its gradient would hardly be tested), and gains moved away from 1 so a transposed
// or dropped gain shows.
template <class S>
Params<S> lively_params(const TitansModel<S>& model, std::uint64_t seed) {
  Params<S> p = model.init(seed);
  titans::detail::Rng rng(seed + 99);
  for (auto& b : p.blocks.blocks)
    if (b.has_memory) b.memory.b_alpha.setConstant(S(-2));
  p.for_each([&](const std::string& name, Mat<S>& t) {
    if (!is_gain(name)) return;
    Mat<S> noise(t.rows(), t.cols());
    rng.fill_normal(noise, 0.3);
    t += noise;
  });
  return p;
}

std::vector<int> random_tokens(Index n, Index vocab, std::uint64_t seed) {
  titans::detail::Rng rng(seed);
  std::vector<int> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = static_cast<int>(rng.below(static_cast<std::uint64_t>(vocab)));
  return t;
}

template <class A, class B>
double max_abs_diff(const A& a, const B& b) {
  const Mat<double> x = a.template cast<double>(), y = b.template cast<double>();
  if (x.rows() != y.rows() || x.cols() != y.cols()) return std::numeric_limits<double>::infinity();
  if (x.size() == 0) return 0;
  return (x - y).cwiseAbs().maxCoeff();
}

template <class P>
double max_param_diff(const P& a, const P& b) {
  std::vector<const Mat<double>*> tb;
  b.for_each([&](const std::string&, const Mat<double>& t) { tb.push_back(&t); });
  double worst = 0;
  std::size_t i = 0;
  a.for_each([&](const std::string&, const Mat<double>& t) { worst = std::max(worst, max_abs_diff(t, *tb[i++])); });
  return worst;
}

template <class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

const std::vector<std::vector<BlockKind>> kStacks = {
    {BlockKind::mac, BlockKind::mag}, {BlockKind::swa}, {BlockKind::lmm, BlockKind::mal}};

// ---------------------------------------------------------------------------------------------
// Gradient check of the logits w.r.t. every parameter
// ---------------------------------------------------------------------------------------------

struct GradCase {
  std::vector<BlockKind> layers;
  bool tied;
};

void PrintTo(const GradCase& c, std::ostream* os) {
  *os << ::testing::PrintToString(c.layers) << (c.tied ? " tied" : " untied");
}

class ModelGradCheck : public ::testing::TestWithParam<GradCase> {};

TEST_P(ModelGradCheck, LogitsWrtEveryParameter) {
  const GradCase gc = GetParam();
  const TitansModel<double> model(small_config(gc.layers, gc.tied));
  Params<double> p = lively_params(model, 5);
  const std::vector<int> tokens = random_tokens(10, 7, 11);
  Mat<double> dummy = Mat<double>::Zero(1, 1);  // the input is the token list, not a matrix

  // Forward through the inference path, backward through the training path: this also checks
  // that forward and forward_train compute the same function.
  auto forward = [&](const Params<double>& q, const Mat<double>&) {
    auto state = model.initial_state(q);
    return model.forward(q, tokens, state);
  };
  auto backward = [&](const Params<double>& q, const Mat<double>&, const Mat<double>& dlogits, Params<double>& grads,
                      Mat<double>&) {
    auto state = model.initial_state(q);
    titans::ModelCache<double> cache;
    model.forward_train(q, tokens, state, cache);
    model.backward(q, cache, dlogits, grads);
  };
  titans::GradCheckOptions opt;
  opt.check_input = false;  // there is no matrix input
  // Central differences of these losses are good to a few 1e-7 relative: with the products in
  // OpenBLAS (TITANS_GEMM=openblas) one memory_init entry of mac+mag differed by 1.0e-6.
  opt.rtol = 3e-6;
  // The default memory's LayerNorm read-out has large third derivatives where its z_L is small,
  // so central differences at h = 1e-6 are good to ~1e-7 absolute here; the memory forms' exact
  // derivatives are checked against forward mode to 1e-10 in test_memory_backward.
  opt.atol = 2e-7;
  opt = titans_test::sampled(opt);
  const auto result = titans::gradient_check(p, dummy, forward, backward, opt);
  EXPECT_TRUE(result.ok) << result.report();
  EXPECT_EQ(result.checked, titans_test::expected_checked(p, dummy, opt));
  // Every block's tensors are there, and the untied head only when untied.
  const auto names = titans::parameter_names(p);
  EXPECT_EQ(std::count(names.begin(), names.end(), "head"), gc.tied ? 0 : 1);
  EXPECT_EQ(names.front(), "embedding");
}

INSTANTIATE_TEST_SUITE_P(Stacks, ModelGradCheck,
                         ::testing::Values(GradCase{{BlockKind::mac, BlockKind::mag}, true},
                                           GradCase{{BlockKind::mac, BlockKind::mag}, false},
                                           GradCase{{BlockKind::swa}, true}, GradCase{{BlockKind::swa}, false},
                                           GradCase{{BlockKind::lmm, BlockKind::mal}, true},
                                           GradCase{{BlockKind::lmm, BlockKind::mal}, false}),
                         [](const ::testing::TestParamInfo<GradCase>& info) {
                           return name_of(info.param.layers) + (info.param.tied ? "_tied" : "_untied");
                         });

// ---------------------------------------------------------------------------------------------
// Loss and its gradient
// ---------------------------------------------------------------------------------------------

struct Batch {
  std::vector<std::vector<int>> inputs, targets;
};

// Two sequences of different lengths, targets = next token, some positions ignored (−1).
Batch make_batch(std::uint64_t seed) {
  Batch b;
  const std::vector<Index> lengths = {9, 6};
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    const std::vector<int> text = random_tokens(lengths[i] + 1, 7, seed + i);
    b.inputs.emplace_back(text.begin(), text.end() - 1);
    b.targets.emplace_back(text.begin() + 1, text.end());
  }
  b.targets[0][2] = -1;
  b.targets[0][5] = -1;
  b.targets[1][0] = -1;
  return b;
}

Index count_targets(const std::vector<int>& t) {
  return static_cast<Index>(std::count_if(t.begin(), t.end(), [](int x) { return x >= 0; }));
}

class ModelLoss : public ::testing::TestWithParam<std::vector<BlockKind>> {};

TEST_P(ModelLoss, GradientMatchesFiniteDifferencesOfLoss) {
  const TitansModel<double> model(small_config(GetParam(), /*tied=*/false));
  Params<double> p = lively_params(model, 3);
  const Batch b = make_batch(21);
  auto grads = titans::zeros_like(p);
  const double l = model.loss_and_gradient(p, b.inputs, b.targets, grads);
  EXPECT_NEAR(l, model.loss(p, b.inputs, b.targets), 1e-12);
  EXPECT_GT(l, 0);

  // A few entries of every tensor (central differences of loss()).
  titans::detail::Rng rng(77);
  std::vector<const Mat<double>*> g;
  grads.for_each([&](const std::string&, const Mat<double>& t) { g.push_back(&t); });
  std::size_t i = 0;
  Index checked = 0;
  double worst = 0;
  p.for_each([&](const std::string& name, Mat<double>& t) {
    const Mat<double>& gt = *g[i++];
    for (int k = 0; k < 2; ++k) {
      const Index e = static_cast<Index>(rng.below(static_cast<std::uint64_t>(t.size())));
      const double saved = t.data()[e], h = 1e-6;  // truncation ~h²·(third derivative): the LayerNorm read-out has large ones
      t.data()[e] = saved + h;
      const double up = model.loss(p, b.inputs, b.targets);
      t.data()[e] = saved - h;
      const double down = model.loss(p, b.inputs, b.targets);
      t.data()[e] = saved;
      const double numeric = (up - down) / (2 * h), analytic = gt.data()[e];
      const double err = std::abs(numeric - analytic) / std::max({std::abs(numeric), std::abs(analytic), 1e-3});
      worst = std::max(worst, err);
      EXPECT_LT(err, 1e-6) << name << "[" << e << "]: analytic " << analytic << ", numeric " << numeric;
      ++checked;
    }
  });
  EXPECT_GT(checked, 20);
  RecordProperty("worst_relative_error", std::to_string(worst));
}

TEST_P(ModelLoss, IgnoredTargetsAndPerSequenceWeighting) {
  const TitansModel<double> model(small_config(GetParam(), /*tied=*/true));
  const Params<double> p = lively_params(model, 4);
  const Batch b = make_batch(31);

  // Each sequence's loss, from an independent formulation: logits from a fresh state, then
  // −log softmax at the counted targets, averaged by hand.
  std::vector<double> seq_loss;
  std::vector<Index> seq_n;
  for (std::size_t s = 0; s < b.inputs.size(); ++s) {
    auto state = model.initial_state(p);
    const Mat<double> logits = model.forward(p, b.inputs[s], state);
    double sum = 0;
    Index n = 0;
    for (std::size_t t = 0; t < b.targets[s].size(); ++t) {
      const int y = b.targets[s][t];
      if (y < 0) continue;
      const auto col = logits.col(static_cast<Index>(t));
      double z = 0;
      for (Index v = 0; v < col.size(); ++v) z += std::exp(col(v));
      sum += std::log(z) - col(y);
      ++n;
    }
    seq_loss.push_back(sum / static_cast<double>(n));
    seq_n.push_back(n);
    EXPECT_EQ(n, count_targets(b.targets[s]));
    EXPECT_NEAR(model.loss(p, {b.inputs[s]}, {b.targets[s]}), seq_loss.back(), 1e-12);
  }
  // The batch loss is the target-count-weighted mean (every sequence from its own fresh state).
  const double expected =
      (seq_loss[0] * static_cast<double>(seq_n[0]) + seq_loss[1] * static_cast<double>(seq_n[1])) /
      static_cast<double>(seq_n[0] + seq_n[1]);
  EXPECT_NEAR(model.loss(p, b.inputs, b.targets), expected, 1e-12);
  // Order does not matter (no state leaks from one sequence into the next).
  EXPECT_NEAR(model.loss(p, {b.inputs[1], b.inputs[0]}, {b.targets[1], b.targets[0]}), expected, 1e-12);

  // The gradient is weighted the same way.
  auto g_batch = titans::zeros_like(p), g0 = titans::zeros_like(p), g1 = titans::zeros_like(p);
  EXPECT_NEAR(model.loss_and_gradient(p, b.inputs, b.targets, g_batch), expected, 1e-12);
  model.loss_and_gradient(p, {b.inputs[0]}, {b.targets[0]}, g0);
  model.loss_and_gradient(p, {b.inputs[1]}, {b.targets[1]}, g1);
  auto combined = titans::zeros_like(p);
  {
    std::vector<Mat<double>*> a, c;
    g0.for_each([&](const std::string&, Mat<double>& t) { a.push_back(&t); });
    g1.for_each([&](const std::string&, Mat<double>& t) { c.push_back(&t); });
    std::size_t i = 0;
    const double w0 = static_cast<double>(seq_n[0]) / static_cast<double>(seq_n[0] + seq_n[1]);
    combined.for_each([&](const std::string&, Mat<double>& t) {
      t = w0 * *a[i] + (1 - w0) * *c[i];
      ++i;
    });
  }
  EXPECT_LT(max_param_diff(g_batch, combined), 1e-12);

  // loss_and_gradient accumulates (+=) into grads.
  auto twice = titans::zeros_like(p);
  model.loss_and_gradient(p, b.inputs, b.targets, twice);
  model.loss_and_gradient(p, b.inputs, b.targets, twice);
  auto doubled = g_batch;
  doubled.for_each([](const std::string&, Mat<double>& t) { t *= 2; });
  EXPECT_LT(max_param_diff(twice, doubled), 1e-12);

  // An ignored position's target value is irrelevant; a target changed at a counted position is not.
  Batch c = b;
  c.targets[0][2] = -1;
  c.targets[0][3] = c.targets[0][3] == 0 ? 1 : 0;
  EXPECT_GT(std::abs(model.loss(p, c.inputs, c.targets) - expected), 1e-9);

  // No counted target at all: loss 0 and no gradient.
  Batch none = b;
  for (auto& t : none.targets) std::fill(t.begin(), t.end(), -1);
  auto gz = titans::zeros_like(p);
  EXPECT_EQ(model.loss_and_gradient(p, none.inputs, none.targets, gz), 0.0);
  EXPECT_EQ(max_param_diff(gz, titans::zeros_like(p)), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Stacks, ModelLoss, ::testing::ValuesIn(kStacks),
                         [](const ::testing::TestParamInfo<std::vector<BlockKind>>& info) {
                           return name_of(info.param);
                         });

TEST(ModelLossFloat, AgreesWithDouble) {
  const ModelConfig cfg = small_config({BlockKind::mac, BlockKind::mal});
  const TitansModel<double> md(cfg);
  const TitansModel<float> mf(cfg);
  const Params<double> pd = lively_params(md, 8);
  Params<float> pf = mf.init(8);
  {
    std::vector<const Mat<double>*> src;
    pd.for_each([&](const std::string&, const Mat<double>& t) { src.push_back(&t); });
    std::size_t i = 0;
    pf.for_each([&](const std::string&, Mat<float>& t) { t = src[i++]->cast<float>(); });
  }
  const Batch b = make_batch(41);
  const double ld = md.loss(pd, b.inputs, b.targets);
  const double lf = mf.loss(pf, b.inputs, b.targets);
  EXPECT_NEAR(lf, ld, 1e-4 * std::max(1.0, ld));
}

// The float training path against double, per tensor, for each block kind: the same parameters
// (cast), the same batch; each gradient tensor must agree normwise to 2e-3 (float rounding through
// the test-time updates), and the loss to 1e-4.
TEST(ModelLossFloat, GradientsAgreeWithDoublePerTensorForEveryKind) {
  for (BlockKind kind : {BlockKind::lmm, BlockKind::mac, BlockKind::mag, BlockKind::mal, BlockKind::swa}) {
    SCOPED_TRACE(titans::to_string(kind));
    const ModelConfig cfg = small_config({kind, kind});
    const TitansModel<double> md(cfg);
    const TitansModel<float> mf(cfg);
    const Params<double> pd = lively_params(md, 31);
    Params<float> pf = mf.init(31);
    {
      std::vector<const Mat<double>*> src;
      pd.for_each([&](const std::string&, const Mat<double>& t) { src.push_back(&t); });
      std::size_t i = 0;
      pf.for_each([&](const std::string&, Mat<float>& t) { t = src[i++]->cast<float>(); });
    }
    const Batch b = make_batch(43);
    auto gd = titans::zeros_like(pd);
    auto gf = titans::zeros_like(pf);
    const double ld = md.loss_and_gradient(pd, b.inputs, b.targets, gd);
    const double lf = mf.loss_and_gradient(pf, b.inputs, b.targets, gf);
    EXPECT_NEAR(lf, ld, 1e-4 * std::max(1.0, ld));
    std::vector<std::pair<std::string, const Mat<double>*>> dref;
    gd.for_each([&](const std::string& n, const Mat<double>& t) { dref.emplace_back(n, &t); });
    std::size_t i = 0;
    Index compared = 0;
    gf.for_each([&](const std::string& n, const Mat<float>& t) {
      const Mat<double>& d = *dref[i++].second;
      const double norm = d.norm();
      if (norm < 1e-8) return;  // a tensor this batch does not reach (checked to be rare below)
      ++compared;
      EXPECT_LT((t.cast<double>() - d).norm() / norm, 2e-3) << n << " (|g| = " << norm << ")";
    });
    EXPECT_GE(compared, static_cast<Index>(dref.size()) * 3 / 4) << "most gradients must be non-zero";
  }
}

// The batch is partitioned by the batch, not by the thread count: loss and every gradient are
// bit for bit the same with 1, 2 and 3 threads (before, the parts were omp_get_max_threads()).
TEST(ModelBatch, ResultsAreIdenticalForAnyThreadCount) {
#ifndef _OPENMP
  GTEST_SKIP() << "built without OpenMP: one thread only";
#else
  const TitansModel<double> model(small_config({BlockKind::mac, BlockKind::mag, BlockKind::lmm}));
  const Params<double> p = lively_params(model, 21);
  std::vector<std::vector<int>> inputs, targets;
  for (int i = 0; i < 11; ++i) {
    const std::vector<int> text = random_tokens(6 + i % 4, 7, 100 + static_cast<std::uint64_t>(i));
    inputs.emplace_back(text.begin(), text.end() - 1);
    targets.emplace_back(text.begin() + 1, text.end());
  }
  const int saved = omp_get_max_threads();
  std::vector<double> losses;
  std::vector<std::vector<Mat<double>>> grads;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    auto g = titans::zeros_like(p);
    losses.push_back(model.loss_and_gradient(p, inputs, targets, g));
    grads.emplace_back();
    g.for_each([&](const std::string&, const Mat<double>& t) { grads.back().push_back(t); });
  }
  omp_set_num_threads(saved);
  for (std::size_t k = 1; k < losses.size(); ++k) {
    EXPECT_EQ(losses[k], losses[0]) << k + 1 << " threads";
    EXPECT_TRUE(grads[k] == grads[0]) << "gradients differ between 1 and " << k + 1 << " threads";
  }
#endif
}

// One parameter set shared by concurrent forwards from std::threads (each with its own state):
// every thread gets what a lone call gets (modules and parameters are read-only in forward).
TEST(ModelBatch, ConcurrentForwardsShareOneParameterSet) {
  const TitansModel<double> model(small_config({BlockKind::mac, BlockKind::mal, BlockKind::swa}));
  const Params<double> p = lively_params(model, 23);
  std::vector<std::vector<int>> texts;
  std::vector<Mat<double>> alone;
  for (int i = 0; i < 4; ++i) {
    texts.push_back(random_tokens(13, 7, 200 + static_cast<std::uint64_t>(i)));
    auto s = model.initial_state(p);
    alone.push_back(model.forward(p, texts.back(), s));
  }
  std::vector<Mat<double>> together(texts.size());
  std::vector<std::thread> pool;
  for (std::size_t i = 0; i < texts.size(); ++i)
    pool.emplace_back([&, i] {
      for (int rep = 0; rep < 3; ++rep) {
        auto s = model.initial_state(p);
        together[i] = model.forward(p, texts[i], s);
      }
    });
  for (auto& t : pool) t.join();
  for (std::size_t i = 0; i < texts.size(); ++i) EXPECT_EQ(together[i], alone[i]) << "thread " << i;
}

// ---------------------------------------------------------------------------------------------
// Streaming decode and generation
// ---------------------------------------------------------------------------------------------

class ModelDecode : public ::testing::TestWithParam<std::vector<BlockKind>> {};

TEST_P(ModelDecode, StepEqualsPrefill) {
  for (bool tied : {true, false}) {
    const TitansModel<double> model(small_config(GetParam(), tied));
    const Params<double> p = lively_params(model, 6);
    const std::vector<int> tokens = random_tokens(13, 7, 17);
    auto s_prefill = model.initial_state(p);
    const Mat<double> logits = model.forward(p, tokens, s_prefill);
    ASSERT_EQ(logits.rows(), 7);
    ASSERT_EQ(logits.cols(), 13);
    auto s_step = model.initial_state(p);
    for (std::size_t t = 0; t < tokens.size(); ++t) {
      const titans::Vector<double> l = model.step(p, tokens[t], s_step);
      EXPECT_LT(max_abs_diff(l, logits.col(static_cast<Index>(t))), 1e-12) << "token " << t << (tied ? " tied" : " untied");
    }
    EXPECT_EQ(s_step.position, 13);
    EXPECT_EQ(s_prefill.position, 13);
    // An uneven split (prefill 5, then 1, then 7) too, and forward_train from a fresh state.
    auto s_split = model.initial_state(p);
    const std::vector<std::size_t> cuts = {0, 5, 6, 13};
    for (std::size_t c = 0; c + 1 < cuts.size(); ++c) {
      const std::vector<int> part(tokens.begin() + static_cast<long>(cuts[c]), tokens.begin() + static_cast<long>(cuts[c + 1]));
      const Mat<double> l = model.forward(p, part, s_split);
      EXPECT_LT(max_abs_diff(l, logits.middleCols(static_cast<Index>(cuts[c]), static_cast<Index>(part.size()))), 1e-12);
    }
    auto s_train = model.initial_state(p);
    titans::ModelCache<double> cache;
    EXPECT_LT(max_abs_diff(model.forward_train(p, tokens, s_train, cache), logits), 1e-12);
    // Causality: changing the token at t changes no logit before t, and changes the one at t.
    for (std::size_t t = 0; t < tokens.size(); ++t) {
      std::vector<int> changed = tokens;
      changed[t] = (changed[t] + 1) % 7;
      auto s_changed = model.initial_state(p);
      const Mat<double> lc = model.forward(p, changed, s_changed);
      const Index ti = static_cast<Index>(t);
      if (ti > 0) {
        EXPECT_LT(max_abs_diff(lc.leftCols(ti), logits.leftCols(ti)), 1e-12) << "token " << t;
      }
      EXPECT_GT(max_abs_diff(lc.col(ti), logits.col(ti)), 1e-6) << "token " << t;
    }
  }
}

TEST_P(ModelDecode, GreedyGenerationEqualsTeacherForcedArgmax) {
  const TitansModel<double> model(small_config(GetParam()));
  const Params<double> p = lively_params(model, 9);
  const std::vector<int> prompt = random_tokens(5, 7, 23);
  const Index count = 9;
  auto state = model.initial_state(p);
  const std::vector<int> out = titans::generate(model, p, state, prompt, count, SamplingOptions{0.0, 0, 1});
  ASSERT_EQ(static_cast<Index>(out.size()), count);
  EXPECT_EQ(state.position, static_cast<Index>(prompt.size()) + count);  // the last token was fed too
  // Teacher forcing: one prefill over prompt + generated; each generated token is the argmax of
  // the logits at the position before it.
  std::vector<int> all = prompt;
  all.insert(all.end(), out.begin(), out.end());
  auto s2 = model.initial_state(p);
  const Mat<double> logits = model.forward(p, all, s2);
  std::set<int> distinct;
  for (Index i = 0; i < count; ++i) {
    Index best = 0;
    logits.col(static_cast<Index>(prompt.size()) - 1 + i).maxCoeff(&best);
    EXPECT_EQ(out[static_cast<std::size_t>(i)], static_cast<int>(best)) << "generated token " << i;
    distinct.insert(out[static_cast<std::size_t>(i)]);
  }
  // The states after generation agree too: the next step's logits equal those of a prefill
  // over all tokens (continue both with the same token).
  const titans::Vector<double> a = model.step(p, 3, state);
  const titans::Vector<double> c = model.step(p, 3, s2);
  EXPECT_LT(max_abs_diff(a, c), 1e-12);
}

INSTANTIATE_TEST_SUITE_P(Kinds, ModelDecode,
                         ::testing::Values(std::vector<BlockKind>{BlockKind::lmm}, std::vector<BlockKind>{BlockKind::mac},
                                           std::vector<BlockKind>{BlockKind::mag}, std::vector<BlockKind>{BlockKind::mal},
                                           std::vector<BlockKind>{BlockKind::swa},
                                           std::vector<BlockKind>{BlockKind::mac, BlockKind::mag},
                                           std::vector<BlockKind>{BlockKind::lmm, BlockKind::mal}),
                         [](const ::testing::TestParamInfo<std::vector<BlockKind>>& info) {
                           return name_of(info.param);
                         });

TEST(ModelGenerate, SamplingIsReproducibleAndTopOneIsGreedy) {
  const TitansModel<double> model(small_config({BlockKind::mac, BlockKind::swa}));
  const Params<double> p = lively_params(model, 12);
  const std::vector<int> prompt = {1, 2, 3};
  auto run = [&](SamplingOptions o) {
    auto s = model.initial_state(p);
    return titans::generate(model, p, s, prompt, 24, o);
  };
  const auto a = run({1.0, 0, 42});
  EXPECT_EQ(a, run({1.0, 0, 42}));
  // Different seeds give different samples (24 draws over 7 tokens at temperature 1.5).
  std::set<std::vector<int>> samples;
  for (std::uint64_t seed = 0; seed < 4; ++seed) samples.insert(run({1.5, 0, seed}));
  EXPECT_GT(samples.size(), 1u);
  const auto greedy = run({0.0, 0, 0});
  EXPECT_EQ(run({1.0, 1, 5}), greedy);
  EXPECT_EQ(run({3.0, 1, 6}), greedy);
  EXPECT_EQ(run({0.0, 3, 7}), greedy);  // temperature 0 is greedy whatever top_k says
  // count 0 only feeds the prompt.
  auto s = model.initial_state(p);
  EXPECT_TRUE(titans::generate(model, p, s, prompt, 0).empty());
  EXPECT_EQ(s.position, 3);
}

// Pearson's χ² of token counts against probabilities (tokens of probability 0 left out).
double chi_square(const std::vector<int>& hits, const std::vector<double>& prob, int draws) {
  double chi2 = 0;
  for (std::size_t v = 0; v < prob.size(); ++v) {
    if (prob[v] == 0) continue;
    const double expected = draws * prob[v];
    chi2 += (hits[v] - expected) * (hits[v] - expected) / expected;
  }
  return chi2;
}

TEST(ModelSample, TopKStaysInsideAndFrequenciesMatchSoftmax) {
  titans::Vector<double> logits(7);
  logits << 0.3, 1.2, -0.5, 0.9, 1.0, -2.0, 0.0;
  for (const auto& [temperature, k] : std::vector<std::pair<double, Index>>{{1.0, 0}, {0.7, 0}, {1.0, 3}, {2.0, 4}}) {
    // Expected probabilities: softmax(logits / T) restricted to the k largest, renormalised.
    std::vector<Index> order(7);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](Index a, Index b) { return logits(a) > logits(b); });
    const Index keep = k > 0 ? k : 7;
    std::vector<double> prob(7, 0.0);
    double z = 0;
    for (Index i = 0; i < keep; ++i) z += std::exp(logits(order[static_cast<std::size_t>(i)]) / temperature);
    for (Index i = 0; i < keep; ++i)
      prob[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])] =
          std::exp(logits(order[static_cast<std::size_t>(i)]) / temperature) / z;

    titans::detail::Rng rng(1000 + static_cast<std::uint64_t>(k));
    const int draws = 20000;
    std::vector<int> hits(7, 0);
    for (int d = 0; d < draws; ++d) {
      const int tok = titans::sample_token<double>(logits, SamplingOptions{temperature, k, 0}, rng);
      ASSERT_GE(tok, 0);
      ASSERT_LT(tok, 7);
      ASSERT_GT(prob[static_cast<std::size_t>(tok)], 0) << "token " << tok << " is outside the top " << k;
      ++hits[static_cast<std::size_t>(tok)];
    }
    const double chi2 = chi_square(hits, prob, draws);
    // keep − 1 degrees of freedom (≤ 6): P(χ² > 40) < 1e-6. A wrong temperature or a sampler
    // that ignores the weights gives χ² in the hundreds or more at 20000 draws.
    EXPECT_LT(chi2, 40) << "temperature " << temperature << ", top_k " << k;
  }
  // Ties are broken towards the lower index in the top-k cut: logits all equal, k = 2 → only 0 and 1.
  titans::Vector<double> flat = titans::Vector<double>::Zero(5);
  titans::detail::Rng rng(3);
  for (int d = 0; d < 200; ++d) EXPECT_LT(titans::sample_token<double>(flat, SamplingOptions{1.0, 2, 0}, rng), 2);
  // top_k larger than V is V.
  EXPECT_LT(titans::sample_token<double>(logits, SamplingOptions{1.0, 100, 0}, rng), 7);
}

// Nucleus sampling: the fewest likeliest tokens whose probabilities reach top_p, renormalised;
// with top_k as well, the nucleus is taken within the top k.
TEST(ModelSample, TopPKeepsTheNucleusAndFrequenciesMatch) {
  titans::Vector<double> logits(7);
  logits << 0.3, 1.2, -0.5, 0.9, 1.0, -2.0, 0.0;
  for (const auto& [top_p, k, temperature] :
       std::vector<std::tuple<double, Index, double>>{{0.5, 0, 1.0}, {0.8, 0, 0.7}, {0.8, 4, 1.0}, {0.9, 0, 2.0}}) {
    std::vector<Index> order(7);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](Index a, Index b) { return logits(a) > logits(b); });
    const Index top = k > 0 ? k : 7;
    double z = 0;
    for (Index i = 0; i < top; ++i) z += std::exp(logits(order[static_cast<std::size_t>(i)]) / temperature);
    Index keep = 0;
    double mass = 0;
    while (keep < top && mass < top_p) mass += std::exp(logits(order[static_cast<std::size_t>(keep++)]) / temperature) / z;
    ASSERT_LT(keep, 7) << "the case must cut something";
    std::vector<double> prob(7, 0.0);
    for (Index i = 0; i < keep; ++i) {
      const Index v = order[static_cast<std::size_t>(i)];
      prob[static_cast<std::size_t>(v)] = std::exp(logits(v) / temperature) / z / mass;
    }
    titans::detail::Rng rng(77 + static_cast<std::uint64_t>(keep));
    const int draws = 20000;
    std::vector<int> hits(7, 0);
    for (int d = 0; d < draws; ++d) {
      SamplingOptions o{temperature, k, 0};
      o.top_p = top_p;
      const int tok = titans::sample_token<double>(logits, o, rng);
      ASSERT_GT(prob[static_cast<std::size_t>(tok)], 0) << "token " << tok << " is outside the nucleus of " << top_p;
      ++hits[static_cast<std::size_t>(tok)];
    }
    const double chi2 = chi_square(hits, prob, draws);
    EXPECT_LT(chi2, 40) << "top_p " << top_p << ", top_k " << k;  // as above: P(χ² > 40) < 1e-6
  }
  // A tiny nucleus is the likeliest token alone.
  titans::detail::Rng rng(5);
  SamplingOptions tiny{1.0, 0, 0};
  tiny.top_p = 1e-9;
  for (int d = 0; d < 100; ++d) EXPECT_EQ(titans::sample_token<double>(logits, tiny, rng), 1);
}

// The per-token callback sees each token as it is picked and can stop the generation; the state
// then ends after the last token, as a shorter generate would leave it.
TEST(ModelGenerate, CallbackStreamsAndStops) {
  const TitansModel<double> model(small_config({BlockKind::mac, BlockKind::swa}));
  const Params<double> p = lively_params(model, 12);
  const std::vector<int> prompt = {1, 2, 3};
  const SamplingOptions o{1.0, 0, 9};
  auto full_state = model.initial_state(p);
  const auto full = titans::generate(model, p, full_state, prompt, 12, o);
  std::vector<int> seen;
  auto s = model.initial_state(p);
  const auto out = titans::generate(model, p, s, prompt, 12, o, [&](int tok) {
    seen.push_back(tok);
    return seen.size() < 5;
  });
  ASSERT_EQ(out.size(), 5u);
  EXPECT_EQ(seen, out);
  EXPECT_EQ(out, std::vector<int>(full.begin(), full.begin() + 5));
  EXPECT_EQ(s.position, 3 + 5);
  auto five = model.initial_state(p);
  titans::generate(model, p, five, prompt, 5, o);
  EXPECT_EQ(model.step(p, 4, s), model.step(p, 4, five));  // the same state
  // A callback that never stops changes nothing.
  auto s2 = model.initial_state(p);
  EXPECT_EQ(titans::generate(model, p, s2, prompt, 12, o, [](int) { return true; }), full);
}

TEST(ModelSample, BadOptionsThrow) {
  titans::Vector<double> logits = titans::Vector<double>::Zero(3);
  titans::detail::Rng rng(1);
  EXPECT_THROW(titans::sample_token<double>(logits, SamplingOptions{-1.0, 0, 0}, rng), titans::InvalidArgument);
  EXPECT_THROW(titans::sample_token<double>(logits, SamplingOptions{std::nan(""), 0, 0}, rng), titans::InvalidArgument);
  EXPECT_THROW(titans::sample_token<double>(logits, SamplingOptions{1.0, -1, 0}, rng), titans::InvalidArgument);
  for (double top_p : {0.0, -0.5, 1.5, std::nan("")}) {
    SamplingOptions o{1.0, 0, 0};
    o.top_p = top_p;
    EXPECT_THROW(titans::sample_token<double>(logits, o, rng), titans::InvalidArgument) << top_p;
  }
  logits(1) = std::numeric_limits<double>::infinity();
  EXPECT_THROW(titans::sample_token<double>(logits, SamplingOptions{1.0, 0, 0}, rng), titans::NumericError);
  EXPECT_THROW(titans::sample_token<double>(titans::Vector<double>(0), SamplingOptions{1.0, 0, 0}, rng),
               titans::InvalidArgument);

  const TitansModel<double> model(small_config({BlockKind::swa}));
  const Params<double> p = model.init(1);
  auto s = model.initial_state(p);
  EXPECT_THROW(titans::generate(model, p, s, {}, 3), titans::InvalidArgument);
  EXPECT_THROW(titans::generate(model, p, s, {1}, -1), titans::InvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------------------------

// Training with the optimizer works end to end: AdamW on the batched gradient drives the loss of
// a small fixed batch (each sequence from its own fresh state) far below where it started.
TEST(ModelTraining, AdamWLowersTheLossOfAFixedBatch) {
  for (const auto& layers : std::vector<std::vector<BlockKind>>{{BlockKind::mac}, {BlockKind::mag, BlockKind::swa}}) {
    SCOPED_TRACE(name_of(layers));
    const TitansModel<double> model(small_config(layers));
    auto p = model.init(5);
    const std::vector<std::vector<int>> in = {{1, 2, 3, 4, 5, 6, 0, 1, 2}, {6, 5, 4, 3, 2, 1, 0, 6, 5}};
    const std::vector<std::vector<int>> tg = {{2, 3, 4, 5, 6, 0, 1, 2, 3}, {5, 4, 3, 2, 1, 0, 6, 5, 4}};
    titans::AdamWConfig ac;
    ac.weight_decay = 0;
    titans::AdamW<Params<double>> opt(p, ac);
    const double first = model.loss(p, in, tg);
    for (int step = 0; step < 60; ++step) {
      auto g = titans::zeros_like(p);
      model.loss_and_gradient(p, in, tg, g);
      opt.step(p, g, 1e-2);
    }
    const double last = model.loss(p, in, tg);
    EXPECT_LT(last, 0.25 * first) << "loss " << first << " -> " << last;
  }
}

TEST(CrossEntropy, MatchesHandComputedFormula) {
  Mat<double> logits(3, 3);
  logits << 1.0, -0.5, 2.0,  //
      0.0, 0.5, 2.0,         //
      -1.0, 3.0, 2.0;
  const std::vector<int> targets = {0, -1, 1};
  // Column 0: log(e^1 + e^0 + e^-1) − 1; column 2: all equal → log 3. Column 1 ignored.
  const double l0 = std::log(std::exp(1.0) + std::exp(0.0) + std::exp(-1.0)) - 1.0;
  const double l2 = std::log(3.0);
  Mat<double> d = Mat<double>::Constant(3, 3, 0.25);  // accumulates onto junk
  Index counted = 0;
  const double l = titans::cross_entropy<double>(logits, targets, &d, 2.0, &counted);
  EXPECT_EQ(counted, 2);
  EXPECT_NEAR(l, (l0 + l2) / 2, 1e-15);
  // ∂/∂logits of scale · mean = scale / n · (softmax − onehot); ignored columns get nothing.
  const double z0 = std::exp(1.0) + 1.0 + std::exp(-1.0);
  Mat<double> expected = Mat<double>::Constant(3, 3, 0.25);
  expected(0, 0) += (std::exp(1.0) / z0 - 1.0);
  expected(1, 0) += 1.0 / z0;
  expected(2, 0) += std::exp(-1.0) / z0;
  expected(0, 2) += 1.0 / 3;
  expected(1, 2) += 1.0 / 3 - 1.0;
  expected(2, 2) += 1.0 / 3;
  EXPECT_LT(max_abs_diff(d, expected), 1e-15);
  // Large logits do not overflow (max-shifted).
  Mat<double> big(2, 1);
  big << 1000.0, 999.0;
  EXPECT_NEAR(titans::cross_entropy<double>(big, {1}), std::log(1 + std::exp(-1.0)) + 1.0, 1e-12);
  // Nothing counted: 0.
  EXPECT_EQ(titans::cross_entropy<double>(logits, {-1, -1, -1}), 0.0);
  // float agrees.
  EXPECT_NEAR(titans::cross_entropy<float>(logits.cast<float>(), targets), l, 1e-6);
}

TEST(CrossEntropy, InvalidTargetsThrow) {
  const Mat<double> logits = Mat<double>::Zero(3, 2);
  EXPECT_THROW(titans::cross_entropy<double>(logits, {0, 3}), titans::InvalidArgument);
  EXPECT_THROW(titans::cross_entropy<double>(logits, {-2, 0}), titans::InvalidArgument);
  EXPECT_THROW(titans::cross_entropy<double>(logits, {0}), titans::ShapeError);
  Mat<double> wrong(2, 2);
  EXPECT_THROW(titans::cross_entropy<double>(logits, {0, 1}, &wrong), titans::ShapeError);
  EXPECT_NE(message_of([&] { titans::cross_entropy<double>(logits, {0, 3}); }).find("target 3"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Bad input, config validation, metadata
// ---------------------------------------------------------------------------------------------

TEST(ModelBadInput, TokenOutOfRangeNamesTheToken) {
  const TitansModel<double> model(small_config({BlockKind::mac}));
  const Params<double> p = model.init(2);
  auto s = model.initial_state(p);
  const std::string m = message_of([&] { model.forward(p, {1, 2, 7}, s); });
  EXPECT_NE(m.find("token 7"), std::string::npos) << m;
  EXPECT_NE(m.find("position 2"), std::string::npos) << m;
  EXPECT_THROW(model.forward(p, {1, 2, 7}, s), titans::InvalidArgument);
  EXPECT_THROW(model.step(p, -1, s), titans::InvalidArgument);
  EXPECT_THROW(model.loss(p, {{0, 9}}, {{1, 2}}), titans::InvalidArgument);
  auto g = titans::zeros_like(p);
  EXPECT_THROW(model.loss_and_gradient(p, {{0, 1}}, {{1, 7}}, g), titans::InvalidArgument);
  EXPECT_THROW(model.loss_and_gradient(p, {{0, 1}}, {{1}}, g), titans::ShapeError);
  EXPECT_THROW(model.loss_and_gradient(p, {{0, 1}}, {{1, 2}, {1}}, g), titans::InvalidArgument);
  // Params of another model are rejected.
  const TitansModel<double> untied(small_config({BlockKind::mac}, false));
  EXPECT_THROW(untied.initial_state(p), titans::ShapeError);
  const TitansModel<double> other(small_config({BlockKind::mag}));
  EXPECT_THROW(other.initial_state(p), titans::ShapeError);
}

// A NaN in any parameter of any block, the embedding, the final norm or the head is reported by
// the model as that parameter, with the model's name for it.
TEST(ModelBadInput, NonFiniteParameterIsNamed) {
  for (bool tied : {true, false}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    const TitansModel<double> model(
        small_config({BlockKind::mac, BlockKind::mag, BlockKind::mal, BlockKind::lmm, BlockKind::swa}, tied));
    const Params<double> p = model.init(2);
    const std::vector<int> tokens = {0, 1, 2, 3, 4, 5, 6};
    std::vector<std::string> names;
    p.for_each([&](const std::string& n, const auto& t) {
      if (t.size() > 0) names.push_back(n);
    });
    for (const std::string& name : names) {
      Params<double> bad = p;
      bad.for_each([&](const std::string& n, auto& t) {
        if (n == name) t(t.rows() - 1, 0) = std::numeric_limits<double>::quiet_NaN();
      });
      auto s = model.initial_state(bad);
      const std::string m = message_of([&] { model.forward(bad, tokens, s); });
      EXPECT_NE(m.find("parameter '" + name + "'"), std::string::npos) << m;
      EXPECT_THROW(model.loss(bad, {tokens}, {tokens}), titans::NumericError) << name;
    }
  }
}

TEST(ModelBadInput, InvalidConfigNamesTheField) {
  auto expect_field = [](ModelConfig c, const std::string& field) {
    const std::string m = message_of([&] { TitansModel<double> model(c); });
    EXPECT_NE(m.find(field), std::string::npos) << "expected '" << field << "' in: " << m;
    EXPECT_THROW(TitansModel<double>{c}, titans::InvalidArgument);
  };
  ModelConfig c = small_config({BlockKind::mac});
  c.vocab = 0;
  expect_field(c, "vocab");
  c = small_config({});
  expect_field(c, "layers");
  c = small_config({BlockKind::mac});
  c.norm_eps = 0;
  expect_field(c, "norm_eps");
  c = small_config({BlockKind::mag});
  c.block.window = 0;
  expect_field(c, "window");
  c = small_config({BlockKind::mac});
  c.block.segment = 0;
  expect_field(c, "segment");
  c = small_config({BlockKind::swa});
  c.block.attention_heads = 3;
  expect_field(c, "attention_heads");
  c = small_config({BlockKind::swa});
  c.block.persistent = -1;
  expect_field(c, "persistent");
  c = small_config({BlockKind::mal});
  c.block.ffn_hidden = -2;
  expect_field(c, "ffn_hidden");
  c = small_config({BlockKind::lmm});
  c.block.memory.dim = 4;
  expect_field(c, "memory.dim");
  c = small_config({BlockKind::swa, BlockKind::lmm});
  c.block.memory.chunk_size = 0;
  expect_field(c, "chunk_size");
  c = small_config({BlockKind::mag});
  c.block.dim = 0;
  expect_field(c, "dim");
}

bool same_config(const ModelConfig& a, const ModelConfig& b) {
  const titans::BlockConfig &x = a.block, &y = b.block;
  const titans::NeuralMemoryConfig &m = x.memory, &n = y.memory;
  return a.vocab == b.vocab && a.layers == b.layers && a.tied == b.tied && a.norm_eps == b.norm_eps && x.dim == y.dim &&
         x.attention_heads == y.attention_heads && x.window == y.window && x.segment == y.segment &&
         x.persistent == y.persistent && x.ffn_hidden == y.ffn_hidden && x.rope_base == y.rope_base &&
         x.attention_block == y.attention_block && x.norm_eps == y.norm_eps &&
         x.checkpoint_every == y.checkpoint_every && x.memory_tokens == y.memory_tokens && m.dim == n.dim && m.heads == n.heads &&
         m.depth == n.depth && m.expansion == n.expansion && m.activation == n.activation &&
         m.residual == n.residual && m.chunk_size == n.chunk_size && m.conv_kernel == n.conv_kernel &&
         m.theta_max == n.theta_max && m.eta_max == n.eta_max && m.alpha_max == n.alpha_max &&
         m.per_chunk_gates == n.per_chunk_gates && m.norm_eps == n.norm_eps;
}

ModelConfig unusual_config() {
  ModelConfig c = small_config({BlockKind::mac, BlockKind::swa, BlockKind::mal, BlockKind::lmm, BlockKind::mag}, false);
  c.vocab = 300;
  c.norm_eps = 1.0 / 3e5;  // not exactly representable in a short decimal
  c.block.window = 5;
  c.block.segment = 6;
  c.block.persistent = 0;
  c.block.ffn_hidden = 0;
  c.block.rope_base = 123.456789;
  c.block.attention_block = 7;
  c.block.norm_eps = 0.1 / 3;
  c.block.checkpoint_every = 3;
  c.block.memory_tokens = 3;  // the MAC block's Figure 3a form (the other kinds ignore it)
  c.block.memory.depth = 3;
  c.block.memory.expansion = 3;
  c.block.memory.activation = titans::Activation::gelu;
  c.block.memory.residual = true;
  c.block.memory.chunk_size = 5;
  c.block.memory.conv_kernel = 2;
  c.block.memory.theta_max = 0.7;
  c.block.memory.eta_max = 0.85;
  c.block.memory.alpha_max = 0.6;
  c.block.memory.per_chunk_gates = true;
  c.block.memory.norm_eps = 1e-7;
  return c;
}

TEST(ModelMetadata, RoundTrip) {
  for (const ModelConfig& c : {ModelConfig{}, small_config({BlockKind::lmm}), unusual_config()}) {
    const auto meta = titans::to_metadata(c);
    const ModelConfig back = titans::model_config_from_metadata(meta);
    EXPECT_TRUE(same_config(c, back)) << name_of(c.layers);
    EXPECT_EQ(titans::to_metadata(back), meta);
  }
  // The differences are really compared: a changed field makes the configs differ.
  ModelConfig c = unusual_config();
  ModelConfig d = c;
  d.block.memory.theta_max = 0.71;
  EXPECT_FALSE(same_config(c, d));
}

TEST(ModelMetadata, CorruptMetadataIsFormatError) {
  const auto good = titans::to_metadata(small_config({BlockKind::mac, BlockKind::mag}));
  ASSERT_NO_THROW(titans::model_config_from_metadata(good));
  auto expect_format_error = [&](const std::string& key, const char* value, const std::string& why) {
    auto m = good;
    if (value)
      m[key] = value;
    else
      m.erase(key);
    try {
      titans::model_config_from_metadata(m);
      ADD_FAILURE() << why << ": no exception";
    } catch (const titans::FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(key.substr(key.find('.') + 1)), std::string::npos)
          << why << ": " << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << why << ": wrong exception type: " << e.what();
    }
  };
  expect_format_error("model.vocab", nullptr, "missing key");
  expect_format_error("model.vocab", "seven", "not an integer");
  expect_format_error("model.vocab", "7x", "trailing junk");
  expect_format_error("model.vocab", "0", "invalid value");
  expect_format_error("model.vocab", "99999999999999999999999", "overflow");
  expect_format_error("model.layers", "mac,xyz", "unknown block kind");
  expect_format_error("model.layers", "", "no layers");
  expect_format_error("model.layers", "mac,", "trailing empty kind");
  expect_format_error("model.tied", "yes", "not a bool");
  expect_format_error("model.norm_eps", "abc", "not a number");
  expect_format_error("model.norm_eps", "-1", "invalid value");
  expect_format_error("block.dim", "12", "block.dim differs from the memory's dim");
  expect_format_error("block.window", "0", "invalid window");
  expect_format_error("block.attention_heads", "3", "heads do not divide dim");
  expect_format_error("block.segment", nullptr, "missing key");
  expect_format_error("neural_memory.chunk_size", "x", "memory field not an integer");
  expect_format_error("neural_memory.heads", "3", "memory heads do not divide dim");
  expect_format_error("neural_memory.chunk_size", "0", "invalid memory chunk size");
  expect_format_error("block.checkpoint_every", "0", "invalid checkpoint_every");
  expect_format_error("block.memory_tokens", "-2", "invalid memory_tokens");
  expect_format_error("block.memory_tokens", "3.5", "memory_tokens not an integer");
}

// Every missing required key is named in one message; keys with a default may be missing.
TEST(ModelMetadata, MissingKeysNamedAtOnceAndDefaultsApplied) {
  const ModelConfig c = unusual_config();
  auto m = titans::to_metadata(c);
  for (const char* key : {"model.vocab", "block.segment", "neural_memory.depth"}) m.erase(key);
  try {
    titans::model_config_from_metadata(m);
    ADD_FAILURE() << "no exception";
  } catch (const titans::FormatError& e) {
    const std::string what = e.what();
    for (const char* key : {"'model.vocab'", "'block.segment'", "'neural_memory.depth'", "3 required keys missing"})
      EXPECT_NE(what.find(key), std::string::npos) << key << " not in: " << what;
  }
  // The keys with a default: a file without them loads, with the documented defaults.
  const std::vector<std::string> optional = {"model.norm_eps",           "block.rope_base",
                                             "block.attention_block",    "block.norm_eps",
                                             "block.checkpoint_every",   "block.memory_tokens",
                                             "neural_memory.activation",
                                             "neural_memory.output_norm", "neural_memory.surprise_clamp",
                                             "neural_memory.eta_max",     "neural_memory.alpha_max",
                                             "neural_memory.per_chunk_gates", "neural_memory.norm_eps",
                                             "neural_memory.bias",        "neural_memory.bias_p",
                                             "neural_memory.bias_eps",    "neural_memory.threshold_max"};
  m = titans::to_metadata(c);
  for (const auto& key : optional) ASSERT_EQ(m.erase(key), 1u) << key;
  const ModelConfig back = titans::model_config_from_metadata(m);
  const ModelConfig dflt{};
  EXPECT_EQ(back.vocab, c.vocab);
  EXPECT_EQ(back.block.segment, c.block.segment);
  EXPECT_EQ(back.norm_eps, dflt.norm_eps);
  EXPECT_EQ(back.block.rope_base, dflt.block.rope_base);
  EXPECT_EQ(back.block.attention_block, dflt.block.attention_block);
  EXPECT_EQ(back.block.checkpoint_every, dflt.block.checkpoint_every);
  EXPECT_EQ(back.block.memory_tokens, 0);  // a file from before the Figure 3a form: interleaved MAC
  EXPECT_EQ(back.block.memory.activation, titans::Activation::silu);
  EXPECT_FALSE(back.block.memory.output_norm);  // absent bounds mean "off" (files from before them)
  EXPECT_EQ(back.block.memory.surprise_clamp, 0.0);
  EXPECT_EQ(back.block.memory.eta_max, 1.0);
  EXPECT_EQ(back.block.memory.alpha_max, 1.0);
  EXPECT_FALSE(back.block.memory.per_chunk_gates);
  EXPECT_EQ(back.block.memory.bias, titans::AttentionalBias::l2);  // a file from before the biases
  // Every key to_metadata writes is either required or in the optional list above.
  std::size_t required = 0;
  for (const auto& [key, value] : titans::to_metadata(c)) {
    auto without = titans::to_metadata(c);
    without.erase(key);
    bool threw = false;
    try {
      titans::model_config_from_metadata(without);
    } catch (const titans::FormatError&) {
      threw = true;
    }
    const bool listed = std::find(optional.begin(), optional.end(), key) != optional.end();
    EXPECT_NE(threw, listed) << key;
    required += threw;
  }
  EXPECT_EQ(required, titans::to_metadata(c).size() - optional.size());
}

}  // namespace
