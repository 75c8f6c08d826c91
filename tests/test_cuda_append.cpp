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
#include "test_util.h"
#include "tqkv/tqkv.h"

#ifdef TQKV_TEST_CUDA_RUNTIME
#include <cuda_runtime.h>
#endif

namespace {

using tqkv::api::unwrap;

#define SKIP_WITHOUT_CUDA()                                                          \
  do {                                                                               \
    if (!tqkv_backend_available(TQKV_BACKEND_CUDA)) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

struct Destroy {
  void operator()(tqkv_cache* c) const { tqkv_cache_destroy(c); }
};
using Handle = std::unique_ptr<tqkv_cache, Destroy>;

Handle make(tqkv_cache_config cfg, tqkv_backend backend) {
  cfg.backend = backend;
  tqkv_cache* c = nullptr;
  const tqkv_status st = tqkv_cache_create(&cfg, &c);
  EXPECT_EQ(st, TQKV_OK) << tqkv_last_error();
  return Handle(c);
}

// A host cache holding the CUDA cache's bytes, lengths and key means.
Handle download(const tqkv_cache* gpu) {
  tqkv_cache_config cfg;
  EXPECT_EQ(tqkv_cache_get_config(gpu, &cfg), TQKV_OK);
  Handle h = make(cfg, TQKV_BACKEND_CPU);
  EXPECT_EQ(tqkv_cache_copy(gpu, h.get()), TQKV_OK) << tqkv_last_error();
  return h;
}

tqkv_cache_config base_config(uint32_t d, uint32_t hkv, uint32_t seqs, uint32_t cap, tqkv_type kt, tqkv_type vt) {
  tqkv_cache_config c;
  EXPECT_EQ(tqkv_cache_config_init(&c), TQKV_OK);
  c.head_dim = d;
  c.num_kv_heads = hkv;
  c.num_seqs = seqs;
  c.capacity = cap;
  c.k_type = kt;
  c.v_type = vt;
  return c;
}

size_t elem_bytes(tqkv_dtype dt) { return dt == TQKV_DTYPE_F32 ? 4 : 2; }

// Values as the dtype's bytes.
std::vector<uint8_t> encode_input(const std::vector<float>& x, tqkv_dtype dt) {
  std::vector<uint8_t> out(x.size() * elem_bytes(dt));
  for (size_t i = 0; i < x.size(); ++i) {
    if (dt == TQKV_DTYPE_F32) {
      std::memcpy(out.data() + 4 * i, &x[i], 4);
    } else {
      const uint16_t h = dt == TQKV_DTYPE_F16 ? tqkv::f32_to_f16(x[i]) : tqkv::f32_to_bf16(x[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

// Keys with a common component per (kv head, coordinate), as real keys have, and varied norms.
std::vector<float> make_values(size_t tokens, uint32_t hkv, uint32_t d, std::mt19937_64& rng, float offset) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> norm_scale(0.25f, 4.0f);
  std::vector<float> x(tokens * hkv * d);
  for (size_t t = 0; t < tokens; ++t)
    for (uint32_t h = 0; h < hkv; ++h) {
      const float s = norm_scale(rng);
      for (uint32_t i = 0; i < d; ++i)
        x[(t * hkv + h) * d + i] = s * nd(rng) + offset * std::sin(float(h * d + i));
    }
  if (tokens > 2)  // one all-zero row: the zero-vector path
    for (uint32_t i = 0; i < d; ++i) x[(1 * hkv + 0) * d + i] = 0.0f;
  return x;
}

struct Diff {
  uint64_t indices = 0, index_mismatch = 0, off_by_more = 0;
  uint64_t scales = 0, scale_mismatch = 0;  // rows whose indices all agree
  uint64_t byte_mismatch = 0;               // dense rows, padding, anything that must be identical
  uint64_t length_mismatch = 0, center_mismatch = 0;
  void add(const Diff& o) {
    indices += o.indices;
    index_mismatch += o.index_mismatch;
    off_by_more += o.off_by_more;
    scales += o.scales;
    scale_mismatch += o.scale_mismatch;
    byte_mismatch += o.byte_mismatch;
    length_mismatch += o.length_mismatch;
    center_mismatch += o.center_mismatch;
  }
};

void expect_close_enough(const Diff& d, const std::string& what) {
  EXPECT_EQ(d.off_by_more, 0u) << what;
  EXPECT_EQ(d.byte_mismatch, 0u) << what;
  EXPECT_EQ(d.scale_mismatch, 0u) << what;
  EXPECT_EQ(d.length_mismatch, 0u) << what;
  EXPECT_EQ(d.center_mismatch, 0u) << what;
  EXPECT_LE(double(d.index_mismatch), 1e-4 * double(d.indices) + 0.5) << what;
}

// Every stored byte of two host caches of one configuration, row by row.
Diff compare(const tqkv_cache* a_handle, const tqkv_cache* b_handle) {
  const auto& a = unwrap(a_handle);
  const auto& b = unwrap(b_handle);
  const auto& cfg = a.config();
  Diff diff;
  const size_t rows = size_t(cfg.num_seqs) * cfg.num_kv_heads * cfg.capacity;
  const uint32_t d = cfg.head_dim;
  for (int w = 0; w < 2; ++w) {
    const auto& pa = a.plane(w);
    const auto& pb = b.plane(w);
    const size_t payload = tqkv::fmt::row_payload_bytes(pa.type, d);
    for (size_t r = 0; r < rows; ++r) {
      const uint8_t* ra = pa.data.get() + r * pa.stride;
      const uint8_t* rb = pb.data.get() + r * pb.stride;
      if (!tqkv::fmt::is_tq(pa.type)) {
        diff.byte_mismatch += std::memcmp(ra, rb, pa.stride) != 0;
        continue;
      }
      bool row_ok = true;
      for (uint32_t i = 0; i < d; ++i) {
        const uint32_t ia = tqkv::fmt::get_index(ra, pa.type, d, i), ib = tqkv::fmt::get_index(rb, pa.type, d, i);
        ++diff.indices;
        if (ia != ib) {
          ++diff.index_mismatch;
          row_ok = false;
          if (ia + 1 != ib && ib + 1 != ia) ++diff.off_by_more;
        }
      }
      diff.byte_mismatch += std::memcmp(ra + payload, rb + payload, pa.stride - payload) != 0;
      const float sa = tqkv::core::load_scale(pa.scales.get(), r, pa.scale_f16);
      const float sb = tqkv::core::load_scale(pb.scales.get(), r, pb.scale_f16);
      if (row_ok) {
        ++diff.scales;
        if (std::fabs(double(sa) - double(sb)) > 1e-6 * std::fabs(double(sa))) ++diff.scale_mismatch;
      }
    }
  }
  for (uint32_t s = 0; s < cfg.num_seqs; ++s) {
    diff.length_mismatch += a.length(s) != b.length(s);
    const float* ma = a.k_center(s);
    const float* mb = b.k_center(s);
    if ((ma == nullptr) != (mb == nullptr)) {
      ++diff.center_mismatch;
    } else if (ma) {
      for (size_t i = 0; i < size_t(cfg.num_kv_heads) * d; ++i)
        diff.center_mismatch += std::fabs(double(ma[i]) - double(mb[i])) > 1e-6 * std::fabs(double(ma[i])) + 1e-30;
    }
  }
  return diff;
}

// Byte-for-byte identity of the content of two host caches: the rows of every resident
// position, their scales, lengths and key means. Slots past the length hold no content (a failed
// append written in place may have left bytes there).
bool identical(const tqkv_cache* a_handle, const tqkv_cache* b_handle) {
  const auto& a = unwrap(a_handle);
  const auto& b = unwrap(b_handle);
  const auto& cfg = a.config();
  for (uint32_t s = 0; s < cfg.num_seqs; ++s) {
    if (a.length(s) != b.length(s)) return false;
    const float* ma = a.k_center(s);
    const float* mb = b.k_center(s);
    if ((ma == nullptr) != (mb == nullptr)) return false;
    if (ma && std::memcmp(ma, mb, size_t(cfg.num_kv_heads) * cfg.head_dim * sizeof(float)) != 0) return false;
    for (int64_t pos = a.first_resident(s); pos < a.length(s); ++pos)
      for (uint32_t h = 0; h < cfg.num_kv_heads; ++h)
        for (int w = 0; w < 2; ++w) {
          const uint32_t slot = a.slot_of(pos);
          const auto& pa = a.plane(w);
          if (std::memcmp(a.row(w, s, h, slot), b.row(w, s, h, slot), pa.stride) != 0) return false;
          const size_t sb = tqkv::fmt::scale_bytes(pa.type, pa.scale_f16);
          if (sb && std::memcmp(a.scale_ptr(w, s, h, slot), b.scale_ptr(w, s, h, slot), sb) != 0) return false;
        }
  }
  return true;
}

// Appends the same batch to both caches; both must succeed.
void append_both(tqkv_cache* cpu, tqkv_cache* gpu, const std::vector<uint32_t>& counts, tqkv_dtype dt,
                 std::mt19937_64& rng, float offset) {
  const auto& cfg = unwrap(cpu).config();
  size_t tokens = 0;
  for (uint32_t c : counts) tokens += c;
  const auto k = encode_input(make_values(tokens, cfg.num_kv_heads, cfg.head_dim, rng, offset), dt);
  const auto v = encode_input(make_values(tokens, cfg.num_kv_heads, cfg.head_dim, rng, 0.0f), dt);
  ASSERT_EQ(tqkv_cache_append_batch(cpu, counts.data(), dt, k.data(), v.data()), TQKV_OK) << tqkv_last_error();
  ASSERT_EQ(tqkv_cache_append_batch(gpu, counts.data(), dt, k.data(), v.data()), TQKV_OK) << tqkv_last_error();
}

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

TEST(CudaAppend, MatchesCpuEncoderAcrossTypesDimsAndInputs) {
  SKIP_WITHOUT_CUDA();
  const uint64_t seed = tqkv::test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
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

// ---- asynchronous appends ----

// Device copies of host bytes, freed at scope exit.
struct DevBytes {
  void* p = nullptr;
  explicit DevBytes(const std::vector<uint8_t>& h) {
    EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(h.size(), 16)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, h.data(), h.size(), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~DevBytes() { cudaFree(p); }
  DevBytes(const DevBytes&) = delete;
  DevBytes& operator=(const DevBytes&) = delete;
};

struct Batch {
  std::vector<uint32_t> counts;
  std::vector<uint8_t> k, v;
};

Batch make_batch(const tqkv_cache_config& cfg, std::vector<uint32_t> counts, tqkv_dtype dt, std::mt19937_64& rng) {
  size_t tokens = 0;
  for (uint32_t c : counts) tokens += c;
  Batch b;
  b.counts = std::move(counts);
  b.k = encode_input(make_values(tokens, cfg.num_kv_heads, cfg.head_dim, rng, 2.0f), dt);
  b.v = encode_input(make_values(tokens, cfg.num_kv_heads, cfg.head_dim, rng, 0.0f), dt);
  return b;
}

// Decode attention on a CUDA cache with device buffers over the last `window` positions; returns
// the outputs.
std::vector<float> attend_on_device(const tqkv_cache* cache, const std::vector<float>& q, uint32_t hq,
                                    uint32_t window) {
  tqkv_attn_params p{};
  p.num_q_heads = hq;
  p.scale = 0.125f;
  p.mask = TQKV_MASK_WINDOW;  // a ring that wrapped holds only the last capacity positions
  p.window = window;
  float *dq = nullptr, *dout = nullptr;
  EXPECT_EQ(cudaMalloc(&dq, q.size() * sizeof(float)), cudaSuccess);
  EXPECT_EQ(cudaMalloc(&dout, q.size() * sizeof(float)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(dq, q.data(), q.size() * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  EXPECT_EQ(tqkv_attend(cache, &p, dq, dout, nullptr), TQKV_OK) << tqkv_last_error();
  std::vector<float> out(q.size());
  EXPECT_EQ(cudaMemcpy(out.data(), dout, out.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(dq);
  cudaFree(dout);
  return out;
}

// Async appends, never waited for in between, give the bytes, lengths and key means of the same
// synchronous appends, and attention sees them: on linear caches (rows written in place), rings
// that wrap (staged), and with more sequences than fit the kernel parameters.
TEST(CudaAppend, AsyncAppendsMatchSynchronousOnes) {
  SKIP_WITHOUT_CUDA();
  for (const uint32_t seqs : {3u, 70u})
    for (const auto layout : {TQKV_LAYOUT_LINEAR, TQKV_LAYOUT_RING}) {
      SCOPED_TRACE("seqs " + std::to_string(seqs) + (layout == TQKV_LAYOUT_RING ? " ring" : " linear"));
      std::mt19937_64 rng(21 + seqs);
      auto cfg = base_config(128, 2, seqs, 24, TQKV_TYPE_TQ4, TQKV_TYPE_TQ3);
      cfg.layout = layout;
      cfg.k_center = TQKV_CENTER_FIRST_APPEND;
      Handle sync = make(cfg, TQKV_BACKEND_CUDA), async = make(cfg, TQKV_BACKEND_CUDA);
      ASSERT_TRUE(sync && async);
      tqkv_counters c0{}, c1{};
      std::vector<Batch> batches;
      for (int i = 0; i < 5; ++i) {
        std::vector<uint32_t> counts(seqs, 0);
        for (uint32_t s = 0; s < seqs; ++s) counts[s] = uint32_t((s + i) % 3 == 0 ? 0 : 1 + (s + 2 * i) % 4);
        if (layout == TQKV_LAYOUT_RING && i == 3) counts[1] = 30;  // wraps: more than the capacity at once
        batches.push_back(make_batch(cfg, counts, TQKV_DTYPE_BF16, rng));
      }
      std::vector<std::unique_ptr<DevBytes>> dev;
      tqkv_counters_get(&c0);
      for (const auto& b : batches) {
        dev.push_back(std::make_unique<DevBytes>(b.k));
        const void* dk = dev.back()->p;
        dev.push_back(std::make_unique<DevBytes>(b.v));
        ASSERT_EQ(tqkv_cache_append_batch(sync.get(), b.counts.data(), TQKV_DTYPE_BF16, dk, dev.back()->p), TQKV_OK)
            << tqkv_last_error();
        ASSERT_EQ(tqkv_cache_append_batch_async(async.get(), b.counts.data(), TQKV_DTYPE_BF16, dk, dev.back()->p),
                  TQKV_OK)
            << tqkv_last_error();
      }
      tqkv_counters_get(&c1);
      for (uint32_t s = 0; s < seqs; ++s) {  // counted before anything waited
        int64_t a = -1, b = -2;
        EXPECT_EQ(tqkv_cache_length(sync.get(), s, &a), TQKV_OK);
        EXPECT_EQ(tqkv_cache_length(async.get(), s, &b), TQKV_OK);
        EXPECT_EQ(a, b);
      }
      // Attention before any sync reads the device lengths the appends wrote.
      std::vector<float> q = tqkv::test::gaussian(size_t(seqs) * 4 * 128, rng);
      const auto o_sync = attend_on_device(sync.get(), q, 4, cfg.capacity);
      const auto o_async = attend_on_device(async.get(), q, 4, cfg.capacity);
      EXPECT_EQ(std::memcmp(o_sync.data(), o_async.data(), o_sync.size() * sizeof(float)), 0);
      ASSERT_EQ(tqkv_cache_sync(async.get()), TQKV_OK) << tqkv_last_error();
      Handle a = download(sync.get()), b = download(async.get());
      EXPECT_TRUE(identical(a.get(), b.get()));
      uint64_t rows = 0;
      for (const auto& bt : batches)
        for (uint32_t c : bt.counts) rows += uint64_t(c) * cfg.num_kv_heads * 2;
      EXPECT_EQ(c1.cuda_rows_encoded - c0.cuda_rows_encoded, 2 * rows);  // both caches
    }
}

// A failed async append is reported by the next sync, with where it failed; it and every later
// append are taken back (bytes, lengths, key means, counters), and the cache works afterwards.
TEST(CudaAppend, AsyncFailureIsReportedLaterAndTakesBackWhatFollowed) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(23);
  auto cfg = base_config(64, 2, 3, 32, TQKV_TYPE_TQ4, TQKV_TYPE_TQ4);
  cfg.k_center = TQKV_CENTER_FIRST_APPEND;
  Handle ref = make(cfg, TQKV_BACKEND_CUDA), gpu = make(cfg, TQKV_BACKEND_CUDA);
  ASSERT_TRUE(ref && gpu);
  const Batch first = make_batch(cfg, {4, 0, 0}, TQKV_DTYPE_F32, rng);   // defines seq 0's key mean
  Batch bad = make_batch(cfg, {1, 3, 0}, TQKV_DTYPE_F32, rng);          // would define seq 1's
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(bad.v.data() + 4 * ((2 * 2 + 1) * 64 + 7), &nan, 4);      // input token 2 = seq 1 token 1, head 1
  const Batch later = make_batch(cfg, {2, 2, 5}, TQKV_DTYPE_F32, rng);  // would define seq 2's
  DevBytes fk(first.k), fv(first.v), bk(bad.k), bv(bad.v), lk(later.k), lv(later.v);
  ASSERT_EQ(tqkv_cache_append_batch(ref.get(), first.counts.data(), TQKV_DTYPE_F32, fk.p, fv.p), TQKV_OK);
  tqkv_counters c0{}, c1{};
  tqkv_counters_get(&c0);
  ASSERT_EQ(tqkv_cache_append_batch_async(gpu.get(), first.counts.data(), TQKV_DTYPE_F32, fk.p, fv.p), TQKV_OK);
  ASSERT_EQ(tqkv_cache_append_batch_async(gpu.get(), bad.counts.data(), TQKV_DTYPE_F32, bk.p, bv.p), TQKV_OK);
  ASSERT_EQ(tqkv_cache_append_batch_async(gpu.get(), later.counts.data(), TQKV_DTYPE_F32, lk.p, lv.p), TQKV_OK);
  ASSERT_EQ(tqkv_cache_append_batch_async(gpu.get(), later.counts.data(), TQKV_DTYPE_F32, lk.p, lv.p), TQKV_OK);
  int64_t len = 0;
  ASSERT_EQ(tqkv_cache_length(gpu.get(), 2, &len), TQKV_OK);
  EXPECT_EQ(len, 10);  // counted when called
  // Reading the cache before the sync names the failure instead of returning rows it lost.
  {
    Handle h = make(cfg, TQKV_BACKEND_CPU);
    EXPECT_EQ(tqkv_cache_copy(gpu.get(), h.get()), TQKV_ERROR_NON_FINITE);
    EXPECT_NE(std::string(tqkv_last_error()).find("tqkv_cache_sync"), std::string::npos) << tqkv_last_error();
  }
  EXPECT_EQ(tqkv_cache_sync(gpu.get()), TQKV_ERROR_NON_FINITE);
  const std::string msg = tqkv_last_error();
  for (const char* n : {"v: non-finite", "token 1,", "kv head 1", "coordinate 7", "sequence 1",
                        "asynchronous append 2 of the 4", "the 2 after it were not applied"})
    EXPECT_NE(msg.find(n), std::string::npos) << "missing '" << n << "' in: " << msg;
  tqkv_counters_get(&c1);
  EXPECT_EQ(c1.cuda_rows_encoded - c0.cuda_rows_encoded, 4u * 2 * 2);  // only the first append stays counted
  {
    Handle a = download(ref.get()), b = download(gpu.get());
    EXPECT_TRUE(identical(a.get(), b.get()));
    EXPECT_NE(unwrap(b.get()).k_center(0), nullptr);
    EXPECT_EQ(unwrap(b.get()).k_center(1), nullptr);
    EXPECT_EQ(unwrap(b.get()).k_center(2), nullptr);
  }
  EXPECT_EQ(tqkv_cache_sync(gpu.get()), TQKV_OK) << "reported twice: " << tqkv_last_error();
  // Later appends land again.
  ASSERT_EQ(tqkv_cache_append_batch(ref.get(), later.counts.data(), TQKV_DTYPE_F32, lk.p, lv.p), TQKV_OK);
  ASSERT_EQ(tqkv_cache_append_batch_async(gpu.get(), later.counts.data(), TQKV_DTYPE_F32, lk.p, lv.p), TQKV_OK);
  ASSERT_EQ(tqkv_cache_sync(gpu.get()), TQKV_OK) << tqkv_last_error();
  Handle a = download(ref.get()), b = download(gpu.get());
  EXPECT_TRUE(identical(a.get(), b.get()));

  // A synchronous call after a failed async append reports that failure and does nothing else.
  ASSERT_EQ(tqkv_cache_append_batch_async(gpu.get(), bad.counts.data(), TQKV_DTYPE_F32, bk.p, bv.p), TQKV_OK);
  EXPECT_EQ(tqkv_cache_append_batch(gpu.get(), later.counts.data(), TQKV_DTYPE_F32, lk.p, lv.p),
            TQKV_ERROR_NON_FINITE);
  EXPECT_NE(std::string(tqkv_last_error()).find("asynchronous append 1 of the 1"), std::string::npos)
      << tqkv_last_error();
  Handle c = download(gpu.get());
  EXPECT_TRUE(identical(a.get(), c.get()));
}

TEST(CudaAppend, AsyncRejectsHostInputAndGraphCapture) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(25);
  auto cfg = base_config(64, 1, 1, 8, TQKV_TYPE_TQ4, TQKV_TYPE_TQ4);
  Handle gpu = make(cfg, TQKV_BACKEND_CUDA), cpu = make(cfg, TQKV_BACKEND_CPU);
  ASSERT_TRUE(gpu && cpu);
  const Batch b = make_batch(cfg, {2}, TQKV_DTYPE_F32, rng);
  EXPECT_EQ(tqkv_cache_append_async(gpu.get(), 0, 2, TQKV_DTYPE_F32, b.k.data(), b.v.data()),
            TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(tqkv_last_error()).find("k: host memory"), std::string::npos) << tqkv_last_error();
  DevBytes dk(b.k), dv(b.v);
  EXPECT_EQ(tqkv_cache_append_async(gpu.get(), 0, 9, TQKV_DTYPE_F32, dk.p, dv.p), TQKV_ERROR_CAPACITY);
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreate(&s), cudaSuccess);
  ASSERT_EQ(tqkv_cache_set_stream(gpu.get(), s), TQKV_OK);
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const tqkv_status st = tqkv_cache_append_async(gpu.get(), 0, 2, TQKV_DTYPE_F32, dk.p, dv.p);
  cudaGraph_t g = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(s, &g), cudaSuccess);
  EXPECT_EQ(st, TQKV_ERROR_UNSUPPORTED);
  EXPECT_NE(std::string(tqkv_last_error()).find("graph"), std::string::npos) << tqkv_last_error();
  if (g) cudaGraphDestroy(g);
  int64_t len = -1;
  EXPECT_EQ(tqkv_cache_length(gpu.get(), 0, &len), TQKV_OK);
  EXPECT_EQ(len, 0);
  // On a CPU cache the async calls are the synchronous ones.
  EXPECT_EQ(tqkv_cache_append_async(cpu.get(), 0, 2, TQKV_DTYPE_F32, b.k.data(), b.v.data()), TQKV_OK);
  EXPECT_EQ(tqkv_cache_sync(cpu.get()), TQKV_OK);
  EXPECT_EQ(tqkv_cache_append_async(gpu.get(), 0, 2, TQKV_DTYPE_F32, dk.p, dv.p), TQKV_OK) << tqkv_last_error();
  EXPECT_EQ(tqkv_cache_sync(gpu.get()), TQKV_OK) << tqkv_last_error();
  Handle h = download(gpu.get());
  expect_close_enough(compare(cpu.get(), h.get()), "async on a stream");
  ASSERT_EQ(tqkv_cache_set_stream(gpu.get(), nullptr), TQKV_OK);
  cudaStreamDestroy(s);
}
#endif

}  // namespace
