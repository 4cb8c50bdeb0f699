// SPDX-License-Identifier: Apache-2.0
//
// \file bench_gemm_yardstick.hpp
// \brief The machine's own GEMM rate at the shapes the memory kernel uses: the yardstick that
// the memory benchmarks are held against (shared/design/CONVENTIONS.md, "a plain GEMM of the
// same shapes beside it").
//
// For one chunk of b tokens the dual form (docs/MATH.md §3) does, per layer l with W_l of shape
// (n_out, n_in), these dense products and nothing else of the same size:
//
//     key path      Z_k  = W_l · A_k            (n_out × n_in) · (n_in × b)
//     query path    Z_q  = W_l · A_q            (n_out × n_in) · (n_in × b)
//                   Z_q += S_l · A_q            (n_out × n_in) · (n_in × b)
//     δ back (l>0)  B    = W_lᵀ · Δ_l           (n_in × n_out) · (n_out × b)
//     end of chunk  W_l -= Δ_l · A_kᵀ           (n_out × b) · (b × n_in)
//                   S_l -= Δ_l · A_kᵀ           (n_out × b) · (b × n_in)
//
// `GemmYardstick::run_chunk` issues exactly that list as plain Eigen products (noalias, into
// preallocated outputs, same storage orders and transposes). Its flop count is the kernel's
// flop count without the b×b Gram / masked terms, so "kernel GFLOP/s ÷ yardstick GFLOP/s" is
// the fraction of the machine's GEMM rate that survives everything else the kernel does
// (coefficients, diag scalings, activations, the Gram, state bookkeeping).
//
// `run_chunk_with(gemm)` issues the same list through a BLAS-style column-major GEMM instead
// (bench_gemm_backends.hpp: OpenBLAS's cblas_?gemm, BLIS's bli_?gemm), with the same operands,
// leading dimensions, transposes, α and β; `max_relative_difference` compares two yardsticks'
// buffers, to check that a backend computed the same products as Eigen.
//
// `row_pad` allocates every buffer with that many extra rows (leading dimension n + row_pad)
// and works on the top n rows, to test whether power-of-two leading dimensions hurt.
#pragma once

#include <titans/memory/model.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace titans_bench {

using titans::Index;

template <class Scalar>
class GemmYardstick {
 public:
  using Mat = titans::Matrix<Scalar>;

  GemmYardstick(const titans::MemoryConfig& cfg, Index b, Index row_pad = 0, std::uint64_t seed = 1)
      : cfg_(cfg), b_(b), pad_(row_pad) {
    titans::detail::Rng rng(seed);
    auto make = [&](Index rows, Index cols, double stddev) {
      Mat m(rows + pad_, cols);
      rng.fill_normal(m, stddev);
      return m;
    };
    for (Index l = 0; l < cfg.depth; ++l) {
      const Index no = cfg.layer_out(l), ni = cfg.layer_in(l);
      w_.push_back(make(no, ni, 1.0 / std::sqrt(static_cast<double>(ni))));
      s_.push_back(make(no, ni, 1.0 / std::sqrt(static_cast<double>(ni))));
      ak_.push_back(make(ni, b, 1.0));
      aq_.push_back(make(ni, b, 1.0));
      // Small Δ so the weights' random walk stays far from float overflow for any run length.
      delta_.push_back(make(no, b, 1e-4));
      zk_.push_back(make(no, b, 0.0));
      zq_.push_back(make(no, b, 0.0));
      back_.push_back(make(ni, b, 0.0));
    }
  }

  /// The dense products of one chunk (see the file comment).
  void run_chunk() {
    for (Index l = 0; l < cfg_.depth; ++l) {
      const std::size_t i = static_cast<std::size_t>(l);
      const Index no = cfg_.layer_out(l), ni = cfg_.layer_in(l);
      auto w = w_[i].topRows(no);
      auto s = s_[i].topRows(no);
      const auto ak = ak_[i].topRows(ni);
      const auto aq = aq_[i].topRows(ni);
      const auto delta = delta_[i].topRows(no);
      auto zk = zk_[i].topRows(no);
      auto zq = zq_[i].topRows(no);
      zk.noalias() = w * ak;
      zq.noalias() = w * aq;
      zq.noalias() += s * aq;
      if (l > 0) back_[i].topRows(ni).noalias() = w.transpose() * delta;
      w.noalias() -= delta * ak.transpose();
      s.noalias() -= delta * ak.transpose();
    }
  }

  /// The products of run_chunk through `gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb,
  /// beta, c, ldc)`, which computes C = α·op(A)·op(B) + β·C on column-major operands
  /// (op(A): m × k, op(B): k × n, C: m × n), as the BLAS ?gemm does.
  template <class Gemm>
  void run_chunk_with(const Gemm& gemm) {
    for (Index l = 0; l < cfg_.depth; ++l) {
      const std::size_t i = static_cast<std::size_t>(l);
      const Index no = cfg_.layer_out(l), ni = cfg_.layer_in(l);
      Mat& w = w_[i];
      Mat& s = s_[i];
      const Mat& ak = ak_[i];
      const Mat& aq = aq_[i];
      const Mat& delta = delta_[i];
      Mat& zk = zk_[i];
      Mat& zq = zq_[i];
      // Leading dimensions: the allocated rows (n + row_pad), as the Eigen blocks above have.
      gemm(false, false, no, b_, ni, Scalar(1), w.data(), w.rows(), ak.data(), ak.rows(), Scalar(0), zk.data(), zk.rows());
      gemm(false, false, no, b_, ni, Scalar(1), w.data(), w.rows(), aq.data(), aq.rows(), Scalar(0), zq.data(), zq.rows());
      gemm(false, false, no, b_, ni, Scalar(1), s.data(), s.rows(), aq.data(), aq.rows(), Scalar(1), zq.data(), zq.rows());
      if (l > 0)
        gemm(true, false, ni, b_, no, Scalar(1), w.data(), w.rows(), delta.data(), delta.rows(), Scalar(0), back_[i].data(),
             back_[i].rows());
      gemm(false, true, no, ni, b_, Scalar(-1), delta.data(), delta.rows(), ak.data(), ak.rows(), Scalar(1), w.data(), w.rows());
      gemm(false, true, no, ni, b_, Scalar(-1), delta.data(), delta.rows(), ak.data(), ak.rows(), Scalar(1), s.data(), s.rows());
    }
  }

  /// Largest difference between the buffers (weights, S, outputs) of this and `other` (built with
  /// the same arguments), each relative to the largest entry of that buffer here; infinity if
  /// any difference is NaN.
  double max_relative_difference(const GemmYardstick& other) const {
    double worst = 0;
    auto compare = [&worst](const std::vector<Mat>& a, const std::vector<Mat>& b) {
      for (std::size_t i = 0; i < a.size(); ++i) {
        const double scale = std::max(static_cast<double>(a[i].cwiseAbs().maxCoeff()), std::numeric_limits<double>::min());
        const double d = static_cast<double>((a[i] - b[i]).cwiseAbs().maxCoeff()) / scale;
        worst = std::isnan(d) ? std::numeric_limits<double>::infinity() : std::max(worst, d);
      }
    };
    compare(w_, other.w_);
    compare(s_, other.s_);
    compare(zk_, other.zk_);
    compare(zq_, other.zq_);
    compare(back_, other.back_);
    return worst;
  }

  /// Flops of one run_chunk (2·m·n·k per product).
  double flops_per_chunk() const {
    double f = 0;
    for (Index l = 0; l < cfg_.depth; ++l) {
      const double mn = static_cast<double>(cfg_.layer_out(l)) * static_cast<double>(cfg_.layer_in(l));
      const double products = l > 0 ? 6.0 : 5.0;
      f += products * 2.0 * mn * static_cast<double>(b_);
    }
    return f;
  }

  /// Keeps the outputs observable so the compiler cannot drop the work.
  Scalar checksum() const {
    Scalar c = 0;
    for (const auto& z : zq_) c += z(0, 0);
    for (const auto& w : w_) c += w(0, 0);
    return c;
  }

 private:
  titans::MemoryConfig cfg_;
  Index b_, pad_;
  std::vector<Mat> w_, s_, ak_, aq_, delta_, zk_, zq_, back_;
};

}  // namespace titans_bench
