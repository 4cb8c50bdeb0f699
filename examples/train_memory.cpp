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
//
// It is also the paper's deep-versus-linear ablation in miniature (README, "Deep or linear
// memory"): `--depths 1,2 --pairs 8,16,32,64` trains one layer per (depth, N) at the same width
// and prints recall against N. A linear memory of head width d holds about d pairs; past that
// only a deeper memory keeps recalling.
#include <titans/titans.hpp>

#include "cli.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

namespace {

using Mat = titans::Matrix<double>;

struct Options {
  long steps = 1200;
  long batch = 8;
  std::vector<long> pairs{6};   // N per sequence; one trained layer per entry (and per depth)
  std::vector<long> depths{2};  // memory MLP depths L (1 = linear)
  long dim = 32;                // D; keys and values take D/2 each
  long heads = 2;               // H: memory heads of width d = D / H
  long expansion = 2;           // E: hidden width E·d of a deep memory
  long chunk = 2;               // b: memory chunk size
  long keys = 32;
  long values = 8;
  double lr = 3e-3;
  unsigned long seed = 1;
  long eval = 200;  // evaluation sequences
  std::string csv;  // where to write the table ('' = not written)
  bool quiet = false;
  bool check = false;  // exit 3 unless every trained layer recalls better than untrained and than chance
};

void usage(const char* argv0) {
  std::printf(
      "usage: %s [options]\n"
      "  Trains a neural memory layer with AdamW on associative recall and prints the recall\n"
      "  accuracy of the trained layer beside the untrained one. With several --pairs or --depths\n"
      "  it trains one layer per (depth, pairs) and prints recall against the number of pairs.\n"
      "  --steps n      optimizer steps (default 1200)     --batch n  sequences per step (default 8)\n"
      "  --pairs list   key/value pairs per sequence, e.g. 8,16,32 (6; at most --keys)\n"
      "  --depths list  memory depths to compare, e.g. 1,2 (2; 1 = linear)\n"
      "  --dim D        layer width, even (default 32)     --heads H  memory heads (2)\n"
      "  --expansion E  hidden width E*D/H of a deep memory (2)\n"
      "  --chunk b      memory chunk size (2)\n"
      "  --keys n       distinct keys (32)                 --values n distinct values; chance 1/n (8)\n"
      "  --lr x         peak learning rate (default 3e-3)  --eval n   evaluation sequences (200)\n"
      "  --seed s       random seed (default 1)            --csv path write the table as CSV\n"
      "  --quiet        no progress lines\n"
      "  --check        exit with status 3 unless every trained layer recalls better than it did\n"
      "                 untrained and better than chance (what the tests assert)\n",
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

struct Result {
  double before = 0, after = 0, seconds = 0;
  long parameters = 0;
};

// Trains a fresh layer of memory depth `depth` on sequences of `pairs` pairs and measures recall
// before and after.
Result train_layer(const Options& o, long depth, long pairs) {
  titans::detail::Rng rng(o.seed);
  Task task;
  task.pairs = pairs;
  task.key_emb.resize(o.dim / 2, o.keys);
  task.value_emb.resize(o.dim / 2, o.values);
  rng.fill_normal(task.key_emb, 1.0);
  rng.fill_normal(task.value_emb, 1.0);

  titans::NeuralMemoryConfig cfg;
  cfg.dim = o.dim;
  cfg.heads = o.heads;
  cfg.depth = depth;
  cfg.expansion = o.expansion;
  cfg.chunk_size = o.chunk;
  titans::NeuralMemory<double> layer(cfg);
  auto params = layer.init(o.seed);
  const auto untrained = params;

  titans::AdamWConfig acfg;
  acfg.lr = o.lr;
  acfg.weight_decay = 0.0;
  titans::AdamW<titans::NeuralMemoryParams<double>> opt(params, acfg);
  const titans::CosineSchedule schedule(o.lr, o.steps / 10, o.steps, o.lr / 10);

  if (!o.quiet)
    std::printf("training: L = %ld, %ld pairs, D = %ld, H = %ld, %ld steps\n", depth, pairs, o.dim, o.heads, o.steps);
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
      const Mat diff = out.rightCols(pairs) - s.target.rightCols(pairs);
      loss += diff.squaredNorm();
      counted += diff.size();
      dout.rightCols(pairs) = 2 * diff;
      Mat dx = Mat::Zero(s.x.rows(), s.x.cols());
      layer.backward(params, cache, dout, nullptr, grads, dx, &dstate);
      layer.initial_state_backward(dstate, grads);
      tokens += s.x.cols();
    }
    grads.for_each([&](const std::string&, Mat& g) { g /= static_cast<double>(counted); });
    titans::clip_grad_norm(grads, 1.0);
    opt.step(params, grads, schedule(step));
    if (!o.quiet && (step % 100 == 0 || step + 1 == o.steps)) {
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("  step %5ld  loss %.4f  lr %.2e  %.0f tokens/s  (%.1f s)\n", step, loss / counted, schedule(step),
                  tokens / secs, secs);
      std::fflush(stdout);
    }
  }
  Result r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.before = accuracy(layer, untrained, task, o.eval, o.seed + 7);
  r.after = accuracy(layer, params, task, o.eval, o.seed + 7);
  r.parameters = static_cast<long>(titans::parameter_count(params));
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  titans_example::Cli cli("train_memory", [&] { usage(argv[0]); });
  cli.integer("--steps", o.steps, 1, 10000000)
      .integer("--batch", o.batch, 1, 100000)
      .integers("--pairs", o.pairs, 1, 100000)
      .integers("--depths", o.depths, 1, 8)
      .integer("--dim", o.dim, 4, 4096)
      .integer("--heads", o.heads, 1, 64)
      .integer("--expansion", o.expansion, 1, 64)
      .integer("--chunk", o.chunk, 1, 4096)
      .integer("--keys", o.keys, 1, 1000000)
      .integer("--values", o.values, 2, 1000000)
      .real("--lr", o.lr, 0, 1, /*lo_open=*/true)
      .integer("--eval", o.eval, 1, 10000000)
      .integer("--seed", o.seed, 0, 2147483647L)
      .text("--csv", o.csv, /*allow_empty=*/true)
      .flag("--quiet", o.quiet)
      .flag("--check", o.check);
  cli.parse(argc, argv);
  if (o.dim % 2 != 0) cli.fail("--dim must be even, got " + std::to_string(o.dim));
  if (o.dim % o.heads != 0) cli.fail("--heads must divide --dim");
  for (long n : o.pairs)
    if (n > o.keys) cli.fail("--pairs " + std::to_string(n) + " needs at least that many --keys (" + std::to_string(o.keys) + ")");

  std::printf("titans: training neural memory layers on associative recall (D = %ld, H = %ld: head width %ld, "
              "%ld values, chance %.3f)\n",
              o.dim, o.heads, o.dim / o.heads, o.values, 1.0 / static_cast<double>(o.values));
  titans_example::Claims claims("train_memory", o.check);
  try {
    std::vector<std::vector<Result>> results;  // [pairs][depth]
    for (long n : o.pairs) {
      results.emplace_back();
      for (long depth : o.depths) results.back().push_back(train_layer(o, depth, n));
    }
    std::printf("\nrecall accuracy over %ld held-out sequences (chance %.3f), untrained -> trained:\n\n| pairs |",
                o.eval, 1.0 / static_cast<double>(o.values));
    for (long depth : o.depths) std::printf(" L = %ld%s |", depth, depth == 1 ? " (linear)" : "");
    std::printf("\n|---:|");
    for (std::size_t j = 0; j < o.depths.size(); ++j) std::printf("---:|");
    std::printf("\n");
    for (std::size_t i = 0; i < o.pairs.size(); ++i) {
      std::printf("| %ld |", o.pairs[i]);
      for (const Result& r : results[i]) std::printf(" %.3f -> **%.3f** |", r.before, r.after);
      std::printf("\n");
    }
    std::printf("\nparameters per layer:");
    for (std::size_t j = 0; j < o.depths.size(); ++j)
      std::printf(" L = %ld: %ld;", o.depths[j], results[0][j].parameters);
    std::printf(" training time per layer at the largest N: ");
    for (const Result& r : results.back()) std::printf("%.0f s ", r.seconds);
    std::printf("\n");
    if (!o.csv.empty()) {
      std::ofstream f(o.csv);
      f << "pairs,depth,untrained_accuracy,trained_accuracy,parameters,seconds\n";
      for (std::size_t i = 0; i < o.pairs.size(); ++i)
        for (std::size_t j = 0; j < o.depths.size(); ++j) {
          const Result& r = results[i][j];
          f << o.pairs[i] << ',' << o.depths[j] << ',' << r.before << ',' << r.after << ',' << r.parameters << ','
            << r.seconds << '\n';
        }
      f.close();
      if (!f) {
        std::fprintf(stderr, "could not write %s\n", o.csv.c_str());
        return 1;
      }
      std::printf("wrote %s\n", o.csv.c_str());
    }
    const double chance = 1.0 / static_cast<double>(o.values);
    for (std::size_t i = 0; i < o.pairs.size(); ++i)
      for (std::size_t j = 0; j < o.depths.size(); ++j) {
        const Result& r = results[i][j];
        const std::string where = "N = " + std::to_string(o.pairs[i]) + ", L = " + std::to_string(o.depths[j]);
        claims.expect(r.after > r.before, where + ": trained recall " + titans_example::fixed(r.after) +
                                              " above untrained " + titans_example::fixed(r.before));
        claims.expect(r.after > 2 * chance, where + ": trained recall " + titans_example::fixed(r.after) +
                                                " above twice chance (" + titans_example::fixed(2 * chance) + ")");
      }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return claims.status();
}
