// Shared helpers for the test binaries: fresh random inputs, error norms, cache builders.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
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

// Attention outputs against a reference, per (query, head) row: the worst row's relative error
// (one wrong element anywhere shows up) and the worst log-sum-exp error (relative above 1).
struct RowErr {
  double out = 0, lse = 0;
};
inline RowErr compare_rows(const std::vector<float>& out, const std::vector<float>& ref, const std::vector<float>& lse,
                           const std::vector<float>& lse_ref, uint32_t d) {
  RowErr r;
  for (size_t row = 0; row < ref.size() / d; ++row) {
    double e = 0, n = 0;
    for (uint32_t i = 0; i < d; ++i) {
      const double a = out[row * d + i], b = ref[row * d + i];
      e += (a - b) * (a - b);
      n += b * b;
      if (!std::isfinite(a)) e = std::numeric_limits<double>::infinity();
    }
    r.out = std::max(r.out, n > 0 ? std::sqrt(e / n) : std::sqrt(e));
    const double la = lse[row], lb = lse_ref[row];
    if (std::isinf(lb)) r.lse = std::max(r.lse, la == lb ? 0.0 : 1.0);
    else r.lse = std::max(r.lse, std::isfinite(la) ? std::fabs(la - lb) / std::max(1.0, std::fabs(lb)) : 1.0);
  }
  return r;
}

}  // namespace tqkv::test
