// SPDX-License-Identifier: Apache-2.0
//
// Language modelling on the corpus: every model is trained on the same random windows of the
// training split (same seed, same tokens, same steps) and evaluated on fixed windows of the
// validation split, bits per byte at every position of the context.
#include "experiments.hpp"

#include <algorithm>
#include <cmath>

namespace titans_experiments {

namespace {

// Progress units (experiments.hpp): a training step's tokens x width, a forward a third of that.
double step_units(const Settings& s) {
  return static_cast<double>(s.train.batch * s.base.context * s.base.dim);
}
double eval_units(const Settings& s) {
  return static_cast<double>(s.eval_windows * s.base.context * s.base.dim) / 3.0;
}

// Mean loss in nats at each position over the validation windows, and the forward throughput.
std::vector<double> loss_by_position(const Settings& s, const Corpus& corpus, const Model& model, const Params& params,
                                     double& tokens_per_s) {
  const Index T = s.base.context;
  const auto& val = corpus.validation;
  const long room = static_cast<long>(val.size()) - T - 1;
  if (room < 0)
    throw std::runtime_error("experiments: the validation split (" + std::to_string(val.size()) +
                             " bytes) is shorter than one context of " + std::to_string(T));
  const long n = s.eval_windows;
  std::vector<std::vector<double>> per(static_cast<std::size_t>(n));
  const auto t0 = std::chrono::steady_clock::now();
  titans::detail::for_each_head(static_cast<Index>(n), [&](Index w) {
    const long start = n == 1 ? 0 : static_cast<long>(w) * (room / (n - 1));
    std::vector<int> in(static_cast<std::size_t>(T));
    for (Index t = 0; t < T; ++t) in[static_cast<std::size_t>(t)] = val[static_cast<std::size_t>(start + t)];
    auto state = model.initial_state(params);
    const titans::Matrix<float> logits = model.forward(params, in, state);
    auto& out = per[static_cast<std::size_t>(w)];
    out.resize(static_cast<std::size_t>(T));
    for (Index t = 0; t < T; ++t) {
      const auto col = logits.col(t).cast<double>();
      const double mx = col.maxCoeff();
      const double lse = mx + std::log((col.array() - mx).exp().sum());
      out[static_cast<std::size_t>(t)] = lse - col(val[static_cast<std::size_t>(start + t + 1)]);
    }
  });
  tokens_per_s = static_cast<double>(n * T) / seconds_since(t0);
  std::vector<double> mean(static_cast<std::size_t>(T), 0);
  for (const auto& w : per)
    for (Index t = 0; t < T; ++t) mean[static_cast<std::size_t>(t)] += w[static_cast<std::size_t>(t)] / static_cast<double>(n);
  return mean;
}

}  // namespace

double unigram_bits(const std::vector<unsigned char>& text) {
  std::vector<double> count(256, 0);
  for (unsigned char c : text) count[c] += 1;
  double bits = 0;
  const double n = static_cast<double>(text.size());
  for (double c : count)
    if (c > 0) bits -= c / n * std::log2(c / n);
  return bits;
}

double lm_work(const Settings& s) { return static_cast<double>(s.train.steps) * step_units(s) + eval_units(s); }

std::vector<LmRow> run_lm(const Settings& s, const Corpus& corpus, const std::vector<Variant>& variants, Progress& progress) {
  const Index T = s.base.context, span = s.base.span;
  if (static_cast<long>(corpus.train.size()) < T + 2)
    throw std::runtime_error("experiments: the training split is shorter than one context");
  const std::vector<titans::ModelConfig> cfgs = equal_size_configs(variants, s.base);
  std::vector<LmRow> rows;
  for (std::size_t m = 0; m < variants.size(); ++m) {
    const Model model(cfgs[m]);
    Params params = model.init(s.train.seed);
    LmRow row;
    row.name = variants[m].name;
    row.params = titans::parameter_count(params);
    const TrainSettings& ts = s.train;
    const auto t0 = std::chrono::steady_clock::now();
    double shown = 0;
    row.train_loss = train(
        model, params, ts,
        [&](long, titans::detail::Rng& rng, std::vector<std::vector<int>>& in, std::vector<std::vector<int>>& tg) {
          in.assign(static_cast<std::size_t>(ts.batch), std::vector<int>(static_cast<std::size_t>(T)));
          tg = in;
          for (long k = 0; k < ts.batch; ++k) {
            const auto start = static_cast<std::size_t>(rng.below(corpus.train.size() - static_cast<std::size_t>(T) - 1));
            for (Index t = 0; t < T; ++t) {
              in[static_cast<std::size_t>(k)][static_cast<std::size_t>(t)] = corpus.train[start + static_cast<std::size_t>(t)];
              tg[static_cast<std::size_t>(k)][static_cast<std::size_t>(t)] = corpus.train[start + static_cast<std::size_t>(t) + 1];
            }
          }
        },
        [&](long step, double loss) {
          shown = step == 0 ? loss : 0.95 * shown + 0.05 * loss;
          char what[160];
          std::snprintf(what, sizeof what, "[%s] step %ld/%ld, train %.3f bits/byte", row.name.c_str(), step + 1, ts.steps,
                        shown / kLn2);
          progress.advance(step_units(s), what, step + 1 == ts.steps);
        });
    row.train_tokens_per_s = static_cast<double>(ts.steps * ts.batch * T) / seconds_since(t0);
    const std::vector<double> loss = loss_by_position(s, corpus, model, params, row.eval_tokens_per_s);
    progress.advance(eval_units(s), "[" + row.name + "] evaluated", true);
    double all = 0;
    for (double l : loss) all += l;
    row.bits = all / static_cast<double>(T) / kLn2;
    for (Index a = 0; a < T; a += span) {
      double sum = 0;
      const Index b = std::min(T, a + span);
      for (Index t = a; t < b; ++t) sum += loss[static_cast<std::size_t>(t)];
      row.by_span.push_back(sum / static_cast<double>(b - a) / kLn2);
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

}  // namespace titans_experiments
