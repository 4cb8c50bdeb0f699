// SPDX-License-Identifier: Apache-2.0
//
// \file memory/backward.hpp
// \brief Backward pass of the memory kernel (memory_forward, docs/MATH.md §2–3) *through* the
// test-time updates: the inner gradient's dependence on the keys, values, gates and chunk-start
// weights is differentiated (second order), so outer parameters can be trained by backprop.
//
// Usage (llm.c style: forward returns a cache, backward adds into gradients):
//
//     titans::MemoryForwardCache<float> cache;
//     titans::Matrix<float> y = titans::memory_forward_train(cfg, b, k, v, q, alpha, eta, theta,
//                                                            state, cache);
//     auto grads = titans::make_kernel_gradients(cache);  // zeros of the right shapes
//     titans::memory_backward(cache, dy /* (d, T) */, dfinal /* dL/d(final state) */, grads);
//
// What is differentiated. One call is a sequence of sub-chunks (a sub-chunk never crosses a
// chunk boundary; only the first can start inside a chunk and only the last can end inside one).
// A sub-chunk of n tokens starting `o` tokens into its chunk maps the state (W, S, C) — weights,
// momentum and, when o > 0, the chunk-start weights C — to (W', S', C') and the outputs Y. With
// Θ⁰ = W if o = 0 else C, and per layer l (docs/MATH.md §3):
//
//   key path    A_0 = K, Z_l = Θ⁰_l A_{l−1}, A_l = φ(Z_l),
//               Δ_L = ∂ℓ(M(K) − V)/∂Z_L (= 2(Z_L [+ K] − V) for l2 without output_norm;
//               the bias ℓ and its Hessian: docs/MATH.md §11),
//               T_l = Θ⁰_lᵀ Δ_l,  Δ_{l−1} = T_l ⊙ φ'(Z_{l−1})
//   clamp       θ'_i = θ_i min(1, c/‖u_i‖), ‖u_i‖² = Σ_l ‖Δ_{l,i}‖² ‖A_{l−1,i}‖² (θ' = θ when off)
//   query path  Z̄_l = W_l Ā_{l−1} diag(β) + S_l Ā_{l−1} diag(c) − Δ_l (G_l ⊙ Ãᵀ),
//               G_l = A_{l−1}ᵀ Ā_{l−1},  Ā_0 = Q,  Ā_l = φ(Z̄_l),  Y = [Q +] (γ ⊙ LN(Z̄_L) or Z̄_L)
//   state       W'_l = β_n W_l + c_n S_l − Δ_l diag(a_last) A_{l−1}ᵀ
//               S'_l = P_n0 S_l − Δ_l diag(s_last) A_{l−1}ᵀ
//               C' = W if the sub-chunk starts at a boundary and ends inside its chunk,
//                    C if it starts and ends inside, nothing if it reaches the chunk's end
//   coefficients β, c, Ãᵀ, a_last, s_last, P_n0 from (α, η, θ') by the product-only recurrences.
//
// The backward of a sub-chunk takes the intermediates from the forward's tape (Z_l, T_l, Z̄_l for
// l < L and Z̄_L with output_norm, G_l; the rest is elementwise from these) or, for the sub-chunks a checkpointed cache
// did not keep, from a rerun of the forward from the segment's start state. It then runs the
// transposed GEMMs in reverse: state update, query path (layer L down to 1), the scalar
// coefficient recurrences backwards (products only, so gates at exactly 0 or 1 are fine), the
// surprise clamp (its steps depend on the key path), and last the key path (the Δ recurrence
// needs φ''). The gradient with respect to Θ⁰ goes to W when o = 0
// (the same tensor) and to C when o > 0; C's gradient is carried to the previous boundary and,
// for the first sub-chunk of a call that started inside a chunk, out through
// grads.state.chunk_start — which a streaming caller passes on as the previous call's
// dfinal.chunk_start.
#pragma once

#include "../common.hpp"
#include "../detail/gemm.hpp"
#include "kernel.hpp"
#include "model.hpp"

#include <algorithm>
#include <cstddef>
#include <limits>
#include <string>
#include <vector>

namespace titans {

/// \brief Options of memory_forward_train.
struct MemoryTrainOptions {
  /// r >= 1: keep the start state and forward tape of one sub-chunk in r only; backward reruns
  /// the others forward (r − 1 of every r sub-chunks, with r − 1 states of scratch). The cache
  /// shrinks about r-fold; r = 1 is the fastest backward.
  Index checkpoint_every = 1;
};

/// \brief What memory_backward needs from a memory_forward_train call (tiny-cuda-nn style
/// context): the config, copies of the inputs, and per *segment* of r = checkpoint_every
/// consecutive sub-chunks the state at its start and the forward tape (the intermediates
/// Z_l, Θ⁰_lᵀΔ_l, Z̄_l and the Gram matrices) of its last sub-chunk. With r = 1 backward
/// recomputes nothing; with r > 1 it reruns the first r − 1 sub-chunks of each segment forward.
///
/// Reusing one cache object across calls of the same shape reuses its storage.
template <class Scalar>
struct MemoryForwardCache {
  static_assert(std::is_floating_point_v<Scalar>, "titans: Scalar must be a floating-point type");
  MemoryConfig config;
  Index chunk_size = 0;        ///< b; 0 while the cache has never been filled
  Index checkpoint_every = 1;  ///< r
  Index start_position = 0;    ///< state.position when the call started
  KernelInputs<Scalar> inputs;  ///< a copy of the call's inputs
  std::vector<Index> starts;   ///< sub-chunk s covers tokens [starts[s], starts[s+1]); size = sub-chunks + 1
  /// State at the start of sub-chunk s·r (s = 0, 1, …); checkpoint 0 is the call's initial state
  /// (with its chunk_start when the call started inside a chunk).
  std::vector<MemoryState<Scalar>> checkpoints;
  /// Forward tape of sub-chunk min(s·r + r, sub-chunks) − 1, the last of segment s.
  std::vector<detail::SubchunkTape<Scalar>> tapes;

  bool filled() const { return chunk_size > 0; }
  Index tokens() const { return inputs.tokens(); }
  Index subchunks() const { return starts.empty() ? 0 : static_cast<Index>(starts.size()) - 1; }

  /// Bytes held by the cache's tensors and bookkeeping (not counting the object itself).
  std::size_t bytes() const {
    std::size_t n = 0;
    inputs.for_each([&](const std::string&, const auto& t) { n += static_cast<std::size_t>(t.size()) * sizeof(Scalar); });
    for (const auto& st : checkpoints) {
      st.for_each([&](const std::string&, const Matrix<Scalar>& t) {
        n += static_cast<std::size_t>(t.size()) * sizeof(Scalar);
      });
    }
    for (const auto& tp : tapes) {
      for (const auto* list : {&tp.zk, &tp.tk, &tp.zq, &tp.gram})
        for (const auto& t : *list) n += static_cast<std::size_t>(t.size()) * sizeof(Scalar);
    }
    n += starts.size() * sizeof(Index);
    return n;
  }
};

/// \brief Gradients of the memory kernel's inputs. memory_backward adds into them.
template <class Scalar>
struct MemoryKernelGradients {
  static_assert(std::is_floating_point_v<Scalar>, "titans: Scalar must be a floating-point type");
  using scalar_type = Scalar;
  KernelInputs<Scalar> inputs;  ///< dL/d(inputs): k, v, q (d, T), alpha, eta, theta (T), gain (d) with output_norm,
                                ///< threshold (T) with the huber bias
  /// dL/d(initial state): weights and momentum (shapes of Θ) and chunk_start (shapes of Θ when
  /// the call started inside a chunk, else empty). `position` is unused.
  MemoryState<Scalar> state;

  /// Visits every tensor: the inputs' ("k", "v", "q", "alpha", "eta", "theta", "gain", "threshold"), then the state's.
  TITANS_DEFINE_FOR_EACH()

 private:
  template <class Self, class F>
  static void for_each_impl(Self& self, F& f) {
    self.inputs.for_each(f);
    self.state.for_each([&](const std::string& name, auto& t) { f("state." + name, t); });
  }
};

/// \brief Zero gradients for a call of T tokens starting from a state shaped like `initial`
/// (chunk_start is sized iff `initial.chunk_start` is non-empty).
template <class Scalar>
MemoryKernelGradients<Scalar> make_kernel_gradients(const MemoryConfig& cfg, Index tokens,
                                                    const MemoryState<Scalar>& initial) {
  constexpr const char* where = "titans::make_kernel_gradients";
  cfg.validate(where);
  if (tokens < 0) detail::raise<InvalidArgument>(where, "tokens is ", tokens, ", expected >= 0");
  check_memory_weights(where, "initial.weights", cfg, initial.weights);
  MemoryKernelGradients<Scalar> g;
  g.inputs.k.setZero(cfg.dim, tokens);
  g.inputs.v.setZero(cfg.dim, tokens);
  g.inputs.q.setZero(cfg.dim, tokens);
  g.inputs.alpha.setZero(tokens);
  g.inputs.eta.setZero(tokens);
  g.inputs.theta.setZero(tokens);
  if (cfg.output_norm) g.inputs.gain.setZero(cfg.dim);
  if (uses_threshold(cfg.bias)) g.inputs.threshold.setZero(tokens);
  for (Index l = 0; l < cfg.depth; ++l) {
    g.state.weights.push_back(Matrix<Scalar>::Zero(cfg.layer_out(l), cfg.layer_in(l)));
    g.state.momentum.push_back(Matrix<Scalar>::Zero(cfg.layer_out(l), cfg.layer_in(l)));
    if (!initial.chunk_start.empty())
      g.state.chunk_start.push_back(Matrix<Scalar>::Zero(cfg.layer_out(l), cfg.layer_in(l)));
  }
  g.state.position = initial.position;
  return g;
}

/// \brief Zero gradients shaped for the call recorded in `cache`.
template <class Scalar>
MemoryKernelGradients<Scalar> make_kernel_gradients(const MemoryForwardCache<Scalar>& cache) {
  if (!cache.filled())
    detail::raise<InvalidArgument>("titans::make_kernel_gradients", "cache was never filled by memory_forward_train");
  return make_kernel_gradients<Scalar>(cache.config, cache.tokens(), cache.checkpoints.front());
}

namespace detail {

/// out = φ''(z), elementwise.
template <class Z, class Out>
void activation_second_derivative(Activation a, const Eigen::MatrixBase<Z>& z, Out& out) {
  using S = typename Z::Scalar;
  switch (a) {
    case Activation::silu: {
      // φ = z σ,  φ' = σ (1 + z (1 − σ)),  φ'' = σ (1 − σ) (2 + z (1 − 2σ))
      out = (S(1) / (S(1) + (-z.array()).exp())).matrix();
      out = (out.array() * (S(1) - out.array()) * (S(2) + z.array() * (S(1) - S(2) * out.array()))).matrix();
      break;
    }
    case Activation::gelu:
      // φ = z Φ(z),  φ' = Φ + z ϕ,  φ'' = ϕ (2 − z²) with ϕ the standard normal density
      out = ((S(-0.5) * z.array().square()).exp() * S(0.39894228040143267794) * (S(2) - z.array().square()))
                .matrix();
      break;
    case Activation::identity:
      out.setZero(z.rows(), z.cols());
      break;
  }
}

/// Buffers of memory_backward, reused across its sub-chunks.
template <class Scalar>
struct BackwardWorkspace {
  // Forward intermediates of the current sub-chunk rebuilt (elementwise) from its tape, per layer
  // l = 0..L−1 (0-based; layer l maps width n_{l−1} = layer_in(l) to n_l = layer_out(l)); n =
  // tokens in the sub-chunk. Z_l, T_l = Θ⁰_lᵀ Δ_l, Z̄_l and G_l are read from the tape itself.
  std::vector<Matrix<Scalar>> ak;     // A_{l−1}: key-path input of layer l        (n_in, n)
  std::vector<Matrix<Scalar>> delta;  // Δ_l                                         (n_out, n)
  std::vector<Matrix<Scalar>> dphik;  // φ'(Z_l) (l < L−1)                            (n_out, n)
  std::vector<Matrix<Scalar>> aq;     // Ā_{l−1}: query-path input of layer l       (n_in, n)
  std::vector<Matrix<Scalar>> dphiq;  // φ'(Z̄_l) (l < L−1)                            (n_out, n)
  std::vector<Matrix<Scalar>> mgram;  // G_l ⊙ Ãᵀ                                    (n, n)
  ChunkCoefficients<Scalar> coef;
  Matrix<Scalar> pm;  // pm(i, j) = P_{j,i} = η_{i+1}···η_j, i ≤ j ≤ n (token 0 = chunk start)   (n+1, n+1)
  // Adjoints and scratch, per layer so that no buffer changes shape between sub-chunks.
  std::vector<Matrix<Scalar>> dak, ddelta, dzk;
  std::vector<Matrix<Scalar>> out1, out2;  // (n_out, n)
  std::vector<Matrix<Scalar>> g;           // dL/dZ̄_l                          (n_out, n)
  std::vector<Matrix<Scalar>> hw, hs;      // W_lᵀ g, S_lᵀ g                   (n_in, n)
  std::vector<Matrix<Scalar>> daq;         // dL/dĀ_{l−1}                     (n_in, n)
  std::vector<Matrix<Scalar>> dtk;         // dL/dT_l                           (n_in, n)
  std::vector<Matrix<Scalar>> ddphi;       // φ''(Z_l)                          (n_out, n)
  Matrix<Scalar> dm, du, yscratch, tmp;
  Vector<Scalar> dbeta, dc, da_last, ds_last, bu, bp;
  Vector<Scalar> theta, surprise, dtheta;  // the steps after the clamp, ‖u_i‖, dL/d(steps after the clamp)
  // Adjoint of the state at the current sub-chunk boundary (walking backwards).
  std::vector<Matrix<Scalar>> gw, gs, gc;
  bool gc_active = false;

  explicit BackwardWorkspace(Index depth) {
    const auto L = static_cast<std::size_t>(depth);
    for (auto* v : {&ak, &delta, &dphik, &aq, &dphiq, &mgram, &dak, &ddelta, &dzk, &out1, &out2, &g, &hw, &hs, &daq,
                    &dtk, &ddphi})
      v->resize(L);
  }
};

/// Rebuilds the rest of one sub-chunk's forward intermediates (tokens [t0, t0 + n) of `in`) from
/// its tape, elementwise and by the forward's own functions (so they equal the forward's values
/// bit for bit).
template <class Scalar>
void load_intermediates(const MemoryConfig& cfg, const SubchunkTape<Scalar>& tape, const KernelInputs<Scalar>& in,
                        Index t0, Index n, BackwardWorkspace<Scalar>& ws) {
  const Index L = cfg.depth;
  const auto eta = in.eta.segment(t0, n);
  ws.ak[0] = in.k.middleCols(t0, n);
  for (Index l = 0; l + 1 < L; ++l) {
    activation_apply(cfg.activation, tape.zk[l], ws.ak[l + 1]);
    activation_derivative(cfg.activation, tape.zk[l], ws.dphik[l]);
  }
  inner_signal(cfg, tape.zk[L - 1], in.k.middleCols(t0, n), in.v.middleCols(t0, n), in.thresholds(t0, n), in.gain,
               ws.tmp, ws.delta[L - 1]);
  for (Index l = L - 1; l > 0; --l) ws.delta[l - 1] = tape.tk[l].cwiseProduct(ws.dphik[l - 1]);

  clamp_steps(cfg, ws.ak, ws.delta, in.theta.segment(t0, n), ws.surprise, ws.theta);
  chunk_coefficients(in.alpha.segment(t0, n), eta, ws.theta, ws.coef);
  // P_{j,i} by the same products as chunk_coefficients (column j = tokens seen so far).
  ws.pm.setZero(n + 1, n + 1);
  ws.pm(0, 0) = 1;
  for (Index j = 0; j < n; ++j) {
    const Scalar e = Scalar(eta(j));
    for (Index i = 0; i <= j; ++i) ws.pm(i, j + 1) = ws.pm(i, j) * e;
    ws.pm(j + 1, j + 1) = 1;
  }

  ws.aq[0] = in.q.middleCols(t0, n);
  for (Index l = 0; l < L; ++l) {
    ws.mgram[l] = tape.gram[l].cwiseProduct(ws.coef.upper);
    if (l + 1 < L) {
      activation_apply(cfg.activation, tape.zq[l], ws.aq[l + 1]);
      activation_derivative(cfg.activation, tape.zq[l], ws.dphiq[l]);
    }
  }
}

/// Backward of inner_signal: given D = dL/dδ_L (d, n), adds dL/dz_L into dz and the inputs'
/// gradients into grads (columns [t0, t0 + n)). With r = M(k) − v and e = ∇_r ℓ(r) (docs/MATH.md
/// §11), dL/dr = H(r) dL/de with H the bias's Hessian (bias_hessian_apply; 2I for l2), and the
/// huber threshold's dL/dδ_t = dL/deᵀ ∂e/∂δ_t. Plain and residual read-outs: δ_L = e, r = z [+ k] − v.
/// With output_norm (docs/MATH.md §8.3), per column, ẑ = LN(z), s = 1/σ, r = [k +] γ⊙ẑ − v,
/// g = γ⊙e, h = mean(g⊙ẑ), δ = s (g − mean(g) − ẑ h); then dL/dg = J D (J = s (I − 11ᵀ/d − ẑẑᵀ/d),
/// symmetric), dL/de = γ ⊙ dL/dg, dL/dẑ = −s (h D + g (D·ẑ)/d) + γ ⊙ dL/dr, dL/dσ = −s (D·δ), and
/// dL/dz = J dL/dẑ + dL/dσ · ẑ/d.
template <class Scalar>
void inner_signal_backward(const MemoryConfig& cfg, const Matrix<Scalar>& z, const KernelInputs<Scalar>& in,
                           Index t0, Index n, const Matrix<Scalar>& D, Matrix<Scalar>& dz,
                           MemoryKernelGradients<Scalar>& grads) {
  auto dk = grads.inputs.k.middleCols(t0, n);
  auto dv = grads.inputs.v.middleCols(t0, n);
  const auto k = in.k.middleCols(t0, n);
  const auto v = in.v.middleCols(t0, n);
  const auto thr = in.thresholds(t0, n);
  Scalar* dthr = uses_threshold(cfg.bias) ? grads.inputs.threshold.data() + t0 : nullptr;
  if (!cfg.output_norm) {
    if (cfg.bias == AttentionalBias::l2) {
      dz += Scalar(2) * D;
      dv -= Scalar(2) * D;
      if (cfg.residual) dk += Scalar(2) * D;
      return;
    }
    Matrix<Scalar> r = z - v, dr;
    if (cfg.residual) r += k;
    bias_hessian_apply(cfg, r, thr, D, dr, dthr);
    dz += dr;
    dv -= dr;
    if (cfg.residual) dk += dr;
    return;
  }
  const Vector<Scalar>& gamma = in.gain;
  Matrix<Scalar> zhat;
  Vector<Scalar> rsigma;
  layer_norm<Scalar>(z, cfg.norm_eps, zhat, rsigma);
  const Index d = z.rows();
  const Scalar dinv = Scalar(1) / static_cast<Scalar>(d);
  // J x = s (x − mean(x) − ẑ mean(x ⊙ ẑ)) for one column
  auto apply_j = [&](const Vector<Scalar>& x, Index j) -> Vector<Scalar> {
    return ((x.array() - x.sum() * dinv - zhat.col(j).array() * (x.dot(zhat.col(j)) * dinv)) * rsigma(j)).matrix();
  };
  Matrix<Scalar> r(d, 1), e(d, 1), dr;
  for (Index j = 0; j < n; ++j) {
    const Vector<Scalar> zh = zhat.col(j);
    r = gamma.cwiseProduct(zh) - v.col(j);
    if (cfg.residual) r += k.col(j);
    const auto thr_j = thr.segment(thr.size() > 0 ? j : 0, thr.size() > 0 ? 1 : 0);  // δ_j, or empty
    e = r;
    bias_gradient(cfg, thr_j, e);
    const Vector<Scalar> g = gamma.cwiseProduct(e.col(0));
    const Scalar h = g.dot(zh) * dinv;
    const Vector<Scalar> delta = apply_j(g, j);
    const Vector<Scalar> Dj = D.col(j);
    const Vector<Scalar> dg = apply_j(Dj, j);
    const Vector<Scalar> de = gamma.cwiseProduct(dg);
    bias_hessian_apply(cfg, r, thr_j, de, dr, dthr ? dthr + j : nullptr);
    grads.inputs.gain += e.col(0).cwiseProduct(dg) + zh.cwiseProduct(dr.col(0));
    dv.col(j) -= dr.col(0);
    if (cfg.residual) dk.col(j) += dr.col(0);
    const Vector<Scalar> dzh = -rsigma(j) * (h * Dj + g * (Dj.dot(zh) * dinv)) + gamma.cwiseProduct(dr.col(0));
    const Scalar dsigma = -rsigma(j) * Dj.dot(delta);
    dz.col(j) += apply_j(dzh, j) + (dsigma * dinv) * zh;
  }
}

/// Backward of one sub-chunk (tokens [t0, t0 + n) of the call) from its start state `st` and its
/// forward tape. On entry ws.gw / ws.gs / ws.gc hold dL/d(W', S', C') at the sub-chunk's end; on
/// exit dL/d(W, S, C) at its start. Input gradients are added into `grads`.
template <class Scalar, class DY>
void backward_subchunk(const MemoryForwardCache<Scalar>& cache, const MemoryState<Scalar>& st,
                       const SubchunkTape<Scalar>& tape, Index t0, Index n,
                       const Eigen::MatrixBase<DY>& dy /* (d, n) */,
                       BackwardWorkspace<Scalar>& ws, MemoryKernelGradients<Scalar>& grads) {
  const MemoryConfig& cfg = cache.config;
  const Index L = cfg.depth;
  const Index b = cache.chunk_size;
  const Index offset = (cache.start_position + t0) % b;
  const bool ends_inside = offset + n < b;
  const std::vector<Matrix<Scalar>>& w0 = offset == 0 ? st.weights : st.chunk_start;
  const auto& W = st.weights;
  const auto& S = st.momentum;

  const KernelInputs<Scalar>& in = cache.inputs;
  const auto alpha = in.alpha.segment(t0, n);
  const auto eta = in.eta.segment(t0, n);
  const auto& theta = ws.theta;  // the steps after the clamp: what the coefficients were made of
  load_intermediates(cfg, tape, in, t0, n, ws);
  const auto& co = ws.coef;

  ws.du.setZero(n, n);
  ws.dbeta.setZero(n);
  ws.dc.setZero(n);
  ws.da_last.setZero(n);
  ws.ds_last.setZero(n);
  Scalar dp_n0 = 0;
  for (Index l = 0; l < L; ++l) {
    ws.dak[l].setZero(cfg.layer_in(l), n);
    ws.ddelta[l].setZero(cfg.layer_out(l), n);
    ws.dzk[l].setZero(cfg.layer_out(l), n);
  }

  // (1) State update: W' = β_n W + c_n S − Δ diag(a_last) Aᵀ,  S' = P_n0 S − Δ diag(s_last) Aᵀ.
  const Scalar beta_n = co.beta(n - 1), c_n = co.c(n - 1), p_n0 = co.p_n0;
  for (Index l = 0; l < L; ++l) {
    auto& gw = ws.gw[l];
    auto& gs = ws.gs[l];
    auto& t1 = ws.out1[l];
    auto& t2 = ws.out2[l];
    product<Trans::no, Trans::no>(gw, ws.ak[l], t1);  // (n_out, n)
    product<Trans::no, Trans::no>(gs, ws.ak[l], t2);
    ws.ddelta[l] -= t1 * co.a_last.asDiagonal();
    ws.ddelta[l] -= t2 * co.s_last.asDiagonal();
    ws.da_last -= ws.delta[l].cwiseProduct(t1).colwise().sum().transpose();
    ws.ds_last -= ws.delta[l].cwiseProduct(t2).colwise().sum().transpose();
    t1 = ws.delta[l] * co.a_last.asDiagonal();
    product_add<Trans::yes, Trans::no>(Scalar(-1), gw, t1, ws.dak[l]);
    t2 = ws.delta[l] * co.s_last.asDiagonal();
    product_add<Trans::yes, Trans::no>(Scalar(-1), gs, t2, ws.dak[l]);
    // dβ_n += <gW, W>, dc_n += <gW, S>, dP_n0 += <gS, S>, then gS ← c_n gW + P_n0 gS, gW ← β_n gW:
    // one pass over the four matrices, in blocks that stay in L1.
    constexpr Index block = 2048;
    const Index total = gw.size();
    for (Index i0 = 0; i0 < total; i0 += block) {
      const Index len = std::min(block, total - i0);
      Eigen::Map<Vector<Scalar>> gwb(gw.data() + i0, len), gsb(gs.data() + i0, len);
      const Eigen::Map<const Vector<Scalar>> wb(W[l].data() + i0, len), sb(S[l].data() + i0, len);
      ws.dbeta(n - 1) += gwb.dot(wb);
      ws.dc(n - 1) += gwb.dot(sb);
      dp_n0 += gsb.dot(sb);
      gsb = c_n * gwb + p_n0 * gsb;
      gwb *= beta_n;
    }
  }
  // Chunk-start bookkeeping: C' = W (start at a boundary, end inside), C' = C (start and end
  // inside) or no C' at all. Θ⁰'s gradient goes to W (o = 0) or to C (o > 0).
  if (offset == 0) {
    if (ends_inside && ws.gc_active) {
      for (Index l = 0; l < L; ++l) ws.gw[l] += ws.gc[l];
    }
    ws.gc_active = false;
  } else {
    if (!ends_inside || !ws.gc_active) {
      ws.gc.resize(static_cast<std::size_t>(L));
      for (Index l = 0; l < L; ++l) ws.gc[l].setZero(cfg.layer_out(l), cfg.layer_in(l));
    }
    ws.gc_active = true;
  }
  std::vector<Matrix<Scalar>>& gw0 = offset == 0 ? ws.gw : ws.gc;

  // (2) Query path, layer L down to 1, from the read-out Y = [Q +] (γ ⊙ LN(Z̄_L) or Z̄_L).
  memory_readout_backward(cfg, tape.zq[L - 1], in.gain, dy, ws.g[L - 1],
                          cfg.output_norm ? &grads.inputs.gain : nullptr);
  if (cfg.residual) grads.inputs.q.middleCols(t0, n) += dy;
  for (Index l = L - 1; l >= 0; --l) {
    // Z̄_l = W Ā diag(β) + S Ā diag(c) − Δ_l (G_l ⊙ Ãᵀ)
    const auto& g = ws.g[l];
    auto& t1 = ws.out1[l];
    auto& hw = ws.hw[l];
    auto& hs = ws.hs[l];
    auto& daq = ws.daq[l];
    t1 = g * co.beta.asDiagonal();
    product_add<Trans::no, Trans::yes>(Scalar(1), t1, ws.aq[l], ws.gw[l]);
    t1 = g * co.c.asDiagonal();
    product_add<Trans::no, Trans::yes>(Scalar(1), t1, ws.aq[l], ws.gs[l]);
    product<Trans::yes, Trans::no>(W[l], g, hw);  // (n_in, n)
    product<Trans::yes, Trans::no>(S[l], g, hs);
    ws.dbeta += ws.aq[l].cwiseProduct(hw).colwise().sum().transpose();
    ws.dc += ws.aq[l].cwiseProduct(hs).colwise().sum().transpose();
    daq = hw * co.beta.asDiagonal();
    daq += hs * co.c.asDiagonal();
    product_add<Trans::no, Trans::yes>(Scalar(-1), g, ws.mgram[l], ws.ddelta[l]);
    product<Trans::yes, Trans::no>(ws.delta[l], g, ws.dm);  // −dL/d(G ⊙ Ãᵀ)   (n, n)
    ws.du -= ws.dm.cwiseProduct(tape.gram[l]);
    ws.dm = ws.dm.cwiseProduct(co.upper);  // −dL/dG
    product_add<Trans::no, Trans::no>(Scalar(-1), ws.ak[l], ws.dm, daq);
    product_add<Trans::no, Trans::yes>(Scalar(-1), ws.aq[l], ws.dm, ws.dak[l]);
    if (l > 0) {
      ws.g[l - 1] = daq.cwiseProduct(ws.dphiq[l - 1]);
    } else {
      grads.inputs.q.middleCols(t0, n) += daq;
    }
  }

  // (3) Coefficients back to the gates, reversing chunk_coefficients' token loop (0-based token j
  // here; its step maps β_{j−1}, c_{j−1}, column j−1 of Ãᵀ and pm(·, j) to β_j, c_j, column j and
  // pm(·, j+1)). Adjoints: bb of β_j, bc of c_j, bu(i) of Ãᵀ(i, j), bp(i) of pm(i, j+1).
  ws.du.col(n - 1) += ws.da_last;  // a_last is the last column of Ãᵀ
  auto dalpha = grads.inputs.alpha.segment(t0, n);
  auto deta = grads.inputs.eta.segment(t0, n);
  ws.dtheta.setZero(n);
  auto& dtheta = ws.dtheta;  // dL/d(steps after the clamp)
  ws.bp.setZero(n + 1);
  ws.bu.resize(n);
  ws.bp(0) = dp_n0;
  for (Index i = 0; i < n; ++i) {  // s_last(i) = θ_i P_{n,i}
    ws.bp(i + 1) = ws.ds_last(i) * Scalar(theta(i));
    dtheta(i) += ws.ds_last(i) * ws.pm(i + 1, n);
    ws.bu(i) = ws.du(i, n - 1);
  }
  Scalar bb = ws.dbeta(n - 1), bc = ws.dc(n - 1);
  for (Index j = n - 1; j >= 0; --j) {
    const Scalar keep = Scalar(1) - Scalar(alpha(j));
    const Scalar prev_beta = j > 0 ? co.beta(j - 1) : Scalar(1);
    const Scalar prev_c = j > 0 ? co.c(j - 1) : Scalar(0);
    // β_j = keep β_{j−1},  c_j = keep c_{j−1} + pm(0, j+1),
    // Ãᵀ(i, j) = keep Ãᵀ(i, j−1) + θ_i pm(i+1, j+1)
    Scalar dkeep = bb * prev_beta + bc * prev_c;
    ws.bp(0) += bc;
    for (Index i = 0; i <= j; ++i) {
      dtheta(i) += ws.bu(i) * ws.pm(i + 1, j + 1);
      ws.bp(i + 1) += ws.bu(i) * Scalar(theta(i));
    }
    for (Index i = 0; i < j; ++i) dkeep += ws.bu(i) * co.upper(i, j - 1);
    if (j > 0) {
      bb = bb * keep + ws.dbeta(j - 1);
      bc = bc * keep + ws.dc(j - 1);
      for (Index i = 0; i < j; ++i) ws.bu(i) = ws.bu(i) * keep + ws.du(i, j - 1);
    }
    // pm(i, j+1) = η_j pm(i, j) for i ≤ j; pm(j+1, j+1) = 1
    Scalar de = 0;
    for (Index i = 0; i <= j; ++i) {
      de += ws.bp(i) * ws.pm(i, j);
      ws.bp(i) *= Scalar(eta(j));
    }
    // bp(j + 1), the adjoint of the constant pm(j+1, j+1) = 1, is never read again.
    dalpha(j) -= dkeep;
    deta(j) += de;
  }

  // (4) The surprise clamp θ'_i = θ_i s_i, s_i = min(1, c/‖u_i‖) (docs/MATH.md §8.2): dθ_i = s_i dθ'_i
  // and, where it clamps, d‖u_i‖ = −(s_i/‖u_i‖) θ_i dθ'_i, with ∂‖u_i‖/∂δ_{l,i} = δ_{l,i} ‖a_{l−1,i}‖²/‖u_i‖
  // and ∂‖u_i‖/∂a_{l−1,i} = a_{l−1,i} ‖δ_{l,i}‖²/‖u_i‖. It reaches the key path before (5) runs.
  auto dtheta_in = grads.inputs.theta.segment(t0, n);
  const auto theta_in = in.theta.segment(t0, n);
  const Scalar clamp = static_cast<Scalar>(cfg.surprise_clamp);
  for (Index i = 0; i < n; ++i) {
    const bool clamped = clamp > 0 && ws.surprise(i) > clamp;
    const Scalar s_i = clamped ? clamp / ws.surprise(i) : Scalar(1);
    dtheta_in(i) += s_i * dtheta(i);
    if (!clamped) continue;
    const Scalar dg = -(s_i / ws.surprise(i)) * Scalar(theta_in(i)) * dtheta(i);
    const Scalar f = dg / ws.surprise(i);
    for (Index l = 0; l < L; ++l) {
      const Scalar a2 = ws.ak[l].col(i).squaredNorm(), d2 = ws.delta[l].col(i).squaredNorm();
      ws.ddelta[l].col(i) += (f * a2) * ws.delta[l].col(i);
      ws.dak[l].col(i) += (f * d2) * ws.ak[l].col(i);
    }
  }

  // (5) Key path. First the Δ recurrence Δ_{l−1} = T_l ⊙ φ'(Z_{l−1}), T_l = Θ⁰_lᵀ Δ_l, in the
  // reverse of its forward order (Δ_0's adjoint is complete first).
  for (Index l = 1; l < L; ++l) {
    activation_second_derivative(cfg.activation, tape.zk[l - 1], ws.ddphi[l - 1]);
    ws.dzk[l - 1].array() += ws.ddelta[l - 1].array() * tape.tk[l].array() * ws.ddphi[l - 1].array();
    auto& dt = ws.dtk[l];
    dt = ws.ddelta[l - 1].cwiseProduct(ws.dphik[l - 1]);  // dL/dT_l   (n_in, n)
    product_add<Trans::no, Trans::yes>(Scalar(1), ws.delta[l], dt, gw0[l]);
    product_add<Trans::no, Trans::no>(Scalar(1), w0[l], dt, ws.ddelta[l]);
  }
  // Δ_L = inner_signal(Z_L, K, V, γ)
  inner_signal_backward(cfg, tape.zk[L - 1], in, t0, n, ws.ddelta[L - 1], ws.dzk[L - 1], grads);
  // Z_l = Θ⁰_l A_{l−1}, A_l = φ(Z_l)
  for (Index l = L - 1; l >= 0; --l) {
    product_add<Trans::no, Trans::yes>(Scalar(1), ws.dzk[l], ws.ak[l], gw0[l]);
    product_add<Trans::yes, Trans::no>(Scalar(1), w0[l], ws.dzk[l], ws.dak[l]);
    if (l > 0) {
      ws.dzk[l - 1] += ws.dak[l].cwiseProduct(ws.dphik[l - 1]);
    } else {
      grads.inputs.k.middleCols(t0, n) += ws.dak[0];
    }
  }

}

}  // namespace detail

/// \brief memory_forward that also fills `cache` for memory_backward. Outputs are bit-for-bit
/// those of memory_forward (the same sub-chunk routine runs) when the state is settled. A state
/// with pending tokens (from memory_forward) is settled first, which changes its form, not its
/// value (MemoryState); the gradient of the initial state is that of the settled form. The state
/// is left settled: a call that ends inside a chunk has applied its last tokens to W and S.
///
/// \param cfg, chunk_size, in, state  as memory_forward_into
/// \param cache    filled (storage reused when it already has the right shapes)
/// \param options  checkpoint_every = r >= 1
/// \param y        outputs (d, T), written
template <class Scalar>
void memory_forward_train_into(const MemoryConfig& cfg, Index chunk_size, const KernelInputs<Scalar>& in,
                               MemoryState<Scalar>& state, MemoryForwardCache<Scalar>& cache,
                               const MemoryTrainOptions& options, MatrixRef<Scalar> y) {
  constexpr const char* where = "titans::memory_forward_train";
  if (options.checkpoint_every < 1)
    detail::raise<InvalidArgument>(where, "options.checkpoint_every is ", options.checkpoint_every, ", expected >= 1");
  detail::check_kernel_call(where, cfg, chunk_size, in, state, y);
  detail::settle_unchecked(cfg, chunk_size, state);  // training runs on the settled form (MemoryState)
  const Index T = in.tokens();

  const Index b = chunk_size, r = options.checkpoint_every;
  cache.config = cfg;
  cache.chunk_size = b;
  cache.checkpoint_every = r;
  cache.start_position = state.position;
  cache.inputs = in;
  cache.starts.clear();
  for (Index t = 0, pos = state.position; t < T;) {
    cache.starts.push_back(t);
    const Index n = std::min<Index>(T - t, b - pos % b);
    t += n;
    pos += n;
  }
  cache.starts.push_back(T);
  const Index m = cache.subchunks(), segments = (m + r - 1) / r;
  cache.checkpoints.resize(static_cast<std::size_t>(std::max<Index>(1, segments)));
  cache.tapes.resize(static_cast<std::size_t>(segments));
  cache.checkpoints[0] = state;  // also the T = 0 case: backward needs the state's shapes
  cache.checkpoints[0].chunk_start_storage.clear();  // spare storage, not worth keeping per checkpoint

  detail::KernelWorkspace<Scalar> ws(cfg.depth);
  for (Index s = 0; s < m; ++s) {
    const auto seg = static_cast<std::size_t>(s / r);
    if (s % r == 0 && s > 0) {
      cache.checkpoints[seg] = state;
      cache.checkpoints[seg].chunk_start_storage.clear();
    }
    const bool last_of_segment = s % r == r - 1 || s == m - 1;
    const Index t = cache.starts[static_cast<std::size_t>(s)];
    const Index n = cache.starts[static_cast<std::size_t>(s) + 1] - t;
    detail::memory_subchunk(cfg, b, in, t, n, state, ws, y.middleCols(t, n),
                            last_of_segment ? &cache.tapes[seg] : nullptr);
  }
}

/// \brief As memory_forward_train_into, returning the outputs (d, T).
template <class Scalar>
Matrix<Scalar> memory_forward_train(const MemoryConfig& cfg, Index chunk_size, const KernelInputs<Scalar>& in,
                                    MemoryState<Scalar>& state, MemoryForwardCache<Scalar>& cache,
                                    const MemoryTrainOptions& options = {}) {
  Matrix<Scalar> y(cfg.dim, in.tokens());
  memory_forward_train_into<Scalar>(cfg, chunk_size, in, state, cache, options, y);
  return y;
}

/// \brief Backward of memory_forward_train through the test-time updates (second order).
///
/// Adds (+=) into `grads`: dL/d(inputs) — k, v, q (d, T), α, η, θ (T), γ (d) with output_norm,
/// δ_t (T) with the huber bias —
/// and dL/d(initial state) — weights, momentum, and chunk_start when the call started inside a chunk. Size them
/// first (make_kernel_gradients); zeroing is the caller's (set_zero).
///
/// \param cache   filled by memory_forward_train (not modified)
/// \param dY      dL/d(outputs), (d, T)
/// \param dfinal  dL/d(final state): weights and momentum (shapes of Θ, or empty = zero) and
///                chunk_start (shapes of Θ or empty when the call ended inside a chunk; must be
///                empty when it ended at a chunk boundary)
/// \param grads   accumulated
template <class Scalar>
void memory_backward(const MemoryForwardCache<Scalar>& cache, const ConstMatrixRef<Scalar>& dY,
                     const MemoryState<Scalar>& dfinal, MemoryKernelGradients<Scalar>& grads) {
  constexpr const char* where = "titans::memory_backward";
  if (!cache.filled()) detail::raise<InvalidArgument>(where, "cache was never filled by memory_forward_train");
  const MemoryConfig& cfg = cache.config;
  const Index L = cfg.depth, T = cache.tokens(), b = cache.chunk_size;
  const bool starts_inside = cache.start_position % b != 0;
  const bool ends_inside = (cache.start_position + T) % b != 0;
  detail::check_shape(where, "dY", dY, cfg.dim, T);
  if (!dfinal.weights.empty()) check_memory_weights(where, "dfinal.weights", cfg, dfinal.weights);
  if (!dfinal.momentum.empty()) check_memory_weights(where, "dfinal.momentum", cfg, dfinal.momentum);
  if (!dfinal.chunk_start.empty()) {
    if (!ends_inside)
      detail::raise<ShapeError>(where, "dfinal.chunk_start holds ", dfinal.chunk_start.size(),
                                " tensors but the call ended at a chunk boundary (position ",
                                cache.start_position + T, ", chunk_size ", b, "), expected none");
    check_memory_weights(where, "dfinal.chunk_start", cfg, dfinal.chunk_start);
  }
  detail::check_shape(where, "grads.inputs.k", grads.inputs.k, cfg.dim, T);
  detail::check_shape(where, "grads.inputs.v", grads.inputs.v, cfg.dim, T);
  detail::check_shape(where, "grads.inputs.q", grads.inputs.q, cfg.dim, T);
  detail::check_shape(where, "grads.inputs.alpha", grads.inputs.alpha, T, 1);
  detail::check_shape(where, "grads.inputs.eta", grads.inputs.eta, T, 1);
  detail::check_shape(where, "grads.inputs.theta", grads.inputs.theta, T, 1);
  if (cfg.output_norm) detail::check_shape(where, "grads.inputs.gain", grads.inputs.gain, cfg.dim, 1);
  if (uses_threshold(cfg.bias))
    detail::check_shape(where, "grads.inputs.threshold", grads.inputs.threshold, T, 1);
  check_memory_weights(where, "grads.state.weights", cfg, grads.state.weights);
  check_memory_weights(where, "grads.state.momentum", cfg, grads.state.momentum);
  if (starts_inside) {
    check_memory_weights(where, "grads.state.chunk_start", cfg, grads.state.chunk_start);
  } else if (!grads.state.chunk_start.empty()) {
    detail::raise<ShapeError>(where, "grads.state.chunk_start holds ", grads.state.chunk_start.size(),
                              " tensors but the call started at a chunk boundary, expected none");
  }

  detail::BackwardWorkspace<Scalar> ws(L);
  const auto Ls = static_cast<std::size_t>(L);
  ws.gw.resize(Ls);
  ws.gs.resize(Ls);
  for (Index l = 0; l < L; ++l) {
    if (dfinal.weights.empty()) ws.gw[l].setZero(cfg.layer_out(l), cfg.layer_in(l));
    else ws.gw[l] = dfinal.weights[l];
    if (dfinal.momentum.empty()) ws.gs[l].setZero(cfg.layer_out(l), cfg.layer_in(l));
    else ws.gs[l] = dfinal.momentum[l];
  }
  ws.gc_active = ends_inside;
  if (ends_inside) {
    ws.gc.resize(Ls);
    for (Index l = 0; l < L; ++l) {
      if (dfinal.chunk_start.empty()) ws.gc[l].setZero(cfg.layer_out(l), cfg.layer_in(l));
      else ws.gc[l] = dfinal.chunk_start[l];
    }
  }

  // Reverse sweep over the segments. Inside a segment of sub-chunks [s0, s1), the forward's own
  // routine reruns s0 … s1−2 from the checkpoint, giving their start states and tapes (s1−1's
  // tape is cached), then the sub-chunks run backwards.
  const Index m = cache.subchunks(), r = cache.checkpoint_every;
  const auto scratch_size = static_cast<std::size_t>(std::min(r, std::max<Index>(m, 1)));
  std::vector<MemoryState<Scalar>> scratch(scratch_size);
  std::vector<detail::SubchunkTape<Scalar>> scratch_tapes(scratch_size);
  std::vector<const MemoryState<Scalar>*> start(scratch_size);
  std::vector<const detail::SubchunkTape<Scalar>*> tape(scratch_size);
  detail::KernelWorkspace<Scalar> fws(L);
  for (Index seg = (m + r - 1) / r - 1; seg >= 0; --seg) {
    const Index s0 = seg * r, s1 = std::min(m, s0 + r);
    start[0] = &cache.checkpoints[static_cast<std::size_t>(seg)];
    for (Index s = s0; s + 1 < s1; ++s) {
      const auto i = static_cast<std::size_t>(s - s0);
      scratch[i + 1] = *start[i];
      const Index t = cache.starts[static_cast<std::size_t>(s)];
      const Index n = cache.starts[static_cast<std::size_t>(s) + 1] - t;
      ws.yscratch.resize(cfg.dim, n);
      detail::memory_subchunk(cfg, b, cache.inputs, t, n, scratch[i + 1], fws, ws.yscratch, &scratch_tapes[i]);
      start[i + 1] = &scratch[i + 1];
      tape[i] = &scratch_tapes[i];
    }
    tape[static_cast<std::size_t>(s1 - 1 - s0)] = &cache.tapes[static_cast<std::size_t>(seg)];
    for (Index s = s1 - 1; s >= s0; --s) {
      const auto i = static_cast<std::size_t>(s - s0);
      const Index t = cache.starts[static_cast<std::size_t>(s)];
      const Index n = cache.starts[static_cast<std::size_t>(s) + 1] - t;
      detail::backward_subchunk(cache, *start[i], *tape[i], t, n, dY.middleCols(t, n), ws, grads);
    }
  }

  for (Index l = 0; l < L; ++l) {
    grads.state.weights[l] += ws.gw[l];
    grads.state.momentum[l] += ws.gs[l];
    if (starts_inside) grads.state.chunk_start[l] += ws.gc[l];
  }
}

// The float and double instantiations (README, "Faster builds: titans::compiled"): PREFIX is `extern` for the
// declarations below and empty in src/instantiate_*.cpp, which define them.
#define TITANS_INSTANTIATE_MEMORY_BACKWARD(PREFIX, S) \
  PREFIX template MemoryKernelGradients<S> make_kernel_gradients<S>(const MemoryConfig&, Index,                  \
                                                                    const MemoryState<S>&);                     \
  PREFIX template MemoryKernelGradients<S> make_kernel_gradients<S>(const MemoryForwardCache<S>&);               \
  PREFIX template void memory_forward_train_into<S>(const MemoryConfig&, Index, const KernelInputs<S>&,          \
                                                    MemoryState<S>&, MemoryForwardCache<S>&,                    \
                                                    const MemoryTrainOptions&, MatrixRef<S>);          \
  PREFIX template Matrix<S> memory_forward_train<S>(const MemoryConfig&, Index, const KernelInputs<S>&,          \
                                                    MemoryState<S>&, MemoryForwardCache<S>&,                    \
                                                    const MemoryTrainOptions&);                                 \
  PREFIX template void memory_backward<S>(const MemoryForwardCache<S>&, const ConstMatrixRef<S>&,      \
                                          const MemoryState<S>&, MemoryKernelGradients<S>&);

#ifdef TITANS_EXTERN_FLOAT
TITANS_INSTANTIATE_MEMORY_BACKWARD(extern, float)
#endif
#ifdef TITANS_EXTERN_DOUBLE
TITANS_INSTANTIATE_MEMORY_BACKWARD(extern, double)
#endif

}  // namespace titans
