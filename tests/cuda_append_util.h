// Helpers shared by the CUDA append tests: caches, inputs, and comparisons of host caches.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "api/handle.h"
#include "core/cache.h"
#include "core/codec_ref.h"
#include "core/format.h"
#include "core/half.h"
#include "tqkv/tqkv.h"

namespace tqkv::test::cuda_append {

using tqkv::api::unwrap;

#define SKIP_WITHOUT_CUDA()                                                          \
  do {                                                                               \
    if (!tqkv_backend_available(TQKV_BACKEND_CUDA)) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

struct Destroy {
  void operator()(tqkv_cache* c) const { tqkv_cache_destroy(c); }
};
using Handle = std::unique_ptr<tqkv_cache, Destroy>;

inline Handle make(tqkv_cache_config cfg, tqkv_backend backend) {
  cfg.backend = backend;
  tqkv_cache* c = nullptr;
  const tqkv_status st = tqkv_cache_create(&cfg, &c);
  EXPECT_EQ(st, TQKV_OK) << tqkv_last_error();
  return Handle(c);
}

// A host cache holding the CUDA cache's bytes, lengths and key means.
inline Handle download(const tqkv_cache* gpu) {
  tqkv_cache_config cfg;
  EXPECT_EQ(tqkv_cache_get_config(gpu, &cfg), TQKV_OK);
  Handle h = make(cfg, TQKV_BACKEND_CPU);
  EXPECT_EQ(tqkv_cache_copy(gpu, h.get()), TQKV_OK) << tqkv_last_error();
  return h;
}

inline tqkv_cache_config base_config(uint32_t d, uint32_t hkv, uint32_t seqs, uint32_t cap, tqkv_type kt, tqkv_type vt) {
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

inline size_t elem_bytes(tqkv_dtype dt) { return dt == TQKV_DTYPE_F32 ? 4 : 2; }

// Values as the dtype's bytes.
inline std::vector<uint8_t> encode_input(const std::vector<float>& x, tqkv_dtype dt) {
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
inline std::vector<float> make_values(size_t tokens, uint32_t hkv, uint32_t d, std::mt19937_64& rng, float offset) {
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

inline void expect_close_enough(const Diff& d, const std::string& what) {
  EXPECT_EQ(d.off_by_more, 0u) << what;
  EXPECT_EQ(d.byte_mismatch, 0u) << what;
  EXPECT_EQ(d.scale_mismatch, 0u) << what;
  EXPECT_EQ(d.length_mismatch, 0u) << what;
  EXPECT_EQ(d.center_mismatch, 0u) << what;
  EXPECT_LE(double(d.index_mismatch), 1e-4 * double(d.indices) + 0.5) << what;
}

// Every stored byte of two host caches of one configuration, row by row.
inline Diff compare(const tqkv_cache* a_handle, const tqkv_cache* b_handle) {
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
inline bool identical(const tqkv_cache* a_handle, const tqkv_cache* b_handle) {
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
inline void append_both(tqkv_cache* cpu, tqkv_cache* gpu, const std::vector<uint32_t>& counts, tqkv_dtype dt,
                 std::mt19937_64& rng, float offset) {
  const auto& cfg = unwrap(cpu).config();
  size_t tokens = 0;
  for (uint32_t c : counts) tokens += c;
  const auto k = encode_input(make_values(tokens, cfg.num_kv_heads, cfg.head_dim, rng, offset), dt);
  const auto v = encode_input(make_values(tokens, cfg.num_kv_heads, cfg.head_dim, rng, 0.0f), dt);
  ASSERT_EQ(tqkv_cache_append_batch(cpu, counts.data(), dt, k.data(), v.data()), TQKV_OK) << tqkv_last_error();
  ASSERT_EQ(tqkv_cache_append_batch(gpu, counts.data(), dt, k.data(), v.data()), TQKV_OK) << tqkv_last_error();
}

}  // namespace tqkv::test::cuda_append
