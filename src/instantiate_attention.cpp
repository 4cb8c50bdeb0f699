// SPDX-License-Identifier: Apache-2.0
//
// Part of the titans::compiled target: the float and double instantiations of attention.
// Users of titans::compiled see them as `extern template`.
#include <titans/attention.hpp>

namespace titans {
TITANS_INSTANTIATE_ATTENTION(, float)
TITANS_INSTANTIATE_ATTENTION(, double)
}  // namespace titans
