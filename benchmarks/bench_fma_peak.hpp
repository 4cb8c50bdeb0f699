// SPDX-License-Identifier: Apache-2.0
//
// \file bench_fma_peak.hpp
// \brief The machine's fused multiply-add peak on one core, measured in the same run as the
// kernel, so that every GFLOP/s figure of bench_memory can also be read as a fraction of what
// the core can do at all (benchmarks/README.md, "Yardsticks in the same run").
//
// The loop keeps `accumulators` independent vector accumulators in registers and updates each
// with one FMA per round, acc = acc · x + y (x = 0.999, y = 0.001: the values converge to 1 and
// stay normal, so no denormal or overflow slows anything down). With enough independent chains
// to cover FMA latency × FMA throughput (4 cycles × 2 per cycle = 8 on current x86 cores), the
// loop is bound by the FMA units alone. One FMA on a vector of `lanes` Scalars is 2 · lanes
// flops.
//
// The vector width is the widest one the build targets (-march=native): AVX-512F (16 float /
// 8 double lanes, 16 accumulators of the 32 zmm registers), else AVX + FMA3 (8 / 4 lanes, 12
// accumulators of the 16 ymm registers, two more hold x and y), else a scalar multiply-add
// (8 accumulators; the compiler may or may not fuse it).
#pragma once

#include <benchmark/benchmark.h>

#if defined(__AVX512F__) || (defined(__AVX__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__GNUC__) || defined(__clang__)
#define TITANS_BENCH_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define TITANS_BENCH_NOINLINE __declspec(noinline)
#else
#define TITANS_BENCH_NOINLINE
#endif

namespace titans_bench {

namespace fma_detail {

/// One vector register of Scalar and the FMA on it, for the widest vectors of this build.
template <class Scalar>
struct Simd;

#if defined(__AVX512F__)
template <>
struct Simd<float> {
  using V = __m512;
  static constexpr int lanes = 16, accumulators = 16;
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static const char* isa() { return "AVX-512F (zmm)"; }
};
template <>
struct Simd<double> {
  using V = __m512d;
  static constexpr int lanes = 8, accumulators = 16;
  static V set1(double x) { return _mm512_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static const char* isa() { return "AVX-512F (zmm)"; }
};
#elif defined(__AVX__) && defined(__FMA__)
template <>
struct Simd<float> {
  using V = __m256;
  static constexpr int lanes = 8, accumulators = 12;
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static const char* isa() { return "AVX + FMA3 (ymm)"; }
};
template <>
struct Simd<double> {
  using V = __m256d;
  static constexpr int lanes = 4, accumulators = 12;
  static V set1(double x) { return _mm256_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static const char* isa() { return "AVX + FMA3 (ymm)"; }
};
#else
template <class Scalar>
struct Simd {
  using V = Scalar;
  static constexpr int lanes = 1, accumulators = 8;
  static V set1(Scalar x) { return x; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static const char* isa() { return "scalar multiply-add (no AVX/FMA in this build)"; }
};
#endif

template <class Scalar>
using Accumulators = typename Simd<Scalar>::V[Simd<Scalar>::accumulators];

template <class Scalar, std::size_t... I>
inline void fma_loop(typename Simd<Scalar>::V* acc, std::int64_t rounds, std::index_sequence<I...>) {
  using S = Simd<Scalar>;
  // Local copies: their addresses never escape, so they live in registers for the whole loop.
  typename S::V a[sizeof...(I)] = {acc[I]...};
  const typename S::V x = S::set1(Scalar(0.999)), y = S::set1(Scalar(0.001));
  for (std::int64_t r = 0; r < rounds; ++r) ((a[I] = S::fma(a[I], x, y)), ...);
  ((acc[I] = a[I]), ...);
}

}  // namespace fma_detail

/// Rounds per call of fma_rounds in BM_FmaPeak: 2^18 rounds × 16 accumulators ≈ 4M vector FMAs,
/// about a millisecond.
constexpr std::int64_t kFmaRounds = std::int64_t(1) << 18;

/// `rounds` rounds of one FMA on each accumulator. Not inlined, so that the loop is compiled
/// the same wherever it is used and can be found in the disassembly.
template <class Scalar>
TITANS_BENCH_NOINLINE void fma_rounds(fma_detail::Accumulators<Scalar>& acc, std::int64_t rounds) {
  using S = fma_detail::Simd<Scalar>;
  fma_detail::fma_loop<Scalar>(acc, rounds, std::make_index_sequence<S::accumulators>{});
}

/// Flops of fma_rounds(acc, rounds): 2 per lane of every vector FMA.
template <class Scalar>
constexpr double fma_flops(std::int64_t rounds) {
  using S = fma_detail::Simd<Scalar>;
  return 2.0 * S::lanes * S::accumulators * static_cast<double>(rounds);
}

/// Distinct starting values, so no two accumulators are the same computation.
template <class Scalar>
void init_accumulators(fma_detail::Accumulators<Scalar>& acc) {
  using S = fma_detail::Simd<Scalar>;
  for (int i = 0; i < S::accumulators; ++i) acc[i] = S::set1(Scalar(0.5) + Scalar(0.01) * Scalar(i));
}

/// A description of the loop for the run's context.
template <class Scalar>
std::string fma_kernel_description() {
  using S = fma_detail::Simd<Scalar>;
  return std::string(S::isa()) + ", " + std::to_string(S::accumulators) + " accumulators x " +
         std::to_string(S::lanes) + " lanes";
}

/// BM_FmaPeak<Scalar>: kFmaRounds rounds per iteration on the calling thread (one core).
/// Counter GFLOPS: 2 flops per FMA lane.
template <class Scalar>
void BM_FmaPeak(benchmark::State& state) {
  fma_detail::Accumulators<Scalar> acc;
  init_accumulators<Scalar>(acc);
  for (auto _ : state) {
    fma_rounds<Scalar>(acc, kFmaRounds);
    for (auto& a : acc) benchmark::DoNotOptimize(a);
  }
  state.counters["GFLOPS"] = benchmark::Counter(fma_flops<Scalar>(kFmaRounds) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(fma_kernel_description<Scalar>());
}

/// Measures the FMA peak of one core in GFLOP/s: calls of 2^16 rounds (~0.3 ms at 1 AVX-512 FMA per
/// cycle) for `seconds` of wall time, and keeps the fastest call, which is the one no interrupt,
/// preemption or clock ramp-up slowed down.
template <class Scalar>
double measure_fma_peak_gflops(double seconds = 0.2) {
  using clock = std::chrono::steady_clock;
  constexpr std::int64_t rounds = std::int64_t(1) << 16;
  fma_detail::Accumulators<Scalar> acc;
  init_accumulators<Scalar>(acc);
  double best = 0;
  const clock::time_point start = clock::now();
  for (;;) {
    const clock::time_point t0 = clock::now();
    fma_rounds<Scalar>(acc, rounds);
    const clock::time_point t1 = clock::now();
    for (auto& a : acc) benchmark::DoNotOptimize(a);
    const double dt = std::chrono::duration<double>(t1 - t0).count();
    if (dt > 0) best = std::max(best, fma_flops<Scalar>(rounds) / dt);
    if (std::chrono::duration<double>(t1 - start).count() >= seconds) break;
  }
  return best / 1e9;
}

/// The FMA peak of one core in GFLOP/s, measured once per process on first use (about 0.2 s)
/// and cached.
template <class Scalar>
double fma_peak_gflops() {
  static const double peak = measure_fma_peak_gflops<Scalar>();
  return peak;
}

}  // namespace titans_bench
