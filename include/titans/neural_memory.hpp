// SPDX-License-Identifier: Apache-2.0
//
// \file neural_memory.hpp
// \brief The neural long-term memory layer (docs/MATH.md §4): projections, causal depthwise
// convolutions, ℓ2-normalised keys and queries, data-dependent gates per token and head, H
// independent memories written and read by the chunked dual form, and the gated output.
//
// Four kinds of data, never mixed: NeuralMemoryConfig (validated in the constructor),
// NeuralMemoryParams (read-only during forward, shared by every sequence and thread),
// NeuralMemoryState (one per sequence, owned by the caller), and the outputs.
//
//     titans::NeuralMemoryConfig cfg;          // D = 256, H = 4, L = 2, b = 16 by default
//     titans::NeuralMemory<float> layer(cfg);
//     auto params = layer.init(/*seed=*/42);
//     auto state = layer.initial_state(params);
//     titans::Matrix<float> y = layer.forward(params, x /* (D, T) */, state);  // continues `state`
#pragma once

#include "common.hpp"
#include "detail/gemm.hpp"
#include "detail/metadata.hpp"
#include "detail/norms.hpp"
#include "detail/parallel.hpp"
#include "detail/random.hpp"
#include "memory/backward.hpp"
#include "memory/kernel.hpp"
#include "memory/model.hpp"
#include "parameters.hpp"

#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace titans {

/// \brief Everything that fixes the shape and behaviour of a NeuralMemory layer.
struct NeuralMemoryConfig {
  Index dim = 256;         ///< D: model width (input and output features)
  Index heads = 4;         ///< H: independent memories, each of width d = D / H
  Index depth = 2;         ///< L: memory MLP depth (1 = linear memory)
  Index expansion = 4;     ///< E: memory hidden width E·d
  Activation activation = Activation::silu;
  // The defaults are the bounded deep memory (docs/MATH.md §8): M(k) = k + γ ⊙ LN(z_L), the
  // surprise clamp and η ≤ η_max. A config read from a file that predates them has them off.
  bool residual = true;    ///< memory MLP in residual form M(k) = k + (read-out of z_L)
  /// The memory's read-out is γ ⊙ LayerNorm(z_L), γ (params.memory_gain) learned by the outer
  /// loop; with `residual` this is the revised paper's M(k) = k + γ ⊙ LN(z_L) (docs/MATH.md §8.3).
  bool output_norm = true;
  /// c > 0: each token's step is scaled by min(1, c / ‖u_t‖), its inner gradient's norm (docs/MATH.md
  /// §8.2); 0 = off. [choice] The default clips outliers only: at initialisation the median ‖u_t‖
  /// of the default layer is about 80 at D = 64 and 160 at D = 256.
  double surprise_clamp = 250;
  Index chunk_size = 16;   ///< b: tokens per gradient mini-batch (1 = exact token-by-token rule)
  Index conv_kernel = 4;   ///< causal depthwise convolution width over time (1 = none)
  double theta_max = 1.0;  ///< θ = θ_max σ(·)
  /// η = η_max σ(·), η_max in [0, 1]: bounds the momentum's effective step θ / (1 − η) by
  /// θ_max / (1 − η_max) (docs/MATH.md §8.4); 1 = unbounded, 0 = no momentum (η ≡ 0).
  double eta_max = 0.95;
  /// α = α_max σ(·), α_max in [0, 1]: the forgetting gate (the state keeps (1 − α) of the
  /// weights); 1 = unbounded, 0 = no forgetting (α ≡ 0, the paper's Table 5 ablation).
  double alpha_max = 1.0;
  /// [choice] Gates constant within each chunk. The paper's "mean over the chunk" would let a
  /// token's gate depend on later tokens of its chunk, which breaks causality and streaming; a
  /// chunk's gates are therefore computed from the pre-activation of its *first* token.
  bool per_chunk_gates = false;
  double norm_eps = 1e-6;  ///< ε of the ℓ2 normalisation and of the output RMSNorm
  /// The memory's inner loss ℓ(M(k) − v) (docs/MATH.md §11); l2 is the paper's ‖M(k) − v‖².
  AttentionalBias bias = AttentionalBias::l2;
  double bias_p = 3;          ///< p >= 1 of the lp bias
  double bias_eps = 1e-6;     ///< ε > 0 of the lp bias's |x|_ε = sqrt(x² + ε)
  /// δ_max > 0 of the huber bias: each token's threshold is δ_t = δ_max σ(w_δᵀx_t + b_δ) per head
  /// (params.w_delta, b_delta; docs/MATH.md §11.5). [choice] The default 4 puts δ ≈ 2 at
  /// initialisation, inside the range of the initial residual norms.
  double threshold_max = 4;

  Index head_dim() const { return heads > 0 ? dim / heads : 0; }

  /// The per-head memory MLP shape.
  MemoryConfig memory() const {
    MemoryConfig m;
    m.dim = head_dim();
    m.depth = depth;
    m.expansion = expansion;
    m.activation = activation;
    m.residual = residual;
    m.output_norm = output_norm;
    m.norm_eps = norm_eps;
    m.surprise_clamp = surprise_clamp;
    m.bias = bias;
    m.bias_p = bias_p;
    m.bias_eps = bias_eps;
    return m;
  }

  /// The fields as checkpoint metadata keys (detail/metadata.hpp): v(key, field) for a key every
  /// file must have, v(key, field, default) for one whose absence has a meaning. Listed once for
  /// to_metadata and neural_memory_config_from_metadata; docs/WEIGHTS.md documents them.
  template <class Self, class V>
  static void metadata_fields(Self& c, V& v) {
    const NeuralMemoryConfig dflt{};
    v("neural_memory.dim", c.dim);
    v("neural_memory.heads", c.heads);
    v("neural_memory.depth", c.depth);
    v("neural_memory.expansion", c.expansion);
    v("neural_memory.activation", c.activation, dflt.activation);
    v("neural_memory.residual", c.residual);
    v("neural_memory.output_norm", c.output_norm, false);  // absent: a file from before the bounds
    v("neural_memory.surprise_clamp", c.surprise_clamp, 0.0);
    v("neural_memory.eta_max", c.eta_max, 1.0);
    v("neural_memory.alpha_max", c.alpha_max, 1.0);  // absent: a file from before the bound
    v("neural_memory.chunk_size", c.chunk_size);
    v("neural_memory.conv_kernel", c.conv_kernel);
    v("neural_memory.theta_max", c.theta_max);
    v("neural_memory.per_chunk_gates", c.per_chunk_gates, dflt.per_chunk_gates);
    v("neural_memory.norm_eps", c.norm_eps, dflt.norm_eps);
    v("neural_memory.bias", c.bias, AttentionalBias::l2);  // absent: a file from before the biases
    v("neural_memory.bias_p", c.bias_p, dflt.bias_p);
    v("neural_memory.bias_eps", c.bias_eps, dflt.bias_eps);
    v("neural_memory.threshold_max", c.threshold_max, dflt.threshold_max);
  }

  /// Throws InvalidArgument naming the field.
  void validate(const char* where = "titans::NeuralMemoryConfig") const {
    detail::check_range(where, "dim", dim, 1, limits::dim);
    detail::check_range(where, "heads", heads, 1, dim);
    if (dim % heads != 0)
      detail::raise<InvalidArgument>(where, "heads (", heads, ") does not divide dim (", dim, ")");
    detail::check_range(where, "chunk_size", chunk_size, 1, limits::chunk_size);
    detail::check_range(where, "conv_kernel", conv_kernel, 1, limits::conv_kernel);
    if (!(theta_max >= 0) || !std::isfinite(theta_max))
      detail::raise<InvalidArgument>(where, "theta_max is ", theta_max, ", expected a finite value >= 0");
    if (!(norm_eps > 0) || !std::isfinite(norm_eps))
      detail::raise<InvalidArgument>(where, "norm_eps is ", norm_eps, ", expected a finite value > 0");
    if (!(eta_max >= 0 && eta_max <= 1))  // also rejects NaN
      detail::raise<InvalidArgument>(where, "eta_max is ", eta_max, ", expected a value in [0, 1]");
    if (!(alpha_max >= 0 && alpha_max <= 1))
      detail::raise<InvalidArgument>(where, "alpha_max is ", alpha_max, ", expected a value in [0, 1]");
    if (!(threshold_max > 0) || !std::isfinite(threshold_max))
      detail::raise<InvalidArgument>(where, "threshold_max is ", threshold_max, ", expected a finite value > 0");
    memory().validate(where);
  }
};

/// \brief The config as string key/value pairs (keys prefixed "neural_memory."), e.g. for a
/// checkpoint's `__metadata__`, so a saved file fully describes the layer it belongs to.
inline std::map<std::string, std::string> to_metadata(const NeuralMemoryConfig& c) {
  std::map<std::string, std::string> m;
  detail::MetadataWriter w(m);
  NeuralMemoryConfig::metadata_fields(c, w);
  return m;
}

/// \brief Rebuilds a config from to_metadata's pairs; throws FormatError naming a malformed key,
/// or every missing required key at once, and InvalidArgument if the values form an invalid
/// config. Keys with a default (metadata_fields) may be missing: the bounds added later
/// (output_norm, surprise_clamp, eta_max, alpha_max) then read as off and the bias as l2, so
/// files written before them load with the behaviour they had.
inline NeuralMemoryConfig neural_memory_config_from_metadata(const std::map<std::string, std::string>& m) {
  constexpr const char* where = "titans::neural_memory_config_from_metadata";
  detail::MetadataFieldReader r(where, m);
  NeuralMemoryConfig c;
  NeuralMemoryConfig::metadata_fields(c, r);
  r.finish();
  c.validate(where);
  return c;
}

/// \brief The learned outer parameters of a NeuralMemory layer (a parameter set).
/// Heads are stacked by rows: head h owns rows [h·d, (h+1)·d) of w_k, w_v, w_q and the conv
/// kernels, row h of the gate (and huber threshold) projections, and rows [h·n_l, (h+1)·n_l) of
/// memory_init[l].
template <class Scalar>
struct NeuralMemoryParams {
  static_assert(std::is_floating_point_v<Scalar>, "titans: Scalar must be a floating-point type");
  using scalar_type = Scalar;
  Matrix<Scalar> w_k, w_v, w_q;              ///< (D, D) key, value, query projections
  Matrix<Scalar> conv_k, conv_v, conv_q;     ///< (D, K) depthwise kernels; column K−1 is the current token
  Matrix<Scalar> w_alpha, w_eta, w_theta;    ///< (H, D) gate projections
  Matrix<Scalar> b_alpha, b_eta, b_theta;    ///< (H, 1) gate biases
  /// (H, D) and (H, 1): the huber bias's threshold projection, δ_t = δ_max σ(w_delta x_t + b_delta)
  /// (docs/MATH.md §11.5); empty with the other biases.
  Matrix<Scalar> w_delta, b_delta;
  std::vector<Matrix<Scalar>> memory_init;   ///< Θ_init, layer l: (H·n_l, n_{l−1})
  Matrix<Scalar> memory_gain;                ///< (D, 1) γ of each head's read-out norm (output_norm only; else empty)
  Matrix<Scalar> w_gate;                     ///< (D, D) output gate projection W_G
  Matrix<Scalar> norm_gain;                  ///< (D, 1) RMSNorm gains
  Matrix<Scalar> w_out;                      ///< (D, D) output projection W_O

  TITANS_DEFINE_FOR_EACH()

 private:
  template <class Self, class F>
  static void for_each_impl(Self& p, F& f) {
    f("w_k", p.w_k);
    f("w_v", p.w_v);
    f("w_q", p.w_q);
    f("conv_k", p.conv_k);
    f("conv_v", p.conv_v);
    f("conv_q", p.conv_q);
    f("w_alpha", p.w_alpha);
    f("b_alpha", p.b_alpha);
    f("w_eta", p.w_eta);
    f("b_eta", p.b_eta);
    f("w_theta", p.w_theta);
    f("b_theta", p.b_theta);
    if (p.w_delta.size() > 0) f("w_delta", p.w_delta);
    if (p.b_delta.size() > 0) f("b_delta", p.b_delta);
    for (std::size_t l = 0; l < p.memory_init.size(); ++l) f("memory_init.w" + std::to_string(l + 1), p.memory_init[l]);
    if (p.memory_gain.size() > 0) f("memory_gain", p.memory_gain);
    f("w_gate", p.w_gate);
    f("norm_gain", p.norm_gain);
    f("w_out", p.w_out);
  }
};

/// \brief Per-sequence state of a NeuralMemory layer. A batch of sequences is a batch of states.
template <class Scalar>
struct NeuralMemoryState {
  using scalar_type = Scalar;
  std::vector<MemoryState<Scalar>> heads;  ///< one memory (Θ, S, chunk bookkeeping) per head
  Matrix<Scalar> conv_tail;                ///< (3D, K−1): projected [k; v; q] of the last K−1 tokens
  Matrix<Scalar> chunk_gates;              ///< (3H, 1): gate pre-activations of the chunk in progress
  Index position = 0;                      ///< tokens seen since the state was made

  /// Tensors "head0.weights.w1", …, "conv_tail", "chunk_gates"; counters "position", "head0.position", ….
  TITANS_DEFINE_STATE_FIELDS()

 private:
  template <class Self, class Ar>
  static void fields(Self& s, Ar& ar) {
    for (std::size_t h = 0; h < s.heads.size(); ++h) ar.nested("head" + std::to_string(h) + ".", s.heads[h]);
    ar.tensor("conv_tail", s.conv_tail);
    ar.tensor("chunk_gates", s.chunk_gates);
    ar.count("position", s.position);
  }
};

/// \brief The per-token inputs of the memory kernels, as the layer computes them (for
/// inspection and for checking the layer against the kernel).
template <class Scalar>
struct MemoryInputs {
  Matrix<Scalar> k, v, q;              ///< (D, T): head h in rows [h·d, (h+1)·d)
  Matrix<Scalar> alpha, eta, theta;    ///< (H, T)
  Matrix<Scalar> threshold;            ///< (H, T) δ_t with the huber bias; empty with the others
};

/// \brief What NeuralMemory::backward needs from a NeuralMemory::forward_train call: the input,
/// the state's history at the call start, the intermediates of the projection, convolution,
/// normalisation, gate and output paths, and one kernel cache per head.
template <class Scalar>
struct NeuralMemoryCache {
  Matrix<Scalar> x;                      ///< (D, T) input
  Matrix<Scalar> start_conv_tail;        ///< (3D, K−1) state.conv_tail at the call start
  Index start_position = 0;              ///< state.position at the call start
  Matrix<Scalar> ext[3];                 ///< (D, K−1+T) [tail | W x] for k, v, q
  Matrix<Scalar> conv[3];                ///< (D, T) convolution outputs (before SiLU)
  Matrix<Scalar> silu_k, silu_q;         ///< (D, T) SiLU outputs before ℓ2 normalisation
  MemoryInputs<Scalar> in;               ///< what the memories were fed
  /// (H, T) σ of the gates' pre-activations, α, η, θ in that order (α = α_max σ, η = η_max σ,
  /// θ = θ_max σ).
  Matrix<Scalar> sig_gate[3];
  Matrix<Scalar> sig_threshold;          ///< (H, T) σ of the huber threshold's pre-activation (δ = δ_max σ); else empty
  std::vector<Index> gate_source;        ///< per token: column whose gate pre-activation it used; −1: the state's
  Index final_gate_source = -1;          ///< same, for the final state's chunk_gates
  std::vector<MemoryForwardCache<Scalar>> heads;
  Matrix<Scalar> y;                      ///< (D, T) memory outputs
  Matrix<Scalar> rinv;                   ///< (H, T) 1 / RMS of each head's output
  Matrix<Scalar> n;                      ///< (D, T) RMS-normalised y (before gain and gate)
  Matrix<Scalar> g;                      ///< (D, T) σ(W_G x)

  /// Bytes held by the cache's tensors.
  std::size_t bytes() const {
    std::size_t total = 0;
    auto add = [&](const auto& m) { total += static_cast<std::size_t>(m.size()) * sizeof(Scalar); };
    add(x);
    add(start_conv_tail);
    for (int i = 0; i < 3; ++i) {
      add(ext[i]);
      add(conv[i]);
    }
    for (const auto* m : {&silu_k, &silu_q, &in.k, &in.v, &in.q, &in.alpha, &in.eta, &in.theta, &in.threshold, &sig_gate[0], &sig_gate[1],
                          &sig_gate[2], &sig_threshold, &y, &rinv, &n, &g})
      add(*m);
    for (const auto& h : heads) total += h.bytes();
    return total + gate_source.size() * sizeof(Index);
  }
};

/// \brief The neural long-term memory layer. Holds only its (validated) config: parameters and
/// state are passed explicitly, so one layer object serves many sequences and threads.
template <class Scalar>
class NeuralMemory {
  static_assert(std::is_floating_point_v<Scalar>, "titans: Scalar must be a floating-point type");

 public:
  using Params = NeuralMemoryParams<Scalar>;
  using State = NeuralMemoryState<Scalar>;
  using Mat = Matrix<Scalar>;

  explicit NeuralMemory(const NeuralMemoryConfig& cfg);

  const NeuralMemoryConfig& config() const { return cfg_; }

  /// \brief Deterministic initialisation from `seed` (same numbers on every platform).
  /// Projections N(0, 1/D); conv kernels pass the current token through (last tap 1) plus small
  /// noise; gate biases start at α ≈ 3e-4 (a memory horizon of thousands of tokens: a faster
  /// forget gate lets a deep memory decay to the all-zero weights, where its gradient vanishes),
  /// η ≈ 0.73·η_max, θ ≈ θ_max·min(0.12, 1/hidden width);
  /// memory N(0, 1/n_{l−1});
  /// norm gains, and the read-out gains γ (output_norm), 1.
  /// Number of scalars in init()'s parameters, computed from the config alone (nothing is
  /// allocated: load_model checks it against the file before building the parameters).
  Index parameter_count() const {
    const Index D = cfg_.dim, H = cfg_.heads;
    // w_k, w_v, w_q, w_gate, w_out; the convolutions; the gate projections and biases; Θ_init
    // of every head; the read-out gain; the output norm's gain; the huber threshold projection.
    return 5 * D * D + 3 * D * cfg_.conv_kernel + 3 * H * D + 3 * H + H * mem_.weight_count() +
           (cfg_.output_norm ? D : 0) + D + (uses_threshold(cfg_.bias) ? H * D + H : 0);
  }

  Params init(std::uint64_t seed) const;

  /// \brief Throws ShapeError naming the tensor if `p` does not fit this layer's config.
  void check_params(const Params& p, const char* where = "titans::NeuralMemory::check_params") const;

  /// \brief A fresh per-sequence state: every head's memory at Θ_init, S = 0, empty history.
  State initial_state(const Params& p) const;

  /// \brief Throws unless `s` is a state of this layer.
  void check_state(const State& s, const char* where = "titans::NeuralMemory::check_state") const;

  /// \brief Applies each head's pending tokens to its weights and momentum (memory_state_settle;
  /// docs/MATH.md §3.3). The state's value is unchanged; its form becomes the one forward_train
  /// leaves and whose gradients backward takes (size a dinitial from a settled state).
  void settle(State& state) const;

  /// \brief Reads and writes T tokens: returns the layer output o (D, T) and advances `state`.
  /// Any split of a sequence into calls gives the same outputs as one call.
  Mat forward(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, State& state) const;

  /// \brief forward that also fills `cache` for backward (same outputs and state advance).
  /// `options.checkpoint_every = r > 1` keeps only every r-th chunk-start memory state per head
  /// and recomputes the rest during backward (less memory for long sequences).
  Mat forward_train(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, State& state,
                    NeuralMemoryCache<Scalar>& cache, const MemoryTrainOptions& options = {}) const;

  /// \brief Backward of forward_train, through the test-time updates (second order).
  ///
  /// Adds dL/d(params) into `grads` and dL/dx into `dx` (D, T); when `dinitial` is given, adds
  /// dL/d(state at the call start) into it (shape it with zeros_like of that state). `dfinal` is
  /// dL/d(state after the call), or nullptr for zero: a sequence trained in several calls passes
  /// the later call's `dinitial` as the earlier call's `dfinal`. For a state made by
  /// initial_state(params), pass its gradient to initial_state_backward to reach memory_init.
  void backward(const Params& p, const NeuralMemoryCache<Scalar>& cache, const Eigen::Ref<const Mat>& dout /* (D, T) */,
                const State* dfinal, Params& grads, Eigen::Ref<Mat> dx /* (D, T), accumulated */,
                State* dinitial = nullptr) const;

  /// \brief Adds the gradient of a state made by initial_state(params) into params' gradient:
  /// each head's initial weights are its rows of memory_init (momentum and history start at 0).
  void initial_state_backward(const State& dstate, Params& grads) const;

  /// \brief One decode step: x (D) → o (D); identical to forward on a single column.
  Vector<Scalar> step(const Params& p, const Eigen::Ref<const Vector<Scalar>>& x /* (D) */, State& state) const;

  /// \brief Forward over a batch: sequence i continues `states[i]`. Sequences never share memory.
  std::vector<Mat> forward_batch(const Params& p, const std::vector<Mat>& xs, std::vector<State>& states) const;

  /// \brief Retrieval without update (M*, Eq 15) through the full output path: queries are made
  /// from x (using the state's convolution history, which is not advanced), read from each
  /// head's current weights, then normalised, gated and projected. Nothing is written.
  Mat retrieve(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, const State& state) const;

  /// \brief The raw memory read M*_Θ(q) per head, stacked (D, T), before norm, gate and
  /// projection. Nothing is written.
  Mat read(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, const State& state) const;

  /// \brief Head h's read-out gain γ (d) from params.memory_gain, or an empty vector without
  /// output_norm: what memory_apply needs to read head h's memory.
  Vector<Scalar> gain(const Params& p, Index h) const;

  /// \brief The keys, values, queries and gates the layer would feed its memories for x, given
  /// the state's history. The state is not changed.
  MemoryInputs<Scalar> memory_inputs(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */,
                                     const State& state) const;

 private:
  // dst += src for a memory state's gradient; chunk_start only where the call started inside a chunk.
  static void add_state_gradient(MemoryState<Scalar>& dst, const MemoryState<Scalar>& src);

  // With finite inputs and parameters, the memory's reads are non-finite only when its
  // test-time updates diverged.
  void check_diverged(const char* where, const Params& p, const Mat& y) const;

  void check_call(const char* where, const Params& p, const Eigen::Ref<const Mat>& x, const State& state) const;

  // Throws unless `g` (the argument `name` of backward: "dfinal", "dinitial") is a finite state
  // gradient for a state at `position`: conv_tail, chunk_gates, one memory per head. With
  // `empty_is_zero` a head's weights, momentum or chunk_start may be empty (zero), as in memory_backward.
  void check_state_gradient(const char* where, const char* name, const State& g, Index position,
                            bool empty_is_zero) const;

  /// Projections, causal convolutions (continuing state.conv_tail), SiLU, ℓ2 normalisation per
  /// head, and the gates. With advance, the conv tail and chunk gates of `state` move on.
  MemoryInputs<Scalar> inputs_unchecked(const Params& p, const Eigen::Ref<const Mat>& x, State& state,
                                        bool advance, NeuralMemoryCache<Scalar>* cache) const;

  /// α_max, η_max, θ_max for gi = 0, 1, 2: gate gi is gate_max(gi)·σ(its pre-activation).
  Scalar gate_max(int gi) const {
    return static_cast<Scalar>(gi == 0 ? cfg_.alpha_max : gi == 1 ? cfg_.eta_max : cfg_.theta_max);
  }

  /// Head h's kernel inputs: its rows of `in` and of params.memory_gain (γ, output_norm only).
  KernelInputs<Scalar> head_inputs(const Params& p, const MemoryInputs<Scalar>& in, Index h) const;

  /// o = W_O (RMSNorm_head(y) ⊙ gain ⊙ σ(W_G x)).
  Mat output(const Params& p, const Eigen::Ref<const Mat>& x, const Mat& y, NeuralMemoryCache<Scalar>* cache) const;

  NeuralMemoryConfig cfg_;
  MemoryConfig mem_;
};

template <class Scalar>
NeuralMemory<Scalar>::NeuralMemory(const NeuralMemoryConfig& cfg) : cfg_(cfg) {
  cfg_.validate("titans::NeuralMemory");
  mem_ = cfg_.memory();
}

template <class Scalar>
auto NeuralMemory<Scalar>::init(std::uint64_t seed) const -> Params {
  detail::Rng rng(seed);
  const Index D = cfg_.dim, H = cfg_.heads, K = cfg_.conv_kernel;
  const double proj = 1.0 / std::sqrt(static_cast<double>(D));
  Params p;
  auto normal = [&](Index r, Index c, double sd) {
    Mat m(r, c);
    rng.fill_normal(m, sd);
    return m;
  };
  p.w_k = normal(D, D, proj);
  p.w_v = normal(D, D, proj);
  p.w_q = normal(D, D, proj);
  for (Mat* c : {&p.conv_k, &p.conv_v, &p.conv_q}) {
    *c = normal(D, K, 0.02);
    c->col(K - 1).array() += Scalar(1);
  }
  p.w_alpha = normal(H, D, 0.02);
  p.w_eta = normal(H, D, 0.02);
  p.w_theta = normal(H, D, 0.02);
  p.b_alpha = Mat::Constant(H, 1, Scalar(-8));
  p.b_eta = Mat::Constant(H, 1, Scalar(1));
  // θ starts at θ_max·min(0.12, 1/n_hidden): the inner loss's curvature in the last layer grows
  // with the hidden width (‖a_{L−1}‖² ~ E·d), and a fixed step diverges on wide memories.
  const double hidden = static_cast<double>(mem_.depth > 1 ? mem_.layer_in(mem_.depth - 1) : mem_.dim);
  const double s_theta = std::min(0.12, 1.0 / hidden);
  p.b_theta = Mat::Constant(H, 1, static_cast<Scalar>(std::log(s_theta / (1 - s_theta))));
  for (Index l = 0; l < mem_.depth; ++l)
    p.memory_init.push_back(normal(H * mem_.layer_out(l), mem_.layer_in(l),
                                   1.0 / std::sqrt(static_cast<double>(mem_.layer_in(l)))));
  if (cfg_.output_norm) p.memory_gain = Mat::Ones(D, 1);
  p.w_gate = normal(D, D, proj);
  p.norm_gain = Mat::Ones(D, 1);
  p.w_out = normal(D, D, proj);
  if (uses_threshold(cfg_.bias)) {  // drawn last: the other tensors are those of any bias
    p.w_delta = normal(H, D, 0.02);
    p.b_delta = Mat::Zero(H, 1);  // δ ≈ δ_max / 2
  }
  return p;
}

template <class Scalar>
void NeuralMemory<Scalar>::check_params(const Params& p, const char* where) const {
  const Index D = cfg_.dim, H = cfg_.heads, K = cfg_.conv_kernel;
  detail::check_shape(where, "params.w_k", p.w_k, D, D);
  detail::check_shape(where, "params.w_v", p.w_v, D, D);
  detail::check_shape(where, "params.w_q", p.w_q, D, D);
  detail::check_shape(where, "params.conv_k", p.conv_k, D, K);
  detail::check_shape(where, "params.conv_v", p.conv_v, D, K);
  detail::check_shape(where, "params.conv_q", p.conv_q, D, K);
  detail::check_shape(where, "params.w_alpha", p.w_alpha, H, D);
  detail::check_shape(where, "params.w_eta", p.w_eta, H, D);
  detail::check_shape(where, "params.w_theta", p.w_theta, H, D);
  detail::check_shape(where, "params.b_alpha", p.b_alpha, H, 1);
  detail::check_shape(where, "params.b_eta", p.b_eta, H, 1);
  detail::check_shape(where, "params.b_theta", p.b_theta, H, 1);
  const bool huber = uses_threshold(cfg_.bias);
  detail::check_shape(where, "params.w_delta", p.w_delta, huber ? H : 0, huber ? D : 0);
  detail::check_shape(where, "params.b_delta", p.b_delta, huber ? H : 0, huber ? 1 : 0);
  if (static_cast<Index>(p.memory_init.size()) != mem_.depth)
    detail::raise<ShapeError>(where, "params.memory_init has ", p.memory_init.size(), " layers, expected depth ",
                              mem_.depth);
  for (Index l = 0; l < mem_.depth; ++l) {
    const std::string name = "params.memory_init[" + std::to_string(l) + "]";
    detail::check_shape(where, name.c_str(), p.memory_init[l], H * mem_.layer_out(l), mem_.layer_in(l));
  }
  detail::check_shape(where, "params.memory_gain", p.memory_gain, cfg_.output_norm ? D : 0, cfg_.output_norm ? 1 : 0);
  detail::check_shape(where, "params.w_gate", p.w_gate, D, D);
  detail::check_shape(where, "params.norm_gain", p.norm_gain, D, 1);
  detail::check_shape(where, "params.w_out", p.w_out, D, D);
}

template <class Scalar>
auto NeuralMemory<Scalar>::initial_state(const Params& p) const -> State {
  check_params(p, "titans::NeuralMemory::initial_state");
  State s;
  const Index H = cfg_.heads;
  for (Index h = 0; h < H; ++h) {
    MemoryWeights<Scalar> w;
    for (Index l = 0; l < mem_.depth; ++l) {
      const Index rows = mem_.layer_out(l);
      w.w.push_back(p.memory_init[l].middleRows(h * rows, rows));
    }
    s.heads.push_back(make_memory_state(mem_, w));
  }
  s.conv_tail = Mat::Zero(3 * cfg_.dim, cfg_.conv_kernel - 1);
  s.chunk_gates = Mat::Zero(3 * H, 1);
  return s;
}

template <class Scalar>
void NeuralMemory<Scalar>::settle(State& state) const {
  check_state(state, "titans::NeuralMemory::settle");
  for (auto& h : state.heads) detail::settle_unchecked(mem_, cfg_.chunk_size, h);
}

template <class Scalar>
void NeuralMemory<Scalar>::check_state(const State& s, const char* where) const {
  if (static_cast<Index>(s.heads.size()) != cfg_.heads)
    detail::raise<ShapeError>(where, "state.heads has ", s.heads.size(), " memories, expected heads = ", cfg_.heads);
  for (const auto& h : s.heads) {
    if (h.position != s.position)
      detail::raise<InvalidArgument>(where, "a head's position (", h.position, ") differs from state.position (",
                                     s.position, ")");
    check_memory_state(where, mem_, cfg_.chunk_size, h);
  }
  detail::check_shape(where, "state.conv_tail", s.conv_tail, 3 * cfg_.dim, cfg_.conv_kernel - 1);
  detail::check_shape(where, "state.chunk_gates", s.chunk_gates, 3 * cfg_.heads, 1);
}

template <class Scalar>
auto NeuralMemory<Scalar>::forward(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, State& state) const -> Mat {
  constexpr const char* where = "titans::NeuralMemory::forward";
  check_call(where, p, x, state);
  // A zero-length call is no call (and the per-head views below would offset a null pointer).
  if (x.cols() == 0) return Mat(cfg_.dim, 0);
  MemoryInputs<Scalar> in = inputs_unchecked(p, x, state, /*advance=*/true, nullptr);
  Mat y(cfg_.dim, x.cols());
  const Index H = cfg_.heads, d = mem_.dim;
  detail::for_each_head(H, [&](Index h) {
    detail::memory_forward_unchecked(mem_, cfg_.chunk_size, head_inputs(p, in, h), state.heads[h],
                                     y.middleRows(h * d, d));
  });
  state.position += x.cols();
  check_diverged(where, p, y);
  Mat o = output(p, x, y, nullptr);
  detail::check_finite_output(where, p, o);
  return o;
}

template <class Scalar>
auto NeuralMemory<Scalar>::forward_train(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, State& state,
                                         NeuralMemoryCache<Scalar>& cache, const MemoryTrainOptions& options) const -> Mat {
  constexpr const char* where = "titans::NeuralMemory::forward_train";
  check_call(where, p, x, state);
  if (options.checkpoint_every < 1)
    detail::raise<InvalidArgument>(where, "options.checkpoint_every is ", options.checkpoint_every,
                                   ", expected >= 1");
  const Index H = cfg_.heads, d = mem_.dim;
  cache = NeuralMemoryCache<Scalar>();
  cache.x = x;
  cache.start_conv_tail = state.conv_tail;
  cache.start_position = state.position;
  cache.heads.resize(static_cast<std::size_t>(H));
  // A zero-length call is no call: the state is unchanged and backward passes dfinal through
  // (the per-head views below would offset a null pointer).
  if (x.cols() == 0) return Mat(cfg_.dim, 0);
  cache.in = inputs_unchecked(p, x, state, /*advance=*/true, &cache);
  const MemoryInputs<Scalar>& in = cache.in;
  cache.y.resize(cfg_.dim, x.cols());
  detail::for_each_head(H, [&](Index h) {
    memory_forward_train_into<Scalar>(mem_, cfg_.chunk_size, head_inputs(p, in, h), state.heads[h],
                                      cache.heads[static_cast<std::size_t>(h)], options,
                                      cache.y.middleRows(h * d, d));
  });
  state.position += x.cols();
  check_diverged(where, p, cache.y);
  Mat o = output(p, x, cache.y, &cache);
  detail::check_finite_output(where, p, o);
  return o;
}

template <class Scalar>
void NeuralMemory<Scalar>::backward(const Params& p, const NeuralMemoryCache<Scalar>& cache, const Eigen::Ref<const Mat>& dout /* (D, T) */,
                                    const State* dfinal, Params& grads, Eigen::Ref<Mat> dx /* (D, T), accumulated */,
                                    State* dinitial) const {
  constexpr const char* where = "titans::NeuralMemory::backward";
  check_params(p, where);
  check_params(grads, "titans::NeuralMemory::backward (grads)");
  const Index D = cfg_.dim, H = cfg_.heads, T = cache.x.cols(), K = cfg_.conv_kernel, d = mem_.dim;
  if (static_cast<Index>(cache.heads.size()) != H || cache.x.rows() != D)
    detail::raise<InvalidArgument>(where, "cache was not filled by forward_train of this layer");
  detail::check_shape(where, "dout", dout, D, T);
  detail::check_finite(where, "dout", dout);
  detail::check_shape(where, "dx", dx, D, T);
  // Every argument before anything is added: the heads' kernels check theirs only after the
  // output path has added into grads and dx.
  if (dfinal) check_state_gradient(where, "dfinal", *dfinal, cache.start_position + T, /*empty_is_zero=*/true);
  if (dinitial) check_state_gradient(where, "dinitial", *dinitial, cache.start_position, /*empty_is_zero=*/false);
  if (T == 0) {  // forward_train's zero-length call changed nothing: d(initial) = d(final)
    if (dfinal && dinitial) {
      dinitial->conv_tail += dfinal->conv_tail;
      dinitial->chunk_gates += dfinal->chunk_gates;
      for (Index h = 0; h < H; ++h)
        add_state_gradient(dinitial->heads[static_cast<std::size_t>(h)], dfinal->heads[static_cast<std::size_t>(h)]);
    }
    return;
  }
  const Scalar one(1);

  // Output path: o = W_O h, h = gain ⊙ n ⊙ g, g = σ(W_G x), n = y / rms (per head).
  const Mat ng = cache.n.cwiseProduct(cache.g);
  const Mat h = p.norm_gain.col(0).asDiagonal() * ng;
  detail::product_add<detail::Trans::no, detail::Trans::yes>(one, dout, h, grads.w_out);
  Mat dh;
  detail::product<detail::Trans::yes, detail::Trans::no>(p.w_out, dout, dh);
  grads.norm_gain.col(0) += dh.cwiseProduct(ng).rowwise().sum();
  const Mat dn = p.norm_gain.col(0).asDiagonal() * dh.cwiseProduct(cache.g);
  Mat dag = p.norm_gain.col(0).asDiagonal() * dh.cwiseProduct(cache.n);
  dag = (dag.array() * cache.g.array() * (one - cache.g.array())).matrix();
  detail::product_add<detail::Trans::no, detail::Trans::yes>(Scalar(1), dag, cache.x, grads.w_gate);
  detail::product_add<detail::Trans::yes, detail::Trans::no>(Scalar(1), p.w_gate, dag, dx);
  Mat dy = Mat::Zero(D, T);
  detail::rms_normalize_backward<Scalar>(dn, cache.n, cache.rinv, H, dy);

  // The memories, per head, through the test-time updates.
  Mat dk(D, T), dv(D, T), dq(D, T), dgate[3] = {Mat(H, T), Mat(H, T), Mat(H, T)};
  const bool huber = uses_threshold(cfg_.bias);
  Mat dthreshold(huber ? H : 0, huber ? T : 0);
  const MemoryState<Scalar> no_state;
  detail::for_each_head(H, [&](Index h) {
    const auto& hc = cache.heads[static_cast<std::size_t>(h)];
    auto kg = make_kernel_gradients(hc);
    memory_backward<Scalar>(hc, dy.middleRows(h * d, d), dfinal ? dfinal->heads[static_cast<std::size_t>(h)] : no_state, kg);
    dk.middleRows(h * d, d) = kg.inputs.k;
    dv.middleRows(h * d, d) = kg.inputs.v;
    dq.middleRows(h * d, d) = kg.inputs.q;
    dgate[0].row(h) = kg.inputs.alpha.transpose();
    dgate[1].row(h) = kg.inputs.eta.transpose();
    dgate[2].row(h) = kg.inputs.theta.transpose();
    if (huber) dthreshold.row(h) = kg.inputs.threshold.transpose();
    if (cfg_.output_norm) grads.memory_gain.middleRows(h * d, d) += kg.inputs.gain;
    if (dinitial) add_state_gradient(dinitial->heads[static_cast<std::size_t>(h)], kg.state);
  });

  // Gates: α = α_max σ(a), η = η_max σ(e), θ = θ_max σ(t); then the per-chunk routing and the projections.
  for (int gi = 0; gi < 3; ++gi) {
    const auto sig = cache.sig_gate[gi].array();
    dgate[gi] = (dgate[gi].array() * gate_max(gi) * sig * (one - sig)).matrix();
  }
  Mat dchunk_gates = Mat::Zero(3 * H, 1);
  if (dfinal) {
    for (int gi = 0; gi < 3; ++gi) {
      if (cache.final_gate_source >= 0) {
        dgate[gi].col(cache.final_gate_source) += dfinal->chunk_gates.middleRows(gi * H, H);
      } else {
        dchunk_gates.middleRows(gi * H, H) += dfinal->chunk_gates.middleRows(gi * H, H);
      }
    }
  }
  for (Index t = 0; t < T; ++t) {
    const Index src = cache.gate_source[static_cast<std::size_t>(t)];
    if (src == t) continue;
    for (int gi = 0; gi < 3; ++gi) {
      if (src >= 0) {
        dgate[gi].col(src) += dgate[gi].col(t);
      } else {
        dchunk_gates.middleRows(gi * H, H) += dgate[gi].col(t);
      }
      dgate[gi].col(t).setZero();
    }
  }
  if (dinitial) dinitial->chunk_gates += dchunk_gates;
  Mat* gw[3] = {&grads.w_alpha, &grads.w_eta, &grads.w_theta};
  Mat* gb[3] = {&grads.b_alpha, &grads.b_eta, &grads.b_theta};
  const Mat* pw[3] = {&p.w_alpha, &p.w_eta, &p.w_theta};
  for (int gi = 0; gi < 3; ++gi) {
    detail::product_add<detail::Trans::no, detail::Trans::yes>(one, dgate[gi], cache.x, *gw[gi]);
    gb[gi]->col(0) += dgate[gi].rowwise().sum();
    detail::product_add<detail::Trans::yes, detail::Trans::no>(one, *pw[gi], dgate[gi], dx);
  }
  if (huber) {  // δ = δ_max σ(w_delta x + b_delta), per token (docs/MATH.md §11.5)
    const auto sig = cache.sig_threshold.array();
    dthreshold = (dthreshold.array() * static_cast<Scalar>(cfg_.threshold_max) * sig * (one - sig)).matrix();
    detail::product_add<detail::Trans::no, detail::Trans::yes>(one, dthreshold, cache.x, grads.w_delta);
    grads.b_delta.col(0) += dthreshold.rowwise().sum();
    detail::product_add<detail::Trans::yes, detail::Trans::no>(one, p.w_delta, dthreshold, dx);
  }

  // ℓ2 normalisation of k and q.
  detail::l2_normalize_backward<Scalar>(dk, cache.in.k, cache.silu_k, H, cfg_.norm_eps);
  detail::l2_normalize_backward<Scalar>(dq, cache.in.q, cache.silu_q, H, cfg_.norm_eps);

  // SiLU, causal depthwise conv, projections.
  Mat* dstream[3] = {&dk, &dv, &dq};
  Mat* gproj[3] = {&grads.w_k, &grads.w_v, &grads.w_q};
  Mat* gconv[3] = {&grads.conv_k, &grads.conv_v, &grads.conv_q};
  const Mat* pproj[3] = {&p.w_k, &p.w_v, &p.w_q};
  const Mat* pconv[3] = {&p.conv_k, &p.conv_v, &p.conv_q};
  Mat dext(D, K - 1 + T);
  for (int si = 0; si < 3; ++si) {
    const Mat& c = cache.conv[si];
    const auto sig = (one / (one + (-c.array()).exp()));
    const Mat dc = (dstream[si]->array() * sig * (one + c.array() * (one - sig))).matrix();
    dext.setZero();
    for (Index j = 0; j < K; ++j) {
      dext.middleCols(j, T).noalias() += pconv[si]->col(j).asDiagonal() * dc;
      gconv[si]->col(j) += dc.cwiseProduct(cache.ext[si].middleCols(j, T)).rowwise().sum();
    }
    if (dfinal && K > 1) dext.rightCols(K - 1) += dfinal->conv_tail.middleRows(si * D, D);
    // The final tail is the last K−1 columns of ext; its gradient joins before the split below.
    detail::product_add<detail::Trans::no, detail::Trans::yes>(one, dext.rightCols(T), cache.x, *gproj[si]);
    detail::product_add<detail::Trans::yes, detail::Trans::no>(one, *pproj[si], dext.rightCols(T), dx);
    if (dinitial && K > 1) dinitial->conv_tail.middleRows(si * D, D) += dext.leftCols(K - 1);
  }
}

template <class Scalar>
void NeuralMemory<Scalar>::initial_state_backward(const State& dstate, Params& grads) const {
  constexpr const char* where = "titans::NeuralMemory::initial_state_backward";
  check_params(grads, "titans::NeuralMemory::initial_state_backward (grads)");
  if (static_cast<Index>(dstate.heads.size()) != cfg_.heads)
    detail::raise<ShapeError>(where, "dstate.heads has ", dstate.heads.size(), " memories, expected ", cfg_.heads);
  for (Index h = 0; h < cfg_.heads; ++h) {  // every head before any is added
    const std::string name = "dstate.heads[" + std::to_string(h) + "].weights";
    check_memory_weights(where, name.c_str(), mem_, dstate.heads[static_cast<std::size_t>(h)].weights);
  }
  check_finite_tensors(where, "dstate", dstate);
  for (Index h = 0; h < cfg_.heads; ++h) {
    const auto& w = dstate.heads[static_cast<std::size_t>(h)].weights;
    for (Index l = 0; l < mem_.depth; ++l)
      grads.memory_init[l].middleRows(h * mem_.layer_out(l), mem_.layer_out(l)) += w[l];
  }
}

template <class Scalar>
auto NeuralMemory<Scalar>::step(const Params& p, const Eigen::Ref<const Vector<Scalar>>& x /* (D) */, State& state) const -> Vector<Scalar> {
  const Mat out = forward(p, x, state);
  return out.col(0);
}

template <class Scalar>
auto NeuralMemory<Scalar>::forward_batch(const Params& p, const std::vector<Mat>& xs, std::vector<State>& states) const -> std::vector<Mat> {
  return detail::forward_each("titans::NeuralMemory::forward_batch", *this, cfg_.dim, p, xs, states);
}

template <class Scalar>
auto NeuralMemory<Scalar>::retrieve(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, const State& state) const -> Mat {
  return output(p, x, read(p, x, state), nullptr);
}

template <class Scalar>
auto NeuralMemory<Scalar>::read(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, const State& state) const -> Mat {
  constexpr const char* where = "titans::NeuralMemory::read";
  check_call(where, p, x, state);
  State scratch_tail;  // only the conv history is used
  scratch_tail.conv_tail = state.conv_tail;
  scratch_tail.chunk_gates = state.chunk_gates;
  scratch_tail.position = state.position;
  const MemoryInputs<Scalar> in = inputs_unchecked(p, x, scratch_tail, /*advance=*/false, nullptr);
  Mat y(cfg_.dim, x.cols());
  const Index d = mem_.dim;
  for (Index h = 0; h < cfg_.heads; ++h) {
    const MemoryState<Scalar>& m = state.heads[h];
    const auto q = in.q.middleRows(h * d, d);
    y.middleRows(h * d, d) = m.pending_tokens() > 0 ? memory_apply<Scalar>(mem_, memory_current_weights(mem_, m), q, gain(p, h))
                                                    : memory_apply<Scalar>(mem_, m.weights, q, gain(p, h));
  }
  return y;
}

template <class Scalar>
auto NeuralMemory<Scalar>::memory_inputs(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */,
                                         const State& state) const -> MemoryInputs<Scalar> {
  constexpr const char* where = "titans::NeuralMemory::memory_inputs";
  check_call(where, p, x, state);
  State copy;
  copy.conv_tail = state.conv_tail;
  copy.chunk_gates = state.chunk_gates;
  copy.position = state.position;
  return inputs_unchecked(p, x, copy, /*advance=*/false, nullptr);
}

template <class Scalar>
void NeuralMemory<Scalar>::add_state_gradient(MemoryState<Scalar>& dst, const MemoryState<Scalar>& src) {
  constexpr const char* where = "titans::NeuralMemory::backward";
  // An empty list of src is zero (dfinal's may be empty: check_state_gradient).
  auto fits = [](const auto& d, const auto& s) { return s.empty() || d.size() == s.size(); };
  if (!fits(dst.weights, src.weights) || !fits(dst.momentum, src.momentum) || !fits(dst.chunk_start, src.chunk_start))
    detail::raise<ShapeError>(where, "dinitial->heads does not have the shape of the state at the call start ",
                              "(make it with zeros_like of that state)");
  for (std::size_t l = 0; l < src.weights.size(); ++l) dst.weights[l] += src.weights[l];
  for (std::size_t l = 0; l < src.momentum.size(); ++l) dst.momentum[l] += src.momentum[l];
  for (std::size_t l = 0; l < src.chunk_start.size(); ++l) dst.chunk_start[l] += src.chunk_start[l];
}

template <class Scalar>
void NeuralMemory<Scalar>::check_diverged(const char* where, const Params& p, const Mat& y) const {
  if (y.allFinite()) return;
  check_finite_tensors(where, "parameter", p);
  detail::raise<NumericError>(where, "the memory's test-time updates diverged (its reads are not finite): the ",
                                "effective step θ·chunk_size times the inner loss's curvature is too large; lower ",
                                "theta_max (now ", cfg_.theta_max, ") or chunk_size (now ", cfg_.chunk_size,
                                "), or use a shallower memory");
}

template <class Scalar>
void NeuralMemory<Scalar>::check_call(const char* where, const Params& p, const Eigen::Ref<const Mat>& x, const State& state) const {
  check_params(p, where);
  check_state(state, where);
  detail::check_shape(where, "x", x, cfg_.dim, -1);
  detail::check_finite(where, "x", x);
}

template <class Scalar>
void NeuralMemory<Scalar>::check_state_gradient(const char* where, const char* name, const State& g, Index position,
                                                bool empty_is_zero) const {
  const Index H = cfg_.heads;
  const std::string n(name);
  detail::check_shape(where, (n + "->conv_tail").c_str(), g.conv_tail, 3 * cfg_.dim, cfg_.conv_kernel - 1);
  detail::check_shape(where, (n + "->chunk_gates").c_str(), g.chunk_gates, 3 * H, 1);
  if (static_cast<Index>(g.heads.size()) != H)
    detail::raise<ShapeError>(where, name, "->heads has ", g.heads.size(), " memories, expected ", H);
  const bool inside_chunk = position % cfg_.chunk_size != 0;
  for (Index h = 0; h < H; ++h) {
    const MemoryState<Scalar>& m = g.heads[static_cast<std::size_t>(h)];
    const std::string at = n + "->heads[" + std::to_string(h) + "]";
    if (!(empty_is_zero && m.weights.empty())) check_memory_weights(where, (at + ".weights").c_str(), mem_, m.weights);
    if (!(empty_is_zero && m.momentum.empty())) check_memory_weights(where, (at + ".momentum").c_str(), mem_, m.momentum);
    if (!inside_chunk && !m.chunk_start.empty())
      detail::raise<ShapeError>(where, at, ".chunk_start holds ", m.chunk_start.size(),
                                " tensors at a chunk boundary (position ", position, ", chunk_size ", cfg_.chunk_size,
                                "), expected none");
    if (inside_chunk && m.chunk_start.empty() && !empty_is_zero)
      detail::raise<ShapeError>(where, at, ".chunk_start is empty, but position ", position,
                                " is inside a chunk: the gradient of a state is that of its settled form (forward_train "
                                "settles a state with pending tokens; size the gradient from the settled state, "
                                "memory_state_settle)");
    if (inside_chunk && !(empty_is_zero && m.chunk_start.empty()))
      check_memory_weights(where, (at + ".chunk_start").c_str(), mem_, m.chunk_start);
  }
  check_finite_tensors(where, name, g);
}

template <class Scalar>
auto NeuralMemory<Scalar>::inputs_unchecked(const Params& p, const Eigen::Ref<const Mat>& x, State& state,
                                            bool advance, NeuralMemoryCache<Scalar>* cache) const -> MemoryInputs<Scalar> {
  const Index D = cfg_.dim, H = cfg_.heads, T = x.cols(), K = cfg_.conv_kernel;
  MemoryInputs<Scalar> in;
  Mat* outs[3] = {&in.k, &in.v, &in.q};
  const Mat* w[3] = {&p.w_k, &p.w_v, &p.w_q};
  const Mat* conv[3] = {&p.conv_k, &p.conv_v, &p.conv_q};
  Mat ext(D, K - 1 + T);
  for (int s = 0; s < 3; ++s) {
    // ext = [tail | W x]; out_t = Σ_j conv[:, j] ⊙ ext[:, t + j]  (causal, width K)
    ext.leftCols(K - 1) = state.conv_tail.middleRows(s * D, D);
    detail::gemm<detail::Trans::no, detail::Trans::no>(Scalar(1), *w[s], x, Scalar(0), ext.rightCols(T));
    Mat& o = *outs[s];
    o.noalias() = conv[s]->col(K - 1).asDiagonal() * ext.rightCols(T);
    for (Index j = 0; j + 1 < K; ++j) o.noalias() += conv[s]->col(j).asDiagonal() * ext.middleCols(j, T);
    if (advance && K > 1) state.conv_tail.middleRows(s * D, D) = ext.rightCols(K - 1);
    if (cache) {
      cache->ext[s] = ext;
      cache->conv[s] = o;
    }
    o = (o.array() / (Scalar(1) + (-o.array()).exp())).matrix();  // SiLU
  }
  if (cache) {
    cache->silu_k = in.k;
    cache->silu_q = in.q;
  }
  detail::l2_normalize<Scalar>(in.k, H, cfg_.norm_eps);
  detail::l2_normalize<Scalar>(in.q, H, cfg_.norm_eps);
  // Gates: pre-activations (H, T) per gate, optionally held constant within each chunk.
  Mat pre[3];
  const Mat* gate_w[3] = {&p.w_alpha, &p.w_eta, &p.w_theta};
  const Mat* gate_b[3] = {&p.b_alpha, &p.b_eta, &p.b_theta};
  for (int gi = 0; gi < 3; ++gi) {
    detail::product<detail::Trans::no, detail::Trans::no>(*gate_w[gi], x, pre[gi]);
    pre[gi].colwise() += gate_b[gi]->col(0);
  }
  if (cache) {
    cache->gate_source.resize(static_cast<std::size_t>(T));
    for (Index t = 0; t < T; ++t) cache->gate_source[static_cast<std::size_t>(t)] = t;
    cache->final_gate_source = -1;
  }
  if (cfg_.per_chunk_gates) {
    const Index b = cfg_.chunk_size;
    Index source = -1;  // the column holding the current chunk's first token; −1: the state's
    for (Index t = 0; t < T; ++t) {
      const Index pos = state.position + t;
      if (pos % b == 0) source = t;
      for (int g = 0; g < 3; ++g) {
        if (pos % b == 0) {
          state.chunk_gates.middleRows(g * H, H) = pre[g].col(t);
        } else {
          pre[g].col(t) = state.chunk_gates.middleRows(g * H, H);
        }
      }
      if (cache) cache->gate_source[static_cast<std::size_t>(t)] = source;
    }
    if (cache) cache->final_gate_source = source;
  }
  Mat* gate[3] = {&in.alpha, &in.eta, &in.theta};
  for (int gi = 0; gi < 3; ++gi) {
    *gate[gi] = detail::sigmoid<Scalar>(pre[gi]);
    if (cache) cache->sig_gate[gi] = *gate[gi];
    *gate[gi] *= gate_max(gi);  // a max of 0 gives exactly 0 (σ is finite)
  }
  // [choice] The huber threshold is always per token (docs/MATH.md §11.5): it changes only its
  // own token's gradient, so it needs no per-chunk routing to stay causal.
  if (uses_threshold(cfg_.bias)) {
    Mat pre_delta;
    detail::product<detail::Trans::no, detail::Trans::no>(p.w_delta, x, pre_delta);
    pre_delta.colwise() += p.b_delta.col(0);
    in.threshold = detail::sigmoid<Scalar>(pre_delta);
    if (cache) cache->sig_threshold = in.threshold;
    in.threshold *= static_cast<Scalar>(cfg_.threshold_max);
  }
  return in;
}

template <class Scalar>
auto NeuralMemory<Scalar>::head_inputs(const Params& p, const MemoryInputs<Scalar>& in, Index h) const
    -> KernelInputs<Scalar> {
  const Index d = mem_.dim;
  KernelInputs<Scalar> k;
  k.k = in.k.middleRows(h * d, d);
  k.v = in.v.middleRows(h * d, d);
  k.q = in.q.middleRows(h * d, d);
  k.alpha = in.alpha.row(h).transpose();
  k.eta = in.eta.row(h).transpose();
  k.theta = in.theta.row(h).transpose();
  if (in.threshold.size() > 0) k.threshold = in.threshold.row(h).transpose();
  k.gain = gain(p, h);
  return k;
}

template <class Scalar>
auto NeuralMemory<Scalar>::gain(const Params& p, Index h) const -> Vector<Scalar> {
  if (!cfg_.output_norm) return Vector<Scalar>();
  return p.memory_gain.col(0).segment(h * mem_.dim, mem_.dim);
}

template <class Scalar>
auto NeuralMemory<Scalar>::output(const Params& p, const Eigen::Ref<const Mat>& x, const Mat& y, NeuralMemoryCache<Scalar>* cache) const -> Mat {
  Mat g;
  detail::product<detail::Trans::no, detail::Trans::no>(p.w_gate, x, g);
  g = detail::sigmoid<Scalar>(g);
  Mat n = detail::rms_normalize<Scalar>(y, cfg_.heads, cfg_.norm_eps, cache ? &cache->rinv : nullptr);
  if (cache) {
    cache->n = n;
    cache->g = g;
  }
  n = (n.array() * g.array()).matrix();
  n = p.norm_gain.col(0).asDiagonal() * n;
  Mat o;
  detail::product<detail::Trans::no, detail::Trans::no>(p.w_out, n, o);
  return o;
}

// The float and double instantiations (README, "Faster builds: titans::compiled"): PREFIX is `extern` for the
// declarations below and empty in src/instantiate_*.cpp, which define them.
#define TITANS_INSTANTIATE_NEURAL_MEMORY(PREFIX, S) \
  PREFIX template class NeuralMemory<S>;

#ifdef TITANS_EXTERN_FLOAT
TITANS_INSTANTIATE_NEURAL_MEMORY(extern, float)
#endif
#ifdef TITANS_EXTERN_DOUBLE
TITANS_INSTANTIATE_NEURAL_MEMORY(extern, double)
#endif

}  // namespace titans
