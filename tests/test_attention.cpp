// SPDX-License-Identifier: Apache-2.0
// Attention (docs/MATH.md §6): the blocked kernel against an independent per-query formulation, the
// sliding window and the persistent tokens, causality, streaming with the KV cache, gradient
// checks of forward_train/backward_causal and of the general `attend`, and bad input.
#include <titans/attention.hpp>
#include <titans/train/gradcheck.hpp>
#include <titans/parameters.hpp>

#include <gtest/gtest.h>

#include "support/random_matrix.hpp"
#include "support/sampling.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <ostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using titans::Attention;
using titans::AttentionConfig;
using titans::Index;

template <class S>
using Mat = titans::Matrix<S>;
template <class S>
using Params = titans::AttentionParams<S>;
template <class S>
using State = titans::AttentionState<S>;
template <class S>
using Cache = titans::AttentionCache<S>;
using Vec = titans::Vector<double>;

AttentionConfig make_config(Index D, Index H, Index window, Index block, double base = 100) {
  AttentionConfig c;
  c.dim = D;
  c.heads = H;
  c.window = window;
  c.block = block;
  c.rope_base = base;  // a small base so that every rotary pair turns noticeably over a few tokens
  return c;
}

using titans_test::random_matrix;

// Larger q/k projections than init() so the softmax is far from uniform and the rotary
// positions change the weights a lot (a wrong angle or mask then shows clearly).
template <class S>
Params<S> lively_params(const Attention<S>& attn, std::uint64_t seed) {
  Params<S> p = attn.init(seed);
  titans::detail::Rng rng(seed + 1000);
  const double sd = 1.5 / std::sqrt(static_cast<double>(attn.config().dim));
  rng.fill_normal(p.w_q, sd);
  rng.fill_normal(p.w_k, sd);
  return p;
}

template <class S>
Params<double> to_double(const Params<S>& p) {
  Params<double> d;
  d.w_q = p.w_q.template cast<double>();
  d.w_k = p.w_k.template cast<double>();
  d.w_v = p.w_v.template cast<double>();
  d.w_o = p.w_o.template cast<double>();
  return d;
}

template <class A, class B>
double max_rel(const A& a, const B& b) {
  const Mat<double> x = a.template cast<double>(), y = b.template cast<double>();
  if (x.size() == 0 && y.size() == 0) return 0;
  const double scale = std::max({1e-30, x.cwiseAbs().maxCoeff(), y.cwiseAbs().maxCoeff()});
  return (x - y).cwiseAbs().maxCoeff() / scale;
}

// Relative difference of one column against the scale of a whole reference output.
template <class S>
double col_rel(const Mat<S>& a, const Mat<S>& b, Index t) {
  const double scale = std::max(1e-30, static_cast<double>(a.cwiseAbs().maxCoeff()));
  return static_cast<double>((a.col(t) - b.col(t)).cwiseAbs().maxCoeff()) / scale;
}

template <class S>
constexpr double forward_tol() {
  return std::is_same_v<S, float> ? 5e-5 : 1e-12;
}
// "Unchanged" for perturbation tests: a leak through a mask would be of order 1e-2 or more.
template <class S>
constexpr double same_tol() {
  return std::is_same_v<S, float> ? 1e-6 : 1e-13;
}

// ---------------------------------------------------------------------------------------------
// The independent formulation, written per head and per query from the definitions.
// ---------------------------------------------------------------------------------------------

// Rotary embedding of a (D) vector at position `pos`: in each head, the pair (i, i + d_h/2) turns
// by the angle pos·base^(−2i/d_h).
Vec rotate(const AttentionConfig& c, const Vec& x, double pos) {
  const Index dh = c.dim / c.heads, half = dh / 2;
  Vec y = x;
  for (Index h = 0; h < c.heads; ++h)
    for (Index i = 0; i < half; ++i) {
      const double angle = pos / std::pow(c.rope_base, 2.0 * static_cast<double>(i) / static_cast<double>(dh));
      const double a = x(h * dh + i), b = x(h * dh + half + i);
      y(h * dh + i) = a * std::cos(angle) - b * std::sin(angle);
      y(h * dh + half + i) = a * std::sin(angle) + b * std::cos(angle);
    }
  return y;
}

// One query against an explicit list of visible (key, value) pairs: per head, scaled dot
// products, softmax, weighted sum of the values. Returns the attention output before W_O.
Vec mix(const AttentionConfig& c, const Vec& q, const std::vector<Vec>& keys, const std::vector<Vec>& vals) {
  const Index dh = c.dim / c.heads;
  Vec a = Vec::Zero(c.dim);
  for (Index h = 0; h < c.heads; ++h) {
    std::vector<double> s;
    double mx = -std::numeric_limits<double>::infinity();
    for (std::size_t j = 0; j < keys.size(); ++j) {
      s.push_back(q.segment(h * dh, dh).dot(keys[j].segment(h * dh, dh)) / std::sqrt(static_cast<double>(dh)));
      mx = std::max(mx, s.back());
    }
    double z = 0;
    for (double sj : s) z += std::exp(sj - mx);
    for (std::size_t j = 0; j < keys.size(); ++j) a.segment(h * dh, dh) += std::exp(s[j] - mx) / z * vals[j].segment(h * dh, dh);
  }
  return a;
}

// Causal attention over x (D, T) with no history, token t at position pos0 + t: it sees every
// persistent token (unrotated) and tokens max(0, t − w + 1) .. t (0 .. t when w = 0).
Mat<double> naive_causal(const AttentionConfig& c, const Params<double>& p, const Mat<double>& x,
                         const Mat<double>& persistent, Index pos0) {
  const Index T = x.cols();
  std::vector<Vec> pk, pv, k, v;
  for (Index j = 0; j < persistent.cols(); ++j) {
    pk.push_back(p.w_k * persistent.col(j));
    pv.push_back(p.w_v * persistent.col(j));
  }
  for (Index s = 0; s < T; ++s) {
    k.push_back(rotate(c, p.w_k * x.col(s), static_cast<double>(pos0 + s)));
    v.push_back(p.w_v * x.col(s));
  }
  Mat<double> out(c.dim, T);
  for (Index t = 0; t < T; ++t) {
    const Vec q = rotate(c, p.w_q * x.col(t), static_cast<double>(pos0 + t));
    std::vector<Vec> keys = pk, vals = pv;
    const Index first = c.window > 0 ? std::max<Index>(0, t - c.window + 1) : 0;
    for (Index s = first; s <= t; ++s) {
      keys.push_back(k[static_cast<std::size_t>(s)]);
      vals.push_back(v[static_cast<std::size_t>(s)]);
    }
    out.col(t) = p.w_o * mix(c, q, keys, vals);
  }
  return out;
}

// The general form: main keys are the cached ones (as given), then xkv's tokens rotated at kpos;
// query i sees the persistent tokens and main keys lo[i] .. hi[i].
Mat<double> naive_attend(const AttentionConfig& c, const Params<double>& p, const Mat<double>& xq,
                         const std::vector<Index>& qpos, const Mat<double>& xkv, const std::vector<Index>& kpos,
                         const Mat<double>& persistent, const Mat<double>& ck, const Mat<double>& cv,
                         const std::vector<Index>& lo, const std::vector<Index>& hi) {
  std::vector<Vec> pk, pv, k, v;
  for (Index j = 0; j < persistent.cols(); ++j) {
    pk.push_back(p.w_k * persistent.col(j));
    pv.push_back(p.w_v * persistent.col(j));
  }
  for (Index j = 0; j < ck.cols(); ++j) {
    k.push_back(ck.col(j));
    v.push_back(cv.col(j));
  }
  for (Index j = 0; j < xkv.cols(); ++j) {
    k.push_back(rotate(c, p.w_k * xkv.col(j), static_cast<double>(kpos[static_cast<std::size_t>(j)])));
    v.push_back(p.w_v * xkv.col(j));
  }
  Mat<double> out(c.dim, xq.cols());
  for (Index i = 0; i < xq.cols(); ++i) {
    const auto u = static_cast<std::size_t>(i);
    const Vec q = rotate(c, p.w_q * xq.col(i), static_cast<double>(qpos[u]));
    std::vector<Vec> keys = pk, vals = pv;
    for (Index j = lo[u]; j <= hi[u]; ++j) {
      keys.push_back(k[static_cast<std::size_t>(j)]);
      vals.push_back(v[static_cast<std::size_t>(j)]);
    }
    out.col(i) = p.w_o * mix(c, q, keys, vals);
  }
  return out;
}

template <class Scalar>
class AttentionTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(AttentionTyped, Scalars);

// ---------------------------------------------------------------------------------------------
// 1. Forward equals the independent formulation.
// ---------------------------------------------------------------------------------------------

TYPED_TEST(AttentionTyped, MatchesNaiveFormulation) {
  using S = TypeParam;
  struct Shape {
    Index D, H;
  };
  double worst = 0;
  for (const Shape sh : {Shape{8, 2}, Shape{12, 2}})
    for (Index T : {13, 70})
      for (Index w : {Index(0), Index(1), Index(2), Index(5), T + 4})
        for (Index np : {0, 3})
          for (Index block : {1, 3, 64})
            for (Index pos0 : {0, 5}) {
              const AttentionConfig c = make_config(sh.D, sh.H, w, block);
              Attention<S> attn(c);
              const Params<S> p = lively_params(attn, 11);
              const Mat<S> x = random_matrix<S>(sh.D, T, 12), P = random_matrix<S>(sh.D, np, 13);
              State<S> state = attn.initial_state();
              state.position = pos0;
              const Mat<S> y = attn.forward(p, x, P, state);
              const Mat<double> ref = naive_causal(c, to_double(p), x.template cast<double>(), P.template cast<double>(), pos0);
              const double err = max_rel(y, ref);
              worst = std::max(worst, err);
              EXPECT_LT(err, forward_tol<S>()) << "D " << sh.D << " T " << T << " window " << w << " N_p " << np
                                               << " block " << block << " pos0 " << pos0;
              EXPECT_EQ(state.position, pos0 + T);
              EXPECT_EQ(state.k.cols(), w > 0 ? std::min(T, w - 1) : T);
            }
  std::ostringstream os;
  os << worst;
  this->RecordProperty("worst_relative_error", os.str());
}

TYPED_TEST(AttentionTyped, AttendMatchesNaiveFormulation) {
  using S = TypeParam;
  const Index D = 8, Tq = 6, Tkv = 6, nc = 3;
  const std::vector<Index> qpos = {0, 1, 2, 3, 4, 5}, kpos = {1, 2, 4, 5, 7, 8};
  struct Ranges {
    Index np;
    std::vector<Index> lo, hi;
  };
  const std::vector<Ranges> cases = {
      {2, {0, 0, 1, 3, 3, 6}, {-1, 2, 4, 5, 7, 8}},  // query 0 sees the persistent tokens only
      {0, {0, 1, 1, 2, 5, 8}, {0, 3, 4, 6, 7, 8}},
      {3, {0, 0, 0, 0, 0, 0}, {8, 8, 8, 8, 8, 8}},   // everything visible
      {1, {9, 9, 9, 9, 9, 9}, {8, 8, 8, 8, 8, 8}},   // no main key visible at all
  };
  for (const auto& rc : cases)
    for (Index block : {1, 4, 64}) {
      const AttentionConfig c = make_config(D, 2, 0, block);
      Attention<S> attn(c);
      const Params<S> p = lively_params(attn, 21);
      const Mat<S> xq = random_matrix<S>(D, Tq, 22), xkv = random_matrix<S>(D, Tkv, 23), P = random_matrix<S>(D, rc.np, 24);
      const Mat<S> ck = random_matrix<S>(D, nc, 25, 2.0), cv = random_matrix<S>(D, nc, 26);
      Mat<S> nk, nv;
      const Mat<S> y = attn.attend("test", p, xq, qpos, xkv, kpos, P, ck, cv, rc.lo, rc.hi, nullptr, &nk, &nv);
      const Params<double> pd = to_double(p);
      const Mat<double> ref = naive_attend(c, pd, xq.template cast<double>(), qpos, xkv.template cast<double>(), kpos,
                                           P.template cast<double>(), ck.template cast<double>(),
                                           cv.template cast<double>(), rc.lo, rc.hi);
      EXPECT_LT(max_rel(y, ref), forward_tol<S>()) << "N_p " << rc.np << " block " << block;
      // The new tokens' keys come back rotated at their positions, the values as projected.
      ASSERT_EQ(nk.cols(), Tkv);
      ASSERT_EQ(nv.cols(), Tkv);
      for (Index j = 0; j < Tkv; ++j) {
        const Vec kj = rotate(c, pd.w_k * xkv.col(j).template cast<double>(), static_cast<double>(kpos[std::size_t(j)]));
        EXPECT_LT(max_rel(nk.col(j), kj), forward_tol<S>()) << "new key " << j;
        EXPECT_LT(max_rel(nv.col(j), Vec(pd.w_v * xkv.col(j).template cast<double>())), forward_tol<S>());
      }
    }
}

TYPED_TEST(AttentionTyped, ForwardTrainEqualsForward) {
  using S = TypeParam;
  for (Index w : {0, 3}) {
    Attention<S> attn(make_config(8, 2, w, 3));
    const Params<S> p = lively_params(attn, 31);
    const Mat<S> x0 = random_matrix<S>(8, 4, 32), x = random_matrix<S>(8, 10, 33), P = random_matrix<S>(8, 2, 34);
    State<S> s1 = attn.initial_state();
    attn.forward(p, x0, P, s1);
    State<S> s2 = s1;
    Cache<S> cache;
    const Mat<S> y1 = attn.forward(p, x, P, s1);
    const Mat<S> y2 = attn.forward_train(p, x, P, s2, cache);
    EXPECT_EQ(y1, y2);
    EXPECT_EQ(s1.k, s2.k);
    EXPECT_EQ(s1.v, s2.v);
    EXPECT_EQ(s1.position, s2.position);
    EXPECT_EQ(cache.cached, w > 0 ? 2 : 4);
    EXPECT_GT(cache.bytes(), 0u);
  }
}

// With no persistent tokens, rotary attention depends only on relative positions: starting the
// stream at position 10^6 gives the same outputs as starting at 0 (the angles are formed in double,
// so this holds in float too).
TYPED_TEST(AttentionTyped, OnlyRelativePositionsMatterWithoutPersistentTokens) {
  using S = TypeParam;
  for (Index w : {0, 4}) {
    Attention<S> attn(make_config(8, 2, w, 3));
    const Params<S> p = lively_params(attn, 41);
    const Mat<S> x = random_matrix<S>(8, 12, 42), P(8, 0);
    State<S> a = attn.initial_state(), b = attn.initial_state();
    b.position = 1000000;
    const Mat<S> ya = attn.forward(p, x, P, a), yb = attn.forward(p, x, P, b);
    EXPECT_LT(max_rel(ya, yb), (std::is_same_v<S, float> ? 2e-5 : 1e-8)) << "window " << w;
    // ...but persistent tokens carry no position, so with them the absolute position matters.
    const Mat<S> P2 = random_matrix<S>(8, 2, 43);
    State<S> c = attn.initial_state(), d = attn.initial_state();
    d.position = 1000000;
    EXPECT_GT(max_rel(attn.forward(p, x, P2, c), attn.forward(p, x, P2, d)), 1e-3) << "window " << w;
  }
}

// ---------------------------------------------------------------------------------------------
// 2. The window limits what a query sees; persistent tokens are seen by every query.
// 3. Causality.
// ---------------------------------------------------------------------------------------------

TYPED_TEST(AttentionTyped, WindowLimitsWhatEachQuerySees) {
  using S = TypeParam;
  const Index D = 8, T = 14, np = 3;
  for (Index w : {0, 1, 2, 5})
    for (Index block : {3, 64}) {
      Attention<S> attn(make_config(D, 2, w, block));
      const Params<S> p = lively_params(attn, 51);
      const Mat<S> x = random_matrix<S>(D, T, 52), P = random_matrix<S>(D, np, 53);
      auto run = [&](const Mat<S>& xx, const Mat<S>& pp) {
        State<S> s = attn.initial_state();
        return Mat<S>(attn.forward(p, xx, pp, s));
      };
      const Mat<S> y = run(x, P);
      for (Index s = 0; s < T; ++s) {
        Mat<S> x2 = x;
        x2.col(s) = random_matrix<S>(D, 1, 100 + std::uint64_t(s));
        const Mat<S> y2 = run(x2, P);
        for (Index t = 0; t < T; ++t) {
          const bool visible = s <= t && (w == 0 || s >= t - w + 1);
          const double d = col_rel(y, y2, t);
          if (visible)
            EXPECT_GT(d, 1e-4) << "window " << w << ": changing token " << s << " should change output " << t;
          else
            EXPECT_LE(d, same_tol<S>()) << "window " << w << ": token " << s << " leaks into output " << t;
        }
      }
      for (Index j = 0; j < np; ++j) {
        Mat<S> P2 = P;
        P2.col(j) = random_matrix<S>(D, 1, 200 + std::uint64_t(j));
        const Mat<S> y2 = run(x, P2);
        for (Index t = 0; t < T; ++t)
          EXPECT_GT(col_rel(y, y2, t), 1e-4) << "window " << w << ": persistent token " << j << " unseen by " << t;
      }
    }
}

TYPED_TEST(AttentionTyped, IsCausal) {
  using S = TypeParam;
  const Index D = 8, T = 12;
  for (Index w : {0, 3})
    for (Index np : {0, 3}) {
      Attention<S> attn(make_config(D, 2, w, 5));
      const Params<S> p = lively_params(attn, 61);
      const Mat<S> x = random_matrix<S>(D, T, 62), P = random_matrix<S>(D, np, 63);
      State<S> s0 = attn.initial_state();
      const Mat<S> y = attn.forward(p, x, P, s0);
      for (Index t = 0; t + 1 < T; ++t) {
        Mat<S> x2 = x;
        x2.rightCols(T - 1 - t) = random_matrix<S>(D, T - 1 - t, 300 + std::uint64_t(t));
        State<S> s = attn.initial_state();
        const Mat<S> y2 = attn.forward(p, x2, P, s);
        for (Index u = 0; u <= t; ++u)
          EXPECT_LE(col_rel(y, y2, u), same_tol<S>()) << "window " << w << " N_p " << np << ": output " << u
                                                      << " depends on tokens after " << t;
        EXPECT_GT(col_rel(y, y2, t + 1), 1e-4);  // the perturbation is real
      }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Streaming: any split into calls with the state carried equals one call.
// ---------------------------------------------------------------------------------------------

TYPED_TEST(AttentionTyped, StreamingSplitsEqualOneCall) {
  using S = TypeParam;
  const Index D = 8, T = 17;
  // Splits: every single cut, 1-token steps, and some uneven partitions (with empty calls).
  std::vector<std::vector<Index>> splits;
  for (Index cut = 1; cut < T; ++cut) splits.push_back({cut, T - cut});
  splits.push_back(std::vector<Index>(static_cast<std::size_t>(T), 1));
  splits.push_back({2, 0, 5, 1, 1, 0, 8});
  splits.push_back({6, 6, 5});
  splits.push_back({3, 1, 4, 1, 5, 3});
  splits.push_back({0, 17, 0});
  for (Index w : {0, 1, 2, 4, 7, 25})
    for (Index np : {0, 3})
      for (Index block : {1, 3, 64}) {
        Attention<S> attn(make_config(D, 2, w, block));
        const Params<S> p = lively_params(attn, 71);
        const Mat<S> x = random_matrix<S>(D, T, 72), P = random_matrix<S>(D, np, 73);
        State<S> whole = attn.initial_state();
        const Mat<S> y = attn.forward(p, x, P, whole);
        for (const auto& split : splits) {
          State<S> s = attn.initial_state();
          Mat<S> ys(D, T);
          Index off = 0;
          for (Index len : split) {
            ys.middleCols(off, len) = attn.forward(p, x.middleCols(off, len), P, s);
            off += len;
            ASSERT_EQ(s.position, off);
            if (w > 0) {
              EXPECT_LE(s.k.cols(), w - 1);
              EXPECT_EQ(s.k.cols(), std::min(off, w - 1));
            } else {
              EXPECT_EQ(s.k.cols(), off);
            }
            EXPECT_EQ(s.v.cols(), s.k.cols());
          }
          ASSERT_EQ(off, T);
          EXPECT_LT(max_rel(ys, y), forward_tol<S>())
              << "window " << w << " N_p " << np << " block " << block << " split of " << split.size() << " calls";
          EXPECT_LT(max_rel(s.k, whole.k), forward_tol<S>());
          EXPECT_LT(max_rel(s.v, whole.v), forward_tol<S>());
        }
      }
}

// ---------------------------------------------------------------------------------------------
// 5. Gradient checks (double).
// ---------------------------------------------------------------------------------------------

// The layer's parameters and the persistent tokens, as one parameter set for gradient_check.
struct CausalVars {
  using scalar_type = double;
  Params<double> p;
  Mat<double> persistent;  // (D, N_p)
  template <class F>
  void for_each(F&& f) {
    p.for_each(f);
    f("persistent", persistent);
  }
  template <class F>
  void for_each(F&& f) const {
    p.for_each(f);
    f("persistent", persistent);
  }
};

struct GradCase {
  Index window, np, block, prefix;  // prefix: tokens run before the checked call (constant state)
  bool split_dx;                    // backward() with one shared dx instead of backward_causal()
};

void PrintTo(const GradCase& c, std::ostream* os) {
  *os << "{window " << c.window << ", N_p " << c.np << ", block " << c.block << ", prefix " << c.prefix
      << (c.split_dx ? ", backward with shared dx}" : ", backward_causal}");
}

class AttentionGradCheck : public ::testing::TestWithParam<GradCase> {};

TEST_P(AttentionGradCheck, MatchesFiniteDifferences) {
  const GradCase gc = GetParam();
  const Index D = 8, T = 9;
  Attention<double> attn(make_config(D, 2, gc.window, gc.block));
  CausalVars vars{lively_params(attn, 81), random_matrix<double>(D, gc.np, 82)};
  Mat<double> x = random_matrix<double>(D, T, 83);
  // The state carried in is made once, with the unperturbed parameters: a constant of the check.
  State<double> s0 = attn.initial_state();
  if (gc.prefix > 0) attn.forward(vars.p, random_matrix<double>(D, gc.prefix, 84), vars.persistent, s0);
  auto fwd = [&](const CausalVars& v, const Mat<double>& xx) {
    State<double> s = s0;
    return attn.forward(v.p, xx, v.persistent, s);
  };
  auto bwd = [&](const CausalVars& v, const Mat<double>& xx, const Mat<double>& dy, CausalVars& g, Mat<double>& dx) {
    State<double> s = s0;
    Cache<double> cache;
    attn.forward_train(v.p, xx, v.persistent, s, cache);
    if (gc.split_dx)
      attn.backward(v.p, cache, dy, g.p, dx, dx, g.persistent);
    else
      attn.backward_causal(v.p, cache, dy, g.p, dx, g.persistent);
  };
  titans::GradCheckOptions opt;
  opt.rtol = 1e-6;
  opt.atol = 1e-8;
  opt = titans_test::sampled(opt);
  const auto r = titans::gradient_check(vars, x, fwd, bwd, opt);
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_EQ(r.checked, titans_test::expected_checked(vars, x, opt));
  RecordProperty("worst", r.report());
}

INSTANTIATE_TEST_SUITE_P(Causal, AttentionGradCheck,
                         ::testing::Values(GradCase{0, 0, 64, 0, false}, GradCase{0, 3, 64, 0, false},
                                           GradCase{0, 3, 1, 0, false}, GradCase{0, 3, 4, 0, false},
                                           GradCase{3, 0, 4, 0, false}, GradCase{3, 3, 1, 0, false},
                                           GradCase{3, 3, 4, 0, false}, GradCase{1, 2, 4, 0, false},
                                           GradCase{0, 3, 4, 5, false}, GradCase{3, 3, 4, 5, false},
                                           GradCase{4, 2, 64, 2, false}, GradCase{3, 3, 4, 5, true},
                                           GradCase{0, 2, 3, 4, true}));

// attend's parameters, persistent tokens and key/value tokens as one set; the queries are the input.
struct AttendVars {
  using scalar_type = double;
  Params<double> p;
  Mat<double> persistent;  // (D, N_p)
  Mat<double> xkv;         // (D, Tkv)
  template <class F>
  void for_each(F&& f) {
    p.for_each(f);
    f("persistent", persistent);
    f("xkv", xkv);
  }
  template <class F>
  void for_each(F&& f) const {
    p.for_each(f);
    f("persistent", persistent);
    f("xkv", xkv);
  }
};

TEST(AttentionAttendGrad, MatchesFiniteDifferences) {
  const Index D = 8, Tq = 6, Tkv = 6, nc = 3;
  const std::vector<Index> qpos = {0, 1, 2, 3, 4, 5}, kpos = {1, 2, 4, 5, 7, 8};
  struct Ranges {
    Index np;
    std::vector<Index> lo, hi;
  };
  const std::vector<Ranges> cases = {
      {2, {0, 0, 1, 3, 3, 6}, {-1, 2, 4, 5, 7, 8}},
      {0, {0, 1, 1, 2, 5, 8}, {0, 3, 4, 6, 7, 8}},
      {3, {0, 0, 0, 4, 4, 9}, {2, 5, 7, 8, 8, 8}},
  };
  for (const auto& rc : cases)
    for (Index block : {1, 4, 64}) {
      Attention<double> attn(make_config(D, 2, 0, block));
      AttendVars vars{lively_params(attn, 91), random_matrix<double>(D, rc.np, 92), random_matrix<double>(D, Tkv, 93)};
      Mat<double> xq = random_matrix<double>(D, Tq, 94);
      const Mat<double> ck = random_matrix<double>(D, nc, 95, 2.0), cv = random_matrix<double>(D, nc, 96);
      auto fwd = [&](const AttendVars& v, const Mat<double>& q) {
        return attn.attend("test", v.p, q, qpos, v.xkv, kpos, v.persistent, ck, cv, rc.lo, rc.hi, nullptr);
      };
      auto bwd = [&](const AttendVars& v, const Mat<double>& q, const Mat<double>& dy, AttendVars& g, Mat<double>& dq) {
        Cache<double> cache;
        attn.attend("test", v.p, q, qpos, v.xkv, kpos, v.persistent, ck, cv, rc.lo, rc.hi, &cache);
        attn.backward(v.p, cache, dy, g.p, dq, g.xkv, g.persistent);
      };
      titans::GradCheckOptions opt;
      opt.rtol = 1e-6;
      opt.atol = 1e-8;
      opt = titans_test::sampled(opt);
      const auto r = titans::gradient_check(vars, xq, fwd, bwd, opt);
      EXPECT_TRUE(r.ok) << "N_p " << rc.np << " block " << block << "\n" << r.report();
      EXPECT_EQ(r.checked, titans_test::expected_checked(vars, xq, opt));
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Bad input.
// ---------------------------------------------------------------------------------------------

template <class E>
void expect_throw_naming(const std::function<void()>& fn, const std::string& needle, const std::string& label) {
  try {
    fn();
    ADD_FAILURE() << label << ": no exception";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << label << ": message '" << e.what()
                                                                      << "' does not name '" << needle << "'";
  } catch (const std::exception& e) {
    ADD_FAILURE() << label << ": wrong exception type: " << e.what();
  }
}

TEST(AttentionErrors, ConfigFieldsAreValidated) {
  auto bad = [](auto edit, const std::string& field) {
    AttentionConfig c = make_config(8, 2, 0, 4);
    edit(c);
    expect_throw_naming<titans::InvalidArgument>([&] { Attention<double> a(c); }, field, field);
    expect_throw_naming<titans::InvalidArgument>([&] { c.validate(); }, field, field + " (validate)");
  };
  bad([](AttentionConfig& c) { c.window = -1; }, "window");
  bad([](AttentionConfig& c) { c.heads = 3; }, "heads");  // 3 does not divide 8
  bad([](AttentionConfig& c) { c.heads = 0; }, "heads");
  bad([](AttentionConfig& c) { c.dim = 0; }, "dim");
  bad([](AttentionConfig& c) { c.dim = 6; }, "head width");  // 6 / 2 = 3 is odd
  bad([](AttentionConfig& c) { c.block = 0; }, "block");
  bad([](AttentionConfig& c) { c.rope_base = 1.0; }, "rope_base");
  bad([](AttentionConfig& c) { c.rope_base = 0.5; }, "rope_base");
  bad([](AttentionConfig& c) { c.rope_base = std::numeric_limits<double>::quiet_NaN(); }, "rope_base");
  bad([](AttentionConfig& c) { c.rope_base = std::numeric_limits<double>::infinity(); }, "rope_base");
  // ...and good configurations pass.
  EXPECT_NO_THROW(Attention<double>(make_config(8, 4, 1, 1)));
  EXPECT_NO_THROW(Attention<double>(make_config(2, 1, 0, 1000)));
}

TEST(AttentionErrors, ForwardChecksShapesValuesAndState) {
  Attention<double> attn(make_config(8, 2, 3, 4));
  const Params<double> p = attn.init(1);
  const Mat<double> x = random_matrix<double>(8, 5, 2), P = random_matrix<double>(8, 2, 3);
  State<double> s = attn.initial_state();
  attn.forward(p, x, P, s);
  const State<double> before = s;
  auto unchanged = [&] {
    EXPECT_EQ(s.k, before.k);
    EXPECT_EQ(s.v, before.v);
    EXPECT_EQ(s.position, before.position);
  };
  expect_throw_naming<titans::ShapeError>([&] { attn.forward(p, Mat<double>(random_matrix<double>(7, 5, 4)), P, s); }, "x",
                                          "x rows");
  expect_throw_naming<titans::ShapeError>([&] { attn.forward(p, x, Mat<double>(random_matrix<double>(9, 2, 4)), s); },
                                          "persistent", "persistent rows");
  const char* names[] = {"w_q", "w_k", "w_v", "w_o"};
  for (int i = 0; i < 4; ++i) {
    Params<double> bad = p;
    Mat<double>* m[] = {&bad.w_q, &bad.w_k, &bad.w_v, &bad.w_o};
    m[i]->resize(8, 7);
    expect_throw_naming<titans::ShapeError>([&] { attn.forward(bad, x, P, s); }, names[i], names[i]);
  }
  for (double v : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    Mat<double> xb = x;
    xb(3, 2) = v;
    expect_throw_naming<titans::NumericError>([&] { attn.forward(p, xb, P, s); }, "non-finite", "x non-finite");
    Mat<double> pb = P;
    pb(1, 1) = -v;
    expect_throw_naming<titans::NumericError>([&] { attn.forward(p, x, pb, s); }, "persistent", "persistent non-finite");
  }
  unchanged();  // failed calls leave the state alone

  State<double> big = s;  // window 3 keeps at most 2 cached tokens
  big.k = random_matrix<double>(8, 3, 5);
  big.v = random_matrix<double>(8, 3, 6);
  expect_throw_naming<titans::InvalidArgument>([&] { attn.forward(p, x, P, big); }, "cached", "state too long");
  State<double> wrong = s;
  wrong.k = random_matrix<double>(7, 2, 5);
  expect_throw_naming<titans::ShapeError>([&] { attn.forward(p, x, P, wrong); }, "state.k", "state.k rows");
  wrong = s;
  wrong.v = random_matrix<double>(8, 1, 5);
  expect_throw_naming<titans::ShapeError>([&] { attn.forward(p, x, P, wrong); }, "state.v", "state.v cols");
  wrong = s;
  wrong.position = -1;
  expect_throw_naming<titans::InvalidArgument>([&] { attn.forward(p, x, P, wrong); }, "position", "position");
}

TEST(AttentionErrors, AttendChecksRangesAndCache) {
  Attention<double> attn(make_config(8, 2, 0, 4));
  const Params<double> p = attn.init(1);
  const Mat<double> xq = random_matrix<double>(8, 3, 2), xkv = random_matrix<double>(8, 2, 3), P = random_matrix<double>(8, 1, 4);
  const Mat<double> ck = random_matrix<double>(8, 2, 5), cv = random_matrix<double>(8, 2, 6), none(8, 0);
  const std::vector<Index> qpos = {4, 5, 6}, kpos = {4, 5};
  using V = std::vector<Index>;
  // nmain = 2 cached + 2 new = 4 main keys.
  EXPECT_NO_THROW(attn.attend("attend", p, xq, qpos, xkv, kpos, P, ck, cv, V{0, 1, 2}, V{1, 2, 3}, nullptr));
  EXPECT_NO_THROW(attn.attend("attend", p, xq, qpos, xkv, kpos, P, ck, cv, V{4, 4, 4}, V{3, 3, 3}, nullptr));
  auto bad = [&](const Mat<double>& pp, const V& lo, const V& hi, const std::string& label) {
    expect_throw_naming<titans::InvalidArgument>(
        [&] { attn.attend("attend", p, xq, qpos, xkv, kpos, pp, ck, cv, lo, hi, nullptr); }, "range", label);
  };
  bad(P, V{-1, 0, 0}, V{1, 2, 3}, "lo < 0");
  bad(P, V{0, 1, 2}, V{1, 2, 4}, "hi past the last key");
  bad(none, V{0, 2, 2}, V{1, 1, 3}, "empty range without persistent tokens");
  bad(P, V{0, 2, 1}, V{1, 2, 3}, "decreasing lo");
  bad(P, V{0, 1, 2}, V{2, 1, 3}, "decreasing hi");
  bad(P, V{0, 1, 5}, V{1, 2, 3}, "lo past the end");
  bad(P, V{6, 6, 6}, V{3, 3, 3}, "lo past the end, all queries");
  expect_throw_naming<titans::InvalidArgument>(
      [&] { attn.attend("attend", p, xq, V{4, 5}, xkv, kpos, P, ck, cv, V{0, 1, 2}, V{1, 2, 3}, nullptr); }, "position",
      "qpos size");
  expect_throw_naming<titans::InvalidArgument>(
      [&] { attn.attend("attend", p, xq, qpos, xkv, V{4}, P, ck, cv, V{0, 1, 2}, V{1, 2, 3}, nullptr); }, "position",
      "kpos size");
  expect_throw_naming<titans::InvalidArgument>(
      [&] { attn.attend("attend", p, xq, qpos, xkv, kpos, P, ck, cv, V{0, 1}, V{1, 2, 3}, nullptr); }, "range",
      "lo size");
  // The cached keys and values must be (D, n) with the same n.
  expect_throw_naming<titans::ShapeError>(
      [&] { attn.attend("attend", p, xq, qpos, xkv, kpos, P, random_matrix<double>(7, 2, 7), cv, V{0, 1, 2}, V{1, 2, 3}, nullptr); },
      "cached", "cached_k rows");
  expect_throw_naming<titans::ShapeError>(
      [&] { attn.attend("attend", p, xq, qpos, xkv, kpos, P, ck, random_matrix<double>(8, 3, 7), V{0, 1, 2}, V{1, 2, 3}, nullptr); },
      "cached", "cached_v cols");
  expect_throw_naming<titans::ShapeError>(
      [&] { attn.attend("attend", p, random_matrix<double>(6, 3, 8), qpos, xkv, kpos, P, ck, cv, V{0, 1, 2}, V{1, 2, 3}, nullptr); },
      "queries", "xq rows");
  expect_throw_naming<titans::ShapeError>(
      [&] { attn.attend("attend", p, xq, qpos, random_matrix<double>(6, 2, 8), kpos, P, ck, cv, V{0, 1, 2}, V{1, 2, 3}, nullptr); },
      "key/value", "xkv rows");
  // Non-finite queries, key/value tokens and persistent tokens are each rejected by name.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  Mat<double> xq_bad = xq, xkv_bad = xkv, P_bad = P;
  xq_bad(2, 1) = nan;
  xkv_bad(5, 0) = nan;
  P_bad(0, 0) = -std::numeric_limits<double>::infinity();
  expect_throw_naming<titans::NumericError>(
      [&] { attn.attend("attend", p, xq_bad, qpos, xkv, kpos, P, ck, cv, V{0, 1, 2}, V{1, 2, 3}, nullptr); }, "queries",
      "xq NaN");
  expect_throw_naming<titans::NumericError>(
      [&] { attn.attend("attend", p, xq, qpos, xkv_bad, kpos, P, ck, cv, V{0, 1, 2}, V{1, 2, 3}, nullptr); }, "key/value",
      "xkv NaN");
  expect_throw_naming<titans::NumericError>(
      [&] { attn.attend("attend", p, xq, qpos, xkv, kpos, P_bad, ck, cv, V{0, 1, 2}, V{1, 2, 3}, nullptr); }, "persistent",
      "persistent inf");
}

TEST(AttentionErrors, BackwardChecksItsArguments) {
  Attention<double> attn(make_config(8, 2, 3, 4));
  const Params<double> p = attn.init(1);
  const Mat<double> x = random_matrix<double>(8, 6, 2), P = random_matrix<double>(8, 2, 3);
  State<double> s = attn.initial_state();
  Cache<double> cache;
  attn.forward_train(p, x, P, s, cache);
  Params<double> g = titans::zeros_like(p);
  Mat<double> dx = Mat<double>::Zero(8, 6), dP = Mat<double>::Zero(8, 2);
  EXPECT_NO_THROW(attn.backward_causal(p, cache, random_matrix<double>(8, 6, 4), g, dx, dP));
  Mat<double> dx_bad = Mat<double>::Zero(8, 5), dP_bad = Mat<double>::Zero(8, 1);
  expect_throw_naming<titans::ShapeError>([&] { attn.backward_causal(p, cache, Mat<double>::Zero(8, 5), g, dx, dP); },
                                          "dout", "dout");
  expect_throw_naming<titans::ShapeError>([&] { attn.backward_causal(p, cache, Mat<double>::Zero(8, 6), g, dx_bad, dP); },
                                          "dx", "dx");
  expect_throw_naming<titans::ShapeError>([&] { attn.backward_causal(p, cache, Mat<double>::Zero(8, 6), g, dx, dP_bad); },
                                          "dpersistent", "dpersistent");
  Params<double> g_bad = g;
  g_bad.w_v.resize(8, 3);
  expect_throw_naming<titans::ShapeError>([&] { attn.backward_causal(p, cache, Mat<double>::Zero(8, 6), g_bad, dx, dP); },
                                          "w_v", "grads.w_v");
  // A cache that no training call filled, or one filled by a layer with another block size.
  Cache<double> empty;
  EXPECT_THROW(attn.backward_causal(p, empty, Mat<double>::Zero(8, 6), g, dx, dP), titans::InvalidArgument);
  Mat<double> none(8, 0);
  expect_throw_naming<titans::InvalidArgument>([&] { attn.backward(p, empty, none, g, none, none, none); }, "cache",
                                               "empty cache");
  Attention<double> other(make_config(8, 2, 3, 1));
  expect_throw_naming<titans::InvalidArgument>([&] { other.backward_causal(p, cache, Mat<double>::Zero(8, 6), g, dx, dP); },
                                               "cache", "cache from another block size");
}

TEST(AttentionState, EmptyCallsAndInitialState) {
  Attention<float> attn(make_config(8, 2, 3, 4));
  const Params<float> p = attn.init(1);
  State<float> s = attn.initial_state();
  EXPECT_EQ(s.k.rows(), 8);
  EXPECT_EQ(s.k.cols(), 0);
  EXPECT_EQ(s.position, 0);
  const Mat<float> y = attn.forward(p, Mat<float>(8, 0), Mat<float>(8, 2), s);
  EXPECT_EQ(y.rows(), 8);
  EXPECT_EQ(y.cols(), 0);
  EXPECT_EQ(s.position, 0);
  std::vector<std::string> names;
  p.for_each([&](const std::string& n, const Mat<float>& m) {
    names.push_back(n);
    EXPECT_EQ(m.rows(), 8);
    EXPECT_EQ(m.cols(), 8);
  });
  EXPECT_EQ(names, (std::vector<std::string>{"w_q", "w_k", "w_v", "w_o"}));
}

}  // namespace
