// SPDX-License-Identifier: Apache-2.0
//
// \file memory/kernel.hpp
// \brief The test-time update rule of the long-term memory (docs/MATH.md §2–3): surprise with
// momentum, forgetting, chunked (mini-batch) gradient steps, and the fast dual form that
// computes every token's output without materialising per-token weights.
//
// The kernel is usable on its own: give it keys, values, queries and gates per token plus a
// state; it returns the per-token outputs and advances the state.
//
//     titans::MemoryConfig cfg{.dim = 64, .depth = 2};
//     auto state = titans::make_memory_state(cfg, titans::init_memory_weights<double>(cfg, 1));
//     titans::Matrix<double> y = titans::memory_forward(cfg, /*chunk_size=*/16, k, v, q,
//                                                       alpha, eta, theta, state);
#pragma once

#include "../common.hpp"
#include "../detail/gemm.hpp"
#include "../detail/state_passes.hpp"
#include "model.hpp"

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

namespace titans {

/// \brief Per-sequence memory state: Θ, the surprise momentum S and the chunk bookkeeping.
///
/// Chunks are aligned to the absolute token index since the state was made (docs/MATH.md §2), so a
/// stream split into calls at any point gives the same result as one call. The state is owned by
/// the caller; one state per sequence.
///
/// Inside a chunk the state takes one of two equivalent forms (docs/MATH.md §3.3):
///   - settled: `weights` and `momentum` are Θ_t and S_t after the last token, and `chunk_start`
///     holds the chunk-start weights Θ⁰ at which the rest of the chunk's gradients are taken;
///   - pending: the inference kernel (memory_forward) does not rewrite W and S per token; it keeps
///     each token's key-path activations, inner-gradient signals and gates (`pending_*`) and applies
///     them all once, at the chunk's end. `weights`, `momentum` and `chunk_start` are then the
///     settled state `pending_tokens()` tokens back. memory_state_settle turns this form into the
///     first; memory_current_weights gives Θ_t without changing the state.
/// At a chunk boundary there are no pending tokens and `chunk_start` is empty.
template <class Scalar>
struct MemoryState {
  static_assert(std::is_floating_point_v<Scalar>, "titans: Scalar must be a floating-point type");
  using scalar_type = Scalar;
  std::vector<Matrix<Scalar>> weights;      ///< Θ after the last written token; W_l is (n_l, n_{l-1})
  std::vector<Matrix<Scalar>> momentum;     ///< S after the last written token; shapes of weights
  std::vector<Matrix<Scalar>> chunk_start;  ///< Θ⁰ of the chunk in progress, empty at a (settled) chunk boundary
  Matrix<Scalar> pending_keys;   ///< (Σ_l n_{l−1}, m): a_{l−1} at Θ⁰ of each pending token, layers stacked
  Matrix<Scalar> pending_delta;  ///< (Σ_l n_l, m): δ_l of each pending token, layers stacked
  Matrix<Scalar> pending_gates;  ///< (3, m): α, η and θ (after the surprise clamp) of each pending token
  Index position = 0;            ///< tokens written since the state was made (pending ones included)

  /// Tokens written but not yet applied to `weights` and `momentum` (0 in the settled form).
  Index pending_tokens() const { return pending_gates.cols(); }
  /// Storage of `chunk_start` kept between chunks, so that decoding does not free and allocate a
  /// copy of Θ at every chunk (which page-faults once glibc returns it to the OS). Not part of
  /// the state's value: never enumerated, saved or checked.
  std::vector<Matrix<Scalar>> chunk_start_storage;

  /// Tensors "weights.w1", "momentum.w1", …, "chunk_start.w1", … (settled mid-chunk only),
  /// "pending.keys", "pending.delta", "pending.gates" (only when there are pending tokens; files
  /// written before them have none); counter "position".
  TITANS_DEFINE_STATE_FIELDS()

 private:
  template <class Self, class Ar>
  static void fields(Self& s, Ar& ar) {
    ar.tensor_list("weights.w", s.weights);
    ar.tensor_list("momentum.w", s.momentum);
    ar.tensor_list("chunk_start.w", s.chunk_start, &s.weights);
    ar.optional_tensor("pending.keys", s.pending_keys);
    ar.optional_tensor("pending.delta", s.pending_delta);
    ar.optional_tensor("pending.gates", s.pending_gates);
    ar.count("position", s.position);
  }
};

namespace detail {
/// Rows of the pending tokens' stacked key activations (Σ_l n_{l−1}) and signals (Σ_l n_l).
inline Index stacked_inputs(const MemoryConfig& cfg) {
  Index n = 0;
  for (Index l = 0; l < cfg.depth; ++l) n += cfg.layer_in(l);
  return n;
}
inline Index stacked_outputs(const MemoryConfig& cfg) {
  Index n = 0;
  for (Index l = 0; l < cfg.depth; ++l) n += cfg.layer_out(l);
  return n;
}
}  // namespace detail

/// \brief A fresh state: Θ = `initial`, S = 0, position 0.
template <class Scalar>
MemoryState<Scalar> make_memory_state(const MemoryConfig& cfg, const MemoryWeights<Scalar>& initial) {
  constexpr const char* where = "titans::make_memory_state";
  cfg.validate(where);
  check_memory_weights(where, "initial", cfg, initial.w);
  MemoryState<Scalar> s;
  s.weights = initial.w;
  for (const auto& w : initial.w) s.momentum.push_back(Matrix<Scalar>::Zero(w.rows(), w.cols()));
  s.pending_keys.resize(detail::stacked_inputs(cfg), 0);
  s.pending_delta.resize(detail::stacked_outputs(cfg), 0);
  s.pending_gates.resize(3, 0);
  return s;
}

/// \brief What the kernel reads for T tokens of one memory: keys, values and queries, the three
/// gates per token, with cfg.output_norm the gain γ of the read-out's LayerNorm and with the huber
/// bias the threshold δ_t per token (docs/MATH.md §2, §8.3, §11). One type serves as the forward's argument, the training cache's copy of the inputs
/// and the gradients' part for them.
template <class Scalar>
struct KernelInputs {
  static_assert(std::is_floating_point_v<Scalar>, "titans: Scalar must be a floating-point type");
  using scalar_type = Scalar;
  Matrix<Scalar> k, v, q;            ///< keys, values, queries: (d, T) each
  Vector<Scalar> alpha, eta, theta;  ///< forget in [0, 1], momentum in [0, 1], step >= 0: (T) each
  Vector<Scalar> gain;               ///< γ (d) with cfg.output_norm; empty (unused) without
  Vector<Scalar> threshold;          ///< δ_t > 0 (T) with the huber biases (uses_threshold); empty (unused) with the others

  Index tokens() const { return k.cols(); }

  /// δ_t of tokens [t0, t0 + n), or an empty block when there are no thresholds.
  auto thresholds(Index t0, Index n) const {
    return threshold.size() > 0 ? threshold.segment(t0, n) : threshold.segment(0, 0);
  }

  /// \brief Tokens [t0, t0 + n) (a copy; the gain is the same).
  KernelInputs columns(Index t0, Index n) const {
    KernelInputs out;
    out.k = k.middleCols(t0, n);
    out.v = v.middleCols(t0, n);
    out.q = q.middleCols(t0, n);
    out.alpha = alpha.segment(t0, n);
    out.eta = eta.segment(t0, n);
    out.theta = theta.segment(t0, n);
    out.gain = gain;
    if (threshold.size() > 0) out.threshold = threshold.segment(t0, n);
    return out;
  }

  /// \brief The same inputs in another scalar type.
  template <class To>
  KernelInputs<To> cast() const {
    KernelInputs<To> out;
    out.k = k.template cast<To>();
    out.v = v.template cast<To>();
    out.q = q.template cast<To>();
    out.alpha = alpha.template cast<To>();
    out.eta = eta.template cast<To>();
    out.theta = theta.template cast<To>();
    out.gain = gain.template cast<To>();
    out.threshold = threshold.template cast<To>();
    return out;
  }

  /// Visits "k", "v", "q", "alpha", "eta", "theta" and, when they are sized, "gain" and "threshold".
  TITANS_DEFINE_FOR_EACH()

 private:
  template <class Self, class F>
  static void for_each_impl(Self& self, F& f) {
    f(std::string("k"), self.k);
    f(std::string("v"), self.v);
    f(std::string("q"), self.q);
    f(std::string("alpha"), self.alpha);
    f(std::string("eta"), self.eta);
    f(std::string("theta"), self.theta);
    if (self.gain.size() > 0) f(std::string("gain"), self.gain);
    if (self.threshold.size() > 0) f(std::string("threshold"), self.threshold);
  }
};

namespace detail {
/// Throws unless the state's pending tokens have the shapes `cfg` gives, with gates in range (a
/// state with none may have empty tensors, as one built by hand). Like the weights, their values
/// are not scanned on every call (sessions refuse non-finite values when they are read).
template <class Scalar>
void check_pending(const char* where, const MemoryConfig& cfg, const MemoryState<Scalar>& state) {
  const Index m = state.pending_tokens();
  if (m == 0 && state.pending_keys.cols() == 0 && state.pending_delta.cols() == 0) return;
  check_shape(where, "state.pending_keys", state.pending_keys, stacked_inputs(cfg), m);
  check_shape(where, "state.pending_delta", state.pending_delta, stacked_outputs(cfg), m);
  check_shape(where, "state.pending_gates", state.pending_gates, 3, m);
  check_range(where, "state.pending_gates (alpha, eta)", state.pending_gates.topRows(2), 0.0, 1.0);
  check_range(where, "state.pending_gates (theta)", state.pending_gates.row(2), 0.0, std::numeric_limits<double>::max());
}
}  // namespace detail

/// \brief Throws unless `state` fits `cfg` and chunk size `chunk_size`.
template <class Scalar>
void check_memory_state(const char* where, const MemoryConfig& cfg, Index chunk_size,
                        const MemoryState<Scalar>& state) {
  check_memory_weights(where, "state.weights", cfg, state.weights);
  check_memory_weights(where, "state.momentum", cfg, state.momentum);
  if (state.position < 0) detail::raise<InvalidArgument>(where, "state.position is ", state.position, ", expected >= 0");
  detail::check_pending(where, cfg, state);
  const Index m = state.pending_tokens();
  if (m > 0) {
    if (m > state.position || (state.position - m) % chunk_size + m >= chunk_size)
      detail::raise<InvalidArgument>(where, "state holds ", m, " pending tokens at position ", state.position,
                                     " with chunk_size ", chunk_size,
                                     ": pending tokens must lie within one chunk and not complete it");
  }
  const Index settled = state.position - m;  // where weights, momentum and chunk_start stand
  if (settled % chunk_size != 0) {
    check_memory_weights(where, "state.chunk_start", cfg, state.chunk_start);
  } else if (!state.chunk_start.empty()) {
    detail::raise<InvalidArgument>(where, "state.chunk_start holds ", state.chunk_start.size(),
                                   " tensors at a chunk boundary (position ", settled, ", chunk_size ",
                                   chunk_size, "): the state was made with another chunk size");
  }
}

/// \brief The product-only coefficients of one chunk (docs/MATH.md §3), for n tokens with gates
/// α_j, η_j, θ_j (j = 1..n). No divisions, so any gate in [0,1] (0 and 1 included) is exact.
template <class Scalar>
struct ChunkCoefficients {
  Vector<Scalar> beta;    ///< β_j = Π_{t≤j} (1−α_t)                 (n)
  Vector<Scalar> c;       ///< c_j = (1−α_j) c_{j−1} + P_{j0}          (n)
  Matrix<Scalar> upper;   ///< Ãᵀ: (i, j) = A_{ji} for i ≤ j, else 0    (n, n)
  Vector<Scalar> a_last;  ///< A_{n,i}                                  (n)
  Vector<Scalar> s_last;  ///< θ_i P_{n,i}                              (n)
  Scalar p_n0 = 1;        ///< P_{n0} = Π η_t
};

/// \brief Computes the chunk coefficients into `out` (reusing its storage). Cost O(n²).
template <class Scalar, class DA, class DE, class DT>
void chunk_coefficients(const Eigen::MatrixBase<DA>& alpha, const Eigen::MatrixBase<DE>& eta,
                        const Eigen::MatrixBase<DT>& theta, ChunkCoefficients<Scalar>& out) {
  const Index n = alpha.size();
  out.beta.resize(n);
  out.c.resize(n);
  out.upper.setZero(n, n);
  out.a_last.resize(n);
  out.s_last.resize(n);
  // Token by token (column j of `upper` is token j+1), by the recurrences
  //   P_{ji} = P_{j−1,i} η_j,  A_{ji} = (1−α_j) A_{j−1,i} + θ_i P_{ji}.
  // `p(i)` carries P_{j,i} for i = 0..j (index 0 is "before the chunk").
  Vector<Scalar> p = Vector<Scalar>::Zero(n + 1);
  p(0) = 1;  // P_{00}
  Scalar beta = 1, c = 0;
  for (Index j = 0; j < n; ++j) {  // token j+1
    const Scalar keep = Scalar(1) - Scalar(alpha(j));
    const Scalar e = Scalar(eta(j));
    for (Index i = 0; i <= j; ++i) p(i) *= e;  // P_{j+1, i} for i ≤ j (i = 0 is the chunk start)
    p(j + 1) = 1;                               // P_{j+1, j+1}
    beta *= keep;
    c = keep * c + p(0);
    out.beta(j) = beta;
    out.c(j) = c;
    for (Index i = 0; i <= j; ++i) {  // A_{j+1, i+1}
      const Scalar prev = (j > 0 && i < j) ? out.upper(i, j - 1) : Scalar(0);
      out.upper(i, j) = keep * prev + Scalar(theta(i)) * p(i + 1);
    }
  }
  for (Index i = 0; i < n; ++i) {
    out.a_last(i) = out.upper(i, n - 1);
    out.s_last(i) = Scalar(theta(i)) * p(i + 1);
  }
  out.p_n0 = n > 0 ? p(0) : Scalar(1);
}

namespace detail {

/// Forward intermediates of one sub-chunk that the backward pass (memory/backward.hpp) keeps
/// instead of recomputing; memory_subchunk records them when given a tape. Layers are 0-based.
template <class Scalar>
struct SubchunkTape {
  std::vector<Matrix<Scalar>> zk;    ///< Z_l = Θ⁰_l A_{l−1}, l < L                          (n_l, n)
  std::vector<Matrix<Scalar>> tk;    ///< Θ⁰_lᵀ Δ_l for 1 ≤ l < L (entry 0 unused)            (n_{l−1}, n)
  std::vector<Matrix<Scalar>> zq;    ///< Z̄_l for l < L−1, and Z̄_L with output_norm            (n_l, n)
  std::vector<Matrix<Scalar>> gram;  ///< A_{l−1}ᵀ Ā_{l−1} before the causal mask, l < L       (n, n)
};

/// Buffers reused across the chunks of one call.
template <class Scalar>
struct KernelWorkspace {
  std::vector<Matrix<Scalar>> ak, zk, delta, aq;  // key activations, key pre-activations, δ_l, query activations
  Matrix<Scalar> zq, scaled, gram, tmp, dphi, yout, at;
  Vector<Scalar> theta, surprise;  // the sub-chunk's steps after the clamp; ‖u_i‖
  ChunkCoefficients<Scalar> coef;
  // With pending tokens: the sub-chunk from the settled state, pending tokens first.
  std::vector<Matrix<Scalar>> ak_all, delta_all;
  Vector<Scalar> alpha_all, eta_all, theta_all;
  explicit KernelWorkspace(Index depth)
      : ak(static_cast<std::size_t>(depth)), zk(ak.size()), delta(ak.size()), aq(ak.size()), ak_all(ak.size()),
        delta_all(ak.size()) {}
};

/// Applies n tokens to the settled W and S (docs/MATH.md §3, the end of a sub-chunk): with the
/// coefficients `co` of those n tokens, a[l] = A_{l−1} (n_{l−1}, n) and delta[l] = Δ_l (n_l, n),
///   W_l ← β_n W_l + c_n S_l − (Δ_l diag(A_{n,·})) A_{l−1}ᵀ,   S_l ← P_{n0} S_l − (Δ_l diag(θ_i P_{ni})) A_{l−1}ᵀ.
template <class Scalar>
void apply_tokens(const MemoryConfig& cfg, const std::vector<Matrix<Scalar>>& a, const std::vector<Matrix<Scalar>>& delta,
                  const ChunkCoefficients<Scalar>& co, MemoryState<Scalar>& state, Matrix<Scalar>& tmp,
                  Matrix<Scalar>& scaled, Matrix<Scalar>& at) {
  const Index n = co.beta.size();
  const Scalar beta_n = co.beta(n - 1), c_n = co.c(n - 1), p_n = co.p_n0;
  // Up to this many tokens, W_l and S_l are updated in one pass (update_state_pair: each read
  // and written once, the row blocks of the two rank-n factors from cache) rather than by
  // W ← βW + cS and two GEMMs, which stream W three times and S twice. Measured at d = 256,
  // E = 4, alternated (benchmarks/README.md): at n = 16, decode from memory 7% faster and the
  // b = 16 forward 2–4%, decode from the last-level cache 5% slower; at n = 64 the GEMMs are 5%
  // faster (their register blocking beats the pass's once the update is compute-bound).
  constexpr Index fused_update_max_tokens = 16;
  for (Index l = 0; l < cfg.depth; ++l) {
    auto& w = state.weights[l];
    auto& s = state.momentum[l];
    tmp = delta[l] * co.a_last.asDiagonal();     // (n_l, n)
    scaled = delta[l] * co.s_last.asDiagonal();  // (n_l, n)
    if (n <= fused_update_max_tokens) {
      at = a[l].transpose();  // (n, n_{l−1})
      update_state_pair(w, s, beta_n, c_n, p_n, tmp, scaled, at);
    } else {
      // W_l ← β_n W_l + c_n S_l, then the two rank-n products (the second scales S_l by P_n0
      // itself). Column blocks that keep W_l and S_l in cache through all three were measured
      // slower (d = 256, b = 64: 360 → 377 ms; benchmarks/README.md).
      w = beta_n * w + c_n * s;
      product_add<Trans::no, Trans::yes>(Scalar(-1), tmp, a[l], w);
      gemm<Trans::no, Trans::yes>(Scalar(-1), scaled, a[l], p_n, s);
    }
  }
}

/// The pending tokens as per-layer blocks into `a` and `delta`, their gates into the three vectors.
template <class Scalar>
void unstack_pending(const MemoryConfig& cfg, const MemoryState<Scalar>& state, std::vector<Matrix<Scalar>>& a,
                     std::vector<Matrix<Scalar>>& delta, Vector<Scalar>& alpha, Vector<Scalar>& eta,
                     Vector<Scalar>& theta, Index extra = 0) {
  const Index m = state.pending_tokens();
  Index ri = 0, ro = 0;
  for (Index l = 0; l < cfg.depth; ++l) {
    const Index nin = cfg.layer_in(l), nout = cfg.layer_out(l);
    a[l].resize(nin, m + extra);
    delta[l].resize(nout, m + extra);
    a[l].leftCols(m) = state.pending_keys.middleRows(ri, nin);
    delta[l].leftCols(m) = state.pending_delta.middleRows(ro, nout);
    ri += nin;
    ro += nout;
  }
  alpha.resize(m + extra);
  eta.resize(m + extra);
  theta.resize(m + extra);
  alpha.head(m) = state.pending_gates.row(0).transpose();
  eta.head(m) = state.pending_gates.row(1).transpose();
  theta.head(m) = state.pending_gates.row(2).transpose();
}

/// Drops the pending tokens (keeping the tensors' row counts).
template <class Scalar>
void clear_pending(MemoryState<Scalar>& state) {
  state.pending_keys.resize(state.pending_keys.rows(), 0);
  state.pending_delta.resize(state.pending_delta.rows(), 0);
  state.pending_gates.resize(3, 0);
}

/// The surprise clamp (docs/MATH.md §8.2): ‖u_i‖ = sqrt(Σ_l ‖δ_{l,i}‖² ‖a_{l−1,i}‖²) into
/// `surprise` (n) and θ_i · min(1, c / ‖u_i‖) into `theta_out` (θ unchanged when the clamp is off).
template <class Scalar, class DT>
void clamp_steps(const MemoryConfig& cfg, const std::vector<Matrix<Scalar>>& a, const std::vector<Matrix<Scalar>>& delta,
                 const Eigen::MatrixBase<DT>& theta, Vector<Scalar>& surprise, Vector<Scalar>& theta_out) {
  theta_out = theta;
  if (!(cfg.surprise_clamp > 0)) return;
  surprise.setZero(theta.size());
  for (Index l = 0; l < cfg.depth; ++l)
    surprise.array() += delta[l].colwise().squaredNorm().transpose().array() * a[l].colwise().squaredNorm().transpose().array();
  surprise = surprise.cwiseSqrt();
  const Scalar c = static_cast<Scalar>(cfg.surprise_clamp);
  for (Index i = 0; i < theta.size(); ++i)
    if (surprise(i) > c) theta_out(i) *= c / surprise(i);
}

/// The sub-chunk's n tokens (key activations ws.ak, signals ws.delta, gates with the clamped
/// steps ws.theta) join the state's pending ones, and the position advances past them.
template <class Scalar>
void append_pending(const MemoryConfig& cfg, const KernelInputs<Scalar>& in, Index t0, Index n,
                    const KernelWorkspace<Scalar>& ws, MemoryState<Scalar>& state) {
  const Index m = state.pending_tokens(), total = m + n;
  state.pending_keys.conservativeResize(stacked_inputs(cfg), total);
  state.pending_delta.conservativeResize(stacked_outputs(cfg), total);
  state.pending_gates.conservativeResize(3, total);
  Index ri = 0, ro = 0;
  for (Index l = 0; l < cfg.depth; ++l) {
    state.pending_keys.block(ri, m, cfg.layer_in(l), n) = ws.ak[l];
    state.pending_delta.block(ro, m, cfg.layer_out(l), n) = ws.delta[l];
    ri += cfg.layer_in(l);
    ro += cfg.layer_out(l);
  }
  state.pending_gates.block(0, m, 1, n) = in.alpha.segment(t0, n).transpose();
  state.pending_gates.block(1, m, 1, n) = in.eta.segment(t0, n).transpose();
  state.pending_gates.block(2, m, 1, n) = ws.theta.transpose();
  state.position += n;
}

/// One token (n = 1) from a state settled at its chunk start, so that Θ⁰ is
/// `state.weights`: the values of the general sub-chunk below (memory_subchunk) with five reads
/// of W and S instead of seven (docs/MATH.md §3.3, "One-token path"): W_1 k, W_1 q and S_1 q in
/// one pass over W_1 and S_1; for L ≥ 2, W_2ᵀ δ_2 and the query's W_2 ā_1, S_2 ā_1 in one pass
/// over W_2 and S_2. The token's own term uses θ_t before the surprise clamp: if the clamp scales
/// θ_t, returns false with the state untouched, and the caller runs the general path. Otherwise
/// ws.ak, ws.zk, ws.delta, ws.theta, ws.coef and `y` hold what the general path computes (to
/// rounding), and `tape`, when given, what it records. The training forward takes this path too,
/// so that it stays memory_forward bit for bit.
template <class Scalar, class DY>
bool decode_token(const MemoryConfig& cfg, const KernelInputs<Scalar>& in, Index t0, const MemoryState<Scalar>& state,
                  KernelWorkspace<Scalar>& ws, const Eigen::MatrixBase<DY>& y_out, SubchunkTape<Scalar>* tape) {
  auto& y = const_cast<Eigen::MatrixBase<DY>&>(y_out);
  const Index L = cfg.depth;
  const Index m = state.pending_tokens();
  const auto k = in.k.col(t0);
  const auto q = in.q.col(t0);
  const Scalar theta_t = in.theta(t0);
  ws.ak.resize(static_cast<std::size_t>(L));
  ws.zk.resize(ws.ak.size());
  ws.delta.resize(ws.ak.size());
  ws.aq.resize(ws.ak.size());

  // Gates of the pending tokens and this one (its θ before the clamp): β_t, c_t and column m of
  // Ãᵀ do not depend on θ_t, its diagonal entry is θ_t.
  ws.alpha_all.resize(m + 1);
  ws.eta_all.resize(m + 1);
  ws.theta_all.resize(m + 1);
  if (m > 0) {  // (a row of an empty matrix would offset a null pointer)
    ws.alpha_all.head(m) = state.pending_gates.row(0).transpose();
    ws.eta_all.head(m) = state.pending_gates.row(1).transpose();
    ws.theta_all.head(m) = state.pending_gates.row(2).transpose();
  }
  ws.alpha_all(m) = in.alpha(t0);
  ws.eta_all(m) = in.eta(t0);
  ws.theta_all(m) = theta_t;
  chunk_coefficients(ws.alpha_all, ws.eta_all, ws.theta_all, ws.coef);
  const auto& co = ws.coef;
  const Scalar beta = co.beta(m), c = co.c(m);
  const auto u_pending = co.upper.col(m).head(m);  // A_{t,i} of the pending tokens i

  // The pending tokens' blocks of layer l, and Z̄_l −= Δ_l^pending ((A_{l−1}^pending)ᵀ ā ⊙ Ã).
  std::vector<Index> rin(static_cast<std::size_t>(L) + 1, 0), rout(rin.size(), 0);
  for (Index l = 0; l < L; ++l) {
    rin[l + 1] = rin[l] + cfg.layer_in(l);
    rout[l + 1] = rout[l] + cfg.layer_out(l);
  }
  auto subtract_pending = [&](Index l, const auto& abar, Vector<Scalar>& z) {
    if (m == 0) return;
    const auto pa = state.pending_keys.middleRows(rin[l], cfg.layer_in(l));
    const auto pd = state.pending_delta.middleRows(rout[l], cfg.layer_out(l));
    const Vector<Scalar> g = (pa.transpose() * abar).cwiseProduct(u_pending);
    z.noalias() -= pd * g;
  };
  // Columns per block: 32 KiB of floats, so that a block of W_l stays in the L1 cache between its
  // two uses (measured at d = 256, E = 4 on Zen 3: 8 columns of W_1 and 32 of W_2 were the fastest;
  // at 64 of W_2 the pass was no faster than three separate products).
  auto block_cols = [](Index rows) { return std::max<Index>(1, Index(8192) / std::max<Index>(1, rows)); };

  // Layer 1: Z_1 = W_1 k and the query's β W_1 q + c S_1 q, one pass.
  const Matrix<Scalar>& w1 = state.weights[0];
  const Matrix<Scalar>& s1 = state.momentum[0];
  Vector<Scalar> zk1 = Vector<Scalar>::Zero(w1.rows());
  Vector<Scalar> zq1 = Vector<Scalar>::Zero(w1.rows());
  {
    const Vector<Scalar> bq = beta * q, cq = c * q;
    const Index nb = block_cols(w1.rows());
    for (Index j0 = 0; j0 < w1.cols(); j0 += nb) {
      const Index nj = std::min(nb, w1.cols() - j0);
      zk1.noalias() += w1.middleCols(j0, nj) * k.segment(j0, nj);
      zq1.noalias() += w1.middleCols(j0, nj) * bq.segment(j0, nj);
      zq1.noalias() += s1.middleCols(j0, nj) * cq.segment(j0, nj);
    }
  }
  ws.ak[0] = k;
  ws.aq[0] = q;
  ws.zk[0] = zk1;
  subtract_pending(0, q, zq1);

  // The rest of the key path at Θ⁰ and δ_L … δ_2 (δ_1 comes with the pass over W_2 below).
  for (Index l = 1; l < L; ++l) {
    activation_apply(cfg.activation, ws.zk[l - 1], ws.ak[l]);
    product<Trans::no, Trans::no>(state.weights[l], ws.ak[l], ws.zk[l]);
  }
  inner_signal(cfg, ws.zk[L - 1], k, in.v.col(t0), in.thresholds(t0, 1), in.gain, ws.tmp, ws.delta[L - 1]);
  if (tape) {
    tape->zk = ws.zk;
    tape->tk.resize(static_cast<std::size_t>(L));
    tape->zq.resize(static_cast<std::size_t>(L));
    tape->gram.resize(static_cast<std::size_t>(L));
  }
  for (Index l = L - 1; l > 1; --l) {
    product<Trans::yes, Trans::no>(state.weights[l], ws.delta[l], ws.tmp);
    if (tape) tape->tk[l] = ws.tmp;
    activation_derivative(cfg.activation, ws.zk[l - 1], ws.dphi);
    ws.delta[l - 1] = ws.tmp.cwiseProduct(ws.dphi);
  }

  const Scalar kq = k.dot(q);
  Vector<Scalar> zq;  // Z̄_l of the layer being finished
  if (L == 1) {
    zq = zq1;
  } else {
    // Layer 2's pass: per block of hidden units J, δ_1[J] = (W_2[:,J]ᵀ δ_2) ⊙ φ'(Z_1[J]), then
    // Z̄_1[J] −= δ_1[J] (kᵀq) θ_t, ā_1[J] = φ(Z̄_1[J]), and Z̄_2 += W_2[:,J] β ā_1[J] + S_2[:,J] c ā_1[J].
    const Matrix<Scalar>& w2 = state.weights[1];
    const Matrix<Scalar>& s2 = state.momentum[1];
    const Vector<Scalar> d2 = ws.delta[1];
    Vector<Scalar> d1(w2.cols()), abar(w2.cols()), zq2 = Vector<Scalar>::Zero(w2.rows());
    Vector<Scalar> tb, dphi, zb, ab, tk1(tape ? w2.cols() : 0);
    const Scalar own = kq * theta_t;
    const Index nb = block_cols(w2.rows());
    for (Index j0 = 0; j0 < w2.cols(); j0 += nb) {
      const Index nj = std::min(nb, w2.cols() - j0);
      const auto wb = w2.middleCols(j0, nj);
      tb.noalias() = wb.transpose() * d2;
      if (tape) tk1.segment(j0, nj) = tb;
      activation_derivative(cfg.activation, zk1.segment(j0, nj), dphi);
      d1.segment(j0, nj) = tb.cwiseProduct(dphi);
      zb = zq1.segment(j0, nj) - own * d1.segment(j0, nj);
      zq1.segment(j0, nj) = zb;
      activation_apply(cfg.activation, zb, ab);
      abar.segment(j0, nj) = ab;
      zq2.noalias() += wb * (beta * ab);
      zq2.noalias() += s2.middleCols(j0, nj) * (c * ab);
    }
    ws.delta[0] = d1;

    // The surprise clamp of this token: if it scales θ_t, the own terms above used the wrong step.
    clamp_steps(cfg, ws.ak, ws.delta, in.theta.segment(t0, 1), ws.surprise, ws.theta);
    if (ws.theta(0) != theta_t) return false;
    ws.aq[1] = abar;
    if (tape) {
      tape->tk[1] = tk1;
      tape->zq[0] = zq1;
    }
    zq = zq2;
    // Finish Z̄_2 and go on up: Z̄_l −= Δ_l^pending(…) + δ_l (a_{l−1}ᵀ ā_{l−1}) θ_t.
    for (Index l = 1; l < L; ++l) {
      if (l > 1) {
        activation_apply(cfg.activation, zq, ws.aq[l]);
        zq.noalias() = state.weights[l] * (beta * ws.aq[l].col(0));
        zq.noalias() += state.momentum[l] * (c * ws.aq[l].col(0));
      }
      const auto aql = ws.aq[l].col(0);
      subtract_pending(l, aql, zq);
      const Scalar gram = ws.ak[l].col(0).dot(aql);
      zq -= (gram * theta_t) * ws.delta[l].col(0);
      if (tape) {
        tape->gram[l] = Matrix<Scalar>::Constant(1, 1, gram);
        if (l + 1 < L || cfg.output_norm) tape->zq[l] = zq;
      }
    }
  }
  if (L == 1) {  // δ_1 is the inner signal, known only now: the clamp's θ_t is used directly
    clamp_steps(cfg, ws.ak, ws.delta, in.theta.segment(t0, 1), ws.surprise, ws.theta);
    if (ws.theta(0) != theta_t) {
      ws.theta_all(m) = ws.theta(0);
      chunk_coefficients(ws.alpha_all, ws.eta_all, ws.theta_all, ws.coef);
    }
    zq -= (kq * ws.theta(0)) * ws.delta[0].col(0);
    if (tape && cfg.output_norm) tape->zq[0] = zq;
  }
  if (tape) tape->gram[0] = Matrix<Scalar>::Constant(1, 1, kq);
  ws.zq = zq;
  memory_readout(cfg, ws.zq, q, in.gain, ws.yout);
  y = ws.yout;
  return true;
}

/// One sub-chunk: tokens [t0, t0 + n) of `in`, starting `state.position % b` tokens into their
/// chunk and not crossing a chunk boundary. Outputs go to `y` (d, n). With a `tape`, the
/// intermediates the backward pass needs are also recorded there (the results do not change).
///
/// `defer` (the inference kernel): when the sub-chunk ends inside its chunk, W and S are left as
/// they are and the tokens join the state's pending ones (docs/MATH.md §3.3); the chunk's end
/// applies them all. A state's pending tokens are always taken into account: the sub-chunk then
/// runs from the settled state, pending tokens first, and only the new tokens' outputs are
/// computed. The training forward (tape) settles its state first, so it never sees pending tokens.
template <class Scalar, class DY>
void memory_subchunk(const MemoryConfig& cfg, Index b, const KernelInputs<Scalar>& in, Index t0, Index n,
                     MemoryState<Scalar>& state, KernelWorkspace<Scalar>& ws, const Eigen::MatrixBase<DY>& y_out,
                     SubchunkTape<Scalar>* tape = nullptr, bool defer = false) {
  auto& y = const_cast<Eigen::MatrixBase<DY>&>(y_out);  // writable block (Eigen's documented idiom)
  const Index L = cfg.depth;
  const Index m = state.pending_tokens();
  const Index offset = (state.position - m) % b;  // where the settled state stands in its chunk
  const bool ends_inside = offset + m + n < b;
  const std::vector<Matrix<Scalar>>& w0 = offset == 0 ? state.weights : state.chunk_start;
  const auto q = in.q.middleCols(t0, n);

  // A decoded token from a state at its chunk start takes fewer passes over W and S.
  const bool fused = n == 1 && offset == 0 && decode_token(cfg, in, t0, state, ws, y, tape);

  if (!fused) {
    // Key path at the chunk-start weights Θ⁰ and the inner-gradient signals δ_l (docs/MATH.md §1).
    if (tape) {
      tape->tk.resize(static_cast<std::size_t>(L));
      tape->zq.resize(static_cast<std::size_t>(L));
      tape->gram.resize(static_cast<std::size_t>(L));
    }
    key_path(cfg, w0, in.k.middleCols(t0, n), in.v.middleCols(t0, n), in.thresholds(t0, n), in.gain, ws.ak, ws.zk,
             ws.delta, tape ? &tape->tk : nullptr, ws.tmp, ws.dphi);
    if (tape) tape->zk = ws.zk;
    clamp_steps(cfg, ws.ak, ws.delta, in.theta.segment(t0, n), ws.surprise, ws.theta);
  }

  // The tokens from the settled state: the pending ones (if any), then these n. decode_token has
  // computed the coefficients; it needs the gathered tokens only to apply them at the chunk's end.
  const std::vector<Matrix<Scalar>>* a = &ws.ak;
  const std::vector<Matrix<Scalar>>* delta = &ws.delta;
  const bool stays_pending = defer && ends_inside;
  if (m == 0 && !fused) {
    chunk_coefficients(in.alpha.segment(t0, n), in.eta.segment(t0, n), ws.theta, ws.coef);
  } else if (m > 0 && !(fused && stays_pending)) {
    unstack_pending(cfg, state, ws.ak_all, ws.delta_all, ws.alpha_all, ws.eta_all, ws.theta_all, n);
    for (Index l = 0; l < L; ++l) {
      ws.ak_all[l].rightCols(n) = ws.ak[l];
      ws.delta_all[l].rightCols(n) = ws.delta[l];
    }
    ws.alpha_all.tail(n) = in.alpha.segment(t0, n);
    ws.eta_all.tail(n) = in.eta.segment(t0, n);
    ws.theta_all.tail(n) = ws.theta;
    chunk_coefficients(ws.alpha_all, ws.eta_all, ws.theta_all, ws.coef);
    a = &ws.ak_all;
    delta = &ws.delta_all;
  }
  const auto& co = ws.coef;

  if (!fused) {
    // Query path, dual form, for the new tokens (columns m.. of the coefficients):
    //   Z̄_l = W_l Ā diag(β) + S_l Ā diag(c) − Δ_l ((A_{l−1}ᵀ Ā_{l−1}) ⊙ Ãᵀ).
    ws.aq[0] = q;
    for (Index l = 0; l < L; ++l) {
      ws.scaled = ws.aq[l] * co.beta.tail(n).asDiagonal();
      product<Trans::no, Trans::no>(state.weights[l], ws.scaled, ws.zq);
      ws.scaled = ws.aq[l] * co.c.tail(n).asDiagonal();
      product_add<Trans::no, Trans::no>(Scalar(1), state.momentum[l], ws.scaled, ws.zq);
      product<Trans::yes, Trans::no>((*a)[l], ws.aq[l], ws.gram);
      if (tape) tape->gram[l] = ws.gram;
      ws.gram = ws.gram.cwiseProduct(co.upper.rightCols(n));
      product_add<Trans::no, Trans::no>(Scalar(-1), (*delta)[l], ws.gram, ws.zq);
      if (tape && (l + 1 < L || cfg.output_norm)) tape->zq[l] = ws.zq;
      if (l + 1 < L) activation_apply(cfg.activation, ws.zq, ws.aq[l + 1]);
    }
    memory_readout(cfg, ws.zq, q, in.gain, ws.yout);
    y = ws.yout;
  }

  if (stays_pending) {  // the new tokens join the pending ones; W and S stay as they are
    append_pending(cfg, in, t0, n, ws, state);
    return;
  }

  // Advance the settled state past every token of the sub-chunk.
  if (offset == 0 && ends_inside) {  // keep Θ⁰ for the rest of this chunk, in the storage of an earlier one
    state.chunk_start.swap(state.chunk_start_storage);
    state.chunk_start.resize(state.weights.size());
    for (std::size_t l = 0; l < state.weights.size(); ++l) state.chunk_start[l] = state.weights[l];
  }
  apply_tokens(cfg, *a, *delta, co, state, ws.tmp, ws.scaled, ws.at);
  if (m > 0) clear_pending(state);
  state.position += n;
  if (!ends_inside && !state.chunk_start.empty()) {
    state.chunk_start_storage.swap(state.chunk_start);
    state.chunk_start.clear();
  }
}

/// The kernel without argument checks (callers have checked).
template <class Scalar, class DY>
void memory_forward_unchecked(const MemoryConfig& cfg, Index b, const KernelInputs<Scalar>& in,
                              MemoryState<Scalar>& state, const Eigen::MatrixBase<DY>& y_out) {
  auto& y = const_cast<Eigen::MatrixBase<DY>&>(y_out);
  KernelWorkspace<Scalar> ws(cfg.depth);
  const Index T = in.tokens();
  Index t = 0;
  while (t < T) {
    const Index n = std::min<Index>(T - t, b - state.position % b);
    memory_subchunk(cfg, b, in, t, n, state, ws, y.middleCols(t, n), static_cast<SubchunkTape<Scalar>*>(nullptr),
                    /*defer=*/true);
    t += n;
  }
}

/// memory_state_settle without argument checks.
template <class Scalar>
void settle_unchecked(const MemoryConfig& cfg, Index b, MemoryState<Scalar>& state) {
  const Index m = state.pending_tokens();
  if (m == 0) return;
  std::vector<Matrix<Scalar>> a(static_cast<std::size_t>(cfg.depth)), delta(a.size());
  Vector<Scalar> alpha, eta, theta;
  unstack_pending(cfg, state, a, delta, alpha, eta, theta);
  ChunkCoefficients<Scalar> co;
  chunk_coefficients(alpha, eta, theta, co);
  if ((state.position - m) % b == 0) state.chunk_start = state.weights;  // the settled state is now mid-chunk
  Matrix<Scalar> tmp, scaled, at;
  apply_tokens(cfg, a, delta, co, state, tmp, scaled, at);
  clear_pending(state);
}

}  // namespace detail

namespace detail {

/// The argument checks shared by every entry point of the kernel (forward and training forward).
template <class Scalar>
void check_kernel_call(const char* where, const MemoryConfig& cfg, Index chunk_size, const KernelInputs<Scalar>& in,
                       const MemoryState<Scalar>& state, const MatrixRef<Scalar>& y) {
  cfg.validate(where);
  if (chunk_size < 1) detail::raise<InvalidArgument>(where, "chunk_size is ", chunk_size, ", expected >= 1");
  check_memory_state(where, cfg, chunk_size, state);
  const Index T = in.tokens();
  detail::check_shape(where, "in.k", in.k, cfg.dim, -1);
  detail::check_shape(where, "in.v", in.v, cfg.dim, T);
  detail::check_shape(where, "in.q", in.q, cfg.dim, T);
  detail::check_shape(where, "in.alpha", in.alpha, T, 1);
  detail::check_shape(where, "in.eta", in.eta, T, 1);
  detail::check_shape(where, "in.theta", in.theta, T, 1);
  if (cfg.output_norm) detail::check_shape(where, "in.gain", in.gain, cfg.dim, 1);
  detail::check_shape(where, "y", y, cfg.dim, T);
  detail::check_finite(where, "in.k", in.k);
  detail::check_finite(where, "in.v", in.v);
  detail::check_finite(where, "in.q", in.q);
  if (cfg.output_norm) detail::check_finite(where, "in.gain", in.gain);
  check_bias_threshold(where, "in.threshold", cfg, in.threshold, T);
  detail::check_range(where, "in.alpha", in.alpha, 0.0, 1.0);
  detail::check_range(where, "in.eta", in.eta, 0.0, 1.0);
  detail::check_range(where, "in.theta", in.theta, 0.0, std::numeric_limits<double>::max());
}

}  // namespace detail

/// \brief Writes T tokens into the memory and reads T outputs, by the chunked dual form.
///
/// For token t (chunk of size b aligned to the absolute index): u_t = ∇ℓ(Θ⁰; k_t, v_t) at the
/// chunk-start weights, S_t = η_t S_{t−1} − θ_t u_t, Θ_t = (1 − α_t) Θ_{t−1} + S_t, and the output
/// is y_t = M_{Θ_t}(q_t) — the weights *after* the token's own write (causal). b = 1 is the exact
/// token-by-token rule. With cfg.surprise_clamp = c > 0, θ_t is first scaled by min(1, c/‖u_t‖).
/// ℓ is cfg.bias (docs/MATH.md §11), ||M(k) − v||² by default.
/// `state` is advanced past the T tokens.
///
/// \param cfg        the memory MLP's shape and read-out
/// \param chunk_size b >= 1
/// \param in         keys, values, queries (d, T), gates (T), with cfg.output_norm γ (d), with
///                   the huber bias δ_t (T)
/// \param state      per-sequence state, advanced in place
/// \param y          outputs (d, T), written
template <class Scalar>
void memory_forward_into(const MemoryConfig& cfg, Index chunk_size, const KernelInputs<Scalar>& in,
                         MemoryState<Scalar>& state, MatrixRef<Scalar> y) {
  detail::check_kernel_call("titans::memory_forward", cfg, chunk_size, in, state, y);
  detail::memory_forward_unchecked(cfg, chunk_size, in, state, y);
}

/// \brief Applies a state's pending tokens to its weights and momentum (docs/MATH.md §3.3): the
/// state's value is unchanged (the same outputs follow), its form becomes the settled one, in
/// which `weights` and `momentum` are Θ_t and S_t. Costs one pass over W and S.
template <class Scalar>
void memory_state_settle(const MemoryConfig& cfg, Index chunk_size, MemoryState<Scalar>& state) {
  constexpr const char* where = "titans::memory_state_settle";
  cfg.validate(where);
  if (chunk_size < 1) detail::raise<InvalidArgument>(where, "chunk_size is ", chunk_size, ", expected >= 1");
  check_memory_state(where, cfg, chunk_size, state);
  detail::settle_unchecked(cfg, chunk_size, state);
}

/// \brief Θ after the state's last token, layer by layer: `state.weights`, or with pending
/// tokens β_m W_l + c_m S_l − (Δ_l diag(A_{m,·})) A_{l−1}ᵀ (a new copy; the state is unchanged).
template <class Scalar>
std::vector<Matrix<Scalar>> memory_current_weights(const MemoryConfig& cfg, const MemoryState<Scalar>& state) {
  constexpr const char* where = "titans::memory_current_weights";
  cfg.validate(where);
  check_memory_weights(where, "state.weights", cfg, state.weights);
  if (state.pending_tokens() == 0) return state.weights;
  check_memory_weights(where, "state.momentum", cfg, state.momentum);
  detail::check_pending(where, cfg, state);
  std::vector<Matrix<Scalar>> a(static_cast<std::size_t>(cfg.depth)), delta(a.size()), w(a.size());
  Vector<Scalar> alpha, eta, theta;
  detail::unstack_pending(cfg, state, a, delta, alpha, eta, theta);
  ChunkCoefficients<Scalar> co;
  chunk_coefficients(alpha, eta, theta, co);
  const Index m = state.pending_tokens();
  for (Index l = 0; l < cfg.depth; ++l) {
    w[l] = co.beta(m - 1) * state.weights[l] + co.c(m - 1) * state.momentum[l];
    const Matrix<Scalar> scaled = delta[l] * co.a_last.asDiagonal();
    detail::product_add<detail::Trans::no, detail::Trans::yes>(Scalar(-1), scaled, a[l], w[l]);
  }
  return w;
}

/// \brief As memory_forward_into, returning the outputs (d, T).
template <class Scalar>
Matrix<Scalar> memory_forward(const MemoryConfig& cfg, Index chunk_size, const KernelInputs<Scalar>& in,
                              MemoryState<Scalar>& state) {
  Matrix<Scalar> y(cfg.dim, in.tokens());
  memory_forward_into<Scalar>(cfg, chunk_size, in, state, y);
  return y;
}

/// \brief Retrieval without update (M*, Eq 15): reads `q` (d, T) from the state's current
/// weights (memory_current_weights) and writes nothing. Returns (d, T). `gain` is γ (d) with cfg.output_norm, else empty.
template <class Scalar>
Matrix<Scalar> memory_retrieve(const MemoryConfig& cfg, const MemoryState<Scalar>& state,
                               const ConstMatrixRef<Scalar>& q /* (d, T) */,
                               const Vector<Scalar>& gain /* (d) or empty */) {
  constexpr const char* where = "titans::memory_retrieve";
  cfg.validate(where);
  check_memory_weights(where, "state.weights", cfg, state.weights);
  detail::check_shape(where, "q", q, cfg.dim, -1);
  detail::check_finite(where, "q", q);
  detail::check_memory_gain(where, cfg, gain);
  if (state.pending_tokens() > 0) return memory_apply<Scalar>(cfg, memory_current_weights(cfg, state), q, gain);
  return memory_apply<Scalar>(cfg, state.weights, q, gain);
}

/// \brief Floating-point operations of memory_forward for T tokens with chunk size b, counted as
/// docs/MATH.md §3 does (GEMMs and the masked b×b products; elementwise work not counted). For L = 2
/// this is about (22·E·d² + 4·b·(1+E)·d)·T.
inline double memory_forward_flops(const MemoryConfig& cfg, Index chunk_size, Index tokens) {
  double per_token = 0;
  for (Index l = 0; l < cfg.depth; ++l) {
    const double nout = static_cast<double>(cfg.layer_out(l)), nin = static_cast<double>(cfg.layer_in(l));
    per_token += 2 * nout * nin;                   // key path forward
    if (l > 0) per_token += 2 * nout * nin;        // δ back through W_l
    per_token += 4 * nout * nin;                   // query path: W and S terms
    per_token += 4 * nout * nin;                   // end of chunk: W and S updates
    per_token += 2.0 * static_cast<double>(chunk_size) * (nin + nout);  // Gram and masked product
  }
  return per_token * static_cast<double>(tokens);
}

// The float and double instantiations (README, "Faster builds: titans::compiled"): PREFIX is `extern` for the
// declarations below and empty in src/instantiate_*.cpp, which define them.
#define TITANS_INSTANTIATE_MEMORY_KERNEL(PREFIX, S) \
  PREFIX template MemoryState<S> make_memory_state<S>(const MemoryConfig&, const MemoryWeights<S>&);             \
  PREFIX template void check_memory_state<S>(const char*, const MemoryConfig&, Index, const MemoryState<S>&);    \
  PREFIX template void memory_forward_into<S>(const MemoryConfig&, Index, const KernelInputs<S>&,                \
                                              MemoryState<S>&, MatrixRef<S>);                           \
  PREFIX template Matrix<S> memory_forward<S>(const MemoryConfig&, Index, const KernelInputs<S>&,                \
                                              MemoryState<S>&);                                                  \
  PREFIX template Matrix<S> memory_retrieve<S>(const MemoryConfig&, const MemoryState<S>&,                       \
                                               const ConstMatrixRef<S>&, const Vector<S>&);                      \
  PREFIX template void memory_state_settle<S>(const MemoryConfig&, Index, MemoryState<S>&);                      \
  PREFIX template std::vector<Matrix<S>> memory_current_weights<S>(const MemoryConfig&, const MemoryState<S>&);

#ifdef TITANS_EXTERN_FLOAT
TITANS_INSTANTIATE_MEMORY_KERNEL(extern, float)
#endif
#ifdef TITANS_EXTERN_DOUBLE
TITANS_INSTANTIATE_MEMORY_KERNEL(extern, double)
#endif

}  // namespace titans
