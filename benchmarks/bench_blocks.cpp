// SPDX-License-Identifier: Apache-2.0
//
// Benchmarks of whole Titans blocks (titans::Block, docs/MATH.md §5–6): every mixer kind inside the
// pre-norm residual wrapper with its SwiGLU feed-forward, against a full-causal-attention block,
// at growing sequence lengths T — to see where the memory blocks (linear in T) overtake full
// attention (quadratic in T). See benchmarks/README.md ("Blocks") for the measured numbers.
//
//   BM_BlockForward/<kind>/T:<T>     one Block::forward over T tokens from a fresh state
//   BM_BlockTrain/<kind>/T:<T>       one Block::forward_train + Block::backward over T tokens
//   BM_GemmProjection/T:<T>          yardstick: (D, D)·(D, T), the shape of every projection
//   BM_GemmFFN/T:<T>                 yardstick: (F, D)·(D, T), the shape of the SwiGLU's W1 and W3
//   BM_GemmMemoryChunks/T:4096       yardstick: the memory kernel's dense products for T tokens
//                                    and H heads (bench_gemm_yardstick.hpp, d = D / H, b = 16)
//   BM_GemmAttentionCore/T:<T>       yardstick: the full causal attention's score and weighted-sum
//                                    GEMMs alone, per head and per block of 64 queries, into a
//                                    preallocated score buffer (no mask, softmax, gather or cache)
//
// kinds: lmm, mac, mag, mal, swa (the block kinds) and "full": the baseline with full causal
// attention. "full" is an swa block whose window is T, built through BlockConfig like the others:
// from a fresh state, over one call of T tokens, every token then sees itself and all tokens
// before it — exactly full causal attention (window = 0 in AttentionConfig) — while the residual
// wrapper, RMSNorms, persistent tokens and SwiGLU stay identical to the other kinds. (BlockConfig
// does not accept window = 0, and wrapping Attention<float> by hand would duplicate the block.)
//
// Shapes (float): the BlockConfig defaults, i.e. D = 256, 4 attention heads (width 64), window
// w = 64 (MAG, MAL, SWA), MAC segment C = 64, N_p = 4 persistent tokens, SwiGLU width F = 688,
// attention block 64; the neural memory with its defaults: 4 heads (d = 64), depth 2, E = 4,
// SiLU, chunk b = 16, conv 4. T ∈ {1024, 4096, 16384}.
//
// Setup outside the timed loop: parameters (Block::init(7)), inputs x ~ N(0, 1) (D, T), upstream
// gradient dout ~ N(0, 1) (D, T) and the fresh state are made once, and one untimed warm-up call
// touches the call's memory first (measured without it: the first training benchmark paid ~34k
// page faults and 5× the CPU time of later iterations, and long cases time a single iteration).
// Each iteration copies the prepared fresh state (< 0.5 MB) and, for training, zeroes the
// gradients and dx (≈ 1.5 M floats); both are < 1% of an iteration. After timing, outputs (and
// for training dx and every gradient) must be finite.
//
// Counters: tokens/s (also items_per_second via SetItemsProcessed); GFLOPS from the block's GEMM
// flop count (block_forward_flops below: Attention::flops, memory_forward_flops, the projections
// and the FFN; elementwise work, norms and softmax not counted), ×3 for a training step
// (backward ≈ 2× forward in GEMM work, as bench_train.cpp counts it) — a nominal rate to hold
// against the yardsticks, not a measured flop count; faults/iter: minor page faults per iteration;
// peak_MiB (block benchmarks): the process's peak resident memory during the timed loop.
//
// Threads: one by default (Eigen::setNbThreads(1), and one OpenMP thread for the per-head
// loops), with rates per CPU second so that other jobs on the same cores disturb them less;
// `--threads=N` sets both to N and reports wall-clock rates (/real_time). The allocator is
// warmed once at start (warm_allocator) so that no benchmark pays for being first.
//
// Run time: long cases (T = 16384, and full-attention training from T = 4096) time a single
// iteration, the rest at least 0.5 s. The default run took 3.5 minutes of wall time (1.8 min of
// CPU) on two shared cores. Full-attention training at T = 16384 peaks at ~3.2 GB resident (its
// cache keeps every softmax weight: H·T²/2 floats, 2.1 GB); filter it out on small machines,
// e.g. --benchmark_filter='-BM_BlockTrain/full/T:16384'.
#include "bench_gemm_yardstick.hpp"
#include "bench_process.hpp"

#include <titans/blocks.hpp>
#include <titans/memory/kernel.hpp>
#include <titans/parameters.hpp>

#include <benchmark/benchmark.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using titans::BlockConfig;
using titans::BlockKind;
using titans::Index;
using Mat = titans::Matrix<float>;

constexpr Index kSequenceLengths[] = {1024, 4096, 16384};

/// What a benchmark runs: a block kind, or the full-causal baseline.
struct Variant {
  const char* name;
  BlockKind kind;
  bool full_attention;
};

constexpr Variant kVariants[] = {
    {"lmm", BlockKind::lmm, false}, {"mac", BlockKind::mac, false}, {"mag", BlockKind::mag, false},
    {"mal", BlockKind::mal, false}, {"swa", BlockKind::swa, false}, {"full", BlockKind::swa, true},
};

/// The benchmarked config: BlockConfig's defaults (D = 256, 4 + 4 heads, w = C = 64, N_p = 4).
BlockConfig block_config(const Variant& v, Index T) {
  BlockConfig cfg;
  cfg.kind = v.kind;
  if (v.full_attention) cfg.window = T;  // one call of T tokens from a fresh state: full causal
  return cfg;
}

// ---------------------------------------------------------------------------------------------
// FLOP model (GEMMs only, 2·m·n·k per product, as memory_forward_flops and Attention::flops).
// ---------------------------------------------------------------------------------------------

/// Neural memory layer over T tokens: projections k, v, q, gate and output (5 of D×D), the three
/// gate projections (H×D), and H memory kernels of width d.
double memory_layer_flops(const titans::NeuralMemoryConfig& m, Index T) {
  const double D = static_cast<double>(m.dim), H = static_cast<double>(m.heads);
  return (10.0 * D * D + 6.0 * H * D) * static_cast<double>(T) +
         H * titans::memory_forward_flops(m.memory(), m.chunk_size, T);
}

/// M*(q) without update for T tokens of one head (MAC's retrieval).
double memory_apply_flops(const titans::MemoryConfig& mc, Index T) {
  double per_token = 0;
  for (Index l = 0; l < mc.depth; ++l)
    per_token += 2.0 * static_cast<double>(mc.layer_out(l)) * static_cast<double>(mc.layer_in(l));
  return per_token * static_cast<double>(T);
}

/// Forward flops of one Block::forward over T tokens from a fresh state.
double block_forward_flops(const BlockConfig& cfg, Index T) {
  const double D = static_cast<double>(cfg.dim), F = static_cast<double>(cfg.ffn_width());
  const Index np = cfg.persistent;
  double f = 6.0 * D * F * static_cast<double>(T);  // SwiGLU: W1, W3, W2
  const titans::Attention<float> attn(cfg.attention());
  switch (cfg.kind) {
    case BlockKind::swa:
      f += attn.flops(T, 0, np);
      break;
    case BlockKind::lmm:
      f += memory_layer_flops(cfg.memory, T + np);  // a fresh memory first reads the N_p persistent tokens
      break;
    case BlockKind::mag:
    case BlockKind::mal:
      f += attn.flops(T, 0, np) + memory_layer_flops(cfg.memory, T + np);
      break;
    case BlockKind::mac: {
      // Per segment of n tokens: retrieval W_R and M*_snapshot per head; attention of the n
      // queries over [persistent || (h_j, x_j) pairs so far] (q, o: n columns; k, v: 2n);
      // then the memory over the attention outputs.
      const titans::MemoryConfig mc = cfg.memory.memory();
      for (Index t0 = 0; t0 < T; t0 += cfg.segment) {
        const Index n = std::min(cfg.segment, T - t0);
        double pairs = 0;
        for (Index j = 0; j < n; ++j) pairs += static_cast<double>(np + 2 * (j + 1));
        f += 2.0 * D * D * static_cast<double>(n) + static_cast<double>(cfg.memory.heads) * memory_apply_flops(mc, n);
        f += 12.0 * D * D * static_cast<double>(n) + 4.0 * D * pairs;
      }
      f += memory_layer_flops(cfg.memory, T);
      break;
    }
  }
  return f;
}

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

int g_threads = 1;

using titans_bench::minor_faults;
using titans_bench::peak_rss_mib;
using titans_bench::reset_peak_rss;

void set_threads(int n) {
  Eigen::setNbThreads(n);
#ifdef _OPENMP
  omp_set_num_threads(n);
#endif
}

/// Records the peak RSS of the timed loop as "peak_MiB" (the whole process's, so it includes
/// memory the allocator kept from earlier benchmarks; -1 where it cannot be measured).
class PeakRss {
 public:
  PeakRss() : ok_(reset_peak_rss()) {}
  void report(benchmark::State& state) const { state.counters["peak_MiB"] = ok_ ? peak_rss_mib() : -1; }

 private:
  bool ok_;
};

Mat random_matrix(Index rows, Index cols, std::uint64_t seed) {
  titans::detail::Rng rng(seed);
  Mat m(rows, cols);
  rng.fill_normal(m, 1.0);
  return m;
}

template <class Params>
bool all_finite(const Params& p) {
  bool ok = true;
  p.for_each([&](const std::string&, const Mat& t) { ok = ok && t.allFinite(); });
  return ok;
}

/// tokens/s, items_per_second, GFLOPS and page faults of a benchmark that does `tokens` tokens
/// and `flops` flops per iteration.
void set_counters(benchmark::State& state, Index tokens, double flops, double faults_before) {
  const auto iters = static_cast<double>(state.iterations());
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * tokens);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOPS"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["faults/iter"] = benchmark::Counter((minor_faults() - faults_before) / iters);
}

// ---------------------------------------------------------------------------------------------
// Blocks.
// ---------------------------------------------------------------------------------------------

void BM_BlockForward(benchmark::State& state, Variant v, Index T) {
  set_threads(g_threads);
  const BlockConfig cfg = block_config(v, T);
  const titans::Block<float> block(cfg);
  const auto params = block.init(7);
  const auto fresh = block.initial_state(params);
  const Mat x = random_matrix(cfg.dim, T, 11);
  Mat y;
  auto st = fresh;
  auto call = [&] {
    st = fresh;
    y = block.forward(params, x, st);
  };
  call();  // warm-up, untimed: first touch of the call's temporaries
  const PeakRss peak;
  const double faults = minor_faults();
  for (auto _ : state) {
    call();
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, block_forward_flops(cfg, T), faults);
  peak.report(state);
  if (!y.allFinite()) state.SkipWithError("block outputs are not finite");
}

void BM_BlockTrain(benchmark::State& state, Variant v, Index T) {
  set_threads(g_threads);
  const BlockConfig cfg = block_config(v, T);
  const titans::Block<float> block(cfg);
  const auto params = block.init(7);
  const auto fresh = block.initial_state(params);
  const Mat x = random_matrix(cfg.dim, T, 11);
  const Mat dout = random_matrix(cfg.dim, T, 13);
  auto grads = titans::zeros_like(params);
  Mat dx(cfg.dim, T), y;
  titans::Block<float>::Cache cache;
  auto st = fresh;
  auto step = [&] {
    st = fresh;
    titans::set_zero(grads);
    dx.setZero();
    y = block.forward_train(params, x, st, cache);
    block.backward(params, cache, dout, grads, dx);
  };
  step();  // warm-up, untimed: first touch of the cache and the temporaries
  const PeakRss peak;
  const double faults = minor_faults();
  for (auto _ : state) {
    step();
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, 3.0 * block_forward_flops(cfg, T), faults);
  peak.report(state);
  if (!y.allFinite() || !dx.allFinite() || !all_finite(grads))
    state.SkipWithError("block outputs or gradients are not finite");
}

// ---------------------------------------------------------------------------------------------
// Yardsticks: plain GEMMs of the blocks' shapes.
// ---------------------------------------------------------------------------------------------

/// out (rows, T) = W (rows, D) · X (D, T), noalias into a preallocated output.
void gemm_projection(benchmark::State& state, Index rows, Index T) {
  set_threads(g_threads);
  const Index D = BlockConfig{}.dim;
  const Mat w = random_matrix(rows, D, 3);
  const Mat xin = random_matrix(D, T, 5);
  Mat out(rows, T);
  const double faults = minor_faults();
  for (auto _ : state) {
    out.noalias() = w * xin;
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, 2.0 * static_cast<double>(rows) * static_cast<double>(D) * static_cast<double>(T), faults);
}

void BM_GemmProjection(benchmark::State& state, Index T) { gemm_projection(state, BlockConfig{}.dim, T); }
void BM_GemmFFN(benchmark::State& state, Index T) { gemm_projection(state, BlockConfig{}.ffn_width(), T); }

/// The memory kernel's dense products (GemmYardstick) for T tokens of each of the H heads.
void BM_GemmMemoryChunks(benchmark::State& state, Index T) {
  set_threads(g_threads);
  const titans::NeuralMemoryConfig m = BlockConfig{}.memory;
  titans_bench::GemmYardstick<float> g(m.memory(), m.chunk_size);
  const Index chunks = T / m.chunk_size * m.heads;
  const double faults = minor_faults();
  for (auto _ : state) {
    for (Index c = 0; c < chunks; ++c) g.run_chunk();
    benchmark::ClobberMemory();
  }
  benchmark::DoNotOptimize(g.checksum());
  set_counters(state, T, g.flops_per_chunk() * static_cast<double>(chunks), faults);
}

/// Full causal attention's two GEMMs per head and query block, as Attention::attend issues them
/// (S = Kᵀ·Q_b over the keys the block can see, A_b = V·S), without gather, mask or softmax.
void BM_GemmAttentionCore(benchmark::State& state, Index T) {
  set_threads(g_threads);
  const BlockConfig cfg;
  const Index D = cfg.dim, H = cfg.attention_heads, dh = D / H, B = cfg.attention_block;
  const Mat q = random_matrix(D, T, 3), k = random_matrix(D, T, 5), v = random_matrix(D, T, 7);
  Mat a(D, T);
  double flops = 0;
  for (Index i0 = 0; i0 < T; i0 += B) {
    const Index nb = std::min(B, T - i0), keys = i0 + nb;
    flops += 4.0 * static_cast<double>(H * dh * keys * nb);
  }
  Mat scores(T, B);  // preallocated: the top `keys` rows hold one block's scores
  const double faults = minor_faults();
  for (auto _ : state) {
    for (Index h = 0; h < H; ++h)
      for (Index i0 = 0; i0 < T; i0 += B) {
        const Index nb = std::min(B, T - i0), keys = i0 + nb;
        auto s = scores.topLeftCorner(keys, nb);
        s.noalias() = k.block(h * dh, 0, dh, keys).transpose() * q.block(h * dh, i0, dh, nb);
        a.block(h * dh, i0, dh, nb).noalias() = v.block(h * dh, 0, dh, keys) * s;
      }
    benchmark::DoNotOptimize(a.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, flops, faults);
}

// ---------------------------------------------------------------------------------------------
// Registration: yardsticks first, then per T the forward and training of every variant.
// ---------------------------------------------------------------------------------------------

/// Long cases run one iteration; the others at least 0.5 s. Rates are per CPU second on one
/// thread (robust to other jobs sharing the cores), per wall-clock second with --threads > 1.
void timing(benchmark::internal::Benchmark* b, bool long_case) {
  b->Unit(benchmark::kMillisecond);
  if (g_threads > 1) b->UseRealTime();
  if (long_case) {
    b->Iterations(1);
  } else {
    b->MinTime(0.5);
  }
}

void register_all() {
  for (Index T : kSequenceLengths) {
    const std::string t = "/T:" + std::to_string(T);
    timing(benchmark::RegisterBenchmark(("BM_GemmProjection" + t).c_str(), BM_GemmProjection, T), false);
    timing(benchmark::RegisterBenchmark(("BM_GemmFFN" + t).c_str(), BM_GemmFFN, T), false);
    timing(benchmark::RegisterBenchmark(("BM_GemmAttentionCore" + t).c_str(), BM_GemmAttentionCore, T), T >= 16384);
  }
  timing(benchmark::RegisterBenchmark("BM_GemmMemoryChunks/T:4096", BM_GemmMemoryChunks, Index{4096}), false);
  for (Index T : kSequenceLengths)
    for (const Variant& v : kVariants) {
      const std::string suffix = std::string("/") + v.name + "/T:" + std::to_string(T);
      const bool long_forward = T >= 16384 && v.full_attention;
      const bool long_train = T >= 16384 || (T >= 4096 && v.full_attention);
      timing(benchmark::RegisterBenchmark(("BM_BlockForward" + suffix).c_str(), BM_BlockForward, v, T), long_forward);
      timing(benchmark::RegisterBenchmark(("BM_BlockTrain" + suffix).c_str(), BM_BlockTrain, v, T), long_train);
    }
}

/// Removes `--threads=N` from argv (Google Benchmark rejects flags it does not know).
void parse_threads(int& argc, char** argv) {
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      g_threads = std::max(1, std::atoi(argv[i] + 10));
    } else {
      argv[out++] = argv[i];
    }
  }
  argc = out;
}

/// Puts glibc's malloc into the state a long-running process reaches after its first large
/// free: freeing an mmap-ed chunk raises the mmap threshold to its size (at most 32 MiB) and the
/// trim threshold to twice that, so later temporaries of up to that size are reused instead of
/// being returned to the OS and page-faulted back in at every call (benchmarks/README.md,
/// "Power-of-two sizes and buffer placement"). Without it, whichever benchmark runs first pays
/// tens of thousands of page faults per iteration (faults/iter shows it).
void warm_allocator() {
  constexpr std::size_t kBytes = (std::size_t{32} << 20) - (std::size_t{64} << 10);
  void* p = std::malloc(kBytes);
  benchmark::DoNotOptimize(p);
  std::free(p);
}

}  // namespace

int main(int argc, char** argv) {
  parse_threads(argc, argv);
  set_threads(g_threads);
  warm_allocator();
  benchmark::AddCustomContext("threads", std::to_string(g_threads));
  benchmark::AddCustomContext("block", "D=256 attention_heads=4 window=64 segment=64 persistent=4 ffn=688 float");
  benchmark::AddCustomContext("memory", "heads=4 d=64 depth=2 E=4 silu chunk=16 conv=4");
  benchmark::AddCustomContext("full", "swa block with window = T (full causal over one call from a fresh state)");
  benchmark::AddCustomContext("gemm", Eigen::SimdInstructionSetsInUse());
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
