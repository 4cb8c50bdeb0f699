// SPDX-License-Identifier: Apache-2.0
// save_model / load_model: a whole model rebuilt from one file, and bad files and arguments.
#include <titans/titans.hpp>

#include <gtest/gtest.h>

#if !defined(TITANS_NO_CHECKPOINT) && __has_include(<nlohmann/json.hpp>)

#include "support/edit_checkpoint.hpp"
#include "support/temp_dir.hpp"

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <new>

#include <string>
#include <tuple>
#include <vector>

namespace {

using titans::BlockKind;
using titans::ModelConfig;
using titans::TitansModel;
using titans_test::TempDir;

ModelConfig small_config(bool tied) {
  ModelConfig c;
  c.vocab = 9;
  c.layers = {BlockKind::mac, BlockKind::swa, BlockKind::mal};
  c.tied = tied;
  c.block.dim = 8;
  c.block.attention_heads = 2;
  c.block.window = 3;
  c.block.segment = 4;
  c.block.persistent = 2;
  c.block.memory.dim = 8;
  c.block.memory.heads = 2;
  c.block.memory.depth = 2;
  c.block.memory.chunk_size = 3;
  c.block.memory.theta_max = 0.4;
  return c;
}

template <class P>
std::vector<titans::Matrix<typename P::scalar_type>> tensors(const P& p) {
  std::vector<titans::Matrix<typename P::scalar_type>> out;
  p.for_each([&](const std::string&, const auto& t) { out.push_back(t); });
  return out;
}

const std::vector<int> kTokens = {1, 4, 0, 8, 2, 2, 7, 3, 5, 6, 1};

TEST(ModelCheckpoint, RoundTripRebuildsTheModelFromTheFileAlone) {
  for (bool tied : {true, false}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    const TempDir dir;
    const std::string path = (dir.path() / "lm.safetensors").string();
    const TitansModel<float> model(small_config(tied));
    const auto params = model.init(3);
    titans::save_model(path, model, params, {{"run.steps", "600"}, {"run.text", "GPL-3"}});

    const auto loaded = titans::load_model<float>(path);
    EXPECT_EQ(loaded.config.vocab, 9);
    EXPECT_EQ(loaded.config.layers, small_config(tied).layers);
    EXPECT_EQ(loaded.config.tied, tied);
    EXPECT_EQ(loaded.config.block.segment, 4);
    EXPECT_EQ(loaded.config.block.memory.depth, 2);
    EXPECT_DOUBLE_EQ(loaded.config.block.memory.theta_max, 0.4);
    EXPECT_EQ(loaded.metadata.at("run.steps"), "600");
    EXPECT_EQ(loaded.metadata.at("run.text"), "GPL-3");
    EXPECT_EQ(titans::parameter_names(loaded.params), titans::parameter_names(params));
    const auto a = tensors(params), b = tensors(loaded.params);
    ASSERT_EQ(a.size(), b.size());
    for (std::size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << titans::parameter_names(params)[i];

    auto s1 = model.initial_state(params);
    auto s2 = loaded.model.initial_state(loaded.params);
    EXPECT_EQ(model.forward(params, kTokens, s1), loaded.model.forward(loaded.params, kTokens, s2));

    // The same file loads into a double model; float values convert exactly.
    const auto as_double = titans::load_model<double>(path);
    auto s3 = as_double.model.initial_state(as_double.params);
    const titans::Matrix<double> logits = as_double.model.forward(as_double.params, kTokens, s3);
    auto s4 = model.initial_state(params);
    const titans::Matrix<float> logits_f = model.forward(params, kTokens, s4);
    EXPECT_LT((logits - logits_f.cast<double>()).cwiseAbs().maxCoeff(), 1e-4);
  }
}

// A MAC model in the Figure 3a form (memory_tokens > 0) round-trips: its learned queries by name
// and N_l in the metadata. A file without block.memory_tokens (written before the option) loads
// as the interleaved MAC it was written with; a Figure 3a file that lost the key is refused.
TEST(ModelCheckpoint, MacMemoryTokensRoundTripAndOldFilesLoadInterleaved) {
  ModelConfig c = small_config(true);
  c.block.memory_tokens = 3;
  const TitansModel<double> model(c);
  const auto params = model.init(5);
  const auto bytes = titans::save_checkpoint_to_memory(params, titans::to_metadata(model.config()));
  const auto loaded = titans::load_model_from_memory<double>(bytes.data(), bytes.size());
  EXPECT_EQ(loaded.config.block.memory_tokens, 3);
  EXPECT_EQ(loaded.metadata.at("block.memory_tokens"), "3");
  const auto names = titans::parameter_names(loaded.params);
  EXPECT_NE(std::find(names.begin(), names.end(), "block0.retrieve.queries"), names.end());
  EXPECT_EQ(std::find(names.begin(), names.end(), "block0.retrieve.w"), names.end());
  EXPECT_EQ(names, titans::parameter_names(params));
  const auto a = tensors(params), b = tensors(loaded.params);
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << names[i];
  auto s1 = model.initial_state(params);
  auto s2 = loaded.model.initial_state(loaded.params);
  EXPECT_EQ(model.forward(params, kTokens, s1), loaded.model.forward(loaded.params, kTokens, s2));

  const TitansModel<double> old(small_config(true));
  const auto old_params = old.init(5);
  auto e = titans_test::edit_checkpoint(titans::save_checkpoint_to_memory(old_params, titans::to_metadata(old.config())));
  ASSERT_EQ(e.metadata.erase("block.memory_tokens"), 1u);
  const auto old_bytes = e.bytes();
  const auto old_loaded = titans::load_model_from_memory<double>(old_bytes.data(), old_bytes.size());
  EXPECT_EQ(old_loaded.config.block.memory_tokens, 0);
  auto s3 = old.initial_state(old_params);
  auto s4 = old_loaded.model.initial_state(old_loaded.params);
  EXPECT_EQ(old.forward(old_params, kTokens, s3), old_loaded.model.forward(old_loaded.params, kTokens, s4));

  // (N_l = 9 learned queries hold more values than W_R's D² = 64, so the file passes the size check
  // and the tensors are named; with fewer the file is refused as too small for its model.)
  ModelConfig wide = c;
  wide.block.memory_tokens = 9;
  const TitansModel<double> wide_model(wide);
  auto f = titans_test::edit_checkpoint(
      titans::save_checkpoint_to_memory(wide_model.init(5), titans::to_metadata(wide_model.config())));
  f.metadata.erase("block.memory_tokens");
  const auto mismatched = f.bytes();
  try {
    titans::load_model_from_memory<double>(mismatched.data(), mismatched.size());
    ADD_FAILURE() << "expected FormatError";
  } catch (const titans::FormatError& err) {
    EXPECT_NE(std::string(err.what()).find("retrieve."), std::string::npos) << err.what();
  }
}

// A model saved in BF16 or F16 is half the size; each value is its nearest 16-bit value, so the
// parameters move by at most half an ulp of that type, and the loaded model runs.
TEST(ModelCheckpoint, SavedInBF16OrF16LoadsWithRoundedValues) {
  const TitansModel<float> model(small_config(true));
  const auto params = model.init(3);
  const TempDir dir;
  const std::string f32_path = (dir.path() / "lm32.safetensors").string();
  titans::save_model(f32_path, model, params);
  for (const auto& [dtype, name, rel] :
       {std::tuple{titans::Dtype::bf16, "BF16", 1.0 / 256}, std::tuple{titans::Dtype::f16, "F16", 1.0 / 2048}}) {
    SCOPED_TRACE(name);
    const std::string path = (dir.path() / (std::string("lm_") + name + ".safetensors")).string();
    titans::save_model(path, model, params, {}, dtype);
    EXPECT_EQ(titans::list_checkpoint(path)[0].dtype, name);
    // The data (after the 8-byte length and the JSON header) is exactly half of the F32 file's.
    auto data_bytes = [](const std::string& file) {
      std::ifstream in(file, std::ios::binary);
      unsigned char len[8] = {};
      in.read(reinterpret_cast<char*>(len), 8);
      std::uint64_t header = 0;
      for (int i = 7; i >= 0; --i) header = header << 8 | len[i];
      return std::filesystem::file_size(file) - 8 - header;
    };
    EXPECT_EQ(2 * data_bytes(path), data_bytes(f32_path));
    const auto loaded = titans::load_model<float>(path);
    const auto a = tensors(params), b = tensors(loaded.params);
    ASSERT_EQ(a.size(), b.size());
    double worst = 0;
    for (std::size_t i = 0; i < a.size(); ++i)
      for (titans::Index k = 0; k < a[i].size(); ++k) {
        const double x = a[i].data()[k], y = b[i].data()[k];
        if (std::fabs(x) > 1e-4) worst = std::max(worst, std::fabs(x - y) / std::fabs(x));  // normal range
      }
    EXPECT_LE(worst, rel);  // half an ulp: at most 2^-8 of the value in BF16, 2^-11 in F16
    EXPECT_GT(worst, 0.0);  // the values were rounded, not stored as they were
    auto s = loaded.model.initial_state(loaded.params);
    EXPECT_TRUE(loaded.model.forward(loaded.params, kTokens, s).allFinite());
  }
}

TEST(ModelCheckpoint, BadArgumentsAndFilesThrowClearly) {
  const TempDir dir;
  const std::string path = (dir.path() / "lm.safetensors").string();
  const TitansModel<double> model(small_config(true));
  const auto params = model.init(1);

  // An extra key may not overwrite the config.
  try {
    titans::save_model(path, model, params, {{"model.vocab", "12"}});
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const titans::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("'model.vocab'"), std::string::npos) << e.what();
  }
  // Parameters of another model.
  const TitansModel<double> untied(small_config(false));
  EXPECT_THROW(titans::save_model(path, untied, params), titans::ShapeError);

  // No file; a file without the config; a config that does not match the tensors.
  EXPECT_THROW(titans::load_model<double>((dir.path() / "missing.safetensors").string()), titans::IoError);
  titans::save_checkpoint(path, params);
  try {
    titans::load_model<double>(path);
    ADD_FAILURE() << "expected FormatError";
  } catch (const titans::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("model."), std::string::npos) << e.what();
  }
  titans::save_checkpoint(path, params, titans::to_metadata(untied.config()));
  EXPECT_THROW(titans::load_model<double>(path), titans::FormatError);
  titans::save_model(path, model, params);
  EXPECT_NO_THROW(titans::load_model<double>(path));
}

// parameter_count() is computed from the config alone; it must be what init() allocates.
TEST(ModelCheckpoint, ParameterCountFromTheConfigEqualsTheParameters) {
  for (bool tied : {true, false})
    for (titans::Index depth : {1, 3})
      for (bool output_norm : {true, false})
        for (titans::Index persistent : {0, 2}) {
          ModelConfig c = small_config(tied);
          c.layers = {BlockKind::mac, BlockKind::mag, BlockKind::mal, BlockKind::lmm, BlockKind::swa};
          c.block.memory_tokens = persistent == 2 ? 5 : 0;  // MAC in both forms
          c.block.memory.depth = depth;
          c.block.memory.output_norm = output_norm;
          c.block.persistent = persistent;
          c.block.ffn_hidden = depth == 3 ? 20 : 0;
          const TitansModel<float> model(c);
          EXPECT_EQ(model.parameter_count(), titans::parameter_count(model.init(1)))
              << "tied " << tied << " depth " << depth << " output_norm " << output_norm;
        }
}

// A small real file whose metadata declares a huge model (D = 4096, V = 2^24: 275 GB of
// parameters in float). Without the check, load_model would allocate them before looking at the
// tensors.
std::vector<std::uint8_t> huge_model_file() {
  const TitansModel<float> model(small_config(true));
  const auto params = model.init(1);
  auto e = titans_test::edit_checkpoint(titans::save_checkpoint_to_memory(params, titans::to_metadata(model.config())));
  e.metadata["model.vocab"] = std::to_string(titans::Index(1) << 24);
  for (const char* key : {"block.dim", "neural_memory.dim"}) e.metadata[key] = "4096";
  return e.bytes();
}

TEST(ModelCheckpoint, AFileDeclaringAHugeModelIsRefusedBeforeAllocating) {
  const auto bytes = huge_model_file();
  try {
    titans::load_model_from_memory<float>(bytes.data(), bytes.size());
    ADD_FAILURE() << "expected FormatError";
  } catch (const titans::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("but the file holds only"), std::string::npos) << e.what();
  }
  // Config integers past titans::limits are refused by name.
  auto e = titans_test::edit_checkpoint(bytes);
  e.metadata["model.vocab"] = "9223372036854775807";
  try {
    titans::load_model_from_memory<float>(e.bytes().data(), e.bytes().size());
    ADD_FAILURE() << "expected FormatError";
  } catch (const titans::FormatError& err) {
    EXPECT_NE(std::string(err.what()).find("vocab is 9223372036854775807"), std::string::npos) << err.what();
  }
}

// The same under an address-space limit of 1 GiB, in a child process: the load must end in
// FormatError, not std::bad_alloc or an out-of-memory kill. (Sanitizers reserve terabytes of
// shadow memory, so the limit cannot apply to them.)
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define TITANS_TEST_NO_RLIMIT 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define TITANS_TEST_NO_RLIMIT 1
#endif
#endif

TEST(ModelCheckpoint, AFileDeclaringAHugeModelFailsCleanlyUnderAMemoryLimit) {
#ifdef TITANS_TEST_NO_RLIMIT
  GTEST_SKIP() << "an address-space limit does not apply under the sanitizers";
#else
  const auto bytes = huge_model_file();
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    rlimit lim{};
    lim.rlim_cur = lim.rlim_max = rlim_t(1) << 30;
    if (setrlimit(RLIMIT_AS, &lim) != 0) _exit(10);
    int code = 0;
    try {
      titans::load_model_from_memory<float>(bytes.data(), bytes.size());
      code = 1;
    } catch (const titans::FormatError&) {
      code = 0;
    } catch (const std::bad_alloc&) {
      code = 2;
    } catch (...) {
      code = 3;
    }
    _exit(code);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "the child was killed by signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: loaded; 2: std::bad_alloc; 3: another exception; 10: setrlimit failed";
#endif
}

}  // namespace

#else

TEST(ModelCheckpoint, SkippedWithoutNlohmannJson) { GTEST_SKIP() << "checkpoints need nlohmann-json"; }

#endif
