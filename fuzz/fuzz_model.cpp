// SPDX-License-Identifier: Apache-2.0
//
// libFuzzer target for the readers of whole models and sessions: arbitrary bytes are read as a
// model file (load_model_from_memory, model_config_from_metadata) and as a session of a fixed
// small model (load_session_from_memory).
//
// Properties checked on every input:
//   - nothing crashes, over-reads, leaks or allocates without bound, and the only exceptions are
//     titans' own (anything else, std::bad_alloc included, escapes and libFuzzer reports it); the
//     fuzzer runs with -rss_limit_mb, so a small input that makes the loader allocate a lot fails;
//   - a model that loads has parameters that fit it, and saving them with its config and loading
//     again gives back the same values;
//   - a session that loads passes the model's check_state, and saving it gives bytes that load
//     back to the same session.
//
// The seed corpus in fuzz/corpus_model is written by this same file built as a plain program:
//   g++ -std=c++17 -DTITANS_FUZZ_WRITE_CORPUS -I include -isystem <eigen3> -o make_corpus
//       fuzz/fuzz_model.cpp && ./make_corpus fuzz/corpus_model
// (it also runs every seed through the same checks as the fuzzer).

#include <titans/titans.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using Bytes = std::vector<std::uint8_t>;

void check(bool ok) {
  if (!ok) __builtin_trap();
}

/// The model every session input is loaded into (and the seeds' model): 2 blocks, D = 4.
titans::ModelConfig small_config() {
  titans::ModelConfig c;
  c.vocab = 5;
  c.layers = {titans::BlockKind::mac, titans::BlockKind::mal};
  c.block.dim = 4;
  c.block.attention_heads = 2;
  c.block.window = 3;
  c.block.segment = 3;
  c.block.persistent = 1;
  c.block.ffn_hidden = 4;
  c.block.attention_block = 2;
  c.block.memory.dim = 4;
  c.block.memory.heads = 2;
  c.block.memory.depth = 2;
  c.block.memory.expansion = 2;
  c.block.memory.chunk_size = 2;
  c.block.memory.conv_kernel = 2;
  return c;
}

struct Fixed {
  titans::TitansModel<float> model{small_config()};
  titans::ModelParams<float> params = model.init(1);
};

const Fixed& fixed() {
  static const Fixed f;
  return f;
}

template <class F>
void allowing_titans_errors(F&& f) {
  try {
    f();
  } catch (const titans::FormatError&) {
  } catch (const titans::InvalidArgument&) {  // includes ShapeError
  } catch (const titans::NumericError&) {
  }
}

template <class P>
bool same(const P& a, const P& b) {
  std::vector<titans::Matrix<float>> x, y;
  a.for_each([&](const std::string&, const titans::Matrix<float>& t) { x.push_back(t); });
  b.for_each([&](const std::string&, const titans::Matrix<float>& t) { y.push_back(t); });
  return x == y;
}

void fuzz_one(const std::uint8_t* data, std::size_t size) {
  allowing_titans_errors([&] {
    titans::model_config_from_metadata(titans::read_checkpoint_metadata_from_memory(data, size));
  });
  allowing_titans_errors([&] {
    auto loaded = titans::load_model_from_memory<float>(data, size);
    loaded.model.check_params(loaded.params);
    const Bytes again = titans::save_checkpoint_to_memory(loaded.params, titans::to_metadata(loaded.config));
    auto reloaded = titans::load_model_from_memory<float>(again.data(), again.size());
    check(same(reloaded.params, loaded.params));
  });
  const Fixed& f = fixed();
  allowing_titans_errors([&] {
    auto state = titans::load_session_from_memory(data, size, f.model, f.params);
    f.model.check_state(state);
    const Bytes again = titans::save_session_to_memory(f.model, f.params, state);
    auto state2 = titans::load_session_from_memory(again, f.model, f.params);
    check(titans::save_session_to_memory(f.model, f.params, state2) == again);
  });
}

}  // namespace

#ifndef TITANS_FUZZ_WRITE_CORPUS

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz_one(data, size);
  return 0;
}

#else  // a plain program that writes the seed corpus

#include <cstdlib>
#include <fstream>
#include <iostream>

namespace {

void write(const std::string& dir, const std::string& name, const Bytes& b) {
  fuzz_one(b.data(), b.size());
  std::ofstream out(dir + "/" + name, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  if (!out) {
    std::cerr << "cannot write " << dir << "/" << name << "\n";
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " <corpus-dir>\n";
    return 2;
  }
  const std::string dir = argv[1];
  const Fixed& f = fixed();
  const Bytes model = titans::save_checkpoint_to_memory(f.params, titans::to_metadata(f.model.config()));
  write(dir, "model_f32", model);
  titans::load_model_from_memory<float>(model.data(), model.size());  // the valid seeds load (throws if not)
  write(dir, "model_truncated", Bytes(model.begin(), model.begin() + static_cast<std::ptrdiff_t>(model.size() / 2)));
  titans::ModelConfig untied = small_config();
  untied.tied = false;
  untied.layers = {titans::BlockKind::lmm, titans::BlockKind::swa, titans::BlockKind::mag};
  const titans::TitansModel<float> m2(untied);
  write(dir, "model_untied", titans::save_checkpoint_to_memory(m2.init(2), titans::to_metadata(untied)));
  // Sessions of the fixed model at a few cuts (inside and at the ends of chunks and segments).
  const std::vector<int> tokens = {1, 4, 0, 3, 2, 2, 1};
  for (std::size_t cut : {std::size_t(0), std::size_t(1), std::size_t(4), std::size_t(7)}) {
    auto state = f.model.initial_state(f.params);
    if (cut > 0) f.model.forward(f.params, std::vector<int>(tokens.begin(), tokens.begin() + static_cast<long>(cut)), state);
    const Bytes session = titans::save_session_to_memory(f.model, f.params, state);
    titans::load_session_from_memory(session, f.model, f.params);
    write(dir, "session_" + std::to_string(cut), session);
  }
  return 0;
}

#endif
