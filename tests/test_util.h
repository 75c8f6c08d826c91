// Shared helpers for the test binaries: fresh random inputs, error norms, cache builders.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "tqkv/tqkv.hpp"

namespace tqkv::test {

// A fresh seed per call (from the clock and a counter), printed by failing assertions through
// the caller, so every run draws new inputs while a failure stays reproducible.
inline uint64_t fresh_seed() {
  static uint64_t counter = 0;
  static const uint64_t base = std::random_device{}() ^ (uint64_t(std::random_device{}()) << 32);
  return base + 0x9E3779B97F4A7C15ull * ++counter;
}

inline std::vector<float> gaussian(size_t n, std::mt19937_64& rng, float sigma = 1.0f) {
  std::normal_distribution<float> nd(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

// Sets row `row` of `rows` (rows of d = signs.size() floats) to f (2 FLT_MAX / d) times the
// rotation's signs: the norm stays finite, but the unnormalized transform's first coordinate is
// 2 f FLT_MAX (|f| = 1: inf; |f| = 2: the last butterflies take inf - inf = NaN; |f| <= 0.2: no
// partial sum of the transform passes 0.4 FLT_MAX, so the row is representable).
inline void set_signs_row(std::vector<float>& rows, size_t row, const std::vector<float>& signs, float f) {
  const size_t d = signs.size();
  const float over = std::numeric_limits<float>::max() / float(d) * 2.0f;
  for (size_t i = 0; i < d; ++i) rows[row * d + i] = signs[i] * over * f;
}

// ||a - b|| / ||b||
inline double rel_err(const float* a, const float* b, size_t n) {
  double e = 0, r = 0;
  for (size_t i = 0; i < n; ++i) {
    e += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    r += double(b[i]) * b[i];
  }
  return r > 0 ? std::sqrt(e / r) : std::sqrt(e);
}
inline double rel_err(const std::vector<float>& a, const std::vector<float>& b) { return rel_err(a.data(), b.data(), b.size()); }

inline bool all_finite(const std::vector<float>& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

// Fills with a NaN pattern so that any element a kernel forgets to write fails the comparison.
inline void poison(std::vector<float>& v) {
  for (auto& x : v) x = std::numeric_limits<float>::quiet_NaN();
}

// Appends lens[s] random tokens to each sequence s, in appends of 1..max_chunk tokens. With
// center, every key also gets one common offset (real keys share a large common part).
inline void fill_random(Cache& cache, const std::vector<int64_t>& lens, uint32_t hkv, uint32_t d, bool center,
                        uint32_t max_chunk, std::mt19937_64& rng) {
  const auto offset = gaussian(size_t(hkv) * d, rng, 3.0f);
  for (uint32_t s = 0; s < lens.size(); ++s) {
    int64_t left = lens[s];
    while (left > 0) {
      const int64_t n = std::min<int64_t>(left, 1 + int64_t(rng() % max_chunk));
      auto k = gaussian(size_t(n) * hkv * d, rng), v = gaussian(size_t(n) * hkv * d, rng);
      if (center)
        for (size_t i = 0; i < k.size(); ++i) k[i] += offset[i % offset.size()];
      cache.append(s, k, v);
      left -= n;
    }
  }
}

// One query position per sequence: its last position, or with random a random one whose
// window (window positions back) is still resident when a ring holds only capacity positions.
inline std::vector<int64_t> query_positions(const std::vector<int64_t>& lens, bool ring, uint32_t capacity,
                                            uint32_t window, bool random, std::mt19937_64& rng) {
  std::vector<int64_t> qpos(lens.size());
  for (size_t s = 0; s < lens.size(); ++s) {
    const int64_t len = lens[s];
    const int64_t lo = ring && len > capacity ? len - capacity : 0;
    int64_t p = len - 1;
    if (random && len > 0) {
      const int64_t min_p = ring ? std::min<int64_t>(len - 1, lo + std::max<int64_t>(0, int64_t(window) - 1)) : 0;
      p = min_p + int64_t(rng() % uint64_t(len - min_p));
    }
    qpos[s] = std::max<int64_t>(p, 0);
  }
  return qpos;
}

// Positions the mask shows to each sequence's query (qpos nullptr: the last position), summed
// over sequences and times hkv: the rows a fused kernel must read per plane.
inline int64_t visible_rows(const std::vector<int64_t>& lens, const std::vector<int64_t>* qpos, Mask mask,
                            uint32_t window, uint32_t hkv) {
  int64_t rows = 0;
  for (size_t s = 0; s < lens.size(); ++s) {
    const int64_t len = lens[s], qp = qpos ? (*qpos)[s] : len - 1;
    int64_t lo = 0, hi = len;
    if (mask == Mask::causal) hi = qp + 1;
    if (mask == Mask::window) {
      hi = qp + 1;
      lo = std::max<int64_t>(0, qp - int64_t(window) + 1);
    }
    rows += std::max<int64_t>(0, hi - lo) * hkv;
  }
  return rows;
}

// ||a - ref|| / ||ref|| over d values (the absolute error where ref is zero; inf where a holds a
// non-finite value).
inline double row_rel_error(const float* a, const float* ref, uint32_t d) {
  double e = 0, n = 0;
  for (uint32_t i = 0; i < d; ++i) {
    const double x = a[i], y = ref[i];
    e += (x - y) * (x - y);
    n += y * y;
    if (!std::isfinite(x)) e = std::numeric_limits<double>::infinity();
  }
  return n > 0 ? std::sqrt(e / n) : std::sqrt(e);
}

// Attention outputs against a reference, per (query, head) row: the worst row's relative error
// (one wrong element anywhere shows up) and the worst log-sum-exp error (relative above 1).
struct RowErr {
  double out = 0, lse = 0;
};
inline RowErr compare_rows(const std::vector<float>& out, const std::vector<float>& ref, const std::vector<float>& lse,
                           const std::vector<float>& lse_ref, uint32_t d) {
  RowErr r;
  for (size_t row = 0; row < ref.size() / d; ++row) {
    r.out = std::max(r.out, row_rel_error(out.data() + row * d, ref.data() + row * d, d));
    const double la = lse[row], lb = lse_ref[row];
    if (std::isinf(lb)) r.lse = std::max(r.lse, la == lb ? 0.0 : 1.0);
    else r.lse = std::max(r.lse, std::isfinite(la) ? std::fabs(la - lb) / std::max(1.0, std::fabs(lb)) : 1.0);
  }
  return r;
}

}  // namespace tqkv::test
