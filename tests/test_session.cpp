// SPDX-License-Identifier: Apache-2.0
// Sessions (io/session.hpp): a state saved at any cut and loaded into a fresh state of the same
// model, in a new process as here, resumes the stream exactly, at every level (layer, each block
// kind, a mixed stack, the model) and for generation; files of another model, corrupt files and
// states whose counters disagree are refused, naming what is wrong.
#include <titans/titans.hpp>

#include <gtest/gtest.h>

#if !defined(TITANS_NO_CHECKPOINT) && __has_include(<nlohmann/json.hpp>)

#include "support/edit_checkpoint.hpp"
#include "support/random_matrix.hpp"
#include "support/temp_dir.hpp"

#include <map>
#include <string>
#include <vector>

namespace {

using titans::BlockConfig;
using titans::BlockKind;
using titans::Index;
using titans::Matrix;
using titans_test::random_matrix;
using Bytes = std::vector<std::uint8_t>;

constexpr Index kDim = 8;
constexpr Index kT = 23;

// Chunks of 3, segments of 5, a window of 4, 2 persistent tokens, conv kernel 3: the cuts below
// fall at and inside each of them.
BlockConfig small_block(BlockKind kind) {
  BlockConfig c;
  c.kind = kind;
  c.dim = kDim;
  c.attention_heads = 2;
  c.window = 4;
  c.segment = 5;
  c.persistent = 2;
  c.ffn_hidden = 12;
  c.attention_block = 2;
  c.memory.dim = kDim;
  c.memory.heads = 2;
  c.memory.depth = 2;
  c.memory.expansion = 2;
  c.memory.chunk_size = 3;
  c.memory.conv_kernel = 3;
  c.memory.theta_max = 0.5;
  return c;
}

// Cuts at chunk ends (3, 6, 9, 12, 15), segment ends (5, 10, 15, 20), inside all of them, and at
// the edges (0: nothing seen; kT: everything).
const std::vector<Index> kCuts = {0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 13, 15, 20, 22, kT};

// Parameters whose gates and memory updates matter (default init writes almost nothing).
template <class Module>
typename Module::Params lively(const Module& m, std::uint64_t seed) {
  auto p = m.init(seed);
  titans::detail::Rng rng(seed + 99);
  p.for_each([&](const std::string& name, auto& t) {
    if (name.find("b_theta") != std::string::npos) t.setConstant(1.0);
    if (name.find("b_alpha") != std::string::npos) t.setConstant(-2.0);
    if (name.find("w_alpha") != std::string::npos || name.find("w_theta") != std::string::npos ||
        name.find("w_eta") != std::string::npos) {
      Matrix<double> n(t.rows(), t.cols());
      rng.fill_normal(n, 0.3);
      t += n;
    }
  });
  return p;
}

// The stream split at `cut`: the first part's state is saved, loaded into a fresh state and
// the rest runs from it; `run(module, params, state, from, to)` returns the outputs of [from, to).
template <class Module, class Run>
void expect_resumes(const Module& m, const typename Module::Params& p, Run run, const Matrix<double>& unsplit) {
  for (Index cut : kCuts) {
    SCOPED_TRACE("cut at " + std::to_string(cut));
    auto live = m.initial_state(p);
    if (cut > 0) run(m, p, live, 0, cut);
    const Bytes bytes = titans::save_session_to_memory(m, p, live, {{"note", "a"}});
    auto resumed = titans::load_session_from_memory(bytes, m, p);
    EXPECT_EQ(titans::save_session_to_memory(m, p, resumed, {{"note", "a"}}), bytes) << "load is not save's inverse";
    if (cut == kT) continue;
    const Matrix<double> a = run(m, p, resumed, cut, kT);
    const Matrix<double> b = run(m, p, live, cut, kT);
    EXPECT_EQ(a, b) << "the resumed state differs from the live one";
    // The split itself regroups the chunk sums (the session adds nothing: a == b above).
    const double scale = std::max(1.0, unsplit.cwiseAbs().maxCoeff());
    EXPECT_LT((a - unsplit.rightCols(kT - cut)).cwiseAbs().maxCoeff(), 1e-12 * scale);
  }
}

TEST(Session, LayerResumesAtEveryCut) {
  titans::NeuralMemoryConfig c = small_block(BlockKind::lmm).memory;
  const titans::NeuralMemory<double> layer(c);
  const auto p = lively(layer, 3);
  const Matrix<double> x = random_matrix<double>(kDim, kT, 4);
  auto s = layer.initial_state(p);
  const Matrix<double> y = layer.forward(p, x, s);
  expect_resumes(
      layer, p,
      [&](const auto& m, const auto& pp, auto& st, Index a, Index b) { return m.forward(pp, x.middleCols(a, b - a), st); },
      y);
}

TEST(Session, EveryBlockKindResumesAtEveryCut) {
  std::vector<BlockConfig> configs;
  for (BlockKind kind : {BlockKind::lmm, BlockKind::mac, BlockKind::mag, BlockKind::mal, BlockKind::swa})
    configs.push_back(small_block(kind));
  for (Index nl : {3, 7}) {  // MAC's Figure 3a form: fewer and more memory tokens than a segment's 5 tokens
    configs.push_back(small_block(BlockKind::mac));
    configs.back().memory_tokens = nl;
  }
  for (const BlockConfig& cfg : configs) {
    SCOPED_TRACE(std::string(titans::to_string(cfg.kind)) + " memory_tokens " + std::to_string(cfg.memory_tokens));
    const titans::Block<double> blk(cfg);
    const auto p = lively(blk, 5);
    const Matrix<double> x = random_matrix<double>(kDim, kT, 6);
    auto s = blk.initial_state(p);
    const Matrix<double> y = blk.forward(p, x, s);
    expect_resumes(
        blk, p,
        [&](const auto& m, const auto& pp, auto& st, Index a, Index b) {
          return m.forward(pp, x.middleCols(a, b - a), st);
        },
        y);
  }
}

TEST(Session, MixedStackResumesAtEveryCut) {
  const titans::BlockStack<double> st(small_block(BlockKind::mac),
                                      {BlockKind::mac, BlockKind::mag, BlockKind::mal, BlockKind::lmm, BlockKind::swa});
  const auto p = lively(st, 7);
  const Matrix<double> x = random_matrix<double>(kDim, kT, 8);
  auto s = st.initial_state(p);
  const Matrix<double> y = st.forward(p, x, s);
  expect_resumes(
      st, p,
      [&](const auto& m, const auto& pp, auto& sx, Index a, Index b) { return m.forward(pp, x.middleCols(a, b - a), sx); },
      y);
}

titans::ModelConfig small_model() {
  titans::ModelConfig c;
  c.vocab = 11;
  c.layers = {BlockKind::mac, BlockKind::mag, BlockKind::mal, BlockKind::lmm, BlockKind::swa};
  c.block = small_block(BlockKind::mac);
  return c;
}

std::vector<int> some_tokens(Index n, std::uint64_t seed) {
  titans::detail::Rng rng(seed);
  std::vector<int> t(static_cast<std::size_t>(n));
  for (int& v : t) v = static_cast<int>(rng.below(11));
  return t;
}

TEST(Session, ModelResumesAtEveryCutThroughAFile) {
  const titans::TitansModel<double> model(small_model());
  const auto p = lively(model, 9);
  const std::vector<int> tokens = some_tokens(kT, 10);
  auto s = model.initial_state(p);
  const Matrix<double> logits = model.forward(p, tokens, s);
  const titans_test::TempDir dir;
  const std::string path = (dir.path() / "chat.session").string();
  for (Index cut : kCuts) {
    SCOPED_TRACE("cut at " + std::to_string(cut));
    auto live = model.initial_state(p);
    if (cut > 0) model.forward(p, std::vector<int>(tokens.begin(), tokens.begin() + cut), live);
    titans::save_session(path, model, p, live, {{"user", "me"}});
    auto resumed = titans::load_session(path, model, p);
    EXPECT_EQ(resumed.position, cut);
    EXPECT_EQ(titans::read_checkpoint_metadata(path).at("user"), "me");
    if (cut == kT) continue;
    const std::vector<int> tail(tokens.begin() + cut, tokens.end());
    const Matrix<double> rest = model.forward(p, tail, resumed);
    EXPECT_EQ(rest, model.forward(p, tail, live)) << "the resumed state differs from the live one";
    // The split itself (with or without a session) reorders the chunk sums: through five blocks
    // with θ ≈ 0.37 the logits (|l| ≤ 3.5) move by up to 4.4e-12.
    EXPECT_LT((rest - logits.rightCols(kT - cut)).cwiseAbs().maxCoeff(), 1e-11);
  }
}

// A chat: the model answers a first message, the session is saved (here, through bytes), and the
// second message is answered from the loaded session; the answers equal those of one process.
TEST(Session, GenerationAfterAResumeEqualsGenerationWithoutOne) {
  const titans::TitansModel<double> model(small_model());
  const auto p = lively(model, 11);
  const std::vector<int> first = some_tokens(8, 12), second = some_tokens(5, 13);
  for (const titans::SamplingOptions& opts : {titans::SamplingOptions{0.0, 0, 1}, titans::SamplingOptions{0.9, 5, 3}}) {
    SCOPED_TRACE("temperature " + std::to_string(opts.temperature));
    auto s1 = model.initial_state(p);
    const std::vector<int> a1 = titans::generate(model, p, s1, first, 6, opts);
    const std::vector<int> a2 = titans::generate(model, p, s1, second, 9, opts);

    auto s2 = model.initial_state(p);
    EXPECT_EQ(titans::generate(model, p, s2, first, 6, opts), a1);
    const Bytes saved = titans::save_session_to_memory(model, p, s2);
    auto resumed = titans::load_session_from_memory(saved, model, p);
    EXPECT_EQ(titans::generate(model, p, resumed, second, 9, opts), a2);
  }
}

// --- refusals -------------------------------------------------------------------------------

using Edited = titans_test::EditedCheckpoint;
Edited edit(const Bytes& bytes) { return titans_test::edit_checkpoint(bytes); }

template <class E, class F>
void expect_refused(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one naming '" << needle << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

TEST(Session, FilesOfAnotherModelAreRefused) {
  const titans::TitansModel<double> model(small_model());
  const auto p = lively(model, 13);
  auto s = model.initial_state(p);
  model.forward(p, some_tokens(7, 14), s);
  const Bytes bytes = titans::save_session_to_memory(model, p, s);

  titans::ModelConfig other = small_model();
  other.block.window = 3;  // the same tensors' shapes, another model
  const titans::TitansModel<double> m2(other);
  expect_refused<titans::InvalidArgument>([&] { titans::load_session_from_memory(bytes, m2, p); },
                                          "'config.block.window' is 4 in the session, 3 in this model");
  auto p2 = p;
  p2.embedding(0, 0) += 1e-9;
  expect_refused<titans::InvalidArgument>([&] { titans::load_session_from_memory(bytes, model, p2); },
                                          "saved with other parameters");
  const titans::TitansModel<float> mf(small_model());
  const auto pf = mf.init(1);
  expect_refused<titans::InvalidArgument>([&] { titans::load_session_from_memory(bytes, mf, pf); },
                                          "scalar F64, this one is F32");
  const titans::Block<double> blk(small_block(BlockKind::mac));
  const auto pb = blk.init(1);
  expect_refused<titans::InvalidArgument>([&] { titans::load_session_from_memory(bytes, blk, pb); },
                                          "is of a TitansModel, not of a Block");
  // A MAC block's session does not resume in a block with another number of memory tokens.
  BlockConfig three = small_block(BlockKind::mac), four = three;
  three.memory_tokens = 3;
  four.memory_tokens = 4;
  const titans::Block<double> b3(three), b4(four);
  const auto p3 = b3.init(1), p4 = b4.init(1);
  auto s3 = b3.initial_state(p3);
  b3.forward(p3, random_matrix<double>(kDim, 7, 15), s3);
  expect_refused<titans::InvalidArgument>(
      [&] { titans::load_session_from_memory(titans::save_session_to_memory(b3, p3, s3), b4, p4); },
      "'config.block.memory_tokens' is 3 in the session, 4 in this model");
  // A plain checkpoint is not a session.
  expect_refused<titans::FormatError>(
      [&] { titans::load_session_from_memory(titans::save_checkpoint_to_memory(p), model, p); },
      "not a session file");
}

TEST(Session, CorruptSessionsAreRefusedNamingWhatIsWrong) {
  const titans::Block<double> blk(small_block(BlockKind::mac));
  const auto p = lively(blk, 15);
  auto s = blk.initial_state(p);
  blk.forward(p, random_matrix<double>(kDim, 7, 16), s);  // inside a chunk (7 % 3) and a segment (7 % 5)
  const Bytes good = titans::save_session_to_memory(blk, p, s);
  auto load = [&](const Bytes& b) { return titans::load_session_from_memory(b, blk, p); };
  ASSERT_NO_THROW(load(good));

  // The memory's last token is pending (docs/MATH.md §3.3): its pending tensors are checked.
  ASSERT_EQ(s.memory.heads[0].pending_tokens(), 1);
  Edited e = edit(good);
  e.tensors.erase("memory.head0.pending.gates");  // keys and signals of one token, gates of none
  expect_refused<titans::ShapeError>([&] { load(e.bytes()); }, "state.pending_keys has shape");
  e = edit(good);
  e.tensors["memory.head1.pending.keys"].conservativeResize(Eigen::NoChange, 2);
  expect_refused<titans::ShapeError>([&] { load(e.bytes()); }, "state.pending_keys has shape");
  e = edit(good);
  e.tensors["memory.head1.pending.gates"](0, 0) = 2;  // α outside [0, 1]
  expect_refused<titans::NumericError>([&] { load(e.bytes()); }, "state.pending_gates (alpha, eta)");
  // Three pending tokens would complete the chunk of 3: refused, not applied.
  e = edit(good);
  for (const char* t : {"memory.head0.pending.keys", "memory.head0.pending.delta", "memory.head0.pending.gates"}) {
    Matrix<double>& m = e.tensors[t];
    m.conservativeResize(Eigen::NoChange, 3);
    m.rightCols(2).setConstant(0.5);
  }
  expect_refused<titans::InvalidArgument>([&] { load(e.bytes()); }, "pending tokens must lie within one chunk");
  // The settled form has no pending tensors, as the sessions written before them: it loads.
  auto settled = s;
  for (auto& h : settled.memory.heads) titans::memory_state_settle(blk.config().memory.memory(), 3, h);
  const Bytes settled_bytes = titans::save_session_to_memory(blk, p, settled);
  e = edit(settled_bytes);
  for (const char* t : {"memory.head0.pending.keys", "memory.head1.pending.gates"}) EXPECT_EQ(e.tensors.count(t), 0u) << t;
  ASSERT_NO_THROW(load(e.bytes()));
  e.tensors.erase("memory.head1.chunk_start.w2");
  expect_refused<titans::FormatError>([&] { load(e.bytes()); }, "no tensor 'memory.head1.chunk_start.w2'");
  e = edit(settled_bytes);
  e.tensors.erase("memory.head1.chunk_start.w1");
  expect_refused<titans::FormatError>([&] { load(e.bytes()); }, "'memory.head1.chunk_start.w2' without the rest");
  e = edit(good);
  e.tensors.erase("memory.head0.momentum.w1");
  expect_refused<titans::FormatError>([&] { load(e.bytes()); }, "no tensor 'memory.head0.momentum.w1'");
  e = edit(good);
  e.tensors["memory.head0.extra"] = Matrix<double>::Zero(1, 1);
  expect_refused<titans::FormatError>([&] { load(e.bytes()); }, "'memory.head0.extra' that this model's state");
  e = edit(good);
  e.tensors["memory.conv_tail"] = Matrix<double>::Zero(3 * kDim, 3);
  expect_refused<titans::ShapeError>([&] { load(e.bytes()); }, "'memory.conv_tail' has shape [24, 3]");
  e = edit(good);
  e.tensors["attention.k"] = Matrix<double>::Zero(kDim + 1, 4);
  expect_refused<titans::ShapeError>([&] { load(e.bytes()); }, "'attention.k' has shape [9, 4]");
  // Counters that disagree with each other or with the tensors.
  e = edit(good);
  e.metadata["state.position"] = "8";
  expect_refused<titans::InvalidArgument>([&] { load(e.bytes()); }, "position");
  e = edit(good);
  e.metadata["state.memory.head1.position"] = "6";
  expect_refused<titans::InvalidArgument>([&] { load(e.bytes()); }, "a head's position (6)");
  e = edit(good);
  e.tensors["attention.k"] = Matrix<double>::Zero(kDim, 2);
  e.tensors["attention.v"] = Matrix<double>::Zero(kDim, 2);
  expect_refused<titans::InvalidArgument>([&] { load(e.bytes()); }, "holds 2 keys at position 7");
  e = edit(good);
  e.metadata["state.primed"] = "true";
  expect_refused<titans::InvalidArgument>([&] { load(e.bytes()); }, "state.primed is true");
  e = edit(good);
  e.metadata["state.position"] = "-1";
  expect_refused<titans::FormatError>([&] { load(e.bytes()); }, "'state.position' is -1");
  e = edit(good);
  e.metadata["state.position"] = "7x";
  expect_refused<titans::FormatError>([&] { load(e.bytes()); }, "not an integer");
  e = edit(good);
  e.metadata.erase("state.attention.position");
  expect_refused<titans::FormatError>([&] { load(e.bytes()); }, "'state.attention.position'");
  e = edit(good);
  e.metadata["state.memory.bogus"] = "1";
  expect_refused<titans::FormatError>([&] { load(e.bytes()); }, "'state.memory.bogus'");
  // Truncated or damaged bytes.
  Bytes cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(good.size() / 2));
  EXPECT_THROW(load(cut), titans::FormatError);
  Bytes nan = good;
  for (std::size_t i = nan.size() - 8; i < nan.size(); ++i) nan[i] = 0xff;  // the last F64 becomes a NaN
  expect_refused<titans::NumericError>([&] { load(nan); }, "non-finite");
}

TEST(Session, SavingChecksTheStateAndTheExtraKeys) {
  const titans::Block<double> blk(small_block(BlockKind::swa));
  const auto p = blk.init(1);
  auto s = blk.initial_state(p);
  blk.forward(p, random_matrix<double>(kDim, 3, 17), s);
  auto bad = s;
  bad.position = 2;
  expect_refused<titans::InvalidArgument>([&] { titans::save_session_to_memory(blk, p, bad); }, "holds 3 keys");
  expect_refused<titans::InvalidArgument>([&] { titans::save_session_to_memory(blk, p, s, {{"state.x", "1"}}); },
                                          "'state.x' starts with 'state.'");
  const titans_test::TempDir dir;
  const std::string path = (dir.path() / "s.session").string();
  EXPECT_THROW(titans::save_session(path, blk, p, bad), titans::InvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(path));
  expect_refused<titans::IoError>([&] { titans::load_session(path, blk, p); }, path);
}

}  // namespace

#endif
