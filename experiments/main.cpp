// SPDX-License-Identifier: Apache-2.0
//
// The paper's experiments in miniature, one command per table (README, "Experiments"):
//
//   experiments table1     language modelling: bits/byte, and by position up to 16x the span
//   experiments table2     single-needle recall (passkey, number, word) at 1x..64x the span
//   experiments reach      passkey recall at 2^k spans until chance or 2M tokens, streaming
//   experiments table5     the MAC ablation: bits/byte and needle accuracy
//   experiments depth      memory depth L = 1..4: bits/byte and tokens/s
//
// Every command prints a Markdown table and writes <out>.md, <out>.csv and (with gnuplot) <out>.png.
#include "experiments.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>

namespace te = titans_experiments;

namespace {

struct Command {
  const char* name;
  const char* what;
  const char* models;  // default --models
  bool lm, needle, reach;
};

constexpr Command kCommands[] = {
    {"table1", "language modelling: validation bits/byte, overall and by position in the context",
     "Transformer,SWA,LMM,MAC,MAC-3a,MAG,MAL", true, false, false},
    {"table2", "single-needle recall (passkey; --tasks adds number, word) at 1x..64x the span", "MAC,MAC-3a,MAG,MAL,LMM,SWA", false,
     true, false},
    {"reach", "passkey recall at 2^k spans until chance or --reach-max tokens, streamed", "MAC", false, false, true},
    {"table5", "ablation of MAC: bits/byte and needle accuracy",
     "MAC,MAC-linear,MAC-no-momentum,MAC-no-forgetting,MAC-no-conv,MAC-no-persistent", true, true, false},
    {"depth", "memory depth: bits/byte and tokens/s for L = 1..4", "MAC-L1,MAC-L2,MAC-L3,MAC-L4", true, false, false},
};

void usage(const char* argv0) {
  std::printf("usage: %s COMMAND [options]\n\ncommands:\n", argv0);
  for (const auto& c : kCommands) std::printf("  %-8s %s\n           (models: %s)\n", c.name, c.what, c.models);
  std::printf(
      "\noptions (defaults finish within 20 minutes on 2 cores; README):\n"
      "  --models list        models from: %s\n"
      "  --out prefix         writes prefix.md, prefix.csv, prefix.png (default: the command's name; '' = none)\n"
      "  --seed s             initialisation, training data and evaluation data (1)\n"
      "  --quiet              no progress line      --check  exit 3 unless the results show what they should\n"
      "  language modelling:\n"
      "  --steps n            optimizer steps per model (600)   --batch n  sequences per step (8)\n"
      "  --context T          training and evaluation context in bytes (512 = 16 spans)\n"
      "  --eval-windows n     validation windows of T bytes (384)\n"
      "  --dim D --layers n --heads h --span w   model shape (64, 2, 4, 32)\n"
      "  --lr x               peak learning rate (3e-3)\n"
      "  needles:\n"
      "  --needle-steps n     optimizer steps per model (1500)  --needle-batch n (16)\n"
      "  --needle-dim D       needle model width (32; 2 layers, 2 heads, span 32 as --span)\n"
      "  --tasks list         from passkey,number,word (passkey; each task trains its own models)\n"
      "  --eval-max n         longest needle context, in spans, a power of two (64; table5: 16)\n"
      "  --eval-n n           sequences per task and context (100)\n"
      "  --train-max n        longest needle training context, in spans (24; table5: 12)\n"
      "  --warmup f           the first f of the needle steps train on one-span contexts (0.1)\n"
      "  reach:\n"
      "  --reach-max n        longest context in tokens (2000000)   --reach-n n  sequences per length (20)\n"
      "  data:\n"
      "  --python-dir path    the Python standard library (/usr/lib/python3.11)\n"
      "  --licence-dir path   the licence texts (/usr/share/common-licenses)\n",
      te::variant_names().c_str());
}

// The span-bucket edges of Table 1's columns: [0,1), [1,2), [2,4), ... spans.
std::vector<std::pair<long, long>> log_buckets(long spans) {
  std::vector<std::pair<long, long>> b{{0, 1}};
  for (long a = 1; a < spans; a *= 2) b.push_back({a, std::min(spans, 2 * a)});
  return b;
}

double mean_of(const std::vector<double>& v, long a, long b) {
  double sum = 0;
  for (long i = a; i < b; ++i) sum += v[static_cast<std::size_t>(i)];
  return sum / static_cast<double>(b - a);
}

std::string lm_title(const te::Settings& s) {
  return "validation bits/byte, " + std::to_string(s.base.layers) + " layers, D = " + std::to_string(s.base.dim) +
         ", span " + std::to_string(s.base.span) + ", context " + std::to_string(s.base.context) + ", " +
         std::to_string(s.train.steps) + " steps x " + std::to_string(s.train.batch) + " sequences, seed " +
         std::to_string(s.train.seed);
}

std::string needle_title(const te::Settings& s, const std::string& task) {
  return task + " needle accuracy, D = " + std::to_string(s.needle_base.dim) + ", span " + std::to_string(s.needle_base.span) +
         ", " + std::to_string(s.needle_train.steps) + " steps, " + std::to_string(s.eval_n) + " sequences per cell, seed " +
         std::to_string(s.needle_train.seed);
}

// Prints and writes the command's tables; the claims --check makes.
int run_tables(const Command& cmd, const te::Settings& s, const te::Corpus& corpus, const std::vector<te::Variant>& variants,
               titans_example::Claims& claims) {
  const double total = static_cast<double>(variants.size()) * ((cmd.lm ? te::lm_work(s) : 0) + (cmd.needle ? te::needle_work(s) : 0));
  te::Progress progress(total, s.quiet);
  std::vector<te::LmRow> lm;
  te::NeedleResults nd;
  if (cmd.lm) lm = te::run_lm(s, corpus, variants, progress);
  if (cmd.needle) nd = te::run_needle(s, corpus, variants, progress);
  progress.clear();
  const te::Outputs out{s.out};
  std::string md = "# experiments " + std::string(cmd.name) + "\n\ncorpus: " + corpus.describe() + "\n";
  const double unigram = te::unigram_bits(corpus.train);
  const long spans = s.base.context / s.base.span;
  const auto buckets = log_buckets(spans);
  auto section = [&](const te::Table& t) {
    md += "\n## " + t.title + "\n\n" + t.markdown();
    std::printf("\n%s\n%s", t.title.c_str(), t.markdown().c_str());
  };

  if (std::strcmp(cmd.name, "table1") == 0) {
    te::Table t;
    t.title = lm_title(s) + " (by position: positions [a, b) x span)";
    t.columns = {"parameters", "train tokens/s", "bits/byte"};
    t.column_digits = {0, 0, 3};
    for (const auto& [a, b] : buckets) t.columns.push_back(std::to_string(a) + "-" + std::to_string(b) + "x");
    for (const auto& r : lm) {
      te::Table::Row row{r.name, {static_cast<double>(r.params), r.train_tokens_per_s, r.bits}};
      for (const auto& [a, b] : buckets) row.values.push_back(mean_of(r.by_span, a, b));
      t.rows.push_back(row);
    }
    section(t);
    const std::string note = "(the byte frequencies of the training split alone: " + titans_example::fixed(unigram) + " bits/byte)\n";
    md += "\n" + note;
    std::printf("%s", note.c_str());
    te::Curves c{"position", {}, {}, {}};
    for (long i = 0; i < spans; ++i) c.x.push_back((static_cast<double>(i) + 0.5) * static_cast<double>(s.base.span));
    for (const auto& r : lm) {
      c.names.push_back(r.name);
      c.y.push_back(r.by_span);
    }
    // SWA's prediction depends only on the last span of bytes (past the first span), so its curve
    // is the text's own difficulty at each position; each model minus SWA removes it.
    const auto swa = std::find_if(lm.begin(), lm.end(), [](const te::LmRow& r) { return r.name == "SWA"; });
    te::Curves d{"position", c.x, {}, {}};
    if (swa != lm.end())
      for (const auto& r : lm) {
        if (&r == &*swa) continue;
        d.names.push_back(r.name);
        d.y.emplace_back();
        for (std::size_t i = 0; i < r.by_span.size(); ++i) d.y.back().push_back(r.by_span[i] - swa->by_span[i]);
      }
    if (out.enabled() && !d.names.empty()) {
      d.write_csv(out.csv("_vs_swa"));
      d.plot(out.csv("_vs_swa"), out.png("_vs_swa"),
             "set xlabel 'position in the context (bytes)'\nset ylabel 'bits/byte minus SWA at the same positions'\n"
             "set title 'Each model against sliding-window attention (span " + std::to_string(s.base.span) + ")'\n"
             "set arrow from " + std::to_string(s.base.span) + ", graph 0 to " + std::to_string(s.base.span) +
                 ", graph 1 nohead dt 3",
             ", 0 with lines dt 2 lc rgb 'black' title 'SWA'");
    }
    if (out.enabled()) {
      c.write_csv(out.csv());
      c.plot(out.csv(), out.png(),
             "set xlabel 'position in the context (bytes)'\nset ylabel 'validation bits/byte'\nset title 'Bits per byte by "
             "position (attention span " + std::to_string(s.base.span) + ")'\nset arrow from " + std::to_string(s.base.span) +
                 ", graph 0 to " + std::to_string(s.base.span) + ", graph 1 nohead dt 3");
    }
  }

  if (std::strcmp(cmd.name, "table2") == 0) {
    for (std::size_t k = 0; k < nd.tasks.size(); ++k) {
      te::Table t;
      t.title = needle_title(s, nd.tasks[k]);
      t.columns = {"parameters"};
      t.column_digits = {0};
      for (long m : nd.multiples) {
        t.columns.push_back(std::to_string(m) + "x");
        t.column_digits.push_back(2);
      }
      te::Curves c{"context", {}, {}, {}};
      for (long x : nd.contexts) c.x.push_back(static_cast<double>(x));
      for (const auto& r : nd.rows) {
        te::Table::Row row{r.name, {static_cast<double>(r.params)}};
        for (double a : r.accuracy[k]) row.values.push_back(a);
        t.rows.push_back(row);
        c.names.push_back(r.name);
        c.y.push_back(r.accuracy[k]);
      }
      section(t);
      if (out.enabled()) {
        c.write_csv(out.csv("_" + nd.tasks[k]));
        c.plot(out.csv("_" + nd.tasks[k]), out.png("_" + nd.tasks[k]),
               "set logscale x 2\nset xlabel 'context (tokens)'\nset ylabel 'accuracy'\nset yrange [0:1.05]\nset title '" +
                   nd.tasks[k] + " needle (span " + std::to_string(s.needle_base.span) + ")'");
      }
    }
  }

  if (std::strcmp(cmd.name, "table5") == 0 || std::strcmp(cmd.name, "depth") == 0) {
    const bool depth = std::strcmp(cmd.name, "depth") == 0;
    te::Table t;
    t.title = depth ? lm_title(s) : "MAC ablation: " + lm_title(s) + "; needle accuracy averaged over 1x.." +
                                        std::to_string(s.eval_max) + "x the span";
    t.columns = {"parameters", "bits/byte", std::to_string(buckets.back().first) + "-" + std::to_string(spans) + "x"};
    t.column_digits = {0, 3, 3};
    if (depth) {
      t.columns.insert(t.columns.end(), {"train tokens/s", "eval tokens/s"});
      t.column_digits.insert(t.column_digits.end(), {0, 0});
    }
    for (const auto& task : nd.tasks) {
      t.columns.push_back(task);
      t.column_digits.push_back(2);
    }
    te::Curves c{"position", {}, {}, {}};
    for (long i = 0; i < spans; ++i) c.x.push_back((static_cast<double>(i) + 0.5) * static_cast<double>(s.base.span));
    for (std::size_t m = 0; m < lm.size(); ++m) {
      const auto& r = lm[m];
      te::Table::Row row{r.name, {static_cast<double>(r.params), r.bits, mean_of(r.by_span, buckets.back().first, spans)}};
      if (depth) row.values.insert(row.values.end(), {r.train_tokens_per_s, r.eval_tokens_per_s});
      if (cmd.needle)
        for (const auto& a : nd.rows[m].accuracy) row.values.push_back(mean_of(a, 0, static_cast<long>(a.size())));
      t.rows.push_back(row);
      c.names.push_back(r.name);
      c.y.push_back(r.by_span);
    }
    section(t);
    if (out.enabled()) {
      c.write_csv(out.csv());
      c.plot(out.csv(), out.png(),
             "set xlabel 'position in the context (bytes)'\nset ylabel 'validation bits/byte'\nset title '" +
                 std::string(depth ? "Memory depth" : "MAC ablation") + ": bits per byte by position'");
    }
  }

  // What a short run must show: training taught every model something (a broken gradient or
  // data pipeline leaves the validation loss at the untrained model's, about 8 bits/byte).
  for (const auto& r : lm) {
    const double first = r.train_loss.first / te::kLn2;
    claims.expect(r.bits < 0.85 * first, r.name + "'s validation bits/byte " + titans_example::fixed(r.bits) +
                                             " is below 0.85 x its first training step's " + titans_example::fixed(first));
  }
  for (const auto& r : nd.rows)
    for (std::size_t k = 0; k < r.train_loss.size(); ++k)
      claims.expect(r.train_loss[k].last < r.train_loss[k].first,
                    r.name + "'s " + nd.tasks[k] + " training loss fell: " + titans_example::fixed(r.train_loss[k].first) +
                        " -> " + titans_example::fixed(r.train_loss[k].last));
  if (out.enabled()) {
    te::write_text(out.md(), md);
    std::printf("wrote %s (and the CSV / PNG beside it)\n", out.md().c_str());
  }
  std::printf("%.0f s in all\n", progress.elapsed());
  return claims.status();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argv[1][0] == '-') {
    if (argc >= 2 && (std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0)) {
      usage(argv[0]);
      return 0;
    }
    titans_example::Cli("experiments", [&] { usage(argv[0]); })
        .fail(argc < 2 ? "a command is needed" : std::string("unknown option ") + argv[1] + " (a command comes first)");
  }
  const Command* cmd = nullptr;
  for (const auto& c : kCommands)
    if (std::strcmp(argv[1], c.name) == 0) cmd = &c;
  titans_example::Cli cli(std::string("experiments ") + argv[1], [&] { usage(argv[0]); });
  if (!cmd) cli.fail(std::string("unknown command '") + argv[1] + "'");

  te::Settings s;
  s.models = cmd->models;
  s.out = cmd->name;
  s.needle_base.dim = 32;
  s.needle_base.heads = 2;
  s.needle_base.theta_max = 0.12;  // examples/niah.cpp's
  s.needle_train.steps = 1500;
  s.needle_train.batch = 16;
  s.needle_train.weight_decay = 0;
  s.train.steps = 600;
  s.train.batch = 8;
  if (std::strcmp(cmd->name, "table5") == 0) {
    // [choice] Six models each trained twice (text and needle) do not fit 20 minutes with
    // table2's needle curriculum; contexts up to 12 spans in training and 16 in evaluation do
    // (README).
    s.train_max = 12;
    s.eval_max = 16;
  }
  long span = 32;
  cli.text("--models", s.models)
      .text("--out", s.out, /*allow_empty=*/true)
      .integer("--seed", s.train.seed, 0, 2147483647L)
      .flag("--quiet", s.quiet)
      .flag("--check", s.check)
      .integer("--steps", s.train.steps, 1, 10000000)
      .integer("--batch", s.train.batch, 1, 4096)
      .integer("--context", s.base.context, 8, 1 << 20)
      .integer("--eval-windows", s.eval_windows, 1, 100000)
      .integer("--dim", s.base.dim, 4, 4096)
      .integer("--layers", s.base.layers, 1, 64)
      .integer("--heads", s.base.heads, 1, 64)
      .integer("--span", span, 4, 1 << 16)
      .real("--lr", s.train.lr, 0, 1, /*lo_open=*/true)
      .integer("--needle-steps", s.needle_train.steps, 1, 10000000)
      .integer("--needle-batch", s.needle_train.batch, 1, 4096)
      .integer("--needle-dim", s.needle_base.dim, 4, 4096)
      .text("--tasks", s.tasks)
      .integer("--eval-max", s.eval_max, 1, 1 << 16)
      .integer("--eval-n", s.eval_n, 1, 1000000)
      .integer("--train-max", s.train_max, 1, 1024)
      .real("--warmup", s.warmup, 0, 0.5)
      .integer("--reach-max", s.reach_max_tokens, 64, 1L << 31)
      .integer("--reach-n", s.reach_n, 1, 100000)
      .text("--python-dir", s.corpus.python_dir)
      .text("--licence-dir", s.corpus.licence_dir);
  cli.parse(argc - 1, argv + 1);
  s.base.span = s.needle_base.span = span;
  s.needle_train.seed = s.train.seed;
  s.needle_train.lr = s.train.lr;
  if ((s.eval_max & (s.eval_max - 1)) != 0) cli.fail("--eval-max must be a power of two");
  if (s.base.dim % s.base.heads != 0 || (s.base.dim / s.base.heads) % 2 != 0)
    cli.fail("--heads must divide --dim into an even head width");
  if (s.needle_base.dim % s.needle_base.heads != 0 || (s.needle_base.dim / s.needle_base.heads) % 2 != 0)
    cli.fail("--needle-dim must be a multiple of 4 (2 heads of even width)");
  if (s.base.context < span) cli.fail("--context must be at least --span");

  std::vector<te::Variant> variants;
  try {
    variants = te::pick_variants(s.models);
    te::needle_tasks(s.tasks);
  } catch (const std::invalid_argument& e) {
    cli.fail(e.what());
  }

  titans_example::Claims claims(std::string("experiments ") + cmd->name, s.check);
  try {
    const te::Corpus corpus = te::load_corpus(s.corpus);
    std::printf("experiments %s: corpus %s\n", cmd->name, corpus.describe().c_str());
    std::fflush(stdout);
    if (cmd->reach) return te::run_reach(s, corpus, variants);
    return run_tables(*cmd, s, corpus, variants, claims);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "experiments %s: error: %s\n", cmd->name, e.what());
    return 1;
  }
}
