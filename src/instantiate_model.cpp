// SPDX-License-Identifier: Apache-2.0
//
// Part of the titans::compiled target: the float and double instantiations of the language model, its loss and generation.
// Users of titans::compiled see them as `extern template`.
#include <titans/model.hpp>

namespace titans {
TITANS_INSTANTIATE_MODEL(, float)
TITANS_INSTANTIATE_MODEL(, double)
}  // namespace titans
