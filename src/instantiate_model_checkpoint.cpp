// SPDX-License-Identifier: Apache-2.0
//
// Part of the titans::compiled target: the instantiations, for the scalar type TITANS_SCALAR (float
// or double: the target compiles each file once for each), of save_model and load_model (needs nlohmann-json).
// Users of titans::compiled see them as `extern template`.
#include <titans/model_checkpoint.hpp>

namespace titans {
TITANS_INSTANTIATE_MODEL_CHECKPOINT(, TITANS_SCALAR)
}  // namespace titans
