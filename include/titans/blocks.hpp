// SPDX-License-Identifier: Apache-2.0
//
// \file blocks.hpp
// \brief The Titans blocks (docs/MATH.md §5–6): LMM (memory alone), MAC (memory as context), MAG
// (memory as gate), MAL (memory as layer) and the sliding-window-attention baseline, each inside
// the pre-norm residual wrapper with a SwiGLU feed-forward; and BlockStack, any sequence of them.
//
//     titans::BlockConfig cfg;                 // D = 256, 4 heads, w = C = 64, N_p = 4
//     cfg.kind = titans::BlockKind::mac;
//     titans::Block<float> block(cfg);
//     auto params = block.init(/*seed=*/7);
//     auto state = block.initial_state(params);
//     titans::Matrix<float> y = block.forward(params, x /* (D, T) */, state);   // streams
//
// MAC comes in two forms: memory_tokens = 0 retrieves one token per segment token and
// interleaves them in the attention's keys; memory_tokens = N_l > 0 is the paper's Figure 3a,
// N_l memory tokens per segment from learned queries, seen by every token of the segment.
//
// Every block is strictly causal, streams exactly (any split of a sequence into calls, down to
// one token per call, gives the same outputs as one call) and has a training forward whose
// backward goes through the memory's test-time updates.
//
// Gradients and state: a training call that starts from a fresh state (position 0, as made by
// initial_state) includes the state's dependence on the parameters (memory_init, and the
// persistent tokens the memory is primed with). A state carried in from an earlier call is a
// constant of the backward: gradients stop at call boundaries (truncated backpropagation).
#pragma once

#include "attention.hpp"
#include "common.hpp"
#include "detail/gemm.hpp"
#include "detail/norms.hpp"
#include "detail/random.hpp"
#include "memory/model.hpp"
#include "neural_memory.hpp"
#include "parameters.hpp"

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace titans {

/// \brief Which mixer a block uses.
enum class BlockKind {
  lmm,  ///< the neural memory alone
  mac,  ///< memory as context: retrieve, attend over [persistent || retrieved || segment], write, gate
  mag,  ///< memory as gate: sliding-window attention and memory in parallel, gated
  mal,  ///< memory as layer: memory, then sliding-window attention
  swa   ///< sliding-window attention only (the baseline)
};

inline const char* to_string(BlockKind k) {
  switch (k) {
    case BlockKind::lmm: return "lmm";
    case BlockKind::mac: return "mac";
    case BlockKind::mag: return "mag";
    case BlockKind::mal: return "mal";
    case BlockKind::swa: return "swa";
  }
  return "?";
}

/// \brief Parses "lmm", "mac", "mag", "mal" or "swa"; throws InvalidArgument otherwise.
inline BlockKind block_kind_from_string(const std::string& s) {
  for (BlockKind k : {BlockKind::lmm, BlockKind::mac, BlockKind::mag, BlockKind::mal, BlockKind::swa})
    if (s == to_string(k)) return k;
  detail::raise<InvalidArgument>("titans::block_kind_from_string", "unknown block kind '", s,
                                 "', expected one of lmm, mac, mag, mal, swa");
}

/// Metadata text of a list of block kinds ("mac,mac,swa") and back (detail/metadata.hpp);
/// returns "" or what was expected.
inline std::string metadata_string(const std::vector<BlockKind>& kinds) {
  std::string out;
  for (std::size_t i = 0; i < kinds.size(); ++i) out += (i ? "," : "") + std::string(to_string(kinds[i]));
  return out;
}
inline std::string parse_metadata(const std::string& s, std::vector<BlockKind>& out) {
  const char* expected = "a comma-separated list of lmm, mac, mag, mal, swa";
  out.clear();
  std::size_t from = 0;
  while (true) {
    const std::size_t comma = s.find(',', from);
    const std::string item = s.substr(from, comma == std::string::npos ? std::string::npos : comma - from);
    bool known = false;
    for (BlockKind k : {BlockKind::lmm, BlockKind::mac, BlockKind::mag, BlockKind::mal, BlockKind::swa})
      if (item == to_string(k)) {
        out.push_back(k);
        known = true;
      }
    if (!known) return expected;
    if (comma == std::string::npos) return "";
    from = comma + 1;
  }
}

/// \brief Shape and behaviour of one block.
struct BlockConfig {
  BlockKind kind = BlockKind::mac;
  Index dim = 256;             ///< D: model width
  Index attention_heads = 4;   ///< heads of the attention (width D / heads, even)
  Index window = 64;           ///< w: sliding window of MAG, MAL and SWA (each token sees itself and w − 1 before)
  Index segment = 64;          ///< C: MAC segment length (attention is full causal within a segment)
  Index persistent = 4;        ///< N_p: learned persistent-memory tokens
  Index ffn_hidden = 0;        ///< SwiGLU hidden width; 0 = 8D/3 rounded up to a multiple of 8
  double rope_base = 10000;    ///< rotary base of the attention
  Index attention_block = 64;  ///< queries per block of the attention kernel (speed only)
  double norm_eps = 1e-6;      ///< ε of the block's RMSNorms
  NeuralMemoryConfig memory;   ///< the neural memory (its dim must equal dim)
  /// Training only: the memory keeps one sub-chunk state in `checkpoint_every` and recomputes
  /// the rest in backward (MemoryTrainOptions); larger saves memory on long sequences.
  Index checkpoint_every = 1;
  /// N_l, MAC only (docs/MATH.md §6): 0 = one retrieved token per segment token, interleaved with
  /// it in the attention's keys; N_l > 0 = the paper's Figure 3a: each segment retrieves N_l
  /// memory tokens with learned queries (params.retrieve_queries) from the memory before the
  /// segment, and every token of the segment sees all of them, after the persistent tokens.
  /// [choice] Checked for range but ignored by the other kinds, as `segment` is: a model's blocks
  /// share one BlockConfig, and a hybrid (mac, swa) stack must be able to set it.
  Index memory_tokens = 0;

  bool has_memory() const { return kind != BlockKind::swa; }
  bool has_attention() const { return kind != BlockKind::lmm; }
  bool has_gate() const { return kind == BlockKind::mac || kind == BlockKind::mag; }
  /// MAC in the Figure 3a form: learned retrieval queries, memory tokens as an attention prefix.
  bool has_retrieve_queries() const { return kind == BlockKind::mac && memory_tokens > 0; }
  Index ffn_width() const { return ffn_hidden > 0 ? ffn_hidden : ((8 * dim + 2) / 3 + 7) / 8 * 8; }

  AttentionConfig attention() const {
    AttentionConfig a;
    a.dim = dim;
    a.heads = attention_heads;
    a.window = kind == BlockKind::mac ? 0 : window;
    a.rope_base = rope_base;
    a.block = attention_block;
    return a;
  }

  /// The fields as checkpoint metadata keys "block.*" (detail/metadata.hpp; the kind is the
  /// model's "model.layers", the memory's keys are NeuralMemoryConfig's). Listed once for
  /// to_metadata and model_config_from_metadata; docs/WEIGHTS.md documents them.
  template <class Self, class V>
  static void metadata_fields(Self& c, V& v) {
    const BlockConfig dflt{};
    v("block.dim", c.dim);
    v("block.attention_heads", c.attention_heads);
    v("block.window", c.window);
    v("block.segment", c.segment);
    v("block.persistent", c.persistent);
    v("block.ffn_hidden", c.ffn_hidden);
    v("block.rope_base", c.rope_base, dflt.rope_base);
    v("block.attention_block", c.attention_block, dflt.attention_block);  // speed only
    v("block.norm_eps", c.norm_eps, dflt.norm_eps);
    v("block.checkpoint_every", c.checkpoint_every, dflt.checkpoint_every);  // training memory only
    v("block.memory_tokens", c.memory_tokens, dflt.memory_tokens);  // absent: a file from before Figure 3a's MAC
    NeuralMemoryConfig::metadata_fields(c.memory, v);
  }

  /// Throws InvalidArgument naming the field.
  void validate(const char* where = "titans::BlockConfig") const {
    detail::check_range(where, "dim", dim, 1, limits::dim);
    detail::check_range(where, "window", window, 1, limits::span);
    detail::check_range(where, "segment", segment, 1, limits::span);
    detail::check_range(where, "persistent (N_p)", persistent, 0, limits::persistent);
    detail::check_range(where, "checkpoint_every", checkpoint_every, 1, limits::block);
    detail::check_range(where, "ffn_hidden", ffn_hidden, 0, limits::ffn_hidden);
    detail::check_range(where, "memory_tokens (N_l)", memory_tokens, 0, limits::memory_tokens);
    if (!(norm_eps > 0) || !std::isfinite(norm_eps))
      detail::raise<InvalidArgument>(where, "norm_eps is ", norm_eps, ", expected a finite value > 0");
    if (has_attention()) {
      if (attention_heads < 1)
        detail::raise<InvalidArgument>(where, "attention_heads is ", attention_heads, ", expected >= 1");
      if (dim % attention_heads != 0)
        detail::raise<InvalidArgument>(where, "attention_heads (", attention_heads, ") does not divide dim (", dim, ")");
      attention().validate(where);
    }
    if (has_memory()) {
      if (memory.dim != dim)
        detail::raise<InvalidArgument>(where, "memory.dim (", memory.dim, ") differs from dim (", dim, ")");
      memory.validate(where);
    }
  }
};

/// \brief Parameters of one block. Which tensors exist depends on the kind; for_each lists
/// exactly those (names such as "attention.w_q", "memory.w_k", "ffn.w1").
/// \brief A block config's fields as "block.*" key/value strings, with its memory's
/// "neural_memory.*" (the kind is the model's "model.layers"; model_config_from_metadata reads them back).
inline std::map<std::string, std::string> to_metadata(const BlockConfig& b) {
  std::map<std::string, std::string> m;
  detail::MetadataWriter w(m);
  BlockConfig::metadata_fields(b, w);
  return m;
}

template <class Scalar>
struct BlockParams {
  using scalar_type = Scalar;
  bool has_attention = false, has_memory = false, has_gate = false, has_retrieve = false;
  bool has_retrieve_queries = false;          ///< MAC with memory_tokens > 0: retrieve_queries, no retrieve_w
  Matrix<Scalar> norm_mixer, norm_ffn;        ///< (D, 1) pre-norm gains
  Matrix<Scalar> persistent;                  ///< (D, N_p) persistent-memory tokens
  AttentionParams<Scalar> attention;
  NeuralMemoryParams<Scalar> memory;
  Matrix<Scalar> gate_y, gate_m;              ///< (D, 1) gains of y ⊗ m = RMSNorm(y) ⊙ σ(RMSNorm(m))
  Matrix<Scalar> retrieve_w, retrieve_gain;   ///< MAC: (D, D) retrieval query projection, (D, 1) gain
  Matrix<Scalar> retrieve_queries;            ///< MAC, memory_tokens > 0: (D, N_l) learned queries (instead of retrieve_w)
  Matrix<Scalar> ffn_w1, ffn_w3, ffn_w2;      ///< SwiGLU: (F, D), (F, D), (D, F)

  TITANS_DEFINE_FOR_EACH()

 private:
  template <class Self, class F>
  static void for_each_impl(Self& p, F& f) {
    f("norm_mixer", p.norm_mixer);
    f("persistent", p.persistent);
    if (p.has_attention) p.attention.for_each([&](const std::string& n, auto& t) { f("attention." + n, t); });
    if (p.has_memory) p.memory.for_each([&](const std::string& n, auto& t) { f("memory." + n, t); });
    if (p.has_retrieve) {
      if (p.has_retrieve_queries) {
        f("retrieve.queries", p.retrieve_queries);
      } else {
        f("retrieve.w", p.retrieve_w);
      }
      f("retrieve.gain", p.retrieve_gain);
    }
    if (p.has_gate) {
      f("gate.y_gain", p.gate_y);
      f("gate.m_gain", p.gate_m);
    }
    f("norm_ffn", p.norm_ffn);
    f("ffn.w1", p.ffn_w1);
    f("ffn.w3", p.ffn_w3);
    f("ffn.w2", p.ffn_w2);
  }
};

/// \brief Per-sequence state of one block.
template <class Scalar>
struct BlockState {
  using scalar_type = Scalar;
  NeuralMemoryState<Scalar> memory;               ///< LMM / MAC / MAG / MAL
  AttentionState<Scalar> attention;               ///< KV cache (MAC: the current segment's [h, x] keys, or its x keys with memory tokens)
  std::vector<std::vector<Matrix<Scalar>>> snapshot;  ///< MAC: per head, memory weights at the segment start
  Matrix<Scalar> persistent_y;                    ///< MAL: memory outputs at the persistent tokens (D, N_p)
  bool primed = false;                            ///< the memory has read the persistent tokens
  Index position = 0;                             ///< tokens seen since the state was made

  TITANS_DEFINE_STATE_FIELDS()

 private:
  template <class Self, class Ar>
  static void fields(Self& s, Ar& ar) {
    if (!s.memory.heads.empty()) ar.nested("memory.", s.memory);
    ar.nested("attention.", s.attention);
    for (std::size_t h = 0; h < s.snapshot.size(); ++h) ar.tensor_list("snapshot.head" + std::to_string(h) + ".w", s.snapshot[h]);
    ar.tensor("persistent_y", s.persistent_y);
    ar.flag("primed", s.primed);
    ar.count("position", s.position);
  }
};

/// \brief What Block::backward needs from Block::forward_train.
template <class Scalar>
struct BlockCache {
  using Mat = Matrix<Scalar>;
  struct Segment {  ///< MAC: one segment (or the part of it inside the call)
    Index t0 = 0, n = 0;
    bool starts_segment = false;  ///< the snapshot it read is the memory state at its own start
    /// Retrieval: W_R u (interleaved form only); the query path's output before the ℓ2 norm
    /// (SiLU(W_R u), or the learned queries); ℓ2-normalised queries; RMS-normalised reads; 1/RMS per head.
    Mat q_pre, q_raw, q, r_n, r_rinv;
    std::vector<std::vector<Mat>> snapshot;
    AttentionCache<Scalar> attention;
    NeuralMemoryCache<Scalar> memory;
    NeuralMemoryState<Scalar> memory_start_zero;  ///< zeros shaped like the memory state at the segment start
    Mat y, z, y_rinv, z_rinv;                     ///< attention and memory outputs, their RMSNorm factors
  };
  Mat x, u, n1_rinv, x1, u2, n2_rinv, ffn_a1, ffn_a3;
  bool fresh = false;                  ///< started from a fresh state: gradients reach the initial state
  bool primed_here = false;            ///< the memory read the persistent tokens in this call
  AttentionCache<Scalar> attention;    ///< MAG / MAL / SWA
  NeuralMemoryCache<Scalar> memory;    ///< LMM / MAG / MAL
  NeuralMemoryState<Scalar> memory_start_zero;
  Mat y, m, y_rinv, m_rinv;            ///< MAG / MAL intermediates
  std::vector<Segment> segments;       ///< MAC
};

/// \brief One Titans block: x ← x + Mixer(RMSNorm(x)); x ← x + SwiGLU(RMSNorm(x)).
template <class Scalar>
class Block {
  static_assert(std::is_floating_point_v<Scalar>, "titans: Scalar must be a floating-point type");

 public:
  using Params = BlockParams<Scalar>;
  using State = BlockState<Scalar>;
  using Cache = BlockCache<Scalar>;
  using Mat = Matrix<Scalar>;

  explicit Block(const BlockConfig& cfg)
      : cfg_(validated(cfg)),
        attn_(cfg_.attention()),
        mem_(cfg_.has_memory() ? cfg_.memory : NeuralMemoryConfig{}) {}

  const BlockConfig& config() const { return cfg_; }
  BlockKind kind() const { return cfg_.kind; }

  /// \brief Deterministic initialisation from `seed`.
  /// Number of scalars in init()'s parameters, computed from the config alone (nothing is
  /// allocated: load_model checks it against the file before building the parameters).
  Index parameter_count() const {
    const Index D = cfg_.dim;
    return 2 * D + D * cfg_.persistent + (cfg_.has_attention() ? attn_.parameter_count() : 0) +
           (cfg_.has_memory() ? mem_.parameter_count() : 0) + (cfg_.has_gate() ? 2 * D : 0) +
           (cfg_.kind == BlockKind::mac ? (cfg_.has_retrieve_queries() ? D * cfg_.memory_tokens : D * D) + D : 0) +
           3 * D * cfg_.ffn_width();
  }

  Params init(std::uint64_t seed) const;

  /// \brief Throws ShapeError naming the tensor if `p` does not fit this block.
  void check_params(const Params& p, const char* where = "titans::Block::check_params") const;

  /// \brief A fresh per-sequence state (position 0).
  State initial_state(const Params& p) const;

  /// \brief Throws unless `s` is a state of this block.
  /// Throws if `s` is not a state of this block: shapes, and the counters' agreement (the KV
  /// cache, the memory's position and the priming flag follow from the block's position).
  void check_state(const State& s, const char* where = "titans::Block::check_state") const;

  /// \brief Runs T tokens through the block, continuing `state`: returns (D, T).
  Mat forward(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, State& state) const;

  /// \brief One decode step; identical to forward on a single column.
  Vector<Scalar> step(const Params& p, const Eigen::Ref<const Vector<Scalar>>& x /* (D) */, State& state) const;

  /// \brief forward that also fills `cache` for backward.
  Mat forward_train(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, State& state, Cache& cache) const;

  /// \brief Backward of forward_train: adds dL/d(params) into grads and dL/dx into dx (D, T).
  void backward(const Params& p, const Cache& c, const Eigen::Ref<const Mat>& dout /* (D, T) */, Params& grads,
                Eigen::Ref<Mat> dx) const;

  /// \brief Forward over a batch: sequence i continues states[i]; sequences never share state.
  std::vector<Mat> forward_batch(const Params& p, const std::vector<Mat>& xs, std::vector<State>& states) const;

 private:
  static BlockConfig validated(const BlockConfig& c);

  MemoryTrainOptions train_options() const;

  /// Each head's memory weights after the state's last token (memory_current_weights).
  std::vector<std::vector<Mat>> weights_of(const NeuralMemoryState<Scalar>& m) const;
  void check_counters(const State& s, const char* where) const;

  Mat run(const char* where, const Params& p, const Eigen::Ref<const Mat>& xin, State& state, Cache* c) const;

  // y ⊗ m = RMSNorm_{gy}(y) ⊙ σ(RMSNorm_{gm}(m)).
  Mat gate(const Params& p, const Mat& y, const Mat& m, Mat* y_rinv, Mat* m_rinv) const;
  void gate_backward(const Params& p, const Mat& y, const Mat& m, const Mat& y_rinv, const Mat& m_rinv,
                     const Mat& dout, Params& grads, Mat& dy, Mat& dm) const;

  // The memory over u, primed with the persistent tokens on a fresh state: returns (D, T) and,
  // when it primes, the outputs at the persistent tokens in *primed_out.
  Mat memory_run(const Params& p, const Mat& u, State& state, Cache* c, Mat* primed_out) const;

  Mat mixer(const Params& p, const Mat& u, State& state, Cache* c) const;

  // MAC retrieval of n tokens from the queries q_raw (D, n) that a query path made:
  // q = ℓ2norm_head(q_raw), r = M*_snapshot(q) per head, h = gain ⊙ RMSNorm_head(r). Both norms
  // use the memory's ε, as the memory's own query path does.
  Mat retrieve(const Params& p, const Mat& q_raw, const std::vector<std::vector<Mat>>& snap,
               typename Cache::Segment* sc) const;

  // Backward of retrieve for dh (D, n): adds into grads (retrieve gain, memory gain) and, when
  // dsnap is given, the snapshot weights' gradient; returns dL/d(q_raw) (D, n) for the query path.
  Mat retrieve_backward(const Params& p, const typename Cache::Segment& sc, const Mat& dh, Params& grads,
                        std::vector<MemoryState<Scalar>>* dsnap) const;

  // The query paths. Interleaved: q_raw = SiLU(W_R u) for the segment's tokens u (D, n).
  // [choice] The retrieval query path has its own projection (the paper's q_t = S^(t) W_Q) and no
  // convolution, so it reads only the segment's own tokens. Figure 3a: q_raw = retrieve_queries.
  Mat retrieval_queries(const Params& p, const Mat& u, typename Cache::Segment* sc) const;
  // Adds the query path's gradients for dq_raw (D, n) into grads and (interleaved) du (D, n).
  void retrieval_queries_backward(const Params& p, const typename Cache::Segment& sc, const Eigen::Ref<const Mat>& u,
                                  const Mat& dq_raw, Params& grads, Mat& du) const;

  // Keys and values MAC's KV cache holds per segment token: 2 interleaved, 1 with memory tokens.
  Index mac_keys_per_token() const { return cfg_.has_retrieve_queries() ? 1 : 2; }

  // MAC over u, segment by segment (segments aligned to the absolute position).
  Mat mac(const Params& p, const Mat& u, State& state, Cache* c) const;

  void mixer_backward(const Params& p, const Cache& c, const Mat& dmix, Params& grads, Mat& du) const;

  // Backward of memory_run: dm (D, T) for the outputs at u; dprimed (D, N_p) for the outputs at
  // the persistent tokens when the call primed the memory.
  void memory_backward_primed(const Params& p, const Cache& c, const Mat& dm, Params& grads, Mat& du,
                              const Mat* dprimed) const;

  void mac_backward(const Params& p, const Cache& c, const Mat& dmix, Params& grads, Mat& du) const;

  BlockConfig cfg_;
  Attention<Scalar> attn_;
  NeuralMemory<Scalar> mem_;
};

template <class Scalar>
auto Block<Scalar>::init(std::uint64_t seed) const -> Params {
  const Index D = cfg_.dim, F = cfg_.ffn_width();
  detail::Rng rng(seed);
  Params p;
  p.has_attention = cfg_.has_attention();
  p.has_memory = cfg_.has_memory();
  p.has_gate = cfg_.has_gate();
  p.has_retrieve = cfg_.kind == BlockKind::mac;
  p.has_retrieve_queries = cfg_.has_retrieve_queries();
  auto normal = [&](Index r, Index c, double sd) {
    Mat m(r, c);
    rng.fill_normal(m, sd);
    return m;
  };
  p.norm_mixer = Mat::Ones(D, 1);
  p.norm_ffn = Mat::Ones(D, 1);
  p.persistent = normal(D, cfg_.persistent, 1.0);
  if (p.has_attention) p.attention = attn_.init(seed * 0x9E3779B97F4A7C15ULL + 1);
  if (p.has_memory) p.memory = mem_.init(seed * 0x9E3779B97F4A7C15ULL + 2);
  if (p.has_gate) {
    p.gate_y = Mat::Ones(D, 1);
    p.gate_m = Mat::Ones(D, 1);
  }
  if (p.has_retrieve) {
    // [choice] The learned queries are N(0, 1), like the persistent tokens: they are ℓ2-normalised
    // per head, so their scale sets only the step an optimizer's update turns them by.
    if (p.has_retrieve_queries) {
      p.retrieve_queries = normal(D, cfg_.memory_tokens, 1.0);
    } else {
      p.retrieve_w = normal(D, D, 1.0 / std::sqrt(static_cast<double>(D)));
    }
    p.retrieve_gain = Mat::Ones(D, 1);
  }
  p.ffn_w1 = normal(F, D, 1.0 / std::sqrt(static_cast<double>(D)));
  p.ffn_w3 = normal(F, D, 1.0 / std::sqrt(static_cast<double>(D)));
  p.ffn_w2 = normal(D, F, 1.0 / std::sqrt(static_cast<double>(F)));
  return p;
}

template <class Scalar>
void Block<Scalar>::check_params(const Params& p, const char* where) const {
  const Index D = cfg_.dim, F = cfg_.ffn_width();
  if (p.has_attention != cfg_.has_attention() || p.has_memory != cfg_.has_memory() ||
      p.has_gate != cfg_.has_gate() || p.has_retrieve != (cfg_.kind == BlockKind::mac))
    detail::raise<ShapeError>(where, "params were not made for a ", to_string(cfg_.kind), " block");
  if (p.has_retrieve_queries != cfg_.has_retrieve_queries())
    detail::raise<ShapeError>(where, "params were not made for a mac block with memory_tokens = ", cfg_.memory_tokens,
                              ": they have ", p.has_retrieve_queries ? "retrieve.queries" : "retrieve.w",
                              ", the block needs ", cfg_.has_retrieve_queries() ? "retrieve.queries" : "retrieve.w");
  detail::check_shape(where, "params.norm_mixer", p.norm_mixer, D, 1);
  detail::check_shape(where, "params.norm_ffn", p.norm_ffn, D, 1);
  detail::check_shape(where, "params.persistent", p.persistent, D, cfg_.persistent);
  if (p.has_attention) attn_.check_params(p.attention, where);
  if (p.has_memory) mem_.check_params(p.memory, where);
  if (p.has_gate) {
    detail::check_shape(where, "params.gate_y", p.gate_y, D, 1);
    detail::check_shape(where, "params.gate_m", p.gate_m, D, 1);
  }
  if (p.has_retrieve) {
    if (p.has_retrieve_queries) {
      detail::check_shape(where, "params.retrieve_queries (retrieve.queries)", p.retrieve_queries, D, cfg_.memory_tokens);
    } else {
      detail::check_shape(where, "params.retrieve_w", p.retrieve_w, D, D);
    }
    detail::check_shape(where, "params.retrieve_gain", p.retrieve_gain, D, 1);
  }
  detail::check_shape(where, "params.ffn_w1", p.ffn_w1, F, D);
  detail::check_shape(where, "params.ffn_w3", p.ffn_w3, F, D);
  detail::check_shape(where, "params.ffn_w2", p.ffn_w2, D, F);
}

template <class Scalar>
auto Block<Scalar>::initial_state(const Params& p) const -> State {
  check_params(p, "titans::Block::initial_state");
  State s;
  if (cfg_.has_memory()) s.memory = mem_.initial_state(p.memory);
  s.attention = attn_.initial_state();
  if (cfg_.kind == BlockKind::mac) s.snapshot = weights_of(s.memory);
  s.persistent_y.resize(cfg_.dim, 0);
  s.primed = false;
  return s;
}

template <class Scalar>
void Block<Scalar>::check_state(const State& s, const char* where) const {
  if (cfg_.has_memory()) mem_.check_state(s.memory, where);
  attn_.check_state(s.attention, where);
  if (s.position < 0) detail::raise<InvalidArgument>(where, "state.position is ", s.position, ", expected >= 0");
  if (cfg_.kind == BlockKind::mac) {
    if (static_cast<Index>(s.snapshot.size()) != cfg_.memory.heads)
      detail::raise<ShapeError>(where, "state.snapshot has ", s.snapshot.size(), " heads, expected ",
                                cfg_.memory.heads);
    for (const auto& w : s.snapshot) check_memory_weights(where, "state.snapshot[h]", cfg_.memory.memory(), w);
    if (s.attention.k.cols() > mac_keys_per_token() * cfg_.segment)
      detail::raise<ShapeError>(where, "state.attention holds ", s.attention.k.cols(), " keys, a segment has at most ",
                                mac_keys_per_token() * cfg_.segment);
  }
  if (cfg_.kind == BlockKind::mal && s.primed)
    detail::check_shape(where, "state.persistent_y", s.persistent_y, cfg_.dim, cfg_.persistent);
  check_counters(s, where);
}

template <class Scalar>
void Block<Scalar>::check_counters(const State& s, const char* where) const {
  // What the positions imply (a state restored from a file must agree with itself):
  // the memory has read the block's tokens (plus the persistent tokens once primed, except in
  // MAC, where they go to the attention), the KV cache holds the tokens the attention still
  // sees, and only the blocks whose memory reads the persistent tokens are ever primed.
  const Index pos = s.position, np = cfg_.persistent;
  const bool primes = cfg_.has_memory() && cfg_.kind != BlockKind::mac;
  if (s.primed != (primes && pos > 0))
    detail::raise<InvalidArgument>(where, "state.primed is ", detail::format_bool(s.primed), " at position ", pos,
                                   " of a ", to_string(cfg_.kind), " block, expected ",
                                   detail::format_bool(primes && pos > 0));
  if (cfg_.has_memory()) {
    const Index want = pos + (s.primed ? np : 0);
    if (s.memory.position != want)
      detail::raise<InvalidArgument>(where, "state.memory.position is ", s.memory.position, ", expected ", want,
                                     " (block position ", pos, s.primed ? " plus the persistent tokens)" : ")");
  }
  Index cached = 0;
  switch (cfg_.kind) {
    case BlockKind::lmm: break;
    case BlockKind::mac: cached = mac_keys_per_token() * (pos % cfg_.segment); break;
    case BlockKind::mag:
    case BlockKind::mal:
    case BlockKind::swa: cached = std::min(pos, cfg_.window - 1); break;
  }
  const Index attention_position = cfg_.has_attention() ? pos : 0;
  if (s.attention.k.cols() != cached)
    detail::raise<InvalidArgument>(where, "state.attention holds ", s.attention.k.cols(), " keys at position ", pos,
                                   " of a ", to_string(cfg_.kind), " block, expected ", cached);
  if (s.attention.position != attention_position)
    detail::raise<InvalidArgument>(where, "state.attention.position is ", s.attention.position, ", expected ",
                                   attention_position);
  const Index py = cfg_.kind == BlockKind::mal && s.primed ? np : 0;
  detail::check_shape(where, "state.persistent_y", s.persistent_y, cfg_.dim, py);
}

template <class Scalar>
auto Block<Scalar>::forward(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, State& state) const -> Mat {
  constexpr const char* where = "titans::Block::forward";
  return detail::naming_bad_parameters(where, p, [&] { return run(where, p, x, state, nullptr); });
}

template <class Scalar>
auto Block<Scalar>::step(const Params& p, const Eigen::Ref<const Vector<Scalar>>& x /* (D) */, State& state) const -> Vector<Scalar> {
  const Mat out = forward(p, x, state);
  return out.col(0);
}

template <class Scalar>
auto Block<Scalar>::forward_train(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, State& state, Cache& cache) const -> Mat {
  constexpr const char* where = "titans::Block::forward_train";
  cache = Cache{};
  return detail::naming_bad_parameters(where, p, [&] { return run(where, p, x, state, &cache); });
}

template <class Scalar>
void Block<Scalar>::backward(const Params& p, const Cache& c, const Eigen::Ref<const Mat>& dout /* (D, T) */, Params& grads,
                             Eigen::Ref<Mat> dx) const {
  constexpr const char* where = "titans::Block::backward";
  check_params(p, where);
  check_params(grads, "titans::Block::backward (grads)");
  const Index D = cfg_.dim, T = c.x.cols();
  if (c.x.rows() != D || c.u2.cols() != T)
    detail::raise<InvalidArgument>(where, "cache was not filled by forward_train of this block");
  detail::check_shape(where, "dout", dout, D, T);
  detail::check_finite(where, "dout", dout);
  detail::check_shape(where, "dx", dx, D, T);
  // FFN: out = x1 + W2 (silu(a1) ⊙ a3), a1 = W1 u2, a3 = W3 u2, u2 = RMSNorm(x1).
  const Mat sig = detail::sigmoid<Scalar>(c.ffn_a1);
  const Mat silu = c.ffn_a1.cwiseProduct(sig);
  const Mat hmid = silu.cwiseProduct(c.ffn_a3);
  detail::product_add<detail::Trans::no, detail::Trans::yes>(Scalar(1), dout, hmid, grads.ffn_w2);
  Mat dh;
  detail::product<detail::Trans::yes, detail::Trans::no>(p.ffn_w2, dout, dh);
  const Mat da3 = dh.cwiseProduct(silu);
  const Mat da1 = (dh.cwiseProduct(c.ffn_a3).array() * sig.array() * (Scalar(1) + c.ffn_a1.array() * (Scalar(1) - sig.array())))
                      .matrix();
  detail::product_add<detail::Trans::no, detail::Trans::yes>(Scalar(1), da1, c.u2, grads.ffn_w1);
  detail::product_add<detail::Trans::no, detail::Trans::yes>(Scalar(1), da3, c.u2, grads.ffn_w3);
  Mat du2;
  detail::product<detail::Trans::yes, detail::Trans::no>(p.ffn_w1, da1, du2);
  detail::product_add<detail::Trans::yes, detail::Trans::no>(Scalar(1), p.ffn_w3, da3, du2);
  Mat dx1 = dout;
  detail::rms_norm_backward<Scalar>(c.x1, p.norm_ffn, c.n2_rinv, du2, dx1, grads.norm_ffn);
  // Mixer: x1 = x + mixer(u), u = RMSNorm(x).
  Mat du = Mat::Zero(D, T);
  mixer_backward(p, c, dx1, grads, du);
  Mat dxl = dx1;
  detail::rms_norm_backward<Scalar>(c.x, p.norm_mixer, c.n1_rinv, du, dxl, grads.norm_mixer);
  dx += dxl;
}

template <class Scalar>
auto Block<Scalar>::forward_batch(const Params& p, const std::vector<Mat>& xs, std::vector<State>& states) const -> std::vector<Mat> {
  return detail::forward_each("titans::Block::forward_batch", *this, cfg_.dim, p, xs, states);
}

template <class Scalar>
auto Block<Scalar>::validated(const BlockConfig& c) -> BlockConfig {
  c.validate("titans::Block");
  return c;
}

template <class Scalar>
auto Block<Scalar>::train_options() const -> MemoryTrainOptions {
  MemoryTrainOptions o;
  o.checkpoint_every = cfg_.checkpoint_every;
  return o;
}

template <class Scalar>
auto Block<Scalar>::weights_of(const NeuralMemoryState<Scalar>& m) const -> std::vector<std::vector<Mat>> {
  std::vector<std::vector<Mat>> w;
  const MemoryConfig mem = cfg_.memory.memory();
  for (const auto& h : m.heads) w.push_back(memory_current_weights(mem, h));
  return w;
}

template <class Scalar>
auto Block<Scalar>::run(const char* where, const Params& p, const Eigen::Ref<const Mat>& xin, State& state, Cache* c) const -> Mat {
  check_params(p, where);
  check_state(state, where);
  detail::check_shape(where, "x", xin, cfg_.dim, -1);
  detail::check_finite(where, "x", xin);
  const Index T = xin.cols();
  const Mat x = xin;
  Mat n1_rinv, n2_rinv;
  const Mat u = detail::rms_norm<Scalar>(x, p.norm_mixer, cfg_.norm_eps, c ? &n1_rinv : nullptr);
  if (c) c->fresh = state.position == 0;
  Mat mix = mixer(p, u, state, c);
  Mat x1 = x + mix;
  const Mat u2 = detail::rms_norm<Scalar>(x1, p.norm_ffn, cfg_.norm_eps, c ? &n2_rinv : nullptr);
  Mat a1, a3;
  detail::product<detail::Trans::no, detail::Trans::no>(p.ffn_w1, u2, a1);
  detail::product<detail::Trans::no, detail::Trans::no>(p.ffn_w3, u2, a3);
  const Mat hmid = (a1.array() / (Scalar(1) + (-a1.array()).exp()) * a3.array()).matrix();
  Mat out = x1;
  detail::product_add<detail::Trans::no, detail::Trans::no>(Scalar(1), p.ffn_w2, hmid, out);
  detail::check_finite_output(where, p, out);
  state.position += T;
  if (c) {
    c->x = x;
    c->u = u;
    c->n1_rinv = std::move(n1_rinv);
    c->x1 = std::move(x1);
    c->u2 = u2;
    c->n2_rinv = std::move(n2_rinv);
    c->ffn_a1 = std::move(a1);
    c->ffn_a3 = std::move(a3);
  }
  return out;
}

template <class Scalar>
auto Block<Scalar>::gate(const Params& p, const Mat& y, const Mat& m, Mat* y_rinv, Mat* m_rinv) const -> Mat {
  const Mat yn = detail::rms_norm<Scalar>(y, p.gate_y, cfg_.norm_eps, y_rinv);
  const Mat mn = detail::rms_norm<Scalar>(m, p.gate_m, cfg_.norm_eps, m_rinv);
  return yn.cwiseProduct(detail::sigmoid<Scalar>(mn));
}

template <class Scalar>
void Block<Scalar>::gate_backward(const Params& p, const Mat& y, const Mat& m, const Mat& y_rinv, const Mat& m_rinv,
                                  const Mat& dout, Params& grads, Mat& dy, Mat& dm) const {
  const Mat yn = detail::rms_norm<Scalar>(y, p.gate_y, cfg_.norm_eps, nullptr);
  const Mat mn = detail::rms_norm<Scalar>(m, p.gate_m, cfg_.norm_eps, nullptr);
  const Mat s = detail::sigmoid<Scalar>(mn);
  const Mat dyn = dout.cwiseProduct(s);
  const Mat dmn = (dout.array() * yn.array() * s.array() * (Scalar(1) - s.array())).matrix();
  detail::rms_norm_backward<Scalar>(y, p.gate_y, y_rinv, dyn, dy, grads.gate_y);
  detail::rms_norm_backward<Scalar>(m, p.gate_m, m_rinv, dmn, dm, grads.gate_m);
}

template <class Scalar>
auto Block<Scalar>::memory_run(const Params& p, const Mat& u, State& state, Cache* c, Mat* primed_out) const -> Mat {
  const Index np = cfg_.persistent, T = u.cols();
  const bool prime = !state.primed && np > 0 && T > 0;  // an empty call leaves a fresh state fresh
  Mat in;
  if (prime) {
    in.resize(cfg_.dim, np + T);
    in << p.persistent, u;
  }
  const Mat& src = prime ? in : u;
  Mat out;
  if (c) {
    mem_.settle(state.memory);  // the gradient of the memory's start state is in the settled form
    c->memory_start_zero = zeros_like(state.memory);
    out = mem_.forward_train(p.memory, src, state.memory, c->memory, train_options());
    c->primed_here = prime;
  } else {
    out = mem_.forward(p.memory, src, state.memory);
  }
  if (T > 0) state.primed = true;
  if (prime) {
    if (primed_out) *primed_out = out.leftCols(np);
    return out.rightCols(T);
  }
  return out;
}

template <class Scalar>
auto Block<Scalar>::mixer(const Params& p, const Mat& u, State& state, Cache* c) const -> Mat {
  switch (cfg_.kind) {
    case BlockKind::lmm:
      return memory_run(p, u, state, c, nullptr);
    case BlockKind::swa:
      return c ? attn_.forward_train(p.attention, u, p.persistent, state.attention, c->attention)
               : attn_.forward(p.attention, u, p.persistent, state.attention);
    case BlockKind::mag: {
      Mat y = c ? attn_.forward_train(p.attention, u, p.persistent, state.attention, c->attention)
                : attn_.forward(p.attention, u, p.persistent, state.attention);
      Mat m = memory_run(p, u, state, c, nullptr);
      Mat o = gate(p, y, m, c ? &c->y_rinv : nullptr, c ? &c->m_rinv : nullptr);
      if (c) {
        c->y = std::move(y);
        c->m = std::move(m);
      }
      return o;
    }
    case BlockKind::mal: {
      // [choice] The memory's outputs at the persistent tokens are the attention's persistent
      // (always visible) tokens, as the persistent tokens themselves are in MAG.
      Mat py;
      Mat y = memory_run(p, u, state, c, &py);
      if (py.size() > 0 || cfg_.persistent == 0) state.persistent_y = py.size() > 0 ? py : Mat(cfg_.dim, 0);
      Mat o = c ? attn_.forward_train(p.attention, y, state.persistent_y, state.attention, c->attention)
                : attn_.forward(p.attention, y, state.persistent_y, state.attention);
      if (c) c->y = std::move(y);
      return o;
    }
    case BlockKind::mac:
      return mac(p, u, state, c);
  }
  return Mat();
}

template <class Scalar>
void Block<Scalar>::mixer_backward(const Params& p, const Cache& c, const Mat& dmix, Params& grads, Mat& du) const {
  const Index D = cfg_.dim, T = c.u.cols(), np = cfg_.persistent;
  switch (cfg_.kind) {
    case BlockKind::swa: {
      Mat dp = Mat::Zero(D, np);
      attn_.backward_causal(p.attention, c.attention, dmix, grads.attention, du, dp);
      grads.persistent += dp;
      return;
    }
    case BlockKind::lmm:
      memory_backward_primed(p, c, dmix, grads, du, nullptr);
      return;
    case BlockKind::mag: {
      Mat dy = Mat::Zero(D, T), dm = Mat::Zero(D, T);
      gate_backward(p, c.y, c.m, c.y_rinv, c.m_rinv, dmix, grads, dy, dm);
      Mat dp = Mat::Zero(D, np);
      attn_.backward_causal(p.attention, c.attention, dy, grads.attention, du, dp);
      grads.persistent += dp;
      memory_backward_primed(p, c, dm, grads, du, nullptr);
      return;
    }
    case BlockKind::mal: {
      Mat dy = Mat::Zero(D, T), dpy = Mat::Zero(D, c.attention.prefix.cols());
      attn_.backward_causal(p.attention, c.attention, dmix, grads.attention, dy, dpy);
      memory_backward_primed(p, c, dy, grads, du, c.primed_here ? &dpy : nullptr);
      return;
    }
    case BlockKind::mac:
      mac_backward(p, c, dmix, grads, du);
      return;
  }
}

template <class Scalar>
void Block<Scalar>::memory_backward_primed(const Params& p, const Cache& c, const Mat& dm, Params& grads, Mat& du,
                                           const Mat* dprimed) const {
  const Index np = cfg_.persistent, T = dm.cols(), D = cfg_.dim;
  const Index lead = c.primed_here ? np : 0;
  Mat dout = Mat::Zero(D, lead + T);
  dout.rightCols(T) = dm;
  if (dprimed) dout.leftCols(np) = *dprimed;
  Mat dsrc = Mat::Zero(D, lead + T);
  NeuralMemoryState<Scalar> dinit = c.memory_start_zero;
  mem_.backward(p.memory, c.memory, dout, nullptr, grads.memory, dsrc, c.fresh ? &dinit : nullptr);
  if (c.fresh) mem_.initial_state_backward(dinit, grads.memory);
  du += dsrc.rightCols(T);
  if (lead > 0) grads.persistent += dsrc.leftCols(np);
}

}  // namespace titans

#include "blocks/mac.hpp"  // MAC's operations of Block (retrieval, segments, backward)

namespace titans {

/// \brief One item (parameters or state) per block of a BlockStack, enumerated with the prefix
/// "block{i}." ("block0.attention.w_q", …).
template <class Item>
struct BlockList {
  using scalar_type = typename Item::scalar_type;
  std::vector<Item> blocks;

  TITANS_DEFINE_FOR_EACH()

  /// Every field of every block's state under "block{i}." (states only: io/session.hpp).
  template <class Ar>
  void visit(Ar& ar) {
    visit_impl(*this, ar);
  }
  template <class Ar>
  void visit(Ar& ar) const {
    visit_impl(*this, ar);
  }

 private:
  template <class Self, class F>
  static void for_each_impl(Self& s, F& f) {
    for (std::size_t i = 0; i < s.blocks.size(); ++i)
      s.blocks[i].for_each([&](const std::string& n, auto& t) { f("block" + std::to_string(i) + "." + n, t); });
  }
  template <class Self, class Ar>
  static void visit_impl(Self& s, Ar& ar) {
    for (std::size_t i = 0; i < s.blocks.size(); ++i) ar.nested("block" + std::to_string(i) + ".", s.blocks[i]);
  }
};

/// \brief Parameters of a BlockStack: one BlockParams per block.
template <class Scalar>
using BlockStackParams = BlockList<BlockParams<Scalar>>;

/// \brief Per-sequence state of a BlockStack: one BlockState per block.
template <class Scalar>
using BlockStackState = BlockList<BlockState<Scalar>>;

/// \brief Any sequence of blocks applied in order, e.g. {mac, swa, mal} for a hybrid.
template <class Scalar>
class BlockStack {
 public:
  using Params = BlockStackParams<Scalar>;
  using State = BlockStackState<Scalar>;
  using Cache = std::vector<BlockCache<Scalar>>;
  using Mat = Matrix<Scalar>;

  /// One config per block; all must share dim.
  explicit BlockStack(const std::vector<BlockConfig>& configs);
  /// The same config for every block, with the kinds given.
  BlockStack(const BlockConfig& base, const std::vector<BlockKind>& kinds) : BlockStack(expand(base, kinds)) {}

  Index size() const { return static_cast<Index>(blocks_.size()); }
  Index dim() const { return blocks_.front().config().dim; }
  const Block<Scalar>& block(Index i) const { return blocks_.at(static_cast<std::size_t>(i)); }

  /// Block i is initialised from a seed derived from `seed` and i.
  /// Number of scalars in init()'s parameters, computed from the config alone (nothing is
  /// allocated: load_model checks it against the file before building the parameters).
  Index parameter_count() const {
    Index n = 0;
    for (const auto& b : blocks_) n += b.parameter_count();
    return n;
  }

  Params init(std::uint64_t seed) const;

  void check_params(const Params& p, const char* where = "titans::BlockStack::check_params") const;

  State initial_state(const Params& p) const;

  /// Throws if `s` is not a state of this stack (each block's check_state; all at one position).
  void check_state(const State& s, const char* where = "titans::BlockStack::check_state") const;

  Mat forward(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, State& state) const;

  Vector<Scalar> step(const Params& p, const Eigen::Ref<const Vector<Scalar>>& x /* (D) */, State& state) const;

  Mat forward_train(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, State& state, Cache& cache) const;

  /// Adds dL/d(params) into grads and dL/dx into dx (D, T).
  void backward(const Params& p, const Cache& cache, const Eigen::Ref<const Mat>& dout /* (D, T) */, Params& grads,
                Eigen::Ref<Mat> dx) const;

 private:
  static std::vector<BlockConfig> expand(const BlockConfig& base, const std::vector<BlockKind>& kinds);
  void check_sizes(const char* where, const Params& p, const State& s) const;
  // Every block's params and state, and x, before the first block advances its state.
  void check_call(const char* where, const Params& p, const Eigen::Ref<const Mat>& x, const State& s) const;

  std::vector<Block<Scalar>> blocks_;
};

template <class Scalar>
BlockStack<Scalar>::BlockStack(const std::vector<BlockConfig>& configs) {
  constexpr const char* where = "titans::BlockStack";
  if (configs.empty()) detail::raise<InvalidArgument>(where, "a stack needs at least one block");
  for (std::size_t i = 0; i < configs.size(); ++i) {
    if (configs[i].dim != configs[0].dim)
      detail::raise<InvalidArgument>(where, "block ", i, " has dim ", configs[i].dim, ", block 0 has ",
                                     configs[0].dim);
    blocks_.emplace_back(configs[i]);
  }
}

template <class Scalar>
auto BlockStack<Scalar>::init(std::uint64_t seed) const -> Params {
  Params p;
  for (std::size_t i = 0; i < blocks_.size(); ++i) p.blocks.push_back(blocks_[i].init(seed + 1000003ULL * (i + 1)));
  return p;
}

template <class Scalar>
void BlockStack<Scalar>::check_params(const Params& p, const char* where) const {
  if (p.blocks.size() != blocks_.size())
    detail::raise<ShapeError>(where, "params hold ", p.blocks.size(), " blocks, the stack has ", blocks_.size());
  for (std::size_t i = 0; i < blocks_.size(); ++i) blocks_[i].check_params(p.blocks[i], where);
}

template <class Scalar>
auto BlockStack<Scalar>::initial_state(const Params& p) const -> State {
  check_params(p, "titans::BlockStack::initial_state");
  State s;
  for (std::size_t i = 0; i < blocks_.size(); ++i) s.blocks.push_back(blocks_[i].initial_state(p.blocks[i]));
  return s;
}

template <class Scalar>
auto BlockStack<Scalar>::forward(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, State& state) const -> Mat {
  constexpr const char* where = "titans::BlockStack::forward";
  check_sizes(where, p, state);
  check_call(where, p, x, state);
  return detail::naming_bad_parameters(where, p, [&] {
    Mat h = x;
    for (std::size_t i = 0; i < blocks_.size(); ++i) h = blocks_[i].forward(p.blocks[i], h, state.blocks[i]);
    return h;
  });
}

template <class Scalar>
auto BlockStack<Scalar>::step(const Params& p, const Eigen::Ref<const Vector<Scalar>>& x /* (D) */, State& state) const -> Vector<Scalar> {
  const Mat out = forward(p, x, state);
  return out.col(0);
}

template <class Scalar>
auto BlockStack<Scalar>::forward_train(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, State& state, Cache& cache) const -> Mat {
  constexpr const char* where = "titans::BlockStack::forward_train";
  check_sizes(where, p, state);
  check_call(where, p, x, state);
  cache.assign(blocks_.size(), BlockCache<Scalar>{});
  return detail::naming_bad_parameters(where, p, [&] {
    Mat h = x;
    for (std::size_t i = 0; i < blocks_.size(); ++i)
      h = blocks_[i].forward_train(p.blocks[i], h, state.blocks[i], cache[i]);
    return h;
  });
}

template <class Scalar>
void BlockStack<Scalar>::backward(const Params& p, const Cache& cache, const Eigen::Ref<const Mat>& dout /* (D, T) */, Params& grads,
                                  Eigen::Ref<Mat> dx) const {
  constexpr const char* where = "titans::BlockStack::backward";
  check_params(p, where);
  check_params(grads, "titans::BlockStack::backward (grads)");
  if (cache.size() != blocks_.size())
    detail::raise<InvalidArgument>(where, "cache holds ", cache.size(), " blocks, the stack has ", blocks_.size());
  // Every argument before the last block adds into grads.
  const Index D = dim(), T = cache.front().x.cols();
  for (std::size_t i = 0; i < cache.size(); ++i)
    if (cache[i].x.rows() != D || cache[i].x.cols() != T || cache[i].u2.cols() != T)
      detail::raise<InvalidArgument>(where, "cache[", i, "] was not filled by forward_train of this stack");
  detail::check_shape(where, "dout", dout, D, T);
  detail::check_finite(where, "dout", dout);
  detail::check_shape(where, "dx", dx, D, T);
  Mat d = dout;
  for (std::size_t i = blocks_.size(); i-- > 0;) {
    Mat di = Mat::Zero(d.rows(), d.cols());
    blocks_[i].backward(p.blocks[i], cache[i], d, grads.blocks[i], di);
    d = std::move(di);
  }
  dx += d;
}

template <class Scalar>
auto BlockStack<Scalar>::expand(const BlockConfig& base, const std::vector<BlockKind>& kinds) -> std::vector<BlockConfig> {
  std::vector<BlockConfig> out;
  for (BlockKind k : kinds) {
    BlockConfig c = base;
    c.kind = k;
    out.push_back(c);
  }
  return out;
}

template <class Scalar>
void BlockStack<Scalar>::check_sizes(const char* where, const Params& p, const State& s) const {
  if (p.blocks.size() != blocks_.size())
    detail::raise<ShapeError>(where, "params hold ", p.blocks.size(), " blocks, the stack has ", blocks_.size());
  if (s.blocks.size() != blocks_.size())
    detail::raise<ShapeError>(where, "state holds ", s.blocks.size(), " blocks, the stack has ", blocks_.size());
}

template <class Scalar>
void BlockStack<Scalar>::check_call(const char* where, const Params& p, const Eigen::Ref<const Mat>& x,
                                    const State& s) const {
  check_params(p, where);
  check_state(s, where);
  detail::check_shape(where, "x", x, dim(), -1);
  detail::check_finite(where, "x", x);
}

template <class Scalar>
void BlockStack<Scalar>::check_state(const State& s, const char* where) const {
  if (s.blocks.size() != blocks_.size())
    detail::raise<ShapeError>(where, "state holds ", s.blocks.size(), " blocks, the stack has ", blocks_.size());
  for (std::size_t i = 0; i < blocks_.size(); ++i) {
    blocks_[i].check_state(s.blocks[i], where);
    if (s.blocks[i].position != s.blocks[0].position)
      detail::raise<InvalidArgument>(where, "block ", i, " is at position ", s.blocks[i].position, ", block 0 at ",
                                     s.blocks[0].position);
  }
}

// The float and double instantiations (README, "Faster builds: titans::compiled"): PREFIX is `extern` for the
// declarations below and empty in src/instantiate_*.cpp, which define them.
#define TITANS_INSTANTIATE_BLOCKS(PREFIX, S) \
  PREFIX template class Block<S>;                                                                                \
  PREFIX template class BlockStack<S>;

#ifdef TITANS_EXTERN_FLOAT
TITANS_INSTANTIATE_BLOCKS(extern, float)
#endif
#ifdef TITANS_EXTERN_DOUBLE
TITANS_INSTANTIATE_BLOCKS(extern, double)
#endif

}  // namespace titans
