#include "core/rotation.h"

#include <cmath>

namespace tqkv::core {

std::vector<float> rotation_signs(uint64_t seed, uint32_t d) {
  std::vector<float> s(d);
  uint64_t state = seed;
  uint64_t word = 0;
  for (uint32_t i = 0; i < d; ++i) {
    if (i % 64 == 0) word = splitmix64(state);
    s[i] = ((word >> (i % 64)) & 1u) ? -1.0f : 1.0f;
  }
  return s;
}

template <typename T>
static void fwht_impl(T* x, uint32_t d) {
  for (uint32_t h = 1; h < d; h *= 2) {
    for (uint32_t i = 0; i < d; i += 2 * h) {
      for (uint32_t j = i; j < i + h; ++j) {
        const T a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
}

void fwht(float* x, uint32_t d) { fwht_impl(x, d); }
void fwht(double* x, uint32_t d) { fwht_impl(x, d); }

// 1/sqrt(d) as the float every implementation uses (exact for d = 64 and 256).
static float inv_sqrt_f(uint32_t d) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(d))); }

void rotate(const float* signs, const float* x, float* y, uint32_t d) {
  for (uint32_t i = 0; i < d; ++i) y[i] = signs[i] * x[i];
  fwht(y, d);
  const float k = inv_sqrt_f(d);
  for (uint32_t i = 0; i < d; ++i) y[i] *= k;
}

void rotate(const float* signs, const double* x, double* y, uint32_t d) {
  for (uint32_t i = 0; i < d; ++i) y[i] = signs[i] * x[i];
  fwht(y, d);
  const double k = 1.0 / std::sqrt(static_cast<double>(d));
  for (uint32_t i = 0; i < d; ++i) y[i] *= k;
}

void unrotate(const float* signs, const float* y, float* x, uint32_t d) {
  for (uint32_t i = 0; i < d; ++i) x[i] = y[i];
  fwht(x, d);
  const float k = inv_sqrt_f(d);
  for (uint32_t i = 0; i < d; ++i) x[i] = signs[i] * (x[i] * k);
}

void unrotate(const float* signs, const double* y, double* x, uint32_t d) {
  for (uint32_t i = 0; i < d; ++i) x[i] = y[i];
  fwht(x, d);
  const double k = 1.0 / std::sqrt(static_cast<double>(d));
  for (uint32_t i = 0; i < d; ++i) x[i] = signs[i] * (x[i] * k);
}

}  // namespace tqkv::core
