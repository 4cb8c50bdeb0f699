// SPDX-License-Identifier: Apache-2.0
// The Titans blocks (docs/MATH.md §5–6) and BlockStack: finite-difference gradient checks through the
// test-time updates, causality, streaming (splits, decode == prefill, forward_train == forward),
// every block against an independent formulation written here (naive attention, RoPE, RMSNorm,
// SwiGLU, the public NeuralMemory layer), what the window and the persistent tokens reach, MAC's
// retrieval from the pre-segment memory in both forms (interleaved, and Figure 3a's memory tokens),
// bad configurations and batch isolation.
#include <titans/blocks.hpp>
#include <titans/train/gradcheck.hpp>
#include <titans/parameters.hpp>

#include <gtest/gtest.h>

#include "support/random_matrix.hpp"
#include "support/sampling.hpp"

#include <cmath>
#include <functional>
#include <limits>
#include <ostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using titans::Block;
using titans::BlockConfig;
using titans::BlockKind;
using titans::BlockStack;
using titans::Index;
using titans::Matrix;

template <class S>
using BParams = titans::BlockParams<S>;
template <class S>
using BState = titans::BlockState<S>;

constexpr BlockKind kKinds[] = {BlockKind::lmm, BlockKind::mac, BlockKind::mag, BlockKind::mal, BlockKind::swa};
constexpr Index kDim = 8;
constexpr Index kT = 11;  // crosses segments (4), windows (3) and chunks (3) mid-way; last segment partial

// dim 8, 2 attention heads (width 4), window 3, segment 4, 2 persistent tokens, SwiGLU 12,
// memory: 2 heads of width 4, depth 2, expansion 2, chunks of 3, conv kernel 3. The attention
// kernel's query blocks (2) are smaller than a segment so the blocked path is crossed too.
BlockConfig small_config(BlockKind kind, Index persistent = 2, Index segment = 4) {
  BlockConfig c;
  c.kind = kind;
  c.dim = kDim;
  c.attention_heads = 2;
  c.window = 3;
  c.segment = segment;
  c.persistent = persistent;
  c.ffn_hidden = 12;
  c.attention_block = 2;
  c.memory.dim = kDim;
  c.memory.heads = 2;
  c.memory.depth = 2;
  c.memory.expansion = 2;
  c.memory.chunk_size = 3;
  c.memory.conv_kernel = 3;
  return c;
}

// MAC in the Figure 3a form: N_l memory tokens from learned queries, a prefix of the attention.
BlockConfig mac_tokens_config(Index memory_tokens, Index persistent = 2, Index segment = 4) {
  BlockConfig c = small_config(BlockKind::mac, persistent, segment);
  c.memory_tokens = memory_tokens;
  return c;
}

std::string config_name(const BlockConfig& c) {
  return std::string(titans::to_string(c.kind)) + " segment " + std::to_string(c.segment) + " window " +
         std::to_string(c.window) + " persistent " + std::to_string(c.persistent) +
         (c.has_retrieve_queries() ? " memory_tokens " + std::to_string(c.memory_tokens) : std::string());
}

using titans_test::random_matrix;

// Parameters where everything matters: gains away from 1, data-dependent gates with α ≈ σ(−2)
// (the default σ(−8) makes the forget gate's gradients too small for finite differences).
template <class P>
void liven(P& p, std::uint64_t seed) {
  using S = typename P::scalar_type;
  titans::detail::Rng rng(seed);
  auto jitter = [&](Matrix<S>& g) {
    Matrix<S> n(g.rows(), g.cols());
    rng.fill_normal(n, 0.2);
    g += n;
  };
  jitter(p.norm_mixer);
  jitter(p.norm_ffn);
  if (p.has_gate) {
    jitter(p.gate_y);
    jitter(p.gate_m);
  }
  if (p.has_retrieve) jitter(p.retrieve_gain);
  if (p.has_memory) {
    rng.fill_normal(p.memory.w_alpha, 0.3);
    rng.fill_normal(p.memory.w_eta, 0.3);
    rng.fill_normal(p.memory.w_theta, 0.3);
    p.memory.b_alpha.setConstant(S(-2));
    jitter(p.memory.norm_gain);
  }
}

template <class S>
BParams<S> lively(const Block<S>& b, std::uint64_t seed) {
  BParams<S> p = b.init(seed);
  liven(p, seed + 101);
  return p;
}

template <class S>
titans::BlockStackParams<S> lively(const BlockStack<S>& st, std::uint64_t seed) {
  auto p = st.init(seed);
  for (std::size_t i = 0; i < p.blocks.size(); ++i) liven(p.blocks[i], seed + 101 + i);
  return p;
}

template <class A, class B>
double max_rel(const A& a, const B& b) {
  if (a.size() == 0 && b.size() == 0) return 0;
  const double scale = std::max(
      {1e-300, static_cast<double>(a.cwiseAbs().maxCoeff()), static_cast<double>(b.cwiseAbs().maxCoeff())});
  return static_cast<double>((a - b).cwiseAbs().maxCoeff()) / scale;
}

template <class A, class B>
double max_abs(const A& a, const B& b) {
  if (a.size() == 0) return 0;
  return static_cast<double>((a - b).cwiseAbs().maxCoeff());
}

// Compares two states (BlockState or BlockStackState) tensor by tensor: empty string when every
// tensor has the same name and shape and agrees to `tol` relative to its own largest entry.
template <class St>
std::string state_diff(const St& a, const St& b, double tol) {
  using S = typename St::scalar_type;
  std::vector<std::pair<std::string, const Matrix<S>*>> ta, tb;
  a.for_each([&](const std::string& n, const Matrix<S>& t) { ta.push_back({n, &t}); });
  b.for_each([&](const std::string& n, const Matrix<S>& t) { tb.push_back({n, &t}); });
  std::ostringstream os;
  if (ta.size() != tb.size()) {
    os << "states hold " << ta.size() << " and " << tb.size() << " tensors";
    return os.str();
  }
  for (std::size_t i = 0; i < ta.size(); ++i) {
    const Matrix<S>& x = *ta[i].second;
    const Matrix<S>& y = *tb[i].second;
    if (ta[i].first != tb[i].first || x.rows() != y.rows() || x.cols() != y.cols()) {
      os << "tensor " << i << ": '" << ta[i].first << "' (" << x.rows() << ", " << x.cols() << ") vs '" << tb[i].first
         << "' (" << y.rows() << ", " << y.cols() << ")";
      return os.str();
    }
    const double e = max_rel(x, y);
    if (e > tol) {
      os << "state tensor '" << ta[i].first << "' differs: relative " << e;
      return os.str();
    }
  }
  return "";
}

// The state with its memory's pending tokens applied (docs/MATH.md §3.3): forward leaves the
// tokens of an unfinished chunk pending, forward_train settles them; the values are the same.
template <class S>
BState<S> settled(const BlockConfig& c, BState<S> s) {
  for (auto& h : s.memory.heads) titans::memory_state_settle(c.memory.memory(), c.memory.chunk_size, h);
  return s;
}
template <class S>
titans::BlockStackState<S> settled(const BlockConfig& c, titans::BlockStackState<S> s) {
  for (auto& b : s.blocks) b = settled(c, std::move(b));
  return s;
}

template <class S>
std::string block_state_diff(const BState<S>& a, const BState<S>& b, double tol) {
  if (a.position != b.position || a.primed != b.primed || a.memory.position != b.memory.position ||
      a.attention.position != b.attention.position)
    return "positions or primed flags differ";
  return state_diff(a, b, tol);
}

template <class S>
std::string stack_state_diff(const titans::BlockStackState<S>& a, const titans::BlockStackState<S>& b, double tol) {
  for (std::size_t i = 0; i < a.blocks.size(); ++i)
    if (a.blocks[i].position != b.blocks[i].position || a.blocks[i].primed != b.blocks[i].primed)
      return "block " + std::to_string(i) + ": positions or primed flags differ";
  return state_diff(a, b, tol);
}

std::string kind_name(BlockKind k) { return titans::to_string(k); }

// =============================================================================================
// An independent formulation of the blocks (double), written from docs/MATH.md §5–6.
// =============================================================================================

using Mat = Matrix<double>;
using Vec = titans::Vector<double>;

double sigm(double z) { return 1 / (1 + std::exp(-z)); }

Mat silu(const Mat& m) { return m.unaryExpr([](double z) { return z * sigm(z); }); }
Mat sigmoid(const Mat& m) { return m.unaryExpr([](double z) { return sigm(z); }); }

// RMSNorm over `groups` equal slices of each column: g ⊙ x / sqrt(mean(x²) + ε).
Mat rms(const Mat& x, const Mat& gain, double eps, Index groups = 1) {
  const Index n = x.rows() / groups;
  Mat y(x.rows(), x.cols());
  for (Index t = 0; t < x.cols(); ++t)
    for (Index g = 0; g < groups; ++g) {
      double ss = 0;
      for (Index i = 0; i < n; ++i) ss += x(g * n + i, t) * x(g * n + i, t);
      const double r = std::sqrt(ss / static_cast<double>(n) + eps);
      for (Index i = 0; i < n; ++i) y(g * n + i, t) = gain(g * n + i, 0) * x(g * n + i, t) / r;
    }
  return y;
}

// Rotary embedding of column `t` of m at position `pos`: in each head of width dh, the pairs
// (i, i + dh/2) turn by pos · base^(−2i/dh) (the convention documented in attention.hpp).
void rope(Mat& m, Index t, Index pos, Index heads, double base) {
  const Index dh = m.rows() / heads, half = dh / 2;
  for (Index h = 0; h < heads; ++h)
    for (Index i = 0; i < half; ++i) {
      const double ang = static_cast<double>(pos) * std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(dh));
      const double a = m(h * dh + i, t), b = m(h * dh + i + half, t);
      m(h * dh + i, t) = a * std::cos(ang) - b * std::sin(ang);
      m(h * dh + i + half, t) = a * std::sin(ang) + b * std::cos(ang);
    }
}

// Naive softmax attention, one query and one head at a time: query i (token xq_i at rotary
// position qpos[i]) sees every prefix token (no position) and the key/value tokens j with
// visible(i, j) (rotated at kpos[j]). Returns W_O · attention.
Mat naive_attention(const titans::AttentionParams<double>& ap, Index heads, double base, const Mat& xq,
                    const std::vector<Index>& qpos, const Mat& prefix, const Mat& kv, const std::vector<Index>& kpos,
                    const std::function<bool(Index, Index)>& visible) {
  const Index D = xq.rows(), dh = D / heads, np = prefix.cols();
  Mat q = ap.w_q * xq, k = ap.w_k * kv, v = ap.w_v * kv;
  const Mat pk = ap.w_k * prefix, pv = ap.w_v * prefix;
  for (Index i = 0; i < q.cols(); ++i) rope(q, i, qpos[static_cast<std::size_t>(i)], heads, base);
  for (Index j = 0; j < k.cols(); ++j) rope(k, j, kpos[static_cast<std::size_t>(j)], heads, base);
  Mat a = Mat::Zero(D, xq.cols());
  for (Index i = 0; i < xq.cols(); ++i)
    for (Index h = 0; h < heads; ++h) {
      const Vec qi = q.col(i).segment(h * dh, dh);
      std::vector<double> score;
      std::vector<Vec> value;
      for (Index r = 0; r < np; ++r) {
        score.push_back(qi.dot(pk.col(r).segment(h * dh, dh)) / std::sqrt(static_cast<double>(dh)));
        value.push_back(pv.col(r).segment(h * dh, dh));
      }
      for (Index j = 0; j < kv.cols(); ++j)
        if (visible(i, j)) {
          score.push_back(qi.dot(k.col(j).segment(h * dh, dh)) / std::sqrt(static_cast<double>(dh)));
          value.push_back(v.col(j).segment(h * dh, dh));
        }
      double mx = -std::numeric_limits<double>::infinity();
      for (double s : score) mx = std::max(mx, s);
      double z = 0;
      for (double& s : score) z += (s = std::exp(s - mx));
      for (std::size_t r = 0; r < score.size(); ++r) a.col(i).segment(h * dh, dh) += (score[r] / z) * value[r];
    }
  return ap.w_o * a;
}

// Sliding-window causal attention over tokens at absolute positions 0..T−1.
Mat window_attention(const BlockConfig& c, const titans::AttentionParams<double>& ap, const Mat& x, const Mat& prefix) {
  std::vector<Index> pos(static_cast<std::size_t>(x.cols()));
  for (Index t = 0; t < x.cols(); ++t) pos[static_cast<std::size_t>(t)] = t;
  const Index w = c.window;
  return naive_attention(ap, c.attention_heads, c.rope_base, x, pos, prefix, x, pos,
                         [w](Index i, Index j) { return j <= i && j > i - w; });
}

// y ⊗ m = RMSNorm_{g1}(y) ⊙ σ(RMSNorm_{g2}(m)).
Mat gate(const BlockConfig& c, const BParams<double>& p, const Mat& y, const Mat& m) {
  return rms(y, p.gate_y, c.norm_eps).cwiseProduct(sigmoid(rms(m, p.gate_m, c.norm_eps)));
}

// Deliberately wrong variants of MAC, to show the comparison can tell them apart.
struct MacVariant {
  bool retrieve_from_init = false;  // retrieve with Θ_init instead of the pre-segment memory
  bool see_all_h = false;           // position j sees every h of its segment, not just h_{≤j}
  bool absolute_rope = false;       // rotary positions counted from the sequence start, not the segment
  bool causal_memory_tokens = false;  // memory tokens: position j sees h_1 … h_{j+1} only, not all N_l
};

// MAC (docs/MATH.md §6) from its definition, over a whole sequence from a fresh state.
Mat mac_mixer(const BlockConfig& c, const BParams<double>& p, const Mat& u, const MacVariant& var) {
  const Index D = c.dim, T = u.cols(), C = c.segment, H = c.memory.heads, d = D / H;
  const titans::MemoryConfig mc = c.memory.memory();
  titans::NeuralMemory<double> mem(c.memory);
  auto st = mem.initial_state(p.memory);
  auto weights = [&] {
    std::vector<std::vector<Mat>> w;
    for (const auto& h : st.heads) w.push_back(titans::memory_current_weights(mc, h));  // pending tokens applied
    return w;
  };
  const auto w_init = weights();
  Mat out(D, T);
  for (Index t0 = 0; t0 < T; t0 += C) {
    const Index n = std::min(C, T - t0);
    const auto snap = var.retrieve_from_init ? w_init : weights();  // the memory before this segment
    const Mat seg = u.middleCols(t0, n);
    // 1. h = M*(q): q = ℓ2-normalised SiLU(W_R u) per head, or the learned queries (Figure 3a);
    // per-head RMSNorm of the read × gain.
    const bool tokens = c.memory_tokens > 0;
    Mat q = tokens ? p.retrieve_queries : silu(p.retrieve_w * seg);
    for (Index t = 0; t < q.cols(); ++t)
      for (Index h = 0; h < H; ++h) q.col(t).segment(h * d, d) /= std::sqrt(q.col(t).segment(h * d, d).squaredNorm() + c.memory.norm_eps);
    Mat r(D, q.cols());
    for (Index h = 0; h < H; ++h)
      r.middleRows(h * d, d) =
          titans::memory_apply<double>(mc, snap[static_cast<std::size_t>(h)], q.middleRows(h * d, d), mem.gain(p.memory, h));
    const Mat hret = rms(r, p.retrieve_gain, c.memory.norm_eps, H);
    // 2. Interleaved: attention over [persistent || h || seg]; keys 0..n−1 are h, n..2n−1 the
    // segment. Figure 3a: the memory tokens join the persistent tokens as the always-visible
    // prefix (no position), and the keys are the segment's tokens.
    std::vector<Index> qpos(static_cast<std::size_t>(n));
    for (Index j = 0; j < n; ++j) qpos[static_cast<std::size_t>(j)] = var.absolute_rope ? t0 + j : j;
    const Index nh = hret.cols();
    Mat kv(D, nh + n);
    kv << hret, seg;
    std::vector<Index> kpos(static_cast<std::size_t>(nh), 0);  // h_j at j (interleaved); 0 = no rotation
    if (!tokens) kpos = qpos;
    kpos.insert(kpos.end(), qpos.begin(), qpos.end());
    Mat y;
    if (!tokens) {
      const bool all_h = var.see_all_h;
      y = naive_attention(p.attention, c.attention_heads, c.rope_base, seg, qpos, p.persistent, kv, kpos,
                          [n, all_h](Index i, Index j) { return j < n ? (all_h || j <= i) : j - n <= i; });
    } else if (!var.causal_memory_tokens) {
      Mat prefix(D, c.persistent + nh);
      prefix << p.persistent, hret;
      y = naive_attention(p.attention, c.attention_heads, c.rope_base, seg, qpos, prefix, seg, qpos,
                          [](Index i, Index j) { return j <= i; });
    } else {  // the wrong variant: query i sees the memory tokens h_1 … h_{i+1} only
      y = naive_attention(p.attention, c.attention_heads, c.rope_base, seg, qpos, p.persistent, kv, kpos,
                          [nh](Index i, Index j) { return j < nh ? j <= i : j - nh <= i; });
    }
    // 3. write y into the memory and read z; 4. gate.
    const Mat z = mem.forward(p.memory, y, st);
    out.middleCols(t0, n) = gate(c, p, y, z);
  }
  return out;
}

// The memory over [persistent || u] (primed with the persistent tokens): returns the outputs at
// the persistent tokens and at u.
std::pair<Mat, Mat> primed_memory(const BlockConfig& c, const BParams<double>& p, const Mat& u) {
  titans::NeuralMemory<double> mem(c.memory);
  auto st = mem.initial_state(p.memory);
  Mat in(c.dim, c.persistent + u.cols());
  in << p.persistent, u;
  const Mat o = mem.forward(p.memory, in, st);
  return {o.leftCols(c.persistent), o.rightCols(u.cols())};
}

// A whole block from its definition: x ← x + Mixer(RMSNorm(x)); x ← x + SwiGLU(RMSNorm(x)).
Mat reference_block(const BlockConfig& c, const BParams<double>& p, const Mat& x, const MacVariant& var = {}) {
  const Mat u = rms(x, p.norm_mixer, c.norm_eps);
  Mat mix;
  switch (c.kind) {
    // LMM reads [p || x] like MAG and MAL ([choice], docs/MATH.md §5–6: the memory is primed
    // with the persistent tokens on a fresh state).
    case BlockKind::lmm: mix = primed_memory(c, p, u).second; break;
    case BlockKind::swa: mix = window_attention(c, p.attention, u, p.persistent); break;
    case BlockKind::mag: mix = gate(c, p, window_attention(c, p.attention, u, p.persistent), primed_memory(c, p, u).second); break;
    case BlockKind::mal: {
      const auto [py, y] = primed_memory(c, p, u);
      mix = window_attention(c, p.attention, y, py);
      break;
    }
    case BlockKind::mac: mix = mac_mixer(c, p, u, var); break;
  }
  const Mat x1 = x + mix;
  const Mat u2 = rms(x1, p.norm_ffn, c.norm_eps);
  return x1 + p.ffn_w2 * silu(p.ffn_w1 * u2).cwiseProduct(p.ffn_w3 * u2);
}

// =============================================================================================
// 1. Gradients (double): backward through the test-time updates == central differences.
// =============================================================================================

struct GradCase {
  BlockKind kind;
  Index persistent, segment, prefix;  // prefix > 0: a carried state (gradients stop at the call boundary)
  Index checkpoint = 1;               // BlockConfig::checkpoint_every (> 1: backward recomputes)
  Index memory_tokens = 0;            // MAC's N_l (> 0: Figure 3a's learned-query memory tokens)
  Index depth = 2;                    // memory depth
};

void PrintTo(const GradCase& g, std::ostream* os) {
  *os << titans::to_string(g.kind) << ", persistent " << g.persistent << ", segment " << g.segment << ", prefix "
      << g.prefix << ", checkpoint_every " << g.checkpoint << ", memory_tokens " << g.memory_tokens << ", depth "
      << g.depth;
}

std::string grad_case_name(const ::testing::TestParamInfo<GradCase>& info) {
  const GradCase& g = info.param;
  return kind_name(g.kind) + "_np" + std::to_string(g.persistent) + "_C" + std::to_string(g.segment) +
         (g.prefix > 0 ? "_after" + std::to_string(g.prefix) : std::string()) +
         (g.checkpoint > 1 ? "_ckpt" + std::to_string(g.checkpoint) : std::string()) +
         (g.memory_tokens > 0 ? "_Nl" + std::to_string(g.memory_tokens) : std::string()) +
         (g.depth != 2 ? "_L" + std::to_string(g.depth) : std::string());
}

titans::GradCheckOptions grad_options() {
  titans::GradCheckOptions opt;
  opt.rtol = 1e-5;
  // The default memory's LayerNorm read-out has large third derivatives where its z_L is small,
  // so central differences at h = 1e-6 are good to ~1e-7 absolute here; the memory forms' exact
  // derivatives are checked against forward mode to 1e-10 in test_memory_backward.
  opt.atol = 3e-7;
  opt.step = 3e-7;  // the truncation error ~h²·(third derivative) is what limits these checks
  return titans_test::sampled(opt);
}

class BlockGradCheck : public ::testing::TestWithParam<GradCase> {};

TEST_P(BlockGradCheck, MatchesFiniteDifferences) {
  const GradCase g = GetParam();
  BlockConfig cfg = small_config(g.kind, g.persistent, g.segment);
  cfg.checkpoint_every = g.checkpoint;
  cfg.memory_tokens = g.memory_tokens;
  cfg.memory.depth = g.depth;
  const Block<double> blk(cfg);
  BParams<double> p = lively(blk, 3);
  Mat x = random_matrix<double>(kDim, kT, 5);
  // With a prefix, the state after it is made once with the unperturbed parameters and held
  // constant (a carried-in state is a constant of the backward).
  BState<double> start = blk.initial_state(p);
  if (g.prefix > 0) blk.forward(p, random_matrix<double>(kDim, g.prefix, 6), start);
  auto first_state = [&](const BParams<double>& pp) { return g.prefix > 0 ? start : blk.initial_state(pp); };
  auto fwd = [&](const BParams<double>& pp, const Mat& xx) {
    BState<double> s = first_state(pp);
    return blk.forward(pp, xx, s);
  };
  auto bwd = [&](const BParams<double>& pp, const Mat& xx, const Mat& dy, BParams<double>& gr, Mat& dx) {
    BState<double> s = first_state(pp);
    titans::BlockCache<double> cache;
    blk.forward_train(pp, xx, s, cache);
    blk.backward(pp, cache, dy, gr, dx);
  };
  titans::GradCheckOptions opt = grad_options();
  if (g.prefix > 0) {
    // A carried-in state is a constant: the memory's initial weights no longer reach the output,
    // nor do the persistent tokens of the kinds that prepend them to the stream's start only.
    for (const std::string& name : titans::parameter_names(p))
      if (name.rfind("memory.memory_init.", 0) == 0 || (name == "persistent" && g.kind != BlockKind::mac))
        opt.may_be_zero.push_back(name);
  }
  const auto r = titans::gradient_check(p, x, fwd, bwd, opt);
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_EQ(r.checked, titans_test::expected_checked(p, x, opt));
  RecordProperty("worst", r.report());

  // From a fresh state every tensor reaches the output (so a passing check is not 0 == 0).
  if (g.prefix == 0) {
    BParams<double> gr = titans::zeros_like(p);
    Mat dx = Mat::Zero(kDim, kT);
    bwd(p, x, random_matrix<double>(kDim, kT, 77), gr, dx);
    gr.for_each([&](const std::string& name, const Mat& t) {
      if (t.size() > 0) {
        EXPECT_GT(t.norm(), 1e-10) << "gradient of " << name << " is zero";
      }
    });
    EXPECT_GT(dx.norm(), 1e-10);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Blocks, BlockGradCheck,
    ::testing::Values(GradCase{BlockKind::lmm, 2, 4, 0}, GradCase{BlockKind::lmm, 0, 4, 0},
                      GradCase{BlockKind::mac, 2, 4, 0},  // segment not a multiple of the chunk
                      GradCase{BlockKind::mac, 2, 6, 0},  // segment a multiple of the chunk
                      GradCase{BlockKind::mac, 0, 4, 0}, GradCase{BlockKind::mac, 1, 3, 0},
                      GradCase{BlockKind::mag, 2, 4, 0}, GradCase{BlockKind::mag, 0, 4, 0},
                      GradCase{BlockKind::mal, 2, 4, 0}, GradCase{BlockKind::mal, 0, 4, 0},
                      GradCase{BlockKind::swa, 2, 4, 0}, GradCase{BlockKind::swa, 0, 4, 0},
                      // carried state: the call starts inside a segment, a window and a chunk
                      GradCase{BlockKind::lmm, 2, 4, 5}, GradCase{BlockKind::mac, 2, 4, 5},
                      GradCase{BlockKind::mac, 2, 6, 7}, GradCase{BlockKind::mac, 2, 4, 4},  // on a boundary
                      GradCase{BlockKind::mal, 1, 4, 3}, GradCase{BlockKind::mag, 2, 4, 5},
                      GradCase{BlockKind::mal, 2, 4, 5}, GradCase{BlockKind::swa, 2, 4, 5},
                      // the memory keeps every 2nd chunk-start state and backward recomputes the rest
                      GradCase{BlockKind::mac, 2, 4, 0, 2}, GradCase{BlockKind::mag, 2, 4, 0, 2},
                      GradCase{BlockKind::mal, 2, 4, 5, 2},
                      // MAC with N_l memory tokens (Figure 3a), the memory deep (L = 2) unless _L1: 11
                      // tokens in 2 segments of 6, in 6 of 2 and in 4 of 3 (more memory tokens than a
                      // segment's tokens), in 3 of 4 without persistent tokens; a carried state whose
                      // call starts inside a segment (the snapshot is then a constant) and on a boundary.
                      // (The draws N_l = 3, C = 4, N_p = 2 and C = 2, N_p = 1 each have one entry where
                      // double central differences miss by 1–3e-4 relative at every step; long-double
                      // differences converge to backward there as h², measured: a conditioning limit.)
                      GradCase{BlockKind::mac, 2, 6, 0, 1, 3}, GradCase{BlockKind::mac, 2, 2, 0, 2, 3},
                      GradCase{BlockKind::mac, 1, 3, 0, 2, 5}, GradCase{BlockKind::mac, 0, 4, 0, 1, 3, 1},
                      GradCase{BlockKind::mac, 2, 4, 5, 1, 3}, GradCase{BlockKind::mac, 2, 4, 4, 1, 3, 1}),
    grad_case_name);

void stack_gradient_check(const std::vector<BlockKind>& kinds) {
  const BlockStack<double> st(small_config(BlockKind::mac), kinds);
  auto p = lively(st, 9);
  Mat x = random_matrix<double>(kDim, kT, 10);
  auto fwd = [&](const titans::BlockStackParams<double>& pp, const Mat& xx) {
    auto s = st.initial_state(pp);
    return st.forward(pp, xx, s);
  };
  auto bwd = [&](const titans::BlockStackParams<double>& pp, const Mat& xx, const Mat& dy,
                 titans::BlockStackParams<double>& gr, Mat& dx) {
    auto s = st.initial_state(pp);
    typename BlockStack<double>::Cache cache;
    st.forward_train(pp, xx, s, cache);
    st.backward(pp, cache, dy, gr, dx);
  };
  const auto r = titans::gradient_check(p, x, fwd, bwd, grad_options());
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_EQ(r.checked, titans_test::expected_checked(p, x, grad_options()));
}

TEST(BlockStackGrad, MacThenMal) { stack_gradient_check({BlockKind::mac, BlockKind::mal}); }
TEST(BlockStackGrad, HybridMagSwaLmm) { stack_gradient_check({BlockKind::mag, BlockKind::swa, BlockKind::lmm}); }

// =============================================================================================
// 2–3. Causality and streaming, float and double, every kind.
// =============================================================================================

template <class S>
class BlockTyped : public ::testing::Test {
 protected:
  // Float: a five-block stack split into calls differs from one call by 3.1e-5 (relative) on an
  // AVX2 machine (Zen 3), ~250 float ulps after five memories; 1e-4 leaves room across machines.
  static constexpr double stream_tol = std::is_same_v<S, float> ? 1e-4 : 1e-12;
};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(BlockTyped, Scalars);

TYPED_TEST(BlockTyped, Causal) {
  using S = TypeParam;
  std::vector<BlockConfig> configs;
  for (BlockKind kind : kKinds) configs.push_back(small_config(kind));
  configs.push_back(mac_tokens_config(3));
  for (const BlockConfig& cfg : configs) {
    SCOPED_TRACE(config_name(cfg));
    const Block<S> blk(cfg);
    const auto p = lively(blk, 21);
    const Matrix<S> x = random_matrix<S>(kDim, kT, 22);
    auto s = blk.initial_state(p);
    const Matrix<S> y = blk.forward(p, x, s);
    for (Index t = 0; t < kT; ++t) {
      Matrix<S> x2 = x;
      x2.col(t) += random_matrix<S>(kDim, 1, 300 + static_cast<std::uint64_t>(t)).col(0);
      auto s2 = blk.initial_state(p);
      const Matrix<S> y2 = blk.forward(p, x2, s2);
      // Bit for bit: a later token's values only ever meet exact zeros (masks, triangular products).
      EXPECT_EQ(max_abs(y2.leftCols(t), y.leftCols(t)), 0.0) << "perturbing token " << t;
      EXPECT_GT(max_rel(y2.col(t), y.col(t)), 1e-3) << "perturbing token " << t;
      // ... and the mixer carries it forward to the next token (not only the per-token path).
      if (t + 1 < kT) {
        EXPECT_GT(max_rel(y2.col(t + 1), y.col(t + 1)), 1e-5) << "perturbing token " << t;
      }
    }
  }
}

TYPED_TEST(BlockTyped, StreamingSplitsAndDecodeEqualPrefill) {
  using S = TypeParam;
  const double tol = TestFixture::stream_tol;
  std::vector<BlockConfig> configs;
  for (BlockKind kind : kKinds) configs.push_back(small_config(kind));
  configs.push_back(small_config(BlockKind::mac, 2, 6));  // segment a multiple of the chunk
  configs.push_back(small_config(BlockKind::mac, 0, 1));  // one-token segments, no persistent tokens
  {
    BlockConfig c = small_config(BlockKind::mal, 0);
    c.window = 1;
    configs.push_back(c);
    c = small_config(BlockKind::mac);
    c.checkpoint_every = 2;  // training recomputation must not change forward_train's outputs
    configs.push_back(c);
  }
  // Figure 3a's memory tokens: fewer than a segment's tokens, more, and without persistent tokens.
  configs.push_back(mac_tokens_config(3));
  configs.push_back(mac_tokens_config(5, 0, 3));
  configs.push_back(mac_tokens_config(2, 1, 1));
  for (const BlockConfig& cfg : configs) {
    SCOPED_TRACE(config_name(cfg));
    const Block<S> blk(cfg);
    const auto p = lively(blk, 31);
    const Matrix<S> x = random_matrix<S>(kDim, kT, 32);
    auto s_full = blk.initial_state(p);
    const Matrix<S> y = blk.forward(p, x, s_full);
    ASSERT_EQ(s_full.position, kT);

    auto run_split = [&](const std::vector<Index>& cuts, bool train) {
      (void)train;
      auto s = blk.initial_state(p);
      Matrix<S> out(kDim, kT);
      Index from = 0;
      std::vector<Index> ends = cuts;
      ends.push_back(kT);
      for (Index to : ends) {
        // forward_train is checked in double only: instantiating the float training path
        // would add ~20% to this file's compile time for no extra logic covered.
        if constexpr (std::is_same_v<S, double>) {
          if (train) {
            titans::BlockCache<S> cache;
            out.middleCols(from, to - from) = blk.forward_train(p, x.middleCols(from, to - from), s, cache);
          } else {
            out.middleCols(from, to - from) = blk.forward(p, x.middleCols(from, to - from), s);
          }
        } else {
          out.middleCols(from, to - from) = blk.forward(p, x.middleCols(from, to - from), s);
        }
        from = to;
      }
      return std::make_pair(out, s);
    };
    auto check = [&](const std::vector<Index>& cuts, bool train) {
      const auto [out, s] = run_split(cuts, train);
      std::ostringstream what;
      what << (train ? "forward_train" : "forward") << " cut at";
      for (Index c : cuts) what << " " << c;
      EXPECT_LT(max_rel(out, y), tol) << what.str();
      const std::string d = block_state_diff(settled(cfg, s), settled(cfg, s_full), 10 * tol);
      EXPECT_TRUE(d.empty()) << what.str() << ": " << d;
    };
    for (Index a = 1; a < kT; ++a) check({a}, false);
    for (Index a = 1; a < kT; ++a)
      for (Index b = a + 1; b < kT; ++b) check({a, b}, false);
    check({2, 5, 9}, false);
    if constexpr (std::is_same_v<S, double>) {
      check({}, true);  // forward_train == forward, outputs and state
      check({2, 5, 9}, true);
      check({1, 4, 6, 7}, true);
      check({3, 4}, true);
    }

    auto s_step = blk.initial_state(p);
    Matrix<S> ys(kDim, kT);
    for (Index t = 0; t < kT; ++t) ys.col(t) = blk.step(p, x.col(t), s_step);
    EXPECT_LT(max_rel(ys, y), tol) << "token-by-token step";
    const std::string d = block_state_diff(s_step, s_full, 10 * tol);
    EXPECT_TRUE(d.empty()) << "step: " << d;

    // Zero-length calls anywhere in the stream change no output.
    auto s_empty = blk.initial_state(p);
    Matrix<S> ye(kDim, kT);
    EXPECT_EQ(blk.forward(p, x.leftCols(0), s_empty).cols(), 0);
    ye.leftCols(5) = blk.forward(p, x.leftCols(5), s_empty);
    EXPECT_EQ(blk.forward(p, x.leftCols(0), s_empty).cols(), 0);
    ye.rightCols(kT - 5) = blk.forward(p, x.rightCols(kT - 5), s_empty);
    EXPECT_LT(max_rel(ye, y), tol) << "with empty calls";
  }
}

// A zero-length call is no call: from a fresh state it must leave the state exactly as
// initial_state made it, so that training afterwards still reaches memory_init and the
// persistent tokens (Block::memory_run must not prime on an empty call).
TEST(BlockStreaming, ZeroLengthCallLeavesAFreshState) {
  for (BlockKind kind : kKinds) {
    SCOPED_TRACE(kind_name(kind));
    const Block<double> blk(small_config(kind));
    BParams<double> p = lively(blk, 35);
    Mat x = random_matrix<double>(kDim, 7, 36);
    const auto s0 = blk.initial_state(p);
    auto s = blk.initial_state(p);
    blk.forward(p, x.leftCols(0), s);
    const std::string d = block_state_diff(s, s0, 0.0);
    EXPECT_TRUE(d.empty()) << d;
    auto fwd = [&](const BParams<double>& pp, const Mat& xx) {
      auto st = blk.initial_state(pp);
      blk.forward(pp, xx.leftCols(0), st);
      return blk.forward(pp, xx, st);
    };
    auto bwd = [&](const BParams<double>& pp, const Mat& xx, const Mat& dy, BParams<double>& gr, Mat& dx) {
      auto st = blk.initial_state(pp);
      blk.forward(pp, xx.leftCols(0), st);
      titans::BlockCache<double> cache;
      blk.forward_train(pp, xx, st, cache);
      blk.backward(pp, cache, dy, gr, dx);
    };
    const auto r = titans::gradient_check(p, x, fwd, bwd, grad_options());
    EXPECT_TRUE(r.ok) << r.report();
  }
}

TYPED_TEST(BlockTyped, StackStreamsAndIsCausal) {
  using S = TypeParam;
  const double tol = TestFixture::stream_tol;
  const BlockStack<S> st(small_config(BlockKind::mac),
                         {BlockKind::mac, BlockKind::swa, BlockKind::mal, BlockKind::mag, BlockKind::lmm});
  const auto p = lively(st, 41);
  const Matrix<S> x = random_matrix<S>(kDim, kT, 42);
  auto s_full = st.initial_state(p);
  const Matrix<S> y = st.forward(p, x, s_full);
  for (const std::vector<Index>& cuts : std::vector<std::vector<Index>>{{1}, {5}, {3, 7}, {2, 6, 10}}) {
    auto s = st.initial_state(p);
    Matrix<S> out(kDim, kT);
    Index from = 0;
    std::vector<Index> ends = cuts;
    ends.push_back(kT);
    for (Index to : ends) {
      if constexpr (std::is_same_v<S, double>) {  // later calls train (double only, see above)
        typename BlockStack<S>::Cache cache;
        out.middleCols(from, to - from) = (from == 0) ? st.forward(p, x.middleCols(from, to - from), s)
                                                      : st.forward_train(p, x.middleCols(from, to - from), s, cache);
      } else {
        out.middleCols(from, to - from) = st.forward(p, x.middleCols(from, to - from), s);
      }
      from = to;
    }
    EXPECT_LT(max_rel(out, y), tol) << "first cut " << cuts[0];
    const BlockConfig c = small_config(BlockKind::mac);
    const std::string d = stack_state_diff(settled(c, s), settled(c, s_full), 10 * tol);
    EXPECT_TRUE(d.empty()) << d;
  }
  auto s_step = st.initial_state(p);
  Matrix<S> ys(kDim, kT);
  for (Index t = 0; t < kT; ++t) ys.col(t) = st.step(p, x.col(t), s_step);
  EXPECT_LT(max_rel(ys, y), tol);
  for (Index t : {0, 4, 7}) {
    Matrix<S> x2 = x;
    x2.col(t).array() += S(0.5);
    auto s2 = st.initial_state(p);
    const Matrix<S> y2 = st.forward(p, x2, s2);
    EXPECT_EQ(max_abs(y2.leftCols(t), y.leftCols(t)), 0.0) << t;
    EXPECT_GT(max_rel(y2.col(t + 1), y.col(t + 1)), 1e-5) << t;
  }
}

// =============================================================================================
// 4. Every block against the independent formulation; MAC's retrieval and its choices.
// =============================================================================================

TEST(BlockReference, EveryKindMatchesItsDefinition) {
  struct Cfg {
    BlockKind kind;
    Index persistent, segment, T;
    Index memory_tokens = 0;
  };
  for (const Cfg& k : {Cfg{BlockKind::mac, 2, 4, kT}, Cfg{BlockKind::mac, 2, 6, 13}, Cfg{BlockKind::mac, 0, 3, kT},
                       Cfg{BlockKind::mac, 1, 5, 12}, Cfg{BlockKind::mac, 3, 1, 5}, Cfg{BlockKind::lmm, 2, 4, kT},
                       Cfg{BlockKind::lmm, 0, 4, kT}, Cfg{BlockKind::mag, 2, 4, kT}, Cfg{BlockKind::mag, 0, 4, kT},
                       Cfg{BlockKind::mal, 2, 4, kT}, Cfg{BlockKind::mal, 0, 4, kT}, Cfg{BlockKind::swa, 2, 4, kT},
                       Cfg{BlockKind::swa, 0, 4, kT}, Cfg{BlockKind::mac, 2, 4, kT, 3}, Cfg{BlockKind::mac, 0, 3, kT, 5},
                       Cfg{BlockKind::mac, 1, 5, 12, 2}, Cfg{BlockKind::mac, 2, 1, 5, 1}}) {
    BlockConfig cfg = small_config(k.kind, k.persistent, k.segment);
    cfg.memory_tokens = k.memory_tokens;
    SCOPED_TRACE(config_name(cfg) + " T " + std::to_string(k.T));
    const Block<double> blk(cfg);
    const auto p = lively(blk, 51);
    const Mat x = random_matrix<double>(kDim, k.T, 52);
    auto s = blk.initial_state(p);
    const Mat y = blk.forward(p, x, s);
    const Mat ref = reference_block(cfg, p, x);
    EXPECT_LT(max_rel(y, ref), 1e-12);
    // The mixer is not negligible next to the residual stream (else the comparison says little).
    EXPECT_GT(max_rel(x, ref), 1e-2);
  }
}

TEST(BlockReference, MacChoicesAreDistinguishable) {
  // The comparison above can tell MAC's documented choices from plausible alternatives: each
  // wrong variant of the reference is far from the block.
  const BlockConfig cfg = small_config(BlockKind::mac, 2, 4);
  const Block<double> blk(cfg);
  const auto p = lively(blk, 61);
  const Mat x = random_matrix<double>(kDim, kT, 62);
  auto s = blk.initial_state(p);
  const Mat y = blk.forward(p, x, s);
  EXPECT_LT(max_rel(y, reference_block(cfg, p, x)), 1e-12);
  MacVariant from_init, all_h, absolute;
  from_init.retrieve_from_init = true;
  all_h.see_all_h = true;
  absolute.absolute_rope = true;
  EXPECT_GT(max_rel(y, reference_block(cfg, p, x, from_init)), 1e-6) << "retrieval from Θ_init";
  EXPECT_GT(max_rel(y, reference_block(cfg, p, x, all_h)), 1e-6) << "non-causal over h";
  EXPECT_GT(max_rel(y, reference_block(cfg, p, x, absolute)), 1e-6) << "absolute rotary positions";
  // Retrieval from Θ_init only differs from the first segment on: the first segment agrees.
  EXPECT_LT(max_rel(y.leftCols(cfg.segment), reference_block(cfg, p, x, from_init).leftCols(cfg.segment)), 1e-12);

  // Figure 3a's form: the same for the retrieval, and every query sees all N_l memory tokens
  // (a causal mask over them is another block).
  const BlockConfig tcfg = mac_tokens_config(3);
  const Block<double> tblk(tcfg);
  const auto tp = lively(tblk, 63);
  auto ts = tblk.initial_state(tp);
  const Mat ty = tblk.forward(tp, x, ts);
  EXPECT_LT(max_rel(ty, reference_block(tcfg, tp, x)), 1e-12);
  MacVariant causal_tokens;
  causal_tokens.causal_memory_tokens = true;
  EXPECT_GT(max_rel(ty, reference_block(tcfg, tp, x, from_init)), 1e-6) << "memory tokens from Θ_init";
  EXPECT_GT(max_rel(ty, reference_block(tcfg, tp, x, absolute)), 1e-6) << "absolute rotary positions";
  EXPECT_GT(max_rel(ty.col(0), reference_block(tcfg, tp, x, causal_tokens).col(0)), 1e-6) << "causal over h";
  EXPECT_LT(max_rel(ty.leftCols(tcfg.segment), reference_block(tcfg, tp, x, from_init).leftCols(tcfg.segment)), 1e-12);
}

TEST(BlockMac, NextSegmentReadsTheMemoryOfThePreviousOne) {
  for (const BlockConfig& cfg : {small_config(BlockKind::mac, 2, 4), small_config(BlockKind::mac, 2, 6),
                                 mac_tokens_config(3, 2, 4), mac_tokens_config(2, 0, 6)}) {
    const Index C = cfg.segment;
    SCOPED_TRACE(config_name(cfg));
    const Block<double> blk(cfg);
    auto p = lively(blk, 71);
    const Mat x = random_matrix<double>(kDim, kT, 72);
    Mat x2 = x;
    x2.col(0) += random_matrix<double>(kDim, 1, 73).col(0);
    auto run = [&](const BParams<double>& pp, const Mat& xx) {
      auto s = blk.initial_state(pp);
      return blk.forward(pp, xx, s);
    };
    // Token C attends only to segment 1 (and the persistent tokens); token 0 still reaches it
    // through the memory.
    EXPECT_GT(max_rel(run(p, x2).col(C), run(p, x).col(C)), 1e-6);
    // With W_O of the memory layer zeroed, z ≡ 0 and the gate is a constant ½: the memory's own
    // output path is cut, and only the retrieval h (from the memory written by segment 0) can
    // carry token 0 to token C.
    p.memory.w_out.setZero();
    EXPECT_GT(max_rel(run(p, x2).col(C), run(p, x).col(C)), 1e-6);
    // Control: with the retrieval gain also zeroed nothing reaches token C from segment 0.
    p.retrieve_gain.setZero();
    EXPECT_EQ(max_abs(run(p, x2).rightCols(kT - C), run(p, x).rightCols(kT - C)), 0.0);
    EXPECT_GT(max_rel(run(p, x2).col(C - 1), run(p, x).col(C - 1)), 1e-6);  // attention within segment 0
  }
}

// Figure 3a: the first token of a segment already sees every one of the N_l memory tokens (in the
// interleaved form it sees only its own h_1). The second call below starts at a segment boundary
// from the same carried state, so a changed learned query reaches its first token only through
// that segment's memory tokens in the attention.
TEST(BlockMac, FirstTokenOfASegmentSeesEveryMemoryToken) {
  for (Index nl : {3, 6}) {  // fewer and more memory tokens than the segment's 4 tokens
    SCOPED_TRACE("memory_tokens " + std::to_string(nl));
    const BlockConfig cfg = mac_tokens_config(nl);
    const Block<double> blk(cfg);
    const auto p = lively(blk, 75);
    const Index C = cfg.segment;
    const Mat x = random_matrix<double>(kDim, kT, 76);
    auto s0 = blk.initial_state(p);
    const Mat y0 = blk.forward(p, x.leftCols(C), s0);
    const auto carried = s0;
    const Mat y1 = blk.forward(p, x.rightCols(kT - C), s0);
    for (Index i = 0; i < nl; ++i) {
      auto p2 = p;
      p2.retrieve_queries.col(i) += random_matrix<double>(kDim, 1, 77 + static_cast<std::uint64_t>(i)).col(0);
      auto s = blk.initial_state(p2);
      EXPECT_GT(max_rel(blk.forward(p2, x.leftCols(C), s).col(0), y0.col(0)), 1e-6)
          << "token 0 does not see memory token " << i;
      auto s2 = carried;
      EXPECT_GT(max_rel(blk.forward(p2, x.rightCols(kT - C), s2).col(0), y1.col(0)), 1e-6)
          << "token " << C << " does not see memory token " << i;
    }
  }
}

// =============================================================================================
// 5. What the window and the persistent tokens reach.
// =============================================================================================

TEST(BlockWindow, SwaSeesOnlyTheWindowMagAndMalSeeFurtherThroughMemory) {
  for (Index np : {2, 0}) {
    for (BlockKind kind : {BlockKind::swa, BlockKind::mag, BlockKind::mal}) {
      SCOPED_TRACE(kind_name(kind) + " persistent " + std::to_string(np));
      const BlockConfig cfg = small_config(kind, np);
      const Index w = cfg.window;
      const Block<double> blk(cfg);
      const auto p = lively(blk, 81);
      const Mat x = random_matrix<double>(kDim, kT, 82);
      auto s = blk.initial_state(p);
      const Mat y = blk.forward(p, x, s);
      for (Index j = 0; j < kT; ++j) {
        Mat x2 = x;
        x2.col(j) += random_matrix<double>(kDim, 1, 400 + static_cast<std::uint64_t>(j)).col(0);
        auto s2 = blk.initial_state(p);
        const Mat y2 = blk.forward(p, x2, s2);
        for (Index t = j; t < kT; ++t) {
          const double change = max_rel(y2.col(t), y.col(t));
          if (t - j <= w - 1) {
            EXPECT_GT(change, 1e-6) << "token " << j << " inside the window of " << t;
          } else if (kind == BlockKind::swa) {
            EXPECT_EQ(change, 0.0) << "token " << j << " is more than w - 1 before " << t;
          } else {
            EXPECT_GT(change, 1e-9) << "token " << j << " should reach " << t << " through the memory";
          }
        }
      }
    }
  }
}

TEST(BlockPersistent, EveryQuerySeesThePersistentTokens) {
  for (BlockKind kind : kKinds) {
    SCOPED_TRACE(kind_name(kind));
    const Block<double> blk(small_config(kind));
    auto p = lively(blk, 91);
    const Mat x = random_matrix<double>(kDim, kT, 92);
    auto s = blk.initial_state(p);
    const Mat y = blk.forward(p, x, s);
    for (Index r = 0; r < p.persistent.cols(); ++r) {
      auto p2 = p;
      p2.persistent.col(r) += random_matrix<double>(kDim, 1, 93 + static_cast<std::uint64_t>(r)).col(0);
      auto s2 = blk.initial_state(p2);
      const Mat y2 = blk.forward(p2, x, s2);
      for (Index t = 0; t < kT; ++t) EXPECT_GT(max_rel(y2.col(t), y.col(t)), 1e-6) << "persistent " << r << ", token " << t;
    }
  }
}

// =============================================================================================
// 6. Bad configurations and arguments.
// =============================================================================================

template <class E, class F>
void expect_throw_naming(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an exception naming '" << needle << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(BlockErrors, BadConfigThrowsNamingTheField) {
  using titans::InvalidArgument;
  for (BlockKind kind : {BlockKind::mag, BlockKind::mal, BlockKind::swa}) {
    for (Index w : {0, -1}) {
      BlockConfig c = small_config(kind);
      c.window = w;
      expect_throw_naming<InvalidArgument>([&] { Block<double>{c}; }, "window");
    }
  }
  for (BlockKind kind : {BlockKind::lmm, BlockKind::mac}) {
    BlockConfig c = small_config(kind);
    c.checkpoint_every = 0;
    expect_throw_naming<InvalidArgument>([&] { Block<double>{c}; }, "checkpoint_every");
  }
  for (Index seg : {0, -3}) {
    BlockConfig c = small_config(BlockKind::mac);
    c.segment = seg;
    expect_throw_naming<InvalidArgument>([&] { Block<double>{c}; }, "segment");
  }
  for (BlockKind kind : kKinds) {
    SCOPED_TRACE(kind_name(kind));
    BlockConfig c = small_config(kind);
    c.persistent = -1;
    expect_throw_naming<InvalidArgument>([&] { Block<double>{c}; }, "persistent");
    if (kind != BlockKind::swa) {
      c = small_config(kind);
      c.memory.dim = 4;
      c.memory.heads = 1;
      expect_throw_naming<InvalidArgument>([&] { Block<double>{c}; }, "memory.dim");
    }
    if (kind != BlockKind::lmm) {
      c = small_config(kind);
      c.attention_heads = 3;
      expect_throw_naming<InvalidArgument>([&] { Block<double>{c}; }, "attention_heads");
      c = small_config(kind);
      c.dim = 6;
      c.memory.dim = 6;
      c.attention_heads = 2;  // head width 3: no rotary pairs
      expect_throw_naming<InvalidArgument>([&] { Block<double>{c}; }, "odd");
      c.attention_heads = 0;
      expect_throw_naming<InvalidArgument>([&] { Block<double>{c}; }, "attention_heads");
    }
  }
  {
    BlockConfig a = small_config(BlockKind::mac), b = small_config(BlockKind::mal);
    b.dim = 16;
    b.memory.dim = 16;
    expect_throw_naming<InvalidArgument>([&] { BlockStack<double>({a, b}); }, "dim");
    expect_throw_naming<InvalidArgument>([&] { BlockStack<double>(std::vector<BlockConfig>{}); }, "at least one");
  }
  expect_throw_naming<InvalidArgument>([] { titans::block_kind_from_string("xyz"); }, "xyz");
  for (BlockKind k : kKinds) EXPECT_EQ(titans::block_kind_from_string(titans::to_string(k)), k);
  // memory_tokens (N_l): range-checked for every kind, used by MAC only ([choice], blocks.hpp).
  for (BlockKind kind : kKinds) {
    SCOPED_TRACE(kind_name(kind));
    for (Index bad : {Index(-1), titans::limits::memory_tokens + 1}) {
      BlockConfig c = small_config(kind);
      c.memory_tokens = bad;
      expect_throw_naming<InvalidArgument>([&] { Block<double>{c}; }, "memory_tokens (N_l) is " + std::to_string(bad));
    }
    BlockConfig c = small_config(kind);
    c.memory_tokens = 3;
    const Block<double> with(c), without(small_config(kind));
    EXPECT_EQ(with.parameter_count() != without.parameter_count(), kind == BlockKind::mac);
    EXPECT_EQ(titans::parameter_names(with.init(1)) != titans::parameter_names(without.init(1)), kind == BlockKind::mac);
  }
}

// The params of one MAC form do not fit the other, nor another N_l: ShapeError naming the tensor.
TEST(BlockErrors, MemoryTokenParamsAreChecked) {
  const Block<double> interleaved(small_config(BlockKind::mac)), three(mac_tokens_config(3)), four(mac_tokens_config(4));
  const Mat x = random_matrix<double>(kDim, 3, 4);
  auto s = three.initial_state(three.init(1));
  expect_throw_naming<titans::ShapeError>([&] { three.forward(interleaved.init(1), x, s); },
                                          "memory_tokens = 3: they have retrieve.w, the block needs retrieve.queries");
  auto si = interleaved.initial_state(interleaved.init(1));
  expect_throw_naming<titans::ShapeError>([&] { interleaved.forward(three.init(1), x, si); },
                                          "they have retrieve.queries, the block needs retrieve.w");
  expect_throw_naming<titans::ShapeError>([&] { three.forward(four.init(1), x, s); },
                                          "params.retrieve_queries (retrieve.queries) has shape (8, 4), expected (8, 3)");
  auto p = three.init(1);
  EXPECT_EQ(p.retrieve_queries.rows(), kDim);
  EXPECT_EQ(p.retrieve_queries.cols(), 3);
  EXPECT_EQ(p.retrieve_w.size(), 0) << "the Figure 3a form has no retrieval projection";
  EXPECT_EQ(titans::parameter_count(p), three.parameter_count());
  EXPECT_EQ(titans::parameter_count(interleaved.init(1)), interleaved.parameter_count());
  // A state of one form is not a state of the other: the KV cache holds 2 keys per token, or 1.
  auto sp = interleaved.initial_state(interleaved.init(1));
  interleaved.forward(interleaved.init(1), x.leftCols(2), sp);
  expect_throw_naming<titans::InvalidArgument>([&] { three.check_state(sp); }, "holds 4 keys at position 2");
  EXPECT_NO_THROW(three.forward(p, x, s));
  EXPECT_EQ(s.attention.k.cols(), 3);
}

TEST(BlockErrors, BadArgumentsThrow) {
  for (BlockKind kind : kKinds) {
    SCOPED_TRACE(kind_name(kind));
    const Block<double> blk(small_config(kind));
    const auto p = blk.init(1);
    auto s = blk.initial_state(p);
    titans::BlockCache<double> cache;
    const Mat bad_rows = random_matrix<double>(kDim - 1, 3, 2);
    EXPECT_THROW(blk.forward(p, bad_rows, s), titans::ShapeError);
    EXPECT_THROW(blk.forward_train(p, bad_rows, s, cache), titans::ShapeError);
    Mat nan = random_matrix<double>(kDim, 3, 3);
    nan(2, 1) = std::numeric_limits<double>::quiet_NaN();
    EXPECT_THROW(blk.forward(p, nan, s), titans::NumericError);
    nan(2, 1) = std::numeric_limits<double>::infinity();
    EXPECT_THROW(blk.forward(p, nan, s), titans::NumericError);
    EXPECT_EQ(s.position, 0) << "a rejected call must not advance the state";
    for (BlockKind other : kKinds) {
      if (other == kind) continue;
      const Block<double> ob(small_config(other));
      const auto op = ob.init(1);
      expect_throw_naming<titans::ShapeError>([&] { blk.forward(op, random_matrix<double>(kDim, 3, 4), s); },
                                              kind_name(kind));
    }
    auto wrong = p;
    wrong.ffn_w2.resize(kDim, 5);
    expect_throw_naming<titans::ShapeError>([&] { blk.forward(wrong, random_matrix<double>(kDim, 3, 4), s); },
                                            "ffn_w2");
    // A good call still works on the untouched state.
    EXPECT_NO_THROW(blk.forward(p, random_matrix<double>(kDim, 3, 4), s));
    // backward with a mismatched dout.
    auto s2 = blk.initial_state(p);
    blk.forward_train(p, random_matrix<double>(kDim, 4, 5), s2, cache);
    auto g = titans::zeros_like(p);
    Mat dx = Mat::Zero(kDim, 4);
    EXPECT_THROW(blk.backward(p, cache, Mat::Zero(kDim, 3), g, dx), titans::ShapeError);
  }
  const BlockStack<double> st(small_config(BlockKind::mac), {BlockKind::mac, BlockKind::swa});
  auto sp = st.init(1);
  auto ss = st.initial_state(sp);
  EXPECT_THROW(st.forward(sp, random_matrix<double>(kDim + 1, 2, 1), ss), titans::ShapeError);
  auto short_params = sp;
  short_params.blocks.pop_back();
  EXPECT_THROW(st.forward(short_params, random_matrix<double>(kDim, 2, 1), ss), titans::ShapeError);
}

// A NaN in any parameter (a diverged outer training, a bad file) is reported as that parameter,
// by name, whichever path it poisons; parameters are scanned only when something went wrong.
TEST(BlockErrors, NonFiniteParameterIsNamed) {
  const Mat x = random_matrix<double>(kDim, 5, 6);
  std::vector<BlockConfig> configs;
  for (BlockKind kind : kKinds) configs.push_back(small_config(kind));
  configs.push_back(mac_tokens_config(3));  // retrieve.queries
  for (const BlockConfig& cfg : configs) {
    SCOPED_TRACE(config_name(cfg));
    const Block<double> blk(cfg);
    const auto p = blk.init(1);
    std::vector<std::string> names;
    p.for_each([&](const std::string& n, const auto& t) {
      if (t.size() > 0) names.push_back(n);
    });
    for (const std::string& name : names) {
      auto bad = p;
      bad.for_each([&](const std::string& n, auto& t) {
        if (n == name) t(t.rows() - 1, 0) = std::numeric_limits<double>::quiet_NaN();
      });
      auto s = blk.initial_state(bad);
      expect_throw_naming<titans::NumericError>([&] { blk.forward(bad, x, s); }, "parameter '" + name + "'");
      auto s2 = blk.initial_state(bad);
      titans::BlockCache<double> cache;
      expect_throw_naming<titans::NumericError>([&] { blk.forward_train(bad, x, s2, cache); },
                                                "parameter '" + name + "'");
    }
  }
}

// A memory state that is no longer finite (its test-time updates diverged at the end of an
// earlier call or segment, while that call's reads were still finite) is reported as a divergence
// by every kind with a memory, MAC's retrieval included, not as a bad input of a later stage.
TEST(BlockErrors, DivergedMemoryStateIsReportedAsSuch) {
  const Mat x = random_matrix<double>(kDim, 5, 8);
  for (const BlockConfig& cfg : {small_config(BlockKind::lmm), small_config(BlockKind::mac), mac_tokens_config(3),
                                 small_config(BlockKind::mag), small_config(BlockKind::mal)}) {
    SCOPED_TRACE(config_name(cfg));
    const Block<double> blk(cfg);
    const auto p = blk.init(1);
    auto s = blk.initial_state(p);
    s.memory.heads[1].weights[0](0, 0) = std::numeric_limits<double>::infinity();
    expect_throw_naming<titans::NumericError>([&] { blk.forward(p, x, s); }, "diverged");
    if (cfg.kind != BlockKind::mac) continue;
    // MAC at a segment boundary: the next segment reads the diverged state (its snapshot) before
    // the memory layer runs again.
    auto s2 = blk.initial_state(p);
    blk.forward(p, x.leftCols(4), s2);  // one whole segment
    s2.snapshot[1][0](0, 0) = std::numeric_limits<double>::infinity();
    expect_throw_naming<titans::NumericError>([&] { blk.forward(p, x, s2); }, "diverged");
  }
}

// Finite parameters that overflow float are reported as an overflow, not as a bad parameter.
TEST(BlockErrors, FloatOverflowIsReported) {
  const Block<float> blk(small_config(BlockKind::swa));
  auto p = blk.init(1);
  p.ffn_w1 *= 1e20f;  // SwiGLU products of order 1e38 and more: inf in float
  p.ffn_w3 *= 1e20f;
  auto s = blk.initial_state(p);
  const titans::Matrix<float> x = random_matrix<float>(kDim, 5, 7);
  expect_throw_naming<titans::NumericError>([&] { blk.forward(p, x, s); }, "overflow");
}

// =============================================================================================
// 7. Batches: sequences never share state.
// =============================================================================================

TEST(BlockBatch, SequencesDoNotShareState) {
  for (BlockKind kind : kKinds) {
    SCOPED_TRACE(kind_name(kind));
    const Block<double> blk(small_config(kind));
    const auto p = lively(blk, 101);
    const std::vector<Mat> xs = {random_matrix<double>(kDim, kT, 1), random_matrix<double>(kDim, 5, 2),
                                 random_matrix<double>(kDim, 7, 3), random_matrix<double>(kDim, kT, 1)};
    std::vector<BState<double>> states(xs.size(), blk.initial_state(p));
    const auto ys = blk.forward_batch(p, xs, states);
    ASSERT_EQ(ys.size(), xs.size());
    std::vector<BState<double>> alone(xs.size(), blk.initial_state(p));
    for (std::size_t i = 0; i < xs.size(); ++i) {
      EXPECT_EQ(ys[i], blk.forward(p, xs[i], alone[i])) << i;
      EXPECT_TRUE(block_state_diff(states[i], alone[i], 0.0).empty()) << i;
    }
    EXPECT_EQ(ys[0], ys[3]);
    // A second batch call continues each sequence's own state.
    const std::vector<Mat> more = {random_matrix<double>(kDim, 3, 11), random_matrix<double>(kDim, 6, 12),
                                   random_matrix<double>(kDim, 2, 13), random_matrix<double>(kDim, 3, 14)};
    const auto ys2 = blk.forward_batch(p, more, states);
    for (std::size_t i = 0; i < xs.size(); ++i) EXPECT_EQ(ys2[i], blk.forward(p, more[i], alone[i])) << i;
    EXPECT_NE(ys2[0], ys2[3]);  // same history, different new tokens
    std::vector<BState<double>> too_few(2, blk.initial_state(p));
    EXPECT_THROW(blk.forward_batch(p, xs, too_few), titans::InvalidArgument);
  }
}

}  // namespace
