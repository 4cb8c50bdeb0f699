// SPDX-License-Identifier: Apache-2.0
//
// \file attention.hpp
// \brief Causal multi-head softmax attention with rotary position embeddings (docs/MATH.md §6):
// full causal or a sliding window of w tokens, learned persistent tokens that every query sees,
// a KV-cache state for streaming, and the backward pass.
//
//     titans::AttentionConfig cfg;            // D = 256, H = 4, window = 0 (full causal)
//     cfg.window = 128;                       // sliding window: O(T·w) time, O(w) state
//     titans::Attention<float> attn(cfg);
//     auto params = attn.init(/*seed=*/1);
//     auto state = attn.initial_state();
//     titans::Matrix<float> y = attn.forward(params, x /* (D, T) */, persistent /* (D, N_p) */, state);
//
// The blocked kernel computes, per head and per block of queries, one GEMM of scores against
// the persistent keys and the keys the block can see, a masked softmax, and one GEMM with the
// values, so a sliding window costs O(T·(w + block)) and never O(T²).
#pragma once

#include "common.hpp"
#include "detail/gemm.hpp"
#include "detail/parallel.hpp"
#include "detail/random.hpp"
#include "parameters.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace titans {

/// \brief Shape and behaviour of an Attention layer.
struct AttentionConfig {
  Index dim = 256;           ///< D: model width
  Index heads = 4;           ///< H: heads of width D / H (even, for the rotary pairs)
  Index window = 0;          ///< w >= 1: each token sees itself and the w − 1 before it; 0: full causal
  double rope_base = 10000;  ///< base of the rotary frequencies base^(−2i/d_h)
  Index block = 64;          ///< queries per block of the blocked kernel (a speed knob only)

  Index head_dim() const { return heads > 0 ? dim / heads : 0; }

  /// Throws InvalidArgument naming the field.
  void validate(const char* where = "titans::AttentionConfig") const {
    detail::check_range(where, "dim", dim, 1, limits::dim);
    detail::check_range(where, "heads", heads, 1, dim);
    if (dim % heads != 0) detail::raise<InvalidArgument>(where, "heads (", heads, ") does not divide dim (", dim, ")");
    if (head_dim() % 2 != 0)
      detail::raise<InvalidArgument>(where, "head width dim / heads = ", head_dim(),
                                     " is odd; rotary embeddings need an even head width");
    if (window < 0 || window > limits::span)
      detail::raise<InvalidArgument>(where, "window is ", window, ", expected a value in [1, ", limits::span,
                                     "] (or 0 for full causal)");
    if (!(rope_base > 1) || !std::isfinite(rope_base))
      detail::raise<InvalidArgument>(where, "rope_base is ", rope_base, ", expected a finite value > 1");
    detail::check_range(where, "block", block, 1, limits::block);
  }
};

/// \brief Parameters of an Attention layer: the four (D, D) projections.
template <class Scalar>
struct AttentionParams {
  using scalar_type = Scalar;
  Matrix<Scalar> w_q, w_k, w_v, w_o;

  TITANS_DEFINE_FOR_EACH()

 private:
  template <class Self, class F>
  static void for_each_impl(Self& p, F& f) {
    f("w_q", p.w_q);
    f("w_k", p.w_k);
    f("w_v", p.w_v);
    f("w_o", p.w_o);
  }
};

/// \brief Per-sequence KV cache: projected keys (already rotated) and values of the tokens a
/// later query may still see; at most w − 1 of them with a window, all of them without.
template <class Scalar>
struct AttentionState {
  using scalar_type = Scalar;
  Matrix<Scalar> k, v;  ///< (D, n) cached keys (rotated) and values, oldest first
  Index position = 0;   ///< tokens seen since the state was made

  /// After a call over `tokens` tokens whose new keys and values are nk, nv (D, n): the cache
  /// becomes the last `keep` columns of [k, nk] and [v, nv] (all of them when keep < 0, none
  /// when keep = 0), and the position advances by `tokens`.
  void advance(const Matrix<Scalar>& nk, const Matrix<Scalar>& nv, Index tokens, Index keep = -1) {
    const Index nc = k.cols(), total = nc + nk.cols();
    keep = keep < 0 ? total : std::min(total, keep);
    const Index from_new = std::min(keep, nk.cols()), from_old = keep - from_new;
    Matrix<Scalar> k2(nk.rows(), keep), v2(nv.rows(), keep);
    k2.leftCols(from_old) = k.rightCols(from_old);
    v2.leftCols(from_old) = v.rightCols(from_old);
    k2.rightCols(from_new) = nk.rightCols(from_new);
    v2.rightCols(from_new) = nv.rightCols(from_new);
    k = std::move(k2);
    v = std::move(v2);
    position += tokens;
  }

  TITANS_DEFINE_STATE_FIELDS()

 private:
  template <class Self, class Ar>
  static void fields(Self& s, Ar& ar) {
    ar.tensor("k", s.k);
    ar.tensor("v", s.v);
    ar.count("position", s.position);
  }
};

/// \brief What Attention::backward needs from a training call.
template <class Scalar>
struct AttentionCache {
  Matrix<Scalar> xq, xkv, prefix;  ///< inputs: queries (D, Tq), new key/value tokens (D, Tkv), persistent (D, N_p)
  Matrix<Scalar> q;                ///< (D, Tq) rotated queries
  Matrix<Scalar> k, v;             ///< (D, N_p + n_cached + Tkv) every key (rotated) and value the call used
  Matrix<Scalar> a;                ///< (D, Tq) attention output before W_O
  std::vector<Index> qpos, kpos, lo, hi;
  Index cached = 0;                           ///< KV-cache entries at the call start
  std::vector<Matrix<Scalar>> probs;          ///< per (head, block): softmax weights (keys, queries)
  std::vector<Index> block_k0, block_k1;      ///< per block: the main-key range [k0, k1) it scored

  std::size_t bytes() const {
    std::size_t n = 0;
    for (const auto* m : {&xq, &xkv, &prefix, &q, &k, &v, &a}) n += static_cast<std::size_t>(m->size());
    for (const auto& p : probs) n += static_cast<std::size_t>(p.size());
    return n * sizeof(Scalar);
  }
};

namespace detail {

/// Rotates (inverse: un-rotates) each head's pairs (i, i + d_h/2) of column t by angle
/// pos[t]·base^(−2i/d_h). The angles are formed in double so long streams stay accurate in float.
template <class Scalar>
void rope_rotate(MatrixRef<Scalar> m /* (D, T) */, const std::vector<Index>& pos, Index heads, double base,
                 bool inverse) {
  const Index dh = m.rows() / heads, half = dh / 2;
  std::vector<double> freq(static_cast<std::size_t>(half));
  for (Index i = 0; i < half; ++i)
    freq[static_cast<std::size_t>(i)] = std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(dh));
  for (Index t = 0; t < m.cols(); ++t) {
    for (Index i = 0; i < half; ++i) {
      const double ang = static_cast<double>(pos[static_cast<std::size_t>(t)]) * freq[static_cast<std::size_t>(i)];
      const Scalar c = static_cast<Scalar>(std::cos(ang));
      const Scalar s = static_cast<Scalar>(inverse ? -std::sin(ang) : std::sin(ang));
      for (Index h = 0; h < heads; ++h) {
        const Index r = h * dh + i;
        const Scalar x1 = m(r, t), x2 = m(r + half, t);
        m(r, t) = x1 * c - x2 * s;
        m(r + half, t) = x1 * s + x2 * c;
      }
    }
  }
}

}  // namespace detail

/// \brief Multi-head causal softmax attention with rotary embeddings, a window, persistent
/// tokens and a KV cache. Holds only its config; parameters and state are passed explicitly.
template <class Scalar>
class Attention {
  static_assert(std::is_floating_point_v<Scalar>, "titans: Scalar must be a floating-point type");

 public:
  using Params = AttentionParams<Scalar>;
  using State = AttentionState<Scalar>;
  using Cache = AttentionCache<Scalar>;
  using Mat = Matrix<Scalar>;

  explicit Attention(const AttentionConfig& cfg) : cfg_(cfg) { cfg_.validate("titans::Attention"); }

  const AttentionConfig& config() const { return cfg_; }

  /// \brief Deterministic initialisation: projections N(0, 1/D).
  /// Number of scalars in init()'s parameters, computed from the config alone (nothing is
  /// allocated: load_model checks it against the file before building the parameters).
  Index parameter_count() const { return 4 * cfg_.dim * cfg_.dim; }

  Params init(std::uint64_t seed) const;

  void check_params(const Params& p, const char* where = "titans::Attention::check_params") const;

  /// \brief An empty KV cache at position 0.
  State initial_state() const;

  void check_state(const State& s, const char* where = "titans::Attention::check_state") const;

  /// \brief Causal attention over T new tokens continuing `state`: token t (absolute position
  /// state.position + t) sees every persistent token and the last w tokens up to itself (all of
  /// them when window = 0). Persistent tokens carry no position. Advances the KV cache.
  Mat forward(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, const Eigen::Ref<const Mat>& persistent /* (D, N_p) */,
              State& state) const;

  /// \brief forward that also fills `cache` for backward. The state carried in is a constant
  /// of the backward (gradients stop at the call boundary).
  Mat forward_train(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */,
                    const Eigen::Ref<const Mat>& persistent /* (D, N_p) */, State& state, Cache& cache) const;

  /// \brief The general form every block builds on. Queries xq (D, Tq) at rotary positions qpos;
  /// keys/values: the persistent tokens (always visible, no position), then the `cached` keys
  /// and values (already projected and rotated), then new tokens xkv (D, Tkv) at positions kpos.
  /// Query i sees the persistent tokens and the main keys (cached, then new) with index in
  /// [lo[i], hi[i]] (0 <= lo[i] <= n_main, hi[i] < n_main; empty only with persistent tokens); lo and
  /// hi must not decrease with i. cached_k / cached_v are (D, n_cached). Returns W_O·attention (D, Tq); the new
  /// tokens' projected keys/values are written to new_k/new_v when given.
  Mat attend(const char* where, const Params& p, const Eigen::Ref<const Mat>& xq, const std::vector<Index>& qpos,
             const Eigen::Ref<const Mat>& xkv, const std::vector<Index>& kpos, const Eigen::Ref<const Mat>& persistent,
             const Mat& cached_k, const Mat& cached_v, const std::vector<Index>& lo, const std::vector<Index>& hi,
             Cache* cache, Mat* new_k = nullptr, Mat* new_v = nullptr) const;

  /// \brief Backward of forward_train / attend: adds into grads, dxq (D, Tq), dxkv (D, Tkv) and
  /// dpersistent (D, N_p). For forward_train, xq and xkv are the same tokens: pass the same
  /// matrix as dxq and dxkv, or use backward_causal.
  void backward(const Params& p, const Cache& cache, const Eigen::Ref<const Mat>& dout /* (D, Tq) */, Params& grads,
                Eigen::Ref<Mat> dxq, Eigen::Ref<Mat> dxkv, Eigen::Ref<Mat> dpersistent) const;

  /// \brief Backward of forward_train: adds into grads, dx (D, T) and dpersistent (D, N_p).
  void backward_causal(const Params& p, const Cache& cache, const Eigen::Ref<const Mat>& dout /* (D, T) */,
                       Params& grads, Eigen::Ref<Mat> dx, Eigen::Ref<Mat> dpersistent) const;

  /// \brief FLOPs of one causal call of T tokens starting with `cached` KV entries and N_p
  /// persistent tokens: projections plus the scores and weighted sums actually visible.
  double flops(Index T, Index cached, Index np) const;

 private:
  Mat causal_impl(const char* where, const Params& p, const Eigen::Ref<const Mat>& x, const Eigen::Ref<const Mat>& persistent,
                  State& state, Cache* cache) const;

  // out = head rows [r0, r0 + n) of [m's first np columns | columns np + m0 .. np + m0 + nm).
  static void gather(const Mat& m, Index r0, Index n, Index np, Index m0, Index nm, Mat& out);
  static void scatter_add(Mat& m, Index r0, Index n, Index np, Index m0, Index nm, const Mat& src);

  AttentionConfig cfg_;
};

template <class Scalar>
auto Attention<Scalar>::init(std::uint64_t seed) const -> Params {
  detail::Rng rng(seed);
  const double sd = 1.0 / std::sqrt(static_cast<double>(cfg_.dim));
  Params p;
  for (Mat* m : {&p.w_q, &p.w_k, &p.w_v, &p.w_o}) {
    m->resize(cfg_.dim, cfg_.dim);
    rng.fill_normal(*m, sd);
  }
  return p;
}

template <class Scalar>
void Attention<Scalar>::check_params(const Params& p, const char* where) const {
  detail::check_shape(where, "params.w_q", p.w_q, cfg_.dim, cfg_.dim);
  detail::check_shape(where, "params.w_k", p.w_k, cfg_.dim, cfg_.dim);
  detail::check_shape(where, "params.w_v", p.w_v, cfg_.dim, cfg_.dim);
  detail::check_shape(where, "params.w_o", p.w_o, cfg_.dim, cfg_.dim);
}

template <class Scalar>
auto Attention<Scalar>::initial_state() const -> State {
  State s;
  s.k.resize(cfg_.dim, 0);
  s.v.resize(cfg_.dim, 0);
  return s;
}

template <class Scalar>
void Attention<Scalar>::check_state(const State& s, const char* where) const {
  detail::check_shape(where, "state.k", s.k, cfg_.dim, -1);
  detail::check_shape(where, "state.v", s.v, cfg_.dim, s.k.cols());
  if (s.position < 0) detail::raise<InvalidArgument>(where, "state.position is ", s.position, ", expected >= 0");
  if (cfg_.window > 0 && s.k.cols() > cfg_.window - 1)
    detail::raise<InvalidArgument>(where, "state holds ", s.k.cols(), " cached tokens, a window of ", cfg_.window,
                                   " keeps at most ", cfg_.window - 1);
}

template <class Scalar>
auto Attention<Scalar>::forward(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */, const Eigen::Ref<const Mat>& persistent /* (D, N_p) */,
                                State& state) const -> Mat {
  return causal_impl("titans::Attention::forward", p, x, persistent, state, nullptr);
}

template <class Scalar>
auto Attention<Scalar>::forward_train(const Params& p, const Eigen::Ref<const Mat>& x /* (D, T) */,
                                      const Eigen::Ref<const Mat>& persistent /* (D, N_p) */, State& state, Cache& cache) const -> Mat {
  return causal_impl("titans::Attention::forward_train", p, x, persistent, state, &cache);
}

template <class Scalar>
auto Attention<Scalar>::attend(const char* where, const Params& p, const Eigen::Ref<const Mat>& xq, const std::vector<Index>& qpos,
                               const Eigen::Ref<const Mat>& xkv, const std::vector<Index>& kpos, const Eigen::Ref<const Mat>& persistent,
                               const Mat& cached_k, const Mat& cached_v, const std::vector<Index>& lo, const std::vector<Index>& hi,
                               Cache* cache, Mat* new_k, Mat* new_v) const -> Mat {
  check_params(p, where);
  const Index D = cfg_.dim, Tq = xq.cols(), Tkv = xkv.cols(), np = persistent.cols(), nc = cached_k.cols();
  detail::check_shape(where, "queries", xq, D, -1);
  detail::check_shape(where, "key/value tokens", xkv, D, -1);
  detail::check_shape(where, "persistent tokens", persistent, D, -1);
  detail::check_shape(where, "cached keys", cached_k, D, -1);
  detail::check_shape(where, "cached values", cached_v, D, nc);
  detail::check_finite(where, "queries", xq);
  detail::check_finite(where, "key/value tokens", xkv);
  detail::check_finite(where, "persistent tokens", persistent);
  const Index nmain = nc + Tkv;
  if (static_cast<Index>(qpos.size()) != Tq || static_cast<Index>(lo.size()) != Tq ||
      static_cast<Index>(hi.size()) != Tq || static_cast<Index>(kpos.size()) != Tkv)
    detail::raise<InvalidArgument>(where, "position or range lists do not match the token counts");
  for (Index i = 0; i < Tq; ++i) {
    const auto u = static_cast<std::size_t>(i);
    if (lo[u] < 0 || lo[u] > nmain || hi[u] >= nmain || (hi[u] < lo[u] && np == 0) ||
        (i > 0 && (lo[u] < lo[u - 1] || hi[u] < hi[u - 1])))
      detail::raise<InvalidArgument>(where, "query ", i, " has key range [", lo[u], ", ", hi[u], "] of ", nmain,
                                     " keys (ranges must be non-empty, in bounds and non-decreasing)");
  }

  const Index H = cfg_.heads, dh = cfg_.head_dim();
  Mat q;
  detail::product<detail::Trans::no, detail::Trans::no>(p.w_q, xq, q);
  detail::rope_rotate<Scalar>(q, qpos, H, cfg_.rope_base, false);
  Mat k(D, np + nmain), v(D, np + nmain);
  detail::gemm<detail::Trans::no, detail::Trans::no>(Scalar(1), p.w_k, persistent, Scalar(0), k.leftCols(np));
  detail::gemm<detail::Trans::no, detail::Trans::no>(Scalar(1), p.w_v, persistent, Scalar(0), v.leftCols(np));
  k.middleCols(np, nc) = cached_k;
  v.middleCols(np, nc) = cached_v;
  detail::gemm<detail::Trans::no, detail::Trans::no>(Scalar(1), p.w_k, xkv, Scalar(0), k.rightCols(Tkv));
  detail::gemm<detail::Trans::no, detail::Trans::no>(Scalar(1), p.w_v, xkv, Scalar(0), v.rightCols(Tkv));
  {
    auto knew = k.rightCols(Tkv);
    detail::rope_rotate<Scalar>(knew, kpos, H, cfg_.rope_base, false);
  }
  if (new_k) *new_k = k.rightCols(Tkv);
  if (new_v) *new_v = v.rightCols(Tkv);

  const Index B = cfg_.block, nblocks = (Tq + B - 1) / B;
  std::vector<Index> k0(static_cast<std::size_t>(nblocks)), k1(static_cast<std::size_t>(nblocks));
  for (Index b = 0; b < nblocks; ++b) {
    const Index i0 = b * B, i1 = std::min(Tq, i0 + B);
    k0[static_cast<std::size_t>(b)] = lo[static_cast<std::size_t>(i0)];
    k1[static_cast<std::size_t>(b)] = std::max(lo[static_cast<std::size_t>(i0)], hi[static_cast<std::size_t>(i1 - 1)] + 1);
  }
  Mat a(D, Tq);
  std::vector<Mat> probs;
  if (cache) probs.resize(static_cast<std::size_t>(H * nblocks));
  const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(dh));
  detail::for_each_head(H, [&](Index h) {
    Mat kc, vc, s;
    for (Index b = 0; b < nblocks; ++b) {
      const Index i0 = b * B, nb = std::min(Tq, i0 + B) - i0;
      const Index m0 = k0[static_cast<std::size_t>(b)], nm = k1[static_cast<std::size_t>(b)] - m0;
      gather(k, h * dh, dh, np, m0, nm, kc);
      gather(v, h * dh, dh, np, m0, nm, vc);
      s.resize(kc.cols(), nb);  // (keys, queries)
      detail::gemm<detail::Trans::yes, detail::Trans::no>(scale, kc, q.block(h * dh, i0, dh, nb), Scalar(0), s);
      for (Index c = 0; c < nb; ++c) {
        const auto u = static_cast<std::size_t>(i0 + c);
        auto col = s.col(c);
        Scalar mx = -std::numeric_limits<Scalar>::infinity();
        for (Index r = 0; r < np + nm; ++r) {
          const bool visible = r < np || (m0 + r - np >= lo[u] && m0 + r - np <= hi[u]);
          if (!visible) col(r) = -std::numeric_limits<Scalar>::infinity();
          mx = std::max(mx, col(r));
        }
        col = (col.array() - mx).exp().matrix();
        col /= col.sum();
      }
      detail::gemm<detail::Trans::no, detail::Trans::no>(Scalar(1), vc, s, Scalar(0), a.block(h * dh, i0, dh, nb));
      if (cache) probs[static_cast<std::size_t>(h * nblocks + b)] = s;
    }
  });
  Mat out;
  detail::product<detail::Trans::no, detail::Trans::no>(p.w_o, a, out);
  detail::check_finite_output(where, p, out);
  if (cache) {
    cache->xq = xq;
    cache->xkv = xkv;
    cache->prefix = persistent;
    cache->q = std::move(q);
    cache->k = std::move(k);
    cache->v = std::move(v);
    cache->a = std::move(a);
    cache->qpos = qpos;
    cache->kpos = kpos;
    cache->lo = lo;
    cache->hi = hi;
    cache->cached = nc;
    cache->probs = std::move(probs);
    cache->block_k0 = std::move(k0);
    cache->block_k1 = std::move(k1);
  }
  return out;
}

template <class Scalar>
void Attention<Scalar>::backward(const Params& p, const Cache& cache, const Eigen::Ref<const Mat>& dout /* (D, Tq) */, Params& grads,
                                 Eigen::Ref<Mat> dxq, Eigen::Ref<Mat> dxkv, Eigen::Ref<Mat> dpersistent) const {
  constexpr const char* where = "titans::Attention::backward";
  check_params(p, where);
  check_params(grads, where);
  const Index D = cfg_.dim, H = cfg_.heads, dh = cfg_.head_dim();
  const Index Tq = cache.xq.cols(), Tkv = cache.xkv.cols(), np = cache.prefix.cols();
  const Index B = cfg_.block, nblocks = (Tq + B - 1) / B;
  if (cache.q.rows() != D || cache.q.cols() != Tq || cache.k.rows() != D || cache.k.cols() != np + cache.cached + Tkv ||
      cache.v.rows() != D || cache.v.cols() != np + cache.cached + Tkv || cache.a.rows() != D || cache.a.cols() != Tq ||
      static_cast<Index>(cache.probs.size()) != H * nblocks ||
      static_cast<Index>(cache.block_k0.size()) != nblocks || static_cast<Index>(cache.block_k1.size()) != nblocks ||
      static_cast<Index>(cache.qpos.size()) != Tq || static_cast<Index>(cache.kpos.size()) != Tkv)
    detail::raise<InvalidArgument>(where, "cache was not filled by a training call of this layer");
  detail::check_shape(where, "dout", dout, D, Tq);
  detail::check_shape(where, "dxq", dxq, D, Tq);
  detail::check_shape(where, "dxkv", dxkv, D, Tkv);
  detail::check_shape(where, "dpersistent", dpersistent, D, np);

  detail::product_add<detail::Trans::no, detail::Trans::yes>(Scalar(1), dout, cache.a, grads.w_o);
  Mat da;
  detail::product<detail::Trans::yes, detail::Trans::no>(p.w_o, dout, da);
  Mat dq = Mat::Zero(D, Tq), dk = Mat::Zero(D, cache.k.cols()), dv = Mat::Zero(D, cache.k.cols());
  const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(dh));
  detail::for_each_head(H, [&](Index h) {
    Mat kc, vc, dkc, dvc, dp;
    for (Index b = 0; b < nblocks; ++b) {
      const Index i0 = b * B, nb = std::min(Tq, i0 + B) - i0;
      const Index m0 = cache.block_k0[static_cast<std::size_t>(b)], nm = cache.block_k1[static_cast<std::size_t>(b)] - m0;
      const Mat& P = cache.probs[static_cast<std::size_t>(h * nblocks + b)];
      gather(cache.k, h * dh, dh, np, m0, nm, kc);
      gather(cache.v, h * dh, dh, np, m0, nm, vc);
      const auto dab = da.block(h * dh, i0, dh, nb);
      detail::product<detail::Trans::no, detail::Trans::yes>(dab, P, dvc);
      detail::product<detail::Trans::yes, detail::Trans::no>(vc, dab, dp);  // (keys, queries)
      const Eigen::Matrix<Scalar, 1, Eigen::Dynamic> dots = P.cwiseProduct(dp).colwise().sum();
      dp = P.cwiseProduct(dp - Mat::Ones(dp.rows(), 1) * dots) * scale;  // dS
      detail::product_add<detail::Trans::no, detail::Trans::no>(Scalar(1), kc, dp, dq.block(h * dh, i0, dh, nb));
      detail::product<detail::Trans::no, detail::Trans::yes>(cache.q.block(h * dh, i0, dh, nb), dp, dkc);
      scatter_add(dk, h * dh, dh, np, m0, nm, dkc);
      scatter_add(dv, h * dh, dh, np, m0, nm, dvc);
    }
  });
  detail::rope_rotate<Scalar>(dq, cache.qpos, H, cfg_.rope_base, true);
  auto dknew = dk.rightCols(Tkv);
  detail::rope_rotate<Scalar>(dknew, cache.kpos, H, cfg_.rope_base, true);
  detail::product_add<detail::Trans::no, detail::Trans::yes>(Scalar(1), dq, cache.xq, grads.w_q);
  detail::product_add<detail::Trans::yes, detail::Trans::no>(Scalar(1), p.w_q, dq, dxq);
  const Scalar one(1);
  detail::product_add<detail::Trans::no, detail::Trans::yes>(one, dk.rightCols(Tkv), cache.xkv, grads.w_k);
  detail::product_add<detail::Trans::no, detail::Trans::yes>(one, dv.rightCols(Tkv), cache.xkv, grads.w_v);
  detail::product_add<detail::Trans::yes, detail::Trans::no>(one, p.w_k, dk.rightCols(Tkv), dxkv);
  detail::product_add<detail::Trans::yes, detail::Trans::no>(one, p.w_v, dv.rightCols(Tkv), dxkv);
  if (np > 0) {
    detail::product_add<detail::Trans::no, detail::Trans::yes>(one, dk.leftCols(np), cache.prefix, grads.w_k);
    detail::product_add<detail::Trans::no, detail::Trans::yes>(one, dv.leftCols(np), cache.prefix, grads.w_v);
    detail::product_add<detail::Trans::yes, detail::Trans::no>(one, p.w_k, dk.leftCols(np), dpersistent);
    detail::product_add<detail::Trans::yes, detail::Trans::no>(one, p.w_v, dv.leftCols(np), dpersistent);
  }
}

template <class Scalar>
void Attention<Scalar>::backward_causal(const Params& p, const Cache& cache, const Eigen::Ref<const Mat>& dout /* (D, T) */,
                                        Params& grads, Eigen::Ref<Mat> dx, Eigen::Ref<Mat> dpersistent) const {
  detail::check_shape("titans::Attention::backward_causal", "dx", dx, cfg_.dim, cache.xq.cols());
  Mat dkv = Mat::Zero(cfg_.dim, cache.xkv.cols());
  backward(p, cache, dout, grads, dx, dkv, dpersistent);
  dx += dkv;
}

template <class Scalar>
auto Attention<Scalar>::flops(Index T, Index cached, Index np) const -> double {
  const double D = static_cast<double>(cfg_.dim);
  double pairs = 0;
  for (Index t = 0; t < T; ++t) {
    const Index seen = cached + t + 1;
    pairs += static_cast<double>(np + (cfg_.window > 0 ? std::min(seen, cfg_.window) : seen));
  }
  return 8.0 * D * D * static_cast<double>(T) + 4.0 * D * pairs;
}

template <class Scalar>
auto Attention<Scalar>::causal_impl(const char* where, const Params& p, const Eigen::Ref<const Mat>& x, const Eigen::Ref<const Mat>& persistent,
                                    State& state, Cache* cache) const -> Mat {
  check_state(state, where);
  detail::check_shape(where, "x", x, cfg_.dim, -1);
  const Index T = x.cols(), nc = state.k.cols(), w = cfg_.window;
  std::vector<Index> qpos(static_cast<std::size_t>(T)), lo(qpos.size()), hi(qpos.size());
  for (Index t = 0; t < T; ++t) {
    const auto u = static_cast<std::size_t>(t);
    qpos[u] = state.position + t;
    hi[u] = nc + t;
    lo[u] = w > 0 ? std::max<Index>(0, nc + t - w + 1) : 0;
  }
  Mat nk, nv;
  Mat out = attend(where, p, x, qpos, x, qpos, persistent, state.k, state.v, lo, hi, cache, &nk, &nv);
  // Keep what later tokens may still see: the last w − 1 keys (all of them without a window).
  state.advance(nk, nv, T, w > 0 ? w - 1 : -1);
  return out;
}

template <class Scalar>
void Attention<Scalar>::gather(const Mat& m, Index r0, Index n, Index np, Index m0, Index nm, Mat& out) {
  out.resize(n, np + nm);
  out.leftCols(np) = m.block(r0, 0, n, np);
  out.rightCols(nm) = m.block(r0, np + m0, n, nm);
}

template <class Scalar>
void Attention<Scalar>::scatter_add(Mat& m, Index r0, Index n, Index np, Index m0, Index nm, const Mat& src) {
  m.block(r0, 0, n, np) += src.leftCols(np);
  m.block(r0, np + m0, n, nm) += src.rightCols(nm);
}

// The float and double instantiations (README, "Faster builds: titans::compiled"): PREFIX is `extern` for the
// declarations below and empty in src/instantiate_*.cpp, which define them.
#define TITANS_INSTANTIATE_ATTENTION(PREFIX, S) \
  PREFIX template class Attention<S>;

#ifdef TITANS_EXTERN_FLOAT
TITANS_INSTANTIATE_ATTENTION(extern, float)
#endif
#ifdef TITANS_EXTERN_DOUBLE
TITANS_INSTANTIATE_ATTENTION(extern, double)
#endif

}  // namespace titans
