// GGUF reader and dequantization: crafted files read back exactly; every truncation, a list of
// corruptions and random byte flips fail cleanly; each block format checked against an
// element-by-element computation from the layout; the real models when they are cached.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/half.h"
#include "model/gguf.h"
#include "test_util.h"

using namespace tqkv;
using namespace tqkv::model;

namespace {

// ---- A GGUF writer, independent of the reader ----

struct Bytes {
  std::vector<uint8_t> b;
  Bytes& le(uint64_t v, int n) {
    for (int k = 0; k < n; ++k) b.push_back(uint8_t(v >> (8 * k)));
    return *this;
  }
  Bytes& u8(uint8_t v) { return le(v, 1); }
  Bytes& u16(uint16_t v) { return le(v, 2); }
  Bytes& u32(uint32_t v) { return le(v, 4); }
  Bytes& u64(uint64_t v) { return le(v, 8); }
  Bytes& f32(float v) { return u32(f32_bits(v)); }
  Bytes& f64(double v) {
    uint64_t u;
    memcpy(&u, &v, 8);
    return u64(u);
  }
  Bytes& str(const std::string& s) {
    u64(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Bytes& cat(const Bytes& o) {
    b.insert(b.end(), o.b.begin(), o.b.end());
    return *this;
  }
};

struct Kv {
  std::string key;
  uint32_t type;
  Bytes payload;
};
Kv kv_u32(const std::string& k, uint32_t v) { return {k, 4, Bytes().u32(v)}; }
Kv kv_str(const std::string& k, const std::string& v) { return {k, 8, Bytes().str(v)}; }
Bytes array_of(uint32_t elem_type, uint64_t count, const Bytes& elems) { return Bytes().u32(elem_type).u64(count).cat(elems); }

struct TensorSpec {
  std::string name;
  std::vector<uint64_t> dims;
  uint32_t type;
  std::vector<uint8_t> data;
  std::optional<uint64_t> offset;  // overrides the laid-out offset in the info
};

struct Spec {
  std::string magic = "GGUF";
  uint32_t version = 3;
  std::optional<uint64_t> n_tensors, n_kv;
  std::vector<Kv> kvs;
  std::vector<TensorSpec> tensors;
  uint64_t alignment = 32;  // layout only: add general.alignment to kvs to change it in the file
};

struct Built {
  std::vector<uint8_t> bytes;
  size_t data_start = 0;
  std::vector<uint64_t> offsets;
};

Built build(const Spec& s) {
  Bytes o;
  o.b.insert(o.b.end(), s.magic.begin(), s.magic.end());
  o.u32(s.version).u64(s.n_tensors.value_or(s.tensors.size())).u64(s.n_kv.value_or(s.kvs.size()));
  for (const Kv& kv : s.kvs) o.str(kv.key).u32(kv.type).cat(kv.payload);
  Built r;
  uint64_t off = 0;
  for (const TensorSpec& t : s.tensors) {
    off = (off + s.alignment - 1) / s.alignment * s.alignment;
    r.offsets.push_back(off);
    o.str(t.name).u32(uint32_t(t.dims.size()));
    for (uint64_t d : t.dims) o.u64(d);
    o.u32(t.type).u64(t.offset.value_or(off));
    off += t.data.size();
  }
  while (o.b.size() % s.alignment) o.u8(0);
  r.data_start = o.b.size();
  for (size_t k = 0; k < s.tensors.size(); ++k) {
    o.b.resize(r.data_start + r.offsets[k], 0);
    o.b.insert(o.b.end(), s.tensors[k].data.begin(), s.tensors[k].data.end());
  }
  r.bytes = std::move(o.b);
  return r;
}

// Paths handed out, removed when the test binary exits.
struct TempFiles {
  std::set<std::string> paths;
  ~TempFiles() {
    std::error_code ec;
    for (const std::string& p : paths) std::filesystem::remove(p, ec);
  }
};

std::string temp_path(const std::string& tag) {
  static TempFiles files;
  const std::string p = (std::filesystem::path(testing::TempDir()) / ("tqkv_gguf_" + std::to_string(getpid()) + "_" + tag + ".gguf")).string();
  files.paths.insert(p);
  return p;
}

std::string write_file(const std::vector<uint8_t>& bytes, const std::string& tag = "t") {
  const std::string p = temp_path(tag);
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  return p;
}

// Expects opening (or fn on the opened file) to throw tqkv::Error with the status and a message
// containing every fragment.
void expect_error(const std::function<void()>& fn, tqkv_status status, const std::vector<std::string>& fragments) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one containing '" << fragments.at(0) << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), status) << e.what();
    for (const std::string& f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << "'" << f << "' not in: " << e.what();
  }
}
void expect_io(const Spec& s, const std::vector<std::string>& fragments) {
  const std::string p = write_file(build(s).bytes);
  expect_error([&] { GgufFile::open(p); }, TQKV_ERROR_IO, fragments);
}

std::vector<uint8_t> f32_bytes(const std::vector<float>& v) {
  Bytes b;
  for (float x : v) b.f32(x);
  return b.b;
}

std::vector<uint8_t> random_bytes(size_t n, std::mt19937_64& rng) {
  std::vector<uint8_t> v(n);
  for (auto& x : v) x = uint8_t(rng());
  return v;
}

void put_f16(std::vector<uint8_t>& b, size_t at, float v) {
  const uint16_t h = f32_to_f16(v);
  b[at] = uint8_t(h);
  b[at + 1] = uint8_t(h >> 8);
}

// A file with metadata of every type (nested arrays included) and tensors of several types.
Spec full_spec() {
  Spec s;
  s.kvs = {
      {"u8", 0, Bytes().u8(200)},
      {"i8", 1, Bytes().u8(uint8_t(-100))},
      {"u16", 2, Bytes().u16(60000)},
      {"i16", 3, Bytes().u16(uint16_t(-30000))},
      kv_u32("u32", 4000000000u),
      {"i32", 5, Bytes().u32(uint32_t(-2000000000))},
      {"f32", 6, Bytes().f32(1.5f)},
      {"bool.t", 7, Bytes().u8(1)},
      {"bool.f", 7, Bytes().u8(0)},
      kv_str("general.name", "tiny \xc3\xa9"),
      kv_str("empty", ""),
      {"u64", 10, Bytes().u64(~0ull)},
      {"i64", 11, Bytes().u64(uint64_t(INT64_MIN))},
      {"f64", 12, Bytes().f64(-2.25e300)},
      {"arr.str", 9, array_of(8, 3, Bytes().str("a").str("").str("ccc"))},
      {"arr.i32", 9, array_of(5, 3, Bytes().u32(1).u32(uint32_t(-2)).u32(3))},
      {"arr.f32", 9, array_of(6, 2, Bytes().f32(0.5f).f32(-8.0f))},
      {"arr.f64", 9, array_of(12, 1, Bytes().f64(3.0))},
      {"arr.u8", 9, array_of(0, 2, Bytes().u8(7).u8(255))},
      {"arr.bool", 9, array_of(7, 2, Bytes().u8(1).u8(0))},
      {"arr.empty", 9, array_of(4, 0, Bytes())},
      {"arr.nested", 9,
       array_of(9, 2, Bytes().cat(array_of(5, 2, Bytes().u32(10).u32(11))).cat(array_of(8, 1, Bytes().str("x"))))},
  };
  Bytes f16;
  for (float x : {1.0f, -2.0f, 0.5f, 65504.0f}) f16.u16(f32_to_f16(x));
  Bytes bf16 = Bytes().u16(f32_to_bf16(3.0f)).u16(f32_to_bf16(-0.125f));
  std::vector<uint8_t> q8(2 * 34);
  put_f16(q8, 0, 0.5f);
  put_f16(q8, 34, -2.0f);
  for (int j = 0; j < 32; ++j) q8[2 + j] = uint8_t(int8_t(j - 16)), q8[36 + j] = uint8_t(int8_t(3 * j - 50));
  std::mt19937_64 rng(7);
  std::vector<uint8_t> q4k = random_bytes(144, rng);
  put_f16(q4k, 0, 0.25f);
  put_f16(q4k, 2, 0.125f);
  s.tensors = {
      {"f32", {3, 2}, 0, f32_bytes({1, 2, 3, 4, 5, -6.5f}), {}},
      {"f16", {4}, 1, f16.b, {}},
      {"bf16", {2, 1, 1, 1}, 30, bf16.b, {}},
      {"q8", {32, 2}, 8, q8, {}},
      {"q4k", {256}, 12, q4k, {}},
  };
  return s;
}

TEST(Gguf, CraftedFileReadsBackExactly) {
  const Spec s = full_spec();
  const Built b = build(s);
  const GgufFile f = GgufFile::open(write_file(b.bytes));
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  std::vector<std::string> want_keys;
  for (const Kv& kv : s.kvs) want_keys.push_back(kv.key);
  EXPECT_EQ(f.keys(), want_keys);  // file order
  for (const Kv& kv : s.kvs) EXPECT_EQ(uint32_t(f.type_of(kv.key)), kv.type) << kv.key;

  EXPECT_EQ(f.get_uint("u8"), 200u);
  EXPECT_EQ(f.get_int("i8"), -100);
  EXPECT_EQ(f.get_uint("u16"), 60000u);
  EXPECT_EQ(f.get_int("i16"), -30000);
  EXPECT_EQ(f.get_uint("u32"), 4000000000u);
  EXPECT_EQ(f.get_int("u32"), 4000000000);
  EXPECT_EQ(f.get_int("i32"), -2000000000);
  EXPECT_EQ(f.get_float("f32"), 1.5);
  EXPECT_TRUE(f.get_bool("bool.t"));
  EXPECT_FALSE(f.get_bool("bool.f"));
  EXPECT_EQ(f.get_string("general.name"), "tiny \xc3\xa9");
  EXPECT_EQ(f.get_string("empty"), "");
  EXPECT_EQ(f.get_uint("u64"), ~0ull);
  EXPECT_EQ(f.get_int("i64"), INT64_MIN);
  EXPECT_EQ(f.get_float("f64"), -2.25e300);
  EXPECT_EQ(f.get_string_array("arr.str"), (std::vector<std::string>{"a", "", "ccc"}));
  EXPECT_EQ(f.get_int_array("arr.i32"), (std::vector<int64_t>{1, -2, 3}));
  EXPECT_EQ(f.get_int_array("arr.u8"), (std::vector<int64_t>{7, 255}));
  EXPECT_EQ(f.get_float_array("arr.f32"), (std::vector<double>{0.5, -8.0}));
  EXPECT_EQ(f.get_float_array("arr.f64"), (std::vector<double>{3.0}));
  EXPECT_TRUE(f.get_int_array("arr.empty").empty());
  EXPECT_EQ(f.array_type_of("arr.str"), GgufType::STRING);
  EXPECT_EQ(f.array_size("arr.str"), 3u);
  EXPECT_EQ(f.array_type_of("arr.nested"), GgufType::ARRAY);

  const GgufValue bools = f.get_value("arr.bool");
  ASSERT_EQ(bools.items.size(), 2u);
  EXPECT_TRUE(bools.items[0].b);
  EXPECT_FALSE(bools.items[1].b);
  const GgufValue nested = f.get_value("arr.nested");
  ASSERT_EQ(nested.type, GgufType::ARRAY);
  ASSERT_EQ(nested.items.size(), 2u);
  EXPECT_EQ(nested.items[0].elem_type, GgufType::INT32);
  ASSERT_EQ(nested.items[0].items.size(), 2u);
  EXPECT_EQ(nested.items[0].items[1].i, 11);
  EXPECT_EQ(nested.items[1].elem_type, GgufType::STRING);
  ASSERT_EQ(nested.items[1].items.size(), 1u);
  EXPECT_EQ(nested.items[1].items[0].s, "x");
  EXPECT_EQ(f.get_value("f64").f, -2.25e300);
  EXPECT_EQ(f.get_value("u16").u, 60000u);

  ASSERT_EQ(f.tensors().size(), s.tensors.size());
  for (size_t k = 0; k < s.tensors.size(); ++k) {
    const GgufTensor& t = f.tensors()[k];
    EXPECT_EQ(t.name, s.tensors[k].name);
    EXPECT_EQ(uint32_t(t.type), s.tensors[k].type);
    EXPECT_EQ(t.dims, s.tensors[k].dims);
    EXPECT_EQ(t.n_bytes, s.tensors[k].data.size());
    EXPECT_EQ(t.data, f.find(t.name)->data);
    EXPECT_EQ(uintptr_t(t.data - f.tensors()[0].data), b.offsets[k]);
    EXPECT_EQ(0, memcmp(t.data, s.tensors[k].data.data(), t.n_bytes)) << t.name;
  }
  EXPECT_EQ(f.tensor("f32").rows(), 2u);
  EXPECT_EQ(f.tensor("q8").n_elements, 64u);
  EXPECT_EQ(f.to_f32(f.tensor("f32")), (std::vector<float>{1, 2, 3, 4, 5, -6.5f}));
  EXPECT_EQ(f.to_f32(f.tensor("f16")), (std::vector<float>{1.0f, -2.0f, 0.5f, 65504.0f}));
  EXPECT_EQ(f.to_f32(f.tensor("bf16")), (std::vector<float>{3.0f, -0.125f}));
  const std::vector<float> q8 = f.to_f32(f.tensor("q8"));
  for (int j = 0; j < 32; ++j) {
    EXPECT_EQ(q8[j], float(j - 16) * 0.5f);
    EXPECT_EQ(q8[32 + j], float(3 * j - 50) * -2.0f);
  }
  EXPECT_EQ(f.find("nope"), nullptr);
  expect_error([&] { f.tensor("nope"); }, TQKV_ERROR_IO, {"tensor 'nope' not found"});
}

TEST(Gguf, GettersCheckTypes) {
  const GgufFile f = GgufFile::open(write_file(build(full_spec()).bytes));
  expect_error([&] { f.get_uint("missing"); }, TQKV_ERROR_IO, {"key 'missing' not found"});
  expect_error([&] { f.type_of("missing"); }, TQKV_ERROR_IO, {"'missing' not found"});
  expect_error([&] { f.get_string("u32"); }, TQKV_ERROR_IO, {"key 'u32'", "UINT32", "expected STRING"});
  expect_error([&] { f.get_uint("i8"); }, TQKV_ERROR_IO, {"'i8'", "-100", "unsigned"});
  expect_error([&] { f.get_int("u64"); }, TQKV_ERROR_IO, {"'u64'", "signed 64-bit"});
  expect_error([&] { f.get_float("u8"); }, TQKV_ERROR_IO, {"'u8'", "FLOAT32 or FLOAT64"});
  expect_error([&] { f.get_bool("u8"); }, TQKV_ERROR_IO, {"expected BOOL"});
  expect_error([&] { f.get_string_array("arr.i32"); }, TQKV_ERROR_IO, {"ARRAY of INT32", "expected ARRAY of STRING"});
  expect_error([&] { f.get_float_array("arr.str"); }, TQKV_ERROR_IO, {"'arr.str'"});
  expect_error([&] { f.get_int_array("f32"); }, TQKV_ERROR_IO, {"'f32' has type FLOAT32"});
  expect_error([&] { f.array_size("u8"); }, TQKV_ERROR_IO, {"expected ARRAY"});
  EXPECT_EQ(f.get_uint_or("missing", 5), 5u);
  EXPECT_EQ(f.get_uint_or("u8", 5), 200u);
  EXPECT_EQ(f.get_float_or("missing", 2.5), 2.5);
  EXPECT_TRUE(f.get_bool_or("missing", true));
  EXPECT_EQ(f.get_string_or("missing", "d"), "d");
  EXPECT_EQ(f.get_string_or("general.name", "d"), "tiny \xc3\xa9");
  expect_error([&] { f.get_uint_or("general.name", 1); }, TQKV_ERROR_IO, {"expected an integer"});  // present: no silent default
}

TEST(Gguf, AlignmentAndVersion2) {
  Spec s = full_spec();
  s.version = 2;
  s.alignment = 256;
  s.kvs.push_back(kv_u32("general.alignment", 256));
  const GgufFile f = GgufFile::open(write_file(build(s).bytes));
  EXPECT_EQ(f.version(), 2u);
  EXPECT_EQ(f.alignment(), 256u);
  for (const GgufTensor& t : f.tensors()) EXPECT_EQ(uintptr_t(t.data - f.tensors()[0].data) % 256, 0u);
  EXPECT_EQ(f.to_f32(f.tensor("f32"))[5], -6.5f);
  // A file without tensors need not be padded.
  Spec empty;
  empty.kvs = {kv_str("a", "b")};
  EXPECT_TRUE(GgufFile::open(write_file(build(empty).bytes)).tensors().empty());
}

TEST(Gguf, EveryTruncationFailsCleanly) {
  const std::vector<uint8_t> full = build(full_spec()).bytes;
  const std::string p = temp_path("trunc");
  for (size_t len = 0; len < full.size(); ++len) {
    {
      std::ofstream f(p, std::ios::binary | std::ios::trunc);
      f.write(reinterpret_cast<const char*>(full.data()), std::streamsize(len));
    }
    try {
      GgufFile::open(p);
      ADD_FAILURE() << "prefix of " << len << " bytes opened";
    } catch (const Error& e) {
      ASSERT_EQ(e.status(), TQKV_ERROR_IO) << len << ": " << e.what();
      ASSERT_NE(std::string(e.what()).find("gguf: "), std::string::npos);
    }
  }
}

Spec one_tensor(uint32_t type, std::vector<uint64_t> dims, size_t n_bytes) {
  Spec s;
  s.kvs = {kv_str("general.architecture", "test")};
  s.tensors = {{"blk.3.attn_q.weight", std::move(dims), type, std::vector<uint8_t>(n_bytes, 0), {}}};
  return s;
}

TEST(Gguf, CorruptionsAreNamed) {
  Spec s = full_spec();
  s.magic = "GGUG";
  expect_io(s, {"bad magic 'GGUG'"});
  s = full_spec();
  s.version = 1;
  expect_io(s, {"unsupported GGUF version 1"});
  s.version = 0x03000000;
  expect_io(s, {"big-endian"});
  s = full_spec();
  s.n_kv = 1ull << 60;
  expect_io(s, {"metadata count 1152921504606846976 is impossible"});
  s = full_spec();
  s.n_tensors = ~0ull;
  expect_io(s, {"tensor count 18446744073709551615 is impossible"});
  s = full_spec();
  s.n_kv = s.kvs.size() + 1;  // runs into the tensor infos
  expect_error([&] { GgufFile::open(write_file(build(s).bytes)); }, TQKV_ERROR_IO, {"gguf: "});

  // String lengths past the end: of a key, of a value, inside an array.
  s = full_spec();
  s.kvs.insert(s.kvs.begin(), Kv{"general.name", 8, Bytes().u64(1ull << 40)});
  expect_io(s, {"truncated", "key 'general.name' string of 1099511627776 bytes"});
  Bytes raw;
  raw.b = {'G', 'G', 'U', 'F'};
  raw.u32(3).u64(0).u64(1).u64(~0ull - 3);
  raw.b.resize(raw.b.size() + 20, 'k');
  expect_error([&] { GgufFile::open(write_file(raw.b)); }, TQKV_ERROR_IO, {"truncated", "key #0"});
  s = full_spec();
  s.kvs.insert(s.kvs.begin(), Kv{"tokens", 9, array_of(8, 2, Bytes().str("a").u64(1ull << 33))});
  expect_io(s, {"key 'tokens' element 1 string of 8589934592 bytes"});
  s = full_spec();
  s.kvs.insert(s.kvs.begin(), Kv{"tokens", 9, array_of(6, 1ull << 61, Bytes())});
  expect_io(s, {"key 'tokens': array of 2305843009213693952 FLOAT32 elements cannot fit"});

  s = full_spec();
  s.kvs.push_back({"bad.type", 13, Bytes().u8(0)});
  expect_io(s, {"key 'bad.type' has unknown value type 13"});
  s = full_spec();
  s.kvs.push_back({"bad.elem", 9, array_of(77, 1, Bytes().u8(0))});
  expect_io(s, {"key 'bad.elem': unknown array element type 77"});
  s = full_spec();
  s.kvs.push_back({"bad.bool", 7, Bytes().u8(2)});
  expect_io(s, {"key 'bad.bool': BOOL value 2 is neither 0 nor 1"});
  Bytes deep = Bytes().u32(4).u64(0);
  for (int k = 0; k < 40; ++k) deep = array_of(9, 1, deep);
  s = full_spec();
  s.kvs.push_back({"deep", 9, deep});
  expect_io(s, {"key 'deep'", "nested deeper than"});
  s = full_spec();
  s.kvs.push_back(kv_u32("u8", 1));
  expect_io(s, {"duplicate key 'u8'"});

  for (uint32_t a : {0u, 24u, 3u}) {
    s = full_spec();
    s.kvs.push_back(kv_u32("general.alignment", a));
    expect_io(s, {"general.alignment " + std::to_string(a) + " is not a power of two"});
  }
  s = full_spec();
  s.kvs.push_back(kv_str("general.alignment", "32"));
  expect_io(s, {"'general.alignment' has type STRING"});

  s = one_tensor(0, {4, 1, 1, 1, 1}, 16);
  expect_io(s, {"tensor 'blk.3.attn_q.weight': n_dims 5 is outside 1..4"});
  s = one_tensor(0, {}, 0);
  expect_io(s, {"n_dims 0"});
  s = one_tensor(0, {4, 0}, 0);
  expect_io(s, {"tensor 'blk.3.attn_q.weight': dimension 1 is 0"});
  s = one_tensor(0, {1ull << 32, 1ull << 32}, 4);
  expect_io(s, {"element count overflows at dimension 1"});
  s = one_tensor(0, {1ull << 31, 1ull << 31}, 4);
  expect_io(s, {"byte size overflows"});
  s = one_tensor(1000, {32}, 64);
  expect_io(s, {"tensor 'blk.3.attn_q.weight' has unknown tensor type 1000"});
  s = one_tensor(8, {33}, 68);
  expect_io(s, {"ne[0] = 33 is not a multiple of the Q8_0 block size 32"});
  s = one_tensor(0, {8}, 32);
  s.tensors[0].offset = 4;
  expect_io(s, {"tensor 'blk.3.attn_q.weight': data offset 4 is not a multiple of the alignment 32"});
  s = one_tensor(0, {8}, 32);
  s.tensors[0].offset = 64;
  expect_io(s, {"tensor 'blk.3.attn_q.weight': data [offset 64, +32 bytes)", "runs past the end of the file (size "});
  s = one_tensor(0, {8}, 32);
  s.tensors[0].offset = ~0ull - 31;  // offset + size wraps around
  expect_io(s, {"runs past the end of the file"});
  s = one_tensor(0, {8}, 32);
  s.tensors.push_back(s.tensors[0]);
  expect_io(s, {"duplicate tensor name 'blk.3.attn_q.weight'"});
  s = one_tensor(0, {8}, 32);
  s.tensors.push_back({"other", {8}, 0, std::vector<uint8_t>(32), 0});
  expect_io(s, {"tensors 'blk.3.attn_q.weight' and 'other' overlap"});
  s = one_tensor(0, {8}, 32);
  s.tensors[0].name = std::string("bad\x01name", 8);
  s.tensors[0].dims = {8, 1, 1, 1, 1};
  expect_io(s, {"'bad\\x01name'"});  // names from the file are escaped

  expect_error([] { GgufFile::open("/nonexistent/dir/model.gguf"); }, TQKV_ERROR_IO, {"/nonexistent/dir/model.gguf", "cannot open"});
  expect_error([] { GgufFile::open(testing::TempDir()); }, TQKV_ERROR_IO, {"not a regular file"});
  expect_error([] { GgufFile::open(write_file({})); }, TQKV_ERROR_IO, {"empty file"});
}

TEST(Gguf, UnsupportedTensorTypesOpenButDoNotDequantize) {
  const Spec s = one_tensor(16, {512}, 2 * 66);  // IQ2_XXS: a real ggml type, not dequantized here
  const GgufFile f = GgufFile::open(write_file(build(s).bytes));
  const GgufTensor& t = f.tensors().at(0);
  EXPECT_STREQ(type_name(t.type), "IQ2_XXS");
  EXPECT_EQ(t.n_bytes, 132u);
  EXPECT_TRUE(type_known(t.type));
  EXPECT_FALSE(type_supported(t.type));
  expect_error([&] { f.to_f32(t); }, TQKV_ERROR_UNSUPPORTED, {"IQ2_XXS"});
  float out[256];
  expect_error([&] { dequantize(t.type, t.data, out, 256); }, TQKV_ERROR_UNSUPPORTED, {"IQ2_XXS", "not supported"});
  expect_error([&] { dequantize(TensorType(1000), t.data, out, 256); }, TQKV_ERROR_UNSUPPORTED, {"unknown tensor type 1000"});
  expect_error([&] { type_block_bytes(TensorType(4)); }, TQKV_ERROR_UNSUPPORTED, {"unknown tensor type 4"});
  expect_error([&] { dequantize(TensorType::Q8_0, t.data, out, 33); }, TQKV_ERROR_INVALID_ARGUMENT, {"multiple of its block size 32"});
  EXPECT_STREQ(type_name(TensorType(4)), "unknown");
}

// Flips in the header region must give a clean error or a file that reads without faults.
void flip_and_open(const Built& b, uint64_t seed, const std::string& p) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> bytes = b.bytes;
  const int flips = 1 + int(rng() % 4);
  for (int k = 0; k < flips; ++k) {
    const size_t at = rng() % b.data_start;
    bytes[at] = rng() % 3 == 0 ? uint8_t(rng()) : uint8_t(bytes[at] ^ (1u << (rng() % 8)));
  }
  {
    std::ofstream f(p, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  }
  try {
    const GgufFile f = GgufFile::open(p);
    for (const std::string& k : f.keys()) (void)f.get_value(k);
    for (const GgufTensor& t : f.tensors())
      if (type_supported(t.type)) (void)f.to_f32(t);
  } catch (const Error& e) {
    ASSERT_EQ(e.status(), TQKV_ERROR_IO) << "seed " << seed << ": " << e.what();
  }
}

TEST(Gguf, RandomHeaderFlipsNeverCrash) {
  const Built b = build(full_spec());
  const std::string p = temp_path("flip");
  for (uint64_t seed = 1; seed <= 3000; ++seed) flip_and_open(b, seed, p);
  const uint64_t fresh = test::fresh_seed();
  SCOPED_TRACE("fresh seed " + std::to_string(fresh));
  for (uint64_t k = 0; k < 1000; ++k) flip_and_open(b, fresh + k, p);
}

// ---- Dequantization against element-by-element formulas from the block layouts ----

std::vector<float> deq(TensorType t, const std::vector<uint8_t>& b) {
  const uint64_t n = b.size() / type_block_bytes(t) * type_block_elems(t);
  std::vector<float> y(n);
  dequantize(t, b.data(), y.data(), n);
  return y;
}

float f16v(float x) { return f16_to_f32(f32_to_f16(x)); }

TEST(Dequant, TypeTable) {
  const std::pair<TensorType, std::pair<uint64_t, uint64_t>> sizes[] = {
      {TensorType::F32, {1, 4}},     {TensorType::F16, {1, 2}},      {TensorType::BF16, {1, 2}},
      {TensorType::Q4_0, {32, 18}},  {TensorType::Q4_1, {32, 20}},   {TensorType::Q5_0, {32, 22}},
      {TensorType::Q5_1, {32, 24}},  {TensorType::Q8_0, {32, 34}},   {TensorType::Q2_K, {256, 84}},
      {TensorType::Q3_K, {256, 110}}, {TensorType::Q4_K, {256, 144}}, {TensorType::Q5_K, {256, 176}},
      {TensorType::Q6_K, {256, 210}}, {TensorType::Q8_K, {256, 292}}};
  for (const auto& [t, s] : sizes) {
    EXPECT_EQ(type_block_elems(t), s.first) << type_name(t);
    EXPECT_EQ(type_block_bytes(t), s.second) << type_name(t);
    EXPECT_TRUE(type_supported(t)) << type_name(t);
  }
  EXPECT_STREQ(type_name(TensorType::Q6_K), "Q6_K");
}

TEST(Dequant, LegacyBlocks) {
  std::mt19937_64 rng(11);
  const int nb = 3;
  // Q8_0: d, then 32 int8.
  std::vector<uint8_t> b = random_bytes(nb * 34, rng);
  for (int i = 0; i < nb; ++i) put_f16(b, i * 34, 0.5f + float(i));
  std::vector<float> y = deq(TensorType::Q8_0, b);
  for (int i = 0; i < nb * 32; ++i) EXPECT_EQ(y[i], float(int8_t(b[(i / 32) * 34 + 2 + i % 32])) * (0.5f + float(i / 32)));
  // Q4_0: d, 16 bytes; element j < 16 is the low nibble of byte j, element j + 16 its high nibble.
  b = random_bytes(nb * 18, rng);
  for (int i = 0; i < nb; ++i) put_f16(b, i * 18, -1.25f * float(i + 1));
  y = deq(TensorType::Q4_0, b);
  for (int i = 0; i < nb * 32; ++i) {
    const uint8_t byte = b[(i / 32) * 18 + 2 + i % 16];
    const int q = (i % 32 < 16 ? byte & 15 : byte >> 4) - 8;
    EXPECT_EQ(y[i], float(q) * -1.25f * float(i / 32 + 1)) << i;
  }
  // Q4_1: d, m, 16 bytes: q * d + m.
  b = random_bytes(nb * 20, rng);
  for (int i = 0; i < nb; ++i) put_f16(b, i * 20, 0.125f), put_f16(b, i * 20 + 2, -3.0f + float(i));
  y = deq(TensorType::Q4_1, b);
  for (int i = 0; i < nb * 32; ++i) {
    const uint8_t byte = b[(i / 32) * 20 + 4 + i % 16];
    const int q = i % 32 < 16 ? byte & 15 : byte >> 4;
    EXPECT_EQ(y[i], float(q) * 0.125f + (-3.0f + float(i / 32))) << i;
  }
  // Q5_0 / Q5_1: the fifth bit of element e is bit e of a little-endian u32.
  for (const bool with_min : {false, true}) {
    const int bs = with_min ? 24 : 22, qh_at = with_min ? 4 : 2;
    b = random_bytes(nb * bs, rng);
    for (int i = 0; i < nb; ++i) {
      put_f16(b, i * bs, f16v(0.3f * float(i + 1)));
      if (with_min) put_f16(b, i * bs + 2, 0.75f);
    }
    y = deq(with_min ? TensorType::Q5_1 : TensorType::Q5_0, b);
    for (int i = 0; i < nb * 32; ++i) {
      const uint8_t* blk = &b[(i / 32) * bs];
      const int e = i % 32;
      const uint32_t qh = uint32_t(blk[qh_at]) | uint32_t(blk[qh_at + 1]) << 8 | uint32_t(blk[qh_at + 2]) << 16 | uint32_t(blk[qh_at + 3]) << 24;
      const uint8_t byte = blk[qh_at + 4 + e % 16];
      const int q = (e < 16 ? byte & 15 : byte >> 4) | int((qh >> e) & 1) << 4;
      const float d = f16v(0.3f * float(i / 32 + 1));
      EXPECT_EQ(y[i], with_min ? float(q) * d + 0.75f : float(q - 16) * d) << i;
    }
  }
}

// Packs 8 six-bit scales and mins the way the Q4_K/Q5_K layout describes: pairs 0-3 in the low
// six bits of bytes 0-3 (scales) and 4-7 (mins); pairs 4-7 keep their low nibbles in bytes 8-11
// (scale low, min high) and their top two bits in bits 6-7 of bytes 0-3 (scales) and 4-7 (mins).
void pack_k4_scales(uint8_t* out, const int* sc, const int* mn) {
  memset(out, 0, 12);
  for (int j = 0; j < 4; ++j) {
    out[j] = uint8_t(sc[j] | (sc[j + 4] >> 4) << 6);
    out[j + 4] = uint8_t(mn[j] | (mn[j + 4] >> 4) << 6);
    out[j + 8] = uint8_t((sc[j + 4] & 15) | (mn[j + 4] & 15) << 4);
  }
}

TEST(Dequant, Q4KAndQ5K) {
  std::mt19937_64 rng(12);
  for (const bool five : {false, true}) {
    const int bs = five ? 176 : 144, nb = 2;
    std::vector<uint8_t> b = random_bytes(nb * bs, rng);
    std::vector<int> sc(nb * 8), mn(nb * 8);
    for (int i = 0; i < nb; ++i) {
      for (int j = 0; j < 8; ++j) sc[i * 8 + j] = int(rng() % 64), mn[i * 8 + j] = int(rng() % 64);
      sc[i * 8 + 7] = 63, mn[i * 8 + 6] = 63;  // all six bits in play
      put_f16(b, i * bs, f16v(0.01f * float(i + 1)));
      put_f16(b, i * bs + 2, f16v(0.003f));
      pack_k4_scales(&b[i * bs + 4], &sc[i * 8], &mn[i * 8]);
    }
    const std::vector<float> y = deq(five ? TensorType::Q5_K : TensorType::Q4_K, b);
    for (int i = 0; i < nb * 256; ++i) {
      const uint8_t* blk = &b[(i / 256) * bs];
      const int e = i % 256, s = e / 32;  // sub-block of 32
      // Sub-blocks 2g and 2g + 1 share the 32 bytes of group g: low and high nibbles.
      const uint8_t byte = blk[(five ? 48 : 16) + 32 * (e / 64) + e % 32];
      int q = s % 2 == 0 ? byte & 15 : byte >> 4;
      if (five) q |= ((blk[16 + e % 32] >> s) & 1) << 4;
      const float d = f16v(0.01f * float(i / 256 + 1)), dmin = f16v(0.003f);
      const float want = d * float(sc[(i / 256) * 8 + s]) * float(q) - dmin * float(mn[(i / 256) * 8 + s]);
      ASSERT_EQ(y[i], want) << (five ? "Q5_K " : "Q4_K ") << i;
    }
  }
}

TEST(Dequant, Q6K) {
  std::mt19937_64 rng(13);
  const int nb = 2;
  std::vector<uint8_t> b = random_bytes(nb * 210, rng);
  for (int i = 0; i < nb; ++i) put_f16(b, i * 210 + 208, f16v(0.02f * float(i + 1)));
  const std::vector<float> y = deq(TensorType::Q6_K, b);
  for (int i = 0; i < nb * 256; ++i) {
    const uint8_t* blk = &b[(i / 256) * 210];
    const int e = i % 256, h = e / 128, r = e % 128;
    // Low 4 bits: ql byte 64h + r % 64, low nibble for r < 64. High 2 bits: qh byte 32h + r % 32,
    // bit pair r / 32.
    const uint8_t lo = blk[64 * h + r % 64];
    const int q = ((r < 64 ? lo & 15 : lo >> 4) | ((blk[128 + 32 * h + r % 32] >> (2 * (r / 32))) & 3) << 4) - 32;
    const float want = f16v(0.02f * float(i / 256 + 1)) * float(int8_t(blk[192 + e / 16])) * float(q);
    ASSERT_EQ(y[i], want) << i;
  }
}

TEST(Dequant, Q2KAndQ3K) {
  std::mt19937_64 rng(14);
  const int nb = 2;
  // Both: 2-bit low parts; element e of a block: half e / 128, plane (e % 128) / 32, byte
  // 32 * half + e % 32 of qs.
  std::vector<uint8_t> b = random_bytes(nb * 84, rng);
  for (int i = 0; i < nb; ++i) put_f16(b, i * 84 + 80, f16v(0.05f)), put_f16(b, i * 84 + 82, f16v(0.02f * float(i + 1)));
  std::vector<float> y = deq(TensorType::Q2_K, b);
  for (int i = 0; i < nb * 256; ++i) {
    const uint8_t* blk = &b[(i / 256) * 84];
    const int e = i % 256;
    const int q = (blk[16 + 32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
    const uint8_t s = blk[e / 16];
    ASSERT_EQ(y[i], f16v(0.05f) * float(s & 15) * float(q) - f16v(0.02f * float(i / 256 + 1)) * float(s >> 4)) << i;
  }
  // Q3_K: sixteen signed 6-bit scales: low nibble from byte j (j < 8) or the high nibble of
  // byte j - 8, top two bits from byte 8 + j % 4 at bit 2 * (j / 4); minus 32. High quant bit e
  // is bit e / 32 of hmask[e % 32]; a clear bit subtracts 4.
  b = random_bytes(nb * 110, rng);
  for (int i = 0; i < nb; ++i) put_f16(b, i * 110 + 108, f16v(-0.07f * float(i + 1)));
  y = deq(TensorType::Q3_K, b);
  for (int i = 0; i < nb * 256; ++i) {
    const uint8_t* blk = &b[(i / 256) * 110];
    const int e = i % 256, j = e / 16;
    const int low = j < 8 ? blk[96 + j] & 15 : blk[96 + j - 8] >> 4;
    const int scale = (low | ((blk[96 + 8 + j % 4] >> (2 * (j / 4))) & 3) << 4) - 32;
    const int q = ((blk[32 + 32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3) - ((blk[e % 32] >> (e / 32)) & 1 ? 0 : 4);
    ASSERT_EQ(y[i], f16v(-0.07f * float(i / 256 + 1)) * float(scale) * float(q)) << i;
  }
  // Q8_K: f32 d, 256 int8, 16 int16 sums that dequantization ignores.
  b = random_bytes(292, rng);
  memcpy(b.data(), "\x00\x00\x40\x3f", 4);  // 0.75f
  y = deq(TensorType::Q8_K, b);
  for (int e = 0; e < 256; ++e) ASSERT_EQ(y[e], 0.75f * float(int8_t(b[4 + e])));
}

// ---- The real models, when scripts/fetch-models.sh has put them in the cache ----

std::string model_path(const char* file) {
  const char* dir = std::getenv("TQKV_CACHE_DIR");
  const char* home = std::getenv("HOME");
  const std::string base = dir && *dir ? dir : std::string(home ? home : "") + "/.cache/tqkv";
  return base + "/models/" + file;
}

// Dequantizes every tensor in pieces (the Gemma embedding alone is 168M values) and checks that
// all values are finite. Returns the set of types seen.
std::set<std::string> check_all_tensors(const GgufFile& f) {
  std::set<std::string> types;
  std::vector<float> buf;
  for (const GgufTensor& t : f.tensors()) {
    types.insert(type_name(t.type));
    const uint64_t be = type_block_elems(t.type), bb = type_block_bytes(t.type);
    const uint64_t step = std::max<uint64_t>(be, (uint64_t(1) << 20) / be * be);
    for (uint64_t done = 0; done < t.n_elements; done += step) {
      const uint64_t n = std::min(step, t.n_elements - done);
      buf.resize(n);
      dequantize(t.type, t.data + done / be * bb, buf.data(), n);
      for (uint64_t k = 0; k < n; ++k)
        if (!std::isfinite(buf[k])) {
          ADD_FAILURE() << t.name << "[" << done + k << "] = " << buf[k];
          return types;
        }
    }
  }
  return types;
}

TEST(GgufModels, SmolLM2) {
  const std::string p = model_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!std::filesystem::exists(p)) GTEST_SKIP() << p << " not found; fetch it with scripts/fetch-models.sh smollm2";
  const GgufFile f = GgufFile::open(p);
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_uint("llama.block_count"), 30u);
  EXPECT_EQ(f.get_uint("llama.attention.head_count"), 9u);
  EXPECT_EQ(f.get_uint("llama.attention.head_count_kv"), 3u);
  EXPECT_EQ(f.get_uint("llama.embedding_length"), 576u);
  EXPECT_EQ(f.get_uint("llama.context_length"), 8192u);
  EXPECT_EQ(f.get_string("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(f.get_string_array("tokenizer.ggml.tokens").size(), 49152u);
  EXPECT_EQ(f.tensors().size(), 272u);
  EXPECT_EQ(f.tensor("token_embd.weight").dims, (std::vector<uint64_t>{576, 49152}));
  const std::vector<float> norm = f.to_f32(f.tensor("blk.0.attn_norm.weight"));
  EXPECT_EQ(norm.size(), 576u);
  EXPECT_EQ(check_all_tensors(f), (std::set<std::string>{"F32", "Q4_1", "Q8_0"}));
}

TEST(GgufModels, Gemma3) {
  const std::string p = model_path("gemma-3-270m-q4_k_m.gguf");
  if (!std::filesystem::exists(p)) GTEST_SKIP() << p << " not found; fetch it with scripts/fetch-models.sh gemma3";
  const GgufFile f = GgufFile::open(p);
  EXPECT_EQ(f.get_string("general.architecture"), "gemma3");
  EXPECT_EQ(f.get_uint("gemma3.block_count"), 18u);
  EXPECT_EQ(f.get_uint("gemma3.attention.head_count"), 4u);
  EXPECT_EQ(f.get_uint("gemma3.attention.head_count_kv"), 1u);
  EXPECT_EQ(f.get_uint("gemma3.attention.key_length"), 256u);
  EXPECT_EQ(f.get_uint("gemma3.attention.sliding_window"), 512u);
  EXPECT_EQ(f.get_uint("gemma3.context_length"), 32768u);
  EXPECT_EQ(f.get_string("tokenizer.ggml.model"), "llama");
  EXPECT_EQ(f.get_float_array("tokenizer.ggml.scores").size(), 262144u);
  EXPECT_EQ(f.get_int_array("tokenizer.ggml.token_type").size(), 262144u);
  EXPECT_EQ(f.tensors().size(), 236u);
  EXPECT_EQ(f.tensor("token_embd.weight").dims, (std::vector<uint64_t>{640, 262144}));
  EXPECT_EQ(check_all_tensors(f), (std::set<std::string>{"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}));
}

}  // namespace
