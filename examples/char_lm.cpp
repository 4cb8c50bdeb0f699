// SPDX-License-Identifier: Apache-2.0
//
// A character-level language model on a text file: a Titans model (any block kind) trained with
// AdamW, gradient clipping and a warmup + cosine schedule on random windows of the first 90% of
// the file, evaluated on fixed windows of the last 10%. At the end it saves a checkpoint with the
// model's config in its metadata, reloads it into a model built from that metadata alone, checks
// that the reloaded model gives the same validation loss, and samples text from it.
//
// Vocabulary: the 256 byte values (token = byte), so any file works and a checkpoint needs no
// vocabulary beside it; bytes that never occur simply keep low probability.
//
// The memory is deep by default (--memory-depth 2) with the layer's bounded updates (normalised
// residual read-out, surprise clamp, eta <= eta_max; docs/MATH.md §8), which keep its test-time
// updates finite whatever values the gates take; --memory-depth 1 gives the linear memory.
//
//   char_lm                                   # GPL-3 text, two MAC blocks, well under a minute on 2 cores
//   char_lm --text notes.txt --block mag --layers 3 --steps 2000 --sample 500
#include <titans/titans.hpp>

#include "cli.hpp"

#if !defined(TITANS_NO_CHECKPOINT) && __has_include(<nlohmann/json.hpp>)
#define CHAR_LM_CHECKPOINTS 1
#else
#define CHAR_LM_CHECKPOINTS 0
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {

constexpr int kVocab = 256;

struct Options {
  std::string text = "/usr/share/common-licenses/GPL-3";
  std::string block = "mac";
  long layers = 2;
  long dim = 64;
  long heads = 4;
  long window = 32;
  long segment = 32;
  long chunk = 4;           // memory chunk size b (tokens per inner gradient step)
  long expansion = 2;       // memory hidden width E·d
  long depth = 2;           // memory MLP depth (1 = linear memory)
  double theta_max = 0;     // cap of the memory's inner step size θ; 0 = auto (see usage)
  long seq = 128;
  long batch = 8;
  long steps = 600;
  double lr = 3e-3;
  double weight_decay = 0.1;
  unsigned long long seed = 1;
  long eval_every = 100;
  long log_every = 50;
  long val_windows = 16;
  std::string checkpoint = "char_lm.safetensors";
  bool save = true;
  long sample = 300;
  double temperature = 0.8;
  long top_k = 20;
  std::string prompt;  // empty: the start of a line of the validation text
  bool check = false;  // exit 3 unless training lowered the validation loss
};

void usage(const char* argv0) {
  std::printf(
      "usage: %s [options]\n"
      "  Trains a character-level (byte) Titans language model on a text file, reports the\n"
      "  validation loss in nats and bits per character, saves and reloads a checkpoint, and\n"
      "  samples text. Training uses random windows of the first 90%% of the file, validation\n"
      "  fixed windows of the last 10%%.\n"
      "\n"
      "  --text PATH         training text (default /usr/share/common-licenses/GPL-3)\n"
      "  --block KIND        lmm | mac | mag | mal | swa (default mac)\n"
      "  --layers n          number of blocks (default 2)\n"
      "  --dim D             model width (default 64)\n"
      "  --heads h           attention and memory heads; D/h must be even (default 4)\n"
      "  --window w          sliding-window size of mag/mal/swa (default 32)\n"
      "  --segment C         MAC segment length (default 32)\n"
      "  --chunk b           neural-memory chunk size (default 4)\n"
      "  --memory-depth L    neural-memory MLP depth, 1 = linear (default 2; see below)\n"
      "  --expansion E       neural-memory hidden width E*D/heads (default 2)\n"
      "  --theta-max x       cap of the memory's inner step size (default 0.8/b for a linear\n"
      "                      memory, 0.2/b for a deeper one; see below)\n"
      "  --seq T             training sequence length (default 128)\n"
      "  --batch B           sequences per step (default 8)\n"
      "  --steps n           optimizer steps (default 600)\n"
      "  --lr x              peak learning rate (default 3e-3; warmup 5%%, cosine to lr/10)\n"
      "  --weight-decay x    AdamW decoupled weight decay of the matrices (default 0.1)\n"
      "  --seed s            seeds the initialisation, the training windows and sampling (default 1)\n"
      "  --eval-every n      validation loss every n steps (default 100)\n"
      "  --log-every n       a progress line every n steps (default 50)\n"
      "  --val-windows n     validation windows of length T (default 16; fewer if the text is short)\n"
      "  --checkpoint PATH   where to save the trained model (default char_lm.safetensors)\n"
      "  --no-checkpoint     do not save (nor reload) a checkpoint\n"
      "  --sample n          characters to sample at the end (default 300; 0 = none)\n"
      "  --temperature x     sampling temperature, 0 = greedy (default 0.8)\n"
      "  --top-k k           sample among the k likeliest bytes, 0 = all (default 20)\n"
      "  --prompt TEXT       prompt for sampling (default: a line start of the validation text)\n"
      "  --check             exit with status 3 unless training lowered the validation loss\n"
      "                      (what the tests assert)\n"
      "  --help              this text\n"
      "\n"
      "  The memory's inner loop takes a step of up to theta-max on b tokens at a time. Its\n"
      "  updates are bounded for any step (normalised read-out, surprise clamp, momentum cap;\n"
      "  docs/MATH.md section 8); theta-max sets how fast it writes. More steps than the default\n"
      "  overfit the 35 kB GPL-3 text (the validation loss rises again).\n"
      "  Checkpoints are %s in this build.\n",
      argv0, CHAR_LM_CHECKPOINTS ? "available" : "NOT available (needs nlohmann/json)");
}

// A bad setting found after parsing (the text file, the model config).
[[noreturn]] void bad(const std::string& msg) {
  std::fprintf(stderr, "char_lm: %s (see --help)\n", msg.c_str());
  std::exit(2);
}

Options parse_args(int argc, char** argv) {
  Options o;
  constexpr long big = 1L << 30;
  titans_example::Cli cli("char_lm", [&] { usage(argv[0]); });
  cli.text("--text", o.text)
      .text("--block", o.block)
      .integer("--layers", o.layers, 1, 64)
      .integer("--dim", o.dim, 2, 4096)
      .integer("--heads", o.heads, 1, 4096)
      .integer("--window", o.window, 1, big)
      .integer("--segment", o.segment, 1, big)
      .integer("--chunk", o.chunk, 1, 1L << 16)
      .integer("--memory-depth", o.depth, 1, 8)
      .integer("--expansion", o.expansion, 1, 64)
      .real("--theta-max", o.theta_max, 0, 100, /*lo_open=*/true)
      .integer("--seq", o.seq, 1, 1L << 20)
      .integer("--batch", o.batch, 1, 1L << 16)
      .integer("--steps", o.steps, 1, big)
      .real("--lr", o.lr, 0, 1, /*lo_open=*/true)
      .real("--weight-decay", o.weight_decay, 0, 10)
      .integer("--seed", o.seed, 0, std::numeric_limits<long>::max())
      .integer("--eval-every", o.eval_every, 1, big)
      .integer("--log-every", o.log_every, 1, big)
      .integer("--val-windows", o.val_windows, 1, 1L << 16)
      .custom("--checkpoint",
              [&](const std::string& v) {
                if (v.empty()) cli.fail("--checkpoint needs a non-empty path (or use --no-checkpoint)");
                const std::filesystem::path dir = std::filesystem::path(v).parent_path();
                std::error_code ec;
                if (!dir.empty() && !std::filesystem::is_directory(dir, ec))
                  cli.fail("--checkpoint " + v + ": the directory '" + dir.string() + "' does not exist");
                o.checkpoint = v;
              })
      .flag("--no-checkpoint", o.save, false)
      .integer("--sample", o.sample, 0, 1L << 24)
      .real("--temperature", o.temperature, 0, 100)
      .integer("--top-k", o.top_k, 0, kVocab)
      .text("--prompt", o.prompt)
      .flag("--check", o.check);
  cli.parse(argc, argv);
  if (o.block != "lmm" && o.block != "mac" && o.block != "mag" && o.block != "mal" && o.block != "swa")
    cli.fail("--block is '" + o.block + "', expected one of lmm, mac, mag, mal, swa");
  if (o.dim % o.heads != 0 || (o.dim / o.heads) % 2 != 0)
    cli.fail("--heads " + std::to_string(o.heads) + " with --dim " + std::to_string(o.dim) +
             ": the head width dim/heads must be a whole even number");
  return o;
}

std::vector<int> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) bad("cannot open --text file '" + path + "'");
  std::vector<char> raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) bad("reading --text file '" + path + "' failed");
  std::vector<int> out(raw.size());
  for (std::size_t i = 0; i < raw.size(); ++i) out[i] = static_cast<unsigned char>(raw[i]);
  return out;
}

// Printable ASCII as is, newlines kept, everything else (and the backslash) escaped.
std::string escaped(const std::vector<int>& bytes) {
  std::string s;
  for (int b : bytes) {
    if (b == '\\') s += "\\\\";
    else if (b == '\n' || (b >= 0x20 && b < 0x7f)) s += static_cast<char>(b);
    else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", b);
      s += buf;
    }
  }
  return s;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string duration(double s) {
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%.1fs", s);
  else std::snprintf(buf, sizeof buf, "%ldm%02lds", static_cast<long>(s) / 60, static_cast<long>(s) % 60);
  return buf;
}

constexpr double kLn2 = 0.69314718055994530942;

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse_args(argc, argv);
  const std::vector<int> text = read_bytes(o.text);

  // Split: first 90% for training, last 10% for validation.
  const long n = static_cast<long>(text.size());
  const long split = n - n / 10;
  const long train_len = split, val_len = n - split;
  if (train_len < o.seq + 1 || val_len < o.seq + 1)
    bad("--text file '" + o.text + "' has " + std::to_string(n) + " bytes; with --seq " + std::to_string(o.seq) +
        " it needs at least " + std::to_string(10 * (o.seq + 1)) + " (both splits must hold one window)");
  // Fixed validation windows, spread evenly over the validation part.
  const long n_val = std::min(o.val_windows, std::max(1L, (val_len - 1) / o.seq));
  std::vector<std::vector<int>> val_in, val_tg;
  for (long w = 0; w < n_val; ++w) {
    const long start = split + (n_val == 1 ? 0 : w * ((val_len - 1 - o.seq) / (n_val - 1)));
    val_in.emplace_back(text.begin() + start, text.begin() + start + o.seq);
    val_tg.emplace_back(text.begin() + start + 1, text.begin() + start + o.seq + 1);
  }
  // Reference: the entropy of the training part's byte frequencies (what a model without context gets).
  double unigram_bits = 0;
  {
    std::vector<double> count(kVocab, 0);
    for (long i = 0; i < split; ++i) count[static_cast<std::size_t>(text[static_cast<std::size_t>(i)])] += 1;
    for (double c : count)
      if (c > 0) unigram_bits -= c / split * std::log2(c / split);
  }

  titans::ModelConfig cfg;
  cfg.vocab = kVocab;
  cfg.layers.assign(static_cast<std::size_t>(o.layers), titans::block_kind_from_string(o.block));
  cfg.tied = true;
  titans::BlockConfig& b = cfg.block;
  b.dim = o.dim;
  b.attention_heads = o.heads;
  b.window = o.window;
  b.segment = o.segment;
  b.persistent = 4;
  b.memory.dim = o.dim;
  b.memory.heads = o.heads;
  b.memory.depth = o.depth;
  b.memory.expansion = o.expansion;
  b.memory.chunk_size = o.chunk;
  b.memory.theta_max = o.theta_max;
  if (b.memory.theta_max == 0) b.memory.theta_max = (o.depth == 1 ? 0.8 : 0.2) / static_cast<double>(o.chunk);
  try {
    cfg.validate("char_lm");
  } catch (const titans::InvalidArgument& e) {
    bad(std::string("invalid model settings: ") + e.what());
  }

  titans_example::Claims claims("char_lm", o.check);
  try {
    using Model = titans::TitansModel<float>;
    using Params = titans::ModelParams<float>;
    const Model model(cfg);
    Params params = model.init(o.seed);
    auto grads = titans::zeros_like(params);
    titans::AdamWConfig acfg;
    acfg.lr = o.lr;
    acfg.weight_decay = o.weight_decay;
    titans::AdamW<Params> opt(params, acfg);
    const titans::CosineSchedule schedule(o.lr, std::max(1L, o.steps / 20), o.steps, o.lr / 10);
    titans::detail::Rng rng(o.seed * 0x9E3779B97F4A7C15ULL + 12345);

    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    std::printf("char_lm: %s, %ld bytes (%ld train / %ld validation, %ld windows of %ld), vocabulary = 256 bytes\n",
                o.text.c_str(), n, train_len, val_len, n_val, o.seq);
    std::printf("model: %ld x %s, D %ld, %ld heads, window %ld, segment %ld, memory depth %ld chunk %ld "
                "expansion %ld theta_max %g, %ld parameters; %d thread%s\n",
                o.layers, o.block.c_str(), o.dim, o.heads, o.window, o.segment, o.depth, o.chunk, o.expansion, b.memory.theta_max,
                static_cast<long>(titans::parameter_count(params)), threads, threads == 1 ? "" : "s");
    std::printf("training: %ld steps x %ld sequences x %ld tokens, AdamW lr %.2g (cosine to lr/10), weight decay %g, clip 1.0, seed %llu\n",
                o.steps, o.batch, o.seq, o.lr, o.weight_decay, o.seed);
    std::printf("reference: uniform over 256 bytes = 8.000 bits/char, byte frequencies (unigram) = %.3f bits/char\n",
                unigram_bits);
    const double val0 = model.loss(params, val_in, val_tg);
    std::printf("initial validation loss %.4f nats (%.3f bits/char)\n", val0, val0 / kLn2);
    std::fflush(stdout);

    const auto t0 = std::chrono::steady_clock::now();
    double train_sum = 0, last_val = val0, best_val = val0;
    long train_count = 0, tokens = 0, best_step = 0;
    std::vector<std::vector<int>> in(static_cast<std::size_t>(o.batch)), tg(static_cast<std::size_t>(o.batch));
    for (long step = 0; step < o.steps; ++step) {
      for (long k = 0; k < o.batch; ++k) {
        const long start = static_cast<long>(rng.below(static_cast<std::uint64_t>(train_len - o.seq)));
        in[static_cast<std::size_t>(k)].assign(text.begin() + start, text.begin() + start + o.seq);
        tg[static_cast<std::size_t>(k)].assign(text.begin() + start + 1, text.begin() + start + o.seq + 1);
      }
      titans::set_zero(grads);
      const double loss = model.loss_and_gradient(params, in, tg, grads);
      if (!std::isfinite(loss)) {
        std::fprintf(stderr, "char_lm: the training loss is %g at step %ld; try a smaller --lr\n", loss, step);
        return 1;
      }
      const double gnorm = titans::clip_grad_norm(grads, 1.0);
      const double lr = schedule(step);
      opt.step(params, grads, lr);
      tokens += o.batch * o.seq;
      train_sum += loss;
      ++train_count;

      const bool last = step + 1 == o.steps;
      const bool eval = (step + 1) % o.eval_every == 0 || last;
      if (eval) {
        last_val = model.loss(params, val_in, val_tg);
        if (last_val < best_val) {
          best_val = last_val;
          best_step = step + 1;
        }
      }
      if (eval || (step + 1) % o.log_every == 0) {
        const double secs = seconds_since(t0);
        const double left = secs / static_cast<double>(step + 1) * static_cast<double>(o.steps - step - 1);
        const double tr = train_sum / static_cast<double>(train_count);
        char val[64] = "";
        if (eval) std::snprintf(val, sizeof val, "  val %.4f (%.3f bpc)", last_val, last_val / kLn2);
        std::printf("step %5ld/%ld  train %.4f (%.3f bpc)%s  lr %.2e  |g| %.2f  %.0f tok/s  elapsed %s  left %s\n",
                    step + 1, o.steps, tr, tr / kLn2, val, lr, gnorm, static_cast<double>(tokens) / secs,
                    duration(secs).c_str(), duration(left).c_str());
        std::fflush(stdout);
        train_sum = 0;
        train_count = 0;
      }
    }
    const double train_secs = seconds_since(t0);
    std::printf("\ntrained %ld steps in %s (%.0f tokens/s)\n", o.steps, duration(train_secs).c_str(),
                static_cast<double>(tokens) / train_secs);
    std::printf("validation loss: %.4f -> %.4f nats, %.3f -> %.3f bits/char (best %.3f at step %ld; unigram %.3f)\n",
                val0, last_val, val0 / kLn2, last_val / kLn2, best_val / kLn2, best_step, unigram_bits);
    claims.expect(last_val < val0, "training lowered the validation loss: " + titans_example::fixed(val0 / kLn2) +
                                       " -> " + titans_example::fixed(last_val / kLn2) + " bits/char");

    // The model that samples: the reloaded one when checkpoints are available.
    const Model* sampler = &model;
    const Params* sampler_params = &params;
#if CHAR_LM_CHECKPOINTS
    std::unique_ptr<titans::LoadedModel<float>> reloaded;
    if (o.save) {
      titans::save_model(o.checkpoint, model, params,
                         {{"char_lm.vocabulary", "bytes"},
                          {"char_lm.steps", std::to_string(o.steps)},
                          {"char_lm.text", o.text},
                          {"char_lm.val_loss", std::to_string(last_val)}});
      // Rebuild the model from the file alone: config from its metadata, then the tensors.
      reloaded = std::make_unique<titans::LoadedModel<float>>(titans::load_model<float>(o.checkpoint));
      const Model& model2 = reloaded->model;
      const Params& reloaded_params = reloaded->params;
      const double val2 = model2.loss(reloaded_params, val_in, val_tg);
      const bool same = std::abs(val2 - last_val) <= 1e-6 * std::max(1.0, std::abs(last_val));
      std::printf("checkpoint: saved %s (%ld tensors); reloaded from its metadata (%s blocks, D %ld): validation loss "
                  "%.6f vs %.6f %s\n",
                  o.checkpoint.c_str(), static_cast<long>(titans::parameter_names(params).size()),
                  reloaded->metadata.at("model.layers").c_str(), static_cast<long>(reloaded->config.block.dim), val2,
                  last_val,
                  same ? "(same)" : "(DIFFERENT)");
      if (!same) {
        std::fprintf(stderr, "char_lm: the reloaded model's validation loss differs\n");
        return 1;
      }
      sampler = &model2;
      sampler_params = &reloaded_params;
    } else {
      std::printf("checkpoint: not saved (--no-checkpoint)\n");
    }
#else
    std::printf("checkpoint: not available in this build (needs nlohmann/json)\n");
#endif

    if (o.sample > 0) {
      std::vector<int> prompt;
      if (!o.prompt.empty()) {
        for (char c : o.prompt) prompt.push_back(static_cast<unsigned char>(c));
      } else {  // the start of a line in the validation text, up to 40 bytes
        long p0 = split;
        for (long i = split; i < n - 1; ++i)
          if (text[static_cast<std::size_t>(i)] == '\n' && text[static_cast<std::size_t>(i) + 1] != '\n') {
            p0 = i + 1;
            break;
          }
        const long len = std::min(40L, n - p0);
        prompt.assign(text.begin() + p0, text.begin() + p0 + len);
      }
      auto state = sampler->initial_state(*sampler_params);
      const titans::SamplingOptions so{o.temperature, static_cast<titans::Index>(o.top_k), o.seed};
      const auto t1 = std::chrono::steady_clock::now();
      const std::vector<int> out = titans::generate(*sampler, *sampler_params, state, prompt, o.sample, so);
      const double gen_secs = seconds_since(t1);
      std::printf("\nsample (temperature %g, top-k %ld, %ld characters in %.2fs; prompt in [brackets]):\n[%s]%s\n",
                  o.temperature, o.top_k, o.sample, gen_secs, escaped(prompt).c_str(), escaped(out).c_str());
    }
  } catch (const titans::NumericError& e) {
    std::fprintf(stderr,
                 "char_lm: error: %s\n  (a non-finite value: the memory's inner loop or the training diverged; try a "
                 "smaller --lr or --theta-max)\n",
                 e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "char_lm: error: %s\n", e.what());
    return 1;
  }
  return claims.status();
}
