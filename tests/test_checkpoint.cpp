// SPDX-License-Identifier: Apache-2.0
//
// Tests of checkpoint.hpp: safetensors save/load of parameter sets, the on-disk layout checked
// against hand-encoded bytes, atomic saves, and one test per kind of hostile input.

#if __has_include(<nlohmann/json.hpp>)

#include <titans/checkpoint.hpp>
#include <titans/detail/random.hpp>

#include <gtest/gtest.h>

#include "support/temp_dir.hpp"

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

namespace {

using titans::Dtype;
using titans::Index;
using titans::LoadOptions;
using titans::Matrix;
using Bytes = std::vector<std::uint8_t>;
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Parameter sets used by the tests.
// ---------------------------------------------------------------------------------------------

/// A toy module: matrices of different shapes, dotted names, an (n, 1) vector and a 1x1 scalar.
template <class Scalar>
struct Toy {
  using scalar_type = Scalar;
  Matrix<Scalar> w_q = Matrix<Scalar>::Zero(3, 4);     // "attn.w_q"
  Matrix<Scalar> w1 = Matrix<Scalar>::Zero(4, 2);      // "memory.h0.w1"
  Matrix<Scalar> bias = Matrix<Scalar>::Zero(4, 1);    // "attn.bias"
  Matrix<Scalar> gate = Matrix<Scalar>::Zero(1, 1);    // "gate"
  Matrix<Scalar> tokens = Matrix<Scalar>::Zero(1, 5);  // "persistent.tokens"

  template <class F>
  void for_each(F&& f) {
    f(std::string("attn.w_q"), w_q);
    f(std::string("memory.h0.w1"), w1);
    f(std::string("attn.bias"), bias);
    f(std::string("gate"), gate);
    f(std::string("persistent.tokens"), tokens);
  }
  template <class F>
  void for_each(F&& f) const {
    f(std::string("attn.w_q"), w_q);
    f(std::string("memory.h0.w1"), w1);
    f(std::string("attn.bias"), bias);
    f(std::string("gate"), gate);
    f(std::string("persistent.tokens"), tokens);
  }
};

/// A parameter set with arbitrary names and shapes (order of the vector = enumeration order).
template <class Scalar>
struct NamedSet {
  using scalar_type = Scalar;
  std::vector<std::pair<std::string, Matrix<Scalar>>> tensors;

  template <class F>
  void for_each(F&& f) {
    for (auto& nt : tensors) f(nt.first, nt.second);
  }
  template <class F>
  void for_each(F&& f) const {
    for (const auto& nt : tensors) f(nt.first, nt.second);
  }
  Matrix<Scalar>& at(const std::string& name) {
    for (auto& nt : tensors) {
      if (nt.first == name) return nt.second;
    }
    throw std::out_of_range(name);
  }
};

template <class P>
void fill_random(P& p, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, 3.0);
  using Scalar = typename P::scalar_type;
  p.for_each([&](const std::string&, Matrix<Scalar>& t) {
    for (Index j = 0; j < t.cols(); ++j) {
      for (Index i = 0; i < t.rows(); ++i) t(i, j) = static_cast<Scalar>(dist(gen));
    }
  });
}

template <class P>
std::vector<Matrix<typename P::scalar_type>> tensors_of(const P& p) {
  std::vector<Matrix<typename P::scalar_type>> out;
  p.for_each([&](const std::string&, const Matrix<typename P::scalar_type>& t) { out.push_back(t); });
  return out;
}

/// Exact equality of two parameter sets of the same type (names, shapes, every bit of value).
template <class P>
void expect_identical(const P& a, const P& b) {
  const auto ta = tensors_of(a), tb = tensors_of(b);
  ASSERT_EQ(ta.size(), tb.size());
  for (std::size_t k = 0; k < ta.size(); ++k) {
    ASSERT_EQ(ta[k].rows(), tb[k].rows()) << "tensor " << k;
    ASSERT_EQ(ta[k].cols(), tb[k].cols()) << "tensor " << k;
    EXPECT_TRUE(ta[k] == tb[k]) << "tensor " << k << "\n" << ta[k] << "\nvs\n" << tb[k];
  }
}

// ---------------------------------------------------------------------------------------------
// Independent byte construction (no use of the library's writer).
// ---------------------------------------------------------------------------------------------

void append_u64(Bytes& b, std::uint64_t v) {
  for (int k = 0; k < 8; ++k) b.push_back(static_cast<std::uint8_t>((v >> (8 * k)) & 0xffu));
}

Bytes f32_bytes(std::initializer_list<float> values) {
  Bytes b;
  for (float x : values) {
    std::uint32_t u;
    std::memcpy(&u, &x, 4);
    for (int k = 0; k < 4; ++k) b.push_back(static_cast<std::uint8_t>((u >> (8 * k)) & 0xffu));
  }
  return b;
}

Bytes f64_bytes(std::initializer_list<double> values) {
  Bytes b;
  for (double x : values) {
    std::uint64_t u;
    std::memcpy(&u, &x, 8);
    append_u64(b, u);
  }
  return b;
}

Bytes concat(Bytes a, const Bytes& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

/// A safetensors file: 8-byte little-endian header length, the header text, the data buffer.
Bytes make_file(const std::string& header, const Bytes& data) {
  Bytes b;
  append_u64(b, header.size());
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

// ---------------------------------------------------------------------------------------------
// Files on disk.
// ---------------------------------------------------------------------------------------------

/// A fresh empty directory, removed when the test ends.
using titans_test::TempDir;

// One read of the whole file (byte-by-byte stream iterators took 20 s for the 8 MB files of the
// kill test in the sanitizer build).
Bytes read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("read_bytes: cannot open " + p.string());
  const auto size = static_cast<std::size_t>(in.tellg());
  Bytes out(size);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(size));
  if (!in) throw std::runtime_error("read_bytes: cannot read " + p.string());
  return out;
}

void write_bytes(const fs::path& p, const Bytes& b) {
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// ---------------------------------------------------------------------------------------------
// Typed tests: float and double.
// ---------------------------------------------------------------------------------------------

template <class Scalar>
class CheckpointTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(CheckpointTyped, Scalars);

TYPED_TEST(CheckpointTyped, RoundTripInMemoryIsExact) {
  Toy<TypeParam> a;
  fill_random(a, 1);
  const Bytes bytes = titans::save_checkpoint_to_memory(a);
  Toy<TypeParam> b;  // zeros
  const auto meta = titans::load_checkpoint_from_memory(bytes, b);
  EXPECT_TRUE(meta.empty());
  expect_identical(a, b);
}

TYPED_TEST(CheckpointTyped, RoundTripThroughFileWithMetadata) {
  TempDir dir;
  const std::string path = (dir.path() / "toy.safetensors").string();
  Toy<TypeParam> a;
  fill_random(a, 2);
  const std::map<std::string, std::string> meta = {
      {"step", "1200"}, {"config", R"({"dim": 64, "note": "quotes \" and unicode é"})"}, {"empty", ""}};
  titans::save_checkpoint(path, a, meta);

  Toy<TypeParam> b;
  EXPECT_EQ(titans::load_checkpoint(path, b), meta);
  expect_identical(a, b);
  EXPECT_EQ(titans::read_checkpoint_metadata(path), meta);

  const auto list = titans::list_checkpoint(path);
  ASSERT_EQ(list.size(), 5u);
  EXPECT_EQ(list[0].name, "attn.bias");  // sorted by name
  EXPECT_EQ(list[0].dtype, (std::is_same_v<TypeParam, float> ? "F32" : "F64"));
  EXPECT_EQ(list[0].shape, (std::vector<std::uint64_t>{4, 1}));
  EXPECT_EQ(list[1].name, "attn.w_q");
  EXPECT_EQ(list[1].shape, (std::vector<std::uint64_t>{3, 4}));
  EXPECT_EQ(list[2].name, "gate");
  EXPECT_EQ(list[2].shape, (std::vector<std::uint64_t>{1, 1}));
}

TYPED_TEST(CheckpointTyped, ExplicitDtypesAndCrossPrecisionLoads) {
  using Other = std::conditional_t<std::is_same_v<TypeParam, float>, double, float>;
  Toy<TypeParam> a;
  fill_random(a, 3);

  // F32 on disk: every value becomes float(x); loading into either precision gives static_cast of that.
  {
    const Bytes bytes = titans::save_checkpoint_to_memory(a, {}, Dtype::f32);
    EXPECT_EQ(titans::list_checkpoint_from_memory(bytes.data(), bytes.size())[0].dtype, "F32");
    Toy<TypeParam> same;
    Toy<Other> other;
    titans::load_checkpoint_from_memory(bytes, same);
    titans::load_checkpoint_from_memory(bytes, other);
    const auto ta = tensors_of(a), ts = tensors_of(same);
    const auto to = tensors_of(other);
    for (std::size_t k = 0; k < ta.size(); ++k) {
      const Matrix<float> rounded = ta[k].template cast<float>();
      EXPECT_TRUE(ts[k] == rounded.template cast<TypeParam>()) << "tensor " << k;
      EXPECT_TRUE(to[k] == rounded.template cast<Other>()) << "tensor " << k;
    }
  }
  // F64 on disk: exact for both, then static_cast into the model's scalar.
  {
    const Bytes bytes = titans::save_checkpoint_to_memory(a, {}, Dtype::f64);
    EXPECT_EQ(titans::list_checkpoint_from_memory(bytes.data(), bytes.size())[0].dtype, "F64");
    Toy<TypeParam> same;
    Toy<Other> other;
    titans::load_checkpoint_from_memory(bytes, same);
    titans::load_checkpoint_from_memory(bytes, other);
    expect_identical(a, same);
    const auto ta = tensors_of(a);
    const auto to = tensors_of(other);
    for (std::size_t k = 0; k < ta.size(); ++k) EXPECT_TRUE(to[k] == ta[k].template cast<Other>()) << "tensor " << k;
  }
}

TYPED_TEST(CheckpointTyped, HandWrittenFileLoads) {
  // Built from the format description only: row-major 2x3 F32, a 1-D F64 vector, a 0-D F32 scalar.
  const std::string header = R"({"layer.0.w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
                             R"("layer.0.b":{"dtype":"F64","shape":[2],"data_offsets":[24,40]},)"
                             R"("scale":{"shape":[],"data_offsets":[40,44],"dtype":"F32"},)"
                             R"("__metadata__":{"format":"pt"}})";
  const Bytes data =
      concat(concat(f32_bytes({1.f, 2.f, 3.f, 4.f, 5.f, 6.f}), f64_bytes({-0.5, 0.25})), f32_bytes({7.5f}));
  const Bytes file = make_file(header, data);

  NamedSet<TypeParam> p;
  p.tensors = {{"layer.0.w", Matrix<TypeParam>::Zero(2, 3)},
               {"layer.0.b", Matrix<TypeParam>::Zero(2, 1)},
               {"scale", Matrix<TypeParam>::Zero(1, 1)}};
  const auto meta = titans::load_checkpoint_from_memory(file, p);
  EXPECT_EQ(meta, (std::map<std::string, std::string>{{"format", "pt"}}));

  Matrix<TypeParam> w(2, 3);
  w << 1, 2, 3,  //
      4, 5, 6;
  EXPECT_TRUE(p.at("layer.0.w") == w) << p.at("layer.0.w");
  EXPECT_EQ(p.at("layer.0.b")(0, 0), TypeParam(-0.5));
  EXPECT_EQ(p.at("layer.0.b")(1, 0), TypeParam(0.25));
  EXPECT_EQ(p.at("scale")(0, 0), TypeParam(7.5));
}

// ---------------------------------------------------------------------------------------------
// The writer's layout, checked byte by byte.
// ---------------------------------------------------------------------------------------------

TEST(Checkpoint, WriterLayoutIsSafetensorsRowMajorAndAligned) {
  NamedSet<float> p;
  Matrix<float> m(2, 3);
  m << 1, 2, 3,  //
      4, 5, 6;
  Matrix<float> v(2, 1);
  v << 8, 9;
  p.tensors = {{"z.m", m}, {"a.v", v}};
  const Bytes bytes = titans::save_checkpoint_to_memory(p, {{"k", "v"}});

  ASSERT_GE(bytes.size(), 8u);
  std::uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | bytes[static_cast<std::size_t>(k)];
  EXPECT_EQ((8 + n) % 8, 0u) << "data must start 8-byte aligned";
  ASSERT_LE(8 + n, bytes.size());
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  const auto j = nlohmann::json::parse(header);  // trailing padding is spaces
  const auto expected = nlohmann::json::parse(R"({"__metadata__":{"k":"v"},)"
                                              R"("a.v":{"dtype":"F32","shape":[2,1],"data_offsets":[0,8]},)"
                                              R"("z.m":{"dtype":"F32","shape":[2,3],"data_offsets":[8,32]}})");
  EXPECT_EQ(j, expected) << header;
  EXPECT_EQ(header.find_first_not_of(' ', header.find_last_of('}') + 1), std::string::npos);

  const Bytes data(bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n), bytes.end());
  EXPECT_EQ(data, concat(f32_bytes({8, 9}), f32_bytes({1, 2, 3, 4, 5, 6})));
}

TEST(Checkpoint, EmptyParameterSetAndEmptyTensors) {
  NamedSet<double> none;
  const Bytes bytes = titans::save_checkpoint_to_memory(none);
  EXPECT_TRUE(titans::list_checkpoint_from_memory(bytes.data(), bytes.size()).empty());
  titans::load_checkpoint_from_memory(bytes, none);

  NamedSet<double> p;
  p.tensors = {{"e", Matrix<double>::Zero(0, 3)}, {"f", Matrix<double>::Constant(1, 2, 4.0)}};
  const Bytes b2 = titans::save_checkpoint_to_memory(p);
  NamedSet<double> q;
  q.tensors = {{"e", Matrix<double>::Zero(0, 3)}, {"f", Matrix<double>::Zero(1, 2)}};
  titans::load_checkpoint_from_memory(b2, q);
  expect_identical(p, q);
}

TEST(Checkpoint, LongDoubleIsStoredAsF64) {
  NamedSet<long double> p;
  p.tensors = {{"x", Matrix<long double>::Constant(2, 2, 0.1L)}};
  const Bytes bytes = titans::save_checkpoint_to_memory(p);
  EXPECT_EQ(titans::list_checkpoint_from_memory(bytes.data(), bytes.size())[0].dtype, "F64");
  NamedSet<long double> q;
  q.tensors = {{"x", Matrix<long double>::Zero(2, 2)}};
  titans::load_checkpoint_from_memory(bytes, q);
  EXPECT_EQ(q.at("x")(1, 1), static_cast<long double>(static_cast<double>(0.1L)));
}

TEST(Checkpoint, OptimizerStyleNamesRoundTrip) {
  NamedSet<float> state;
  state.tensors = {{"step", Matrix<float>::Constant(1, 1, 17)},
                   {"m.attn.w_q", Matrix<float>::Constant(3, 2, 0.5f)},
                   {"v.attn.w_q", Matrix<float>::Constant(3, 2, 0.25f)}};
  const Bytes bytes = titans::save_checkpoint_to_memory(state);
  NamedSet<float> fresh = state;
  titans::set_zero(fresh);
  titans::load_checkpoint_from_memory(bytes, fresh);
  expect_identical(state, fresh);
}

TEST(Checkpoint, AllowExtraIgnoresTensorsTheModelLacks) {
  NamedSet<double> big;
  big.tensors = {{"a", Matrix<double>::Constant(2, 2, 1.0)}, {"extra", Matrix<double>::Constant(3, 3, 2.0)}};
  const Bytes bytes = titans::save_checkpoint_to_memory(big);
  NamedSet<double> small;
  small.tensors = {{"a", Matrix<double>::Zero(2, 2)}};
  LoadOptions opts;
  opts.allow_extra = true;
  titans::load_checkpoint_from_memory(bytes, small, opts);
  EXPECT_TRUE(small.at("a") == Matrix<double>::Constant(2, 2, 1.0));
}

TEST(Checkpoint, UnsupportedDtypeOfAnIgnoredExtraTensorIsFine) {
  const Bytes file = make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                               R"("ids":{"dtype":"I64","shape":[2],"data_offsets":[4,20]}})",
                               concat(f32_bytes({3}), Bytes(16, 0)));
  NamedSet<float> p;
  p.tensors = {{"a", Matrix<float>::Zero(1, 1)}};
  LoadOptions opts;
  opts.allow_extra = true;
  titans::load_checkpoint_from_memory(file, p, opts);
  EXPECT_EQ(p.at("a")(0, 0), 3.f);
  const auto list = titans::list_checkpoint_from_memory(file.data(), file.size());
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[1].dtype, "I64");
  EXPECT_EQ(list[1].begin, 4u);
  EXPECT_EQ(list[1].end, 20u);
}

TEST(Checkpoint, UnknownEntryFieldsAreIgnored) {
  const Bytes file = make_file(R"({"a":{"dtype":"F32","note":"x","shape":[1],"extra":[1,"s"],"o":{"k":null},)"
                               R"("data_offsets":[0,4],"flag":true,"n":-1.5}})",
                               f32_bytes({5}));
  NamedSet<float> p;
  p.tensors = {{"a", Matrix<float>::Zero(1, 1)}};
  titans::load_checkpoint_from_memory(file, p);
  EXPECT_EQ(p.at("a")(0, 0), 5.f);
}

TEST(Checkpoint, GapsTrailingBytesAndOutOfOrderOffsetsAreAllowed) {
  const Bytes file = make_file(R"({"a":{"dtype":"F32","shape":[1,1],"data_offsets":[12,16]},)"
                               R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}   )",
                               concat(concat(f32_bytes({2}), Bytes(8, 0xAB)), concat(f32_bytes({1}), Bytes(5, 7))));
  NamedSet<float> p;
  p.tensors = {{"a", Matrix<float>::Zero(1, 1)}, {"b", Matrix<float>::Zero(1, 1)}};
  titans::load_checkpoint_from_memory(file, p);
  EXPECT_EQ(p.at("a")(0, 0), 1.f);
  EXPECT_EQ(p.at("b")(0, 0), 2.f);
}

// ---------------------------------------------------------------------------------------------
// Hostile input: one test per failure, checking the exception type, the message, and that the
// parameters are unchanged. The model is "a" (2, 2) then "b" (3, 1), both float.
// ---------------------------------------------------------------------------------------------

NamedSet<float> sentinel_model() {
  NamedSet<float> p;
  Matrix<float> a(2, 2);
  a << 11, 12, 13, 14;
  p.tensors = {{"a", a}, {"b", Matrix<float>::Constant(3, 1, -9)}};
  return p;
}

const std::string kEntryA = R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]})";
const std::string kEntryB = R"("b":{"dtype":"F32","shape":[3],"data_offsets":[16,28]})";
const Bytes kData = f32_bytes({1, 2, 3, 4, 5, 6, 7});

Bytes file_with(const std::string& entries, const Bytes& data = kData) { return make_file("{" + entries + "}", data); }

template <class Exc>
void expect_load_error(const Bytes& file, const std::string& needle, const LoadOptions& opts = {}) {
  NamedSet<float> p = sentinel_model();
  const NamedSet<float> before = p;
  try {
    titans::load_checkpoint_from_memory(file, p, opts);
    ADD_FAILURE() << "no exception; expected " << typeid(Exc).name() << " containing \"" << needle << "\"";
  } catch (const Exc& e) {
    EXPECT_EQ(typeid(e), typeid(Exc)) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message \"" << e.what() << "\" lacks \"" << needle << "\"";
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type " << typeid(e).name() << ": " << e.what();
  }
  expect_identical(p, before);
}

TEST(CheckpointHostile, ValidBaseFileLoads) {  // the baseline every hostile case below mutates
  NamedSet<float> p = sentinel_model();
  titans::load_checkpoint_from_memory(file_with(kEntryA + "," + kEntryB), p);
  EXPECT_EQ(p.at("a")(0, 1), 2.f);
  EXPECT_EQ(p.at("b")(2, 0), 7.f);
}

TEST(CheckpointHostile, ShorterThanLengthField) {
  const Bytes full = file_with(kEntryA + "," + kEntryB);
  for (std::size_t n = 0; n < 8; ++n) {
    expect_load_error<titans::FormatError>(Bytes(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(n)),
                                           "shorter than the 8-byte");
  }
  NamedSet<float> p = sentinel_model();
  EXPECT_THROW(titans::load_checkpoint_from_memory(nullptr, 0, p), titans::FormatError);
  EXPECT_THROW(titans::load_checkpoint_from_memory(nullptr, 5, p), titans::InvalidArgument);
}

TEST(CheckpointHostile, HeaderLengthPastEndOfInput) {
  Bytes f = file_with(kEntryA + "," + kEntryB);
  f.resize(8 + 10);  // truncated inside the header
  expect_load_error<titans::FormatError>(f, "runs past the end");
}

TEST(CheckpointHostile, HeaderLengthAbsurd) {
  for (std::uint64_t n : {std::uint64_t{1} << 63, ~std::uint64_t{0}, titans::checkpoint_max_header_bytes + 1}) {
    Bytes f;
    append_u64(f, n);
    f.resize(64, ' ');
    expect_load_error<titans::FormatError>(f, "exceeds the limit");
  }
}

TEST(CheckpointHostile, HeaderNotJson) {
  expect_load_error<titans::FormatError>(make_file("{\"a\": nope}", kData), "not valid JSON");
  expect_load_error<titans::FormatError>(make_file("", kData), "not valid JSON");
  expect_load_error<titans::FormatError>(make_file(std::string("{\"a\0\":1}", 9), kData), "not valid JSON");
  expect_load_error<titans::FormatError>(make_file("{\"\xff\xfe\":{}}", kData), "not valid JSON");  // bad UTF-8
  expect_load_error<titans::FormatError>(make_file("{} {}", kData), "not valid JSON");
  expect_load_error<titans::FormatError>(make_file(R"({"a":{"shape":[1e999]}})", kData), "not valid JSON");
}

TEST(CheckpointHostile, HeaderNotAnObject) {
  expect_load_error<titans::FormatError>(make_file("[1, 2]", kData), "header is a JSON array, expected an object");
  expect_load_error<titans::FormatError>(make_file("42", kData), "header is a JSON number");
  expect_load_error<titans::FormatError>(make_file("\"a\"", kData), "header is a JSON string");
}

TEST(CheckpointHostile, HeaderNestedTooDeep) {
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[[2],2],"data_offsets":[0,16]},)" + kEntryB), "nests deeper");
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16],"extra":{"x":{}}},)" + kEntryB),
      "nests deeper");
  expect_load_error<titans::FormatError>(
      make_file(R"({"a":{"x":)" + std::string(100000, '[') + std::string(100000, ']') + "}}", kData), "nests deeper");
  expect_load_error<titans::FormatError>(make_file(std::string(100000, '[') + std::string(100000, ']'), kData),
                                         "header is a JSON array");
}

TEST(CheckpointHostile, EntryNotAnObject) {
  expect_load_error<titans::FormatError>(file_with(R"("a":[0,16],)" + kEntryB), "tensor 'a': entry is a JSON array");
}

TEST(CheckpointHostile, EntryMissingFields) {
  expect_load_error<titans::FormatError>(file_with(R"("a":{"shape":[2,2],"data_offsets":[0,16]},)" + kEntryB),
                                         "tensor 'a' has no field 'dtype'");
  expect_load_error<titans::FormatError>(file_with(R"("a":{"dtype":"F32","data_offsets":[0,16]},)" + kEntryB),
                                         "tensor 'a' has no field 'shape'");
  expect_load_error<titans::FormatError>(file_with(R"("a":{"dtype":"F32","shape":[2,2]},)" + kEntryB),
                                         "tensor 'a' has no field 'data_offsets'");
}

TEST(CheckpointHostile, EntryFieldsOfWrongJsonType) {
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":32,"shape":[2,2],"data_offsets":[0,16]},)" + kEntryB), "'dtype' is a JSON number");
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":"2x2","data_offsets":[0,16]},)" + kEntryB), "'shape' is a JSON string");
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":{"begin":0}},)" + kEntryB), "'data_offsets' is");
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16,32]},)" + kEntryB), "[begin, end]");
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[2,"2"],"data_offsets":[0,16]},)" + kEntryB),
      "shape[1] is a JSON string");
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[null,16]},)" + kEntryB),
      "data_offsets[0] is a JSON null");
}

TEST(CheckpointHostile, NegativeOrNonIntegerDims) {
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[-2,2],"data_offsets":[0,16]},)" + kEntryB), "shape[0] is negative");
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[2,2.0],"data_offsets":[0,16]},)" + kEntryB),
      "shape[1] is not an integer");
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[2,1e30],"data_offsets":[0,16]},)" + kEntryB),
      "shape[1] is not an integer");
  expect_load_error<titans::FormatError>(file_with(R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                                                   R"("b":{"dtype":"F32","shape":[3],"data_offsets":[16,-28]})"),
                                         "data_offsets[1] is negative");
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0.5,16]},)" + kEntryB),
      "data_offsets[0] is not an integer");
}

TEST(CheckpointHostile, TooManyDimensions) {
  std::string shape = "[";
  for (int i = 0; i < 65; ++i) shape += i ? ",1" : "1";
  shape += "]";
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":)" + shape + R"(,"data_offsets":[0,4]},)" + kEntryB),
      "more than 64 dimensions");
}

TEST(CheckpointHostile, ShapeProductOverflow) {
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,16]},)" + kEntryB),
      "element count of shape [4294967296, 4294967296, 2] overflows");
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,16]},)" + kEntryB),
      "byte size of shape [4611686018427387904] in F32 overflows");
}

TEST(CheckpointHostile, ByteSizeDisagreesWithShape) {
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]},)" + kEntryB),
      "tensor 'a': shape [2, 2] of F32 needs 16 bytes but data_offsets [0, 12] span 12");
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F64","shape":[2,2],"data_offsets":[0,16]},)" + kEntryB), "needs 32 bytes");
}

TEST(CheckpointHostile, BeginAfterEnd) {
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[16,0]},)" + kEntryB), "begin > end");
}

TEST(CheckpointHostile, EndPastDataBuffer) {
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[20,36]},)" + kEntryB),
      "data_offsets end 36 is past the end of the data buffer (28 bytes)");
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[18446744073709551600,18446744073709551615]},)" +
                kEntryB),
      "past the end of the data buffer");
}

TEST(CheckpointHostile, OverlappingTensors) {
  expect_load_error<titans::FormatError>(
      file_with(kEntryA + R"(,"b":{"dtype":"F32","shape":[3],"data_offsets":[12,24]})"),
      "tensors 'a' [0, 16) and 'b' [12, 24) overlap");
  // A range inside a longer earlier one.
  expect_load_error<titans::FormatError>(file_with(R"("a":{"dtype":"F32","shape":[7],"data_offsets":[0,28]},)"
                                                   R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},)"
                                                   R"("c":{"dtype":"F32","shape":[1],"data_offsets":[20,24]})"),
                                         "overlap");
  // Same range twice.
  expect_load_error<titans::FormatError>(
      file_with(kEntryA + R"(,"b":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]})"), "overlap");
}

TEST(CheckpointHostile, DuplicateNames) {
  expect_load_error<titans::FormatError>(file_with(kEntryA + "," + kEntryB + "," + kEntryA), "duplicate key 'a'");
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F64","dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)" + kEntryB),
      "duplicate key 'dtype'");
  expect_load_error<titans::FormatError>(file_with(kEntryA + "," + kEntryB + R"(,"__metadata__":{"k":"1","k":"2"})"),
                                         "duplicate key 'k'");
  expect_load_error<titans::FormatError>(file_with(kEntryA + "," + kEntryB + R"(,"__metadata__":{},"__metadata__":{})"),
                                         "duplicate key '__metadata__'");
}

TEST(CheckpointHostile, MissingTensor) {
  expect_load_error<titans::FormatError>(file_with(kEntryA), "the checkpoint has no tensor 'b'");
}

TEST(CheckpointHostile, ExtraTensor) {
  const Bytes f = file_with(kEntryA + "," + kEntryB + R"(,"c":{"dtype":"F32","shape":[0],"data_offsets":[28,28]})");
  expect_load_error<titans::FormatError>(f, "holds tensor 'c' that the parameters do not have");
  NamedSet<float> p = sentinel_model();
  LoadOptions opts;
  opts.allow_extra = true;
  EXPECT_NO_THROW(titans::load_checkpoint_from_memory(f, p, opts));
}

TEST(CheckpointHostile, ShapeDisagreesWithModel) {
  expect_load_error<titans::ShapeError>(
      file_with(R"("a":{"dtype":"F32","shape":[4,1],"data_offsets":[0,16]},)" + kEntryB),
      "tensor 'a' has shape [4, 1] in the checkpoint, but the parameter is (2, 2)");
  expect_load_error<titans::ShapeError>(
      file_with(kEntryA + R"(,"b":{"dtype":"F32","shape":[1,3],"data_offsets":[16,28]})"),
      "tensor 'b' has shape [1, 3] in the checkpoint, but the parameter is (3, 1)");
  expect_load_error<titans::ShapeError>(
      file_with(R"("a":{"dtype":"F32","shape":[2,2,1],"data_offsets":[0,16]},)" + kEntryB), "shape [2, 2, 1]");
  expect_load_error<titans::ShapeError>(
      file_with(R"("a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)" + kEntryB), "shape [4]");
  expect_load_error<titans::ShapeError>(file_with(R"("a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},)" + kEntryB),
                                        "shape []");
}

TEST(CheckpointHostile, MetadataNotStrings) {
  expect_load_error<titans::FormatError>(file_with(kEntryA + "," + kEntryB + R"(,"__metadata__":{"step":12})"),
                                         "__metadata__['step'] is a JSON number, expected a string");
  expect_load_error<titans::FormatError>(file_with(kEntryA + "," + kEntryB + R"(,"__metadata__":["x"])"),
                                         "__metadata__ is a JSON array");
}

TEST(CheckpointHostile, UnsupportedAndUnknownDtypes) {
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"U16","shape":[2,2],"data_offsets":[0,8]},)" + kEntryB),
      "tensor 'a' has dtype U16; only F32, F64, BF16 and F16 can be loaded");
  expect_load_error<titans::FormatError>(file_with(R"("a":{"dtype":"I64","shape":[2,2],"data_offsets":[0,32]},)"
                                                   R"("b":{"dtype":"F32","shape":[3],"data_offsets":[32,44]})",
                                                   Bytes(44, 0)),
                                         "dtype I64");
  expect_load_error<titans::FormatError>(
      file_with(R"("a":{"dtype":"F128","shape":[2,2],"data_offsets":[0,16]},)" + kEntryB), "unknown dtype 'F128'");
}

TEST(CheckpointHostile, NonFiniteValues) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  expect_load_error<titans::NumericError>(file_with(kEntryA + "," + kEntryB, f32_bytes({1, 2, 3, 4, 5, nan, 7})),
                                          "tensor 'b' holds a non-finite value");
  expect_load_error<titans::NumericError>(file_with(kEntryA + "," + kEntryB, f32_bytes({1, 2, -inf, 4, 5, 6, 7})),
                                          "tensor 'a' holds a non-finite value (-inf) at (1, 0)");
  expect_load_error<titans::NumericError>(
      file_with(kEntryA + R"(,"b":{"dtype":"F64","shape":[3],"data_offsets":[16,40]})",
                concat(f32_bytes({1, 2, 3, 4}), f64_bytes({0, std::numeric_limits<double>::infinity(), 0}))),
      "tensor 'b' holds a non-finite value");
}

TEST(CheckpointHostile, F64OverflowingFloat) {
  expect_load_error<titans::NumericError>(
      file_with(kEntryA + R"(,"b":{"dtype":"F64","shape":[3],"data_offsets":[16,40]})",
                concat(f32_bytes({1, 2, 3, 4}), f64_bytes({0, 1e300, 0}))),
      "tensor 'b': F64 value 1e+300 at (1, 0) overflows");
}

TEST(CheckpointHostile, ListAndMetadataValidateToo) {
  const Bytes bad = file_with(kEntryA + R"(,"b":{"dtype":"F32","shape":[3],"data_offsets":[12,24]})");
  EXPECT_THROW(titans::list_checkpoint_from_memory(bad.data(), bad.size()), titans::FormatError);
  EXPECT_THROW(titans::read_checkpoint_metadata_from_memory(bad.data(), bad.size()), titans::FormatError);
}

TEST(CheckpointHostile, BadModelNames) {
  const Bytes f = file_with(kEntryA + "," + kEntryB);
  NamedSet<float> dup = sentinel_model();
  dup.tensors.push_back({"a", Matrix<float>::Zero(2, 2)});
  EXPECT_THROW(titans::load_checkpoint_from_memory(f, dup), titans::InvalidArgument);
  EXPECT_THROW(titans::save_checkpoint_to_memory(dup), titans::InvalidArgument);
  NamedSet<float> reserved;
  reserved.tensors = {{"__metadata__", Matrix<float>::Zero(1, 1)}};
  EXPECT_THROW(titans::save_checkpoint_to_memory(reserved), titans::InvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// Saving: value checks and atomic replacement.
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// BF16 and F16: loaded exactly, saved rounded to nearest (ties to even), overflow refused.
// ---------------------------------------------------------------------------------------------

Bytes u16_bytes(std::initializer_list<std::uint16_t> values) {
  Bytes b;
  for (std::uint16_t v : values) {
    b.push_back(static_cast<std::uint8_t>(v & 0xFF));
    b.push_back(static_cast<std::uint8_t>(v >> 8));
  }
  return b;
}

// The value of a 16-bit pattern from the format definitions alone (independent of the library).
double f16_value(std::uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const double sign = (h & 0x8000) ? -1 : 1;
  if (e == 31) return m ? std::nan("") : sign * HUGE_VAL;
  return e == 0 ? sign * m * std::pow(2.0, -24) : sign * (1 + m / 1024.0) * std::pow(2.0, e - 15);
}
double bf16_value(std::uint16_t h) {
  const int e = (h >> 7) & 255, m = h & 127;
  const double sign = (h & 0x8000) ? -1 : 1;
  if (e == 255) return m ? std::nan("") : sign * HUGE_VAL;
  return e == 0 ? sign * m * std::pow(2.0, -133) : sign * (1 + m / 128.0) * std::pow(2.0, e - 127);
}

TYPED_TEST(CheckpointTyped, HalfPrecisionFilesLoadExactly) {
  const std::vector<std::uint16_t> f16 = {0x3C00, 0xC000, 0x3555, 0x0001, 0x7BFF, 0x8000};
  const std::vector<std::uint16_t> bf16 = {0x3F80, 0xC040, 0x3EAB, 0x0001, 0x7F7F, 0x4049};
  const std::string header = R"({"h":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},)"
                             R"("b":{"dtype":"BF16","shape":[6],"data_offsets":[12,24]}})";
  Bytes data = concat(u16_bytes({f16[0], f16[1], f16[2], f16[3], f16[4], f16[5]}),
                      u16_bytes({bf16[0], bf16[1], bf16[2], bf16[3], bf16[4], bf16[5]}));
  NamedSet<TypeParam> p;
  p.tensors = {{"h", Matrix<TypeParam>::Zero(2, 3)}, {"b", Matrix<TypeParam>::Zero(6, 1)}};
  titans::load_checkpoint_from_memory(make_file(header, data), p);
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(static_cast<double>(p.at("h")(i / 3, i % 3)), f16_value(f16[static_cast<std::size_t>(i)])) << i;
    EXPECT_EQ(static_cast<double>(p.at("b")(i, 0)), bf16_value(bf16[static_cast<std::size_t>(i)])) << i;
  }
  // Infinity in a 16-bit tensor is refused like in a 32-bit one.
  data[0] = 0x00;
  data[1] = 0x7C;
  try {
    titans::load_checkpoint_from_memory(make_file(header, data), p);
    ADD_FAILURE() << "no exception";
  } catch (const titans::NumericError& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'h' holds a non-finite value"), std::string::npos) << e.what();
  }
}

// The nearest pattern by brute force over all finite patterns, ties to the even one.
std::uint16_t nearest_by_search(double x, bool bf16) {
  std::uint16_t best = 0;
  double best_d = HUGE_VAL;
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const double v = bf16 ? bf16_value(static_cast<std::uint16_t>(h)) : f16_value(static_cast<std::uint16_t>(h));
    if (!std::isfinite(v) || std::signbit(v) != std::signbit(x)) continue;
    const double d = std::fabs(v - x);
    if (d < best_d || (d == best_d && (h & 1) == 0)) {
      best = static_cast<std::uint16_t>(h);
      best_d = d;
    }
  }
  return best;
}

TEST(CheckpointSave, HalfPrecisionRoundsToNearestEvenAndRefusesOverflow) {
  for (const bool bf16 : {false, true}) {
    SCOPED_TRACE(bf16 ? "BF16" : "F16");
    auto value = [&](std::uint16_t h) { return bf16 ? bf16_value(h) : f16_value(h); };
    // Random values, exact halfway points (which must go to the even neighbour), values a float
    // would round onto a halfway point (double rounding), subnormals and the largest finite value.
    std::vector<double> xs;
    titans::detail::Rng rng(bf16 ? 5 : 6);
    for (int i = 0; i < 40; ++i) xs.push_back((rng.uniform() - 0.5) * std::pow(2.0, static_cast<int>(rng.below(30)) - 15));
    for (std::uint16_t h : {0x3C00, 0x3C01, 0x1234, 0x0002, 0x0003}) {
      const double mid = (value(h) + value(static_cast<std::uint16_t>(h + 1))) / 2;
      xs.push_back(mid);
      xs.push_back(-mid);
      xs.push_back(mid * (1 + 1e-12));  // a float would round this to mid exactly
    }
    xs.push_back(value(bf16 ? 0x7F7F : 0x7BFF));
    NamedSet<double> p;
    Matrix<double> m(static_cast<Index>(xs.size()), 1);
    for (std::size_t i = 0; i < xs.size(); ++i) m(static_cast<Index>(i), 0) = xs[i];
    p.tensors = {{"x", m}};
    const Bytes bytes = titans::save_checkpoint_to_memory(p, {}, bf16 ? Dtype::bf16 : Dtype::f16);
    EXPECT_EQ(titans::list_checkpoint_from_memory(bytes.data(), bytes.size())[0].dtype, bf16 ? "BF16" : "F16");
    NamedSet<double> back;
    back.tensors = {{"x", Matrix<double>::Zero(m.rows(), 1)}};
    titans::load_checkpoint_from_memory(bytes, back);
    for (std::size_t i = 0; i < xs.size(); ++i)
      EXPECT_EQ(back.at("x")(static_cast<Index>(i), 0), value(nearest_by_search(xs[i], bf16))) << "x = " << xs[i];
    // From the largest finite value plus half its ulp, rounding gives infinity: refused.
    const double max = value(bf16 ? 0x7F7F : 0x7BFF), ulp = max - value(bf16 ? 0x7F7E : 0x7BFE);
    p.at("x")(0, 0) = max + ulp / 2;
    try {
      titans::save_checkpoint_to_memory(p, {}, bf16 ? Dtype::bf16 : Dtype::f16);
      ADD_FAILURE() << "no exception";
    } catch (const titans::NumericError& e) {
      EXPECT_NE(std::string(e.what()).find(bf16 ? "overflows BF16" : "overflows F16"), std::string::npos) << e.what();
    }
    p.at("x")(0, 0) = max + ulp / 2 * (1 - 1e-6);  // just below: rounds to max
    EXPECT_NO_THROW(titans::save_checkpoint_to_memory(p, {}, bf16 ? Dtype::bf16 : Dtype::f16));
  }
}

TEST(CheckpointSave, RejectsNonFiniteAndOverflowingValues) {
  NamedSet<double> p;
  p.tensors = {{"w", Matrix<double>::Zero(2, 2)}};
  p.at("w")(1, 0) = std::numeric_limits<double>::quiet_NaN();
  try {
    titans::save_checkpoint_to_memory(p);
    ADD_FAILURE() << "no exception";
  } catch (const titans::NumericError& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'w' holds a non-finite value"), std::string::npos) << e.what();
  }
  p.at("w")(1, 0) = 1e300;
  EXPECT_NO_THROW(titans::save_checkpoint_to_memory(p, {}, Dtype::f64));
  EXPECT_THROW(titans::save_checkpoint_to_memory(p, {}, Dtype::f32), titans::NumericError);
  EXPECT_THROW(titans::save_checkpoint_to_memory(p, {}, static_cast<Dtype>(7)), titans::InvalidArgument);
}

TEST(CheckpointSave, RejectsInvalidUtf8Names) {
  NamedSet<float> p;
  p.tensors = {{"bad\xff", Matrix<float>::Zero(1, 1)}};
  EXPECT_THROW(titans::save_checkpoint_to_memory(p), titans::InvalidArgument);
}

TEST(CheckpointSave, MissingDirectoryThrowsIoErrorAndLeavesNothing) {
  TempDir dir;
  const std::string path = (dir.path() / "no_such_dir" / "x.safetensors").string();
  Toy<float> p;
  try {
    titans::save_checkpoint(path, p);
    ADD_FAILURE() << "no exception";
  } catch (const titans::IoError& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir.path() / "no_such_dir"));
  EXPECT_TRUE(dir.entries().empty());
}

TEST(CheckpointSave, ReplacesAnExistingCheckpointAndLeavesNoTempFiles) {
  TempDir dir;
  const std::string path = (dir.path() / "ckpt.safetensors").string();
  Toy<double> first, second;
  fill_random(first, 10);
  fill_random(second, 11);
  titans::save_checkpoint(path, first, {{"step", "1"}});
  titans::save_checkpoint(path, second, {{"step", "2"}});
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"ckpt.safetensors"});

  Toy<double> loaded;
  EXPECT_EQ(titans::load_checkpoint(path, loaded).at("step"), "2");
  expect_identical(second, loaded);
  EXPECT_EQ(read_bytes(path), titans::save_checkpoint_to_memory(second, {{"step", "2"}}));
}

TEST(CheckpointSave, FailedSaveKeepsTheOldFile) {
  TempDir dir;
  const fs::path path = dir.path() / "ckpt.safetensors";
  Toy<float> good;
  fill_random(good, 12);
  titans::save_checkpoint(path.string(), good);
  const Bytes before = read_bytes(path);

  Toy<float> bad = good;
  bad.gate(0, 0) = std::numeric_limits<float>::infinity();
  EXPECT_THROW(titans::save_checkpoint(path.string(), bad), titans::NumericError);
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"ckpt.safetensors"});
}

NamedSet<double> big_set(unsigned seed, Index cols) {
  NamedSet<double> p;
  p.tensors = {{"w", Matrix<double>::Zero(1000, cols)}};
  fill_random(p, seed);
  return p;
}

// A write that fails partway (the file-size limit is reached after 64 kB of a 1.6 MB file, in a
// child process, so the write fails with EFBIG): IoError, the old file byte for byte, no temp.
TEST(CheckpointSave, AWriteThatFailsPartwayKeepsTheOldFileAndLeavesNoTemp) {
  TempDir dir;
  const fs::path path = dir.path() / "ckpt.safetensors";
  titans::save_checkpoint(path.string(), big_set(1, 10));
  const Bytes before = read_bytes(path);
  const NamedSet<double> next = big_set(2, 200);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    signal(SIGXFSZ, SIG_IGN);  // the write then fails with EFBIG instead of killing the process
    rlimit lim{};
    lim.rlim_cur = lim.rlim_max = 64 * 1024;
    if (setrlimit(RLIMIT_FSIZE, &lim) != 0) _exit(10);
    try {
      titans::save_checkpoint(path.string(), next);
    } catch (const titans::IoError&) {
      _exit(0);
    } catch (...) {
      _exit(2);
    }
    _exit(1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: the save succeeded; 2: not IoError; 10: setrlimit failed";
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"ckpt.safetensors"});
}

// A process killed (SIGKILL) while it saves, again and again, two different 8 MB checkpoints:
// the target is always one of them, byte for byte. The temporary file of the interrupted save
// may remain, under the documented name `<path>.tmp.<random>` (save_checkpoint's comment).
TEST(CheckpointSave, AProcessKilledMidSaveLeavesTheOldOrTheNewFile) {
  TempDir dir;
  const fs::path path = dir.path() / "ckpt.safetensors";
  const NamedSet<double> a = big_set(3, 1000), b = big_set(4, 1000);
  const Bytes bytes_a = titans::save_checkpoint_to_memory(a), bytes_b = titans::save_checkpoint_to_memory(b);
  titans::save_checkpoint(path.string(), a);
  for (int round = 0; round < 6; ++round) {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      for (int i = 0;; ++i) titans::save_checkpoint(path.string(), i % 2 ? a : b);
    }
    usleep(static_cast<useconds_t>(20000 + 13000 * round));
    kill(pid, SIGKILL);
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status));
    const Bytes now = read_bytes(path);
    EXPECT_TRUE(now == bytes_a || now == bytes_b) << "round " << round << ": a partial file (" << now.size() << " bytes)";
    for (const std::string& e : dir.entries()) {
      if (e == "ckpt.safetensors") continue;
      EXPECT_EQ(e.rfind("ckpt.safetensors.tmp.", 0), 0u) << "unexpected file " << e;
      fs::remove(dir.path() / e);  // what the documentation tells the user to do
    }
  }
}

TEST(CheckpointSave, RenameFailureRemovesTheTempFile) {
  TempDir dir;
  const fs::path target = dir.path() / "occupied";
  fs::create_directories(target / "child");  // a non-empty directory cannot be replaced by a file
  Toy<float> p;
  EXPECT_THROW(titans::save_checkpoint(target.string(), p), titans::IoError);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"occupied"});
  EXPECT_TRUE(fs::is_directory(target / "child"));
}

TEST(CheckpointFiles, MissingFileAndDirectoryAreIoErrors) {
  TempDir dir;
  const std::string missing = (dir.path() / "absent.safetensors").string();
  Toy<float> p;
  try {
    titans::load_checkpoint(missing, p);
    ADD_FAILURE() << "no exception";
  } catch (const titans::IoError& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
  }
  EXPECT_THROW(titans::list_checkpoint(missing), titans::IoError);
  EXPECT_THROW(titans::read_checkpoint_metadata(missing), titans::IoError);
  EXPECT_THROW(titans::load_checkpoint(dir.path().string(), p), titans::IoError);
  EXPECT_THROW(titans::list_checkpoint(dir.path().string()), titans::IoError);
}

TEST(CheckpointFiles, HostileFilesOnDiskNameThePath) {
  TempDir dir;
  const fs::path path = dir.path() / "bad.safetensors";
  const NamedSet<float> before = sentinel_model();

  write_bytes(path, Bytes{1, 2, 3});
  NamedSet<float> p = before;
  try {
    titans::load_checkpoint(path.string(), p);
    ADD_FAILURE() << "no exception";
  } catch (const titans::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("shorter"), std::string::npos) << e.what();
  }
  EXPECT_THROW(titans::list_checkpoint(path.string()), titans::FormatError);

  Bytes huge_len;
  append_u64(huge_len, 1000);
  huge_len.resize(20, ' ');
  write_bytes(path, huge_len);
  EXPECT_THROW(titans::load_checkpoint(path.string(), p), titans::FormatError);
  EXPECT_THROW(titans::read_checkpoint_metadata(path.string()), titans::FormatError);

  // Header-only readers still check offsets against the real data size.
  write_bytes(path, file_with(R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]})", Bytes(8, 0)));
  EXPECT_THROW(titans::list_checkpoint(path.string()), titans::FormatError);
  expect_identical(p, before);
}

}  // namespace

#else  // no nlohmann/json: checkpoint.hpp is unavailable

#include <gtest/gtest.h>

TEST(Checkpoint, SkippedWithoutNlohmannJson) { GTEST_SKIP() << "nlohmann/json.hpp not found"; }

#endif
