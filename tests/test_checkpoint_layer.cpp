// SPDX-License-Identifier: Apache-2.0
// A layer, its optimizer state and a streaming session saved and restored through checkpoints,
// with the config carried in the file's metadata.
#include <titans/titans.hpp>

#include <gtest/gtest.h>

#if __has_include(<nlohmann/json.hpp>)

namespace {

using titans::Matrix;

// Two memory heads of width 4.
titans::NeuralMemoryConfig small_config() {
  titans::NeuralMemoryConfig cfg;
  cfg.dim = 8;
  cfg.heads = 2;
  return cfg;
}

TEST(CheckpointLayer, ConfigParamsAndOptimizerRoundTrip) {
  titans::NeuralMemoryConfig cfg = small_config();
  cfg.depth = 3;
  cfg.activation = titans::Activation::gelu;
  cfg.per_chunk_gates = true;
  cfg.theta_max = 0.3;
  cfg.alpha_max = 0.25;
  cfg.eta_max = 0;  // the no-momentum ablation is a valid config and round-trips
  titans::NeuralMemory<float> layer(cfg);
  auto p = layer.init(9);
  titans::AdamW<titans::NeuralMemoryParams<float>> opt(p);
  auto g = titans::zeros_like(p);
  g.w_k.setConstant(0.5f);
  opt.step(p, g);

  const auto bytes = titans::save_checkpoint_to_memory(p, titans::to_metadata(cfg));
  const auto opt_bytes = titans::save_checkpoint_to_memory(opt.state());

  const auto meta = titans::read_checkpoint_metadata_from_memory(bytes.data(), bytes.size());
  const titans::NeuralMemoryConfig back = titans::neural_memory_config_from_metadata(meta);
  EXPECT_EQ(back.depth, 3);
  EXPECT_EQ(back.activation, titans::Activation::gelu);
  EXPECT_TRUE(back.per_chunk_gates);
  EXPECT_DOUBLE_EQ(back.theta_max, 0.3);
  EXPECT_EQ(back.alpha_max, 0.25);
  EXPECT_EQ(back.eta_max, 0.0);

  // Load into a double model built from the file's config: the F32 values convert exactly.
  titans::NeuralMemory<double> layer2(back);
  auto p2 = layer2.init(1);
  titans::load_checkpoint_from_memory(bytes, p2);
  EXPECT_EQ(p2.memory_init[2], p.memory_init[2].cast<double>());

  titans::AdamW<titans::NeuralMemoryParams<float>> opt2(p);
  titans::load_checkpoint_from_memory(opt_bytes, opt2.state());
  EXPECT_EQ(opt2.steps(), 1);
  auto pa = p, pb = p;
  opt.step(pa, g);
  opt2.step(pb, g);
  EXPECT_EQ(pa.w_k, pb.w_k);
}

TEST(CheckpointLayer, SessionStateResumesTheStream) {
  titans::NeuralMemoryConfig cfg = small_config();
  cfg.chunk_size = 4;
  titans::NeuralMemory<double> layer(cfg);
  const auto p = layer.init(2);
  titans::detail::Rng rng(1);
  Matrix<double> x(8, 11);
  rng.fill_normal(x, 1.0);
  auto s = layer.initial_state(p);
  const Matrix<double> y = layer.forward(p, x, s);

  auto s1 = layer.initial_state(p);
  layer.forward(p, x.leftCols(6), s1);  // stops inside a chunk: chunk_start is part of the state
  const auto bytes = titans::save_checkpoint_to_memory(s1);
  auto s2 = s1;  // same structure (a loader fills tensors by name)
  titans::set_zero(s2);
  titans::load_checkpoint_from_memory(bytes, s2);
  auto s1_copy = s1;
  const Matrix<double> resumed = layer.forward(p, x.rightCols(5), s2);
  EXPECT_EQ(resumed, layer.forward(p, x.rightCols(5), s1_copy));  // bit for bit
  EXPECT_LT((resumed - y.rightCols(5)).cwiseAbs().maxCoeff(), 1e-12);  // == the unsplit stream
}

// A file written before the forgetting gate's bound has no neural_memory.alpha_max: it loads
// with α_max = 1, the behaviour it was written with; a bad value is named.
TEST(CheckpointLayer, FileWithoutAlphaMaxLoadsUnbounded) {
  titans::NeuralMemoryConfig cfg = small_config();
  cfg.alpha_max = 0.5;
  titans::NeuralMemory<float> layer(cfg);
  const auto p = layer.init(3);
  auto meta = titans::to_metadata(cfg);
  ASSERT_EQ(meta.at("neural_memory.alpha_max"), "0.5");
  ASSERT_EQ(meta.erase("neural_memory.alpha_max"), 1u);
  const auto bytes = titans::save_checkpoint_to_memory(p, meta);
  const auto back =
      titans::neural_memory_config_from_metadata(titans::read_checkpoint_metadata_from_memory(bytes.data(), bytes.size()));
  EXPECT_EQ(back.alpha_max, 1.0);
  EXPECT_EQ(back.eta_max, cfg.eta_max);
  meta["neural_memory.alpha_max"] = "1.5";
  try {
    titans::neural_memory_config_from_metadata(meta);
    ADD_FAILURE() << "no exception";
  } catch (const titans::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("alpha_max is 1.5"), std::string::npos) << e.what();
  }
}

// The attentional bias (docs/MATH.md §11) and its parameters are recorded; a huber layer's
// threshold projection is saved and loaded with the rest. A file written before the biases has no
// bias keys and loads as l2; an unknown bias is named.
TEST(CheckpointLayer, BiasRoundTripsAndOldFilesLoadAsL2) {
  titans::NeuralMemoryConfig cfg = small_config();
  cfg.bias = titans::AttentionalBias::huber;
  cfg.threshold_max = 2.5;
  cfg.bias_p = 1.5;  // recorded even though only lp reads it
  cfg.bias_eps = 1e-4;
  titans::NeuralMemory<double> layer(cfg);
  const auto p = layer.init(4);
  ASSERT_EQ(p.w_delta.rows(), cfg.heads);
  auto meta = titans::to_metadata(cfg);
  EXPECT_EQ(meta.at("neural_memory.bias"), "huber");
  EXPECT_EQ(meta.at("neural_memory.threshold_max"), "2.5");
  const auto bytes = titans::save_checkpoint_to_memory(p, meta);
  const auto back =
      titans::neural_memory_config_from_metadata(titans::read_checkpoint_metadata_from_memory(bytes.data(), bytes.size()));
  EXPECT_EQ(back.bias, titans::AttentionalBias::huber);
  EXPECT_EQ(back.threshold_max, 2.5);
  EXPECT_EQ(back.bias_p, 1.5);
  EXPECT_EQ(back.bias_eps, 1e-4);
  titans::NeuralMemory<double> layer2(back);
  auto p2 = layer2.init(1);
  titans::load_checkpoint_from_memory(bytes, p2);
  EXPECT_EQ(p2.w_delta, p.w_delta);
  EXPECT_EQ(p2.b_delta, p.b_delta);

  cfg.bias = titans::AttentionalBias::lp;
  cfg.bias_p = 3;
  meta = titans::to_metadata(cfg);
  EXPECT_EQ(meta.at("neural_memory.bias"), "lp");
  EXPECT_EQ(titans::neural_memory_config_from_metadata(meta).bias, titans::AttentionalBias::lp);
  for (const char* key : {"neural_memory.bias", "neural_memory.bias_p", "neural_memory.bias_eps",
                          "neural_memory.threshold_max"})
    ASSERT_EQ(meta.erase(key), 1u) << key;
  const auto old = titans::neural_memory_config_from_metadata(meta);
  EXPECT_EQ(old.bias, titans::AttentionalBias::l2);
  meta["neural_memory.bias"] = "l1";
  try {
    titans::neural_memory_config_from_metadata(meta);
    ADD_FAILURE() << "no exception";
  } catch (const titans::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("neural_memory.bias"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("l2, huber, huber_radial or lp"), std::string::npos) << e.what();
  }
  meta["neural_memory.bias"] = "lp";
  meta["neural_memory.bias_p"] = "0.5";
  try {
    titans::neural_memory_config_from_metadata(meta);
    ADD_FAILURE() << "no exception";
  } catch (const titans::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("bias_p is 0.5"), std::string::npos) << e.what();
  }
}

TEST(CheckpointLayer, BadMetadataIsNamed) {
  auto meta = titans::to_metadata(titans::NeuralMemoryConfig{});
  meta.erase("neural_memory.depth");
  try {
    titans::neural_memory_config_from_metadata(meta);
    ADD_FAILURE() << "no exception";
  } catch (const titans::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("neural_memory.depth"), std::string::npos);
  }
  meta = titans::to_metadata(titans::NeuralMemoryConfig{});
  meta["neural_memory.heads"] = "4x";
  EXPECT_THROW(titans::neural_memory_config_from_metadata(meta), titans::FormatError);
  meta = titans::to_metadata(titans::NeuralMemoryConfig{});
  meta["neural_memory.heads"] = "3";  // does not divide 256
  EXPECT_THROW(titans::neural_memory_config_from_metadata(meta), titans::InvalidArgument);
}

}  // namespace

#else
TEST(CheckpointLayer, SkippedWithoutNlohmannJson) { GTEST_SKIP() << "nlohmann-json is not installed"; }
#endif
