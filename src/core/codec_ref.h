// Scalar reference codec: the oracle that every faster encoder and kernel is checked against.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/codebook.h"

namespace tqkv::core {

struct CodecParams {
  uint32_t type = 0;  // fmt::Type
  uint32_t d = 0;
  Codebook cb;                   // TQ types only
  const float* signs = nullptr;  // [d], rotated types (fmt::is_rotated)
  bool lsq = false;              // least-squares scale instead of the norm
  bool scale_f16 = false;        // scale stored as f16
};

// Vectors whose norm is below this are stored as the zero vector (scale 0).
constexpr double kMinNorm = 1e-30;

// Encodes d finite floats into one row (row_stride bytes; padding zeroed) and returns the scale
// exactly as stored (after f16 rounding when scale_f16). Dense types store the values and return 0.
// Throws TQKV_ERROR_NON_FINITE if a value cannot be represented (f16 overflow of a dense value or
// of the scale, or a rotated row that overflows f32: possible from values of ~FLT_MAX / d, never
// for a row whose norm is below FLT_MAX / sqrt(d)).
float encode_row(const CodecParams& p, const float* x, uint8_t* row);
// Why a row whose rotation overflows f32 is refused ("row ... " + this; CPU and CUDA encoders).
std::string rotation_overflow_message(uint32_t d);

// Unpacks the d indices of a TQ row.
void unpack_indices(const CodecParams& p, const uint8_t* row, uint32_t* idx);

// Decodes a row to the rotated domain (TQ: centroid[idx] * scale / sqrt(d); dense: the values).
void decode_row_rotated(const CodecParams& p, const uint8_t* row, float scale, double* y);
// Decodes a row to the original domain (TQ rows are un-rotated; dense rows are returned as is).
void decode_row(const CodecParams& p, const uint8_t* row, float scale, double* x);

// Value i of a llama.cpp Q8_0/Q4_0 row (block scale applied).
float block_value(const uint8_t* row, uint32_t type, uint32_t i);

// Scale storage helpers.
float load_scale(const void* scales, size_t i, bool f16);
void store_scale(void* scales, size_t i, float s, bool f16);

}  // namespace tqkv::core
