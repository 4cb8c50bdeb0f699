// SPDX-License-Identifier: Apache-2.0
//
// Part of the titans::compiled target: the instantiations, for the scalar type TITANS_SCALAR (float
// or double: the target compiles each file once for each), of the blocks and the block stack.
// Users of titans::compiled see them as `extern template`.
#include <titans/blocks.hpp>

namespace titans {
TITANS_INSTANTIATE_BLOCKS(, TITANS_SCALAR)
}  // namespace titans
