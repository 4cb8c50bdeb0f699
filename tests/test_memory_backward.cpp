// SPDX-License-Identifier: Apache-2.0
// The memory kernel's backward pass (through the test-time updates) against forward-mode
// derivatives of the literal chunk/token loop, central finite differences of the library's own
// forward, streaming splits with the state gradient carried between calls, checkpointing, the
// += contract and bad input.
#include <titans/memory/backward.hpp>
#include <titans/parameters.hpp>

#include <gtest/gtest.h>

#include "support/autodiff_reference.hpp"
#include "support/memory_forms.hpp"
#include "support/memory_problem.hpp"

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

namespace {

using titans::Activation;
using titans::Index;
using titans::MemoryConfig;
using titans::MemoryState;
template <class S>
using Mat = titans::Matrix<S>;
template <class S>
using Vec = titans::Vector<S>;
using titans_test::Dual;

using Problem = titans_test::MemoryProblem;

Problem make_problem(Index d, Index T, std::uint64_t seed, int gate_mode = 0) {
  return titans_test::make_memory_problem(d, T, seed, gate_mode, 0.02);
}

// memory_forward, then the state's settled form (docs/MATH.md §3.3): the form the training
// forward leaves and the backward's dinitial and dfinal refer to.
template <class S>
Mat<S> forward_settled(const MemoryConfig& cfg, Index b, const titans::KernelInputs<S>& in, MemoryState<S>& st) {
  Mat<S> y = titans::memory_forward<S>(cfg, b, in, st);
  titans::memory_state_settle(cfg, b, st);
  return y;
}

// A state `prefix` tokens into a stream (non-zero momentum; chunk_start set when inside a chunk).
MemoryState<double> make_state(const MemoryConfig& cfg, Index b, Index prefix, std::uint64_t seed) {
  auto st = titans::make_memory_state(cfg, titans::init_memory_weights<double>(cfg, seed));
  Problem pre = make_problem(cfg.dim, prefix, seed + 1000);
  titans_test::scale_steps_for_bias(cfg, pre);
  titans_test::calibrate_threshold(cfg, st.weights, pre);
  forward_settled<double>(cfg, b, pre, st);
  return st;
}

// The probe defining the scalar loss J = <G, Y> + Σ_l <G_W, W_final> + <G_S, S_final> + <G_C, C_final>.
struct Probe {
  Mat<double> gy;
  MemoryState<double> gfinal;  // weights, momentum, chunk_start (when the call ends inside a chunk)
};

Probe make_probe(const MemoryConfig& cfg, Index T, bool ends_inside, std::uint64_t seed) {
  titans::detail::Rng rng(seed);
  Probe p;
  p.gy.resize(cfg.dim, T);
  rng.fill_normal(p.gy, 1.0);
  for (Index l = 0; l < cfg.depth; ++l) {
    for (auto* v : {&p.gfinal.weights, &p.gfinal.momentum}) {
      v->push_back(Mat<double>(cfg.layer_out(l), cfg.layer_in(l)));
      rng.fill_normal(v->back(), 1.0);
    }
    if (ends_inside) {
      p.gfinal.chunk_start.push_back(Mat<double>(cfg.layer_out(l), cfg.layer_in(l)));
      rng.fill_normal(p.gfinal.chunk_start.back(), 1.0);
    }
  }
  return p;
}

double loss(const Probe& pr, const Mat<double>& y, const MemoryState<double>& fin) {
  double j = pr.gy.cwiseProduct(y).sum();
  for (std::size_t l = 0; l < fin.weights.size(); ++l) {
    j += pr.gfinal.weights[l].cwiseProduct(fin.weights[l]).sum();
    j += pr.gfinal.momentum[l].cwiseProduct(fin.momentum[l]).sum();
    if (!pr.gfinal.chunk_start.empty()) j += pr.gfinal.chunk_start[l].cwiseProduct(fin.chunk_start[l]).sum();
  }
  return j;
}

// Library forward_train + backward for one call; returns the gradients.
titans::MemoryKernelGradients<double> backward_of(const MemoryConfig& cfg, Index b, const Problem& p,
                                                  const MemoryState<double>& st0, const Probe& pr, Index r = 1) {
  auto st = st0;
  titans::MemoryForwardCache<double> cache;
  titans::MemoryTrainOptions opt;
  opt.checkpoint_every = r;
  titans::memory_forward_train<double>(cfg, b, p, st, cache, opt);
  auto g = titans::make_kernel_gradients(cache);
  titans::memory_backward<double>(cache, pr.gy, pr.gfinal, g);
  return g;
}

double max_rel(const Mat<double>& a, const Mat<double>& b) {
  const double scale = std::max({1e-300, a.cwiseAbs().maxCoeff(), b.cwiseAbs().maxCoeff()});
  return (a - b).cwiseAbs().maxCoeff() / scale;
}

// Worst relative difference over every tensor of two gradient sets of the same layout.
double grads_rel(const titans::MemoryKernelGradients<double>& a, const titans::MemoryKernelGradients<double>& b) {
  double worst = 0;
  std::vector<Mat<double>> la, lb;
  a.for_each([&](const std::string&, const auto& t) { la.push_back(t); });
  b.for_each([&](const std::string&, const auto& t) { lb.push_back(t); });
  EXPECT_EQ(la.size(), lb.size());
  for (std::size_t i = 0; i < std::min(la.size(), lb.size()); ++i) {
    EXPECT_EQ(la[i].rows(), lb[i].rows());
    EXPECT_EQ(la[i].cols(), lb[i].cols());
    if (la[i].size() > 0 && la[i].rows() == lb[i].rows() && la[i].cols() == lb[i].cols())
      worst = std::max(worst, max_rel(la[i], lb[i]));
  }
  return worst;
}

// ---------------------------------------------------------------------------------------------
// Forward-mode derivative of the literal loop == <direction, backward's gradient>.
// ---------------------------------------------------------------------------------------------

// Start/end placement of the call relative to chunk boundaries.
enum Placement { kBoundaryToBoundary, kBoundaryToInside, kInsideToInside, kInsideToBoundary };

using titans::AttentionalBias;
using AdCase = std::tuple<Index /*L*/, Activation, int /*form*/, Index /*b*/, int /*gates*/, int /*placement*/,
                          AttentionalBias>;

std::string ad_case_name(const AdCase& c) {
  static const char* placements[] = {"boundary_boundary", "boundary_inside", "inside_inside", "inside_boundary"};
  const AttentionalBias bias = std::get<6>(c);
  return "L" + std::to_string(std::get<0>(c)) + "_" + titans::to_string(std::get<1>(c)) + "_" +
         titans_test::form_name(std::get<2>(c)) + "_b" + std::to_string(std::get<3>(c)) +
         (std::get<4>(c) ? "_extreme_" : "_") + placements[std::get<5>(c)] +
         (bias == AttentionalBias::l2 ? "" : std::string("_") + titans::to_string(bias));
}

class BackwardVsForwardMode : public ::testing::TestWithParam<AdCase> {};

TEST_P(BackwardVsForwardMode, DirectionalDerivativesAgree) {
  const auto [L, act, form, b, gates, placement, bias] = GetParam();
  MemoryConfig cfg;
  cfg.dim = 4;
  cfg.depth = L;
  cfg.expansion = 2;
  cfg.activation = act;
  titans_test::apply_form(cfg, form);
  titans_test::apply_bias(cfg, bias);
  const bool start_inside = placement == kInsideToInside || placement == kInsideToBoundary;
  const bool want_end_inside = placement == kBoundaryToInside || placement == kInsideToInside;
  const Index prefix = start_inside ? (placement == kInsideToInside ? 2 * b - 1 : b + 1) : b;
  Index T = 13;
  if (b > 1)
    while ((((prefix + T) % b) != 0) != want_end_inside) --T;
  const bool ends_inside = (prefix + T) % b != 0;
  const std::uint64_t seed = static_cast<std::uint64_t>(L * 1000 + b * 100 + gates * 10 + placement) +
                             static_cast<std::uint64_t>(form) * 7 + static_cast<std::uint64_t>(act) * 50000;
  Problem p = make_problem(cfg.dim, T, seed, gates);
  titans_test::scale_steps_for_bias(cfg, p);
  const MemoryState<double> st0 = make_state(cfg, b, prefix, seed + 1);
  titans_test::calibrate_threshold(cfg, st0.weights, p);
  titans_test::calibrate_clamp(cfg, st0.weights, p);
  ASSERT_EQ(st0.chunk_start.empty(), prefix % b == 0);
  const Probe pr = make_probe(cfg, T, ends_inside, seed + 2);
  const auto g = backward_of(cfg, b, p, st0, pr);
  auto st_lib = st0;
  const double j_lib =
      loss(pr, forward_settled<double>(cfg, b, p, st_lib), st_lib);

  // Directions: one over every input at once, then one per input tensor.
  titans::detail::Rng rng(seed + 3);
  for (int which = -1; which < 11; ++which) {
    if (which == 8 && st0.chunk_start.empty()) continue;
    if (which == 9 && !cfg.output_norm) continue;
    if (which == 10 && !titans::uses_threshold(cfg.bias)) continue;
    auto on = [&](int id) { return which < 0 || which == id; };
    auto dir_mat = [&](Index r, Index c, int id) {
      Mat<double> m = Mat<double>::Zero(r, c);
      if (on(id)) rng.fill_normal(m, 1.0);
      return m;
    };
    auto dual = [](const Mat<double>& val, const Mat<double>& dir) {
      titans_test::Mat<Dual> out(val.rows(), val.cols());
      for (Index i = 0; i < val.size(); ++i) out(i) = Dual(val(i), dir(i));
      return out;
    };
    double predicted = 0, scale = 0;
    auto add = [&](const Mat<double>& dir, const Mat<double>& grad) {
      predicted += dir.cwiseProduct(grad).sum();
      scale += dir.cwiseProduct(grad).cwiseAbs().sum();
    };
    const Mat<double> dk = dir_mat(cfg.dim, T, 0), dv = dir_mat(cfg.dim, T, 1), dq = dir_mat(cfg.dim, T, 2);
    const Mat<double> da = dir_mat(T, 1, 3), de = dir_mat(T, 1, 4), dt = dir_mat(T, 1, 5);
    const Mat<double> dg = dir_mat(cfg.dim, 1, 9);
    const Mat<double> dthr = dir_mat(p.threshold.size(), 1, 10);
    add(dk, g.inputs.k);
    add(dv, g.inputs.v);
    add(dq, g.inputs.q);
    add(da, g.inputs.alpha);
    add(de, g.inputs.eta);
    add(dt, g.inputs.theta);
    if (cfg.output_norm) add(dg, g.inputs.gain);
    if (titans::uses_threshold(cfg.bias)) add(dthr, g.inputs.threshold);
    std::vector<titans_test::Mat<Dual>> w, s, c;
    for (Index l = 0; l < L; ++l) {
      const Mat<double> dw = dir_mat(cfg.layer_out(l), cfg.layer_in(l), 6);
      const Mat<double> ds = dir_mat(cfg.layer_out(l), cfg.layer_in(l), 7);
      w.push_back(dual(st0.weights[l], dw));
      s.push_back(dual(st0.momentum[l], ds));
      add(dw, g.state.weights[l]);
      add(ds, g.state.momentum[l]);
      if (!st0.chunk_start.empty()) {
        const Mat<double> dc = dir_mat(cfg.layer_out(l), cfg.layer_in(l), 8);
        c.push_back(dual(st0.chunk_start[l], dc));
        add(dc, g.state.chunk_start[l]);
      }
    }
    const titans_test::RefInputs<Dual> in{dual(p.k, dk),     dual(p.v, dv),   dual(p.q, dq),    dual(p.alpha, da),
                                          dual(p.eta, de), dual(p.theta, dt), dual(p.gain, dg),
                                          dual(p.threshold, dthr)};
    const auto ref = titans_test::ref_chunk_loop<Dual>(cfg, b, st0.position, in, w, s, c);
    ASSERT_EQ(ref.c.empty(), !ends_inside);
    Dual j = 0;
    for (Index i = 0; i < pr.gy.size(); ++i) j += Dual(pr.gy(i)) * ref.y(i);
    for (Index l = 0; l < L; ++l) {
      for (Index i = 0; i < ref.w[l].size(); ++i) {
        j += Dual(pr.gfinal.weights[l](i)) * ref.w[l](i);
        j += Dual(pr.gfinal.momentum[l](i)) * ref.s[l](i);
        if (ends_inside) j += Dual(pr.gfinal.chunk_start[l](i)) * ref.c[l](i);
      }
    }
    ASSERT_TRUE(std::isfinite(j.d) && std::isfinite(predicted)) << j.v << " " << j.d << " " << predicted;
    // The loop's value is the kernel's (the reference itself is right, mid-chunk starts included).
    EXPECT_NEAR(j.v, j_lib, 1e-10 * std::max(1.0, std::abs(j_lib)));
    // The huber threshold's gradient (direction 10) vanishes where the clamp acts on every
    // ‖r‖ > δ token (the clamped step θc·u/‖u‖ does not depend on u's scale): then both are rounding.
    EXPECT_LE(std::abs(j.d - predicted), 1e-10 * std::max(scale, which == 10 ? 1e-4 : 1e-12))
        << "direction " << which << ": forward mode " << j.d << ", backward " << predicted << " (T " << T
        << ", start " << st0.position << ")";
    // The direction must actually move J (otherwise the comparison proves nothing).
    if (which < 0) {
      EXPECT_GT(scale, 1e-6);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Memory, BackwardVsForwardMode,
    ::testing::Combine(::testing::Values<Index>(1, 2, 3),
                       ::testing::Values(Activation::silu, Activation::gelu, Activation::identity),
                       ::testing::Range(0, titans_test::kMemoryFormCount), ::testing::Values<Index>(1, 3, 4),
                       ::testing::Values(0, 1),
                       ::testing::Values(int{kBoundaryToBoundary}, int{kBoundaryToInside}, int{kInsideToInside},
                                         int{kInsideToBoundary}),
                       ::testing::Values(AttentionalBias::l2)),
    [](const ::testing::TestParamInfo<AdCase>& info) { return ad_case_name(info.param); });

// The other attentional biases (docs/MATH.md §11): their Hessians in the second-order backward,
// and the huber threshold's gradient (direction 10), in every form, linear and deep, with every
// start and end placement in a chunk of 4 and the ordinary gates (the other chunk sizes and the
// extreme gates exercise the chunk algebra, which the bias does not touch: the l2 grid above).
INSTANTIATE_TEST_SUITE_P(
    Bias, BackwardVsForwardMode,
    ::testing::Combine(::testing::Values<Index>(1, 2, 3), ::testing::Values(Activation::silu),
                       ::testing::Range(0, titans_test::kMemoryFormCount), ::testing::Values<Index>(4),
                       ::testing::Values(0),
                       ::testing::Values(int{kBoundaryToBoundary}, int{kBoundaryToInside}, int{kInsideToInside},
                                         int{kInsideToBoundary}),
                       ::testing::Values(AttentionalBias::huber, AttentionalBias::huber_radial, AttentionalBias::lp)),
    [](const ::testing::TestParamInfo<AdCase>& info) { return ad_case_name(info.param); });

TEST(MemoryBackward, SecondDerivativeOfActivations) {
  // φ'' against central differences of φ' (the key path's Δ recurrence needs it).
  Mat<double> z(1, 9);
  z << -4, -1.5, -0.3, 0, 1e-3, 0.4, 1, 2.5, 5;
  for (Activation a : {Activation::silu, Activation::gelu, Activation::identity}) {
    Mat<double> d2, up, dn;
    titans::detail::activation_second_derivative(a, z, d2);
    const double h = 1e-5;
    titans::detail::activation_derivative(a, (z.array() + h).matrix(), up);
    titans::detail::activation_derivative(a, (z.array() - h).matrix(), dn);
    const Mat<double> fd = (up - dn) / (2 * h);
    EXPECT_LT((d2 - fd).cwiseAbs().maxCoeff(), 1e-8) << titans::to_string(a);
  }
}

// ---------------------------------------------------------------------------------------------
// Central finite differences of the library's forward.
// ---------------------------------------------------------------------------------------------

struct FdCase {
  Index L, b, prefix, T;
  Activation act;
  int form;  // into titans_test::kMemoryForms
  Index r;
  AttentionalBias bias;
};

TEST(MemoryBackward, MatchesCentralFiniteDifferences) {
  const FdCase cases[] = {
      {2, 4, 6, 13, Activation::silu, 0, 1, AttentionalBias::l2},      // starts and ends inside a chunk
      {3, 3, 4, 11, Activation::gelu, 1, 2, AttentionalBias::l2},      // starts inside, ends at a boundary
      {1, 1, 0, 9, Activation::identity, 0, 1, AttentionalBias::l2},   // token by token
      {2, 5, 5, 12, Activation::gelu, 0, 3, AttentionalBias::l2},      // starts at a boundary, ends inside
      {2, 16, 3, 7, Activation::silu, 1, 1, AttentionalBias::l2},      // one sub-chunk inside one chunk
      {2, 4, 6, 13, Activation::silu, 3, 1, AttentionalBias::l2},      // the normalised residual memory
      {3, 3, 4, 11, Activation::gelu, 2, 2, AttentionalBias::l2},      // the norm without the residual, checkpointed
      {2, 4, 6, 13, Activation::silu, 5, 1, AttentionalBias::l2},      // normalised residual memory with the clamp
      {1, 1, 0, 9, Activation::identity, 4, 1, AttentionalBias::l2},   // the clamp alone, token by token
      {3, 5, 5, 12, Activation::gelu, 5, 3, AttentionalBias::l2},      // everything, deeper, checkpointed
      {2, 4, 6, 13, Activation::silu, 0, 1, AttentionalBias::huber},   // huber, with its thresholds
      {1, 1, 0, 9, Activation::identity, 1, 1, AttentionalBias::huber},  // huber, linear, token by token
      {3, 5, 5, 12, Activation::gelu, 5, 3, AttentionalBias::huber},   // huber with everything
      {2, 4, 6, 13, Activation::silu, 0, 1, AttentionalBias::huber_radial},  // the radial huber
      {3, 5, 5, 12, Activation::gelu, 5, 3, AttentionalBias::huber_radial},
      {2, 4, 6, 13, Activation::silu, 3, 1, AttentionalBias::lp},      // lp, normalised residual memory
      {1, 3, 4, 11, Activation::identity, 0, 2, AttentionalBias::lp},  // lp, linear, checkpointed
  };
  double worst = 0;
  for (const FdCase& fc : cases) {
    MemoryConfig cfg;
    cfg.dim = 5;
    cfg.depth = fc.L;
    cfg.expansion = 2;
    cfg.activation = fc.act;
    titans_test::apply_form(cfg, fc.form);
    titans_test::apply_bias(cfg, fc.bias);
    const std::uint64_t seed = static_cast<std::uint64_t>(fc.L * 31 + fc.b * 7 + fc.prefix);
    Problem p = make_problem(cfg.dim, fc.T, seed);
    titans_test::scale_steps_for_bias(cfg, p);
    MemoryState<double> st0 = make_state(cfg, fc.b, fc.prefix, seed + 1);
    titans_test::calibrate_threshold(cfg, st0.weights, p);
    titans_test::calibrate_clamp(cfg, st0.weights, p);
    const Probe pr = make_probe(cfg, fc.T, (fc.prefix + fc.T) % fc.b != 0, seed + 2);
    const auto g = backward_of(cfg, fc.b, p, st0, pr, fc.r);
    auto J = [&]() {
      auto st = st0;
      const Mat<double> y = forward_settled<double>(cfg, fc.b, p, st);
      return loss(pr, y, st);
    };
    titans::detail::Rng rng(seed + 3);
    auto check = [&](const std::string& name, auto& x, const auto& grad) {
      for (int rep = 0; rep < 4; ++rep) {
        const Index i = static_cast<Index>(rng.below(static_cast<std::uint64_t>(x.size())));
        const double h = 1e-6, x0 = x(i);
        x(i) = x0 + h;
        const double up = J();
        x(i) = x0 - h;
        const double dn = J();
        x(i) = x0;
        const double fd = (up - dn) / (2 * h), an = grad(i);
        const double rel = std::abs(fd - an) / std::max(std::abs(an), 1e-3);
        worst = std::max(worst, rel);
        EXPECT_LT(rel, 1e-6) << name << "(" << i << "): finite difference " << fd << ", backward " << an
                             << " (L " << fc.L << ", b " << fc.b << ", " << titans_test::form_name(fc.form) << ")";
      }
    };
    check("k", p.k, g.inputs.k);
    check("v", p.v, g.inputs.v);
    check("q", p.q, g.inputs.q);
    check("alpha", p.alpha, g.inputs.alpha);
    check("eta", p.eta, g.inputs.eta);
    check("theta", p.theta, g.inputs.theta);
    if (cfg.output_norm) check("gain", p.gain, g.inputs.gain);
    if (titans::uses_threshold(cfg.bias)) check("threshold", p.threshold, g.inputs.threshold);
    for (Index l = 0; l < fc.L; ++l) {
      check("weights" + std::to_string(l), st0.weights[l], g.state.weights[l]);
      check("momentum" + std::to_string(l), st0.momentum[l], g.state.momentum[l]);
      if (!st0.chunk_start.empty())
        check("chunk_start" + std::to_string(l), st0.chunk_start[l], g.state.chunk_start[l]);
    }
  }
  RecordProperty("worst_relative_error", std::to_string(worst));
}

// ---------------------------------------------------------------------------------------------
// Streaming, checkpointing, accumulation.
// ---------------------------------------------------------------------------------------------

TEST(MemoryBackward, StreamingCarriesTheStateGradient) {
  for (int form = 0; form < titans_test::kMemoryFormCount; ++form)
  for (Index prefix : {4, 6}) {
    MemoryConfig cfg;
    cfg.dim = 5;
    cfg.depth = 2;
    cfg.expansion = 2;
    titans_test::apply_form(cfg, form);
    const Index b = 4, T = 23;
    const Problem p = make_problem(cfg.dim, T, 77 + static_cast<std::uint64_t>(prefix));
    const MemoryState<double> st0 = make_state(cfg, b, prefix, 5);
    titans_test::calibrate_clamp(cfg, st0.weights, p);
    const Probe pr = make_probe(cfg, T, (prefix + T) % b != 0, 9);
    const auto whole = backward_of(cfg, b, p, st0, pr);
    // Splits inside chunks, a call that starts and ends inside one chunk, a call ending at a
    // boundary, and single-token calls.
    const std::vector<std::vector<Index>> splits = {
        {0, 2, 3, 8, 23}, {0, 1, 2, 3, 4, 5, 23}, {0, 10, 23}, {0, 6, 7, 9, 14, 22, 23}};
    for (const auto& cut : splits) {
      const std::size_t calls = cut.size() - 1;
      std::vector<titans::MemoryForwardCache<double>> caches(calls);
      auto st = st0;
      for (std::size_t c = 0; c < calls; ++c) {
        const Problem pc = p.columns(cut[c], cut[c + 1] - cut[c]);
        titans::memory_forward_train<double>(cfg, b, pc, st, caches[c]);
      }
      auto split = titans::make_kernel_gradients(cfg, T, st0);
      MemoryState<double> dfinal = pr.gfinal;
      for (std::size_t c = calls; c-- > 0;) {
        const Index t0 = cut[c], n = cut[c + 1] - cut[c];
        auto gc = titans::make_kernel_gradients(caches[c]);
        titans::memory_backward<double>(caches[c], pr.gy.middleCols(t0, n), dfinal, gc);
        split.inputs.k.middleCols(t0, n) = gc.inputs.k;
        split.inputs.v.middleCols(t0, n) = gc.inputs.v;
        split.inputs.q.middleCols(t0, n) = gc.inputs.q;
        split.inputs.alpha.segment(t0, n) = gc.inputs.alpha;
        split.inputs.eta.segment(t0, n) = gc.inputs.eta;
        split.inputs.theta.segment(t0, n) = gc.inputs.theta;
        if (cfg.output_norm) split.inputs.gain += gc.inputs.gain;  // γ is shared by every call
        dfinal = gc.state;  // dL/d(this call's initial state) = dL/d(the previous call's final state)
      }
      split.state = dfinal;
      EXPECT_LT(grads_rel(whole, split), 1e-10)
          << titans_test::form_name(form) << ", prefix " << prefix << ", cuts at " << cut[1] << ", " << cut[2];
    }
  }
}

// r > 1 keeps one start state and tape per r sub-chunks and reruns the others forward during
// backward; the reruns are the forward's own routine, so the gradients do not change.
TEST(MemoryBackward, CheckpointingGivesTheSameGradientsInLessMemory) {
  MemoryConfig cfg;
  cfg.dim = 6;
  cfg.depth = 3;
  cfg.expansion = 2;
  cfg.activation = Activation::gelu;
  const Index b = 4, prefix = 5, T = 30;  // 8 sub-chunks, the first and last partial
  const Problem p = make_problem(cfg.dim, T, 3);
  const MemoryState<double> st0 = make_state(cfg, b, prefix, 4);
  const Probe pr = make_probe(cfg, T, (prefix + T) % b != 0, 5);
  titans::MemoryForwardCache<double> base_cache;
  auto st = st0;
  const Mat<double> y1 =
      titans::memory_forward_train<double>(cfg, b, p, st, base_cache);
  ASSERT_EQ(base_cache.subchunks(), 8);
  auto base = titans::make_kernel_gradients(base_cache);
  titans::memory_backward<double>(base_cache, pr.gy, pr.gfinal, base);
  std::size_t prev_bytes = base_cache.bytes();
  for (Index r : {2, 3, 4, 7, 100}) {
    titans::MemoryForwardCache<double> cache;
    titans::MemoryTrainOptions opt;
    opt.checkpoint_every = r;
    auto s2 = st0;
    const Mat<double> y =
        titans::memory_forward_train<double>(cfg, b, p, s2, cache, opt);
    EXPECT_EQ(y, y1);
    auto g = titans::make_kernel_gradients(cache);
    titans::memory_backward<double>(cache, pr.gy, pr.gfinal, g);
    EXPECT_LT(grads_rel(g, base), 1e-12) << "checkpoint_every " << r;
    EXPECT_LT(cache.bytes(), base_cache.bytes()) << "checkpoint_every " << r;
    EXPECT_LE(cache.bytes(), prev_bytes) << "checkpoint_every " << r;
    prev_bytes = cache.bytes();
  }
  // The default cache holds one start state per sub-chunk: 8 × (W, S) plus the initial chunk_start.
  const std::size_t theta_bytes = static_cast<std::size_t>(cfg.weight_count()) * sizeof(double);
  EXPECT_GE(base_cache.bytes(), (8 * 2 + 1) * theta_bytes);
}

TEST(MemoryBackward, AccumulatesIntoExistingGradients) {
  MemoryConfig cfg;
  cfg.dim = 4;
  cfg.depth = 2;
  cfg.expansion = 2;
  const Index b = 3, prefix = 2, T = 10;
  const Problem p = make_problem(cfg.dim, T, 12);
  const MemoryState<double> st0 = make_state(cfg, b, prefix, 13);
  const Probe pr = make_probe(cfg, T, (prefix + T) % b != 0, 14);
  auto st = st0;
  titans::MemoryForwardCache<double> cache;
  titans::memory_forward_train<double>(cfg, b, p, st, cache);
  auto clean = titans::make_kernel_gradients(cache);
  titans::memory_backward<double>(cache, pr.gy, pr.gfinal, clean);

  auto junk = titans::make_kernel_gradients(cache);
  titans::detail::Rng rng(15);
  junk.for_each([&](const std::string&, auto& t) { rng.fill_normal(t, 3.0); });
  auto acc = junk;
  titans::memory_backward<double>(cache, pr.gy, pr.gfinal, acc);
  auto expected = junk;
  std::vector<Mat<double>> e, c;
  expected.for_each([&](const std::string&, auto& t) { e.push_back(t); });
  clean.for_each([&](const std::string&, const auto& t) { c.push_back(t); });
  std::size_t i = 0;
  expected.for_each([&](const std::string&, auto& t) { t = e[i] + c[i], ++i; });
  EXPECT_LT(grads_rel(acc, expected), 1e-13);
  EXPECT_GT(grads_rel(acc, clean), 0.1);  // the junk is still there
  titans::memory_backward<double>(cache, pr.gy, pr.gfinal, acc);  // twice: junk + 2·gradient
  i = 0;
  expected.for_each([&](const std::string&, auto& t) { t += c[i++]; });
  EXPECT_LT(grads_rel(acc, expected), 1e-13);
  // set_zero (parameters.hpp) clears it.
  titans::set_zero(acc);
  acc.for_each([&](const std::string&, const auto& t) { EXPECT_EQ(t.cwiseAbs().sum(), 0.0); });
}

TEST(MemoryBackward, EmptyCallPassesTheStateGradientThrough) {
  MemoryConfig cfg;
  cfg.dim = 3;
  cfg.depth = 2;
  const Index b = 4;
  const MemoryState<double> st0 = make_state(cfg, b, 5, 2);
  const Probe pr = make_probe(cfg, 0, true, 3);
  const auto g = backward_of(cfg, b, make_problem(cfg.dim, 0, 1), st0, pr);
  for (Index l = 0; l < cfg.depth; ++l) {
    EXPECT_EQ(g.state.weights[l], pr.gfinal.weights[l]);
    EXPECT_EQ(g.state.momentum[l], pr.gfinal.momentum[l]);
    EXPECT_EQ(g.state.chunk_start[l], pr.gfinal.chunk_start[l]);
  }
}

// ---------------------------------------------------------------------------------------------
// float and double: forward_train is memory_forward bit for bit; float gradients track double.
// ---------------------------------------------------------------------------------------------

template <class S>
class MemoryBackwardTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(MemoryBackwardTyped, Scalars);

TYPED_TEST(MemoryBackwardTyped, ForwardTrainIsForwardBitForBit) {
  using S = TypeParam;
  for (Index prefix : {0, 3}) {
    for (Index r : {1, 2}) {
      MemoryConfig cfg;
      cfg.dim = 8;
      cfg.depth = 2;
      cfg.expansion = 2;
      if (r == 2) titans_test::apply_form(cfg, titans_test::kMemoryFormCount - 1);  // the bounded form too
      const Index b = 5, T = 17;
      const Problem p = make_problem(cfg.dim, T, 8);
      const auto st0d = make_state(cfg, b, prefix, 9);
      titans_test::calibrate_clamp(cfg, st0d.weights, p);
      MemoryState<S> st0;
      for (const auto& w : st0d.weights) st0.weights.push_back(w.cast<S>());
      for (const auto& w : st0d.momentum) st0.momentum.push_back(w.cast<S>());
      for (const auto& w : st0d.chunk_start) st0.chunk_start.push_back(w.cast<S>());
      st0.position = st0d.position;
      auto s1 = st0, s2 = st0;
      const titans::KernelInputs<S> in = p.cast<S>();
      const Mat<S> y1 = forward_settled<S>(cfg, b, in, s1);
      titans::MemoryForwardCache<S> cache;
      titans::MemoryTrainOptions opt;
      opt.checkpoint_every = r;
      const Mat<S> y2 = titans::memory_forward_train<S>(cfg, b, in, s2, cache, opt);
      EXPECT_EQ(y1, y2);
      EXPECT_EQ(s1.position, s2.position);
      for (Index l = 0; l < cfg.depth; ++l) {
        EXPECT_EQ(s1.weights[l], s2.weights[l]);
        EXPECT_EQ(s1.momentum[l], s2.momentum[l]);
      }
      EXPECT_EQ(s1.chunk_start.size(), s2.chunk_start.size());
      for (std::size_t l = 0; l < s1.chunk_start.size(); ++l) EXPECT_EQ(s1.chunk_start[l], s2.chunk_start[l]);

      // Gradients in this precision against double.
      const Probe pr = make_probe(cfg, T, (prefix + T) % b != 0, 10);
      const auto gd = backward_of(cfg, b, p, st0d, pr, r);
      auto g = titans::make_kernel_gradients(cache);
      MemoryState<S> dfinal;
      for (const auto& m : pr.gfinal.weights) dfinal.weights.push_back(m.cast<S>());
      for (const auto& m : pr.gfinal.momentum) dfinal.momentum.push_back(m.cast<S>());
      for (const auto& m : pr.gfinal.chunk_start) dfinal.chunk_start.push_back(m.cast<S>());
      titans::memory_backward<S>(cache, pr.gy.cast<S>(), dfinal, g);
      std::vector<Mat<double>> lo, hi;
      g.for_each([&](const std::string&, const auto& x) { lo.push_back(x.template cast<double>()); });
      gd.for_each([&](const std::string&, const auto& x) { hi.push_back(x); });
      ASSERT_EQ(lo.size(), hi.size());
      const double tol = std::is_same_v<S, float> ? 2e-4 : 1e-13;
      for (std::size_t i = 0; i < lo.size(); ++i) EXPECT_LT(max_rel(lo[i], hi[i]), tol) << "tensor " << i;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Bad input.
// ---------------------------------------------------------------------------------------------

TEST(MemoryBackward, BadInputThrowsNamingTheArgument) {
  MemoryConfig cfg;
  cfg.dim = 4;
  cfg.depth = 2;
  cfg.expansion = 2;
  const Index b = 4, prefix = 4, T = 6;  // starts at a boundary, ends inside a chunk
  const Problem p = make_problem(cfg.dim, T, 1);
  const MemoryState<double> st0 = make_state(cfg, b, prefix, 2);
  const Probe pr = make_probe(cfg, T, true, 3);
  auto st = st0;
  titans::MemoryForwardCache<double> cache;
  titans::memory_forward_train<double>(cfg, b, p, st, cache);
  const auto fresh = titans::make_kernel_gradients(cache);

  auto expect_throw = [&](auto&& fn, const std::string& needle, auto tag) {
    using E = decltype(tag);
    try {
      fn();
      ADD_FAILURE() << "no exception, expected one naming " << needle;
    } catch (const E& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("titans::memory_backward"), std::string::npos) << e.what();
    }
  };
  auto run = [&](const Mat<double>& dy, const MemoryState<double>& dfinal) {
    auto g = fresh;
    titans::memory_backward<double>(cache, dy, dfinal, g);
  };
  expect_throw([&] { run(pr.gy.leftCols(T - 1), pr.gfinal); }, "dY has shape (4, 5)", titans::ShapeError(""));
  expect_throw([&] { run(pr.gy.topRows(3), pr.gfinal); }, "dY", titans::ShapeError(""));
  MemoryState<double> bad = pr.gfinal;
  bad.weights.pop_back();
  expect_throw([&] { run(pr.gy, bad); }, "dfinal.weights", titans::ShapeError(""));
  bad = pr.gfinal;
  bad.momentum[1].resize(3, 3);
  expect_throw([&] { run(pr.gy, bad); }, "dfinal.momentum[1]", titans::ShapeError(""));
  bad = pr.gfinal;
  bad.chunk_start[0].resize(1, 8);
  expect_throw([&] { run(pr.gy, bad); }, "dfinal.chunk_start[0]", titans::ShapeError(""));
  auto g = fresh;
  g.inputs.k.resize(4, 2);
  expect_throw([&] { titans::memory_backward<double>(cache, pr.gy, pr.gfinal, g); }, "grads.inputs.k",
               titans::ShapeError(""));
  g = fresh;
  g.state.chunk_start = g.state.weights;  // the call started at a boundary: no chunk_start gradient
  expect_throw([&] { titans::memory_backward<double>(cache, pr.gy, pr.gfinal, g); }, "grads.state.chunk_start",
               titans::ShapeError(""));
  // Empty dfinal parts are zero, not errors.
  EXPECT_NO_THROW(run(pr.gy, MemoryState<double>{}));

  // A call ending at a chunk boundary has no chunk_start to differentiate.
  auto st2 = st0;
  titans::MemoryForwardCache<double> cache2;
  titans::memory_forward_train<double>(cfg, b, p.columns(0, 4), st2, cache2);
  auto g2 = titans::make_kernel_gradients(cache2);
  expect_throw([&] { titans::memory_backward<double>(cache2, pr.gy.leftCols(4), pr.gfinal, g2); },
               "dfinal.chunk_start", titans::ShapeError(""));

  titans::MemoryForwardCache<double> never;
  auto g3 = fresh;
  EXPECT_THROW(titans::memory_backward<double>(never, pr.gy, pr.gfinal, g3), titans::InvalidArgument);
  titans::MemoryTrainOptions opt;
  opt.checkpoint_every = 0;
  auto st3 = st0;
  EXPECT_THROW(titans::memory_forward_train<double>(cfg, b, p, st3, cache, opt),
               titans::InvalidArgument);
}

}  // namespace
