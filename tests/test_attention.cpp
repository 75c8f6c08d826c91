// Kernel exactness: the fused CPU attention (SIMD and portable loops) against the float64
// reference on the same decoded cache, over types, head dims, GQA, batches, masks, rings,
// softcap, sinks, lengths and thread counts. Codec loss is measured separately at the end.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <random>
#include <sstream>

#include "api/handle.h"
#include "core/attention_ref.h"
#include "core/format.h"
#include "cpu/attention.h"
#include "test_util.h"

using namespace tqkv;

namespace {

struct Case {
  uint32_t d = 128, hkv = 1, g = 2;
  Type kt = Type::tq4, vt = Type::tq4;
  std::vector<int64_t> lens{37};
  bool ring = false;
  uint32_t cap = 0;  // 0 = max(lens)
  Mask mask = Mask::causal;
  uint32_t window = 0;
  bool random_qpos = false;
  float softcap = 0;
  bool sinks = false;
  uint32_t threads = 2;
  bool f16_scale = false, lsq = true;
  tqkv_codebook codebook = TQKV_CODEBOOK_EXACT;
  float logit_scale = 0;  // 0 = 1/sqrt(d)
  bool center = false;     // key centering (TQKV_CENTER_FIRST_APPEND), keys given a common offset

  std::string str() const {
    std::ostringstream o;
    o << "d=" << d << " hkv=" << hkv << " g=" << g << " K" << int(kt) << "/V" << int(vt) << " lens=";
    for (auto l : lens) o << l << ",";
    o << " ring=" << ring << " cap=" << cap << " mask=" << int(mask) << " w=" << window << " qpos=" << random_qpos
      << " softcap=" << softcap << " sinks=" << sinks << " threads=" << threads << " f16scale=" << f16_scale
      << " lsq=" << lsq << " cb=" << int(codebook) << " scale=" << logit_scale << " center=" << center;
    return o.str();
  }
};

using Result = test::RowErr;

void run(const Case& c) {
  SCOPED_TRACE(c.str());
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const uint32_t nseq = uint32_t(c.lens.size());
  const int64_t maxlen = *std::max_element(c.lens.begin(), c.lens.end());
  CacheConfig cfg;
  cfg.dims(c.d, c.hkv).types(c.kt, c.vt).seqs(nseq, c.cap ? c.cap : uint32_t(std::max<int64_t>(1, maxlen)));
  cfg.ring(c.ring);
  cfg.scale_dtype = c.f16_scale ? TQKV_SCALE_F16 : TQKV_SCALE_F32;
  cfg.scale_mode = c.lsq ? TQKV_SCALE_LSQ : TQKV_SCALE_NORM;
  cfg.codebook = c.codebook;
  cfg.seed = rng();
  cfg.k_center = c.center ? TQKV_CENTER_FIRST_APPEND : TQKV_CENTER_NONE;
  Cache cache(cfg);
  test::fill_random(cache, c.lens, c.hkv, c.d, c.center, 700, rng);
  const uint32_t hq = c.hkv * c.g;
  const auto qpos = test::query_positions(c.lens, c.ring, cfg.capacity, c.window, c.random_qpos, rng);
  auto q = test::gaussian(size_t(nseq) * hq * c.d, rng);
  std::vector<float> sinks = test::gaussian(hq, rng, 2.0f);
  AttnParams p(hq, c.logit_scale > 0 ? c.logit_scale : 1.0f / std::sqrt(float(c.d)));
  p.with_mask(c.mask, c.window).with_softcap(c.softcap).with_threads(c.threads);
  if (c.sinks) p.with_sinks(sinks);
  const bool any_empty = std::find(c.lens.begin(), c.lens.end(), 0) != c.lens.end();
  if (c.random_qpos && !any_empty) p.with_q_pos(qpos);

  const size_t n_out = size_t(nseq) * hq * c.d;
  std::vector<float> out(n_out), ref(n_out), gen(n_out), lse(nseq * hq), lse_ref(nseq * hq), lse_gen(nseq * hq);
  test::poison(out);
  test::poison(lse);
  test::poison(gen);
  test::poison(lse_gen);
  const auto before = counters();
  cache.attend(p, q, out, lse);
  const auto after = counters();
  cache.attend_reference(p, q, ref, lse_ref);
  // The portable loop, through the same driver and plan.
  const core::Cache& core_cache = api::unwrap(cache.get());
  cpu::attend_generic(core_cache, core::plan_attention(core_cache, &p, q.data(), gen.data()), q.data(), gen.data(),
                      lse_gen.data());
  const bool qpos_used = c.random_qpos && !any_empty;
  const int64_t visible_rows = test::visible_rows(c.lens, qpos_used ? &qpos : nullptr, c.mask, c.window, c.hkv);
  const uint64_t tq_planes = (fmt::is_tq(uint32_t(c.kt)) ? 1 : 0) + (fmt::is_tq(uint32_t(c.vt)) ? 1 : 0);
  EXPECT_EQ(after.compressed_rows_read - before.compressed_rows_read, uint64_t(visible_rows) * tq_planes);

  const double tol = maxlen > 4096 ? 1e-4 : 2e-5;
  const Result fused = test::compare_rows(out, ref, lse, lse_ref, c.d);
  const Result generic = test::compare_rows(gen, ref, lse_gen, lse_ref, c.d);
  EXPECT_LE(fused.out, tol);
  EXPECT_LE(fused.lse, 1e-5);
  EXPECT_LE(generic.out, tol);
  EXPECT_LE(generic.lse, 1e-5);
}

}  // namespace

TEST(Attention, EveryTypePairAndHeadDim) {
  const Type types[] = {Type::tq2, Type::tq3, Type::tq4, Type::tq8, Type::f16, Type::f32,
                        Type::q8_0, Type::q4_0, Type::q8_0_had, Type::q4_0_had};
  for (uint32_t d : {64u, 128u, 256u, 512u})
    for (Type kt : types)
      for (Type vt : types) {
        Case c;
        c.d = d;
        c.kt = kt;
        c.vt = vt;
        c.lens = {33};
        c.hkv = 2;
        c.g = 2;
        run(c);
      }
}

TEST(Attention, GqaRatios) {
  for (uint32_t g : {1u, 2u, 4u, 8u, 16u, 24u}) {
    Case c;
    c.g = g;
    c.hkv = 2;
    c.lens = {300};
    run(c);
  }
}

TEST(Attention, BatchesWithUnequalLengthsIncludingEmpty) {
  for (uint32_t threads : {1u, 2u}) {
    Case c;
    c.hkv = 2;
    c.g = 4;
    c.lens = {1, 33, 0, 700, 2};
    c.threads = threads;
    run(c);
    c.sinks = true;
    run(c);
  }
}

TEST(Attention, Lengths) {
  for (int64_t len : {1, 2, 31, 32, 33, 255, 256, 257, 1000, 4096}) {
    for (uint32_t threads : {1u, 2u}) {
      Case c;
      c.hkv = 2;
      c.g = 4;
      c.lens = {len};
      c.threads = threads;
      run(c);
    }
  }
}

TEST(Attention, LongContextsStayWithin1e4) {
  for (Type t : {Type::tq4, Type::tq2, Type::f16}) {
    Case c;
    c.kt = c.vt = t;
    c.hkv = 1;
    c.g = 4;
    c.lens = {9000};
    c.logit_scale = 0.3f;  // peakier softmax
    run(c);
  }
}

TEST(Attention, MasksOnLinearStorage) {
  for (Mask m : {Mask::none, Mask::causal, Mask::window}) {
    for (uint32_t w : {1u, 7u, 64u, 5000u}) {
      if (m != Mask::window && w != 7) continue;
      Case c;
      c.hkv = 2;
      c.g = 2;
      c.lens = {500, 90};
      c.mask = m;
      c.window = m == Mask::window ? w : 0;
      c.random_qpos = true;
      run(c);
    }
  }
}

TEST(Attention, RingBuffersWrappedAndNot) {
  // window < kv_len <= capacity (not wrapped) and long wrapped rings; the window must be what
  // decides which positions are seen, so the oldest slot is in the middle of the buffer.
  struct R {
    int64_t len;
    uint32_t cap, window;
  };
  for (R r : {R{50, 64, 20}, R{150, 64, 64}, R{150, 64, 20}, R{1000, 100, 37}, R{64, 64, 64}, R{1, 8, 8}}) {
    for (bool qp : {false, true}) {
      Case c;
      c.ring = true;
      c.cap = r.cap;
      c.lens = {r.len, r.len / 2 + 1};
      c.mask = Mask::window;
      c.window = r.window;
      c.random_qpos = qp;
      c.hkv = 2;
      c.g = 4;
      run(c);
    }
  }
}

TEST(Attention, SoftcapSinksAndScales) {
  for (float cap : {0.0f, 30.0f, 2.0f})
    for (bool sinks : {false, true})
      for (float scale : {0.0f, 1.0f}) {
        Case c;
        c.softcap = cap;
        c.sinks = sinks;
        c.logit_scale = scale;
        c.hkv = 2;
        c.g = 4;
        c.lens = {200, 17};
        run(c);
      }
}

TEST(Attention, CodecOptions) {
  for (bool f16 : {false, true})
    for (bool lsq : {false, true})
      for (auto cb : {TQKV_CODEBOOK_EXACT, TQKV_CODEBOOK_GAUSSIAN}) {
        Case c;
        c.f16_scale = f16;
        c.lsq = lsq;
        c.codebook = cb;
        c.kt = Type::tq8;
        c.vt = Type::tq3;
        c.lens = {77};
        run(c);
      }
}

TEST(Attention, KeyCenteringIsExact) {
  // The fused kernels and the reference both see k = mu + decoded residual; softcap forces the
  // in-kernel offset path, sinks and LSE the merge-time one.
  for (Type t : {Type::tq4, Type::tq2, Type::q8_0, Type::f16})
    for (float cap : {0.0f, 20.0f})
      for (bool sinks : {false, true}) {
        Case c;
        c.kt = t;
        c.vt = Type::tq4;
        c.center = true;
        c.softcap = cap;
        c.sinks = sinks;
        c.hkv = 2;
        c.g = 4;
        c.lens = {300, 0, 45};
        c.logit_scale = 0.2f;
        run(c);
      }
}

TEST(Attention, KeyCenteringCutsKeyErrorAndCanBeSetExplicitly) {
  std::mt19937_64 rng(test::fresh_seed());
  const uint32_t d = 128, n = 256;
  auto offset = test::gaussian(d, rng, 4.0f);
  auto k = test::gaussian(n * d, rng), v = test::gaussian(n * d, rng);
  for (size_t i = 0; i < k.size(); ++i) k[i] += offset[i % d];
  double err[2];
  for (int centered = 0; centered < 2; ++centered) {
    CacheConfig cfg;
    cfg.dims(d, 1).seqs(1, n);
    cfg.k_center = centered ? TQKV_CENTER_FIRST_APPEND : TQKV_CENTER_NONE;
    Cache cache(cfg);
    cache.append(0, k, v);
    std::vector<float> back(k.size());
    cache.read(0, 0, 0, n, back);
    err[centered] = test::rel_err(back, k);
    tqkv_memory_info m = cache.memory();
    EXPECT_EQ(m.total_bytes, m.bytes_per_token * n + (centered ? d * 4 : 0));
  }
  EXPECT_LT(err[1], 0.5 * err[0]);  // the shared part costs nothing once removed
  // Explicit means: only on an empty sequence, finite, any k_center setting; reset clears it.
  CacheConfig cfg;
  cfg.dims(d, 1).seqs(1, n);
  Cache cache(cfg);
  EXPECT_EQ(tqkv_cache_set_k_center(cache.get(), 0, offset.data()), TQKV_OK);
  cache.append(0, k, v);
  std::vector<float> back(k.size());
  cache.read(0, 0, 0, n, back);
  EXPECT_LT(test::rel_err(back, k), 0.6 * err[0]);
  EXPECT_EQ(tqkv_cache_set_k_center(cache.get(), 0, offset.data()), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tqkv_last_error()).find("empty"), std::string::npos);
  cache.reset(0);
  offset[3] = std::numeric_limits<float>::infinity();
  EXPECT_EQ(tqkv_cache_set_k_center(cache.get(), 0, offset.data()), TQKV_ERROR_NON_FINITE);
  EXPECT_EQ(tqkv_cache_set_k_center(cache.get(), 0, nullptr), TQKV_ERROR_INVALID_ARGUMENT);
  CacheConfig bad = cfg;
  bad.k_center = static_cast<tqkv_center>(4);
  tqkv_cache* out = nullptr;
  EXPECT_EQ(tqkv_cache_create(&bad, &out), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tqkv_last_error()).find("k_center"), std::string::npos);
}

TEST(Attention, EmptySequencesGiveZerosAndMinusInfinity) {
  CacheConfig cfg;
  cfg.dims(64, 1).seqs(2, 8);
  Cache cache(cfg);
  std::vector<float> k(64, 1.0f), v(64, 2.0f), q(2 * 2 * 64, 0.5f), out(2 * 2 * 64, 7.0f), lse(4, 7.0f);
  cache.append(1, k, v);
  AttnParams p(2, 0.125f);
  cache.attend(p, q, out, lse);
  for (int i = 0; i < 128; ++i) EXPECT_EQ(out[i], 0.0f);
  EXPECT_EQ(lse[0], -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isfinite(lse[2]));
  const std::vector<float> sinks{1.5f, -2.0f};
  p.with_sinks(sinks);
  cache.attend(p, q, out, lse);
  EXPECT_EQ(lse[0], 1.5f);
  EXPECT_EQ(lse[1], -2.0f);
  for (int i = 0; i < 128; ++i) EXPECT_EQ(out[i], 0.0f);
}

TEST(Attention, InvalidParametersAreRejected) {
  CacheConfig cfg;
  cfg.dims(64, 2).seqs(1, 16).ring(true);
  Cache cache(cfg);
  std::mt19937_64 rng(test::fresh_seed());
  auto k = test::gaussian(20 * 2 * 64, rng), v = test::gaussian(20 * 2 * 64, rng);
  cache.append(0, k, v);  // wrapped: holds positions 4..19
  auto q = test::gaussian(4 * 64, rng);
  std::vector<float> out(4 * 64);
  auto expect = [&](tqkv_status st, const char* needle, const tqkv_attn_params& p, const float* qq = nullptr,
                    float* oo = nullptr) {
    EXPECT_EQ(tqkv_attend(cache.get(), &p, qq ? qq : q.data(), oo ? oo : out.data(), nullptr), st);
    EXPECT_NE(std::string(tqkv_last_error()).find(needle), std::string::npos) << tqkv_last_error();
  };
  AttnParams ok(4, 0.125f);
  ok.with_mask(Mask::window, 16);
  EXPECT_EQ(tqkv_attend(cache.get(), &ok, q.data(), out.data(), nullptr), TQKV_OK);
  AttnParams p = ok;
  p.num_q_heads = 3;
  expect(TQKV_ERROR_INVALID_ARGUMENT, "num_q_heads", p);
  p = ok;
  p.num_q_heads = 0;
  expect(TQKV_ERROR_INVALID_ARGUMENT, "num_q_heads", p);
  p = ok;
  p.num_q_heads = 0xFFFFFFFEu;  // a multiple of the 2 KV heads, far beyond the limit
  expect(TQKV_ERROR_INVALID_ARGUMENT, "at most 65536", p);
  size_t ws = 1;
  EXPECT_EQ(tqkv_attend_workspace_size(cache.get(), &p, &ws), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tqkv_last_error()).find("num_q_heads"), std::string::npos) << tqkv_last_error();
  p = ok;
  p.scale = std::numeric_limits<float>::quiet_NaN();
  expect(TQKV_ERROR_INVALID_ARGUMENT, "scale", p);
  p.scale = 0;
  expect(TQKV_ERROR_INVALID_ARGUMENT, "scale", p);
  p = ok;
  p.softcap = std::numeric_limits<float>::infinity();
  expect(TQKV_ERROR_INVALID_ARGUMENT, "softcap", p);
  p.softcap = -1;
  expect(TQKV_ERROR_INVALID_ARGUMENT, "softcap", p);
  p = ok;
  p.window = 17;  // larger than the ring
  expect(TQKV_ERROR_INVALID_ARGUMENT, "window", p);
  p.window = 0;
  expect(TQKV_ERROR_INVALID_ARGUMENT, "window", p);
  p = ok;
  p.mask = TQKV_MASK_CAUSAL;  // needs evicted positions 0..3
  expect(TQKV_ERROR_INVALID_ARGUMENT, "mask", p);
  p.mask = static_cast<tqkv_mask>(5);
  expect(TQKV_ERROR_INVALID_ARGUMENT, "mask", p);
  p = ok;
  const int64_t bad_pos[1] = {20};
  p.q_pos = bad_pos;
  expect(TQKV_ERROR_INVALID_ARGUMENT, "q_pos", p);
  p = ok;
  const float bad_sinks[4] = {0, 0, std::numeric_limits<float>::infinity(), 0};
  p.sinks = bad_sinks;
  expect(TQKV_ERROR_NON_FINITE, "sinks[2]", p);
  auto qn = q;
  qn[77] = std::numeric_limits<float>::quiet_NaN();
  expect(TQKV_ERROR_NON_FINITE, "q:", ok, qn.data());
  EXPECT_EQ(tqkv_attend(cache.get(), nullptr, q.data(), out.data(), nullptr), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(tqkv_attend(cache.get(), &ok, nullptr, out.data(), nullptr), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(tqkv_attend(cache.get(), &ok, q.data(), nullptr, nullptr), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(tqkv_attend(nullptr, &ok, q.data(), out.data(), nullptr), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(cache.length(0), 20);  // nothing changed
}

// Codec loss, as opposed to kernel exactness: the fused output on the compressed cache against
// float64 attention on the original (never quantized) vectors. Reported, and bounded loosely
// enough to hold for any valid codec but tightly enough to catch a broken or idle one.
TEST(Attention, CodecLossAgainstOriginalVectors) {
  const uint32_t d = 128, hkv = 2, g = 4, hq = hkv * g, n = 2048;
  std::mt19937_64 rng(test::fresh_seed());
  auto k = test::gaussian(size_t(n) * hkv * d, rng), v = test::gaussian(size_t(n) * hkv * d, rng);
  auto q = test::gaussian(size_t(hq) * d, rng);
  const float scale = 1.0f / std::sqrt(float(d));
  // float64 attention on the original vectors
  std::vector<float> exact(size_t(hq) * d);
  for (uint32_t h = 0; h < hq; ++h) {
    const uint32_t kvh = h / g;
    std::vector<double> logit(n), o(d, 0.0);
    double m = -1e300, sum = 0;
    for (uint32_t j = 0; j < n; ++j) {
      double dot = 0;
      for (uint32_t i = 0; i < d; ++i) dot += double(q[h * d + i]) * k[(size_t(j) * hkv + kvh) * d + i];
      logit[j] = scale * dot;
      m = std::max(m, logit[j]);
    }
    for (uint32_t j = 0; j < n; ++j) {
      const double p = std::exp(logit[j] - m);
      sum += p;
      for (uint32_t i = 0; i < d; ++i) o[i] += p * v[(size_t(j) * hkv + kvh) * d + i];
    }
    for (uint32_t i = 0; i < d; ++i) exact[h * d + i] = float(o[i] / sum);
  }
  std::map<int, double> err;
  for (Type t : {Type::tq2, Type::tq3, Type::tq4, Type::tq8, Type::f16, Type::f32}) {
    CacheConfig cfg;
    cfg.dims(d, hkv).types(t, t).seqs(1, n);
    Cache cache(cfg);
    cache.append(0, k, v);
    std::vector<float> out(exact.size());
    test::poison(out);
    cache.attend(AttnParams(hq, scale), q, out);
    err[int(t)] = test::rel_err(out, exact);
    RecordProperty("codec_loss_" + std::to_string(int(t)), std::to_string(err[int(t)]));
    std::printf("codec loss K%d/V%d: output rel. error %.4g\n", int(t), int(t), err[int(t)]);
  }
  EXPECT_GT(err[2], err[3]);
  EXPECT_GT(err[3], err[4]);
  EXPECT_GT(err[4], err[8]);
  EXPECT_GT(err[8], err[16]);
  EXPECT_LT(err[2], 0.8);
  EXPECT_LT(err[4], 0.2);
  EXPECT_LT(err[8], 0.015);
  EXPECT_LT(err[16], 2e-3);
  EXPECT_LT(err[32], 2e-5);
  EXPECT_GT(err[4], 0.005);  // a 4-bit codec that loses nothing is not quantizing
}
