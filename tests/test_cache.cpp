// Cache behaviour through the public C++ API: appends, layouts, memory accounting, and every
// invalid input, each of which must leave the cache exactly as it was.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <span>
#include <string>

#include "api/handle.h"
#include "core/half.h"
#include "core/rotation.h"
#include "test_util.h"

using namespace tqkv;

namespace {

CacheConfig config(uint32_t d, uint32_t hkv, uint32_t cap, Type kt = Type::tq4, Type vt = Type::tq4) {
  CacheConfig c;
  c.dims(d, hkv).types(kt, vt).seqs(2, cap);
  return c;
}

// Snapshot of everything readable: lengths and decoded rows of both sequences.
std::vector<float> snapshot(const Cache& c) {
  const auto cfg = c.config();
  std::vector<float> all;
  for (uint32_t s = 0; s < cfg.num_seqs; ++s) {
    const int64_t len = c.length(s);
    all.push_back(float(len));
    const int64_t first = cfg.layout == TQKV_LAYOUT_RING && len > cfg.capacity ? len - cfg.capacity : 0;
    const uint32_t n = uint32_t(len - first);
    std::vector<float> buf(size_t(n) * cfg.num_kv_heads * cfg.head_dim);
    for (int w = 0; w < 2; ++w) {
      if (n) c.read(s, w, first, n, buf);
      all.insert(all.end(), buf.begin(), buf.end());
    }
  }
  return all;
}

void expect_status(tqkv_status want, const char* needle, const std::function<void()>& f) {
  try {
    f();
    ADD_FAILURE() << "expected status " << want;
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), want) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

}  // namespace

TEST(Cache, InvalidConfigsAreRejectedWithTheParameterNamed) {
  struct Case {
    const char* name;
    std::function<void(CacheConfig&)> edit;
    tqkv_status status;
  };
  const Case cases[] = {
      {"head_dim", [](CacheConfig& c) { c.head_dim = 96; }, TQKV_ERROR_INVALID_ARGUMENT},
      {"head_dim", [](CacheConfig& c) { c.head_dim = 0; }, TQKV_ERROR_INVALID_ARGUMENT},
      {"num_kv_heads", [](CacheConfig& c) { c.num_kv_heads = 0; }, TQKV_ERROR_INVALID_ARGUMENT},
      {"num_seqs", [](CacheConfig& c) { c.num_seqs = 0; }, TQKV_ERROR_INVALID_ARGUMENT},
      {"capacity", [](CacheConfig& c) { c.capacity = 0; }, TQKV_ERROR_INVALID_ARGUMENT},
      {"k_type", [](CacheConfig& c) { c.k_type = static_cast<tqkv_type>(5); }, TQKV_ERROR_INVALID_ARGUMENT},
      {"v_type", [](CacheConfig& c) { c.v_type = static_cast<tqkv_type>(1); }, TQKV_ERROR_INVALID_ARGUMENT},
      {"layout", [](CacheConfig& c) { c.layout = static_cast<tqkv_layout>(7); }, TQKV_ERROR_INVALID_ARGUMENT},
      {"codebook", [](CacheConfig& c) { c.codebook = static_cast<tqkv_codebook>(2); }, TQKV_ERROR_INVALID_ARGUMENT},
      {"scale_mode", [](CacheConfig& c) { c.scale_mode = static_cast<tqkv_scale_mode>(9); }, TQKV_ERROR_INVALID_ARGUMENT},
      {"scale_dtype", [](CacheConfig& c) { c.scale_dtype = static_cast<tqkv_scale_dtype>(3); }, TQKV_ERROR_INVALID_ARGUMENT},
      {"backend", [](CacheConfig& c) { c.backend = static_cast<tqkv_backend>(4); }, TQKV_ERROR_INVALID_ARGUMENT},
      {"capacity", [](CacheConfig& c) { c.capacity = 1u << 31; c.num_seqs = 1u << 30; c.num_kv_heads = 1u << 20; }, TQKV_ERROR_OUT_OF_MEMORY},
  };
  for (const auto& cs : cases) {
    CacheConfig c = config(128, 2, 16);
    cs.edit(c);
    expect_status(cs.status, cs.name, [&] { Cache cache(c); });
    tqkv_memory_info m;
    EXPECT_EQ(tqkv_config_memory(&c, &m), cs.status);
  }
  tqkv_cache* out = reinterpret_cast<tqkv_cache*>(0x1);
  EXPECT_EQ(tqkv_cache_create(nullptr, &out), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(out, nullptr);
  EXPECT_NE(std::string(tqkv_last_error()).find("config"), std::string::npos);
  CacheConfig ok = config(128, 2, 16);
  EXPECT_EQ(tqkv_cache_create(&ok, nullptr), TQKV_ERROR_INVALID_ARGUMENT);
}

TEST(Cache, MemoryAccountingMatchesTheFormat) {
  struct Row {
    Type k, v;
    uint32_t d;
    uint64_t per_head;  // K + V bytes per token per KV head
  };
  const Row rows[] = {
      {Type::tq4, Type::tq4, 128, 2 * (64 + 4)}, {Type::tq8, Type::tq4, 128, (128 + 4) + (64 + 4)},
      {Type::tq2, Type::tq2, 64, 2 * (16 + 4)},  {Type::tq3, Type::tq3, 64, 2 * (32 + 4)},
      {Type::tq3, Type::tq3, 128, 2 * (48 + 4)}, {Type::f16, Type::f16, 256, 2 * 512},
      {Type::f32, Type::tq4, 512, 2048 + 256 + 4},
  };
  for (const auto& r : rows) {
    CacheConfig c = config(r.d, 8, 1000, r.k, r.v);
    Cache cache(c);
    const auto m = cache.memory();
    EXPECT_EQ(m.bytes_per_token, 8 * r.per_head);
    EXPECT_EQ(m.k_bytes_per_token + m.v_bytes_per_token, m.bytes_per_token);
    EXPECT_EQ(m.total_bytes, m.bytes_per_token * 1000 * 2);
  }
  CacheConfig h = config(128, 8, 10);
  h.scale_dtype = TQKV_SCALE_F16;
  EXPECT_EQ(Cache(h).memory().bytes_per_token, 8u * 2 * (64 + 2));
}

TEST(Cache, AppendAndReadBackEveryInputType) {
  std::mt19937_64 rng(test::fresh_seed());
  const uint32_t d = 64, hkv = 2, n = 5;
  for (Type t : {Type::tq4, Type::tq8, Type::f16, Type::f32}) {
    Cache c(config(d, hkv, 32, t, t));
    auto k = test::gaussian(n * hkv * d, rng), v = test::gaussian(n * hkv * d, rng);
    // Make the inputs exactly representable in bf16 and f16 so all three dtypes store the same.
    for (auto* a : {&k, &v})
      for (auto& x : *a) x = bf16_to_f32(f32_to_bf16(x));
    c.append(0, k, v);
    std::vector<uint16_t> kh(k.size()), vh(v.size()), kb(k.size()), vb(v.size());
    for (size_t i = 0; i < k.size(); ++i) {
      kh[i] = f32_to_f16(k[i]);
      vh[i] = f32_to_f16(v[i]);
      kb[i] = f32_to_bf16(k[i]);
      vb[i] = f32_to_bf16(v[i]);
    }
    c.append(0, kh, vh, TQKV_DTYPE_F16);
    c.append(0, kb, vb, TQKV_DTYPE_BF16);
    EXPECT_EQ(c.length(0), 3 * n);
    EXPECT_EQ(c.length(1), 0);
    std::vector<float> a(n * hkv * d), b(a.size()), e(a.size());
    c.read(0, 0, 0, n, a);
    c.read(0, 0, n, n, b);
    c.read(0, 0, 2 * n, n, e);
    EXPECT_EQ(a, b);
    EXPECT_EQ(a, e);
    const double err = test::rel_err(a, k);
    if (t == Type::f32 || t == Type::f16) EXPECT_EQ(err, 0.0);
    else EXPECT_LT(err, t == Type::tq8 ? 0.02 : 0.15);
  }
}

TEST(Cache, RingLayoutKeepsTheLastCapacityPositions) {
  std::mt19937_64 rng(test::fresh_seed());
  const uint32_t d = 64, hkv = 1, cap = 8;
  CacheConfig cfg = config(d, hkv, cap, Type::f32, Type::f32);
  cfg.ring(true);
  Cache c(cfg);
  std::vector<float> all;
  for (int step = 0; step < 3; ++step) {
    const uint32_t n = step == 1 ? 11u : 3u;  // more than capacity in one append too
    auto k = test::gaussian(n * d, rng), v = test::gaussian(n * d, rng);
    c.append(0, k, v);
    all.insert(all.end(), k.begin(), k.end());
  }
  EXPECT_EQ(c.length(0), 17);
  std::vector<float> got(cap * d);
  c.read(0, 0, 17 - cap, cap, got);
  EXPECT_EQ(0, std::memcmp(got.data(), all.data() + (17 - cap) * d, got.size() * 4));
  expect_status(TQKV_ERROR_INVALID_ARGUMENT, "resident", [&] { c.read(0, 0, 17 - cap - 1, 1, got); });
  c.reset(0);
  EXPECT_EQ(c.length(0), 0);
}

TEST(Cache, InvalidAppendsLeaveTheCacheUnchanged) {
  std::mt19937_64 rng(test::fresh_seed());
  const uint32_t d = 128, hkv = 2, cap = 16;
  for (Type t : {Type::tq4, Type::tq3, Type::f16}) {
    CacheConfig cfg = config(d, hkv, cap, t, t);
    cfg.scale_dtype = TQKV_SCALE_F16;
    Cache c(cfg);
    auto k0 = test::gaussian(10 * hkv * d, rng), v0 = test::gaussian(10 * hkv * d, rng);
    c.append(0, k0, v0);
    c.append(1, std::span<const float>(k0).first(3 * hkv * d), std::span<const float>(v0).first(3 * hkv * d));
    const auto before = snapshot(c);

    auto k = test::gaussian(4 * hkv * d, rng), v = test::gaussian(4 * hkv * d, rng);
    // NaN / Inf in K or V, at the last token, so earlier tokens would have been written first.
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      auto kb = k;
      kb.back() = bad;
      expect_status(TQKV_ERROR_NON_FINITE, "k: non-finite", [&] { c.append(0, kb, v); });
      auto vb = v;
      vb[hkv * d * 3 + 5] = bad;
      expect_status(TQKV_ERROR_NON_FINITE, "v: non-finite", [&] { c.append(0, k, vb); });
    }
    // Values an f16 cache (or an f16 scale) cannot hold.
    auto big = v;
    big[7 + hkv * d * 2] = 1e6f;
    expect_status(TQKV_ERROR_NON_FINITE, "f16", [&] { c.append(0, k, big); });
    // Capacity: 10 + 7 > 16 (linear).
    auto k7 = test::gaussian(7 * hkv * d, rng), v7 = test::gaussian(7 * hkv * d, rng);
    expect_status(TQKV_ERROR_CAPACITY, "capacity is 16", [&] { c.append(0, k7, v7); });
    // Sequence out of range, null pointers, bad dtype, mismatched spans.
    expect_status(TQKV_ERROR_INVALID_ARGUMENT, "seq 2", [&] { c.append(2, k, v); });
    EXPECT_EQ(tqkv_cache_append(c.get(), 0, 1, TQKV_DTYPE_F32, nullptr, v.data()), TQKV_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(tqkv_last_error()).find("k: NULL"), std::string::npos);
    EXPECT_EQ(tqkv_cache_append(c.get(), 0, 1, TQKV_DTYPE_F32, k.data(), nullptr), TQKV_ERROR_INVALID_ARGUMENT);
    EXPECT_EQ(tqkv_cache_append(c.get(), 0, 1, static_cast<tqkv_dtype>(9), k.data(), v.data()),
              TQKV_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(tqkv_last_error()).find("dtype"), std::string::npos);
    expect_status(TQKV_ERROR_INVALID_ARGUMENT, "k, v", [&] { c.append(0, std::span<const float>(k).first(5), v); });
    // Batch append is all-or-nothing: sequence 1 is fine, sequence 0 would overflow.
    uint32_t counts[2] = {7, 1};
    std::vector<float> kk(8 * hkv * d, 0.5f), vv(8 * hkv * d, 0.25f);
    EXPECT_EQ(tqkv_cache_append_batch(c.get(), counts, TQKV_DTYPE_F32, kk.data(), vv.data()), TQKV_ERROR_CAPACITY);
    counts[0] = 1;
    kk[2 * hkv * d - 1] = std::numeric_limits<float>::quiet_NaN();  // in sequence 1's token
    EXPECT_EQ(tqkv_cache_append_batch(c.get(), counts, TQKV_DTYPE_F32, kk.data(), vv.data()), TQKV_ERROR_NON_FINITE);
    EXPECT_EQ(tqkv_cache_append_batch(c.get(), nullptr, TQKV_DTYPE_F32, kk.data(), vv.data()),
              TQKV_ERROR_INVALID_ARGUMENT);
    EXPECT_EQ(snapshot(c), before) << "type " << int(t);
    // A good batch append lands in both sequences.
    kk[2 * hkv * d - 1] = 0.5f;
    EXPECT_EQ(tqkv_cache_append_batch(c.get(), counts, TQKV_DTYPE_F32, kk.data(), vv.data()), TQKV_OK);
    EXPECT_EQ(c.length(0), 11);
    EXPECT_EQ(c.length(1), 4);
  }
}

// Finite values can overflow the float butterflies of the rotation (the unnormalized transform
// reaches sqrt(d) times the norm). Such a row is refused by name, not stored as a zero row; a row
// just inside the bound is stored and reads back finite.
TEST(Cache, RowsWhoseRotationOverflowsAreRefusedByName) {
  std::mt19937_64 rng(test::fresh_seed());
  const uint32_t hkv = 2;
  for (uint32_t d : {64u, 128u, 256u, 512u})
    for (Type t : {Type::tq2, Type::tq3, Type::tq4, Type::tq8, Type::q8_0_had}) {
      Cache c(config(d, hkv, 16, t, t));
      auto k = test::gaussian(4 * hkv * d, rng), v = test::gaussian(4 * hkv * d, rng);
      c.append(0, std::span<const float>(k).first(hkv * d), std::span<const float>(v).first(hkv * d));
      const auto before = snapshot(c);
      // Rows c times the rotation's signs: the norm c sqrt(d) stays below FLT_MAX, but the first
      // coordinate of the unnormalized transform is c d > FLT_MAX (inf, or NaN where the last
      // butterflies take inf - inf: the row that was stored as zero before). Such rows at token
      // 1 head 1 and token 2 head 0 of K (the lower one is named) and at token 3 head 0 of V.
      const std::vector<float> sg = core::rotation_signs(c.config().seed, d);
      test::set_signs_row(k, 1 * hkv + 1, sg, 2.0f);  // the last butterflies: inf - inf
      test::set_signs_row(k, 2 * hkv + 0, sg, -1.0f);
      test::set_signs_row(v, 3 * hkv + 0, sg, -1.0f);
      try {
        c.append(0, k, v);
        ADD_FAILURE() << "d " << d << " type " << int(t) << ": an overflowing row was stored";
      } catch (const Error& e) {
        const std::string m = e.what();
        EXPECT_EQ(e.status(), TQKV_ERROR_NON_FINITE) << m;
        for (const char* needle : {"k: row overflows f32 in the rotation", "FLT_MAX / sqrt(head_dim)",
                                   "at token 1, kv head 1 of sequence 0", "nothing was appended"})
          EXPECT_NE(m.find(needle), std::string::npos) << "missing '" << needle << "' in: " << m;
      }
      EXPECT_EQ(snapshot(c), before) << "d " << d << " type " << int(t);
      // V alone: named as V.
      auto k_ok = test::gaussian(4 * hkv * d, rng);
      for (const char* needle : {"v: row overflows f32 in the rotation", "at token 3, kv head 0 of sequence 0"})
        expect_status(TQKV_ERROR_NON_FINITE, needle, [&] { c.append(0, k_ok, v); });
      EXPECT_EQ(snapshot(c), before);
      // The same rows at 0.4 FLT_MAX / d: no partial sum of the transform passes 0.4 FLT_MAX.
      if (t == Type::q8_0_had) continue;  // its f16 block scales hold far less
      std::vector<float> big(hkv * d), small = test::gaussian(hkv * d, rng);
      for (uint32_t h = 0; h < hkv; ++h) test::set_signs_row(big, h, sg, 0.2f);
      c.append(1, big, small);
      std::vector<float> back(hkv * d);
      c.read(1, 0, 0, 1, back);
      for (uint32_t i = 0; i < hkv * d; ++i) {
        ASSERT_TRUE(std::isfinite(back[i])) << "d " << d << " type " << int(t) << " coordinate " << i;
        ASSERT_NE(back[i], 0.0f) << "a row inside the bound was stored as zero";
      }
    }
}

TEST(Cache, QueriesOnBadArgumentsFailCleanly) {
  Cache c(config(64, 1, 4));
  int64_t len = 0;
  EXPECT_EQ(tqkv_cache_length(c.get(), 5, &len), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(tqkv_cache_length(c.get(), 0, nullptr), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(tqkv_cache_length(nullptr, 0, &len), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(tqkv_cache_reset(c.get(), 2), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(tqkv_cache_memory(c.get(), nullptr), TQKV_ERROR_INVALID_ARGUMENT);
  std::vector<float> out(64);
  EXPECT_EQ(tqkv_cache_read(c.get(), 0, 2, 0, 1, out.data()), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(tqkv_cache_read(c.get(), 0, 0, 0, 1, out.data()), TQKV_ERROR_INVALID_ARGUMENT);  // empty
  EXPECT_STREQ(tqkv_status_string(TQKV_ERROR_CAPACITY), "capacity exceeded");
  EXPECT_EQ(tqkv_backend_available(TQKV_BACKEND_CPU), 1);
  CacheConfig cu = config(64, 1, 4);
  cu.backend = TQKV_BACKEND_CUDA;
  if (tqkv_backend_available(TQKV_BACKEND_CUDA) == 0) {  // no build or no device: a clear refusal
    expect_status(TQKV_ERROR_UNSUPPORTED, "backend", [&] { Cache x(cu); });
  } else {
    EXPECT_NO_THROW(Cache x(cu));
  }
  CacheConfig bad = config(64, 1, 4);
  bad.backend = static_cast<tqkv_backend>(7);
  expect_status(TQKV_ERROR_INVALID_ARGUMENT, "backend", [&] { Cache x(bad); });
}

TEST(Cache, CopyBetweenCachesKeepsEveryByte) {
  std::mt19937_64 rng(test::fresh_seed());
  for (Type t : {Type::tq3, Type::tq4, Type::f16, Type::q4_0_had}) {
    CacheConfig c = config(128, 2, 40, t, Type::tq2);
    c.seqs(3, 40);
    c.k_center = TQKV_CENTER_FIRST_APPEND;
    c.ring(true);
    Cache a(c), b(c);
    for (uint32_t s = 0; s < 3; ++s) {
      const uint32_t n = 10 + 20 * s;  // the last sequence wraps its ring
      a.append(s, test::gaussian(size_t(n) * 2 * 128, rng), test::gaussian(size_t(n) * 2 * 128, rng));
    }
    b.copy_from(a);
    const auto& ca = api::unwrap(a.get());
    const auto& cb = api::unwrap(b.get());
    for (int w = 0; w < 2; ++w) {
      const size_t rows = size_t(3) * 2 * 40;
      EXPECT_EQ(std::memcmp(ca.plane(w).data.get(), cb.plane(w).data.get(), rows * ca.plane(w).stride), 0);
    }
    for (uint32_t s = 0; s < 3; ++s) {
      EXPECT_EQ(a.length(s), b.length(s));
      const float* ma = ca.k_center(s);
      const float* mb = cb.k_center(s);
      ASSERT_EQ(ma == nullptr, mb == nullptr);
      if (ma) {
        EXPECT_EQ(std::memcmp(ma, mb, 2 * 128 * sizeof(float)), 0);
      }
    }
    CacheConfig other = c;
    other.capacity = 41;
    Cache d(other);
    expect_status(TQKV_ERROR_INVALID_ARGUMENT, "dst", [&] { d.copy_from(a); });
  }
  // CPU caches have no stream and need no device workspace.
  Cache cpu(config(64, 1, 4));
  AttnParams p(2, 0.1f);
  EXPECT_EQ(cpu.workspace_size(p), 0u);
  EXPECT_NO_THROW(cpu.set_stream(nullptr));
  int dummy = 0;
  expect_status(TQKV_ERROR_INVALID_ARGUMENT, "stream", [&] { cpu.set_stream(&dummy); });
}
