// SPDX-License-Identifier: Apache-2.0
//
// Training-step benchmarks of the memory kernel: forward with a cache + backward through the
// test-time updates, beside the inference forward of the same shapes, so the ratio
// (forward + backward) / forward can be read off (the target is 3, the ratio of the products alone). Also the cache's memory at
// T = 4096 and 16384, storing every chunk-start state (r = 1) or recomputing (r = 8).
//
// Counters: items_per_second = tokens/s; GFLOPS uses the forward count of docs/MATH.md §3 times 3
// for a training step (backward ≈ 2× forward in GEMM work), so it is comparable to the forward
// benchmark's GFLOP/s; ratio_vs_forward is measured, not assumed; forward_train_ms and backward_ms
// split the step (the backward's products are twice the forward's, docs/MATH.md §9). BM_ModelTrainStep: the model's
// batched training step on 1 and 2 threads.
#include <titans/titans.hpp>

#include "bench_bias.hpp"

#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

struct Problem {
  titans::MemoryConfig cfg;
  titans::KernelInputs<float> in;
  titans::Matrix<float> dy;
  titans::MemoryState<float> state;
};

// bound = 1: the layer's bounded forms (residual, γ ⊙ LN read-out, surprise clamp 250; docs/MATH.md
// §8); 0: the kernel's plain read-out. bias: the attentional bias (docs/MATH.md §11), 0 = l2,
// 1 = huber (threshold δ = √d for every token, about the residuals' norm, so both branches run),
// 2 = lp (p = 3), 3 = huber_radial (δ as huber).
Problem make_problem(long d, long L, long T, bool bound = false, long bias = 0) {
  Problem p;
  p.cfg.dim = d;
  p.cfg.depth = L;
  p.cfg.expansion = 4;
  if (bound) {
    p.cfg.residual = true;
    p.cfg.output_norm = true;
    p.cfg.surprise_clamp = 250;
  }
  p.cfg.bias = titans_bench::bias_from_arg(bias);
  titans::detail::Rng rng(7);
  p.in.k.resize(d, T);
  p.in.v.resize(d, T);
  p.in.q.resize(d, T);
  p.dy.resize(d, T);
  rng.fill_normal(p.in.k, 1.0);
  rng.fill_normal(p.in.v, 1.0);
  rng.fill_normal(p.in.q, 1.0);
  rng.fill_normal(p.dy, 1.0);
  p.in.k.colwise().normalize();
  p.in.q.colwise().normalize();
  p.in.alpha = titans::Vector<float>::Constant(T, 0.01f);
  p.in.eta = titans::Vector<float>::Constant(T, 0.9f);
  p.in.theta = titans::Vector<float>::Constant(T, 0.01f);  // 0.05 overflows a depth-2 float memory (benchmarks/README.md)
  if (bound) p.in.gain = titans::Vector<float>::Ones(d);
  if (bias == 1 || bias == 3) p.in.threshold = titans::Vector<float>::Constant(T, std::sqrt(static_cast<float>(d)));
  p.state = titans::make_memory_state(p.cfg, titans::init_memory_weights<float>(p.cfg, 1));
  return p;
}

// Seconds of one inference forward of the same shapes (the best of 3), for the ratio. Measured by
// each benchmark right after its own loop, not once per shape: this machine's speed drifts by 20%
// and more over a run, and a ratio is only meaningful between times taken close together.
double forward_seconds(const Problem& p, long b) {
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    auto s = p.state;
    const auto t0 = std::chrono::steady_clock::now();
    const titans::Matrix<float> y = titans::memory_forward<float>(p.cfg, b, p.in, s);
    benchmark::DoNotOptimize(y.data());
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

void BM_TrainStep(benchmark::State& st) {
  const long d = st.range(0), L = st.range(1), b = st.range(2), T = st.range(3), r = st.range(4);
  const bool bound = st.range(5) != 0;
  Eigen::setNbThreads(1);
  const Problem p = make_problem(d, L, T, bound, st.range(6));
  titans::MemoryForwardCache<float> cache;
  titans::MemoryTrainOptions opt;
  opt.checkpoint_every = r;
  auto grads = titans::make_kernel_gradients<float>(p.cfg, T, p.state);
  const titans::MemoryState<float> none;
  double forward_train_s = 0, backward_s = 0;  // the step's two halves, summed over the iterations
  for (auto _ : st) {
    auto s = p.state;
    const auto t0 = std::chrono::steady_clock::now();
    const titans::Matrix<float> y =
        titans::memory_forward_train<float>(p.cfg, b, p.in, s, cache, opt);
    benchmark::DoNotOptimize(y.data());
    const auto t1 = std::chrono::steady_clock::now();
    titans::memory_backward<float>(cache, p.dy, none, grads);
    benchmark::ClobberMemory();
    const auto t2 = std::chrono::steady_clock::now();
    forward_train_s += std::chrono::duration<double>(t1 - t0).count();
    backward_s += std::chrono::duration<double>(t2 - t1).count();
  }
  const auto iterations = static_cast<double>(st.iterations());
  st.counters["forward_train_ms"] = 1e3 * forward_train_s / iterations;
  st.counters["backward_ms"] = 1e3 * backward_s / iterations;
  if (!grads.inputs.k.allFinite()) st.SkipWithError("the gradients are not finite");
  st.SetItemsProcessed(st.iterations() * T);
  const double fwd_flops = titans::memory_forward_flops(p.cfg, b, T);
  st.counters["GFLOPS"] = benchmark::Counter(3 * fwd_flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["cache_MiB"] = static_cast<double>(cache.bytes()) / (1024.0 * 1024.0);
  const double forward_s = forward_seconds(p, b);
  st.counters["forward_ms"] = 1e3 * forward_s;
  // ratio_vs_forward: time per training step / time per forward (lower is better; 3 is the ratio of the products alone)
  // seconds per iteration / forward seconds: a rate counter is value / time, inverted time / value
  st.counters["ratio_vs_forward"] = benchmark::Counter(forward_s * static_cast<double>(st.iterations()),
                                                       benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

void train_grid(benchmark::internal::Benchmark* bm) {
  for (long d : {64, 128, 256})
    for (long L : {1, 2})
      for (long b : {16, 64}) bm->Args({d, L, b, 4096, 1, 0, 0});
  // Cache memory with and without recomputation at longer T (d = 256, L = 2, b = 64).
  for (long T : {4096, 16384})
    for (long r : {1, 8}) bm->Args({256, 2, 64, T, r, 0, 0});
  // The cost of the bounds at d = 256, L = 2: without and with, alternately, three times.
  for (long b : {16, 64})
    for (int round = 0; round < 3; ++round)
      for (long bound : {0, 1}) bm->Args({256, 2, b, 4096, 1, bound, 0});
  // The attentional biases (l2, huber, lp, huber_radial) with the layer's bounded forms,
  // alternately, twice.
  for (int round = 0; round < 2; ++round)
    for (long bias : {0, 1, 2, 3}) bm->Args({256, 2, 64, 4096, 1, 1, bias});
}

BENCHMARK(BM_TrainStep)->ArgNames({"d", "L", "b", "T", "r", "bound", "bias"})->Apply(train_grid)->Unit(benchmark::kMillisecond)->UseRealTime();

// The model's batched training step (loss_and_gradient over 8 sequences of T tokens, two MAC
// blocks, D = 128, the layer's defaults) on 1 and 2 threads, wall time: the batch is dealt into
// titans::batch_parts fixed parts that run in parallel, so the gradients are the same on any
// thread count and the speed-up is the ratio of the two rows (issue 13's target: >= 1.8).
void BM_ModelTrainStep(benchmark::State& st) {
  const int threads = static_cast<int>(st.range(0));
  const long T = st.range(1);
  titans::ModelConfig c;
  c.vocab = 256;
  c.layers = {titans::BlockKind::mac, titans::BlockKind::mac};
  c.block.dim = 128;
  c.block.attention_heads = 4;
  c.block.segment = 64;
  c.block.memory.dim = 128;
  c.block.memory.heads = 2;
  const titans::TitansModel<float> model(c);
  const auto params = model.init(1);
  titans::detail::Rng rng(3);
  std::vector<std::vector<int>> in(8), tg(8);
  for (std::size_t i = 0; i < in.size(); ++i)
    for (long t = 0; t < T; ++t) {
      in[i].push_back(static_cast<int>(rng.below(256)));
      tg[i].push_back(static_cast<int>(rng.below(256)));
    }
#ifdef _OPENMP
  const int before = omp_get_max_threads();
  omp_set_num_threads(threads);
#endif
  auto grads = titans::zeros_like(params);
  for (auto _ : st) {
    const float loss = model.loss_and_gradient(params, in, tg, grads);
    benchmark::DoNotOptimize(loss);
  }
#ifdef _OPENMP
  omp_set_num_threads(before);
#endif
  st.counters["threads"] = threads;
  st.SetItemsProcessed(st.iterations() * static_cast<std::int64_t>(in.size()) * T);
}

BENCHMARK(BM_ModelTrainStep)->ArgNames({"threads", "T"})->Args({1, 512})->Args({2, 512})->Args({1, 512})->Args({2, 512})
    ->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
