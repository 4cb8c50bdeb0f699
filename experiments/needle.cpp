// SPDX-License-Identifier: Apache-2.0
//
// Single-needle recall in the manner of RULER's S-NIAH, three kinds of needle:
//   passkey  "NEEDLE key v" with v one of 16 value tokens, in a haystack of random printable
//            bytes; the question "QUERY key" is answered by v (one token, chance 1/16);
//   number   "NEEDLE key d d d d": a 4-digit number (bytes '0'..'9') in random printable bytes;
//            the answer is the four digits (exact match, chance 1e-4);
//   word     "NEEDLE key w o r d END": a word of 4-8 letters taken from the corpus, hidden in
//            real text (a window of the corpus, whose own words are distractors); the answer is
//            the word's letters and END (exact match).
// A fresh model is trained on each task with the curriculum of the niah example (one-span contexts first, then longer ones), then evaluated per task at 1, 2, 4,
// ... eval_max times the span. The answer is read teacher-forced: it is right when the argmax at
// every answer position is the next answer token (the same as greedy decoding being right).
#include "experiments.hpp"

#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <set>

namespace titans_experiments {

namespace {

// Tokens: the 256 bytes, then NEEDLE, QUERY, END, 16 keys, 16 passkey values.
constexpr int kNeedle = 256, kQuery = 257, kEnd = 258, kKeys = 16, kValues = 16;
constexpr int key_token(int k) { return 259 + k; }
constexpr int value_token(int v) { return 259 + kKeys + v; }
constexpr int kVocab = 259 + kKeys + kValues;

enum class Task { passkey, number, word };

const char* task_name(Task t) {
  switch (t) {
    case Task::passkey: return "passkey";
    case Task::number: return "number";
    case Task::word: return "word";
  }
  return "?";
}

struct Example {
  std::vector<int> tokens, targets;  // targets: −1 except at the answer positions
};

// The words a word needle can carry: the distinct runs of 4-8 lowercase letters of `text`.
std::vector<std::string> words_of(const std::vector<unsigned char>& text) {
  std::set<std::string> words;
  std::string cur;
  for (unsigned char c : text) {
    if (c >= 'a' && c <= 'z') {
      cur += static_cast<char>(c);
      continue;
    }
    if (cur.size() >= 4 && cur.size() <= 8) words.insert(cur);
    cur.clear();
  }
  return {words.begin(), words.end()};
}

struct Generator {
  const std::vector<unsigned char>* text = nullptr;  // word haystacks: the split to draw from
  const std::vector<std::string>* words = nullptr;

  // The value tokens of a needle of `task` (the answer, in order).
  std::vector<int> value(Task task, titans::detail::Rng& rng) const {
    std::vector<int> v;
    switch (task) {
      case Task::passkey: v.push_back(value_token(static_cast<int>(rng.below(kValues)))); break;
      case Task::number:
        for (int i = 0; i < 4; ++i) v.push_back('0' + static_cast<int>(rng.below(10)));
        break;
      case Task::word: {
        const std::string& w = (*words)[static_cast<std::size_t>(rng.below(words->size()))];
        for (char c : w) v.push_back(static_cast<unsigned char>(c));
        v.push_back(kEnd);
        break;
      }
    }
    return v;
  }

  // The haystack token at `i` of a sequence whose haystack starts at `origin` (word: real text).
  int hay(Task task, std::size_t origin, std::size_t i, titans::detail::Rng& rng) const {
    if (task == Task::word) return (*text)[(origin + i) % text->size()];
    return 32 + static_cast<int>(rng.below(95));  // printable ASCII
  }

  // The shortest sequence that holds a needle and its question (the longest value).
  static long min_length() { return 2 * (2 + 9) + 2; }

  Example make(Task task, long length, titans::detail::Rng& rng) const {
    length = std::max(length, min_length());
    const int key = key_token(static_cast<int>(rng.below(kKeys)));
    const std::vector<int> v = value(task, rng);
    const long needle = 2 + static_cast<long>(v.size()), question = needle;
    const std::size_t origin = task == Task::word ? static_cast<std::size_t>(rng.below(text->size())) : 0;
    Example e;
    e.tokens.resize(static_cast<std::size_t>(length));
    for (long i = 0; i < length; ++i) e.tokens[static_cast<std::size_t>(i)] = hay(task, origin, static_cast<std::size_t>(i), rng);
    const long room = length - question - needle;
    const long at = static_cast<long>(rng.below(static_cast<std::uint64_t>(room + 1)));
    auto put = [&](long pos, bool with_targets) {
      e.tokens[static_cast<std::size_t>(pos)] = pos == at ? kNeedle : kQuery;
      e.tokens[static_cast<std::size_t>(pos + 1)] = key;
      for (std::size_t j = 0; j < v.size(); ++j) e.tokens[static_cast<std::size_t>(pos) + 2 + j] = v[j];
      if (with_targets)
        for (std::size_t j = 0; j < v.size(); ++j) e.targets[static_cast<std::size_t>(pos) + 1 + j] = v[j];
    };
    e.targets.assign(e.tokens.size(), -1);
    put(at, false);
    put(length - question, true);
    return e;
  }
};

// Whether every answer position's argmax is its target.
bool answered(const titans::Matrix<float>& logits, const std::vector<int>& targets) {
  for (std::size_t t = 0; t < targets.size(); ++t) {
    if (targets[t] < 0) continue;
    Index best = 0;
    logits.col(static_cast<Index>(t)).maxCoeff(&best);
    if (best != targets[t]) return false;
  }
  return true;
}

// The curriculum of examples/niah.cpp: one span for the first `warmup` of the steps (attention
// sees the needle: the lookup forms), then contexts of 2 .. (4 growing to train_max) spans over
// the next half.
std::pair<long, long> training_spans(const Settings& s, long step) {
  const double f = static_cast<double>(step) / static_cast<double>(std::max(1L, s.needle_train.steps));
  if (f < s.warmup) return {1, 1};
  const long first = std::min(s.train_max, 4L);
  const double g = std::min(1.0, (f - s.warmup) / 0.5);
  return {std::min(2L, s.train_max), first + static_cast<long>(std::lround(g * static_cast<double>(s.train_max - first)))};
}

// Progress units (experiments.hpp): tokens x width of training, a third of that for a forward.
double eval_units(const Settings& s, std::size_t tasks) {
  double tokens = 0;
  for (long m = 1; m <= s.eval_max; m *= 2) tokens += static_cast<double>(std::max(m * s.needle_base.span, Generator::min_length()));
  return tokens * static_cast<double>(s.eval_n * s.needle_base.dim) * static_cast<double>(tasks) / 3.0;
}
// The expected tokens x width of training step `step` (the curriculum's mean length), and of all.
double step_units(const Settings& s, long step) {
  const auto [lo, hi] = training_spans(s, step);
  return 0.5 * static_cast<double>((lo + hi) * s.needle_base.span * s.needle_train.batch * s.needle_base.dim);
}
double train_units(const Settings& s) {
  double units = 0;
  for (long step = 0; step < s.needle_train.steps; ++step) units += step_units(s, step);
  return units;
}

// A fresh model trained on needles of `task`.
Params train_needles(const Settings& s, const Model& model, const std::string& name, Task task,
                     const Generator& gen, Progress& progress, double& tokens_per_s, Losses* losses = nullptr) {
  Params params = model.init(s.needle_train.seed);
  const Index span = s.needle_base.span;
  double shown = 0, tokens = 0;
  const auto t0 = std::chrono::steady_clock::now();
  const Losses l = train(
      model, params, s.needle_train,
      [&](long step, titans::detail::Rng& rng, std::vector<std::vector<int>>& in, std::vector<std::vector<int>>& tg) {
        in.clear();
        tg.clear();
        const auto [lo, hi] = training_spans(s, step);
        for (long k = 0; k < s.needle_train.batch; ++k) {
          const long spans = lo + static_cast<long>(rng.below(static_cast<std::uint64_t>(hi - lo + 1)));
          Example e = gen.make(task, spans * span, rng);
          tokens += static_cast<double>(e.tokens.size());
          in.push_back(std::move(e.tokens));
          tg.push_back(std::move(e.targets));
        }
      },
      [&](long step, double loss) {
        shown = step == 0 ? loss : 0.95 * shown + 0.05 * loss;
        char what[160];
        std::snprintf(what, sizeof what, "[%s] needle step %ld/%ld, loss %.3f", name.c_str(), step + 1, s.needle_train.steps, shown);
        progress.advance(step_units(s, step), what, step + 1 == s.needle_train.steps);
      });
  tokens_per_s = tokens / seconds_since(t0);
  if (losses) *losses = l;
  return params;
}

// Accuracy over `n` fresh sequences of `length` tokens.
double accuracy(const Model& model, const Params& params, const Generator& gen, Task task, long length, long n,
                std::uint64_t seed) {
  titans::detail::Rng rng(seed);
  std::vector<Example> ex;
  for (long i = 0; i < n; ++i) ex.push_back(gen.make(task, length, rng));
  std::vector<int> ok(ex.size(), 0);
  titans::detail::for_each_head(static_cast<Index>(ex.size()), [&](Index i) {
    auto state = model.initial_state(params);
    const auto& e = ex[static_cast<std::size_t>(i)];
    ok[static_cast<std::size_t>(i)] = answered(model.forward(params, e.tokens, state), e.targets);
  });
  long right = 0;
  for (int v : ok) right += v;
  return static_cast<double>(right) / static_cast<double>(n);
}

// The word list and the generators of training (haystacks from the training split) and
// evaluation (from the validation split) needles.
struct Needles {
  explicit Needles(const Corpus& c) : corpus(&c), words(words_of(c.train)) {
    if (words.empty()) throw std::runtime_error("experiments: the corpus has no words for the word needle");
  }
  Generator train() const { return {&corpus->train, &words}; }
  Generator eval() const { return {&corpus->validation, &words}; }

  const Corpus* corpus;
  std::vector<std::string> words;
};

Base with_needle_vocab(Base b) {
  b.vocab = kVocab;
  return b;
}

}  // namespace

std::vector<std::string> needle_tasks(const std::string& list) {
  std::vector<std::string> out;
  std::size_t from = 0;
  while (true) {
    const std::size_t comma = list.find(',', from);
    const std::string t = list.substr(from, comma == std::string::npos ? std::string::npos : comma - from);
    if (t != "passkey" && t != "number" && t != "word")
      throw std::invalid_argument("unknown needle task '" + t + "', expected passkey, number or word");
    out.push_back(t);
    if (comma == std::string::npos) break;
    from = comma + 1;
  }
  return out;
}

double needle_work(const Settings& s) {
  const auto tasks = static_cast<double>(needle_tasks(s.tasks).size());
  return tasks * train_units(s) + eval_units(s, needle_tasks(s.tasks).size());
}

NeedleResults run_needle(const Settings& s, const Corpus& corpus, const std::vector<Variant>& variants, Progress& progress) {
  NeedleResults r;
  r.tasks = needle_tasks(s.tasks);
  std::vector<Task> tasks;
  for (const auto& name : r.tasks)
    for (Task t : {Task::passkey, Task::number, Task::word})
      if (name == task_name(t)) tasks.push_back(t);
  for (long m = 1; m <= s.eval_max; m *= 2) {
    r.multiples.push_back(m);
    r.contexts.push_back(std::max(m * s.needle_base.span, Generator::min_length()));
  }
  const Needles nd(corpus);
  const std::vector<titans::ModelConfig> cfgs = equal_size_configs(variants, with_needle_vocab(s.needle_base));
  const double per_eval = eval_units(s, tasks.size()) / static_cast<double>(r.contexts.size() * tasks.size());
  for (std::size_t m = 0; m < variants.size(); ++m) {
    const Model model(cfgs[m]);
    NeedleRow row;
    row.name = variants[m].name;
    row.params = model.parameter_count();
    // One model per task. [choice] Trained on tasks mixed (one task per sequence), MAC learns
    // passkey + number together with the batch's token-mean loss but not with a per-sequence
    // mean, and with the word in the mix it learns none of the three (README, Table 2).
    for (std::size_t k = 0; k < tasks.size(); ++k) {
      double tps = 0;
      Losses l;
      const Params params = train_needles(s, model, row.name + ", " + r.tasks[k], tasks[k], nd.train(), progress, tps, &l);
      row.train_tokens_per_s += tps / static_cast<double>(tasks.size());
      row.train_loss.push_back(l);
      row.accuracy.emplace_back();
      for (std::size_t i = 0; i < r.contexts.size(); ++i) {
        row.accuracy.back().push_back(
            accuracy(model, params, nd.eval(), tasks[k], r.contexts[i], s.eval_n, s.needle_train.seed * 1000 + 17 * k + i));
        progress.advance(per_eval, "[" + row.name + "] " + r.tasks[k] + " at " + std::to_string(r.contexts[i]) + " tokens");
      }
    }
    r.rows.push_back(std::move(row));
  }
  return r;
}

int run_reach(const Settings& s, const Corpus& corpus, const std::vector<Variant>& variants) {
  const Index span = s.needle_base.span;
  const long piece = 4096;  // tokens per forward call: the state carries the rest
  const Needles nd(corpus);
  Progress progress(train_units(s) * static_cast<double>(variants.size()), s.quiet);
  const std::vector<titans::ModelConfig> cfgs = equal_size_configs(variants, with_needle_vocab(s.needle_base));
  const double chance = 1.0 / kValues;
  // Recall has reached chance when the accuracy is within two binomial standard deviations of it.
  const double at_chance = chance + 2 * std::sqrt(chance * (1 - chance) / static_cast<double>(s.reach_n));
  std::vector<long> lengths;
  for (long len = span; len <= s.reach_max_tokens; len *= 2) lengths.push_back(len);
  // acc[m][k], tps[m][k]: NaN where model m had fallen to chance before length k.
  std::vector<std::vector<double>> acc, tps;
  for (std::size_t m = 0; m < variants.size(); ++m) {
    const Model model(cfgs[m]);
    double train_tps = 0;
    const Params params = train_needles(s, model, variants[m].name, Task::passkey, nd.train(), progress, train_tps);
    progress.clear();
    acc.emplace_back(lengths.size(), std::nan(""));
    tps.emplace_back(lengths.size(), std::nan(""));
    std::printf("%s: passkey recall, %ld sequences per length, streamed in pieces of %ld tokens\n", variants[m].name.c_str(),
                s.reach_n, piece);
    for (std::size_t k = 0; k < lengths.size(); ++k) {
      const long len = lengths[k];
      titans::detail::Rng rng(s.needle_train.seed * 7777 + k);
      std::vector<std::uint64_t> seeds;
      for (long i = 0; i < s.reach_n; ++i) seeds.push_back(rng.next_u64());
      std::vector<int> ok(seeds.size(), 0);
      const auto t0 = std::chrono::steady_clock::now();
      // Each sequence is drawn token by token as it is fed, one piece at a time (never held
      // whole): the haystack of random printable bytes, "NEEDLE key value" at a uniform depth,
      // "QUERY key" at the end, whose prediction is the answer.
      titans::detail::for_each_head(static_cast<Index>(seeds.size()), [&](Index i) {
        titans::detail::Rng r(seeds[static_cast<std::size_t>(i)]);
        const int key = key_token(static_cast<int>(r.below(kKeys)));
        const int value = value_token(static_cast<int>(r.below(kValues)));
        const long at = static_cast<long>(r.below(static_cast<std::uint64_t>(len - 5)));
        auto state = model.initial_state(params);
        std::vector<int> chunk;
        for (long from = 0; from < len; from += piece) {
          const long n = std::min(piece, len - from);
          chunk.resize(static_cast<std::size_t>(n));
          for (long j = 0; j < n; ++j) {
            const long t = from + j;
            int tok = 32 + static_cast<int>(r.below(95));
            if (t == at) tok = kNeedle;
            if (t == at + 1 || t == len - 1) tok = key;
            if (t == at + 2) tok = value;
            if (t == len - 2) tok = kQuery;
            chunk[static_cast<std::size_t>(j)] = tok;
          }
          const titans::Matrix<float> logits = model.forward(params, chunk, state);
          if (from + n == len) {
            Index best = 0;
            logits.col(n - 1).maxCoeff(&best);
            ok[static_cast<std::size_t>(i)] = best == value;
          }
        }
      });
      long right = 0;
      for (int v : ok) right += v;
      acc[m][k] = static_cast<double>(right) / static_cast<double>(s.reach_n);
      tps[m][k] = static_cast<double>(len) * static_cast<double>(s.reach_n) / seconds_since(t0);
      rusage ru{};
      getrusage(RUSAGE_SELF, &ru);
      std::printf("  %9ld tokens (%6ld x span): accuracy %.2f, %.0f tokens/s, peak resident memory %.0f MiB\n", len, len / span,
                  acc[m][k], tps[m][k], static_cast<double>(ru.ru_maxrss) / 1024.0);
      std::fflush(stdout);
      if (acc[m][k] <= at_chance) break;
    }
  }
  // The table and curves over the lengths some model reached.
  std::size_t reached = 0;
  for (const auto& a : acc)
    for (std::size_t k = 0; k < a.size(); ++k)
      if (!std::isnan(a[k])) reached = std::max(reached, k + 1);
  Table table;
  table.title = "Passkey recall by context length (span " + std::to_string(span) + ")";
  table.first = "context (tokens)";
  Curves ca{"context", {}, {}, {}}, cs{"context", {}, {}, {}};
  for (const auto& v : variants) {
    table.columns.push_back(v.name + " accuracy");
    table.columns.push_back(v.name + " tokens/s");
    table.column_digits.push_back(2);
    table.column_digits.push_back(0);
    ca.names.push_back(v.name);
    cs.names.push_back(v.name);
  }
  ca.y.resize(variants.size());
  cs.y.resize(variants.size());
  for (std::size_t k = 0; k < reached; ++k) {
    table.rows.push_back({std::to_string(lengths[k]), {}});
    ca.x.push_back(static_cast<double>(lengths[k]));
    cs.x.push_back(static_cast<double>(lengths[k]));
    for (std::size_t m = 0; m < variants.size(); ++m) {
      table.rows.back().values.push_back(acc[m][k]);
      table.rows.back().values.push_back(tps[m][k]);
      ca.y[m].push_back(acc[m][k]);
      cs.y[m].push_back(tps[m][k]);
    }
  }
  std::printf("\n%s\n%s(chance %.3f; a blank: the model had fallen to chance at a shorter context)\n", table.title.c_str(),
              table.markdown().c_str(), chance);
  if (!s.out.empty()) {
    const Outputs out{s.out};
    write_text(out.md(), "## " + table.title + "\n\n" + corpus.describe() + "\n\n" + table.markdown());
    ca.write_csv(out.csv());
    cs.write_csv(out.csv("_speed"));
    std::printf("wrote %s, %s, %s\n", out.md().c_str(), out.csv().c_str(), out.csv("_speed").c_str());
    ca.plot(out.csv(), out.png(),
            "set logscale x 2\nset format x '2^{%L}'\nset xlabel 'context (tokens)'\nset ylabel 'passkey accuracy'\n"
            "set yrange [0:1.05]\nset title '" + table.title + "'",
            ", " + std::to_string(chance) + " with lines dt 2 title 'chance'");
  }
  return 0;
}

}  // namespace titans_experiments
