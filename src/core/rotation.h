// Randomized Hadamard rotation: y = H_d (s .* x) / sqrt(d), H_d the natural-order
// (Sylvester) Walsh-Hadamard matrix, s a +-1 vector from a seeded SplitMix64 stream.
#pragma once
#include <cstdint>
#include <vector>

namespace tqkv::core {

// SplitMix64, the sign generator (docs/format.md).
inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Signs for coordinates 0..d-1: word w = the (i/64)-th output of splitmix64 seeded with seed;
// s_i = -1 if bit (i % 64) of w is set, else +1.
std::vector<float> rotation_signs(uint64_t seed, uint32_t d);

// In-place unnormalized fast Walsh-Hadamard transform, butterflies with stride 1, 2, ..., d/2.
void fwht(float* x, uint32_t d);
void fwht(double* x, uint32_t d);

// y = H (s .* x) / sqrt(d)
void rotate(const float* signs, const float* x, float* y, uint32_t d);
void rotate(const float* signs, const double* x, double* y, uint32_t d);
// x = s .* (H y) / sqrt(d)
void unrotate(const float* signs, const float* y, float* x, uint32_t d);
void unrotate(const float* signs, const double* y, double* x, uint32_t d);

}  // namespace tqkv::core
