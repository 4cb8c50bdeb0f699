// SPDX-License-Identifier: Apache-2.0
//
// What the experiments share: the model variants (one name, one change to a base config), sizing
// to an equal parameter count, training with AdamW, progress with the time left for the whole
// experiment, and results written as a Markdown table, a CSV file and a gnuplot PNG.
#pragma once

#include <titans/titans.hpp>

#include "../examples/cli.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace titans_experiments {

using Model = titans::TitansModel<float>;
using Params = titans::ModelParams<float>;
using titans::Index;

constexpr double kLn2 = 0.69314718055994530942;

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

inline std::string duration(double s) {
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%.0f s", s);
  else std::snprintf(buf, sizeof buf, "%ld min %02ld s", static_cast<long>(s) / 60, static_cast<long>(s) % 60);
  return buf;
}

/// The settings every model of an experiment shares (the variants change them).
struct Base {
  Index vocab = 256;
  Index dim = 64;
  Index layers = 2;
  Index heads = 4;
  Index span = 32;         ///< attention span: MAC segment C = MAG/MAL/SWA window w
  Index persistent = 4;    ///< N_p
  Index mem_depth = 2;     ///< L
  Index expansion = 2;     ///< E
  Index chunk = 8;         ///< b
  double theta_max = 0;    ///< 0: 0.8/b for a linear memory, 0.2/b for a deeper one (as char_lm)
  Index context = 512;     ///< longest sequence the models see (the full-attention window)
};

/// A model: a name for the tables and how it differs from the base config.
struct Variant {
  std::string name;
  std::string what;  ///< one line for the README / --help
  std::function<void(titans::ModelConfig&, const Base&)> apply;
};

/// The base config of `kind` blocks.
inline titans::ModelConfig base_config(const Base& b, titans::BlockKind kind) {
  titans::ModelConfig c;
  c.vocab = b.vocab;
  c.layers.assign(static_cast<std::size_t>(b.layers), kind);
  c.tied = true;
  titans::BlockConfig& k = c.block;
  k.dim = b.dim;
  k.attention_heads = b.heads;
  k.window = b.span;
  k.segment = b.span;
  k.persistent = b.persistent;
  k.attention_block = 32;
  k.memory.dim = b.dim;
  k.memory.heads = b.heads;
  k.memory.depth = b.mem_depth;
  k.memory.expansion = b.expansion;
  k.memory.chunk_size = b.chunk;
  k.memory.theta_max = b.theta_max > 0 ? b.theta_max : (b.mem_depth == 1 ? 0.8 : 0.2) / static_cast<double>(b.chunk);
  return c;
}

/// Every variant the experiments know: Table 1's models (MAC-3a beside MAC: N_l = span / 2 memory
/// tokens, as the revised paper's 256 for 512-token segments), the ablation, MIRAS's attentional
/// biases and the depth sweep.
inline std::vector<Variant> all_variants() {
  using K = titans::BlockKind;
  auto kind = [](K k) {
    return [k](titans::ModelConfig& c, const Base& b) { c = base_config(b, k); };
  };
  auto mac_with = [](std::function<void(titans::ModelConfig&, const Base&)> change) {
    return [change](titans::ModelConfig& c, const Base& b) {
      c = base_config(b, K::mac);
      change(c, b);
    };
  };
  // The attentional bias (docs/MATH.md §11): the inner loss, the library's defaults otherwise
  // (lp: p = 3, the MIRAS paper's).
  auto with_bias = [](K k, titans::AttentionalBias bias) {
    return [k, bias](titans::ModelConfig& c, const Base& b) {
      c = base_config(b, k);
      c.block.memory.bias = bias;
    };
  };
  auto depth = [&](Index L) {
    return mac_with([L](titans::ModelConfig& c, const Base& b) {
      Base d = b;
      d.mem_depth = L;
      c = base_config(d, K::mac);
    });
  };
  return {
      {"Transformer", "full causal attention over the whole context (window = context)",
       [](titans::ModelConfig& c, const Base& b) {
         c = base_config(b, K::swa);
         c.block.window = b.context;
       }},
      {"SWA", "sliding-window attention, window = span", kind(K::swa)},
      {"LMM", "the neural memory alone (no attention)", kind(K::lmm)},
      {"MAC", "memory as context: attention over [persistent | retrieved | segment]", kind(K::mac)},
      {"MAC-3a", "MAC as drawn in the paper's Figure 3a: span/2 memory tokens per segment from learned queries",
       mac_with([](titans::ModelConfig& c, const Base& b) { c.block.memory_tokens = std::max<Index>(1, b.span / 2); })},
      {"MAG", "memory as gate: SWA and memory in parallel, gated", kind(K::mag)},
      {"MAL", "memory as layer: memory, then SWA", kind(K::mal)},
      {"MAC-linear", "MAC with a linear memory (L = 1)", depth(1)},
      {"MAC-no-momentum", "MAC with eta = 0 (no momentum: each write is the current surprise alone)",
       mac_with([](titans::ModelConfig& c, const Base&) { c.block.memory.eta_max = 0; })},
      {"MAC-no-forgetting", "MAC with alpha = 0 (no forgetting: the memory never decays)",
       mac_with([](titans::ModelConfig& c, const Base&) { c.block.memory.alpha_max = 0; })},
      {"MAC-no-conv", "MAC without the causal depthwise convolution of k, v, q (kernel 1)",
       mac_with([](titans::ModelConfig& c, const Base&) { c.block.memory.conv_kernel = 1; })},
      {"MAC-no-persistent", "MAC without persistent tokens (N_p = 0)",
       mac_with([](titans::ModelConfig& c, const Base&) { c.block.persistent = 0; })},
      {"LMM-huber", "LMM with MIRAS's Huber bias (Yaad's inner loss; threshold learned per token)",
       with_bias(K::lmm, titans::AttentionalBias::huber)},
      {"LMM-huber-radial", "LMM with the Huber bias of the Euclidean norm (docs/MATH.md 11.2)",
       with_bias(K::lmm, titans::AttentionalBias::huber_radial)},
      {"LMM-lp3", "LMM with MIRAS's l3 bias (Moneta's inner loss; l2 retention, not its lq)",
       with_bias(K::lmm, titans::AttentionalBias::lp)},
      {"MAC-huber", "MAC with MIRAS's Huber bias", with_bias(K::mac, titans::AttentionalBias::huber)},
      {"MAC-huber-radial", "MAC with the radial Huber bias", with_bias(K::mac, titans::AttentionalBias::huber_radial)},
      {"MAC-lp3", "MAC with MIRAS's l3 bias", with_bias(K::mac, titans::AttentionalBias::lp)},
      {"MAC-L1", "MAC, memory depth 1", depth(1)},
      {"MAC-L2", "MAC, memory depth 2", depth(2)},
      {"MAC-L3", "MAC, memory depth 3", depth(3)},
      {"MAC-L4", "MAC, memory depth 4", depth(4)},
  };
}

inline std::string variant_names() {
  std::string s;
  for (const auto& v : all_variants()) s += (s.empty() ? "" : ", ") + v.name;
  return s;
}

/// The variants named in the comma-separated `list`; throws naming an unknown one.
inline std::vector<Variant> pick_variants(const std::string& list) {
  const std::vector<Variant> all = all_variants();
  std::vector<Variant> out;
  std::size_t from = 0;
  while (from <= list.size()) {
    const std::size_t comma = list.find(',', from);
    const std::string name = list.substr(from, comma == std::string::npos ? std::string::npos : comma - from);
    auto it = std::find_if(all.begin(), all.end(), [&](const Variant& v) { return v.name == name; });
    if (it == all.end()) throw std::invalid_argument("unknown model '" + name + "', expected one of " + variant_names());
    out.push_back(*it);
    if (comma == std::string::npos) break;
    from = comma + 1;
  }
  return out;
}

/// The configs of `variants`, each with its SwiGLU width raised so that every model has the
/// parameter count of the largest one (within one FFN column: 3·D parameters).
inline std::vector<titans::ModelConfig> equal_size_configs(const std::vector<Variant>& variants, const Base& b) {
  std::vector<titans::ModelConfig> cfgs;
  Index target = 0;
  for (const auto& v : variants) {
    titans::ModelConfig c;
    v.apply(c, b);
    c.validate(("experiments: model " + v.name).c_str());
    target = std::max(target, Model(c).parameter_count());
    cfgs.push_back(c);
  }
  for (auto& c : cfgs) {
    const Index per_column = 3 * c.block.dim * static_cast<Index>(c.layers.size());
    const Index missing = target - Model(c).parameter_count();
    c.block.ffn_hidden = c.block.ffn_width() + missing / per_column;
  }
  return cfgs;
}

/// Progress of a whole experiment: one line rewritten in place on a terminal, with the time left
/// for all of it. Work is counted in tokens x model width (a training step's tokens, a third for
/// a forward-only token), so language-model and needle steps of different sizes weigh what they cost.
class Progress {
 public:
  Progress(double total_units, bool quiet) : total_(total_units), quiet_(quiet), t0_(std::chrono::steady_clock::now()) {}

  void advance(double units, const std::string& what, bool force = false) {
    done_ += units;
    const double now = seconds_since(t0_);
    if (quiet_ || (!force && now - last_ < 2.0)) return;
    last_ = now;
    const double left = done_ > 0 ? now / done_ * std::max(0.0, total_ - done_) : 0;
    std::printf("%s%s  [%3.0f%%, %s elapsed, ~%s left]%s", tty_.start(), what.c_str(), 100 * done_ / total_,
                duration(now).c_str(), duration(left).c_str(), tty_.end(false));
    std::fflush(stdout);
  }
  /// Ends the in-place line before other output.
  void clear() const {
    if (!quiet_ && tty_.start()[0] == '\r') std::printf("\r\033[K");
  }
  double elapsed() const { return seconds_since(t0_); }

 private:
  titans_example::Progress tty_;
  double total_, done_ = 0, last_ = -10;
  bool quiet_;
  std::chrono::steady_clock::time_point t0_;
};

/// Training settings shared by the experiments.
struct TrainSettings {
  long steps = 1000;
  long batch = 8;
  double lr = 3e-3;
  double weight_decay = 0.1;
  unsigned long seed = 1;
};

/// Training losses (nats per target): the first step's and the mean of the last 10% of the steps.
struct Losses {
  double first = 0, last = 0;
};

/// Trains `params` for `s.steps` AdamW steps (warm-up 5%, cosine to lr/10, clip 1.0) on the
/// batches `make_batch(step, rng, inputs, targets)` fills. Throws NumericError if the loss stops
/// being finite.
inline Losses train(const Model& model, Params& params, const TrainSettings& s,
                    const std::function<void(long, titans::detail::Rng&, std::vector<std::vector<int>>&,
                                             std::vector<std::vector<int>>&)>& make_batch,
                    const std::function<void(long step, double loss)>& on_step) {
  titans::AdamWConfig ac;
  ac.lr = s.lr;
  ac.weight_decay = s.weight_decay;
  titans::AdamW<Params> opt(params, ac);
  const titans::CosineSchedule sched(s.lr, std::max(1L, s.steps / 20), std::max(1L, s.steps), s.lr / 10);
  titans::detail::Rng rng(s.seed * 0x9E3779B97F4A7C15ULL + 12345);
  auto grads = titans::zeros_like(params);
  std::vector<std::vector<int>> in, tg;
  Losses out;
  long tail_n = 0;
  for (long step = 0; step < s.steps; ++step) {
    make_batch(step, rng, in, tg);
    titans::set_zero(grads);
    const double loss = model.loss_and_gradient(params, in, tg, grads);
    if (!std::isfinite(loss))
      titans::detail::raise<titans::NumericError>("experiments: train", "the training loss is ", loss, " at step ", step,
                                                  "; lower --lr (now ", s.lr, ")");
    titans::clip_grad_norm(grads, 1.0);
    opt.step(params, grads, sched(step));
    if (step == 0) out.first = loss;
    if (step >= s.steps - std::max(1L, s.steps / 10)) {
      out.last += loss;
      ++tail_n;
    }
    on_step(step, loss);
  }
  out.last /= static_cast<double>(std::max(1L, tail_n));
  return out;
}

/// A results table: one row per model (or setting), named columns of numbers.
struct Table {
  std::string title;
  std::vector<std::string> columns;  ///< after the first ("model")
  std::string first = "model";
  struct Row {
    std::string name;
    std::vector<double> values;
  };
  std::vector<Row> rows;
  int digits = 3;                  ///< decimals of every column,
  std::vector<int> column_digits;  ///< unless given per column here

  std::string markdown() const {
    std::string s = "| " + first + " |";
    for (const auto& c : columns) s += " " + c + " |";
    s += "\n|:---|";
    for (std::size_t i = 0; i < columns.size(); ++i) s += "---:|";
    s += "\n";
    for (const auto& r : rows) {
      s += "| " + r.name + " |";
      for (std::size_t i = 0; i < r.values.size(); ++i) {
        const int d = i < column_digits.size() ? column_digits[i] : digits;
        s += " " + (std::isnan(r.values[i]) ? std::string("–") : titans_example::fixed(r.values[i], d)) + " |";
      }
      s += "\n";
    }
    return s;
  }
};

/// Writes `text` to `path`; throws naming the path if it cannot.
inline void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
  f.close();
  if (!f) throw std::runtime_error("experiments: could not write '" + path + "'");
}

/// A curve per model over a shared x axis, written as CSV (x, then one column per model) and
/// drawn by gnuplot when it is installed.
struct Curves {
  std::string x_name;                  ///< CSV header of the x column
  std::vector<double> x;
  std::vector<std::string> names;      ///< one per curve
  std::vector<std::vector<double>> y;  ///< y[curve][i]

  void write_csv(const std::string& path) const {
    std::string s = x_name;
    for (const auto& n : names) s += "," + n;
    s += "\n";
    for (std::size_t i = 0; i < x.size(); ++i) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.10g", x[i]);
      s += buf;
      for (const auto& c : y) {
        std::snprintf(buf, sizeof buf, ",%.6g", c[i]);
        s += buf;
      }
      s += "\n";
    }
    write_text(path, s);
  }

  /// gnuplot script for `png` from the CSV at `csv`: `setup` holds the labels, ranges, scales.
  void plot(const std::string& csv, const std::string& png, const std::string& setup, const std::string& extra = "") const {
    std::string p = "set terminal png size 900,560\nset output '" + png +
                    "'\nset datafile separator ','\nset key outside right\nset grid\n" + setup + "\nplot ";
    for (std::size_t m = 0; m < names.size(); ++m)
      p += (m ? ", " : "") + std::string("'") + csv + "' every ::1 using 1:" + std::to_string(m + 2) +
           " with linespoints lw 2 title '" + names[m] + "'";
    p += extra + "\n";
    titans_example::draw_png(p, png, csv);
  }
};

/// Output files of an experiment: <prefix>.md, <prefix>.csv, <prefix>.png ('' prefix: none).
struct Outputs {
  std::string prefix;
  bool enabled() const { return !prefix.empty(); }
  std::string md() const { return prefix + ".md"; }
  std::string csv(const std::string& part = "") const { return prefix + part + ".csv"; }
  std::string png(const std::string& part = "") const { return prefix + part + ".png"; }
};

}  // namespace titans_experiments
