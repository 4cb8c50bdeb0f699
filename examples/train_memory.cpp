// SPDX-License-Identifier: Apache-2.0
//
// Trains a neural memory layer's outer parameters (projections, convolutions, gates, initial
// memory, output gate and projection) *through* its test-time updates, on synthetic associative
// recall: each sequence shows N key/value pairs, then asks for the value of every key again.
//
//   pair token   x = [key_emb(k); value_emb(v)]       query token  x = [key_emb(k); 0]
//   target at a query: the value's embedding in the lower half of the output
//
// The memory has to learn (by outer training) to write keys → values at pair tokens, to not
// overwrite at query tokens, and to read with queries that match the keys. Accuracy is the share
// of queries whose output is nearest (by dot product) to the right value's embedding.
#include <titans/titans.hpp>

#include "cli.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using Mat = titans::Matrix<double>;

struct Options {
  long steps = 1200;
  long batch = 8;
  long pairs = 6;
  long dim = 32;  // D; keys and values take D/2 each
  long keys = 32;
  long values = 8;
  double lr = 3e-3;
  unsigned long seed = 1;
  long eval = 200;  // evaluation sequences
};

void usage(const char* argv0) {
  std::printf(
      "usage: %s [--steps n] [--batch n] [--pairs n] [--dim D] [--lr x] [--eval n] [--seed s]\n"
      "  Trains a neural memory layer with AdamW on associative recall and prints the recall\n"
      "  accuracy of the trained layer beside the untrained one.\n"
      "  --steps n   optimizer steps (default 1200)     --batch n  sequences per step (default 8)\n"
      "  --pairs n   key/value pairs per sequence (6)   --dim D    layer width, even (default 32)\n"
      "  --lr x      peak learning rate (default 3e-3)  --eval n   evaluation sequences (200)\n"
      "  --seed s    random seed (default 1)\n",
      argv0);
}

struct Task {
  Mat key_emb, value_emb;  // (D/2, keys), (D/2, values)
  long pairs;
};

struct Sequence {
  Mat x;       // (D, 2N)
  Mat target;  // (D, 2N): value embedding at query positions, zero elsewhere
  std::vector<long> answer;  // value id per query
};

Sequence sample(const Task& task, titans::detail::Rng& rng) {
  const long half = task.key_emb.rows(), N = task.pairs, K = task.key_emb.cols(), V = task.value_emb.cols();
  Sequence s;
  s.x = Mat::Zero(2 * half, 2 * N);
  s.target = Mat::Zero(2 * half, 2 * N);
  std::vector<long> keys;
  while (static_cast<long>(keys.size()) < N) {  // distinct keys
    const long k = static_cast<long>(rng.below(static_cast<std::uint64_t>(K)));
    bool seen = false;
    for (long q : keys) seen = seen || q == k;
    if (!seen) keys.push_back(k);
  }
  std::vector<long> vals(static_cast<std::size_t>(N));
  for (long i = 0; i < N; ++i) {
    vals[static_cast<std::size_t>(i)] = static_cast<long>(rng.below(static_cast<std::uint64_t>(V)));
    s.x.col(i).head(half) = task.key_emb.col(keys[static_cast<std::size_t>(i)]);
    s.x.col(i).tail(half) = task.value_emb.col(vals[static_cast<std::size_t>(i)]);
  }
  for (long i = 0; i < N; ++i) {  // queries in a shuffled order
    const long j = i + static_cast<long>(rng.below(static_cast<std::uint64_t>(N - i)));
    std::swap(keys[static_cast<std::size_t>(i)], keys[static_cast<std::size_t>(j)]);
    std::swap(vals[static_cast<std::size_t>(i)], vals[static_cast<std::size_t>(j)]);
    s.x.col(N + i).head(half) = task.key_emb.col(keys[static_cast<std::size_t>(i)]);
    s.target.col(N + i).tail(half) = task.value_emb.col(vals[static_cast<std::size_t>(i)]);
    s.answer.push_back(vals[static_cast<std::size_t>(i)]);
  }
  return s;
}

double accuracy(const titans::NeuralMemory<double>& layer, const titans::NeuralMemoryParams<double>& p,
                const Task& task, long sequences, std::uint64_t seed) {
  titans::detail::Rng rng(seed);
  long right = 0, total = 0;
  const long half = task.value_emb.rows(), N = task.pairs;
  for (long i = 0; i < sequences; ++i) {
    const Sequence s = sample(task, rng);
    auto state = layer.initial_state(p);
    const Mat o = layer.forward(p, s.x, state);
    for (long j = 0; j < N; ++j) {
      Eigen::Index best = 0;
      (task.value_emb.transpose() * o.col(N + j).tail(half)).maxCoeff(&best);
      right += best == s.answer[static_cast<std::size_t>(j)];
      ++total;
    }
  }
  return static_cast<double>(right) / static_cast<double>(total);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  titans_example::Cli cli("train_memory", [&] { usage(argv[0]); });
  cli.integer("--steps", o.steps, 1, 10000000)
      .integer("--batch", o.batch, 1, 100000)
      .integer("--pairs", o.pairs, 1, o.keys)
      .integer("--dim", o.dim, 4, 4096)
      .real("--lr", o.lr, 0, 1, /*lo_open=*/true)
      .integer("--eval", o.eval, 1, 10000000)
      .integer("--seed", o.seed, 0, 2147483647L);
  cli.parse(argc, argv);
  if (o.dim % 2 != 0) cli.fail("--dim must be even, got " + std::to_string(o.dim));

  titans::detail::Rng rng(o.seed);
  Task task;
  task.pairs = o.pairs;
  task.key_emb.resize(o.dim / 2, o.keys);
  task.value_emb.resize(o.dim / 2, o.values);
  rng.fill_normal(task.key_emb, 1.0);
  rng.fill_normal(task.value_emb, 1.0);

  titans::NeuralMemoryConfig cfg;
  cfg.dim = o.dim;
  cfg.heads = 2;
  cfg.depth = 2;
  cfg.expansion = 2;
  cfg.chunk_size = 2;
  titans::NeuralMemory<double> layer(cfg);
  auto params = layer.init(o.seed);
  const auto untrained = params;

  titans::AdamWConfig acfg;
  acfg.lr = o.lr;
  acfg.weight_decay = 0.0;
  titans::AdamW<titans::NeuralMemoryParams<double>> opt(params, acfg);
  const titans::CosineSchedule schedule(o.lr, o.steps / 10, o.steps, o.lr / 10);

  std::printf("titans: training a neural memory layer on associative recall (%ld pairs, D = %ld, %ld steps)\n",
              o.pairs, o.dim, o.steps);
  const auto t0 = std::chrono::steady_clock::now();
  long tokens = 0;
  for (long step = 0; step < o.steps; ++step) {
    auto grads = titans::zeros_like(params);
    double loss = 0;
    long counted = 0;
    for (long b = 0; b < o.batch; ++b) {
      const Sequence s = sample(task, rng);
      auto state = layer.initial_state(params);
      auto dstate = titans::zeros_like(state);
      titans::NeuralMemoryCache<double> cache;
      const Mat out = layer.forward_train(params, s.x, state, cache);
      // Loss: mean squared error at the query positions, averaged over the batch.
      Mat dout = Mat::Zero(out.rows(), out.cols());
      const long N = o.pairs;
      const Mat diff = out.rightCols(N) - s.target.rightCols(N);
      loss += diff.squaredNorm();
      counted += diff.size();
      dout.rightCols(N) = 2 * diff;
      Mat dx = Mat::Zero(s.x.rows(), s.x.cols());
      layer.backward(params, cache, dout, nullptr, grads, dx, &dstate);
      layer.initial_state_backward(dstate, grads);
      tokens += s.x.cols();
    }
    grads.for_each([&](const std::string&, Mat& g) { g /= static_cast<double>(counted); });
    titans::clip_grad_norm(grads, 1.0);
    opt.step(params, grads, schedule(step));
    if (step % 50 == 0 || step + 1 == o.steps) {
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("step %5ld  loss %.4f  lr %.2e  %.0f tokens/s  (%.1f s)\n", step, loss / counted, schedule(step),
                  tokens / secs, secs);
      std::fflush(stdout);
    }
  }

  const double acc_before = accuracy(layer, untrained, task, o.eval, o.seed + 7);
  const double acc_after = accuracy(layer, params, task, o.eval, o.seed + 7);
  std::printf("\nrecall accuracy over %ld held-out sequences (chance %.3f):\n", o.eval, 1.0 / o.values);
  std::printf("  untrained layer  %.3f\n  trained layer    %.3f\n", acc_before, acc_after);
  return 0;
}
