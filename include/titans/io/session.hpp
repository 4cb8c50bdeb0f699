// SPDX-License-Identifier: Apache-2.0
//
// \file io/session.hpp
// \brief A streaming session saved to a file and resumed in another process.
//
// A session is a module's state after some tokens: the memories' weights and momentum, the chunk
// in progress (its start weights), the convolution tails, the KV caches, MAC's segment-start
// snapshots, MAL's persistent outputs, and the counters (positions, the priming flag). Saving it
// and loading it into a fresh state of the same model resumes the stream exactly:
//
//     titans::save_session("chat.session", model, params, state);       // any time, any cut
//     ...                                                                 // (a new process)
//     auto state = titans::load_session("chat.session", model, params);  // checked, then filled
//     auto logits = model.forward(params, more_tokens, state);           // == the unsplit stream
//
// Works for NeuralMemory, Block, BlockStack and TitansModel. The file is a safetensors file
// (checkpoint.hpp): the state's tensors by name, with the counters, the module's config and a
// digest of its parameters in the metadata. A session is refused (with a message naming what
// differs) unless the model that loads it has the same kind, config, scalar type and parameters;
// its tensors must have the shapes the state can have, and the counters must agree with each
// other and with the tensors (check_state). docs/SESSIONS.md lists the file's keys.
#pragma once

#include "../checkpoint.hpp"
#include "../detail/metadata.hpp"
#include "../model.hpp"

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace titans {

/// Format version of session files, in the metadata key "titans.session".
inline constexpr const char* session_format_version = "1";

namespace detail {
namespace session {

/// What a session records of the module it came from: a kind name and the config as metadata.
template <class S>
std::pair<std::string, std::map<std::string, std::string>> describe(const NeuralMemory<S>& m) {
  return {"NeuralMemory", to_metadata(m.config())};
}
template <class S>
std::pair<std::string, std::map<std::string, std::string>> describe(const Block<S>& m) {
  auto meta = to_metadata(m.config());
  meta["block.kind"] = to_string(m.config().kind);
  return {"Block", meta};
}
template <class S>
std::pair<std::string, std::map<std::string, std::string>> describe(const BlockStack<S>& m) {
  std::map<std::string, std::string> meta;
  for (Index i = 0; i < m.size(); ++i)
    for (const auto& [k, v] : describe(m.block(i)).second) meta["block" + std::to_string(i) + "." + k] = v;
  return {"BlockStack", meta};
}
template <class S>
std::pair<std::string, std::map<std::string, std::string>> describe(const TitansModel<S>& m) {
  return {"TitansModel", to_metadata(m.config())};
}

/// FNV-1a (64-bit) of the parameters' names, shapes and values, as 16 hex digits: a session
/// resumes only with the weights that made it.
template <class P>
std::string digest(const P& params) {
  std::uint64_t h = 1469598103934665603ULL;
  auto mix = [&](const void* data, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ULL;
  };
  params.for_each([&](const std::string& name, const auto& t) {
    mix(name.data(), name.size());
    const std::int64_t shape[2] = {static_cast<std::int64_t>(t.rows()), static_cast<std::int64_t>(t.cols())};
    mix(shape, sizeof shape);
    mix(t.data(), static_cast<std::size_t>(t.size()) * sizeof(*t.data()));
  });
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

template <class Scalar>
const char* scalar_name() {
  return sizeof(Scalar) <= sizeof(float) ? "F32" : "F64";
}

/// Writes a state's counters and flags as "state.<name>" metadata (tensors go through for_each).
struct CounterWriter {
  std::map<std::string, std::string>& out;
  std::string prefix;
  template <class M>
  void tensor(const std::string&, const M&) {}
  template <class L, class Like = L>
  void tensor_list(const std::string&, const L&, const Like* = nullptr) {}
  template <class M>
  void optional_tensor(const std::string&, const M&) {}
  template <class S>
  void nested(const std::string& name, const S& s) {
    const std::size_t n = prefix.size();
    prefix += name;
    s.visit(*this);
    prefix.resize(n);
  }
  void count(const std::string& name, const Index& v) { out["state." + prefix + name] = std::to_string(v); }
  void flag(const std::string& name, const bool& b) { out["state." + prefix + name] = format_bool(b); }
};

/// Fills a fresh state from a session file: every field the state lists must be in the file,
/// with the state's row count (and column count, except for tensors that grow: those empty in a
/// fresh state, such as KV caches); lists marked optional (a chunk in progress) are present or
/// absent as a whole. Everything read is recorded, so that finish() can refuse leftovers.
template <class Scalar>
class Reader {
 public:
  Reader(const char* where, const ckpt::Header& h, const std::uint8_t* blob) : where_(where), h_(h), blob_(blob) {}

  void tensor(const std::string& name, Matrix<Scalar>& t) { read(prefix_ + name, t, /*fixed=*/t.cols() != 0); }
  /// A growing tensor that sessions written before it lack: absent, it is read as empty.
  void optional_tensor(const std::string& name, Matrix<Scalar>& t) {
    if (h_.find(prefix_ + name)) {
      read(prefix_ + name, t, /*fixed=*/false);
    } else {
      t.resize(t.rows(), 0);
    }
  }

  template <class Like>
  void tensor_list(const std::string& name, std::vector<Matrix<Scalar>>& list, const Like* like = nullptr) {
    if (like) {
      if (!h_.find(prefix_ + name + "1")) {
        list.clear();
        for (std::size_t l = 0; l < like->size(); ++l) refuse_if_present(prefix_ + name + std::to_string(l + 1));
        return;
      }
      list.resize(like->size());
      for (std::size_t l = 0; l < like->size(); ++l) list[l].resize((*like)[l].rows(), (*like)[l].cols());
    }
    for (std::size_t l = 0; l < list.size(); ++l) read(prefix_ + name + std::to_string(l + 1), list[l], true);
  }
  void tensor_list(const std::string& name, std::vector<Matrix<Scalar>>& list) {
    tensor_list<std::vector<Matrix<Scalar>>>(name, list, nullptr);
  }

  template <class S>
  void nested(const std::string& name, S& s) {
    const std::size_t n = prefix_.size();
    prefix_ += name;
    s.visit(*this);
    prefix_.resize(n);
  }

  void count(const std::string& name, Index& v) {
    const std::string key = "state." + prefix_ + name;
    const Index x = MetadataReader(where_, h_.metadata).integer(key);
    // Counters are token positions: non-negative, and far below overflow when tokens are added.
    if (x < 0 || x > (Index(1) << 53))
      raise<FormatError>(where_, "metadata '", key, "' is ", x, ", expected a position in [0, 2^53]");
    v = x;
    keys_.insert(key);
  }
  void flag(const std::string& name, bool& b) {
    const std::string key = "state." + prefix_ + name;
    b = MetadataReader(where_, h_.metadata).boolean(key);
    keys_.insert(key);
  }

  /// Refuses tensors and "state." keys that no field of the state read.
  void finish() const {
    for (const ckpt::Entry& e : h_.entries)
      if (!used_.count(e.name))
        raise<FormatError>(where_, "the session holds tensor ", ckpt::quote_name(e.name),
                           " that this model's state does not have");
    for (const auto& [key, value] : h_.metadata)
      if (key.rfind("state.", 0) == 0 && !keys_.count(key))
        raise<FormatError>(where_, "the session's metadata has '", key, "', which this model's state does not have");
  }

 private:
  void refuse_if_present(const std::string& name) const {
    if (h_.find(name))
      raise<FormatError>(where_, "the session holds tensor ", ckpt::quote_name(name), " without the rest of its list");
  }

  void read(const std::string& name, Matrix<Scalar>& t, bool fixed) {
    const ckpt::Entry* e = h_.find(name);
    if (!e) raise<FormatError>(where_, "the session has no tensor ", ckpt::quote_name(name), " (the state needs it)");
    if (e->dtype != "F32" && e->dtype != "F64")
      raise<FormatError>(where_, "tensor ", ckpt::quote_name(name), " has dtype ", e->dtype,
                         "; sessions hold F32 or F64");
    Index cols = t.cols();
    if (fixed) {
      if (!ckpt::shape_fits(e->shape, t.rows(), t.cols()))
        raise<ShapeError>(where_, "tensor ", ckpt::quote_name(name), " has shape ", ckpt::shape_string(e->shape),
                          " in the session, but this model's state has ", ckpt::shape_of(t.rows(), t.cols()));
    } else {
      // A growing tensor: the rows are the model's; the columns (bounded by the bytes the file
      // holds, which the parser checked) are checked against the counters by check_state.
      if (e->shape.size() != 2 || e->shape[0] != static_cast<std::uint64_t>(t.rows()))
        raise<ShapeError>(where_, "tensor ", ckpt::quote_name(name), " has shape ", ckpt::shape_string(e->shape),
                          " in the session, but this model's state has ", t.rows(), " rows there");
      cols = static_cast<Index>(e->shape[1]);
    }
    Matrix<Scalar> m(t.rows(), cols);
    ckpt::decode(where_, *e, blob_, m);
    t.swap(m);
    used_.insert(name);
  }

  const char* where_;
  const ckpt::Header& h_;
  const std::uint8_t* blob_;
  std::string prefix_;
  std::set<std::string> used_, keys_;
};

/// The metadata of a session of `module` with `params` and `state`, plus the caller's extras.
template <class Module>
std::map<std::string, std::string> metadata(const char* where, const Module& module,
                                            const typename Module::Params& params,
                                            const typename Module::State& state,
                                            const std::map<std::string, std::string>& extra) {
  using Scalar = typename Module::Params::scalar_type;
  std::map<std::string, std::string> meta;
  const auto [kind, config] = describe(module);
  meta["titans.session"] = session_format_version;
  meta["titans.session.module"] = kind;
  meta["titans.session.scalar"] = scalar_name<Scalar>();
  meta["titans.session.params"] = digest(params);
  for (const auto& [k, v] : config) meta["config." + k] = v;
  CounterWriter w{meta, {}};
  state.visit(w);
  for (const auto& [key, value] : extra) {
    for (const char* reserved : {"titans.session", "config.", "state."})
      if (key.rfind(reserved, 0) == 0)
        raise<InvalidArgument>(where, "extra metadata key '", key, "' starts with '", reserved,
                               "', which sessions reserve");
    meta.emplace(key, value);
  }
  return meta;
}

/// Checks that the session in `h` was made by this module with these parameters.
template <class Module>
void check_origin(const char* where, const ckpt::Header& h, const Module& module,
                  const typename Module::Params& params) {
  using Scalar = typename Module::Params::scalar_type;
  const MetadataReader r(where, h.metadata);
  if (!r.has("titans.session"))
    raise<FormatError>(where, "this is not a session file (its metadata has no 'titans.session'; save_session ",
                       "writes it)");
  if (r.get("titans.session") != session_format_version)
    raise<FormatError>(where, "session format '", r.get("titans.session"), "' is not supported (this library reads ",
                       session_format_version, ")");
  const auto [kind, config] = describe(module);
  if (r.get("titans.session.module") != kind)
    raise<InvalidArgument>(where, "the session is of a ", r.get("titans.session.module"), ", not of a ", kind);
  if (r.get("titans.session.scalar") != scalar_name<Scalar>())
    raise<InvalidArgument>(where, "the session was saved by a model of scalar ", r.get("titans.session.scalar"),
                           ", this one is ", scalar_name<Scalar>());
  for (const auto& [k, v] : config) {
    const std::string key = "config." + k;
    if (!r.has(key)) raise<InvalidArgument>(where, "the session was saved by another model: it has no '", key, "'");
    if (r.get(key) != v)
      raise<InvalidArgument>(where, "the session was saved by another model: '", key, "' is ", r.get(key),
                             " in the session, ", v, " in this model");
  }
  for (const auto& [key, value] : h.metadata)
    if (key.rfind("config.", 0) == 0 && !config.count(key.substr(7)))
      raise<InvalidArgument>(where, "the session was saved by another model: it has '", key,
                             "', which this model's config does not");
  const std::string mine = digest(params);
  if (r.get("titans.session.params") != mine)
    raise<InvalidArgument>(where, "the session was saved with other parameters (digest ",
                           r.get("titans.session.params"), ", these parameters ", mine,
                           "): a session resumes only with the weights it was made with");
}

template <class Module>
typename Module::State load(const char* where, const std::uint8_t* data, std::size_t size, const Module& module,
                            const typename Module::Params& params) {
  module.check_params(params, where);
  const ckpt::Header h = ckpt::parse_buffer(where, data, size);
  check_origin(where, h, module, params);
  typename Module::State state = module.initial_state(params);
  Reader<typename Module::Params::scalar_type> reader(where, h, data + 8 + ckpt::get_le64(data));
  state.visit(reader);
  reader.finish();
  module.check_state(state, where);
  return state;
}

}  // namespace session
}  // namespace detail

/// \brief A session (the state of `module` run with `params`) as safetensors bytes.
///
/// `Module` is NeuralMemory, Block, BlockStack or TitansModel (any scalar). `extra` metadata is
/// stored beside the session's own keys (which start with "titans.session", "config." and "state.").
/// \throws ShapeError / InvalidArgument the parameters or the state do not fit the module, or an
///         extra key is reserved; NumericError a non-finite value in the state.
template <class Module>
std::vector<std::uint8_t> save_session_to_memory(const Module& module, const typename Module::Params& params,
                                                 const typename Module::State& state,
                                                 const std::map<std::string, std::string>& extra = {}) {
  constexpr const char* where = "titans::save_session_to_memory";
  module.check_params(params, where);
  module.check_state(state, where);
  return save_checkpoint_to_memory(state, detail::session::metadata(where, module, params, state, extra));
}

/// \brief Writes a session to `path`, atomically (as save_checkpoint: the old file or the new
/// one, never a partial write).
template <class Module>
void save_session(const std::string& path, const Module& module, const typename Module::Params& params,
                  const typename Module::State& state, const std::map<std::string, std::string>& extra = {}) {
  const std::string where = detail::ckpt::where_path("titans::save_session", path);
  module.check_params(params, where.c_str());
  module.check_state(state, where.c_str());
  save_checkpoint(path, state, detail::session::metadata(where.c_str(), module, params, state, extra));
}

/// \brief A state of `module` with `params`, read from session bytes saved by save_session.
///
/// The session must come from a module of the same kind, config and scalar type, with the same
/// parameters; every tensor must have the shape the state can have and every counter must agree
/// (check_state). Extra metadata is readable with read_checkpoint_metadata_from_memory.
/// \throws FormatError not a session, a malformed file, a missing or unexpected tensor or counter.
/// \throws InvalidArgument the session is of another model (the message names the difference),
///         or its counters disagree with its tensors; ShapeError a tensor of the wrong shape;
///         NumericError a non-finite value.
template <class Module>
typename Module::State load_session_from_memory(const std::uint8_t* data, std::size_t size, const Module& module,
                                                const typename Module::Params& params) {
  return detail::session::load("titans::load_session_from_memory", data, size, module, params);
}

/// \brief load_session_from_memory on a byte vector.
template <class Module>
typename Module::State load_session_from_memory(const std::vector<std::uint8_t>& bytes, const Module& module,
                                                const typename Module::Params& params) {
  return load_session_from_memory(bytes.data(), bytes.size(), module, params);
}

/// \brief load_session_from_memory on the file `path` (read once; errors name the path).
/// \throws IoError the file cannot be read.
template <class Module>
typename Module::State load_session(const std::string& path, const Module& module,
                                    const typename Module::Params& params) {
  const std::string where = detail::ckpt::where_path("titans::load_session", path);
  const std::vector<std::uint8_t> bytes = detail::ckpt::read_file(where.c_str(), path);
  return detail::session::load(where.c_str(), bytes.data(), bytes.size(), module, params);
}

}  // namespace titans
