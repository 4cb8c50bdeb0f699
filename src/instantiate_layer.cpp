// SPDX-License-Identifier: Apache-2.0
//
// Part of the titans::compiled target: the instantiations, for the scalar type TITANS_SCALAR (float
// or double: the target compiles each file once for each), of the neural memory layer.
// Users of titans::compiled see them as `extern template`.
#include <titans/neural_memory.hpp>

namespace titans {
TITANS_INSTANTIATE_NEURAL_MEMORY(, TITANS_SCALAR)
}  // namespace titans
