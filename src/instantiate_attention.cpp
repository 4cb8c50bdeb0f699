// SPDX-License-Identifier: Apache-2.0
//
// Part of the titans::compiled target: the instantiations, for the scalar type TITANS_SCALAR (float
// or double: the target compiles each file once for each), of attention.
// Users of titans::compiled see them as `extern template`.
#include <titans/attention.hpp>

namespace titans {
TITANS_INSTANTIATE_ATTENTION(, TITANS_SCALAR)
}  // namespace titans
