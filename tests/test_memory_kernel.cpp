// SPDX-License-Identifier: Apache-2.0
// The chunked dual form (docs/MATH.md §3) against the literal chunk/token loops (tests/support), the
// chunk coefficients against their definitions, streaming splits, causality, and bad input.
#include <titans/memory/backward.hpp>
#include <titans/memory/kernel.hpp>

#include <gtest/gtest.h>

#include "support/memory_forms.hpp"
#include "support/memory_problem.hpp"
#include "support/reference_memory.hpp"

#include <random>
#include <tuple>

namespace {

using titans::Activation;
using titans::Index;
using titans::MemoryConfig;
using titans_test::Mat;
using titans_test::Vec;

template <class S>
S rel_err(const Mat<S>& a, const Mat<S>& b) {
  const S scale = std::max<S>(S(1e-30), std::max(a.cwiseAbs().maxCoeff(), b.cwiseAbs().maxCoeff()));
  return (a - b).cwiseAbs().maxCoeff() / scale;
}

// The state in its settled form (pending tokens applied): Θ_t and S_t after the last token.
template <class S>
titans::MemoryState<S> settled(const MemoryConfig& cfg, Index b, titans::MemoryState<S> st) {
  titans::memory_state_settle(cfg, b, st);
  return st;
}

using Problem = titans_test::MemoryProblem;

Problem make_problem(Index d, Index T, std::uint64_t seed, int gate_mode = 0) {
  return titans_test::make_memory_problem(d, T, seed, gate_mode, 0.0);
}

using titans::AttentionalBias;
using Case = std::tuple<Index /*L*/, Index /*b*/, Activation, int /*form*/, int /*gates*/, AttentionalBias>;

std::string case_name(const Case& c) {
  const AttentionalBias bias = std::get<5>(c);
  return "L" + std::to_string(std::get<0>(c)) + "_b" + std::to_string(std::get<1>(c)) + "_" +
         titans::to_string(std::get<2>(c)) + "_" + titans_test::form_name(std::get<3>(c)) +
         (std::get<4>(c) ? "_extreme" : "") + (bias == AttentionalBias::l2 ? "" : std::string("_") + titans::to_string(bias));
}

class DualForm : public ::testing::TestWithParam<Case> {};

TEST_P(DualForm, EqualsChunkLoopAndStreams) {
  const auto [L, b, act, form, gates, bias] = GetParam();
  MemoryConfig cfg;
  cfg.dim = 6;
  cfg.depth = L;
  cfg.expansion = 2;
  cfg.activation = act;
  titans_test::apply_form(cfg, form);
  titans_test::apply_bias(cfg, bias);
  const Index T = 37;  // not a multiple of any b tested
  Problem p = make_problem(cfg.dim, T, 11 + static_cast<std::uint64_t>(L * 100 + b), gates);
  const auto init = titans::init_memory_weights<double>(cfg, 5);

  // Start from a state with non-zero momentum: write a prefix first (through the reference).
  const Problem pre = make_problem(cfg.dim, b, 99);
  std::vector<Mat<double>> zero_s;
  for (const auto& w : init.w) zero_s.push_back(Mat<double>::Zero(w.rows(), w.cols()));
  const auto r0 = titans_test::ref_chunk_loop(cfg, b, pre, init.w, zero_s);
  auto state = titans::make_memory_state(cfg, titans::MemoryWeights<double>{r0.w});
  state.momentum = r0.s;
  state.position = b;  // a chunk boundary

  titans_test::scale_steps_for_bias(cfg, p);
  titans_test::calibrate_threshold(cfg, r0.w, p);
  titans_test::calibrate_clamp(cfg, r0.w, p);
  const auto ref = titans_test::ref_chunk_loop(cfg, b, p, r0.w, r0.s);
  if (cfg.surprise_clamp > 0) {  // the clamp must act on some tokens and not on others
    int clamped = 0;
    for (Index t = 0; t < T; ++t) {
      double n2 = 0;
      for (const auto& u : titans_test::ref_grad<double>(cfg, r0.w, p.k.col(t), p.v.col(t), p.gain,
                                                         p.threshold.size() ? p.threshold(t) : 1.0))
        n2 += u.squaredNorm();
      clamped += std::sqrt(n2) > cfg.surprise_clamp;
    }
    EXPECT_GT(clamped, 0) << "at the start state";
    EXPECT_LT(clamped, T) << "at the start state";
  }
  auto one = state;
  const Mat<double> y = titans::memory_forward<double>(cfg, b, p, one);
  ASSERT_TRUE(ref.y.allFinite() && ref.w.back().allFinite()) << "test problem diverged";
  EXPECT_LT(rel_err(y, ref.y), 1e-10);
  if (bias != AttentionalBias::l2 && gates == 0) {  // the bias must change the result (else the test proves nothing)
    MemoryConfig l2 = cfg;
    l2.bias = AttentionalBias::l2;
    auto st = state;
    EXPECT_GT(rel_err<double>(titans::memory_forward<double>(l2, b, p, st), y), 1e-4);
  }
  // The call ends T % b tokens into a chunk: those are pending (W and S not yet written).
  EXPECT_EQ(one.pending_tokens(), T % b);
  const auto one_settled = settled(cfg, b, one);
  const auto current = titans::memory_current_weights(cfg, one);
  for (Index l = 0; l < L; ++l) {
    EXPECT_LT(rel_err(one_settled.weights[l], ref.w[l]), 1e-10) << "W" << l + 1;
    EXPECT_LT(rel_err(one_settled.momentum[l], ref.s[l]), 1e-10) << "S" << l + 1;
    EXPECT_LT(rel_err(current[l], ref.w[l]), 1e-10) << "current W" << l + 1;
  }
  EXPECT_EQ(one.position, b + T);
  // The training forward runs the same sub-chunks and leaves the settled form, bit for bit.
  {
    auto tr = state;
    titans::MemoryForwardCache<double> cache;
    const Mat<double> yt = titans::memory_forward_train<double>(cfg, b, p, tr, cache);
    EXPECT_EQ(yt, y);
    EXPECT_EQ(tr.pending_tokens(), 0);
    for (Index l = 0; l < L; ++l) {
      EXPECT_EQ(tr.weights[l], one_settled.weights[l]);
      EXPECT_EQ(tr.momentum[l], one_settled.momentum[l]);
    }
  }

  // Streaming: every split point (inside chunks included), and three-way splits.
  for (Index cut = 1; cut < T; cut += 3) {
    auto st = state;
    Mat<double> ys(cfg.dim, T);
    const Index cut2 = std::min<Index>(T - 1, cut + 1 + cut % 5);
    const Index bounds[] = {0, cut, cut2, T};
    for (int s = 0; s < 3; ++s) {
      const Index t0 = bounds[s], n = bounds[s + 1] - bounds[s];
      if (n == 0) continue;
      ys.middleCols(t0, n) =
          titans::memory_forward<double>(cfg, b, p.columns(t0, n), st);
    }
    // A split regroups the chunk sums: 1.5e-12 seen (L = 3, clang, AVX2), so 1e-11.
    EXPECT_LT(rel_err(ys, y), 1e-11) << "cut at " << cut << ", " << cut2;
    EXPECT_EQ(st.pending_tokens(), one.pending_tokens());
    const auto st_settled = settled(cfg, b, st);
    for (Index l = 0; l < L; ++l) {
      EXPECT_LT(rel_err(st_settled.weights[l], one_settled.weights[l]), 1e-11);
      EXPECT_LT(rel_err(st_settled.momentum[l], one_settled.momentum[l]), 1e-11);
    }
  }
  // Decoding, one token per call: inside a chunk each token joins the pending ones and, from a
  // state at its chunk start, takes the kernel's one-token path (decode_token), whose surprise
  // clamp falls back to the general path when it scales the step.
  {
    auto st = state;
    Mat<double> ys(cfg.dim, T);
    for (Index t = 0; t < T; ++t) ys.col(t) = titans::memory_forward<double>(cfg, b, p.columns(t, 1), st);
    EXPECT_LT(rel_err(ys, y), 1e-11) << "one token per call";
    EXPECT_EQ(st.pending_tokens(), one.pending_tokens());
    const auto st_settled = settled(cfg, b, st);
    for (Index l = 0; l < L; ++l) {
      EXPECT_LT(rel_err(st_settled.weights[l], one_settled.weights[l]), 1e-11) << "W" << l + 1;
      EXPECT_LT(rel_err(st_settled.momentum[l], one_settled.momentum[l]), 1e-11) << "S" << l + 1;
    }
  }
  // Streaming on from either form of the same state gives the same outputs: from the pending
  // form, from the settled one, and through the training forward (which settles first).
  {
    Problem more = make_problem(cfg.dim, 2 * b + 3, 77, gates);
    titans_test::scale_steps_for_bias(cfg, more);
    titans_test::calibrate_threshold(cfg, one_settled.weights, more);
    auto from_pending = one, from_settled = one_settled, from_train = one;
    const Mat<double> a = titans::memory_forward<double>(cfg, b, more, from_pending);
    const Mat<double> c = titans::memory_forward<double>(cfg, b, more, from_settled);
    titans::MemoryForwardCache<double> cache;
    const Mat<double> t = titans::memory_forward_train<double>(cfg, b, more, from_train, cache);
    EXPECT_LT(rel_err(a, c), 1e-11);
    EXPECT_LT(rel_err(t, c), 1e-11);
    const auto a_settled = settled(cfg, b, from_pending), c_settled = settled(cfg, b, from_settled);
    for (Index l = 0; l < L; ++l) {
      EXPECT_LT(rel_err(a_settled.weights[l], c_settled.weights[l]), 1e-11);
      EXPECT_LT(rel_err(from_train.weights[l], c_settled.weights[l]), 1e-11);
    }
    // Retrieval reads the current weights in either form.
    EXPECT_LT(rel_err<double>(titans::memory_retrieve<double>(cfg, one, more.q, more.gain),
                              titans::memory_retrieve<double>(cfg, one_settled, more.q, more.gain)),
              1e-12);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Memory, DualForm,
    ::testing::Combine(::testing::Values<Index>(1, 2, 3), ::testing::Values<Index>(1, 4, 8, 16),
                       ::testing::Values(Activation::silu, Activation::gelu, Activation::identity),
                       ::testing::Range(0, titans_test::kMemoryFormCount), ::testing::Values(0, 1),
                       ::testing::Values(AttentionalBias::l2)),
    [](const ::testing::TestParamInfo<Case>& info) { return case_name(info.param); });

// The other attentional biases (docs/MATH.md §11) in every form, linear and deep, with one
// activation, one chunk size and the ordinary gates: the bias only changes δ_L, so the chunk
// algebra and the extreme gates are the ones tested above (every chunk size, both gate modes).
INSTANTIATE_TEST_SUITE_P(
    Bias, DualForm,
    ::testing::Combine(::testing::Values<Index>(1, 2, 3), ::testing::Values<Index>(4),
                       ::testing::Values(Activation::silu), ::testing::Range(0, titans_test::kMemoryFormCount),
                       ::testing::Values(0),
                       ::testing::Values(AttentionalBias::huber, AttentionalBias::huber_radial, AttentionalBias::lp)),
    [](const ::testing::TestParamInfo<Case>& info) { return case_name(info.param); });

TEST(DualForm, TokenLoopIsChunkSizeOne) {
  // b = 1 must be the exact token-by-token rule: Θ_t depends on the gradient at Θ_{t−1}.
  for (Index L = 1; L <= 3; ++L) {
    for (int form = 0; form < titans_test::kMemoryFormCount; ++form) {
      MemoryConfig cfg;
      cfg.dim = 5;
      cfg.depth = L;
      cfg.expansion = 3;
      titans_test::apply_form(cfg, form);
      const Index T = 20;
      const Problem p = make_problem(cfg.dim, T, 3);
      const auto init = titans::init_memory_weights<double>(cfg, 8);
      titans_test::calibrate_clamp(cfg, init.w, p);
      std::vector<Mat<double>> w = init.w, s;
      for (const auto& m : w) s.push_back(Mat<double>::Zero(m.rows(), m.cols()));
      Mat<double> y(cfg.dim, T);
      for (Index t = 0; t < T; ++t) {  // the token recursion, written out
        const auto u = titans_test::ref_grad<double>(cfg, w, p.k.col(t), p.v.col(t), p.gain);
        double norm2 = 0, theta = p.theta(t);
        for (const auto& m : u) norm2 += m.squaredNorm();
        if (cfg.surprise_clamp > 0) theta *= std::min(1.0, cfg.surprise_clamp / std::sqrt(norm2));
        for (std::size_t l = 0; l < w.size(); ++l) {
          s[l] = p.eta(t) * s[l] - theta * u[l];
          w[l] = (1 - p.alpha(t)) * w[l] + s[l];
        }
        y.col(t) = titans_test::ref_apply<double>(cfg, w, p.q.col(t), p.gain);
      }
      const std::string what = "L " + std::to_string(L) + ", " + titans_test::form_name(form);
      auto state = titans::make_memory_state(cfg, init);
      const Mat<double> fast = titans::memory_forward<double>(cfg, 1, p, state);
      EXPECT_LT(rel_err(fast, y), 1e-10) << what;
      // A chunk of b > 1 is a different rule (gradients at the chunk start): the outputs must differ.
      auto state4 = titans::make_memory_state(cfg, init);
      const Mat<double> chunked = titans::memory_forward<double>(cfg, 4, p, state4);
      EXPECT_GT(rel_err(chunked, y), 1e-6) << what;
    }
  }
}

// Decoding one token per call (docs/MATH.md §3.4): inside a chunk W and S are neither written
// nor re-allocated (the tokens are pending), at its end they are written once; the outputs and
// the state equal one call's.
TEST(MemoryKernel, DecodeWritesTheStateOncePerChunk) {
  // Every bias (docs/MATH.md §11): the pending tokens keep δ_l, so the huber thresholds are read once.
  for (AttentionalBias bias :
       {AttentionalBias::l2, AttentionalBias::huber, AttentionalBias::huber_radial, AttentionalBias::lp})
  for (Index L = 1; L <= 3; ++L) {
    MemoryConfig cfg;
    cfg.dim = 6;
    cfg.depth = L;
    cfg.expansion = 2;
    cfg.residual = cfg.output_norm = true;
    titans_test::apply_bias(cfg, bias);
    const Index b = 4, T = 23;
    Problem p = make_problem(cfg.dim, T, 11);
    const auto init = titans::init_memory_weights<double>(cfg, 5);
    titans_test::calibrate_threshold(cfg, init.w, p);
    titans_test::calibrate_clamp(cfg, init.w, p);
    auto one = titans::make_memory_state(cfg, init);
    const Mat<double> y1 = titans::memory_forward<double>(cfg, b, p, one);
    auto st = titans::make_memory_state(cfg, init);
    Mat<double> y(cfg.dim, T);
    const double* storage = st.weights[0].data();
    Mat<double> w_at_boundary = st.weights[0];
    for (Index t = 0; t < T; ++t) {
      y.col(t) = titans::memory_forward<double>(cfg, b, p.columns(t, 1), st);
      const bool inside = (t + 1) % b != 0;
      ASSERT_EQ(st.pending_tokens(), (t + 1) % b) << "token " << t;
      EXPECT_TRUE(st.chunk_start.empty()) << "token " << t;
      EXPECT_EQ(st.weights[0].data(), storage) << "token " << t << ": W was re-allocated";
      if (inside) {
        EXPECT_EQ(st.weights[0], w_at_boundary) << "token " << t << ": W written inside a chunk";
      } else {
        EXPECT_NE(st.weights[0], w_at_boundary) << "token " << t << ": W not written at the chunk end";
        w_at_boundary = st.weights[0];
      }
    }
    // Rounding only: huber's ℓ1 steps (norm up to 2δ√d, docs/MATH.md §11.2) amplify the order of
    // summation more than the others' (measured 1.2e-12 at L = 3 under clang), hence its bound;
    // so does ℓp's |r|^(p−1) (measured 1.1e-12 at L = 2 once the chunk end's one-pass update
    // summed the rank-n product in another order than the GEMM).
    const double tol = bias == AttentionalBias::huber ? 1e-10 : bias == AttentionalBias::lp ? 1e-11 : 1e-12;
    EXPECT_LT(rel_err(y, y1), tol) << "L " << L << ", " << titans::to_string(bias);
    const auto a = settled(cfg, b, st), c = settled(cfg, b, one);
    for (Index l = 0; l < L; ++l) {
      EXPECT_LT(rel_err(a.weights[l], c.weights[l]), tol);
      EXPECT_LT(rel_err(a.momentum[l], c.momentum[l]), tol);
    }
    // The state's tensors: W, S and the three pending ones (chunk_start only when settled mid-chunk).
    std::vector<std::string> names;
    st.for_each([&](const std::string& n, const auto&) { names.push_back(n); });
    EXPECT_EQ(names.size(), 2 * st.weights.size() + 3);
    EXPECT_EQ(a.chunk_start.size(), st.weights.size());  // settled 3 tokens into a chunk
  }
}

// A state's pending tokens are checked like the rest of it.
TEST(MemoryKernel, BadPendingTokensAreNamed) {
  MemoryConfig cfg;
  cfg.dim = 4;
  const Index b = 4;
  const Problem p = make_problem(cfg.dim, 6, 1);
  auto good = titans::make_memory_state(cfg, titans::init_memory_weights<double>(cfg, 1));
  titans::memory_forward<double>(cfg, b, p, good);  // 2 pending tokens
  ASSERT_EQ(good.pending_tokens(), 2);
  auto expect_named = [&](const titans::MemoryState<double>& st, const char* needle) {
    auto copy = st;
    try {
      titans::memory_forward<double>(cfg, b, p.columns(0, 1), copy);
      ADD_FAILURE() << "no exception, expected one naming " << needle;
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    EXPECT_THROW(titans::memory_state_settle(cfg, b, copy), std::exception) << needle;
  };
  auto st = good;
  st.pending_keys.conservativeResize(st.pending_keys.rows() + 1, Eigen::NoChange);
  expect_named(st, "state.pending_keys has shape");
  st = good;
  st.pending_delta.conservativeResize(Eigen::NoChange, 1);
  expect_named(st, "state.pending_delta has shape");
  st = good;
  st.pending_gates(1, 0) = 1.5;
  expect_named(st, "state.pending_gates (alpha, eta)");
  st = good;
  st.position = 9;  // 2 pending tokens from position 7 would cross the chunk boundary at 8
  expect_named(st, "pending tokens must lie within one chunk");
  st = good;
  st.position = 1;  // more pending tokens than written
  expect_named(st, "2 pending tokens at position 1");
}

TEST(ChunkCoefficients, MatchDefinitions) {
  const Index n = 7;
  const Problem p = make_problem(2, n, 21, 1);
  titans::ChunkCoefficients<double> co;
  titans::chunk_coefficients(p.alpha, p.eta, p.theta, co);
  auto P = [&](Index j, Index i) {  // η_{i+1} ··· η_j, 1-based tokens
    double r = 1;
    for (Index t = i + 1; t <= j; ++t) r *= p.eta(t - 1);
    return r;
  };
  for (Index j = 1; j <= n; ++j) {
    double beta = 1;
    for (Index t = 1; t <= j; ++t) beta *= 1 - p.alpha(t - 1);
    EXPECT_NEAR(co.beta(j - 1), beta, 1e-15);
    double c = 0;  // Σ_{t≤j} (Π_{s=t+1..j} (1−α_s)) P_{t0}
    for (Index t = 1; t <= j; ++t) {
      double keep = 1;
      for (Index s = t + 1; s <= j; ++s) keep *= 1 - p.alpha(s - 1);
      c += keep * P(t, 0);
    }
    EXPECT_NEAR(co.c(j - 1), c, 1e-15);
    for (Index i = 1; i <= n; ++i) {
      double a = 0;  // Σ_{t=i..j} (Π_{s=t+1..j} (1−α_s)) θ_i P_{ti}
      for (Index t = i; t <= j; ++t) {
        double keep = 1;
        for (Index s = t + 1; s <= j; ++s) keep *= 1 - p.alpha(s - 1);
        a += keep * p.theta(i - 1) * P(t, i);
      }
      EXPECT_NEAR(co.upper(i - 1, j - 1), i <= j ? a : 0.0, 1e-15) << i << "," << j;
    }
  }
  for (Index i = 1; i <= n; ++i) EXPECT_NEAR(co.s_last(i - 1), p.theta(i - 1) * P(n, i), 1e-15);
  EXPECT_NEAR(co.p_n0, P(n, 0), 1e-15);
}

TEST(MemoryKernel, Causal) {
  MemoryConfig cfg;
  cfg.dim = 4;
  cfg.depth = 2;
  const Index T = 24, b = 8;
  const Problem p = make_problem(cfg.dim, T, 4);
  const auto init = titans::init_memory_weights<double>(cfg, 1);
  auto s1 = titans::make_memory_state(cfg, init);
  const Mat<double> y = titans::memory_forward<double>(cfg, b, p, s1);
  for (Index t0 : {0, 3, 7, 8, 13, 22}) {
    Problem m = p;
    const Index n = T - t0 - 1;
    m.k.rightCols(n).setRandom();
    m.v.rightCols(n).setRandom();
    m.q.rightCols(n).setRandom();
    m.alpha.tail(n).setConstant(0.9);
    m.eta.tail(n).setConstant(0.1);
    m.theta.tail(n).setConstant(2.0);
    auto s2 = titans::make_memory_state(cfg, init);
    const Mat<double> y2 = titans::memory_forward<double>(cfg, b, m, s2);
    EXPECT_EQ((y2.leftCols(t0 + 1) - y.leftCols(t0 + 1)).cwiseAbs().maxCoeff(), 0.0) << "t0 = " << t0;
    if (n > 0) {
      EXPECT_GT((y2.rightCols(n) - y.rightCols(n)).cwiseAbs().maxCoeff(), 0.0);
    }
  }
}

TEST(MemoryKernel, RetrieveReadsWithoutWriting) {
  MemoryConfig cfg;
  cfg.dim = 4;
  const Problem p = make_problem(cfg.dim, 5, 2);
  auto state = titans::make_memory_state(cfg, titans::init_memory_weights<double>(cfg, 3));
  titans::memory_forward<double>(cfg, 2, p, state);  // ends with one pending token
  ASSERT_EQ(state.pending_tokens(), 1);
  const auto before = state;
  const Mat<double> y = titans::memory_retrieve<double>(cfg, state, p.q, p.gain);
  const auto current = settled(cfg, 2, state).weights;
  for (Index t = 0; t < 5; ++t)
    EXPECT_LT((y.col(t) - titans_test::ref_apply<double>(cfg, current, p.q.col(t), p.gain)).norm(), 1e-12);
  for (std::size_t l = 0; l < state.weights.size(); ++l) EXPECT_EQ(state.weights[l], before.weights[l]);
  EXPECT_EQ(state.pending_keys, before.pending_keys);
  EXPECT_EQ(state.position, before.position);
  // With the normalised read-out every read is bounded by ‖q‖ + max|γ|·√d, whatever the weights.
  cfg.residual = true;
  cfg.output_norm = true;
  auto big = titans::make_memory_state(cfg, titans::init_memory_weights<double>(cfg, 3, /*gain=*/1e6));
  const Mat<double> r = titans::memory_retrieve<double>(cfg, big, p.q, p.gain);
  for (Index t = 0; t < 5; ++t)
    EXPECT_LE(r.col(t).norm(), p.q.col(t).norm() + p.gain.cwiseAbs().maxCoeff() * std::sqrt(4.0) + 1e-9);
}

TEST(MemoryKernel, FloatMatchesDouble) {
  MemoryConfig cfg;
  cfg.dim = 16;
  cfg.depth = 2;
  const Index T = 50, b = 16;
  const Problem p = make_problem(cfg.dim, T, 6);
  const auto init = titans::init_memory_weights<double>(cfg, 2);
  auto sd = titans::make_memory_state(cfg, init);
  const Mat<double> yd = titans::memory_forward<double>(cfg, b, p, sd);
  titans::MemoryWeights<float> initf;
  for (const auto& w : init.w) initf.w.push_back(w.cast<float>());
  auto sf = titans::make_memory_state(cfg, initf);
  const Mat<float> yf = titans::memory_forward<float>(cfg, b, p.cast<float>(), sf);
  EXPECT_LT(rel_err<double>(yf.cast<double>(), yd), 1e-4);
  // The bounded form too.
  cfg.residual = cfg.output_norm = true;
  cfg.surprise_clamp = 1.0;
  auto sd2 = titans::make_memory_state(cfg, init);
  auto sf2 = titans::make_memory_state(cfg, initf);
  const Mat<double> yd2 = titans::memory_forward<double>(cfg, b, p, sd2);
  const Mat<float> yf2 = titans::memory_forward<float>(cfg, b, p.cast<float>(), sf2);
  EXPECT_LT(rel_err<double>(yf2.cast<double>(), yd2), 1e-4);
}

TEST(MemoryKernel, LinearMemoryIsExactOnOrthogonalKeys) {
  // L = 1, identity: with θ = ½, α = η = 0 each write sets W k = v exactly (||k|| = 1), and with
  // orthonormal keys no write disturbs another: all d pairs are recalled exactly, token by token
  // and in one chunk (where the gradients at W⁰ = 0 sum to Σ v kᵀ).
  MemoryConfig cfg;
  cfg.dim = 8;
  cfg.depth = 1;
  cfg.activation = Activation::identity;
  titans::detail::Rng rng(17);
  Mat<double> g(cfg.dim, cfg.dim), v(cfg.dim, cfg.dim);
  rng.fill_normal(g, 1.0);
  rng.fill_normal(v, 1.0);
  const Mat<double> keys = Eigen::HouseholderQR<Mat<double>>(g).householderQ();
  const Vec<double> zero = Vec<double>::Zero(cfg.dim), half = Vec<double>::Constant(cfg.dim, 0.5);
  for (Index b : {1, 8}) {
    auto state = titans::make_memory_state(cfg, titans::zero_memory_weights<double>(cfg));
    titans::memory_forward<double>(cfg, b, {keys, v, keys, zero, zero, half, {}, {}}, state);
    const Mat<double> recall = titans::memory_retrieve<double>(cfg, state, keys, {});
    EXPECT_LT((recall - v).cwiseAbs().maxCoeff(), 1e-12) << "b = " << b;
  }
}

TEST(MemoryModel, InnerGradientMatchesFiniteDifferences) {
  for (AttentionalBias bias :
       {AttentionalBias::l2, AttentionalBias::huber, AttentionalBias::huber_radial, AttentionalBias::lp})
  for (Activation act : {Activation::silu, Activation::gelu, Activation::identity}) {
    for (int form = 0; form < titans_test::kMemoryFormCount; ++form) {
      if (titans_test::kMemoryForms[form].clamp > 0) continue;  // the clamp scales steps, not ℓ
      MemoryConfig cfg;
      titans_test::apply_bias(cfg, bias);
      cfg.dim = 3;
      cfg.depth = 3;
      cfg.expansion = 2;
      cfg.activation = act;
      titans_test::apply_form(cfg, form);
      Problem p = make_problem(cfg.dim, 4, 8);
      auto w = titans::init_memory_weights<double>(cfg, 4).w;
      titans_test::calibrate_threshold(cfg, w, p);
      auto grad = titans::zero_memory_weights<double>(cfg).w;
      for (auto& g : grad) g.setConstant(0.25);  // junk: the gradient must be added
      titans::inner_loss_gradient<double>(cfg, w, p.k, p.v, p.gain, p.threshold, grad);
      for (std::size_t l = 0; l < w.size(); ++l) {
        for (Index i = 0; i < w[l].size(); ++i) {
          const double h = 1e-6, x = w[l](i);
          w[l](i) = x + h;
          const double up = titans::inner_loss<double>(cfg, w, p.k, p.v, p.gain, p.threshold);
          w[l](i) = x - h;
          const double dn = titans::inner_loss<double>(cfg, w, p.k, p.v, p.gain, p.threshold);
          w[l](i) = x;
          EXPECT_NEAR(grad[l](i) - 0.25, (up - dn) / (2 * h), 1e-6)
              << titans::to_string(bias) << " " << titans_test::form_name(form) << " layer " << l << " index " << i;
        }
      }
    }
  }
}

TEST(MemoryKernel, BadInputThrowsNamingTheArgument) {
  MemoryConfig cfg;
  cfg.dim = 4;
  const Problem p = make_problem(cfg.dim, 6, 1);
  auto state = titans::make_memory_state(cfg, titans::init_memory_weights<double>(cfg, 1));
  auto expect_throw = [&](auto&& fn, const char* needle, auto tag) {
    using E = decltype(tag);
    try {
      fn();
      ADD_FAILURE() << "no exception, expected one naming " << needle;
    } catch (const E& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto run = [&](const Problem& q, Index b, MemoryConfig c) {
    auto st = state;
    titans::memory_forward<double>(c, b, q, st);
  };
  expect_throw([&] { run(p, 0, cfg); }, "chunk_size", titans::InvalidArgument(""));
  MemoryConfig bad = cfg;
  bad.depth = 0;
  expect_throw([&] { run(p, 2, bad); }, "depth", titans::InvalidArgument(""));
  bad = cfg;
  bad.dim = 5;  // state no longer fits
  expect_throw([&] { run(p, 2, bad); }, "state.weights", titans::ShapeError(""));
  Problem q = p;
  q.v.conservativeResize(4, 5);
  expect_throw([&] { run(q, 2, cfg); }, "in.v has shape (4, 5)", titans::ShapeError(""));
  q = p;
  q.alpha(2) = 1.5;
  expect_throw([&] { run(q, 2, cfg); }, "alpha", titans::NumericError(""));
  q = p;
  q.eta(0) = -0.1;
  expect_throw([&] { run(q, 2, cfg); }, "eta", titans::NumericError(""));
  q = p;
  q.theta(1) = -1;
  expect_throw([&] { run(q, 2, cfg); }, "theta", titans::NumericError(""));
  q = p;
  q.k(1, 1) = std::numeric_limits<double>::quiet_NaN();
  expect_throw([&] { run(q, 2, cfg); }, "in.k has a non-finite", titans::NumericError(""));
  q = p;
  q.q(0, 3) = std::numeric_limits<double>::infinity();
  expect_throw([&] { run(q, 2, cfg); }, "in.q has a non-finite", titans::NumericError(""));
  // The bounded forms' own inputs and options.
  MemoryConfig norm = cfg;
  norm.output_norm = true;
  q = p;
  q.gain.resize(3);
  expect_throw([&] { run(q, 2, norm); }, "in.gain has shape (3, 1)", titans::ShapeError(""));
  q = p;
  q.gain(0) = std::numeric_limits<double>::quiet_NaN();
  expect_throw([&] { run(q, 2, norm); }, "in.gain has a non-finite", titans::NumericError(""));
  bad = cfg;
  bad.surprise_clamp = -1;
  expect_throw([&] { run(p, 2, bad); }, "surprise_clamp is -1", titans::InvalidArgument(""));
  bad.surprise_clamp = std::numeric_limits<double>::infinity();
  expect_throw([&] { run(p, 2, bad); }, "surprise_clamp is inf", titans::InvalidArgument(""));
  bad = cfg;
  bad.norm_eps = 0;
  expect_throw([&] { run(p, 2, bad); }, "norm_eps is 0", titans::InvalidArgument(""));
  // The attentional bias's options (docs/MATH.md §11), named with the function and the value.
  bad = cfg;
  bad.bias_p = 0.5;
  expect_throw([&] { run(p, 2, bad); }, "titans::memory_forward: bias_p is 0.5, expected a finite value >= 1",
               titans::InvalidArgument(""));
  bad.bias_p = std::numeric_limits<double>::infinity();
  expect_throw([&] { run(p, 2, bad); }, "bias_p is inf", titans::InvalidArgument(""));
  bad = cfg;
  bad.bias_eps = 0;
  expect_throw([&] { run(p, 2, bad); }, "titans::memory_forward: bias_eps is 0, expected a finite value > 0",
               titans::InvalidArgument(""));
  bad.bias_eps = std::numeric_limits<double>::quiet_NaN();
  expect_throw([&] { run(p, 2, bad); }, "bias_eps is nan", titans::InvalidArgument(""));
  bad = cfg;
  bad.bias = static_cast<titans::AttentionalBias>(7);
  expect_throw([&] { run(p, 2, bad); }, "bias has an unknown value (7)", titans::InvalidArgument(""));
  // The huber bias's thresholds: one per token, finite, > 0; the other biases accept none.
  MemoryConfig huber = cfg;
  huber.bias = titans::AttentionalBias::huber;
  expect_throw([&] { run(p, 2, huber); }, "in.threshold has shape (0, 1), expected (6, 1)", titans::ShapeError(""));
  q = p;
  q.threshold.setConstant(6, 0.5);
  q.threshold(2) = 0;
  expect_throw([&] { run(q, 2, huber); }, "in.threshold has value 0 at token 2", titans::InvalidArgument(""));
  q.threshold(2) = std::numeric_limits<double>::quiet_NaN();
  expect_throw([&] { run(q, 2, huber); }, "in.threshold has a non-finite", titans::NumericError(""));
  q.threshold.resize(4);
  expect_throw([&] { run(q, 2, cfg); }, "in.threshold has shape (4, 1)", titans::ShapeError(""));
  // A state left inside a chunk by chunk size 4 is not valid at chunk size 3.
  auto st = state;
  titans::memory_forward<double>(cfg, 4, p.columns(0, 2), st);
  EXPECT_THROW(titans::memory_forward<double>(cfg, 2, p.columns(0, 2), st),
               titans::InvalidArgument);
}

}  // namespace
