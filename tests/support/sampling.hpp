// Large numeric checks under the sanitizers.
//
// A finite-difference gradient check runs the whole forward twice per entry checked. Under
// AddressSanitizer + UBSan (the asan preset) that costs ~10x, and the extra entries find nothing
// the sanitizers care about: every entry runs the same code on the same buffers. So in a
// sanitized build gradient checks look at a random sample of kGradCheckSampleEntries entries per
// tensor (and of the input), chosen by GradCheckOptions::seed; the release build checks every
// entry.
#pragma once

#include <titans/train/gradcheck.hpp>
#include <titans/parameters.hpp>

#include <algorithm>

namespace titans_test {

#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kSanitized = true;
#else
inline constexpr bool kSanitized = false;
#endif
#else
inline constexpr bool kSanitized = false;
#endif

/// Entries per tensor a gradient check looks at in a sanitized build.
inline constexpr titans::Index kGradCheckSampleEntries = 6;

/// `opt` with max_entries set to the sample size in a sanitized build (unchanged otherwise).
inline titans::GradCheckOptions sampled(titans::GradCheckOptions opt) {
  if (kSanitized && opt.max_entries < 0) opt.max_entries = kGradCheckSampleEntries;
  return opt;
}

/// How many entries gradient_check(params, x, ..., opt) compares: every entry of every tensor (and
/// of x when opt.check_input), or at most opt.max_entries of each.
template <class P>
titans::Index expected_checked(const P& params, const titans::Matrix<double>& x, const titans::GradCheckOptions& opt) {
  auto per_tensor = [&](titans::Index n) { return opt.max_entries >= 0 ? std::min(n, opt.max_entries) : n; };
  titans::Index n = 0;
  params.for_each([&](const std::string&, const titans::Matrix<double>& t) { n += per_tensor(t.size()); });
  if (opt.check_input) n += per_tensor(x.size());
  return n;
}

}  // namespace titans_test
