// CUDA append (src/cuda/encode.cu) against the CPU encoder: the same inputs appended to a CPU and
// a CUDA cache must give the same bytes, up to the float-rounding cases docs/format.md allows
// (an index one level off where u sits on a boundary). Errors must leave the device cache as it
// was. Every test skips when no CUDA device is usable (CI builds and runs without one).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "api/handle.h"
#include "core/cache.h"
#include "core/codec_ref.h"
#include "core/format.h"
#include "core/half.h"
#include "core/rotation.h"
#include "cuda_append_util.h"
#include "test_util.h"
#include "tqkv/tqkv.h"

#ifdef TQKV_TEST_CUDA_RUNTIME
#include <cuda_runtime.h>

#include "cuda/encode.h"
#endif

namespace {

using namespace tqkv::test::cuda_append;

struct Case {
  uint32_t d;
  tqkv_type kt, vt;
  tqkv_dtype dt;
  tqkv_scale_mode mode;
  tqkv_scale_dtype sdt;
  tqkv_layout layout;
  int center;  // 0 none, 1 first append, 2 set_k_center
};

std::string describe(const Case& c) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "d=%u K=%d V=%d dtype=%d scale_mode=%d scale_dtype=%d layout=%d center=%d", c.d,
                int(c.kt), int(c.vt), int(c.dt), int(c.mode), int(c.sdt), int(c.layout), c.center);
  return buf;
}

Diff run_case(const Case& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const bool ring = c.layout == TQKV_LAYOUT_RING;
  auto cfg = base_config(c.d, 2, 3, ring ? 8 : 64, c.kt, c.vt);
  cfg.scale_mode = c.mode;
  cfg.scale_dtype = c.sdt;
  cfg.layout = c.layout;
  cfg.k_center = c.center == 1 ? TQKV_CENTER_FIRST_APPEND : TQKV_CENTER_NONE;
  Handle cpu = make(cfg, TQKV_BACKEND_CPU), gpu = make(cfg, TQKV_BACKEND_CUDA);
  if (!cpu || !gpu) return Diff{};
  if (c.center == 2) {
    const auto mu = tqkv::test::gaussian(size_t(cfg.num_kv_heads) * c.d, rng, 2.0f);
    for (uint32_t s : {0u, 2u}) {
      EXPECT_EQ(tqkv_cache_set_k_center(cpu.get(), s, mu.data()), TQKV_OK) << tqkv_last_error();
      EXPECT_EQ(tqkv_cache_set_k_center(gpu.get(), s, mu.data()), TQKV_OK) << tqkv_last_error();
    }
  }
  // Unequal counts, empty sequences, and (ring, capacity 8) appends longer than the ring.
  std::vector<std::vector<uint32_t>> batches = {{5, 0, 17}, {1, 9, 0}, {20, 3, 1}};
  if (ring) batches.push_back({13, 7, 30});
  for (size_t b = 0; b < batches.size(); ++b) {
    append_both(cpu.get(), gpu.get(), batches[b], c.dt, rng, 3.0f);
    if (b == 1) {  // a reset sequence starts over (and defines a new key mean)
      EXPECT_EQ(tqkv_cache_reset(cpu.get(), 1), TQKV_OK);
      EXPECT_EQ(tqkv_cache_reset(gpu.get(), 1), TQKV_OK);
    }
  }
  Handle back = download(gpu.get());
  return compare(cpu.get(), back.get());
}

// Both encoder geometries (32 values per lane, and the narrower one small appends take) on
// every case; the appends here are small, so left to itself the encoder would take the narrow one.
void check_every_case(uint64_t seed);

TEST(CudaAppend, MatchesCpuEncoderAcrossTypesDimsAndInputs) {
  SKIP_WITHOUT_CUDA();
  const uint64_t seed = tqkv::test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
#ifdef TQKV_TEST_CUDA_RUNTIME
  struct Restore {
    ~Restore() { tqkv::cuda::enc::force_lanes(tqkv::cuda::enc::Lanes::kAuto); }
  } restore;
  for (auto lanes : {tqkv::cuda::enc::Lanes::kNarrow, tqkv::cuda::enc::Lanes::kWide}) {
    SCOPED_TRACE(lanes == tqkv::cuda::enc::Lanes::kWide ? "32 values per lane" : "narrow geometry");
    tqkv::cuda::enc::force_lanes(lanes);
    check_every_case(seed);
  }
#else
  check_every_case(seed);
#endif
}

void check_every_case(uint64_t seed) {
  const tqkv_type pairs[][2] = {{TQKV_TYPE_TQ2, TQKV_TYPE_TQ3}, {TQKV_TYPE_TQ3, TQKV_TYPE_TQ4},
                                {TQKV_TYPE_TQ4, TQKV_TYPE_TQ8}, {TQKV_TYPE_TQ8, TQKV_TYPE_F16},
                                {TQKV_TYPE_F16, TQKV_TYPE_TQ2}, {TQKV_TYPE_TQ4, TQKV_TYPE_TQ4}};
  const tqkv_dtype dtypes[] = {TQKV_DTYPE_F32, TQKV_DTYPE_F16, TQKV_DTYPE_BF16};
  Diff total;
  uint32_t i = 0;
  for (uint32_t d : {64u, 128u, 256u, 512u})
    for (const auto& p : pairs)
      for (tqkv_dtype dt : dtypes) {
        // The options cycle so that every value of each meets every type and head_dim.
        const Case c{d,
                     p[0],
                     p[1],
                     dt,
                     i % 2 ? TQKV_SCALE_LSQ : TQKV_SCALE_NORM,
                     (i / 2) % 2 ? TQKV_SCALE_F16 : TQKV_SCALE_F32,
                     (i / 4) % 2 ? TQKV_LAYOUT_RING : TQKV_LAYOUT_LINEAR,
                     int(i % 3)};
        ++i;
        const Diff diff = run_case(c, seed + i);
        expect_close_enough(diff, describe(c));
        total.add(diff);
      }
  // Every scale mode, scale dtype, layout and centering on the common configuration.
  for (uint32_t j = 0; j < 24; ++j) {
    const Case c{128,
                 TQKV_TYPE_TQ4,
                 j % 2 ? TQKV_TYPE_TQ3 : TQKV_TYPE_TQ2,
                 TQKV_DTYPE_BF16,
                 j % 2 ? TQKV_SCALE_LSQ : TQKV_SCALE_NORM,
                 (j / 2) % 2 ? TQKV_SCALE_F16 : TQKV_SCALE_F32,
                 (j / 4) % 2 ? TQKV_LAYOUT_RING : TQKV_LAYOUT_LINEAR,
                 int(j / 8)};
    const Diff diff = run_case(c, seed + 1000 + j);
    expect_close_enough(diff, describe(c));
    total.add(diff);
  }
  std::printf("index mismatches: %llu of %llu (%.3g); scales compared: %llu\n",
              (unsigned long long)total.index_mismatch, (unsigned long long)total.indices,
              double(total.index_mismatch) / double(total.indices), (unsigned long long)total.scales);
}

// A prefill-sized append (several sequences, the key mean over more than one summation chunk).
TEST(CudaAppend, PrefillMatchesCpuEncoder) {
  SKIP_WITHOUT_CUDA();
  const uint64_t seed = tqkv::test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto cfg = base_config(128, 8, 2, 2048, TQKV_TYPE_TQ4, TQKV_TYPE_TQ4);
  cfg.k_center = TQKV_CENTER_FIRST_APPEND;
  Handle cpu = make(cfg, TQKV_BACKEND_CPU), gpu = make(cfg, TQKV_BACKEND_CUDA);
  ASSERT_TRUE(cpu && gpu);
  append_both(cpu.get(), gpu.get(), {1500, 700}, TQKV_DTYPE_BF16, rng, 3.0f);
  append_both(cpu.get(), gpu.get(), {300, 1}, TQKV_DTYPE_BF16, rng, 3.0f);
  Handle back = download(gpu.get());
  const Diff diff = compare(cpu.get(), back.get());
  expect_close_enough(diff, "prefill");
  std::printf("prefill index mismatches: %llu of %llu (%.3g)\n", (unsigned long long)diff.index_mismatch,
              (unsigned long long)diff.indices, double(diff.index_mismatch) / double(diff.indices));
}

TEST(CudaAppend, CountsEncodedRows) {
  SKIP_WITHOUT_CUDA();
  auto cfg = base_config(64, 3, 2, 32, TQKV_TYPE_TQ4, TQKV_TYPE_F16);
  Handle gpu = make(cfg, TQKV_BACKEND_CUDA);
  ASSERT_TRUE(gpu);
  std::mt19937_64 rng(1);
  const auto k = tqkv::test::gaussian(7 * 3 * 64, rng);
  const uint32_t counts[2] = {4, 3};
  tqkv_counters_reset();
  ASSERT_EQ(tqkv_cache_append_batch(gpu.get(), counts, TQKV_DTYPE_F32, k.data(), k.data()), TQKV_OK);
  tqkv_counters n;
  tqkv_counters_get(&n);
  EXPECT_EQ(n.cuda_rows_encoded, 7u * 3 * 2);
  EXPECT_EQ(n.rows_encoded, 7u * 3 * 2);
  int64_t len = 0;
  EXPECT_EQ(tqkv_cache_length(gpu.get(), 1, &len), TQKV_OK);
  EXPECT_EQ(len, 3);
}

// A failed append: the status, the message naming the place, and the device bytes, lengths and
// key means unchanged.
void expect_rejected(tqkv_cache* gpu, const std::vector<uint32_t>& counts, tqkv_dtype dt, const void* k,
                     const void* v, tqkv_status want, const std::vector<std::string>& needles) {
  Handle before = download(gpu);
  const tqkv_status st = tqkv_cache_append_batch(gpu, counts.data(), dt, k, v);
  const std::string msg = tqkv_last_error();
  EXPECT_EQ(st, want) << msg;
  for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "missing '" << n << "' in: " << msg;
  Handle after = download(gpu);
  EXPECT_TRUE(identical(before.get(), after.get())) << "a failed append changed the cache";
}

// Finite values can overflow the float butterflies of the rotation (the unnormalized transform
// reaches sqrt(d) times the norm: inf, or inf - inf = NaN). Both encoders refuse such a row by
// name and leave the cache as it was (before, both stored the NaN case as a zero row); a row inside the
// bound is stored with the CPU's bytes. Every TQ type and head_dim, in K and in V.
TEST(CudaAppend, RowsWhoseRotationOverflowsAreRefusedAsOnTheCpu) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(tqkv::test::fresh_seed());
  const uint32_t hkv = 2;
  for (uint32_t d : {64u, 128u, 256u, 512u})
    for (tqkv_type t : {TQKV_TYPE_TQ2, TQKV_TYPE_TQ3, TQKV_TYPE_TQ4, TQKV_TYPE_TQ8}) {
      SCOPED_TRACE("d " + std::to_string(d) + " type " + std::to_string(int(t)));
      const tqkv_cache_config cfg = base_config(d, hkv, 1, 16, t, t);
      Handle cpu = make(cfg, TQKV_BACKEND_CPU), gpu = make(cfg, TQKV_BACKEND_CUDA);
      ASSERT_TRUE(cpu && gpu);
      auto k = tqkv::test::gaussian(size_t(3) * hkv * d, rng), v = tqkv::test::gaussian(size_t(3) * hkv * d, rng);
      ASSERT_EQ(tqkv_cache_append(cpu.get(), 0, 1, TQKV_DTYPE_F32, k.data(), v.data()), TQKV_OK);
      ASSERT_EQ(tqkv_cache_append(gpu.get(), 0, 1, TQKV_DTYPE_F32, k.data(), v.data()), TQKV_OK);
      // Rows c times the rotation's signs, c = 2 or 4 FLT_MAX / d: the norm c sqrt(d) is finite,
      // but the transform's first coordinate would be c d (inf, or NaN where the last butterflies
      // take inf - inf). K: token 1 head 1 and token 2 head 0 (the first is named); V: token 2
      // head 0.
      const std::vector<float> sg = tqkv::core::rotation_signs(cfg.seed, d);
      auto kb = k, vb = v;
      tqkv::test::set_signs_row(kb, 1 * hkv + 1, sg, 2.0f);  // the last butterflies: inf - inf
      tqkv::test::set_signs_row(kb, 2 * hkv + 0, sg, -1.0f);
      tqkv::test::set_signs_row(vb, 2 * hkv + 0, sg, -1.0f);
      EXPECT_EQ(tqkv_cache_append(cpu.get(), 0, 3, TQKV_DTYPE_F32, kb.data(), v.data()), TQKV_ERROR_NON_FINITE);
      const std::string cpu_msg = tqkv_last_error();
      for (const char* needle : {"k: row overflows f32 in the rotation", "at token 1, kv head 1 of sequence 0"})
        EXPECT_NE(cpu_msg.find(needle), std::string::npos) << cpu_msg;
      expect_rejected(gpu.get(), {3}, TQKV_DTYPE_F32, kb.data(), v.data(), TQKV_ERROR_NON_FINITE,
                      {"k: row of token 1, kv head 1 of sequence 0 overflows f32 in the rotation",
                       "FLT_MAX / sqrt(head_dim)", "nothing was appended"});
      expect_rejected(gpu.get(), {3}, TQKV_DTYPE_F32, k.data(), vb.data(), TQKV_ERROR_NON_FINITE,
                      {"v: row of token 2, kv head 0 of sequence 0 overflows f32 in the rotation"});
      // The same rows at 0.4 FLT_MAX / d: no partial sum of the transform passes 0.4 FLT_MAX.
      tqkv::test::set_signs_row(kb, 1 * hkv + 1, sg, 0.2f);
      std::copy_n(k.begin() + (2 * hkv + 0) * d, d, kb.begin() + (2 * hkv + 0) * d);
      tqkv::test::set_signs_row(vb, 2 * hkv + 0, sg, -0.2f);
      ASSERT_EQ(tqkv_cache_append(cpu.get(), 0, 2, TQKV_DTYPE_F32, kb.data() + hkv * d, vb.data() + hkv * d), TQKV_OK)
          << tqkv_last_error();
      ASSERT_EQ(tqkv_cache_append(gpu.get(), 0, 2, TQKV_DTYPE_F32, kb.data() + hkv * d, vb.data() + hkv * d), TQKV_OK)
          << tqkv_last_error();
      Handle back = download(gpu.get());
      EXPECT_TRUE(identical(cpu.get(), back.get()));
    }
}

TEST(CudaAppend, NonFiniteAndOverflowLeaveTheCacheUnchanged) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(7);
  const uint32_t d = 128, hkv = 4;
  auto cfg = base_config(d, hkv, 3, 64, TQKV_TYPE_TQ4, TQKV_TYPE_TQ3);
  cfg.k_center = TQKV_CENTER_FIRST_APPEND;
  Handle gpu = make(cfg, TQKV_BACKEND_CUDA);
  ASSERT_TRUE(gpu);
  const std::vector<uint32_t> counts = {3, 0, 5};
  auto k = make_values(8, hkv, d, rng, 1.0f), v = make_values(8, hkv, d, rng, 0.0f);
  ASSERT_EQ(tqkv_cache_append_batch(gpu.get(), counts.data(), TQKV_DTYPE_F32, k.data(), v.data()), TQKV_OK);

  // NaN in k: token 1 of sequence 2 is input token 3 + 1 = 4.
  auto k_bad = k;
  k_bad[(4 * hkv + 2) * d + 77] = std::numeric_limits<float>::quiet_NaN();
  expect_rejected(gpu.get(), counts, TQKV_DTYPE_F32, k_bad.data(), v.data(), TQKV_ERROR_NON_FINITE,
                  {"k: non-finite", "token 1,", "kv head 2", "coordinate 77", "sequence 2", "nothing was appended"});

  // Inf in v, bf16 input; the sequence without a key mean yet keeps none.
  auto v_bad = v;
  v_bad[(0 * hkv + 3) * d + 5] = std::numeric_limits<float>::infinity();
  const auto kb = encode_input(k, TQKV_DTYPE_BF16), vb = encode_input(v_bad, TQKV_DTYPE_BF16);
  const std::vector<uint32_t> first = {0, 1, 0};
  expect_rejected(gpu.get(), first, TQKV_DTYPE_BF16, kb.data(), vb.data(), TQKV_ERROR_NON_FINITE,
                  {"v: non-finite", "token 0,", "kv head 3", "coordinate 5", "sequence 1", "nothing was appended"});

  // Capacity: 64 slots, sequence 0 holds 3.
  const std::vector<uint32_t> too_many = {62, 0, 0};
  std::vector<float> big(size_t(62) * hkv * d, 0.5f);
  expect_rejected(gpu.get(), too_many, TQKV_DTYPE_F32, big.data(), big.data(), TQKV_ERROR_CAPACITY,
                  {"sequence 0", "capacity"});

  // The cache still works after the failures.
  ASSERT_EQ(tqkv_cache_append_batch(gpu.get(), counts.data(), TQKV_DTYPE_F32, k.data(), v.data()), TQKV_OK)
      << tqkv_last_error();
}

TEST(CudaAppend, F16OverflowIsAnErrorLikeOnTheCpu) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(9);
  const uint32_t d = 64, hkv = 2;
  // Dense f16 K: a value above 65504.
  {
    auto cfg = base_config(d, hkv, 1, 16, TQKV_TYPE_F16, TQKV_TYPE_TQ4);
    Handle gpu = make(cfg, TQKV_BACKEND_CUDA), cpu = make(cfg, TQKV_BACKEND_CPU);
    ASSERT_TRUE(gpu && cpu);
    auto k = tqkv::test::gaussian(size_t(2) * hkv * d, rng), v = k;
    k[(1 * hkv + 1) * d + 9] = 70000.0f;
    EXPECT_EQ(tqkv_cache_append(cpu.get(), 0, 2, TQKV_DTYPE_F32, k.data(), v.data()), TQKV_ERROR_NON_FINITE);
    expect_rejected(gpu.get(), {2}, TQKV_DTYPE_F32, k.data(), v.data(), TQKV_ERROR_NON_FINITE,
                    {"k: value", "token 1,", "kv head 1", "coordinate 9", "overflows the f16 cache"});
    k[(1 * hkv + 1) * d + 9] = 65504.0f;  // the largest f16 is fine
    EXPECT_EQ(tqkv_cache_append(gpu.get(), 0, 2, TQKV_DTYPE_F32, k.data(), v.data()), TQKV_OK) << tqkv_last_error();
  }
  // f16 scales: a row whose norm passes 65504.
  for (auto mode : {TQKV_SCALE_NORM, TQKV_SCALE_LSQ}) {
    auto cfg = base_config(d, hkv, 1, 16, TQKV_TYPE_TQ4, TQKV_TYPE_TQ2);
    cfg.scale_dtype = TQKV_SCALE_F16;
    cfg.scale_mode = mode;
    Handle gpu = make(cfg, TQKV_BACKEND_CUDA), cpu = make(cfg, TQKV_BACKEND_CPU);
    ASSERT_TRUE(gpu && cpu);
    auto k = tqkv::test::gaussian(size_t(3) * hkv * d, rng), v = k;
    for (uint32_t i = 0; i < d; ++i) v[(2 * hkv + 0) * d + i] = 20000.0f * float(i % 3) - 15000.0f;
    EXPECT_EQ(tqkv_cache_append(cpu.get(), 0, 3, TQKV_DTYPE_F32, k.data(), v.data()), TQKV_ERROR_NON_FINITE);
    expect_rejected(gpu.get(), {3}, TQKV_DTYPE_F32, k.data(), v.data(), TQKV_ERROR_NON_FINITE,
                    {"v: row scale", "token 2,", "kv head 0", "f16 scale type", "nothing was appended"});
  }
}

// A failed first append must not define the key mean; the next good one does, as on the CPU.
TEST(CudaAppend, FailedFirstAppendDefinesNoKeyMean) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(11);
  auto cfg = base_config(64, 2, 1, 32, TQKV_TYPE_TQ4, TQKV_TYPE_TQ4);
  cfg.k_center = TQKV_CENTER_FIRST_APPEND;
  Handle gpu = make(cfg, TQKV_BACKEND_CUDA), cpu = make(cfg, TQKV_BACKEND_CPU);
  ASSERT_TRUE(gpu && cpu);
  auto k = make_values(4, 2, 64, rng, 2.0f), v = make_values(4, 2, 64, rng, 0.0f);
  auto v_bad = v;
  v_bad[100] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(tqkv_cache_append(gpu.get(), 0, 4, TQKV_DTYPE_F32, k.data(), v_bad.data()), TQKV_ERROR_NON_FINITE);
  Handle mid = download(gpu.get());
  EXPECT_EQ(unwrap(mid.get()).k_center(0), nullptr);
  ASSERT_EQ(tqkv_cache_append(gpu.get(), 0, 4, TQKV_DTYPE_F32, k.data(), v.data()), TQKV_OK) << tqkv_last_error();
  ASSERT_EQ(tqkv_cache_append(cpu.get(), 0, 4, TQKV_DTYPE_F32, k.data(), v.data()), TQKV_OK);
  Handle back = download(gpu.get());
  expect_close_enough(compare(cpu.get(), back.get()), "after a failed first append");
}

TEST(CudaAppend, CopyRoundTripAndReadMatchTheCpuCache) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(13);
  auto cfg = base_config(128, 2, 2, 16, TQKV_TYPE_TQ3, TQKV_TYPE_F16);
  cfg.layout = TQKV_LAYOUT_RING;
  cfg.k_center = TQKV_CENTER_FIRST_APPEND;
  Handle cpu = make(cfg, TQKV_BACKEND_CPU), gpu = make(cfg, TQKV_BACKEND_CUDA);
  ASSERT_TRUE(cpu && gpu);
  const uint32_t counts[2] = {21, 6};
  const auto k = make_values(27, 2, 128, rng, 2.0f), v = make_values(27, 2, 128, rng, 0.0f);
  ASSERT_EQ(tqkv_cache_append_batch(cpu.get(), counts, TQKV_DTYPE_F32, k.data(), v.data()), TQKV_OK);
  ASSERT_EQ(tqkv_cache_copy(cpu.get(), gpu.get()), TQKV_OK) << tqkv_last_error();
  Handle back = download(gpu.get());
  EXPECT_TRUE(identical(cpu.get(), back.get()));
  for (uint32_t s = 0; s < 2; ++s)
    for (int w = 0; w < 2; ++w) {
      const int64_t first = s == 0 ? 21 - 16 : 0;
      const uint32_t n = s == 0 ? 16 : 6;
      std::vector<float> a(size_t(n) * 2 * 128), b(a.size());
      ASSERT_EQ(tqkv_cache_read(cpu.get(), s, w, first, n, a.data()), TQKV_OK);
      ASSERT_EQ(tqkv_cache_read(gpu.get(), s, w, first, n, b.data()), TQKV_OK) << tqkv_last_error();
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "seq " << s << " which " << w;
    }
  // Appending on top of the uploaded state (lengths and key means on the device) matches too.
  const uint32_t more[2] = {5, 12};
  const auto k2 = make_values(17, 2, 128, rng, 2.0f), v2 = make_values(17, 2, 128, rng, 0.0f);
  ASSERT_EQ(tqkv_cache_append_batch(cpu.get(), more, TQKV_DTYPE_F32, k2.data(), v2.data()), TQKV_OK);
  ASSERT_EQ(tqkv_cache_append_batch(gpu.get(), more, TQKV_DTYPE_F32, k2.data(), v2.data()), TQKV_OK)
      << tqkv_last_error();
  Handle back2 = download(gpu.get());
  expect_close_enough(compare(cpu.get(), back2.get()), "after upload and append");
}

#ifdef TQKV_TEST_CUDA_RUNTIME
// Device input (aligned, and misaligned so that it goes through staging) gives the bytes host
// input gives.
TEST(CudaAppend, DeviceInputMatchesHostInput) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(17);
  auto cfg = base_config(256, 2, 2, 32, TQKV_TYPE_TQ4, TQKV_TYPE_TQ8);
  cfg.k_center = TQKV_CENTER_FIRST_APPEND;
  cfg.scale_dtype = TQKV_SCALE_F16;
  const uint32_t counts[2] = {9, 4};
  const auto k = encode_input(make_values(13, 2, 256, rng, 2.0f), TQKV_DTYPE_F16);
  const auto v = encode_input(make_values(13, 2, 256, rng, 0.0f), TQKV_DTYPE_F16);
  void* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, 2 * k.size() + 64), cudaSuccess);
  uint8_t* dk = static_cast<uint8_t*>(dev);
  uint8_t* dv = dk + k.size() + 2;  // 2-byte aligned only
  ASSERT_EQ(cudaMemcpy(dk, k.data(), k.size(), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dv, v.data(), v.size(), cudaMemcpyHostToDevice), cudaSuccess);
  Handle host_in = make(cfg, TQKV_BACKEND_CUDA), dev_in = make(cfg, TQKV_BACKEND_CUDA);
  ASSERT_TRUE(host_in && dev_in);
  EXPECT_EQ(tqkv_cache_append_batch(host_in.get(), counts, TQKV_DTYPE_F16, k.data(), v.data()), TQKV_OK);
  EXPECT_EQ(tqkv_cache_append_batch(dev_in.get(), counts, TQKV_DTYPE_F16, dk, dv), TQKV_OK) << tqkv_last_error();
  // A NaN in device input is found as well.
  const uint16_t nan16 = 0x7E00;
  ASSERT_EQ(cudaMemcpy(dk + 2 * ((5 * 2 + 1) * 256 + 3), &nan16, 2, cudaMemcpyHostToDevice), cudaSuccess);
  expect_rejected(dev_in.get(), {9, 4}, TQKV_DTYPE_F16, dk, dv, TQKV_ERROR_NON_FINITE,
                  {"k: non-finite", "token 5,", "kv head 1", "coordinate 3", "sequence 0"});
  Handle a = download(host_in.get()), b = download(dev_in.get());
  EXPECT_TRUE(identical(a.get(), b.get()));
  cudaFree(dev);
}

#endif

}  // namespace
