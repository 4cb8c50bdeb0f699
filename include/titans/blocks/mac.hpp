// SPDX-License-Identifier: Apache-2.0
//
// \file blocks/mac.hpp
// \brief Memory as context (docs/MATH.md §6): the MAC operations of titans::Block. Per segment,
// retrieve from the memory as it was at the segment's start (queries from the input, or the
// learned queries of the Figure 3a form), attend over [persistent || retrieved || segment], write
// the attention's output into the memory, gate; and the backward of all of it, segment by segment
// in reverse. Included by blocks.hpp (which declares Block); include <titans/blocks.hpp>.
#pragma once

#include "../blocks.hpp"

namespace titans {

template <class Scalar>
auto Block<Scalar>::retrieve(const Params& p, const Mat& q_raw, const std::vector<std::vector<Mat>>& snap,
                             typename Cache::Segment* sc) const -> Mat {
  const Index D = cfg_.dim, T = q_raw.cols(), H = cfg_.memory.heads, d = D / H;
  const MemoryConfig mc = cfg_.memory.memory();
  Mat q = q_raw;
  detail::l2_normalize<Scalar>(q, H, cfg_.memory.norm_eps);
  Mat r(D, T), rinv;
  for (Index h = 0; h < H; ++h)
    r.middleRows(h * d, d) =
        memory_apply<Scalar>(mc, snap[static_cast<std::size_t>(h)], q.middleRows(h * d, d), mem_.gain(p.memory, h));
  // q is finite (finite inputs and parameters; a bad parameter is named by the caller); a
  // non-finite read means the memory state itself is not: its test-time updates diverged at the
  // end of an earlier segment (its reads were still finite).
  if (!r.allFinite())
    detail::raise<NumericError>("titans::Block (MAC retrieval)",
                                "the memory's state is not finite: its test-time updates diverged; lower ",
                                "memory.theta_max (now ", cfg_.memory.theta_max, ") or memory.chunk_size (now ",
                                cfg_.memory.chunk_size, "), or use a shallower memory");
  Mat n = detail::rms_normalize<Scalar>(r, H, cfg_.memory.norm_eps, &rinv);
  Mat out = p.retrieve_gain.col(0).asDiagonal() * n;
  if (sc) {
    sc->q_raw = q_raw;
    sc->q = std::move(q);
    sc->r_n = std::move(n);
    sc->r_rinv = std::move(rinv);
    sc->snapshot = snap;
  }
  return out;
}

template <class Scalar>
auto Block<Scalar>::retrieve_backward(const Params& p, const typename Cache::Segment& sc, const Mat& dh,
                                      Params& grads, std::vector<MemoryState<Scalar>>* dsnap) const -> Mat {
  const Index D = cfg_.dim, T = dh.cols(), H = cfg_.memory.heads, d = D / H;
  const MemoryConfig mc = cfg_.memory.memory();
  grads.retrieve_gain.col(0) += dh.cwiseProduct(sc.r_n).rowwise().sum();
  Mat dr = Mat::Zero(D, T);
  detail::rms_normalize_backward<Scalar>(p.retrieve_gain.col(0).asDiagonal() * dh, sc.r_n, sc.r_rinv, H, dr);
  Mat dq = Mat::Zero(D, T);
  for (Index h = 0; h < H; ++h) {
    const auto& w = sc.snapshot[static_cast<std::size_t>(h)];
    std::vector<Mat> scratch;
    if (!dsnap)
      for (const auto& wl : w) scratch.push_back(Mat::Zero(wl.rows(), wl.cols()));
    Vector<Scalar> dgain = Vector<Scalar>::Zero(mc.output_norm ? d : 0);
    memory_apply_backward<Scalar>(mc, w, sc.q.middleRows(h * d, d), mem_.gain(p.memory, h), dr.middleRows(h * d, d),
                                  dsnap ? (*dsnap)[static_cast<std::size_t>(h)].weights : scratch,
                                  dq.middleRows(h * d, d), mc.output_norm ? &dgain : nullptr);
    if (mc.output_norm) grads.memory.memory_gain.middleRows(h * d, d) += dgain;
  }
  detail::l2_normalize_backward<Scalar>(dq, sc.q, sc.q_raw, H, cfg_.memory.norm_eps);
  return dq;
}

template <class Scalar>
auto Block<Scalar>::retrieval_queries(const Params& p, const Mat& u, typename Cache::Segment* sc) const -> Mat {
  if (cfg_.has_retrieve_queries()) return p.retrieve_queries;
  Mat pre;
  detail::product<detail::Trans::no, detail::Trans::no>(p.retrieve_w, u, pre);
  Mat silu = pre.cwiseProduct(detail::sigmoid<Scalar>(pre));
  if (sc) sc->q_pre = std::move(pre);
  return silu;
}

template <class Scalar>
void Block<Scalar>::retrieval_queries_backward(const Params& p, const typename Cache::Segment& sc,
                                               const Eigen::Ref<const Mat>& u, const Mat& dq_raw, Params& grads,
                                               Mat& du) const {
  if (cfg_.has_retrieve_queries()) {
    grads.retrieve_queries += dq_raw;
    return;
  }
  Mat dsilu;
  detail::activation_derivative(Activation::silu, sc.q_pre, dsilu);
  const Mat dpre = dq_raw.cwiseProduct(dsilu);
  detail::product_add<detail::Trans::no, detail::Trans::yes>(Scalar(1), dpre, u, grads.retrieve_w);
  detail::product_add<detail::Trans::yes, detail::Trans::no>(Scalar(1), p.retrieve_w, dpre, du);
}

template <class Scalar>
auto Block<Scalar>::mac(const Params& p, const Mat& u, State& state, Cache* c) const -> Mat {
  const Index D = cfg_.dim, T = u.cols(), C = cfg_.segment, np = cfg_.persistent;
  const bool prefix_form = cfg_.has_retrieve_queries();  // Figure 3a: the memory tokens are a prefix
  Mat out(D, T);
  Index t = 0;
  while (t < T) {
    const Index pos = state.position + t, in_seg = pos % C, n = std::min(T - t, C - in_seg);
    typename Cache::Segment* sc = nullptr;
    if (c) {
      c->segments.emplace_back();
      sc = &c->segments.back();
      sc->t0 = t;
      sc->n = n;
      sc->starts_segment = in_seg == 0;
    }
    const Mat useg = u.middleCols(t, n);
    // h depends only on the snapshot (the memory before the segment) and the queries: a call that
    // continues a segment recomputes the same memory tokens.
    const Mat h = retrieve(p, retrieval_queries(p, useg, sc), state.snapshot, sc);
    // Keys and values after the prefix. Interleaved: h_1, u_1, h_2, u_2, … with query j seeing
    // up to u_j. Figure 3a: the prefix is [persistent || h], every query sees all of it, and the
    // segment tokens are causal. Queries and segment keys are at their position in the segment.
    const Index per = mac_keys_per_token(), nc = state.attention.k.cols();
    Mat memory_prefix, kv(D, per * n);
    if (prefix_form) {
      memory_prefix.resize(D, np + h.cols());
      memory_prefix << p.persistent, h;
    }
    const Mat& prefix = prefix_form ? memory_prefix : p.persistent;
    std::vector<Index> qpos(static_cast<std::size_t>(n)), kpos(static_cast<std::size_t>(per * n)),
        lo(qpos.size(), 0), hi(qpos.size());
    for (Index j = 0; j < n; ++j) {
      if (!prefix_form) kv.col(2 * j) = h.col(j);
      kv.col(per * j + per - 1) = useg.col(j);
      for (Index r = 0; r < per; ++r) kpos[static_cast<std::size_t>(per * j + r)] = in_seg + j;
      qpos[static_cast<std::size_t>(j)] = in_seg + j;
      hi[static_cast<std::size_t>(j)] = nc + per * j + per - 1;
    }
    Mat nk, nv;
    Mat y = attn_.attend(c ? "titans::Block::forward_train (MAC attention)" : "titans::Block::forward (MAC attention)",
                         p.attention, useg, qpos, kv, kpos, prefix, state.attention.k, state.attention.v, lo, hi,
                         sc ? &sc->attention : nullptr, &nk, &nv);
    Mat z;
    if (sc) {
      mem_.settle(state.memory);  // the gradient of the memory's start state is in the settled form
      sc->memory_start_zero = zeros_like(state.memory);
      z = mem_.forward_train(p.memory, y, state.memory, sc->memory, train_options());
    } else {
      z = mem_.forward(p.memory, y, state.memory);
    }
    out.middleCols(t, n) = gate(p, y, z, sc ? &sc->y_rinv : nullptr, sc ? &sc->z_rinv : nullptr);
    if (sc) {
      sc->y = std::move(y);
      sc->z = std::move(z);
    }
    // The segment's keys stay cached until its end; the next segment starts with none.
    const bool segment_ends = in_seg + n == C;
    if (segment_ends) state.snapshot = weights_of(state.memory);
    state.attention.advance(nk, nv, n, segment_ends ? 0 : -1);
    t += n;
  }
  return out;
}

template <class Scalar>
void Block<Scalar>::mac_backward(const Params& p, const Cache& c, const Mat& dmix, Params& grads, Mat& du) const {
  const Index D = cfg_.dim, np = cfg_.persistent;
  const bool prefix_form = cfg_.has_retrieve_queries();
  NeuralMemoryState<Scalar> dnext;  // gradient of the memory state after the current segment
  bool have_next = false;
  // The attention's prefix gradient: the persistent tokens' columns add up over the segments, the
  // memory tokens' (Figure 3a) are each segment's own.
  Mat dprefix = Mat::Zero(D, np + (prefix_form ? cfg_.memory_tokens : 0));
  for (auto it = c.segments.rbegin(); it != c.segments.rend(); ++it) {
    const auto& sc = *it;
    const Index n = sc.n;
    Mat dy = Mat::Zero(D, n), dz = Mat::Zero(D, n);
    gate_backward(p, sc.y, sc.z, sc.y_rinv, sc.z_rinv, dmix.middleCols(sc.t0, n), grads, dy, dz);
    NeuralMemoryState<Scalar> dstart = sc.memory_start_zero;
    mem_.backward(p.memory, sc.memory, dz, have_next ? &dnext : nullptr, grads.memory, dy, &dstart);
    Mat duseg = Mat::Zero(D, n), dkv = Mat::Zero(D, sc.attention.xkv.cols());
    dprefix.rightCols(dprefix.cols() - np).setZero();
    attn_.backward(p.attention, sc.attention, dy, grads.attention, duseg, dkv, dprefix);
    Mat dh;
    if (prefix_form) {
      dh = dprefix.rightCols(cfg_.memory_tokens);
      duseg += dkv;
    } else {
      dh.resize(D, n);
      for (Index j = 0; j < n; ++j) {
        dh.col(j) = dkv.col(2 * j);
        duseg.col(j) += dkv.col(2 * j + 1);
      }
    }
    const Mat dq_raw = retrieve_backward(p, sc, dh, grads, sc.starts_segment ? &dstart.heads : nullptr);
    retrieval_queries_backward(p, sc, c.u.middleCols(sc.t0, n), dq_raw, grads, duseg);
    du.middleCols(sc.t0, n) += duseg;
    dnext = std::move(dstart);
    have_next = true;
  }
  grads.persistent += dprefix.leftCols(np);
  if (c.fresh && have_next) mem_.initial_state_backward(dnext, grads.memory);
}

}  // namespace titans
