// SPDX-License-Identifier: Apache-2.0
//
// Quick start: a neural memory layer memorises key/value pairs at test time.
//
// Each token is x = [key; value] (width D = 2·d). The layer's projections are set so that the
// memory's keys (and queries) come from the key half and its values from the value half; then
// N pairs are streamed through `forward` (which writes them into the memory by gradient descent
// on ||M(k) − v||²), and the keys are queried back with `read` (retrieval, no write). The table
// shows the relative recall error against N for a linear memory (L = 1) and a deep one (L = 2):
// the linear memory cannot hold more than d pairs; the deep one keeps going.
#include <titans/titans.hpp>

#include "cli.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Options {
  long dim = 32;        // d: key and value width
  long passes = 150;    // how many times the pairs are streamed in
  long max_pairs = 256;
  unsigned long seed = 1;
  bool check = false;  // exit 3 unless the table shows what it claims (below)
};

void usage(const char* argv0) {
  std::printf(
      "usage: %s [--dim d] [--passes n] [--max-pairs n] [--seed s] [--check]\n"
      "  Streams N key/value pairs (N = d/4, d/2, d, 2d, ... up to --max-pairs) into a linear and a\n"
      "  deep neural memory layer and prints the relative recall error of each.\n"
      "  --dim d        key/value width (default 32, >= 2)\n"
      "  --passes n     times the pairs are streamed through the layer (default 150, >= 1)\n"
      "  --max-pairs n  largest N (default 256, >= 1)\n"
      "  --seed s       random seed (default 1)\n"
      "  --check        exit with status 3 unless both memories recall N <= d/2 pairs (error\n"
      "                below 0.01) and the deep one recalls better than the linear one from\n"
      "                N = 2d on (what the tests assert)\n",
      argv0);
}

// Parameters that route the key half to keys and queries and the value half to values,
// with plain (current-token) convolutions, no forgetting, no momentum and a fixed step θ.
titans::NeuralMemoryParams<double> routing_params(const titans::NeuralMemory<double>& layer, long d, double theta,
                                                  std::uint64_t seed) {
  using M = titans::Matrix<double>;
  auto p = layer.init(seed);
  const long D = 2 * d, K = layer.config().conv_kernel;
  p.w_k = M::Zero(D, D);
  p.w_k.topLeftCorner(d, d).setIdentity();
  p.w_q = p.w_k;
  p.w_v = M::Zero(D, D);
  p.w_v.bottomRightCorner(d, d).setIdentity();
  for (M* c : {&p.conv_k, &p.conv_v, &p.conv_q}) {
    c->setZero();
    c->col(K - 1).setOnes();
  }
  p.w_alpha.setZero();
  p.w_eta.setZero();
  p.w_theta.setZero();
  p.b_alpha.setConstant(-30);  // α ≈ 1e-13: keep everything
  p.b_eta.setConstant(-30);    // η ≈ 1e-13: no momentum
  p.b_theta.setConstant(std::log(theta / (1 - theta)));
  return p;
}

double recall_error(long d, long depth, long pairs, long passes, std::uint64_t seed) {
  titans::NeuralMemoryConfig cfg;
  cfg.dim = 2 * d;
  cfg.heads = 1;
  cfg.depth = depth;
  cfg.expansion = 4;
  cfg.activation = depth == 1 ? titans::Activation::identity : titans::Activation::silu;
  cfg.chunk_size = 1;
  // A plain key -> value store, M(k) = MLP(k): the layer's default read-out, k + γ ⊙ LN(z_L)
  // (docs/MATH.md §8.3), adds the key itself to every read, and here keys and values live in
  // different halves of the width, so that form would start every recall with an error of
  // ‖k‖² / ‖v‖² = 1 and must first learn to cancel it. The fixed small step, no momentum and no
  // forgetting keep this memory's updates bounded without it (the surprise clamp stays on).
  cfg.residual = false;
  cfg.output_norm = false;
  titans::NeuralMemory<double> layer(cfg);
  const double theta = depth == 1 ? 0.2 : 0.05;
  const auto params = routing_params(layer, d, theta, seed);

  titans::detail::Rng rng(seed + 1000);
  titans::Matrix<double> x(2 * d, pairs), queries = titans::Matrix<double>::Zero(2 * d, pairs);
  rng.fill_normal(x, 1.0);
  queries.topRows(d) = x.topRows(d);

  auto state = layer.initial_state(params);
  for (long e = 0; e < passes; ++e) layer.forward(params, x, state);  // write (and read) every pair

  // What the memory was asked to store, and what it gives back for each key.
  const auto targets = layer.memory_inputs(params, x, layer.initial_state(params)).v;
  const titans::Matrix<double> recalled = layer.read(params, queries, state);
  return (recalled - targets).squaredNorm() / targets.squaredNorm();
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  titans_example::Cli cli("quickstart", [&] { usage(argv[0]); });
  cli.integer("--dim", o.dim, 2, 4096)
      .integer("--passes", o.passes, 1, 1000000)
      .integer("--max-pairs", o.max_pairs, 1, 1000000)
      .integer("--seed", o.seed, 0, 2147483647L)
      .flag("--check", o.check);
  cli.parse(argc, argv);
  titans_example::Claims claims("quickstart", o.check);

  std::printf("titans quickstart: test-time memorisation of key/value pairs\n");
  std::printf("d = %ld, %ld passes, keys and values N(0, 1), memory written by the layer's forward\n\n", o.dim,
              o.passes);
  std::printf("%8s  %22s  %22s\n", "pairs N", "linear memory (L=1)", "deep memory (L=2, E=4)");
  const auto t0 = std::chrono::steady_clock::now();
  long tokens = 0;
  std::vector<long> sizes;
  for (long n = std::max(1L, o.dim / 4); n <= o.max_pairs; n *= 2) sizes.push_back(n);
  for (long n : sizes) {
    const double lin = recall_error(o.dim, 1, n, o.passes, o.seed);
    const double deep = recall_error(o.dim, 2, n, o.passes, o.seed);
    tokens += 2 * n * o.passes;
    std::printf("%8ld  %22.4f  %22.4f%s\n", n, lin, deep, n == o.dim ? "   <- N = d" : "");
    std::fflush(stdout);
    const std::string at = "N = " + std::to_string(n) + ": ";
    if (2 * n <= o.dim) {
      claims.expect(lin < 0.01, at + "the linear memory recalls (error " + titans_example::fixed(lin, 4) + " < 0.01)");
      claims.expect(deep < 0.01, at + "the deep memory recalls (error " + titans_example::fixed(deep, 4) + " < 0.01)");
    } else if (n >= 2 * o.dim) {
      claims.expect(deep < lin, at + "the deep memory's error " + titans_example::fixed(deep, 4) +
                                    " is below the linear one's " + titans_example::fixed(lin, 4));
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("\nrelative recall error ||M(k) - v||^2 / ||v||^2 over all stored pairs (0 = perfect)\n");
  std::printf("%ld tokens written in %.2f s (%.0f tokens/s, double precision)\n", tokens, secs, tokens / secs);
  return claims.status();
}
