// Shared helpers for the test binaries: fresh random inputs, error norms, cache builders.
#pragma once
#include <cmath>
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

}  // namespace tqkv::test
