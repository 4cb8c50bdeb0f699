// SPDX-License-Identifier: Apache-2.0
//
// Command-line parsing shared by the examples. Each option is declared with where its value goes
// and what it accepts; parse() fills them in, or stops the program with a message that names the
// option and what it expects (exit code 2). --help / -h prints the usage and exits 0.
//
//   titans_example::Cli cli("niah", [&] { usage(argv[0]); });
//   cli.integer("--steps", o.steps, 0, 10000000).real("--lr", o.lr, 0, 1, /*lo_open=*/true);
//   cli.parse(argc, argv);
//   if (o.eval_max % 2 != 0) cli.fail("--eval-max must be a power of two");
#pragma once

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

namespace titans_example {

class Cli {
 public:
  /// `program` prefixes every message; `usage` prints the help text (for --help).
  Cli(std::string program, std::function<void()> usage) : program_(std::move(program)), usage_(std::move(usage)) {}
  Cli(const Cli&) = delete;  // the declared options refer back to this object
  Cli& operator=(const Cli&) = delete;

  /// `name value`: an integer in [lo, hi].
  template <class Int>
  Cli& integer(const std::string& name, Int& dst, long long lo, long long hi) {
    return add(name, true, [this, name, &dst, lo, hi](const std::string& v) {
      dst = static_cast<Int>(parse_integer(name, v, lo, hi));
    });
  }

  /// `name value`: a finite number in [lo, hi], or (lo, hi] with lo_open.
  Cli& real(const std::string& name, double& dst, double lo, double hi, bool lo_open = false) {
    return add(name, true, [this, name, &dst, lo, hi, lo_open](const std::string& v) {
      dst = parse_real(name, v, lo, hi, lo_open);
    });
  }

  /// `name value`: any non-empty text, or any text at all with allow_empty.
  Cli& text(const std::string& name, std::string& dst, bool allow_empty = false) {
    return add(name, true, [this, name, &dst, allow_empty](const std::string& v) {
      if (v.empty() && !allow_empty) fail(name + " needs a non-empty value");
      dst = v;
    });
  }

  /// A bare `name` (no value) sets dst to `value`.
  Cli& flag(const std::string& name, bool& dst, bool value = true) {
    return add(name, false, [&dst, value](const std::string&) { dst = value; });
  }

  /// `name a,b,c`: a non-empty comma-separated list of integers, each in [lo, hi].
  template <class Int>
  Cli& integers(const std::string& name, std::vector<Int>& dst, long long lo, long long hi) {
    return add(name, true, [this, name, &dst, lo, hi](const std::string& v) {
      dst.clear();
      std::size_t from = 0;
      while (true) {
        const std::size_t comma = v.find(',', from);
        const std::string item = v.substr(from, comma == std::string::npos ? std::string::npos : comma - from);
        dst.push_back(static_cast<Int>(parse_integer(name, item, lo, hi)));
        if (comma == std::string::npos) break;
        from = comma + 1;
      }
    });
  }

  /// `name value` handled by `handle`, which may call fail().
  Cli& custom(const std::string& name, std::function<void(const std::string&)> handle) {
    return add(name, true, std::move(handle));
  }

  void parse(int argc, char** argv) const {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--help" || a == "-h") {
        usage_();
        std::exit(0);
      }
      const Option* opt = nullptr;
      for (const Option& o : options_)
        if (o.name == a) opt = &o;
      if (!opt) fail(a.rfind("--", 0) == 0 ? "unknown option " + a : "unexpected argument '" + a + "'");
      if (!opt->takes_value) {
        opt->set(std::string());
        continue;
      }
      if (i + 1 >= argc) fail(a + " needs a value");
      opt->set(argv[++i]);
    }
  }

  /// Stops the program: "<program>: <message> (see --help)" on stderr, exit code 2.
  [[noreturn]] void fail(const std::string& message) const {
    std::fprintf(stderr, "%s: %s (see --help)\n", program_.c_str(), message.c_str());
    std::exit(2);
  }

 private:
  struct Option {
    std::string name;
    bool takes_value;
    std::function<void(const std::string&)> set;
  };

  Cli& add(const std::string& name, bool takes_value, std::function<void(const std::string&)> set) {
    options_.push_back({name, takes_value, std::move(set)});
    return *this;
  }

  static std::string number(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", v);
    return buf;
  }

  long long parse_integer(const std::string& name, const std::string& s, long long lo, long long hi) const {
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || end != s.c_str() + s.size() || errno == ERANGE)
      fail(name + " expects an integer, got '" + s + "'");
    if (v < lo || v > hi)
      fail(name + " is " + s + ", expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return v;
  }

  double parse_real(const std::string& name, const std::string& s, double lo, double hi, bool lo_open) const {
    char* end = nullptr;
    errno = 0;
    const double v = std::strtod(s.c_str(), &end);
    if (s.empty() || end != s.c_str() + s.size() || errno == ERANGE || !std::isfinite(v))
      fail(name + " expects a finite number, got '" + s + "'");
    if ((lo_open ? !(v > lo) : !(v >= lo)) || !(v <= hi))
      fail(name + " is " + s + ", expected a number in " + (lo_open ? "(" : "[") + number(lo) + ", " + number(hi) +
           "]");
    return v;
  }

  std::string program_;
  std::function<void()> usage_;
  std::vector<Option> options_;
};

/// What an example's output claims, checked when it runs with --check (as its ctest test does):
/// each claim is printed with its figures (to stderr when it does not hold), and status() is 3 if
/// any failed: a test fails when the program runs but no longer shows what it says it shows.
///
///   titans_example::Claims claims("niah", o.check);
///   claims.expect(mac > swa, "MAC above SWA beyond the window: MAC " + fixed(mac) + ", SWA " + fixed(swa));
///   return claims.status();
class Claims {
 public:
  Claims(std::string program, bool enabled) : program_(std::move(program)), enabled_(enabled) {}

  void expect(bool holds, const std::string& claim) {
    if (enabled_) claims_.push_back({holds, claim});
  }

  /// Prints the claims (after the program's own output); 0 when every one held (or --check was
  /// not given), else 3.
  int status() const {
    if (!enabled_) return 0;
    int failed = 0;
    std::printf("\ncheck:\n");
    for (const auto& [holds, claim] : claims_) {
      std::printf("  %s: %s\n", holds ? "holds" : "FAILS", claim.c_str());
      failed += holds ? 0 : 1;
    }
    std::fflush(stdout);
    if (failed > 0) {
      std::fprintf(stderr, "%s: check failed: %d of %zu claims do not hold\n", program_.c_str(), failed, claims_.size());
      return 3;
    }
    std::printf("all %zu claims hold\n", claims_.size());
    return 0;
  }

 private:
  std::string program_;
  bool enabled_;
  std::vector<std::pair<bool, std::string>> claims_;
};

/// x with `digits` decimals, for the claims' messages.
inline std::string fixed(double x, int digits = 3) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, x);
  return buf;
}

/// Progress lines: on a terminal one line rewritten in place ("\r", cleared to its end), else a
/// full line per update (logs and pipes keep every line).
///
///   std::printf("%sstep %ld%s", progress.start(), step, progress.end(last));
class Progress {
 public:
  Progress() : tty_(isatty(fileno(stdout)) != 0) {}
  const char* start() const { return tty_ ? "\r" : ""; }
  const char* end(bool last) const { return !tty_ ? "\n" : last ? "\033[K\n" : "\033[K"; }

 private:
  bool tty_;
};

/// `s` in lower case (ASCII), for CSV column names.
inline std::string lower(std::string s) {
  for (char& c : s)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return s;
}

/// Draws `png` by piping the gnuplot script `plot` to gnuplot (no file is left behind). Without
/// gnuplot it says so, and how to get the plot from `csv` later. Returns whether `png` was written.
inline bool draw_png(const std::string& plot, const std::string& png, const std::string& csv) {
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    std::printf("no plot: gnuplot is not installed (sudo apt-get install gnuplot-nox, then run again; the table is in %s)\n",
                csv.c_str());
    return false;
  }
  FILE* g = popen("gnuplot", "w");
  if (g == nullptr) {
    std::fprintf(stderr, "could not start gnuplot; the table is in %s\n", csv.c_str());
    return false;
  }
  const bool written = std::fputs(plot.c_str(), g) >= 0;
  if (pclose(g) != 0 || !written) {
    std::fprintf(stderr, "gnuplot failed; the table is in %s\n", csv.c_str());
    return false;
  }
  std::printf("wrote %s\n", png.c_str());
  return true;
}

}  // namespace titans_example
