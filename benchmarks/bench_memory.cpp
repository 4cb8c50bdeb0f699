// SPDX-License-Identifier: Apache-2.0
//
// Benchmarks of the memory kernel (titans::memory_forward_into, docs/MATH.md §3) against the
// machine's own GEMM rate at the same shapes. See benchmarks/README.md for what each one
// measures, how to run them and the numbers measured so far.
//
//   BM_MemoryForward<float>/d/L/b/cores     prefill: T = 4096 tokens per call, one core
//   BM_MemoryForwardBias<float>/d/L/b/bias  the same with the attentional biases l2, huber, lp, huber_radial
//   BM_GemmYardstick<float>/d/L/b/cores     the kernel's dense products alone (bench_gemm_yardstick.hpp)
//   BM_MemoryForwardThreads, BM_GemmYardstickThreads
//                                           d = 256, L = 2, b = 64 on 1 and 2 cores (wall time)
//   BM_MemoryForwardHeads                   2 heads, one thread per head (wall time)
//   BM_GemmPeak<float>/n/cores              one n×n×n GEMM: the machine's peak GEMM rate
//   BM_GemmSquare<float>/n                  n×n×n GEMMs around n = 256 (allocator effects)
//   BM_GemmLeadingDim<float>/d/pad          the yardstick with leading dimension n + pad
//   BM_MemoryDecode<float>/d/b/heads        one token per call (T = 1): latency per token, over
//                                           `heads` states in turn (state_MiB in all)
//   BM_FmaPeak<float>, BM_FmaPeak<double>   the FMA peak of one core (bench_fma_peak.hpp)
//   BM_GemmYardstickOpenBLAS<float>/…, BM_GemmYardstickBLIS<float>/…, BM_GemmYardstickLibxsmm<float>/…
//                                           the yardstick's products through OpenBLAS / BLIS /
//                                           libxsmm (bench_gemm_backends.hpp), where found
//
// Every row with a GFLOPS counter also reports `fma_peak` (the FMA peak of one core in GFLOP/s,
// measured once per process on first use) and `pct_fma` (GFLOPS as a percentage of fma_peak ×
// the cores the row uses), so that each figure is a ratio to the same run's machine.
//
// Built with EIGEN_USE_BLAS (TITANS_USE_BLAS=ON), Eigen hands its large products to OpenBLAS;
// the run's context then names the OpenBLAS kernels in use.
#include "bench_bias.hpp"
#include "bench_fma_peak.hpp"
#include "bench_gemm_yardstick.hpp"
#include "bench_process.hpp"

#include <titans/memory/kernel.hpp>

#include <benchmark/benchmark.h>

#ifdef EIGEN_USE_BLAS
#include <cblas.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

// Last: with BLIS, blis.h defines many macros.
#include "bench_gemm_backends.hpp"

namespace {

using titans::Index;
using titans_bench::GemmYardstick;
using titans_bench::minor_faults;

// Gates of every run: α (forget), η (momentum), θ (step). θ is 0.01, not 0.05: with θ = 0.05
// the float state of a depth-2 memory overflows to inf/NaN within T = 4096 tokens for every
// d and b here (measured; see README), and a benchmark whose outputs are NaN measures nothing
// one could trust. The cost of the kernel does not depend on the gate values.
constexpr double kAlpha = 0.01;
constexpr double kEta = 0.9;
constexpr double kTheta = 0.01;
constexpr Index kTokens = 4096;  // T of the prefill benchmarks

void set_threads(int n) {
  Eigen::setNbThreads(n);
#if defined(EIGEN_USE_BLAS) || defined(TITANS_BENCH_HAVE_OPENBLAS)
  openblas_set_num_threads(n);
#endif
}

/// Sets the GEMM threads for a benchmark; false (and the benchmark is skipped) if this build
/// cannot run more than one.
bool use_threads(benchmark::State& state, Index n) {
#if !defined(_OPENMP) && !defined(EIGEN_USE_BLAS)
  if (n > 1) {
    state.SkipWithError("built without OpenMP: Eigen runs single-threaded");
    return false;
  }
#else
  (void)state;
#endif
  set_threads(static_cast<int>(n));
  return true;
}

titans::MemoryConfig memory_config(Index d, Index depth) {
  titans::MemoryConfig cfg;
  cfg.dim = d;
  cfg.depth = depth;
  cfg.expansion = 4;
  cfg.activation = titans::Activation::silu;
  return cfg;
}

/// Inputs of one memory head: unit-norm random keys and queries, random values, constant gates.
template <class Scalar>
struct MemoryProblem {
  using Mat = titans::Matrix<Scalar>;
  using Vec = titans::Vector<Scalar>;
  titans::MemoryConfig cfg;
  titans::KernelInputs<Scalar> in;
  Mat y;
  titans::MemoryState<Scalar> initial;

  MemoryProblem(const titans::MemoryConfig& c, Index tokens, std::uint64_t seed = 7) : cfg(c), y(c.dim, tokens) {
    titans::detail::Rng rng(seed);
    in.k.resize(c.dim, tokens);
    in.v.resize(c.dim, tokens);
    in.q.resize(c.dim, tokens);
    rng.fill_normal(in.k, 1.0);
    rng.fill_normal(in.v, 1.0);
    rng.fill_normal(in.q, 1.0);
    in.k.colwise().normalize();
    in.q.colwise().normalize();
    y.setZero();
    in.alpha = Vec::Constant(tokens, Scalar(kAlpha));
    in.eta = Vec::Constant(tokens, Scalar(kEta));
    in.theta = Vec::Constant(tokens, Scalar(kTheta));
    if (cfg.output_norm) in.gain = Vec::Ones(c.dim);
    initial = titans::make_memory_state(cfg, titans::init_memory_weights<Scalar>(cfg, 1));
  }
};

template <class Scalar>
bool state_is_finite(const titans::MemoryState<Scalar>& s) {
  for (const auto& w : s.weights)
    if (!w.allFinite()) return false;
  for (const auto& m : s.momentum)
    if (!m.allFinite()) return false;
  return true;
}

/// Reports page faults per iteration of the timed loop.
class FaultCounter {
 public:
  FaultCounter() : start_(minor_faults()) {}
  void report(benchmark::State& state) const {
    state.counters["faults/iter"] = benchmark::Counter((minor_faults() - start_) / static_cast<double>(state.iterations()));
  }

 private:
  double start_;
};

/// GFLOPS (per CPU second, or per wall second with UseRealTime), and the same rate as a
/// fraction of the machine: fma_peak is the FMA peak of one core in GFLOP/s for Scalar
/// (bench_fma_peak.hpp, measured once per process, outside any timed loop), pct_fma the row's
/// GFLOPS in percent of fma_peak × `cores` (the cores the row uses).
template <class Scalar>
void set_gflops_counters(benchmark::State& state, double flops_per_iteration, Index cores) {
  const double peak = titans_bench::fma_peak_gflops<Scalar>();
  const double gflop = flops_per_iteration / 1e9;
  state.counters["GFLOPS"] = benchmark::Counter(gflop, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["fma_peak"] = benchmark::Counter(peak);
  state.counters["pct_fma"] =
      benchmark::Counter(100.0 * gflop / (peak * static_cast<double>(cores)), benchmark::Counter::kIsIterationInvariantRate);
}

/// Tokens/s and the GFLOPS counters of set_gflops_counters.
template <class Scalar>
void set_rate_counters(benchmark::State& state, double flops_per_iteration, Index tokens_per_iteration, Index cores) {
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * tokens_per_iteration);
  set_gflops_counters<Scalar>(state, flops_per_iteration, cores);
}

// ---------------------------------------------------------------------------------------------
// Prefill: T = 4096 tokens per call, chunk size b.
// Each iteration first restores the state from the prepared initial state (a copy of Θ and S,
// at most 4 MB here, i.e. well under 0.1% of the iteration's time), so every iteration does the
// same work on the same well-scaled values.
// ---------------------------------------------------------------------------------------------
template <class Scalar>
void BM_MemoryForward(benchmark::State& state) {
  const Index d = state.range(0), depth = state.range(1), b = state.range(2);
  if (!use_threads(state, state.range(3))) return;
  MemoryProblem<Scalar> p(memory_config(d, depth), kTokens);
  titans::MemoryState<Scalar> st = p.initial;
  const FaultCounter faults;
  for (auto _ : state) {
    st = p.initial;
    titans::memory_forward_into<Scalar>(p.cfg, b, p.in, st, p.y);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  faults.report(state);
  if (!p.y.allFinite() || !state_is_finite(st)) state.SkipWithError("memory outputs or state are not finite");
  set_rate_counters<Scalar>(state, titans::memory_forward_flops(p.cfg, b, kTokens), kTokens, state.range(3));
  set_threads(1);
}

// The timed loop of the single-core forward rows below: restore the state, one call over the T
// tokens with chunk size b; then the finiteness check and the rate counters.
template <class Scalar>
void time_forward(benchmark::State& state, MemoryProblem<Scalar>& p, Index b) {
  titans::MemoryState<Scalar> st = p.initial;
  for (auto _ : state) {
    st = p.initial;
    titans::memory_forward_into<Scalar>(p.cfg, b, p.in, st, p.y);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  if (!p.y.allFinite() || !state_is_finite(st)) state.SkipWithError("memory outputs or state are not finite");
  set_rate_counters<Scalar>(state, titans::memory_forward_flops(p.cfg, b, kTokens), kTokens, 1);
}

// The cost of the bounds (docs/MATH.md §8): the same forward with the kernel's plain read-out
// (bound 0) and with the layer's defaults (bound 1: residual, γ ⊙ LN read-out, surprise clamp
// 250). Registered alternately, three times each, so before and after share the machine's state.
template <class Scalar>
void BM_MemoryForwardBound(benchmark::State& state) {
  const Index d = state.range(0), depth = state.range(1), b = state.range(2);
  titans::MemoryConfig cfg = memory_config(d, depth);
  if (state.range(3) != 0) {
    cfg.residual = true;
    cfg.output_norm = true;
    cfg.surprise_clamp = 250;
  }
  set_threads(1);
  MemoryProblem<Scalar> p(cfg, kTokens);
  time_forward(state, p, b);
}

// The attentional biases (docs/MATH.md §11): l2 (0), huber (1, δ = √d for every token, about the
// residuals' norm, so both branches run), lp (2, p = 3) and huber_radial (3, δ as huber), each
// with the layer's bounded forms; registered alternately, twice each.
template <class Scalar>
void BM_MemoryForwardBias(benchmark::State& state) {
  const Index d = state.range(0), depth = state.range(1), b = state.range(2), bias = state.range(3);
  titans::MemoryConfig cfg = memory_config(d, depth);
  cfg.residual = true;
  cfg.output_norm = true;
  cfg.surprise_clamp = 250;
  cfg.bias = titans_bench::bias_from_arg(bias);
  set_threads(1);
  MemoryProblem<Scalar> p(cfg, kTokens);
  if (bias == 1 || bias == 3) p.in.threshold = titans::Vector<Scalar>::Constant(kTokens, std::sqrt(static_cast<Scalar>(d)));
  time_forward(state, p, b);
}

void bias_grid(benchmark::internal::Benchmark* bm) {
  bm->ArgNames({"d", "L", "b", "bias", "round"});
  for (Index round = 0; round < 2; ++round)
    for (Index bias : {0, 1, 2, 3}) bm->Args({256, 2, 64, bias, round});
}

void bound_grid(benchmark::internal::Benchmark* bm) {
  bm->ArgNames({"d", "L", "b", "bound", "round"});
  for (Index d : {64, 256})
    for (Index b : {16, 64})
      for (Index round = 0; round < 3; ++round)
        for (Index bound : {0, 1}) bm->Args({d, 2, b, bound, round});
}

template <class Scalar>
void BM_MemoryForwardThreads(benchmark::State& state) {
  BM_MemoryForward<Scalar>(state);
}

// Parallelism across heads instead of inside the GEMMs: `heads` independent memories (as in a
// multi-head layer), one OpenMP thread per head and single-threaded Eigen inside each (Eigen
// runs its products sequentially inside a parallel region). One fork/join per call instead of
// one per product. Items are head-tokens: T × heads per iteration.
template <class Scalar>
void BM_MemoryForwardHeads(benchmark::State& state) {
  const Index d = state.range(0), depth = state.range(1), b = state.range(2);
  const int heads = static_cast<int>(state.range(3)), cores = static_cast<int>(state.range(4));
#ifndef _OPENMP
  if (cores > 1) {
    state.SkipWithError("built without OpenMP: heads run one after the other");
    return;
  }
#endif
  set_threads(1);
  std::vector<MemoryProblem<Scalar>> p;
  std::vector<titans::MemoryState<Scalar>> st;
  for (int h = 0; h < heads; ++h) {
    p.emplace_back(memory_config(d, depth), kTokens, 7 + static_cast<std::uint64_t>(h));
    st.push_back(p.back().initial);
  }
  const FaultCounter faults;
  for (auto _ : state) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(cores) schedule(static)
#endif
    for (int h = 0; h < heads; ++h) {
      auto& ph = p[static_cast<std::size_t>(h)];
      auto& sh = st[static_cast<std::size_t>(h)];
      sh = ph.initial;
      titans::memory_forward_into<Scalar>(ph.cfg, b, ph.in, sh, ph.y);
    }
    benchmark::ClobberMemory();
  }
  faults.report(state);
  for (int h = 0; h < heads; ++h)
    if (!p[static_cast<std::size_t>(h)].y.allFinite()) state.SkipWithError("memory outputs are not finite");
  set_rate_counters<Scalar>(state, heads * titans::memory_forward_flops(p[0].cfg, b, kTokens), heads * kTokens, cores);
}

// The kernel's dense products alone, T / b chunks per iteration (same tokens/s meaning).
template <class Scalar>
void BM_GemmYardstick(benchmark::State& state) {
  const Index d = state.range(0), depth = state.range(1), b = state.range(2);
  if (!use_threads(state, state.range(3))) return;
  const Index pad = state.range(4);
  GemmYardstick<Scalar> g(memory_config(d, depth), b, pad);
  const Index chunks = kTokens / b;
  const FaultCounter faults;
  for (auto _ : state) {
    for (Index c = 0; c < chunks; ++c) g.run_chunk();
    benchmark::ClobberMemory();
  }
  faults.report(state);
  benchmark::DoNotOptimize(g.checksum());
  set_rate_counters<Scalar>(state, g.flops_per_chunk() * static_cast<double>(chunks), kTokens, state.range(3));
  set_threads(1);
}

// The same products through another GEMM library (bench_gemm_backends.hpp), on one thread:
// Backend::use_one_thread() calls openblas_set_num_threads(1) / bli_thread_set_num_threads(1).
// Before timing, one chunk through the backend is compared with one chunk through Eigen from
// the same starting buffers; the row fails if they differ by more than rounding.
template <class Scalar, class Backend>
void BM_GemmYardstickBackend(benchmark::State& state) {
  const Index d = state.range(0), depth = state.range(1), b = state.range(2);
  if (state.range(3) != 1) {
    state.SkipWithError("the backend yardsticks run on one core");
    return;
  }
  const Index pad = state.range(4);
  const std::string binding = Backend::check_binding();
  if (!binding.empty()) {
    state.SkipWithError(binding.c_str());
    return;
  }
  set_threads(1);
  Backend::use_one_thread();
  const Backend gemm;
  const titans::MemoryConfig cfg = memory_config(d, depth);
  {
    GemmYardstick<Scalar> with_eigen(cfg, b, pad), with_backend(cfg, b, pad);
    with_eigen.run_chunk();
    with_backend.run_chunk_with(gemm);
    const double tolerance = std::is_same_v<Scalar, float> ? 1e-4 : 1e-12;
    if (!(with_eigen.max_relative_difference(with_backend) <= tolerance)) {
      state.SkipWithError((std::string(Backend::name()) + "'s products differ from Eigen's").c_str());
      return;
    }
  }
  GemmYardstick<Scalar> g(cfg, b, pad);
  const Index chunks = kTokens / b;
  const FaultCounter faults;
  const Backend timed;  // its counters (Backend::report) cover the timed products only
  for (auto _ : state) {
    for (Index c = 0; c < chunks; ++c) g.run_chunk_with(timed);
    benchmark::ClobberMemory();
  }
  faults.report(state);
  timed.report(state);
  benchmark::DoNotOptimize(g.checksum());
  set_rate_counters<Scalar>(state, g.flops_per_chunk() * static_cast<double>(chunks), kTokens, 1);
}

template <class Scalar>
void BM_GemmYardstickThreads(benchmark::State& state) {
  BM_GemmYardstick<Scalar>(state);
}

template <class Scalar>
void BM_GemmLeadingDim(benchmark::State& state) {
  BM_GemmYardstick<Scalar>(state);
}

// One square GEMM C = A·B (n×n×n): the best rate this machine's GEMM reaches.
template <class Scalar>
void BM_GemmPeak(benchmark::State& state) {
  const Index n = state.range(0);
  if (!use_threads(state, state.range(1))) return;
  using Mat = titans::Matrix<Scalar>;
  titans::detail::Rng rng(3);
  Mat a(n, n), b(n, n), c(n, n);
  rng.fill_normal(a, 1.0);
  rng.fill_normal(b, 1.0);
  const FaultCounter faults;
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  faults.report(state);
  set_gflops_counters<Scalar>(state, 2.0 * std::pow(static_cast<double>(n), 3), state.range(1));
  set_threads(1);
}

// ---------------------------------------------------------------------------------------------
// The yardstick of decode: the time to stream `bytes` once (a sum over a buffer of that size,
// best of 200 passes after 20 warm-up passes), which is what reading W and S once costs when
// they stay where decode finds them (cache or memory, whichever the size puts them in).
// ---------------------------------------------------------------------------------------------
template <class Scalar>
double stream_read_seconds(std::size_t bytes) {
  titans::Vector<Scalar> buf = titans::Vector<Scalar>::Constant(static_cast<Index>(bytes / sizeof(Scalar)), Scalar(1));
  double best = 1e30;
  for (int pass = 0; pass < 220; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    Scalar sum = buf.sum();
    benchmark::DoNotOptimize(sum);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (pass >= 20) best = std::min(best, s);
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// Decode: one token per call (T = 1) through the public entry point, so the time includes the
// argument checks and the per-call workspace. The state advances from call to call (chunk
// boundaries every b tokens; inside a chunk the tokens are pending and W, S are written once
// at its end, docs/MATH.md §3.3); every 1024 tokens it is restored from the initial state
// (amortised copy, < 0.1% of the time) so the values stay in the same range. Counters:
// `read_us`, the time to stream W and S once (stream_read_seconds, same run), and `x_read`,
// the time per token over it (the target of issue 13: ≤ 1.5 at d = 256, b = 16).
// ---------------------------------------------------------------------------------------------
template <class Scalar>
void BM_MemoryDecode(benchmark::State& state) {
  const Index d = state.range(0), b = state.range(1), heads = state.range(2);
  constexpr Index depth = 2, pool = 1024;
  set_threads(1);
  MemoryProblem<Scalar> p(memory_config(d, depth), pool);
  // `heads` independent states, one token each in turn, as a model's heads and layers are: with
  // enough of them the states no longer fit in the last-level cache and decode streams them
  // from memory.
  std::vector<titans::MemoryState<Scalar>> st(static_cast<std::size_t>(heads), p.initial);
  titans::KernelInputs<Scalar> token = p.in.columns(0, 1);  // one token's inputs, refilled in place
  Index t = 0;
  std::size_t h = 0;
  const FaultCounter faults;
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    if (h == st.size()) {
      h = 0;
      ++t;
    }
    if (t == pool) {
      for (auto& s : st) s = p.initial;
      t = 0;
    }
    token.k = p.in.k.col(t);
    token.v = p.in.v.col(t);
    token.q = p.in.q.col(t);
    token.alpha(0) = p.in.alpha(t);
    token.eta(0) = p.in.eta(t);
    token.theta(0) = p.in.theta(t);
    titans::memory_forward_into<Scalar>(p.cfg, b, token, st[h], p.y.middleCols(t, 1));
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
    ++h;
  }
  const double per_token = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
                           static_cast<double>(std::max<benchmark::IterationCount>(1, state.iterations()));
  faults.report(state);
  std::size_t bytes = 0;  // W and S of one state
  for (const auto& w : st[0].weights) bytes += 2 * static_cast<std::size_t>(w.size()) * sizeof(Scalar);
  // The yardstick streams all the states' bytes (so it sees the same level of the memory
  // hierarchy) and is scaled to one state's.
  const double read = stream_read_seconds<Scalar>(bytes * st.size()) / static_cast<double>(heads);
  state.counters["read_us"] = read * 1e6;
  state.counters["x_read"] = per_token / read;
  state.counters["state_MiB"] = static_cast<double>(bytes * st.size()) / (1024.0 * 1024.0);
  bool finite = p.y.allFinite();
  for (const auto& s : st) finite = finite && state_is_finite(s);
  if (!finite) state.SkipWithError("memory outputs or state are not finite");
  // Flops per token when decoding: the chunk formula with T = 1 counts the end-of-chunk update
  // once per token, which is what happens at b = 1; at b > 1 each call still ends a sub-chunk
  // and advances Θ and S, so the same count applies.
  set_rate_counters<Scalar>(state, titans::memory_forward_flops(p.cfg, 1, 1), 1, 1);
}

void forward_grid(benchmark::internal::Benchmark* bm) {
  bm->ArgNames({"d", "L", "b", "cores"});
  for (Index d : {64, 128, 256})
    for (Index depth : {1, 2})
      for (Index b : {16, 64}) bm->Args({d, depth, b, 1});
  // Neighbours of the power of two, to see whether d = 256 is an unlucky size (README §6).
  for (Index d : {248, 264}) bm->Args({d, 2, 64, 1});
}

void yardstick_grid(benchmark::internal::Benchmark* bm) {
  bm->ArgNames({"d", "L", "b", "cores", "pad"});
  for (Index d : {64, 128, 256})
    for (Index depth : {1, 2})
      for (Index b : {16, 64}) bm->Args({d, depth, b, 1, 0});
  for (Index d : {248, 264}) bm->Args({d, 2, 64, 1, 0});
}

void threads_grid(benchmark::internal::Benchmark* bm) {
  bm->ArgNames({"d", "L", "b", "cores"});
  for (Index cores : {1, 2}) bm->Args({256, 2, 64, cores});
  bm->UseRealTime();
}

void heads_grid(benchmark::internal::Benchmark* bm) {
  bm->ArgNames({"d", "L", "b", "heads", "cores"});
  for (Index cores : {1, 2}) bm->Args({256, 2, 64, 2, cores});
  bm->UseRealTime();
}

void yardstick_threads_grid(benchmark::internal::Benchmark* bm) {
  bm->ArgNames({"d", "L", "b", "cores", "pad"});
  for (Index cores : {1, 2}) bm->Args({256, 2, 64, cores, 0});
  bm->UseRealTime();
}

void leading_dim_grid(benchmark::internal::Benchmark* bm) {
  bm->ArgNames({"d", "L", "b", "cores", "pad"});
  for (Index pad : {0, 1, 16}) bm->Args({256, 2, 64, 1, pad});
}

}  // namespace

// The FMA peak of one core: the yardstick of the yardsticks.
using titans_bench::BM_FmaPeak;
BENCHMARK_TEMPLATE(BM_FmaPeak, float)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_FmaPeak, double)->Unit(benchmark::kMillisecond);

// Square GEMMs around 256, registered first so that they run on a fresh heap: sizes whose
// packing buffers straddle the allocator's thresholds (README, "Power-of-two sizes").
BENCHMARK_TEMPLATE(BM_GemmPeak, float)
    ->Name("BM_GemmSquare<float>")
    ->ArgNames({"n", "cores"})
    ->Args({192, 1})
    ->Args({240, 1})
    ->Args({256, 1})
    ->Args({264, 1})
    ->Args({320, 1})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_MemoryForward, float)->Apply(forward_grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_MemoryForwardBound, float)->Apply(bound_grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_MemoryForwardBias, float)->Apply(bias_grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_GemmYardstick, float)->Apply(yardstick_grid)->Unit(benchmark::kMillisecond);
#ifdef TITANS_BENCH_HAVE_OPENBLAS
BENCHMARK_TEMPLATE2(BM_GemmYardstickBackend, float, titans_bench::OpenBlasGemm)
    ->Name("BM_GemmYardstickOpenBLAS<float>")
    ->Apply(yardstick_grid)
    ->Unit(benchmark::kMillisecond);
#endif
#ifdef TITANS_BENCH_HAVE_BLIS
BENCHMARK_TEMPLATE2(BM_GemmYardstickBackend, float, titans_bench::BlisGemm)
    ->Name("BM_GemmYardstickBLIS<float>")
    ->Apply(yardstick_grid)
    ->Unit(benchmark::kMillisecond);
#endif
#ifdef TITANS_BENCH_HAVE_LIBXSMM
BENCHMARK_TEMPLATE2(BM_GemmYardstickBackend, float, titans_bench::LibxsmmGemm)
    ->Name("BM_GemmYardstickLibxsmm<float>")
    ->Apply(yardstick_grid)
    ->Unit(benchmark::kMillisecond);
#endif
BENCHMARK_TEMPLATE(BM_MemoryForwardThreads, float)->Apply(threads_grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_GemmYardstickThreads, float)->Apply(yardstick_threads_grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_MemoryForwardHeads, float)->Apply(heads_grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_GemmPeak, float)
    ->ArgNames({"n", "cores"})
    ->Args({1024, 1})
    ->Args({1024, 2})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_GemmLeadingDim, float)->Apply(leading_dim_grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_MemoryDecode, float)
    ->ArgNames({"d", "b", "heads"})
    ->Args({64, 1, 1})
    ->Args({64, 16, 1})
    ->Args({256, 1, 1})
    ->Args({256, 16, 1})
    ->Args({256, 16, 32})  // 128 MiB of state: past the last-level cache of the machines so far
    ->Unit(benchmark::kMicrosecond);

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("eigen", std::to_string(EIGEN_WORLD_VERSION) + "." + std::to_string(EIGEN_MAJOR_VERSION) +
                                           "." + std::to_string(EIGEN_MINOR_VERSION) + ", SIMD " +
                                           Eigen::SimdInstructionSetsInUse());
#ifdef EIGEN_USE_BLAS
  benchmark::AddCustomContext("gemm", "OpenBLAS via EIGEN_USE_BLAS (sgemm_ from " + titans_bench::provider_of("sgemm_") + ")");
#elif defined(TITANS_GEMM_CBLAS)
  benchmark::AddCustomContext("gemm", std::string("titans::detail::gemm: ") + titans::gemm_backend() +
                                          " (cblas_sgemm from " + titans_bench::provider_of("cblas_sgemm") + ")");
#elif defined(TITANS_GEMM_LIBXSMM)
  benchmark::AddCustomContext("gemm", std::string("titans::detail::gemm: ") + titans::gemm_backend() +
                                          " (sgemm_ from " + titans_bench::provider_of("sgemm_") +
                                          "; BM_GemmYardstickLibxsmm's own_kernels_pct: the share in libxsmm's kernels)");
#else
  benchmark::AddCustomContext("gemm", std::string("titans::detail::gemm: ") + titans::gemm_backend());
#endif
#if defined(EIGEN_USE_BLAS) || defined(TITANS_BENCH_HAVE_OPENBLAS)
  openblas_set_num_threads(1);
  benchmark::AddCustomContext("openblas_corename", openblas_get_corename());
  benchmark::AddCustomContext("openblas_config", openblas_get_config());
#endif
  benchmark::AddCustomContext("yardstick_backends", titans_bench::gemm_backends());
#if defined(TITANS_BENCH_HAVE_OPENBLAS) || defined(TITANS_BENCH_HAVE_BLIS)
  // Both libraries export the CBLAS names; this one is what every cblas_sgemm of the process runs.
  benchmark::AddCustomContext("cblas_sgemm_from", titans_bench::provider_of("cblas_sgemm"));
#endif
#ifdef TITANS_BENCH_HAVE_BLIS
  bli_thread_set_num_threads(1);
  benchmark::AddCustomContext("blis", titans_bench::blis_description() + " (bli_sgemm from " +
                                          titans_bench::provider_of("bli_sgemm") + ")");
#endif
#if defined(TITANS_BENCH_HAVE_OPENBLAS) || defined(TITANS_BENCH_HAVE_BLIS)
  std::string backend_threads = "1:";
#ifdef TITANS_BENCH_HAVE_OPENBLAS
  backend_threads += " openblas_set_num_threads(1)";
#endif
#ifdef TITANS_BENCH_HAVE_BLIS
  backend_threads += " bli_thread_set_num_threads(1)";
#endif
  benchmark::AddCustomContext("backend_threads", backend_threads);
#endif
  benchmark::AddCustomContext("fma_peak_kernel", titans_bench::fma_kernel_description<float>() + " (float), " +
                                                     titans_bench::fma_kernel_description<double>() +
                                                     " (double); fma_peak: fastest 2^16 rounds in 0.2 s, on first use");
  benchmark::AddCustomContext("gates", "alpha=0.01 eta=0.9 theta=0.01, E=4, SiLU, T=4096");
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
