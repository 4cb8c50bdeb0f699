// SPDX-License-Identifier: Apache-2.0
//
// Part of the titans::compiled target: the instantiations, for the scalar type TITANS_SCALAR (float
// or double: the target compiles each file once for each), of the language model, its loss and generation.
// Users of titans::compiled see them as `extern template`.
#include <titans/model.hpp>

namespace titans {
TITANS_INSTANTIATE_MODEL(, TITANS_SCALAR)
}  // namespace titans
