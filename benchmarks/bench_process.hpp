// SPDX-License-Identifier: Apache-2.0
//
// \file bench_process.hpp
// \brief What the benchmarks read about their own process: minor page faults (Eigen's GEMM
// allocates its packing buffers per product, and an allocator that hands them back to the OS
// every time makes each product fault them in again; README, "Power-of-two sizes") and the
// resident set size, current and peak.
#pragma once

#if defined(__unix__) || defined(__APPLE__)
#include <sys/resource.h>
#define TITANS_BENCH_HAVE_RUSAGE 1
#endif

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace titans_bench {

/// Minor page faults of the process so far (0 where getrusage is unavailable).
inline double minor_faults() {
#ifdef TITANS_BENCH_HAVE_RUSAGE
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_minflt);
#else
  return 0;
#endif
}

/// Resets the process's peak resident set size (Linux: "5" to /proc/self/clear_refs); false
/// where that is not possible.
inline bool reset_peak_rss() {
  std::FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (!f) return false;
  const bool ok = std::fputs("5", f) >= 0;
  return std::fclose(f) == 0 && ok;
}

/// A "Vm…:" line of /proc/self/status in MiB, -1 where unavailable.
inline double status_mib(const char* key) {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return -1;
  char line[256];
  double kib = -1;
  const std::size_t n = std::strlen(key);
  while (std::fgets(line, sizeof line, f))
    if (std::strncmp(line, key, n) == 0) kib = std::atof(line + n);
  std::fclose(f);
  return kib < 0 ? -1 : kib / 1024.0;
}

/// Peak resident set size of the process in MiB (VmHWM), -1 where unavailable.
inline double peak_rss_mib() { return status_mib("VmHWM:"); }

/// Current resident set size of the process in MiB (VmRSS), -1 where unavailable.
inline double rss_mib() { return status_mib("VmRSS:"); }

}  // namespace titans_bench
