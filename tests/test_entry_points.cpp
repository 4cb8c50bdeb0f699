// SPDX-License-Identifier: Apache-2.0
// The argument checks of every public entry point of the layer, the blocks and the model: a
// wrong-shaped argument throws ShapeError (or InvalidArgument) naming it, a NaN or an infinity in
// a floating input throws NumericError naming it, and a call rejected by its checks leaves the
// caller's state, gradients and outputs as they were. Each test first makes the valid call, so
// the rejections below it are the checks and not a broken setup.
#include <titans/blocks.hpp>
#include <titans/memory/kernel.hpp>
#include <titans/model.hpp>
#include <titans/neural_memory.hpp>

#include <gtest/gtest.h>

#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "support/random_matrix.hpp"

namespace {

using titans::BlockKind;
using titans::Index;
using Mat = titans::Matrix<double>;
using Vec = titans::Vector<double>;
using titans_test::random_matrix;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// Runs f and expects an exception of type E whose what() contains `needle`.
template <class E, class F>
void expect_error(const std::string& needle, F&& f) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one naming '" << needle << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type (expected one naming '" << needle << "'): " << e.what();
  }
}
// The trace names the needle and the line of the call.
#define EXPECT_ERROR(E, needle, ...)  \
  do {                                \
    SCOPED_TRACE(needle);             \
    expect_error<E>(needle, __VA_ARGS__); \
  } while (0)

// Every tensor of a parameter set or state, with its name: to prove a rejected call changed nothing.
template <class T>
std::vector<std::pair<std::string, Mat>> tensors(const T& t) {
  std::vector<std::pair<std::string, Mat>> out;
  t.for_each([&](const std::string& n, const auto& m) { out.emplace_back(n, Mat(m)); });
  return out;
}

// Equal shapes and entries (a NaN equals a NaN: an argument planted with one must come back as it was).
bool same(const Mat& a, const Mat& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         ((a.array() == b.array()) || (a.array().isNaN() && b.array().isNaN())).all();
}

template <class T>
bool same(const T& a, const T& b) {
  const auto ta = tensors(a), tb = tensors(b);
  if (ta.size() != tb.size()) return false;
  for (std::size_t i = 0; i < ta.size(); ++i)
    if (ta[i].first != tb[i].first || !same(ta[i].second, tb[i].second)) return false;
  return true;
}

template <class T>
bool all_finite(const T& t) {
  bool ok = true;
  t.for_each([&](const std::string&, const auto& m) { ok = ok && m.allFinite(); });
  return ok;
}

Mat with_entry(Mat m, Index i, Index j, double v) {
  m(i, j) = v;
  return m;
}

// =============================================================================================
// NeuralMemory
// =============================================================================================

using titans::NeuralMemory;
using NMState = titans::NeuralMemoryState<double>;
using NMParams = titans::NeuralMemoryParams<double>;
using NMCache = titans::NeuralMemoryCache<double>;

titans::NeuralMemoryConfig memory_config() {
  titans::NeuralMemoryConfig c;
  c.dim = 8;
  c.heads = 2;
  c.depth = 2;
  c.expansion = 2;
  c.chunk_size = 4;
  c.conv_kernel = 3;
  return c;
}

constexpr Index kD = 8;

struct MemoryFixture {
  NeuralMemory<double> layer{memory_config()};
  NMParams p = layer.init(1);
  NMState s = started(p);

  // One token in, so the state is inside a chunk and the conv tail is live; settled, so that
  // chunk_start is held (the form forward_train leaves, whose gradients backward takes).
  NMState started(const NMParams& params) const {
    NMState st = layer.initial_state(params);
    layer.forward(params, random_matrix<double>(kD, 1, 2), st);
    for (auto& h : st.heads) titans::memory_state_settle(layer.config().memory(), layer.config().chunk_size, h);
    return st;
  }
};

// Rejections of x and of the state, shared by every NeuralMemory entry point that takes them;
// `call(x, state)` runs the entry point, and the state must come out of every rejection unchanged.
template <class Call>
void expect_x_and_state_checked(const MemoryFixture& f, Call&& call) {
  NMState s = f.s;
  const NMState before = s;
  EXPECT_ERROR(titans::ShapeError, "x has shape (7, 3), expected (8, any)", [&] { call(Mat(Mat::Zero(7, 3)), s); });
  EXPECT_ERROR(titans::NumericError, "x has a non-finite value nan at (2, 1)",
               [&] { call(with_entry(Mat::Zero(kD, 3), 2, 1, kNaN), s); });
  EXPECT_ERROR(titans::NumericError, "x has a non-finite value inf at (0, 2)",
               [&] { call(with_entry(Mat::Zero(kD, 3), 0, 2, kInf), s); });
  EXPECT_TRUE(same(s, before));
  EXPECT_EQ(s.position, before.position);
  NMState bad = f.s;
  bad.heads.pop_back();
  EXPECT_ERROR(titans::ShapeError, "state.heads has 1 memories, expected heads = 2",
               [&] { call(Mat(Mat::Zero(kD, 3)), bad); });
  bad = f.s;
  bad.conv_tail.resize(3 * kD, 1);
  EXPECT_ERROR(titans::ShapeError, "state.conv_tail has shape (24, 1)", [&] { call(Mat(Mat::Zero(kD, 3)), bad); });
  bad = f.s;
  bad.chunk_gates.resize(5, 1);
  EXPECT_ERROR(titans::ShapeError, "state.chunk_gates has shape (5, 1)", [&] { call(Mat(Mat::Zero(kD, 3)), bad); });
  bad = f.s;
  bad.heads[1].weights[0].resize(3, 4);
  EXPECT_ERROR(titans::ShapeError, "state.weights[0] has shape (3, 4)", [&] { call(Mat(Mat::Zero(kD, 3)), bad); });
}

TEST(NeuralMemoryEntry, Forward) {
  const MemoryFixture f;
  NMState s = f.s;
  const Mat y = f.layer.forward(f.p, random_matrix<double>(kD, 5, 3), s);
  EXPECT_EQ(y.rows(), kD);
  EXPECT_EQ(y.cols(), 5);
  EXPECT_TRUE(y.allFinite());
  EXPECT_EQ(s.position, 6);
  expect_x_and_state_checked(f, [&](const Mat& x, NMState& st) { f.layer.forward(f.p, x, st); });
  NMParams bad = f.p;
  bad.w_k.resize(kD, 7);
  NMState st = f.s;
  EXPECT_ERROR(titans::ShapeError, "params.w_k has shape (8, 7)", [&] { f.layer.forward(bad, Mat(Mat::Zero(kD, 2)), st); });
  EXPECT_TRUE(same(st, f.s));
}

TEST(NeuralMemoryEntry, Step) {
  const MemoryFixture f;
  NMState s = f.s;
  const Vec y = f.layer.step(f.p, random_matrix<double>(kD, 1, 4).col(0), s);
  EXPECT_EQ(y.size(), kD);
  EXPECT_EQ(s.position, 2);
  s = f.s;
  EXPECT_ERROR(titans::ShapeError, "x has shape (7, 1)", [&] { f.layer.step(f.p, Vec(Vec::Zero(7)), s); });
  Vec x = Vec::Zero(kD);
  x(5) = kNaN;
  EXPECT_ERROR(titans::NumericError, "x has a non-finite value nan at (5, 0)", [&] { f.layer.step(f.p, x, s); });
  x(5) = -kInf;
  EXPECT_ERROR(titans::NumericError, "x has a non-finite value -inf", [&] { f.layer.step(f.p, x, s); });
  EXPECT_TRUE(same(s, f.s));
  EXPECT_EQ(s.position, 1);
}

TEST(NeuralMemoryEntry, ForwardTrain) {
  const MemoryFixture f;
  NMState s = f.s;
  NMCache cache;
  const Mat y = f.layer.forward_train(f.p, random_matrix<double>(kD, 5, 3), s, cache);
  EXPECT_EQ(y.cols(), 5);
  EXPECT_EQ(cache.x.cols(), 5);
  expect_x_and_state_checked(f, [&](const Mat& x, NMState& st) {
    NMCache c;
    f.layer.forward_train(f.p, x, st, c);
  });
  s = f.s;
  titans::MemoryTrainOptions opt;
  opt.checkpoint_every = 0;
  EXPECT_ERROR(titans::InvalidArgument, "options.checkpoint_every is 0",
               [&] { f.layer.forward_train(f.p, Mat(Mat::Zero(kD, 2)), s, cache, opt); });
  EXPECT_TRUE(same(s, f.s));
}

TEST(NeuralMemoryEntry, ReadRetrieveMemoryInputs) {
  const MemoryFixture f;
  const Mat x = random_matrix<double>(kD, 4, 5);
  EXPECT_EQ(f.layer.read(f.p, x, f.s).cols(), 4);
  EXPECT_EQ(f.layer.retrieve(f.p, x, f.s).cols(), 4);
  EXPECT_EQ(f.layer.memory_inputs(f.p, x, f.s).k.cols(), 4);
  expect_x_and_state_checked(f, [&](const Mat& xx, NMState& st) { f.layer.read(f.p, xx, st); });
  expect_x_and_state_checked(f, [&](const Mat& xx, NMState& st) { f.layer.retrieve(f.p, xx, st); });
  expect_x_and_state_checked(f, [&](const Mat& xx, NMState& st) { f.layer.memory_inputs(f.p, xx, st); });
}

// backward, from a call that starts and ends inside a chunk (chunk_start held at both ends).
TEST(NeuralMemoryEntry, Backward) {
  const MemoryFixture f;
  const Index T = 6;
  NMState s = f.s;  // position 1
  const NMState start = s;
  NMCache cache;
  f.layer.forward_train(f.p, random_matrix<double>(kD, T, 6), s, cache);  // ends at position 7
  const Mat dout = random_matrix<double>(kD, T, 7);
  const NMState dfinal = titans::zeros_like(s);
  NMParams grads = titans::zeros_like(f.p);
  Mat dx = Mat::Zero(kD, T);
  NMState dinitial = titans::zeros_like(start);
  f.layer.backward(f.p, cache, dout, &dfinal, grads, dx, &dinitial);  // the valid call
  EXPECT_TRUE(all_finite(grads));
  EXPECT_GT(dx.norm(), 0);

  const NMParams grads0 = grads;
  const Mat dx0 = dx;
  const NMState dinitial0 = dinitial;
  auto call = [&](const Mat& dy, const NMState* dfin, NMState* dinit) {
    f.layer.backward(f.p, cache, dy, dfin, grads, dx, dinit);
  };
  auto unchanged = [&] {
    EXPECT_TRUE(same(grads, grads0));
    EXPECT_TRUE(same(dx, dx0));
    EXPECT_TRUE(same(dinitial, dinitial0));
  };

  // dout
  EXPECT_ERROR(titans::ShapeError, "dout has shape (7, 6), expected (8, 6)",
               [&] { call(Mat::Zero(7, T), &dfinal, &dinitial); });
  EXPECT_ERROR(titans::ShapeError, "dout has shape (8, 5), expected (8, 6)",
               [&] { call(Mat::Zero(kD, T - 1), &dfinal, &dinitial); });
  EXPECT_ERROR(titans::NumericError, "dout has a non-finite value nan at (3, 4)",
               [&] { call(with_entry(dout, 3, 4, kNaN), &dfinal, &dinitial); });
  EXPECT_ERROR(titans::NumericError, "dout has a non-finite value inf at (0, 0)",
               [&] { call(with_entry(dout, 0, 0, kInf), nullptr, nullptr); });
  unchanged();

  // dx, grads
  {
    Mat bad_dx = Mat::Zero(kD, T + 1);
    EXPECT_ERROR(titans::ShapeError, "dx has shape (8, 7), expected (8, 6)",
                 [&] { f.layer.backward(f.p, cache, dout, &dfinal, grads, bad_dx, &dinitial); });
    NMParams bad_grads = grads0;
    bad_grads.w_out.resize(kD, 3);
    const NMParams bad_grads0 = bad_grads;
    EXPECT_ERROR(titans::ShapeError, "grads", [&] { f.layer.backward(f.p, cache, dout, &dfinal, bad_grads, dx, &dinitial); });
    EXPECT_ERROR(titans::ShapeError, "params.w_out has shape (8, 3)",
                 [&] { f.layer.backward(f.p, cache, dout, &dfinal, bad_grads, dx, &dinitial); });
    EXPECT_TRUE(same(bad_grads, bad_grads0));
    NMCache empty;
    EXPECT_ERROR(titans::InvalidArgument, "cache",
                 [&] { f.layer.backward(f.p, empty, dout, &dfinal, grads, dx, &dinitial); });
    unchanged();
  }

  // dfinal: shapes, head count, per-head memories, non-finite values.
  auto bad_final = [&](const std::string& needle, auto&& edit, bool numeric = false) {
    NMState d = dfinal;
    edit(d);
    if (numeric) {
      EXPECT_ERROR(titans::NumericError, needle, [&] { call(dout, &d, &dinitial); });
    } else {
      EXPECT_ERROR(titans::ShapeError, needle, [&] { call(dout, &d, &dinitial); });
    }
    unchanged();
  };
  bad_final("dfinal->conv_tail has shape (24, 1)", [](NMState& d) { d.conv_tail.resize(3 * kD, 1); });
  bad_final("dfinal->chunk_gates has shape (6, 2)", [](NMState& d) { d.chunk_gates.resize(6, 2); });
  bad_final("dfinal->heads has 3 memories, expected 2", [](NMState& d) { d.heads.push_back(d.heads[0]); });
  bad_final("dfinal->heads[1].weights[0] has shape (16, 3)", [](NMState& d) { d.heads[1].weights[0].resize(16, 3); });
  bad_final("dfinal->heads[0].momentum has 1 layers", [](NMState& d) { d.heads[0].momentum.pop_back(); });
  bad_final("dfinal->heads[1].chunk_start[1] has shape (4, 4)", [](NMState& d) { d.heads[1].chunk_start[1].resize(4, 4); });
  bad_final("dfinal 'conv_tail' has a non-finite value nan", [](NMState& d) { d.conv_tail(3, 1) = kNaN; }, true);
  bad_final("dfinal 'chunk_gates' has a non-finite value inf", [](NMState& d) { d.chunk_gates(2, 0) = kInf; }, true);
  bad_final("dfinal 'head1.momentum.w2' has a non-finite value nan",
            [](NMState& d) { d.heads[1].momentum[1](0, 3) = kNaN; }, true);
  bad_final("dfinal 'head0.chunk_start.w1' has a non-finite value -inf",
            [](NMState& d) { d.heads[0].chunk_start[0](1, 1) = -kInf; }, true);

  // dinitial: the same, for the state at the call start.
  auto bad_initial = [&](const std::string& needle, auto&& edit, bool numeric = false) {
    NMState d = dinitial0;
    edit(d);
    const NMState d0 = d;
    if (numeric) {
      EXPECT_ERROR(titans::NumericError, needle, [&] { call(dout, &dfinal, &d); });
    } else {
      EXPECT_ERROR(titans::ShapeError, needle, [&] { call(dout, &dfinal, &d); });
    }
    EXPECT_TRUE(same(grads, grads0));
    EXPECT_TRUE(same(dx, dx0));
    EXPECT_TRUE(same(d, d0));
  };
  bad_initial("dinitial->conv_tail has shape (8, 2)", [](NMState& d) { d.conv_tail.resize(kD, 2); });
  bad_initial("dinitial->chunk_gates has shape (5, 1)", [](NMState& d) { d.chunk_gates.resize(5, 1); });
  bad_initial("dinitial->heads has 1 memories, expected 2", [](NMState& d) { d.heads.pop_back(); });
  bad_initial("dinitial->heads[0].weights[1] has shape (4, 3)", [](NMState& d) { d.heads[0].weights[1].resize(4, 3); });
  bad_initial("dinitial->heads[1].chunk_start is empty, but position 1 is inside a chunk",
              [](NMState& d) { d.heads[1].chunk_start.clear(); });
  bad_initial("dinitial 'chunk_gates' has a non-finite value nan", [](NMState& d) { d.chunk_gates(0, 0) = kNaN; }, true);
  bad_initial("dinitial 'head1.weights.w1' has a non-finite value inf",
              [](NMState& d) { d.heads[1].weights[0](2, 2) = kInf; }, true);
}

// A call that ends at a chunk boundary has no chunk_start in its final state: a dfinal holding
// one is rejected; and a zero-length call checks its arguments too.
TEST(NeuralMemoryEntry, BackwardChunkBoundaryAndEmptyCall) {
  const MemoryFixture f;
  NMState s = f.s;  // position 1
  NMCache cache;
  f.layer.forward_train(f.p, random_matrix<double>(kD, 3, 6), s, cache);  // ends at position 4
  ASSERT_TRUE(s.heads[0].chunk_start.empty());
  NMState dfinal = titans::zeros_like(s);
  NMParams grads = titans::zeros_like(f.p);
  Mat dx = Mat::Zero(kD, 3);
  f.layer.backward(f.p, cache, random_matrix<double>(kD, 3, 8), &dfinal, grads, dx);
  const NMParams grads0 = grads;
  dfinal.heads[1].chunk_start = dfinal.heads[1].weights;
  EXPECT_ERROR(titans::ShapeError, "dfinal->heads[1].chunk_start holds 2 tensors at a chunk boundary",
               [&] { f.layer.backward(f.p, cache, random_matrix<double>(kD, 3, 8), &dfinal, grads, dx); });
  EXPECT_TRUE(same(grads, grads0));

  NMState s2 = f.s;
  NMCache empty_call;
  f.layer.forward_train(f.p, Mat(kD, 0), s2, empty_call);
  NMState d_end = titans::zeros_like(s2), d_start = titans::zeros_like(f.s);
  d_end.conv_tail.setOnes();
  Mat dx0(kD, 0);
  f.layer.backward(f.p, empty_call, Mat(kD, 0), &d_end, grads, dx0, &d_start);  // d_start += d_end
  EXPECT_TRUE(same(d_start.conv_tail, d_end.conv_tail));
  d_end.conv_tail(0, 0) = kNaN;
  const NMState d_start0 = d_start;
  EXPECT_ERROR(titans::NumericError, "dfinal 'conv_tail' has a non-finite value nan",
               [&] { f.layer.backward(f.p, empty_call, Mat(kD, 0), &d_end, grads, dx0, &d_start); });
  EXPECT_TRUE(same(d_start, d_start0));
}

TEST(NeuralMemoryEntry, ForwardBatch) {
  const MemoryFixture f;
  const std::vector<Mat> xs = {random_matrix<double>(kD, 3, 9), random_matrix<double>(kD, 2, 10)};
  std::vector<NMState> states = {f.s, f.s};
  const auto ys = f.layer.forward_batch(f.p, xs, states);
  ASSERT_EQ(ys.size(), 2u);
  EXPECT_EQ(ys[1].cols(), 2);
  EXPECT_EQ(states[0].position, 4);

  auto expect_untouched = [&](const std::vector<NMState>& st) {
    for (const auto& x : st) {
      EXPECT_TRUE(same(x, f.s));
      EXPECT_EQ(x.position, f.s.position);
    }
  };
  states = {f.s, f.s};
  EXPECT_ERROR(titans::InvalidArgument, "got 2 sequences and 1 states", [&] {
    std::vector<NMState> one = {f.s};
    f.layer.forward_batch(f.p, xs, one);
  });
  std::vector<Mat> bad = xs;
  bad[1] = Mat::Zero(kD + 1, 2);
  EXPECT_ERROR(titans::ShapeError, "xs[1] has shape (9, 2)", [&] { f.layer.forward_batch(f.p, bad, states); });
  expect_untouched(states);
  bad = xs;
  bad[1](4, 1) = kNaN;
  EXPECT_ERROR(titans::NumericError, "xs[1] has a non-finite value nan at (4, 1)",
               [&] { f.layer.forward_batch(f.p, bad, states); });
  expect_untouched(states);
  states[1].conv_tail.resize(1, 1);
  EXPECT_ERROR(titans::ShapeError, "states[1]", [&] { f.layer.forward_batch(f.p, xs, states); });
  EXPECT_ERROR(titans::ShapeError, "state.conv_tail has shape (1, 1)", [&] { f.layer.forward_batch(f.p, xs, states); });
  EXPECT_TRUE(same(states[0], f.s));
  EXPECT_EQ(states[0].position, f.s.position);
}

TEST(NeuralMemoryEntry, InitialStateBackward) {
  const MemoryFixture f;
  NMParams grads = titans::zeros_like(f.p);
  NMState dstate = titans::zeros_like(f.layer.initial_state(f.p));
  for (auto& h : dstate.heads)
    for (auto& w : h.weights) w.setOnes();
  f.layer.initial_state_backward(dstate, grads);  // the valid call
  EXPECT_GT(grads.memory_init[0].norm(), 0);
  const NMParams grads0 = grads;

  NMState bad = dstate;
  bad.heads.pop_back();
  EXPECT_ERROR(titans::ShapeError, "dstate.heads has 1 memories, expected 2", [&] { f.layer.initial_state_backward(bad, grads); });
  bad = dstate;
  bad.heads[1].weights[0].resize(2, 2);  // head 0 is fine: nothing may be added for it either
  EXPECT_ERROR(titans::ShapeError, "dstate.heads[1].weights[0] has shape (2, 2)",
               [&] { f.layer.initial_state_backward(bad, grads); });
  EXPECT_TRUE(same(grads, grads0));
  bad = dstate;
  bad.heads[1].weights[1](0, 0) = kNaN;
  EXPECT_ERROR(titans::NumericError, "dstate 'head1.weights.w2' has a non-finite value nan",
               [&] { f.layer.initial_state_backward(bad, grads); });
  EXPECT_TRUE(same(grads, grads0));
  NMParams bad_grads = grads0;
  bad_grads.memory_init.pop_back();
  EXPECT_ERROR(titans::ShapeError, "grads", [&] { f.layer.initial_state_backward(dstate, bad_grads); });
  EXPECT_ERROR(titans::ShapeError, "params.memory_init has 1 layers",
               [&] { f.layer.initial_state_backward(dstate, bad_grads); });
}

// =============================================================================================
// memory_retrieve (memory/kernel.hpp)
// =============================================================================================

TEST(MemoryRetrieveEntry, ChecksItsArguments) {
  titans::MemoryConfig cfg;
  cfg.dim = 4;
  cfg.depth = 2;
  cfg.expansion = 2;
  cfg.output_norm = true;
  const auto state = titans::make_memory_state(cfg, titans::init_memory_weights<double>(cfg, 3));
  const Vec gain = Vec::Ones(4);
  const Mat q = random_matrix<double>(4, 3, 11);
  const Mat r = titans::memory_retrieve<double>(cfg, state, q, gain);
  EXPECT_EQ(r.cols(), 3);
  EXPECT_TRUE(r.allFinite());

  EXPECT_ERROR(titans::ShapeError, "titans::memory_retrieve: q has shape (5, 3), expected (4, any)",
               [&] { titans::memory_retrieve<double>(cfg, state, Mat::Zero(5, 3), gain); });
  EXPECT_ERROR(titans::NumericError, "titans::memory_retrieve: q has a non-finite value nan at (1, 2)",
               [&] { titans::memory_retrieve<double>(cfg, state, with_entry(q, 1, 2, kNaN), gain); });
  EXPECT_ERROR(titans::NumericError, "q has a non-finite value inf",
               [&] { titans::memory_retrieve<double>(cfg, state, with_entry(q, 0, 0, kInf), gain); });
  auto bad = state;
  bad.weights[1].resize(4, 7);
  EXPECT_ERROR(titans::ShapeError, "titans::memory_retrieve: state.weights[1] has shape (4, 7)",
               [&] { titans::memory_retrieve<double>(cfg, bad, q, gain); });
  bad = state;
  bad.weights.pop_back();
  EXPECT_ERROR(titans::ShapeError, "state.weights has 1 layers", [&] { titans::memory_retrieve<double>(cfg, bad, q, gain); });
  EXPECT_ERROR(titans::ShapeError, "titans::memory_retrieve: gain has shape (3, 1)",
               [&] { titans::memory_retrieve<double>(cfg, state, q, Vec(Vec::Ones(3))); });
  Vec bad_gain = gain;
  bad_gain(2) = kNaN;
  EXPECT_ERROR(titans::NumericError, "gain has a non-finite value", [&] { titans::memory_retrieve<double>(cfg, state, q, bad_gain); });
}

// =============================================================================================
// Block and BlockStack
// =============================================================================================

using titans::Block;
using titans::BlockConfig;
using titans::BlockStack;

const std::vector<BlockKind> kKinds = {BlockKind::lmm, BlockKind::mac, BlockKind::mag, BlockKind::mal, BlockKind::swa};

BlockConfig block_config(BlockKind kind) {
  BlockConfig c;
  c.kind = kind;
  c.dim = kD;
  c.attention_heads = 2;
  c.window = 3;
  c.segment = 4;
  c.persistent = 2;
  c.ffn_hidden = 12;
  c.attention_block = 2;
  c.memory = memory_config();
  c.memory.chunk_size = 3;
  return c;
}

template <class Call>
void expect_block_x_checked(titans::BlockState<double>& s, Index dim, Call&& call) {
  const auto before = s;
  EXPECT_ERROR(titans::ShapeError, "x has shape (7, 3), expected (8, any)", [&] { call(Mat(Mat::Zero(dim - 1, 3))); });
  EXPECT_ERROR(titans::NumericError, "x has a non-finite value nan at (1, 2)",
               [&] { call(with_entry(random_matrix<double>(dim, 3, 1), 1, 2, kNaN)); });
  EXPECT_ERROR(titans::NumericError, "x has a non-finite value inf at (7, 0)",
               [&] { call(with_entry(random_matrix<double>(dim, 3, 1), 7, 0, kInf)); });
  EXPECT_TRUE(same(s, before));
  EXPECT_EQ(s.position, before.position);
}

TEST(BlockEntry, ForwardAndStep) {
  for (BlockKind kind : kKinds) {
    SCOPED_TRACE(titans::to_string(kind));
    const Block<double> blk(block_config(kind));
    const auto p = blk.init(1);
    auto s = blk.initial_state(p);
    EXPECT_EQ(blk.forward(p, random_matrix<double>(kD, 5, 2), s).cols(), 5);
    EXPECT_EQ(blk.step(p, random_matrix<double>(kD, 1, 3).col(0), s).size(), kD);
    EXPECT_EQ(s.position, 6);
    expect_block_x_checked(s, kD, [&](const Mat& x) { blk.forward(p, x, s); });
    const auto before = s;
    EXPECT_ERROR(titans::ShapeError, "x has shape (9, 1)", [&] { blk.step(p, Vec(Vec::Zero(kD + 1)), s); });
    Vec x = Vec::Zero(kD);
    x(3) = kNaN;
    EXPECT_ERROR(titans::NumericError, "x has a non-finite value nan at (3, 0)", [&] { blk.step(p, x, s); });
    EXPECT_TRUE(same(s, before));
    // A state whose counters disagree, params of another size.
    auto bad = s;
    bad.position += 1;
    EXPECT_ERROR(titans::InvalidArgument, "state.", [&] { blk.forward(p, Mat(Mat::Zero(kD, 1)), bad); });
    auto bad_p = p;
    bad_p.ffn_w2.resize(kD, 5);
    EXPECT_ERROR(titans::ShapeError, "params.ffn_w2 has shape (8, 5)", [&] { blk.forward(bad_p, Mat(Mat::Zero(kD, 1)), s); });
    EXPECT_TRUE(same(s, before));
  }
}

TEST(BlockEntry, ForwardTrain) {
  for (BlockKind kind : kKinds) {
    SCOPED_TRACE(titans::to_string(kind));
    const Block<double> blk(block_config(kind));
    const auto p = blk.init(1);
    auto s = blk.initial_state(p);
    titans::BlockCache<double> cache;
    EXPECT_EQ(blk.forward_train(p, random_matrix<double>(kD, 5, 2), s, cache).cols(), 5);
    expect_block_x_checked(s, kD, [&](const Mat& x) {
      titans::BlockCache<double> c;
      blk.forward_train(p, x, s, c);
    });
  }
}

TEST(BlockEntry, Backward) {
  for (BlockKind kind : kKinds) {
    SCOPED_TRACE(titans::to_string(kind));
    const Block<double> blk(block_config(kind));
    const auto p = blk.init(1);
    auto s = blk.initial_state(p);
    titans::BlockCache<double> cache;
    const Index T = 5;
    blk.forward_train(p, random_matrix<double>(kD, T, 2), s, cache);
    const Mat dout = random_matrix<double>(kD, T, 3);
    auto grads = titans::zeros_like(p);
    Mat dx = Mat::Zero(kD, T);
    blk.backward(p, cache, dout, grads, dx);  // the valid call
    EXPECT_GT(dx.norm(), 0);
    const auto grads0 = grads;
    const Mat dx0 = dx;

    EXPECT_ERROR(titans::ShapeError, "dout has shape (7, 5), expected (8, 5)",
                 [&] { blk.backward(p, cache, Mat::Zero(kD - 1, T), grads, dx); });
    EXPECT_ERROR(titans::ShapeError, "dout has shape (8, 6), expected (8, 5)",
                 [&] { blk.backward(p, cache, Mat::Zero(kD, T + 1), grads, dx); });
    EXPECT_ERROR(titans::NumericError, "dout has a non-finite value nan at (2, 3)",
                 [&] { blk.backward(p, cache, with_entry(dout, 2, 3, kNaN), grads, dx); });
    EXPECT_ERROR(titans::NumericError, "dout has a non-finite value -inf at (0, 4)",
                 [&] { blk.backward(p, cache, with_entry(dout, 0, 4, -kInf), grads, dx); });
    Mat bad_dx = Mat::Zero(kD, T - 1);
    EXPECT_ERROR(titans::ShapeError, "dx has shape (8, 4), expected (8, 5)", [&] { blk.backward(p, cache, dout, grads, bad_dx); });
    titans::BlockCache<double> empty;
    EXPECT_ERROR(titans::InvalidArgument, "cache", [&] { blk.backward(p, empty, dout, grads, dx); });
    auto bad_grads = grads0;
    bad_grads.norm_ffn.resize(3, 1);
    EXPECT_ERROR(titans::ShapeError, "grads", [&] { blk.backward(p, cache, dout, bad_grads, dx); });
    EXPECT_ERROR(titans::ShapeError, "params.norm_ffn has shape (3, 1)", [&] { blk.backward(p, cache, dout, bad_grads, dx); });
    EXPECT_TRUE(same(grads, grads0));
    EXPECT_TRUE(same(dx, dx0));
  }
}

TEST(BlockEntry, ForwardBatch) {
  const Block<double> blk(block_config(BlockKind::mag));
  const auto p = blk.init(1);
  const auto s0 = blk.initial_state(p);
  const std::vector<Mat> xs = {random_matrix<double>(kD, 3, 4), random_matrix<double>(kD, 2, 5)};
  std::vector<titans::BlockState<double>> states = {s0, s0};
  EXPECT_EQ(blk.forward_batch(p, xs, states).size(), 2u);
  EXPECT_EQ(states[1].position, 2);
  states = {s0, s0};
  std::vector<Mat> bad = xs;
  bad[1](0, 0) = kInf;
  EXPECT_ERROR(titans::NumericError, "xs[1] has a non-finite value inf", [&] { blk.forward_batch(p, bad, states); });
  bad[1] = Mat::Zero(3, 2);
  EXPECT_ERROR(titans::ShapeError, "xs[1] has shape (3, 2)", [&] { blk.forward_batch(p, bad, states); });
  states[1].position = 4;
  EXPECT_ERROR(titans::InvalidArgument, "states[1]", [&] { blk.forward_batch(p, xs, states); });
  EXPECT_EQ(states[0].position, 0);
  EXPECT_TRUE(same(states[0], s0));
  std::vector<titans::BlockState<double>> one = {s0};
  EXPECT_ERROR(titans::InvalidArgument, "got 2 sequences and 1 states", [&] { blk.forward_batch(p, xs, one); });
}

const std::vector<BlockKind> kStack = {BlockKind::mac, BlockKind::mal};

TEST(BlockStackEntry, ForwardAndStep) {
  const BlockStack<double> stack(block_config(BlockKind::mac), kStack);
  const auto p = stack.init(1);
  auto s = stack.initial_state(p);
  EXPECT_EQ(stack.forward(p, random_matrix<double>(kD, 5, 2), s).cols(), 5);
  EXPECT_EQ(stack.step(p, random_matrix<double>(kD, 1, 3).col(0), s).size(), kD);
  const auto before = s;
  auto unchanged = [&] {
    EXPECT_TRUE(same(s, before));
    for (std::size_t i = 0; i < s.blocks.size(); ++i) EXPECT_EQ(s.blocks[i].position, 6);
  };
  EXPECT_ERROR(titans::ShapeError, "x has shape (7, 2), expected (8, any)", [&] { stack.forward(p, Mat(Mat::Zero(kD - 1, 2)), s); });
  EXPECT_ERROR(titans::NumericError, "x has a non-finite value nan at (0, 1)",
               [&] { stack.forward(p, with_entry(Mat::Zero(kD, 2), 0, 1, kNaN), s); });
  EXPECT_ERROR(titans::ShapeError, "x has shape (3, 1)", [&] { stack.step(p, Vec(Vec::Zero(3)), s); });
  Vec x = Vec::Zero(kD);
  x(1) = kInf;
  EXPECT_ERROR(titans::NumericError, "x has a non-finite value inf at (1, 0)", [&] { stack.step(p, x, s); });
  unchanged();
  // The last block's state is broken: the first block must not have run either.
  auto bad = s;
  bad.blocks[1].memory.conv_tail.resize(kD, 1);
  const auto bad0 = bad;
  EXPECT_ERROR(titans::ShapeError, "state.conv_tail has shape (8, 1)", [&] { stack.forward(p, Mat(Mat::Zero(kD, 2)), bad); });
  EXPECT_TRUE(same(bad, bad0));
  EXPECT_EQ(bad.blocks[0].position, 6);
  bad = s;
  bad.blocks[1].position = 7;
  EXPECT_ERROR(titans::InvalidArgument, "state.", [&] { stack.step(p, Vec(Vec::Zero(kD)), bad); });
  EXPECT_EQ(bad.blocks[0].position, 6);
  bad = s;
  bad.blocks.pop_back();
  EXPECT_ERROR(titans::ShapeError, "state holds 1 blocks, the stack has 2", [&] { stack.forward(p, Mat(Mat::Zero(kD, 2)), bad); });
  auto bad_p = p;
  bad_p.blocks[1].norm_mixer.resize(2, 1);
  EXPECT_ERROR(titans::ShapeError, "params.norm_mixer has shape (2, 1)", [&] { stack.forward(bad_p, Mat(Mat::Zero(kD, 2)), s); });
  unchanged();
}

TEST(BlockStackEntry, ForwardTrain) {
  const BlockStack<double> stack(block_config(BlockKind::mac), kStack);
  const auto p = stack.init(1);
  auto s = stack.initial_state(p);
  typename BlockStack<double>::Cache cache;
  EXPECT_EQ(stack.forward_train(p, random_matrix<double>(kD, 5, 2), s, cache).cols(), 5);
  const auto before = s;
  EXPECT_ERROR(titans::ShapeError, "x has shape (9, 2)", [&] { stack.forward_train(p, Mat(Mat::Zero(kD + 1, 2)), s, cache); });
  EXPECT_ERROR(titans::NumericError, "x has a non-finite value nan",
               [&] { stack.forward_train(p, with_entry(Mat::Zero(kD, 2), 3, 0, kNaN), s, cache); });
  auto bad = s;
  bad.blocks[1].memory.heads.pop_back();
  const auto bad0 = bad;
  EXPECT_ERROR(titans::ShapeError, "state.heads has 1 memories", [&] { stack.forward_train(p, Mat(Mat::Zero(kD, 2)), bad, cache); });
  EXPECT_TRUE(same(bad, bad0));
  EXPECT_EQ(bad.blocks[0].position, 5);
  EXPECT_TRUE(same(s, before));
}

TEST(BlockStackEntry, Backward) {
  const BlockStack<double> stack(block_config(BlockKind::mac), kStack);
  const auto p = stack.init(1);
  auto s = stack.initial_state(p);
  typename BlockStack<double>::Cache cache;
  const Index T = 5;
  stack.forward_train(p, random_matrix<double>(kD, T, 2), s, cache);
  const Mat dout = random_matrix<double>(kD, T, 3);
  auto grads = titans::zeros_like(p);
  Mat dx = Mat::Zero(kD, T);
  stack.backward(p, cache, dout, grads, dx);  // the valid call
  EXPECT_GT(dx.norm(), 0);
  const auto grads0 = grads;
  const Mat dx0 = dx;
  auto unchanged = [&] {
    EXPECT_TRUE(same(grads, grads0));
    EXPECT_TRUE(same(dx, dx0));
  };

  EXPECT_ERROR(titans::ShapeError, "dout has shape (7, 5), expected (8, 5)",
               [&] { stack.backward(p, cache, Mat::Zero(kD - 1, T), grads, dx); });
  EXPECT_ERROR(titans::ShapeError, "dout has shape (8, 4), expected (8, 5)",
               [&] { stack.backward(p, cache, Mat::Zero(kD, T - 1), grads, dx); });
  EXPECT_ERROR(titans::NumericError, "dout has a non-finite value nan at (4, 2)",
               [&] { stack.backward(p, cache, with_entry(dout, 4, 2, kNaN), grads, dx); });
  EXPECT_ERROR(titans::NumericError, "dout has a non-finite value inf at (7, 4)",
               [&] { stack.backward(p, cache, with_entry(dout, 7, 4, kInf), grads, dx); });
  unchanged();
  Mat bad_dx = Mat::Zero(kD, T + 2);  // checked before any block adds into grads
  EXPECT_ERROR(titans::ShapeError, "dx has shape (8, 7), expected (8, 5)", [&] { stack.backward(p, cache, dout, grads, bad_dx); });
  unchanged();
  auto bad_cache = cache;
  bad_cache[0] = titans::BlockCache<double>{};  // the last block's cache is fine and runs first
  EXPECT_ERROR(titans::InvalidArgument, "cache", [&] { stack.backward(p, bad_cache, dout, grads, dx); });
  unchanged();
  bad_cache.pop_back();
  EXPECT_ERROR(titans::InvalidArgument, "cache holds 1 blocks, the stack has 2", [&] { stack.backward(p, bad_cache, dout, grads, dx); });
  auto bad_grads = grads0;
  bad_grads.blocks.pop_back();
  EXPECT_ERROR(titans::ShapeError, "grads", [&] { stack.backward(p, cache, dout, bad_grads, dx); });
  EXPECT_ERROR(titans::ShapeError, "params hold 1 blocks", [&] { stack.backward(p, cache, dout, bad_grads, dx); });
  unchanged();
}

// =============================================================================================
// TitansModel
// =============================================================================================

using titans::TitansModel;
using MParams = titans::ModelParams<double>;
using MState = titans::ModelState<double>;

titans::ModelConfig model_config(bool tied = true) {
  titans::ModelConfig c;
  c.vocab = 7;
  c.layers = {BlockKind::mac, BlockKind::mag};
  c.tied = tied;
  c.block = block_config(BlockKind::mac);
  return c;
}

template <class Call>
void expect_tokens_checked(const MState& s0, Call&& call) {
  MState s = s0;
  EXPECT_ERROR(titans::InvalidArgument, "token 7 at position 2 is outside [0, 7)", [&] { call(std::vector<int>{1, 2, 7}, s); });
  EXPECT_ERROR(titans::InvalidArgument, "token -1 at position 0", [&] { call(std::vector<int>{-1, 2}, s); });
  EXPECT_TRUE(same(s, s0));
  EXPECT_EQ(s.position, s0.position);
  MState bad = s0;
  bad.position += 2;
  EXPECT_ERROR(titans::InvalidArgument, "state.position is", [&] { call(std::vector<int>{1}, bad); });
  EXPECT_EQ(bad.blocks.blocks[0].position, s0.blocks.blocks[0].position);
  bad = s0;
  bad.blocks.blocks.pop_back();
  EXPECT_ERROR(titans::ShapeError, "state holds 1 blocks, the stack has 2", [&] { call(std::vector<int>{1}, bad); });
  bad = s0;
  bad.blocks.blocks[1].attention.k.resize(kD - 1, 0);
  const MState bad0 = bad;
  EXPECT_ERROR(titans::ShapeError, "state.k has shape (7, 0)", [&] { call(std::vector<int>{1}, bad); });
  EXPECT_TRUE(same(bad, bad0));
}

TEST(ModelEntry, ForwardAndStep) {
  const TitansModel<double> model(model_config());
  const MParams p = model.init(2);
  MState s = model.initial_state(p);
  EXPECT_EQ(model.forward(p, {0, 1, 2}, s).cols(), 3);
  EXPECT_EQ(model.step(p, 3, s).size(), 7);
  EXPECT_EQ(s.position, 4);
  // An empty call is valid and changes nothing.
  const MState s4 = s;
  const Mat none = model.forward(p, {}, s);
  EXPECT_EQ(none.rows(), 7);
  EXPECT_EQ(none.cols(), 0);
  EXPECT_TRUE(same(s, s4));
  EXPECT_EQ(s.position, 4);
  expect_tokens_checked(s, [&](const std::vector<int>& t, MState& st) { model.forward(p, t, st); });
  MState st = s;
  EXPECT_ERROR(titans::InvalidArgument, "token 7", [&] { model.step(p, 7, st); });
  EXPECT_ERROR(titans::InvalidArgument, "token -3", [&] { model.step(p, -3, st); });
  EXPECT_TRUE(same(st, s));
  EXPECT_EQ(st.position, 4);
  st.position = 0;
  EXPECT_ERROR(titans::InvalidArgument, "state.position is 0", [&] { model.step(p, 1, st); });
  MParams bad_p = p;
  bad_p.norm_final.resize(kD, 2);
  EXPECT_ERROR(titans::ShapeError, "params.norm_final has shape (8, 2)", [&] { model.forward(bad_p, {1}, s); });
}

TEST(ModelEntry, ForwardTrain) {
  const TitansModel<double> model(model_config());
  const MParams p = model.init(2);
  MState s = model.initial_state(p);
  titans::ModelCache<double> cache;
  EXPECT_EQ(model.forward_train(p, {0, 1, 2}, s, cache).cols(), 3);
  expect_tokens_checked(s, [&](const std::vector<int>& t, MState& st) {
    titans::ModelCache<double> c;
    model.forward_train(p, t, st, c);
  });
}

TEST(ModelEntry, Backward) {
  for (bool tied : {true, false}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    const TitansModel<double> model(model_config(tied));
    const MParams p = model.init(2);
    MState s = model.initial_state(p);
    titans::ModelCache<double> cache;
    const Index T = 4;
    model.forward_train(p, {0, 1, 2, 3}, s, cache);
    const Mat dlogits = random_matrix<double>(7, T, 5);
    MParams grads = titans::zeros_like(p);
    model.backward(p, cache, dlogits, grads);  // the valid call
    EXPECT_GT(grads.embedding.norm(), 0);
    const MParams grads0 = grads;

    EXPECT_ERROR(titans::ShapeError, "dlogits has shape (6, 4), expected (7, 4)",
                 [&] { model.backward(p, cache, Mat::Zero(6, T), grads); });
    EXPECT_ERROR(titans::ShapeError, "dlogits has shape (7, 3), expected (7, 4)",
                 [&] { model.backward(p, cache, Mat::Zero(7, T - 1), grads); });
    EXPECT_ERROR(titans::NumericError, "dlogits has a non-finite value nan at (6, 3)",
                 [&] { model.backward(p, cache, with_entry(dlogits, 6, 3, kNaN), grads); });
    EXPECT_ERROR(titans::NumericError, "dlogits has a non-finite value inf at (0, 1)",
                 [&] { model.backward(p, cache, with_entry(dlogits, 0, 1, kInf), grads); });
    EXPECT_TRUE(same(grads, grads0));
    titans::ModelCache<double> bad_cache = cache;
    bad_cache.blocks.pop_back();
    EXPECT_ERROR(titans::InvalidArgument, "cache", [&] { model.backward(p, bad_cache, dlogits, grads); });
    bad_cache = cache;
    bad_cache.blocks[0] = titans::BlockCache<double>{};
    EXPECT_ERROR(titans::InvalidArgument, "cache", [&] { model.backward(p, bad_cache, dlogits, grads); });
    EXPECT_ERROR(titans::InvalidArgument, "cache",
                 [&] { model.backward(p, titans::ModelCache<double>{}, Mat(7, 0), grads); });
    EXPECT_TRUE(same(grads, grads0));
    MParams bad_grads = grads0;
    bad_grads.embedding.resize(kD, 6);
    EXPECT_ERROR(titans::ShapeError, "grads", [&] { model.backward(p, cache, dlogits, bad_grads); });
    EXPECT_ERROR(titans::ShapeError, "params.embedding has shape (8, 6)", [&] { model.backward(p, cache, dlogits, bad_grads); });
  }
}

TEST(ModelEntry, LossAndGradient) {
  const TitansModel<double> model(model_config());
  const MParams p = model.init(2);
  const std::vector<std::vector<int>> in = {{0, 1, 2}, {3, 4}}, tg = {{1, 2, 3}, {4, -1}};
  MParams grads = titans::zeros_like(p);
  const double l = model.loss_and_gradient(p, in, tg, grads);  // the valid call
  EXPECT_TRUE(std::isfinite(l));
  EXPECT_GT(l, 0);
  EXPECT_NEAR(model.loss(p, in, tg), l, 1e-12);
  const MParams grads0 = grads;

  // Empty sequences are valid: they count for nothing.
  MParams g1 = titans::zeros_like(p), g2 = titans::zeros_like(p);
  const double l1 = model.loss_and_gradient(p, {{0, 1}}, {{1, 2}}, g1);
  const double l2 = model.loss_and_gradient(p, {{}, {0, 1}, {}}, {{}, {1, 2}, {}}, g2);
  EXPECT_NEAR(l1, l2, 1e-12);
  for (std::size_t i = 0; i < tensors(g1).size(); ++i)
    EXPECT_LT((tensors(g1)[i].second - tensors(g2)[i].second).cwiseAbs().maxCoeff(), 1e-12) << tensors(g1)[i].first;
  MParams g3 = titans::zeros_like(p);
  EXPECT_EQ(model.loss_and_gradient(p, {{}, {}}, {{}, {}}, g3), 0.0);
  EXPECT_EQ(model.loss(p, {}, {}), 0.0);
  EXPECT_TRUE(same(g3, titans::zeros_like(p)));

  // Token ids and targets out of range, named with their sequence.
  EXPECT_ERROR(titans::InvalidArgument, "inputs[1] has token 7 at position 1",
               [&] { model.loss_and_gradient(p, {{0, 1, 2}, {3, 7}}, tg, grads); });
  EXPECT_ERROR(titans::InvalidArgument, "inputs[0] has token -1 at position 2",
               [&] { model.loss_and_gradient(p, {{0, 1, -1}, {3, 4}}, tg, grads); });
  EXPECT_ERROR(titans::InvalidArgument, "targets[1] has target 9 at position 0",
               [&] { model.loss_and_gradient(p, in, {{1, 2, 3}, {9, 1}}, grads); });
  EXPECT_ERROR(titans::InvalidArgument, "targets[0] has target -2 at position 1",
               [&] { model.loss_and_gradient(p, in, {{1, -2, 3}, {4, 1}}, grads); });
  EXPECT_ERROR(titans::InvalidArgument, "inputs[1] has token 8", [&] { model.loss(p, {{0, 1, 2}, {3, 8}}, tg); });
  EXPECT_ERROR(titans::InvalidArgument, "targets[1] has target 7", [&] { model.loss(p, in, {{1, 2, 3}, {7, 1}}); });
  EXPECT_ERROR(titans::InvalidArgument, "got 2 input sequences and 1 target sequences",
               [&] { model.loss_and_gradient(p, in, {{1, 2, 3}}, grads); });
  EXPECT_ERROR(titans::ShapeError, "sequence 1 has 2 inputs and 1 targets",
               [&] { model.loss_and_gradient(p, in, {{1, 2, 3}, {4}}, grads); });
  EXPECT_TRUE(same(grads, grads0));
  MParams bad_grads = grads0;
  bad_grads.norm_final.resize(1, 1);
  EXPECT_ERROR(titans::ShapeError, "grads", [&] { model.loss_and_gradient(p, in, tg, bad_grads); });
  EXPECT_ERROR(titans::ShapeError, "params.norm_final has shape (1, 1)", [&] { model.loss_and_gradient(p, in, tg, bad_grads); });
  MParams bad_p = p;
  bad_p.blocks.blocks[0].ffn_w1.resize(3, 3);
  EXPECT_ERROR(titans::ShapeError, "params.ffn_w1 has shape (3, 3)", [&] { model.loss_and_gradient(bad_p, in, tg, grads); });
  EXPECT_TRUE(same(grads, grads0));
}

TEST(ModelEntry, Generate) {
  const TitansModel<double> model(model_config());
  const MParams p = model.init(2);
  MState s = model.initial_state(p);
  const auto out = titans::generate(model, p, s, {0, 1}, 3, {0.0, 0, 1});
  EXPECT_EQ(out.size(), 3u);
  EXPECT_EQ(s.position, 5);
  const MState s5 = s;
  EXPECT_ERROR(titans::InvalidArgument, "prompt is empty", [&] { titans::generate(model, p, s, {}, 3); });
  EXPECT_ERROR(titans::InvalidArgument, "count is -1", [&] { titans::generate(model, p, s, {1}, -1); });
  EXPECT_ERROR(titans::InvalidArgument, "token 9 at position 1", [&] { titans::generate(model, p, s, {1, 9}, 2); });
  EXPECT_TRUE(same(s, s5));
  EXPECT_EQ(s.position, 5);
  titans::detail::Rng rng(1);
  Vec logits = Vec::Zero(7);
  logits(4) = kNaN;
  EXPECT_ERROR(titans::NumericError, "logits has a non-finite value nan at (4, 0)",
               [&] { titans::sample_token<double>(logits, {}, rng); });
}

}  // namespace
