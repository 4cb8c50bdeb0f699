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
/// (run information, a vocabulary name, …), in `dtype` (native: the scalar's own F32 or F64;
/// BF16 and F16 halve the file, rounding each value to nearest: checkpoint.hpp, "Dtype rule").
/// Throws ShapeError if the parameters do not fit the model, InvalidArgument if an extra key is
/// one of the config's, NumericError if a value overflows `dtype`, IoError if the file cannot be
/// written (an existing file is replaced only once the new one is complete).
template <class Scalar>
void save_model(const std::string& path, const TitansModel<Scalar>& model, const ModelParams<Scalar>& params,
                const std::map<std::string, std::string>& extra = {}, Dtype dtype = Dtype::native) {
  constexpr const char* where = "titans::save_model";
  model.check_params(params, where);
  std::map<std::string, std::string> metadata = to_metadata(model.config());
  for (const auto& [key, value] : extra) {
    if (metadata.count(key))
      detail::raise<InvalidArgument>(where, "extra metadata key '", key, "' is a key of the model's config");
    metadata.emplace(key, value);
  }
  save_checkpoint(path, params, metadata, dtype);
}

namespace detail {
namespace ckpt {

/// load_model on validated bytes: the config is read and bounded (ModelConfig::validate), its
/// parameter count is compared with the values the file holds, and only then are the parameters
/// allocated and read. A small file that declares a huge model is refused before any allocation.
template <class Scalar>
LoadedModel<Scalar> load_model_bytes(const char* where, const std::uint8_t* data, std::size_t size) {
  const Header h = parse_buffer(where, data, size);
  ModelConfig config;
  try {
    config = model_config_from_metadata(h.metadata);
  } catch (const FormatError& e) {
    raise<FormatError>(where, e.what());
  }
  TitansModel<Scalar> model(config);  // configs and small tables only
  std::uint64_t held = 0;
  for (const Entry& e : h.entries) held += (e.end - e.begin) / e.width;
  const auto needed = static_cast<std::uint64_t>(model.parameter_count());
  if (needed > held)
    raise<FormatError>(where, "the metadata describes a model of ", needed, " parameters, but the file holds only ",
                       held, " values");
  ModelParams<Scalar> params = model.init(0);  // the shapes; every tensor is then read from the file
  load_into(where, h, data + 8 + get_le64(data), params, LoadOptions{});
  return LoadedModel<Scalar>{std::move(config), std::move(model), std::move(params), h.metadata};
}

}  // namespace ckpt
}  // namespace detail

/// \brief Rebuilds a model saved by save_model: config from the metadata, then every tensor
/// (F32, F64, BF16 and F16 files load into either Scalar). The config is checked (every integer bounded,
/// titans::limits) and its parameter count compared with the values the file holds before any
/// parameter is allocated. Throws FormatError naming a missing or malformed config key or tensor,
/// or a file too small for the model it describes; IoError if the file cannot be read.
template <class Scalar>
LoadedModel<Scalar> load_model(const std::string& path) {
  const std::string where = detail::ckpt::where_path("titans::load_model", path);
  const std::vector<std::uint8_t> bytes = detail::ckpt::read_file(where.c_str(), path);
  return detail::ckpt::load_model_bytes<Scalar>(where.c_str(), bytes.data(), bytes.size());
}

/// \brief load_model on bytes in memory (a file read by the caller, a network buffer).
template <class Scalar>
LoadedModel<Scalar> load_model_from_memory(const std::uint8_t* data, std::size_t size) {
  return detail::ckpt::load_model_bytes<Scalar>("titans::load_model_from_memory", data, size);
}

// The float and double instantiations (README, "Faster builds: titans::compiled"): PREFIX is `extern` for the
// declarations below and empty in src/instantiate_*.cpp, which define them.
#define TITANS_INSTANTIATE_MODEL_CHECKPOINT(PREFIX, S) \
  PREFIX template void save_model<S>(const std::string&, const TitansModel<S>&, const ModelParams<S>&,           \
                                     const std::map<std::string, std::string>&, Dtype);                        \
  PREFIX template LoadedModel<S> load_model<S>(const std::string&);                                            \
  PREFIX template LoadedModel<S> load_model_from_memory<S>(const std::uint8_t*, std::size_t);

#ifdef TITANS_EXTERN_FLOAT
TITANS_INSTANTIATE_MODEL_CHECKPOINT(extern, float)
#endif
#ifdef TITANS_EXTERN_DOUBLE
TITANS_INSTANTIATE_MODEL_CHECKPOINT(extern, double)
#endif

}  // namespace titans
