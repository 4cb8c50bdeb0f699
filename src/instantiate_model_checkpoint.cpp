// SPDX-License-Identifier: Apache-2.0
//
// Part of the titans::compiled target: the float and double instantiations of save_model and load_model (needs nlohmann-json).
// Users of titans::compiled see them as `extern template`.
#include <titans/model_checkpoint.hpp>

namespace titans {
TITANS_INSTANTIATE_MODEL_CHECKPOINT(, float)
TITANS_INSTANTIATE_MODEL_CHECKPOINT(, double)
}  // namespace titans
