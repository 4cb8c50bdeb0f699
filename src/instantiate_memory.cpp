// SPDX-License-Identifier: Apache-2.0
//
// Part of the titans::compiled target: the instantiations, for the scalar type TITANS_SCALAR (float
// or double: the target compiles each file once for each), of the memory model,
// the chunked kernel and its backward. Users of titans::compiled see them as `extern template`.
#include <titans/memory/backward.hpp>
#include <titans/memory/kernel.hpp>
#include <titans/memory/model.hpp>

namespace titans {
TITANS_INSTANTIATE_MEMORY_MODEL(, TITANS_SCALAR)
TITANS_INSTANTIATE_MEMORY_KERNEL(, TITANS_SCALAR)
TITANS_INSTANTIATE_MEMORY_BACKWARD(, TITANS_SCALAR)
}  // namespace titans
