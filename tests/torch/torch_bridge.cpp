// SPDX-License-Identifier: Apache-2.0
//
// torch_bridge: the C++ side of the PyTorch-twin tests (tests/torch/test_torch_twin.py drives it).
// Everything goes through the library's public API and its safetensors files:
//
//   torch_bridge init     <config.safetensors> <seed> <f32|f64> <out model.safetensors>
//       builds a model from the config in the file's metadata (model_config_from_metadata),
//       TitansModel::init(seed), save_model.
//   torch_bridge logits   <model.safetensors> <f32|f64> <tokens.txt> <out.safetensors>
//       load_model; for each sequence (one line of tokens) from a fresh state, forward; writes
//       "logits<i>" (V, T_i).
//   torch_bridge grad     <model.safetensors> <tokens.txt> <targets.txt> <out.safetensors>
//       load_model<double>; loss_and_gradient over the batch; writes "loss" (1, 1) and
//       "grad.<name>" for every parameter.
//   torch_bridge generate <model.safetensors> <f32|f64> <prompt.txt> <count> <out.txt>
//       load_model; titans::generate, greedy (temperature 0), streaming; writes the tokens.
//
// Exit status: 0 on success, 1 with the exception's message on stderr, 2 for a usage error.
#include <titans/model_checkpoint.hpp>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

/// A parameter set of named matrices, to write results with save_checkpoint.
template <class Scalar>
struct Named {
  using scalar_type = Scalar;
  std::vector<std::pair<std::string, titans::Matrix<Scalar>>> items;

  template <class F>
  void for_each(F&& f) {
    for (auto& [name, t] : items) f(name, t);
  }
  template <class F>
  void for_each(F&& f) const {
    for (const auto& [name, t] : items) f(name, t);
  }
};

std::vector<std::vector<int>> read_sequences(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::vector<std::vector<int>> out;
  for (std::string line; std::getline(in, line);) {
    std::istringstream ss(line);
    std::vector<int> seq;
    for (int t; ss >> t;) seq.push_back(t);
    if (!ss.eof()) throw std::runtime_error(path + ": a line holds something other than integers");
    if (!seq.empty()) out.push_back(std::move(seq));
  }
  return out;
}

bool is_f64(const std::string& s) {
  if (s == "f64") return true;
  if (s == "f32") return false;
  throw std::invalid_argument("dtype is '" + s + "', expected f32 or f64");
}

template <class Scalar>
void init(const std::string& config_path, std::uint64_t seed, const std::string& out) {
  const titans::ModelConfig cfg = titans::model_config_from_metadata(titans::read_checkpoint_metadata(config_path));
  const titans::TitansModel<Scalar> model(cfg);
  titans::save_model(out, model, model.init(seed));
}

template <class Scalar>
void logits(const std::string& model_path, const std::string& tokens_path, const std::string& out) {
  const auto loaded = titans::load_model<Scalar>(model_path);
  Named<Scalar> results;
  const auto seqs = read_sequences(tokens_path);
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    auto state = loaded.model.initial_state(loaded.params);
    results.items.emplace_back("logits" + std::to_string(i), loaded.model.forward(loaded.params, seqs[i], state));
  }
  titans::save_checkpoint(out, results);
}

void grad(const std::string& model_path, const std::string& tokens_path, const std::string& targets_path,
          const std::string& out) {
  const auto loaded = titans::load_model<double>(model_path);
  auto grads = titans::zeros_like(loaded.params);
  const double loss =
      loaded.model.loss_and_gradient(loaded.params, read_sequences(tokens_path), read_sequences(targets_path), grads);
  Named<double> results;
  results.items.emplace_back("loss", titans::Matrix<double>::Constant(1, 1, loss));
  grads.for_each([&](const std::string& name, const titans::Matrix<double>& g) {
    results.items.emplace_back("grad." + name, g);
  });
  titans::save_checkpoint(out, results);
}

template <class Scalar>
void generate(const std::string& model_path, const std::string& prompt_path, titans::Index count,
              const std::string& out) {
  const auto loaded = titans::load_model<Scalar>(model_path);
  const auto prompts = read_sequences(prompt_path);
  if (prompts.size() != 1) throw std::runtime_error(prompt_path + ": expected one line of prompt tokens");
  auto state = loaded.model.initial_state(loaded.params);
  titans::SamplingOptions greedy;
  greedy.temperature = 0;
  const std::vector<int> tokens = titans::generate(loaded.model, loaded.params, state, prompts[0], count, greedy);
  std::ofstream os(out);
  for (std::size_t i = 0; i < tokens.size(); ++i) os << (i ? " " : "") << tokens[i];
  os << "\n";
  if (!os) throw std::runtime_error("cannot write " + out);
}

int usage() {
  std::cerr << "usage: torch_bridge init <config.safetensors> <seed> <f32|f64> <out.safetensors>\n"
               "       torch_bridge logits <model.safetensors> <f32|f64> <tokens.txt> <out.safetensors>\n"
               "       torch_bridge grad <model.safetensors> <tokens.txt> <targets.txt> <out.safetensors>\n"
               "       torch_bridge generate <model.safetensors> <f32|f64> <prompt.txt> <count> <out.txt>\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> a(argv + 1, argv + argc);
  try {
    if (a.size() == 5 && a[0] == "init") {
      const std::uint64_t seed = std::stoull(a[2]);
      if (is_f64(a[3])) {
        init<double>(a[1], seed, a[4]);
      } else {
        init<float>(a[1], seed, a[4]);
      }
    } else if (a.size() == 5 && a[0] == "logits") {
      if (is_f64(a[2])) {
        logits<double>(a[1], a[3], a[4]);
      } else {
        logits<float>(a[1], a[3], a[4]);
      }
    } else if (a.size() == 5 && a[0] == "grad") {
      grad(a[1], a[2], a[3], a[4]);
    } else if (a.size() == 6 && a[0] == "generate") {
      const titans::Index count = std::stoll(a[4]);
      if (is_f64(a[2])) {
        generate<double>(a[1], a[3], count, a[5]);
      } else {
        generate<float>(a[1], a[3], count, a[5]);
      }
    } else {
      return usage();
    }
  } catch (const std::exception& e) {
    std::cerr << "torch_bridge: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
