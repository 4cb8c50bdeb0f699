// SPDX-License-Identifier: Apache-2.0
//
// \file model.hpp
// \brief A Titans language model: token embedding, any stack of blocks (LMM / MAC / MAG / MAL /
// sliding-window attention), final RMSNorm, LM head (tied or untied), cross-entropy; training
// over batches of sequences (each with its own memory), and generation that streams one token
// at a time through every block's state.
//
//     titans::ModelConfig cfg;                     // vocab 256, D 256, two MAC blocks
//     titans::TitansModel<float> model(cfg);
//     auto params = model.init(/*seed=*/1);
//     auto grads = titans::zeros_like(params);
//     float loss = model.loss_and_gradient(params, {inputs}, {targets}, grads);  // then AdamW
//     auto state = model.initial_state(params);
//     std::vector<int> text = titans::generate(model, params, state, prompt, 100, {0.8, 40, 7});
#pragma once

#include "blocks.hpp"
#include "common.hpp"
#include "detail/gemm.hpp"
#include "detail/metadata.hpp"
#include "detail/parallel.hpp"
#include "detail/random.hpp"
#include "parameters.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace titans {

/// \brief Everything that fixes a model's shape.
struct ModelConfig {
  Index vocab = 256;                                          ///< V: token ids 0..V−1
  std::vector<BlockKind> layers = {BlockKind::mac, BlockKind::mac};  ///< the blocks, in order
  BlockConfig block;                                          ///< shared by every block (kind from `layers`)
  bool tied = true;                                           ///< LM head = embeddingᵀ (logits = Eᵀ RMSNorm(h))
  double norm_eps = 1e-6;                                     ///< final RMSNorm ε

  Index dim() const { return block.dim; }

  /// The fields as checkpoint metadata keys "model.*", then the block template's (detail/metadata.hpp).
  template <class Self, class V>
  static void metadata_fields(Self& c, V& v) {
    const ModelConfig dflt{};
    v("model.vocab", c.vocab);
    v("model.layers", c.layers);
    v("model.tied", c.tied);
    v("model.norm_eps", c.norm_eps, dflt.norm_eps);
    BlockConfig::metadata_fields(c.block, v);
  }

  void validate(const char* where = "titans::ModelConfig") const {
    detail::check_range(where, "vocab", vocab, 1, limits::vocab);
    if (layers.empty()) detail::raise<InvalidArgument>(where, "layers is empty, expected at least one block");
    if (static_cast<Index>(layers.size()) > limits::layers)
      detail::raise<InvalidArgument>(where, "layers has ", layers.size(), " blocks, expected at most ", limits::layers);
    if (!(norm_eps > 0) || !std::isfinite(norm_eps))
      detail::raise<InvalidArgument>(where, "norm_eps is ", norm_eps, ", expected a finite value > 0");
    for (BlockKind k : layers) {
      BlockConfig c = block;
      c.kind = k;
      c.validate(where);
    }
  }
};

/// \brief The config as "model.*" key/value strings (for a checkpoint's metadata), and back.
/// The block template's keys ("block.*", "neural_memory.*") are to_metadata(c.block)'s.
inline std::map<std::string, std::string> to_metadata(const ModelConfig& c) {
  std::map<std::string, std::string> m;
  detail::MetadataWriter w(m);
  ModelConfig::metadata_fields(c, w);
  return m;
}

/// \brief Rebuilds a config from to_metadata's pairs. Throws FormatError naming a malformed key,
/// or every missing required key at once (keys with a default may be missing:
/// metadata_fields), or the field of an invalid config.
inline ModelConfig model_config_from_metadata(const std::map<std::string, std::string>& m) {
  constexpr const char* where = "titans::model_config_from_metadata";
  detail::MetadataFieldReader r(where, m);
  ModelConfig c;
  ModelConfig::metadata_fields(c, r);
  r.finish();
  try {
    c.validate(where);
  } catch (const InvalidArgument& e) {
    detail::raise<FormatError>(where, "metadata describes an invalid model: ", e.what());
  }
  return c;
}

/// \brief A model's parameters: "embedding" (D, V), "block{i}.…", "norm_final" (D, 1) and, when
/// untied, "head" (V, D).
template <class Scalar>
struct ModelParams {
  using scalar_type = Scalar;
  bool tied = true;
  Matrix<Scalar> embedding;
  BlockStackParams<Scalar> blocks;
  Matrix<Scalar> norm_final;
  Matrix<Scalar> head;

  TITANS_DEFINE_FOR_EACH()

 private:
  template <class Self, class F>
  static void for_each_impl(Self& p, F& f) {
    f("embedding", p.embedding);
    p.blocks.for_each(f);
    f("norm_final", p.norm_final);
    if (!p.tied) f("head", p.head);
  }
};

/// \brief Per-sequence state: every block's state (memory, KV cache, conv tail, …).
template <class Scalar>
struct ModelState {
  using scalar_type = Scalar;
  BlockStackState<Scalar> blocks;
  Index position = 0;

  TITANS_DEFINE_STATE_FIELDS()

 private:
  template <class Self, class Ar>
  static void fields(Self& s, Ar& ar) {
    ar.nested("", s.blocks);
    ar.count("position", s.position);
  }
};

/// \brief What TitansModel::backward needs from forward_train.
template <class Scalar>
struct ModelCache {
  std::vector<int> tokens;
  typename BlockStack<Scalar>::Cache blocks;
  Matrix<Scalar> h, rinv, u;  ///< (D, T) last hidden state, (1, T) 1/RMS, (D, T) normalised
};

/// \brief Mean cross-entropy of softmax(logits) against targets (−1 = ignore). Adds
/// scale·∂(mean)/∂logits into *dlogits when given. Returns 0 when no target counts.
template <class Scalar>
Scalar cross_entropy(const ConstMatrixRef<Scalar>& logits /* (V, T) */, const std::vector<int>& targets,
                     Matrix<Scalar>* dlogits = nullptr, Scalar scale = Scalar(1), Index* counted = nullptr) {
  constexpr const char* where = "titans::cross_entropy";
  const Index V = logits.rows(), T = logits.cols();
  if (static_cast<Index>(targets.size()) != T)
    detail::raise<ShapeError>(where, "got ", targets.size(), " targets for ", T, " logit columns");
  if (dlogits) detail::check_shape(where, "dlogits", *dlogits, V, T);
  Index n = 0;
  for (int t : targets) {
    if (t < -1 || t >= V) detail::raise<InvalidArgument>(where, "target ", t, " is outside [0, ", V, ") (or -1 to ignore)");
    n += t >= 0;
  }
  if (counted) *counted = n;
  if (n == 0) return Scalar(0);
  double total = 0;
  for (Index t = 0; t < T; ++t) {
    const int y = targets[static_cast<std::size_t>(t)];
    if (y < 0) continue;
    const auto col = logits.col(t);
    const Scalar mx = col.maxCoeff();
    const auto e = (col.array() - mx).exp();
    const Scalar sum = e.sum();
    total += static_cast<double>(std::log(sum) + mx - col(y));
    if (dlogits) {
      dlogits->col(t) += (scale / Scalar(n)) * (e / sum).matrix();
      (*dlogits)(y, t) -= scale / Scalar(n);
    }
  }
  return static_cast<Scalar>(total / static_cast<double>(n));
}

/// \brief How many gradient buffers a batch is summed in (TitansModel::loss_and_gradient): up to
/// this many threads share a batch's sequences, and the result does not depend on how many run.
/// Memory: min(batch, batch_parts) extra copies of the gradients.
inline constexpr Index batch_parts = 8;

/// \brief The language model. Holds only its config; parameters and state are explicit.
template <class Scalar>
class TitansModel {
  static_assert(std::is_floating_point_v<Scalar>, "titans: Scalar must be a floating-point type");

 public:
  using Params = ModelParams<Scalar>;
  using State = ModelState<Scalar>;
  using Cache = ModelCache<Scalar>;
  using Mat = Matrix<Scalar>;

  explicit TitansModel(const ModelConfig& cfg) : cfg_(validated(cfg)), stack_(cfg_.block, cfg_.layers) {}

  const ModelConfig& config() const { return cfg_; }
  const BlockStack<Scalar>& blocks() const { return stack_; }

  /// \brief Deterministic initialisation: embedding N(0, 1/D) (so tied logits start near unit
  /// scale), blocks as Block::init, untied head N(0, 1/D), final norm gain 1.
  /// Number of scalars in init()'s parameters, computed from the config alone (nothing is
  /// allocated: load_model checks it against the file before building the parameters).
  Index parameter_count() const {
    const Index D = cfg_.block.dim, V = cfg_.vocab;
    return D * V + stack_.parameter_count() + D + (cfg_.tied ? 0 : V * D);
  }

  Params init(std::uint64_t seed) const;

  void check_params(const Params& p, const char* where = "titans::TitansModel::check_params") const;

  State initial_state(const Params& p) const;

  /// Throws if `s` is not a state of this model (the stack's check_state; one position).
  void check_state(const State& s, const char* where = "titans::TitansModel::check_state") const;

  /// \brief Logits (V, T) for the tokens, continuing `state`.
  Mat forward(const Params& p, const std::vector<int>& tokens, State& state) const;

  /// \brief One decode step: the logits (V) after `token`. Equal to the prefill logits.
  Vector<Scalar> step(const Params& p, int token, State& state) const;

  Mat forward_train(const Params& p, const std::vector<int>& tokens, State& state, Cache& cache) const;

  /// \brief Adds dL/d(params) into grads, given dL/dlogits (V, T).
  void backward(const Params& p, const Cache& cache, const Eigen::Ref<const Mat>& dlogits, Params& grads) const;

  /// \brief Mean next-token cross-entropy over a batch of sequences, each from its own fresh
  /// state (targets[i][t] = −1 ignores a position); adds its gradient into grads.
  Scalar loss_and_gradient(const Params& p, const std::vector<std::vector<int>>& inputs,
                           const std::vector<std::vector<int>>& targets, Params& grads) const;

  /// \brief The same loss without gradients (evaluation).
  Scalar loss(const Params& p, const std::vector<std::vector<int>>& inputs,
              const std::vector<std::vector<int>>& targets) const;

 private:
  static ModelConfig validated(const ModelConfig& c);

  Mat embed(const char* where, const Params& p, const std::vector<int>& tokens) const;

  Mat head(const Params& p, const Mat& h, Mat* rinv, Mat* u_out) const;

  Scalar batch_loss(const char* where, const Params& p, const std::vector<std::vector<int>>& inputs,
                    const std::vector<std::vector<int>>& targets, Params* grads) const;

  ModelConfig cfg_;
  BlockStack<Scalar> stack_;
};

template <class Scalar>
auto TitansModel<Scalar>::init(std::uint64_t seed) const -> Params {
  const Index D = cfg_.dim(), V = cfg_.vocab;
  detail::Rng rng(seed);
  Params p;
  p.tied = cfg_.tied;
  p.embedding.resize(D, V);
  rng.fill_normal(p.embedding, 1.0 / std::sqrt(static_cast<double>(D)));
  p.blocks = stack_.init(seed * 31 + 17);
  p.norm_final = Mat::Ones(D, 1);
  if (!cfg_.tied) {
    p.head.resize(V, D);
    rng.fill_normal(p.head, 1.0 / std::sqrt(static_cast<double>(D)));
  }
  return p;
}

template <class Scalar>
void TitansModel<Scalar>::check_params(const Params& p, const char* where) const {
  const Index D = cfg_.dim(), V = cfg_.vocab;
  if (p.tied != cfg_.tied)
    detail::raise<ShapeError>(where, "params are ", p.tied ? "tied" : "untied", ", the model is ",
                              cfg_.tied ? "tied" : "untied");
  detail::check_shape(where, "params.embedding", p.embedding, D, V);
  stack_.check_params(p.blocks, where);
  detail::check_shape(where, "params.norm_final", p.norm_final, D, 1);
  if (!cfg_.tied) detail::check_shape(where, "params.head", p.head, V, D);
}

template <class Scalar>
auto TitansModel<Scalar>::initial_state(const Params& p) const -> State {
  check_params(p, "titans::TitansModel::initial_state");
  State s;
  s.blocks = stack_.initial_state(p.blocks);
  return s;
}

template <class Scalar>
void TitansModel<Scalar>::check_state(const State& s, const char* where) const {
  stack_.check_state(s.blocks, where);
  if (!s.blocks.blocks.empty() && s.blocks.blocks[0].position != s.position)
    detail::raise<InvalidArgument>(where, "state.position is ", s.position, ", its blocks are at ",
                                   s.blocks.blocks[0].position);
}

template <class Scalar>
auto TitansModel<Scalar>::forward(const Params& p, const std::vector<int>& tokens, State& state) const -> Mat {
  constexpr const char* where = "titans::TitansModel::forward";
  check_params(p, where);
  check_state(state, where);
  return detail::naming_bad_parameters(where, p, [&] {
    const Mat h = stack_.forward(p.blocks, embed(where, p, tokens), state.blocks);
    state.position += static_cast<Index>(tokens.size());
    Mat logits = head(p, h, nullptr, nullptr);
    detail::check_finite_output(where, p, logits);
    return logits;
  });
}

template <class Scalar>
auto TitansModel<Scalar>::step(const Params& p, int token, State& state) const -> Vector<Scalar> {
  const Mat out = forward(p, std::vector<int>{token}, state);
  return out.col(0);
}

template <class Scalar>
auto TitansModel<Scalar>::forward_train(const Params& p, const std::vector<int>& tokens, State& state, Cache& cache) const -> Mat {
  constexpr const char* where = "titans::TitansModel::forward_train";
  check_params(p, where);
  check_state(state, where);
  cache.tokens = tokens;
  return detail::naming_bad_parameters(where, p, [&] {
    cache.h = stack_.forward_train(p.blocks, embed(where, p, tokens), state.blocks, cache.blocks);
    state.position += static_cast<Index>(tokens.size());
    Mat logits = head(p, cache.h, &cache.rinv, &cache.u);
    detail::check_finite_output(where, p, logits);
    return logits;
  });
}

template <class Scalar>
void TitansModel<Scalar>::backward(const Params& p, const Cache& cache, const Eigen::Ref<const Mat>& dlogits, Params& grads) const {
  constexpr const char* where = "titans::TitansModel::backward";
  check_params(p, where);
  check_params(grads, "titans::TitansModel::backward (grads)");
  const Index D = cfg_.dim(), T = static_cast<Index>(cache.tokens.size());
  detail::check_shape(where, "dlogits", dlogits, cfg_.vocab, T);
  detail::check_finite(where, "dlogits", dlogits);
  if (cache.h.cols() != T || cache.blocks.size() != static_cast<std::size_t>(stack_.size()))
    detail::raise<InvalidArgument>(where, "cache was not filled by forward_train");
  const Mat& W = cfg_.tied ? p.embedding : p.head;  // tied: logits = Eᵀ u
  Mat du;
  if (cfg_.tied) {
    detail::product<detail::Trans::no, detail::Trans::no>(W, dlogits, du);
  } else {
    detail::product<detail::Trans::yes, detail::Trans::no>(W, dlogits, du);
  }
  Mat dh = Mat::Zero(D, T), dnorm = Mat::Zero(D, 1);
  detail::rms_norm_backward<Scalar>(cache.h, p.norm_final, cache.rinv, du, dh, dnorm);
  Mat dx = Mat::Zero(D, T);
  // The stack checks its caches before it adds into grads; this call's own sums follow it, so a
  // rejected cache leaves grads as they were.
  stack_.backward(p.blocks, cache.blocks, dh, grads.blocks, dx);
  grads.norm_final += dnorm;
  if (cfg_.tied) {
    detail::product_add<detail::Trans::no, detail::Trans::yes>(Scalar(1), cache.u, dlogits, grads.embedding);
  } else {
    detail::product_add<detail::Trans::no, detail::Trans::yes>(Scalar(1), dlogits, cache.u, grads.head);
  }
  for (Index t = 0; t < T; ++t) grads.embedding.col(cache.tokens[static_cast<std::size_t>(t)]) += dx.col(t);
}

template <class Scalar>
auto TitansModel<Scalar>::loss_and_gradient(const Params& p, const std::vector<std::vector<int>>& inputs,
                                            const std::vector<std::vector<int>>& targets, Params& grads) const -> Scalar {
  return batch_loss("titans::TitansModel::loss_and_gradient", p, inputs, targets, &grads);
}

template <class Scalar>
auto TitansModel<Scalar>::loss(const Params& p, const std::vector<std::vector<int>>& inputs,
                               const std::vector<std::vector<int>>& targets) const -> Scalar {
  return batch_loss("titans::TitansModel::loss", p, inputs, targets, nullptr);
}

template <class Scalar>
auto TitansModel<Scalar>::validated(const ModelConfig& c) -> ModelConfig {
  c.validate("titans::TitansModel");
  return c;
}

template <class Scalar>
auto TitansModel<Scalar>::embed(const char* where, const Params& p, const std::vector<int>& tokens) const -> Mat {
  Mat x(cfg_.dim(), static_cast<Index>(tokens.size()));
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    if (tokens[t] < 0 || tokens[t] >= cfg_.vocab)
      detail::raise<InvalidArgument>(where, "token ", tokens[t], " at position ", t, " is outside [0, ", cfg_.vocab,
                                     ")");
    x.col(static_cast<Index>(t)) = p.embedding.col(tokens[t]);
  }
  return x;
}

template <class Scalar>
auto TitansModel<Scalar>::head(const Params& p, const Mat& h, Mat* rinv, Mat* u_out) const -> Mat {
  Mat u = detail::rms_norm<Scalar>(h, p.norm_final, cfg_.norm_eps, rinv);
  Mat logits;
  if (cfg_.tied) {
    detail::product<detail::Trans::yes, detail::Trans::no>(p.embedding, u, logits);
  } else {
    detail::product<detail::Trans::no, detail::Trans::no>(p.head, u, logits);
  }
  if (u_out) *u_out = std::move(u);
  return logits;
}

template <class Scalar>
auto TitansModel<Scalar>::batch_loss(const char* where, const Params& p, const std::vector<std::vector<int>>& inputs,
                                     const std::vector<std::vector<int>>& targets, Params* grads) const -> Scalar {
  check_params(p, where);
  if (grads) check_params(*grads, detail::concat(where, " (grads)").c_str());
  if (inputs.size() != targets.size())
    detail::raise<InvalidArgument>(where, "got ", inputs.size(), " input sequences and ", targets.size(),
                                   " target sequences");
  Index total = 0;
  const Index V = cfg_.vocab;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].size() != targets[i].size())
      detail::raise<ShapeError>(where, "sequence ", i, " has ", inputs[i].size(), " inputs and ", targets[i].size(),
                                " targets");
    // Every sequence before any runs (their errors would otherwise surface from inside the batch).
    for (std::size_t t = 0; t < inputs[i].size(); ++t) {
      const int tok = inputs[i][t], y = targets[i][t];
      if (tok < 0 || tok >= V)
        detail::raise<InvalidArgument>(where, "inputs[", i, "] has token ", tok, " at position ", t,
                                       ", outside [0, ", V, ")");
      if (y < -1 || y >= V)
        detail::raise<InvalidArgument>(where, "targets[", i, "] has target ", y, " at position ", t,
                                       ", outside [0, ", V, ") (or -1 to ignore)");
    }
    for (int t : targets[i]) total += t >= 0;
  }
  if (total == 0) return Scalar(0);
  // Sequences are independent. They are dealt into min(n, batch_parts) parts (sequence i to part
  // i mod parts), each part sums its sequences' gradients in order into its own buffer, and the
  // buffers are summed in part order. The partition depends only on the batch, not on the number
  // of threads (which only decides which thread runs which part), so results are identical for
  // any thread count and any timing (tests/test_model.cpp: 1, 2 and 3 threads).
  const Index n_seq = static_cast<Index>(inputs.size());
  const Index n_parts = std::max<Index>(1, std::min<Index>(n_seq, batch_parts));
  std::vector<double> part_sum(static_cast<std::size_t>(n_parts), 0.0);
  std::vector<Params> part_grads;
  if (grads && n_parts > 1) part_grads.assign(static_cast<std::size_t>(n_parts), zeros_like(p));
  detail::for_each_head(n_parts, [&](Index part) {
    Params* g = grads ? (n_parts > 1 ? &part_grads[static_cast<std::size_t>(part)] : grads) : nullptr;
    for (Index i = part; i < n_seq; i += n_parts) {
      const auto u = static_cast<std::size_t>(i);
      State s = initial_state(p);
      Index n = 0;
      if (g) {
        Cache c;
        const Mat logits = forward_train(p, inputs[u], s, c);
        Mat dl = Mat::Zero(logits.rows(), logits.cols());
        Index ni = 0;
        for (int t : targets[u]) ni += t >= 0;
        // Each sequence's mean is weighted by its share of the batch's targets.
        const Scalar scale = static_cast<Scalar>(static_cast<double>(ni) / static_cast<double>(total));
        const Scalar l = cross_entropy<Scalar>(logits, targets[u], &dl, scale, &n);
        part_sum[static_cast<std::size_t>(part)] += static_cast<double>(l) * static_cast<double>(n);
        if (n > 0) backward(p, c, dl, *g);
      } else {
        const Mat logits = forward(p, inputs[u], s);
        const Scalar l = cross_entropy<Scalar>(logits, targets[u], nullptr, Scalar(1), &n);
        part_sum[static_cast<std::size_t>(part)] += static_cast<double>(l) * static_cast<double>(n);
      }
    }
  });
  if (grads && n_parts > 1)
    for (const Params& g : part_grads) add_to(*grads, g);
  double sum = 0;
  for (double v : part_sum) sum += v;
  return static_cast<Scalar>(sum / static_cast<double>(total));
}

/// \brief How generate picks tokens: temperature 0 is greedy; top_k > 0 keeps the k likeliest;
/// top_p < 1 (nucleus sampling) then keeps the fewest likeliest tokens whose probabilities (at
/// the temperature) sum to at least top_p.
struct SamplingOptions {
  double temperature = 1.0;
  Index top_k = 0;
  std::uint64_t seed = 0;
  double top_p = 1.0;  ///< in (0, 1]; 1 = off
};

/// \brief Picks a token from logits (V) by `options`, drawing from `rng`.
template <class Scalar>
int sample_token(const Eigen::Ref<const Vector<Scalar>>& logits, const SamplingOptions& options, detail::Rng& rng) {
  constexpr const char* where = "titans::sample_token";
  if (!(options.temperature >= 0) || !std::isfinite(options.temperature))
    detail::raise<InvalidArgument>(where, "temperature is ", options.temperature, ", expected a finite value >= 0");
  if (options.top_k < 0) detail::raise<InvalidArgument>(where, "top_k is ", options.top_k, ", expected >= 0");
  if (!(options.top_p > 0 && options.top_p <= 1))
    detail::raise<InvalidArgument>(where, "top_p is ", options.top_p, ", expected a value in (0, 1]");
  detail::check_finite(where, "logits", logits);
  const Index V = logits.size();
  if (V == 0) detail::raise<InvalidArgument>(where, "logits are empty");
  Index best = 0;
  logits.maxCoeff(&best);
  if (options.temperature == 0) return static_cast<int>(best);
  std::vector<Index> order(static_cast<std::size_t>(V));
  for (Index i = 0; i < V; ++i) order[static_cast<std::size_t>(i)] = i;
  Index keep = options.top_k > 0 ? std::min(options.top_k, V) : V;
  std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                    [&](Index a, Index b) { return logits(a) > logits(b) || (logits(a) == logits(b) && a < b); });
  std::vector<double> w(static_cast<std::size_t>(keep));
  const double mx = static_cast<double>(logits(order[0]));
  double sum = 0;
  for (Index i = 0; i < keep; ++i) {
    w[static_cast<std::size_t>(i)] =
        std::exp((static_cast<double>(logits(order[static_cast<std::size_t>(i)])) - mx) / options.temperature);
    sum += w[static_cast<std::size_t>(i)];
  }
  if (options.top_p < 1) {  // the nucleus: the likeliest tokens up to top_p of the mass (at least one)
    const double target = options.top_p * sum;
    double mass = 0;
    Index n = 0;
    while (n < keep && mass < target) mass += w[static_cast<std::size_t>(n++)];
    keep = std::max<Index>(1, n);
    sum = mass > 0 ? mass : w[0];
  }
  double r = rng.uniform() * sum;
  for (Index i = 0; i < keep; ++i) {
    r -= w[static_cast<std::size_t>(i)];
    if (r < 0) return static_cast<int>(order[static_cast<std::size_t>(i)]);
  }
  return static_cast<int>(order[static_cast<std::size_t>(keep - 1)]);
}

/// \brief Feeds `prompt` (one prefill call) and then generates `count` tokens one at a time,
/// each step streaming through every block's state. Returns the generated tokens; `state` ends
/// after the last generated token has been fed.
///
/// `on_token`, when given, is called with each token as soon as it is picked (before the model
/// reads it), so a caller can stream the output; returning false stops the generation after that
/// token (which is still fed, so the state again ends after the last returned token).
template <class Scalar>
std::vector<int> generate(const TitansModel<Scalar>& model, const ModelParams<Scalar>& p, ModelState<Scalar>& state,
                          const std::vector<int>& prompt, Index count, const SamplingOptions& options = {},
                          const std::function<bool(int)>& on_token = {}) {
  constexpr const char* where = "titans::generate";
  if (prompt.empty()) detail::raise<InvalidArgument>(where, "prompt is empty, expected at least one token");
  if (count < 0) detail::raise<InvalidArgument>(where, "count is ", count, ", expected >= 0");
  detail::Rng rng(options.seed);
  std::vector<int> out;
  if (count == 0) {
    model.forward(p, prompt, state);
    return out;
  }
  const Matrix<Scalar> logits = model.forward(p, prompt, state);
  Vector<Scalar> last = logits.col(logits.cols() - 1);
  for (Index i = 0; i < count; ++i) {
    const int tok = sample_token<Scalar>(last, options, rng);
    out.push_back(tok);
    const bool go_on = !on_token || on_token(tok);
    if (!go_on || i + 1 == count) {
      model.step(p, tok, state);  // the last token is fed; its logits are not needed
      break;
    }
    last = model.step(p, tok, state);
  }
  return out;
}

// The float and double instantiations (README, "Faster builds: titans::compiled"): PREFIX is `extern` for the
// declarations below and empty in src/instantiate_*.cpp, which define them.
#define TITANS_INSTANTIATE_MODEL(PREFIX, S) \
  PREFIX template class TitansModel<S>;                                                                          \
  PREFIX template S cross_entropy<S>(const ConstMatrixRef<S>&, const std::vector<int>&, Matrix<S>*, S, \
                                     Index*);                                                                   \
  PREFIX template int sample_token<S>(const Eigen::Ref<const Vector<S>>&, const SamplingOptions&, detail::Rng&); \
  PREFIX template std::vector<int> generate<S>(const TitansModel<S>&, const ModelParams<S>&, ModelState<S>&,     \
                                               const std::vector<int>&, Index, const SamplingOptions&,           \
                                               const std::function<bool(int)>&);

#ifdef TITANS_EXTERN_FLOAT
TITANS_INSTANTIATE_MODEL(extern, float)
#endif
#ifdef TITANS_EXTERN_DOUBLE
TITANS_INSTANTIATE_MODEL(extern, double)
#endif

}  // namespace titans
