// SPDX-License-Identifier: Apache-2.0
// save_model / load_model: a whole model rebuilt from one file, and bad files and arguments.
#include <titans/titans.hpp>

#include <gtest/gtest.h>

#if !defined(TITANS_NO_CHECKPOINT) && __has_include(<nlohmann/json.hpp>)

#include "support/temp_dir.hpp"

#include <string>
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

}  // namespace

#else

TEST(ModelCheckpoint, SkippedWithoutNlohmannJson) { GTEST_SKIP() << "checkpoints need nlohmann-json"; }

#endif
