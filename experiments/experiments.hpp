// SPDX-License-Identifier: Apache-2.0
//
// The two measurements every table is made of, and the command-line settings they share:
//   - language modelling on the corpus (corpus.hpp): validation bits per byte, overall and by
//     position in the context (lm.cpp);
//   - single-needle recall (RULER-style passkey, number and word needles): accuracy by context
//     length (needle.cpp).
// main.cpp composes them into one command per table.
#pragma once

#include "corpus.hpp"
#include "runner.hpp"

#include <string>
#include <vector>

namespace titans_experiments {

/// Settings of a whole command (parsed in main.cpp; each command sets its own defaults first).
struct Settings {
  Base base;                 ///< language-modelling models
  TrainSettings train;       ///< language-modelling training
  Base needle_base;          ///< needle models
  TrainSettings needle_train;  ///< needle training
  CorpusPaths corpus;
  std::string models;        ///< comma-separated variant names
  std::string out;           ///< output prefix ('' = no files)
  bool quiet = false;
  bool check = false;
  // language modelling
  long eval_windows = 384;   ///< validation windows of `base.context` bytes (the position curves need many)
  // needles
  long eval_max = 64;        ///< longest needle context, in spans (a power of two)
  long eval_n = 100;         ///< needle sequences per context and task
  /// The needles (passkey, number, word). [choice] Only the passkey by default: each task trains
  /// its own models, and three tasks take three times the 20-minute budget (README).
  std::string tasks = "passkey";
  long train_max = 24;       ///< longest needle training context, in spans
  double warmup = 0.1;       ///< fraction of the needle steps at one-span contexts (examples/niah.cpp)
  // reach
  long reach_max_tokens = 2000000;
  long reach_n = 20;         ///< sequences per context length
};

/// One model's language-modelling result.
struct LmRow {
  std::string name;
  Index params = 0;
  double bits = 0;                  ///< validation bits per byte over every position
  std::vector<double> by_span;      ///< bits per byte at positions [i·span, (i+1)·span)
  double train_tokens_per_s = 0, eval_tokens_per_s = 0;
  Losses train_loss;
};

/// Trains and evaluates every variant on the corpus (one after the other); `progress` counts
/// lm_work(s) units per model.
std::vector<LmRow> run_lm(const Settings& s, const Corpus& corpus, const std::vector<Variant>& variants, Progress& progress);
double lm_work(const Settings& s);

/// One model's needle result: accuracy[task][context index].
struct NeedleRow {
  std::string name;
  Index params = 0;
  std::vector<std::vector<double>> accuracy;
  double train_tokens_per_s = 0;
  std::vector<Losses> train_loss;  ///< per task (each task trains its own model)
};
struct NeedleResults {
  std::vector<std::string> tasks;
  std::vector<long> multiples;  ///< contexts in spans: 1, 2, 4, ... eval_max
  std::vector<long> contexts;   ///< in tokens (a context is at least one needle and its question long)
  std::vector<NeedleRow> rows;
};

std::vector<std::string> needle_tasks(const std::string& list);  ///< throws naming an unknown task
NeedleResults run_needle(const Settings& s, const Corpus& corpus, const std::vector<Variant>& variants, Progress& progress);
double needle_work(const Settings& s);

/// Bits per byte of the training split's byte frequencies (a model that learned nothing about
/// context does no better).
double unigram_bits(const std::vector<unsigned char>& text);

/// Trains each variant on the passkey needle and evaluates it at 2^k spans until its
/// accuracy falls to chance or the context reaches reach_max_tokens, streaming.
int run_reach(const Settings& s, const Corpus& corpus, const std::vector<Variant>& variants);

}  // namespace titans_experiments
