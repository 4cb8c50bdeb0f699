// SPDX-License-Identifier: Apache-2.0
//
// Part of the titans::compiled target: the float and double instantiations of the memory model,
// the chunked kernel and its backward. Users of titans::compiled see them as `extern template`.
#include <titans/memory_backward.hpp>
#include <titans/memory_kernel.hpp>
#include <titans/memory_model.hpp>

namespace titans {
TITANS_INSTANTIATE_MEMORY_MODEL(, float)
TITANS_INSTANTIATE_MEMORY_MODEL(, double)
TITANS_INSTANTIATE_MEMORY_KERNEL(, float)
TITANS_INSTANTIATE_MEMORY_KERNEL(, double)
TITANS_INSTANTIATE_MEMORY_BACKWARD(, float)
TITANS_INSTANTIATE_MEMORY_BACKWARD(, double)
}  // namespace titans
