// SPDX-License-Identifier: Apache-2.0
//
// libFuzzer target for checkpoint.hpp: arbitrary bytes are parsed as a safetensors checkpoint.
//
// Properties checked on every input:
//   - nothing crashes, over-reads or leaks, and the only exceptions are titans' own (anything else,
//     std::bad_alloc included, escapes and is reported by libFuzzer as a crash);
//   - a failed load leaves the parameters exactly as they were;
//   - a successful load can be saved and loaded again, giving back the same values and metadata.
//
// Build (clang): clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -I include
//                -isystem <eigen3> fuzz/fuzz_checkpoint.cpp -o fuzz_checkpoint
// Run:           ./fuzz_checkpoint -max_total_time=60 <scratch-corpus-dir> fuzz/corpus
//
// The seed corpus in fuzz/corpus is written by this same file built as a plain program:
//   g++ -std=c++17 -DTITANS_FUZZ_WRITE_CORPUS -I include -isystem <eigen3> -o make_corpus
//       fuzz/fuzz_checkpoint.cpp && ./make_corpus fuzz/corpus
// (it also runs every seed through the same checks as the fuzzer).

#include <titans/checkpoint.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

namespace {

/// The fixed float parameter set every input is loaded into.
struct FuzzParams {
  using scalar_type = float;
  titans::Matrix<float> w = titans::Matrix<float>::Constant(2, 3, 0.5f);   // "a.w"
  titans::Matrix<float> b = titans::Matrix<float>::Constant(3, 1, -1.0f);  // "b"
  titans::Matrix<float> c = titans::Matrix<float>::Constant(1, 1, 2.0f);   // "c"

  template <class F>
  void for_each(F&& f) {
    f(std::string("a.w"), w);
    f(std::string("b"), b);
    f(std::string("c"), c);
  }
  template <class F>
  void for_each(F&& f) const {
    f(std::string("a.w"), w);
    f(std::string("b"), b);
    f(std::string("c"), c);
  }
  bool operator==(const FuzzParams& o) const { return w == o.w && b == o.b && c == o.c; }
};

void check(bool ok) {
  if (!ok) __builtin_trap();
}

void fuzz_load(const std::uint8_t* data, std::size_t size, bool allow_extra) {
  const FuzzParams initial;
  FuzzParams p;
  titans::LoadOptions opts;
  opts.allow_extra = allow_extra;
  std::map<std::string, std::string> meta;
  try {
    meta = titans::load_checkpoint_from_memory(data, size, p, opts);
  } catch (const titans::FormatError&) {
    check(p == initial);
    return;
  } catch (const titans::InvalidArgument&) {  // includes ShapeError
    check(p == initial);
    return;
  } catch (const titans::NumericError&) {
    check(p == initial);
    return;
  }
  // Loaded: a save/load round trip must reproduce it exactly.
  const std::vector<std::uint8_t> again = titans::save_checkpoint_to_memory(p, meta);
  FuzzParams q;
  q.w.setZero();
  q.b.setZero();
  q.c.setZero();
  check(titans::load_checkpoint_from_memory(again, q) == meta);
  check(q == p);
}

}  // namespace

#ifndef TITANS_FUZZ_WRITE_CORPUS

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto list = titans::list_checkpoint_from_memory(data, size);
    for (const auto& t : list) check(t.begin <= t.end && t.end <= size);
    titans::read_checkpoint_metadata_from_memory(data, size);
  } catch (const titans::FormatError&) {
  }
  fuzz_load(data, size, false);
  fuzz_load(data, size, true);
  return 0;
}

#else  // a plain program that writes the seed corpus

#include <cstdio>
#include <fstream>
#include <iostream>
#include <vector>

namespace {

using Bytes = std::vector<std::uint8_t>;

Bytes file(const std::string& header, const Bytes& data) {
  Bytes b;
  for (int k = 0; k < 8; ++k) b.push_back(static_cast<std::uint8_t>(header.size() >> (8 * k)));
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

Bytes floats(std::initializer_list<float> values) {
  Bytes b;
  for (float x : values) {
    std::uint32_t u;
    std::memcpy(&u, &x, 4);
    for (int k = 0; k < 4; ++k) b.push_back(static_cast<std::uint8_t>(u >> (8 * k)));
  }
  return b;
}

void write(const std::string& dir, const std::string& name, const Bytes& b) {
  fuzz_load(b.data(), b.size(), false);
  fuzz_load(b.data(), b.size(), true);
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
  FuzzParams p;
  p.w << 1, 2, 3, 4, 5, 6;
  p.b << 7, 8, 9;
  p.c << 10;
  const Bytes f32 = titans::save_checkpoint_to_memory(p, {{"step", "3"}});
  write(dir, "valid_f32", f32);
  write(dir, "valid_f64", titans::save_checkpoint_to_memory(p, {}, titans::Dtype::f64));

  const std::string a = R"("a.w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]})";
  const Bytes six = floats({1, 2, 3, 4, 5, 6});
  write(dir, "valid_1d_0d",
        file("{" + a + R"(,"b":{"dtype":"F32","shape":[3],"data_offsets":[24,36]},)" +
                 R"("c":{"dtype":"F32","shape":[],"data_offsets":[36,40]}})",
             floats({1, 2, 3, 4, 5, 6, 7, 8, 9, 10})));
  write(dir, "extra_i64",
        file("{" + a + R"(,"b":{"dtype":"F32","shape":[3,1],"data_offsets":[24,36]},)" +
                 R"("c":{"dtype":"F32","shape":[1,1],"data_offsets":[36,40]},)" +
                 R"("ids":{"dtype":"I64","shape":[1],"data_offsets":[40,48]},"__metadata__":{"k":"v"}})",
             floats({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0})));
  write(dir, "bad_overlap",
        file("{" + a + R"(,"b":{"dtype":"F32","shape":[3],"data_offsets":[20,32]},)" +
                 R"("c":{"dtype":"F32","shape":[],"data_offsets":[36,40]}})",
             floats({1, 2, 3, 4, 5, 6, 7, 8, 9, 10})));
  write(dir, "bad_duplicate", file("{" + a + "," + a + "}", six));
  write(dir, "bad_shape",
        file("{" + a + R"(,"b":{"dtype":"F32","shape":[1,3],"data_offsets":[24,36]},)" +
                 R"("c":{"dtype":"F32","shape":[1],"data_offsets":[36,40]}})",
             floats({1, 2, 3, 4, 5, 6, 7, 8, 9, 10})));
  write(dir, "bad_nan",
        file("{" + a + R"(,"b":{"dtype":"F32","shape":[3],"data_offsets":[24,36]},)" +
                 R"("c":{"dtype":"F32","shape":[],"data_offsets":[36,40]}})",
             floats({1, 2, 3, 4, 5, 6, 7, 8, 9, std::numeric_limits<float>::quiet_NaN()})));
  write(dir, "bad_json", file(R"({"a.w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},})", six));
  write(dir, "truncated", Bytes(f32.begin(), f32.begin() + static_cast<std::ptrdiff_t>(f32.size() / 2)));
  return 0;
}

#endif
