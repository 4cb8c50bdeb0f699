// SPDX-License-Identifier: Apache-2.0
//
// Part of the titans::compiled target: the float and double instantiations of the blocks and the block stack.
// Users of titans::compiled see them as `extern template`.
#include <titans/blocks.hpp>

namespace titans {
TITANS_INSTANTIATE_BLOCKS(, float)
TITANS_INSTANTIATE_BLOCKS(, double)
}  // namespace titans
