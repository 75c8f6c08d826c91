// Multi-token attention over one sequence's cache (chunked prefill): every query token must see
// the compressed history exactly as decode would, through the same fused kernels.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "core/codec_ref.h"
#include "core/format.h"
#include "core/half.h"
#include "test_util.h"

using namespace tqkv;

namespace {

double worst_row_err(const std::vector<float>& a, const std::vector<float>& b, uint32_t d) {
  double worst = 0;
  for (size_t r = 0; r < b.size() / d; ++r) worst = std::max(worst, test::rel_err(a.data() + r * d, b.data() + r * d, d));
  return worst;
}

}  // namespace

TEST(Prefill, ChunksMatchTheReferenceForEveryMaskAndLayout) {
  struct C {
    Type t;
    uint32_t d, hkv, g;
    bool ring;
    uint32_t cap;
    Mask mask;
    uint32_t window;
    uint32_t chunk;
    int64_t total;
  };
  const C cases[] = {
      {Type::tq4, 64, 3, 3, false, 600, Mask::causal, 0, 128, 600},   // SmolLM2-like: 9 q / 3 kv heads
      // A ring used for chunked prefill needs capacity >= window + chunk - 1: the chunk's own later
      // tokens must not overwrite what its earlier tokens still see.
      {Type::tq4, 256, 1, 4, true, 113, Mask::window, 64, 50, 300},   // Gemma-like sliding layer, wrapped
      {Type::tq8, 256, 1, 4, true, 80, Mask::window, 33, 37, 200},    // window < capacity
      {Type::tq3, 128, 2, 2, false, 300, Mask::window, 20, 64, 300},
      {Type::tq2, 128, 2, 8, false, 100, Mask::causal, 0, 1, 40},     // one token at a time
      {Type::q4_0_had, 128, 2, 4, false, 300, Mask::causal, 0, 100, 300},
      {Type::q8_0, 64, 1, 2, false, 300, Mask::none, 0, 90, 270},
      {Type::f16, 128, 2, 24, false, 200, Mask::causal, 0, 64, 200},  // g > 16: rows split
  };
  for (const auto& c : cases) {
    SCOPED_TRACE("type " + std::to_string(int(c.t)) + " d " + std::to_string(c.d));
    std::mt19937_64 rng(test::fresh_seed());
    CacheConfig cfg;
    cfg.dims(c.d, c.hkv).types(c.t, c.t).seqs(2, c.cap).ring(c.ring);
    Cache cache(cfg);
    const uint32_t hq = c.hkv * c.g;
    AttnParams p(hq, 1.0f / std::sqrt(float(c.d)));
    p.with_mask(c.mask, c.window);
    for (int64_t done = 0; done < c.total;) {
      const uint32_t n = uint32_t(std::min<int64_t>(c.chunk, c.total - done));
      auto k = test::gaussian(size_t(n) * c.hkv * c.d, rng), v = test::gaussian(size_t(n) * c.hkv * c.d, rng);
      cache.append(1, k, v);  // sequence 1; sequence 0 stays empty
      std::vector<int64_t> pos(n);
      for (uint32_t i = 0; i < n; ++i) pos[i] = done + i;
      auto q = test::gaussian(size_t(n) * hq * c.d, rng);
      std::vector<float> out(q.size()), ref(q.size()), lse(size_t(n) * hq), lse_ref(lse.size());
      test::poison(out);
      cache.attend_seq(1, pos, p, q, out, lse);
      cache.attend_seq_reference(1, pos, p, q, ref, lse_ref);
      EXPECT_LE(worst_row_err(out, ref, c.d), 2e-5) << "chunk at " << done;
      for (size_t i = 0; i < lse.size(); ++i) EXPECT_NEAR(lse[i], lse_ref[i], 1e-5 * std::max(1.0f, std::fabs(lse_ref[i])));
      // The last token of the chunk through decode attention gives the same answer.
      if (c.mask != Mask::none) {
        tqkv_attn_params dp = p;
        std::vector<float> dq(size_t(2) * hq * c.d, 0.0f), dout(dq.size());
        std::copy(q.end() - hq * c.d, q.end(), dq.begin() + hq * c.d);
        cache.attend(dp, dq, dout);
        std::vector<float> last(out.end() - hq * c.d, out.end()), dlast(dout.begin() + hq * c.d, dout.end());
        EXPECT_LE(worst_row_err(last, dlast, c.d), 1e-6);
      }
      done += n;
    }
  }
}

TEST(Prefill, ArbitraryNonDecreasingPositions) {
  std::mt19937_64 rng(test::fresh_seed());
  CacheConfig cfg;
  cfg.dims(128, 2).types(Type::tq4, Type::tq8).seqs(1, 500);
  Cache cache(cfg);
  auto k = test::gaussian(500 * 2 * 128, rng), v = test::gaussian(500 * 2 * 128, rng);
  cache.append(0, k, v);
  std::vector<int64_t> pos{0, 0, 3, 17, 17, 18, 250, 251, 400, 499};
  auto q = test::gaussian(pos.size() * 8 * 128, rng);
  for (Mask m : {Mask::causal, Mask::window, Mask::none}) {
    AttnParams p(8, 0.1f);
    p.with_mask(m, 40).with_softcap(m == Mask::none ? 5.0f : 0.0f);
    std::vector<float> out(q.size()), ref(q.size());
    test::poison(out);
    cache.attend_seq(0, pos, p, q, out);
    cache.attend_seq_reference(0, pos, p, q, ref);
    EXPECT_LE(worst_row_err(out, ref, 128), 2e-5) << "mask " << int(m);
  }
}

TEST(Prefill, InvalidPositionsAreRejected) {
  CacheConfig cfg;
  cfg.dims(64, 1).seqs(1, 16);
  Cache cache(cfg);
  std::vector<float> kv(10 * 64, 0.5f);
  cache.append(0, kv, kv);
  std::vector<float> q(3 * 2 * 64, 1.0f), out(q.size());
  AttnParams p(2, 0.125f);
  auto status = [&](std::vector<int64_t> pos, const tqkv_attn_params& pp, uint32_t seq = 0) {
    return tqkv_attend_seq(cache.get(), seq, uint32_t(pos.size()), pos.data(), &pp, q.data(), out.data(), nullptr);
  };
  EXPECT_EQ(status({0, 1, 2}, p), TQKV_OK);
  EXPECT_EQ(status({0, 5, 10}, p), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tqkv_last_error()).find("q_pos[2]"), std::string::npos);
  EXPECT_EQ(status({4, 3, 5}, p), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tqkv_last_error()).find("non-decreasing"), std::string::npos);
  EXPECT_EQ(status({-1, 0, 1}, p), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(status({0, 1, 2}, p, 1), TQKV_ERROR_INVALID_ARGUMENT);
  AttnParams bad = p;
  const int64_t qp[1] = {0};
  bad.q_pos = qp;
  EXPECT_EQ(status({0, 1, 2}, bad), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tqkv_last_error()).find("params.q_pos"), std::string::npos);
  EXPECT_EQ(tqkv_attend_seq(cache.get(), 0, 2, nullptr, &p, q.data(), out.data(), nullptr), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(cache.length(0), 10);
}

TEST(BlockTypes, EncodeFollowsLlamaCppRules) {
  // Q8_0: d = amax / 127, q = round(x / d). Q4_0: d = (value of largest magnitude) / -8,
  // q = min(15, trunc(x / d + 8.5)), low nibbles hold elements 0..15, high nibbles 16..31.
  std::vector<float> x(64);
  for (int i = 0; i < 64; ++i) x[i] = float(i - 20) * 0.25f;  // block 0: -5 .. 2.75, block 1: 3 .. 10.75
  core::CodecParams q8;
  q8.type = fmt::Q8_0;
  q8.d = 64;
  std::vector<uint8_t> row(fmt::row_stride(fmt::Q8_0, 64));
  ASSERT_EQ(row.size(), 68u);
  core::encode_row(q8, x.data(), row.data());
  uint16_t h;
  std::memcpy(&h, row.data(), 2);
  EXPECT_EQ(h, f32_to_f16(5.0f / 127.0f));
  EXPECT_EQ(int8_t(row[2]), -127);                              // -5 / (5/127)
  EXPECT_EQ(int8_t(row[2 + 21]), int8_t(std::lround(0.25f * 127.0f / 5.0f)));  // 0.25 -> 6.35 -> 6
  std::memcpy(&h, row.data() + 34, 2);
  EXPECT_EQ(h, f32_to_f16(10.75f / 127.0f));
  EXPECT_EQ(int8_t(row[34 + 2 + 31]), 127);
  core::CodecParams q4 = q8;
  q4.type = fmt::Q4_0;
  std::vector<uint8_t> r4(fmt::row_stride(fmt::Q4_0, 64));
  ASSERT_EQ(r4.size(), 36u);
  core::encode_row(q4, x.data(), r4.data());
  std::memcpy(&h, r4.data(), 2);
  EXPECT_EQ(h, f32_to_f16(-5.0f / -8.0f));  // largest magnitude in block 0 is -5
  // element 0 = -5 -> -5 / 0.625 + 8.5 = 0.5 -> 0; element 16 = -1 -> -1.6 + 8.5 = 6.9 -> 6
  EXPECT_EQ(r4[2] & 15, 0);
  EXPECT_EQ(r4[2] >> 4, 6);
  for (int i = 0; i < 64; ++i) {
    const float v8 = core::block_value(row.data(), fmt::Q8_0, uint32_t(i));
    const float v4 = core::block_value(r4.data(), fmt::Q4_0, uint32_t(i));
    EXPECT_NEAR(v8, x[i], 10.75 / 127 / 2 + 1e-3);
    EXPECT_NEAR(v4, x[i], 10.75 / 8 / 2 + 1e-2);
  }
}
