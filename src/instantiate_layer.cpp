// SPDX-License-Identifier: Apache-2.0
//
// Part of the titans::compiled target: the float and double instantiations of the neural memory layer.
// Users of titans::compiled see them as `extern template`.
#include <titans/neural_memory.hpp>

namespace titans {
TITANS_INSTANTIATE_NEURAL_MEMORY(, float)
TITANS_INSTANTIATE_NEURAL_MEMORY(, double)
}  // namespace titans
