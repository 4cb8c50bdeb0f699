// SPDX-License-Identifier: Apache-2.0
//
// \file model_checkpoint.hpp
// \brief A whole TitansModel in one safetensors file: its parameters, with the ModelConfig in the
// file's metadata, so that load_model rebuilds the model from the file alone.
//
//     titans::save_model("lm.safetensors", model, params, {{"run.steps", "600"}});
//     auto loaded = titans::load_model<float>("lm.safetensors");   // .config, .model, .params, .metadata
//     auto logits = loaded.model.forward(loaded.params, tokens, state);
//
// Needs nlohmann-json, as checkpoint.hpp does.
#pragma once

#include "checkpoint.hpp"
#include "model.hpp"

#include <map>
#include <string>
#include <utility>

namespace titans {

/// \brief A model read back by load_model.
template <class Scalar>
struct LoadedModel {
  ModelConfig config;                            ///< rebuilt from the file's metadata
  TitansModel<Scalar> model;                     ///< built from `config`
  ModelParams<Scalar> params;                    ///< every tensor read from the file
  std::map<std::string, std::string> metadata;   ///< all of the file's metadata (config keys included)
};

/// \brief Saves `params` with `model`'s config in the metadata, plus the caller's `extra` keys
/// (run information, a vocabulary name, …). Throws ShapeError if the parameters do not fit the
/// model, InvalidArgument if an extra key is one of the config's, IoError if the file cannot be
/// written (an existing file is replaced only once the new one is complete).
template <class Scalar>
void save_model(const std::string& path, const TitansModel<Scalar>& model, const ModelParams<Scalar>& params,
                const std::map<std::string, std::string>& extra = {}) {
  constexpr const char* where = "titans::save_model";
  model.check_params(params, where);
  std::map<std::string, std::string> metadata = to_metadata(model.config());
  for (const auto& [key, value] : extra) {
    if (metadata.count(key))
      detail::raise<InvalidArgument>(where, "extra metadata key '", key, "' is a key of the model's config");
    metadata.emplace(key, value);
  }
  save_checkpoint(path, params, metadata);
}

/// \brief Rebuilds a model saved by save_model: config from the metadata, then every tensor
/// (F32 and F64 files load into either Scalar). Throws FormatError naming a missing or malformed
/// config key or tensor, InvalidArgument if the config is invalid, IoError if the file cannot be
/// read.
template <class Scalar>
LoadedModel<Scalar> load_model(const std::string& path) {
  std::map<std::string, std::string> metadata = read_checkpoint_metadata(path);
  ModelConfig config = model_config_from_metadata(metadata);
  TitansModel<Scalar> model(config);
  ModelParams<Scalar> params = model.init(0);  // the shapes; every tensor is then read from the file
  load_checkpoint(path, params);
  return LoadedModel<Scalar>{std::move(config), std::move(model), std::move(params), std::move(metadata)};
}

// The float and double instantiations (README, "Build time"): PREFIX is `extern` for the
// declarations below and empty in src/instantiate_*.cpp, which define them.
#define TITANS_INSTANTIATE_MODEL_CHECKPOINT(PREFIX, S) \
  PREFIX template void save_model<S>(const std::string&, const TitansModel<S>&, const ModelParams<S>&,           \
                                     const std::map<std::string, std::string>&);                               \
  PREFIX template LoadedModel<S> load_model<S>(const std::string&);

#ifdef TITANS_EXTERN_FLOAT
TITANS_INSTANTIATE_MODEL_CHECKPOINT(extern, float)
#endif
#ifdef TITANS_EXTERN_DOUBLE
TITANS_INSTANTIATE_MODEL_CHECKPOINT(extern, double)
#endif

}  // namespace titans
