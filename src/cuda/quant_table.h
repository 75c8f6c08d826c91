// Quantization tables for the GPU encoder: index = number of codebook boundaries below u, found
// with one table lookup and one comparison instead of a binary search. Host code (built once per
// codebook and head_dim, cached); encode.cu uploads them next to each append's other tables.
#pragma once
#include <cstdint>
#include <vector>

#include "core/codebook.h"

namespace tqkv::cuda {

constexpr uint32_t kLutMax = 3072;  // bytes of a table in shared memory (TQ8, d = 512: 3029)

// For the finest cell width 2^-e (e <= 7) that fits kLutMax, cell k covers u in
// [(k - 0.5) 2^-e, (k + 0.5) 2^-e] (closed: a tie may round either way) and stores how many
// boundaries lie below it. A table is built only when no cell holds two boundaries, so one
// comparison with the next boundary gives exactly core::quantize. |u| <= sqrt(d) (u is a
// coordinate of a vector of norm sqrt(d)), which bounds the cells.
struct Lut {
  uint32_t off = 0;
  float scale = 0;
  std::vector<uint8_t> cells;
};

// The table of cb at head_dim d (thread-safe, built on first use). Throws TQKV_ERROR_INTERNAL
// for a codebook that has none (every shipped one has).
const Lut& lut_for(const core::Codebook& cb, uint32_t d);

}  // namespace tqkv::cuda
