// SPDX-License-Identifier: Apache-2.0
//
// Streams a long sequence in pieces and reports throughput and the process's resident memory as
// the stream grows: the per-sequence state is fixed-size, so memory must not grow with the number
// of tokens.
//   BM_StreamLayer     one neural memory layer: D = 256, H = 1 (memory width d = 256), L = 2,
//                      E = 4, b = 64, float; 10k, 100k and 1M tokens in pieces of 512.
//   BM_StreamMacBlock  a default MAC block (BlockConfig{}: D = 256, segment 64, deep bounded
//                      memory), float; 10k and 2M tokens in pieces of 512.
// Each run resets the process's peak RSS first, so peak_rss_MiB is that run's own peak: the
// longest run's must equal the shortest's.
#include "bench_process.hpp"

#include <titans/titans.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <string>

namespace {

using titans_bench::peak_rss_mib;
using titans_bench::reset_peak_rss;
using titans_bench::rss_mib;

// One streaming run: `total` tokens through `forward(x) -> y` in pieces of x's width (the last
// piece shorter), the process's peak RSS reset first so that `peak` is this run's own.
struct StreamRun {
  double rss_first = 0, rss_end = 0, peak = 0, last_norm = 0;
  bool finite = true, peak_reset = true;
};

template <class Forward>
StreamRun stream(const char* what, long total, const titans::Matrix<float>& x, Forward&& forward) {
  StreamRun r;
  r.peak_reset = reset_peak_rss();
  const long piece = x.cols();
  long done = 0;
  while (done < total) {
    const long n = std::min(piece, total - done);
    const titans::Matrix<float> y = forward(x.leftCols(n));
    r.finite = r.finite && y.allFinite();
    r.last_norm = y.norm();
    done += n;
    if (done == n) r.rss_first = rss_mib();
    if (done % (200 * piece) == 0 || done == total)
      std::fprintf(stderr, "\r  %s: streamed %ld / %ld tokens, RSS %.1f MiB   ", what, done, total, rss_mib());
  }
  std::fprintf(stderr, "\n");
  r.rss_end = rss_mib();
  r.peak = peak_rss_mib();
  return r;
}

void report(benchmark::State& st, const StreamRun& r, long total) {
  if (!r.peak_reset) st.SkipWithError("cannot reset the peak RSS (/proc/self/clear_refs)");
  if (!r.finite) st.SkipWithError("an output is not finite while streaming");
  if (!(r.last_norm > 0)) st.SkipWithError("the output vanished while streaming");
  st.SetItemsProcessed(st.iterations() * total);
  st.counters["rss_first_piece_MiB"] = r.rss_first;
  st.counters["rss_end_MiB"] = r.rss_end;
  st.counters["peak_rss_MiB"] = r.peak;
  st.counters["last_piece_norm"] = r.last_norm;
}

void BM_StreamLayer(benchmark::State& st) {
  const long total = st.range(0), piece = st.range(1);
  titans::NeuralMemoryConfig cfg;
  cfg.dim = 256;
  cfg.heads = 1;
  cfg.depth = 2;
  cfg.expansion = 4;
  cfg.chunk_size = 64;
  titans::NeuralMemory<float> layer(cfg);
  const auto params = layer.init(1);
  titans::Matrix<float> x(cfg.dim, piece);
  titans::detail::Rng rng(2);
  rng.fill_normal(x, 1.0);
  StreamRun run;
  for (auto _ : st) {
    auto state = layer.initial_state(params);
    run = stream("layer", total, x, [&](const auto& xs) { return layer.forward(params, xs, state); });
    for (const auto& w : titans::memory_current_weights(cfg.memory(), state.heads[0]))
      if (!w.allFinite()) st.SkipWithError("the memory state is not finite after streaming");
    benchmark::DoNotOptimize(state.position);
  }
  report(st, run, total);
  const double flops = titans::memory_forward_flops(cfg.memory(), cfg.chunk_size, total) +
                       2.0 * 5 * cfg.dim * cfg.dim * static_cast<double>(total);  // + 5 D×D projections
  st.counters["GFLOPS"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK(BM_StreamLayer)
    ->Args({10'000, 512})
    ->Args({100'000, 512})
    ->Args({1'000'000, 512})
    ->Iterations(1)
    ->Unit(benchmark::kSecond)
    ->UseRealTime();

void BM_StreamMacBlock(benchmark::State& st) {
  const long total = st.range(0), piece = st.range(1);
  const titans::BlockConfig cfg;  // the defaults: MAC, D = 256, deep bounded memory
  const titans::Block<float> block(cfg);
  const auto params = block.init(1);
  titans::Matrix<float> x(cfg.dim, piece);
  titans::detail::Rng rng(3);
  rng.fill_normal(x, 1.0);
  StreamRun run;
  for (auto _ : st) {
    auto state = block.initial_state(params);
    run = stream("MAC block", total, x, [&](const auto& xs) { return block.forward(params, xs, state); });
    benchmark::DoNotOptimize(state.position);
  }
  report(st, run, total);
}

BENCHMARK(BM_StreamMacBlock)
    ->Args({10'000, 512})
    ->Args({2'000'000, 512})
    ->Iterations(1)
    ->Unit(benchmark::kSecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
