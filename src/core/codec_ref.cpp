#include "core/codec_ref.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/format.h"
#include "core/half.h"
#include "core/rotation.h"

namespace tqkv::core {

float load_scale(const void* scales, size_t i, bool f16) {
  return f16 ? f16_to_f32(static_cast<const uint16_t*>(scales)[i]) : static_cast<const float*>(scales)[i];
}

void store_scale(void* scales, size_t i, float s, bool f16) {
  if (f16)
    static_cast<uint16_t*>(scales)[i] = f32_to_f16(s);
  else
    static_cast<float*>(scales)[i] = s;
}

// llama.cpp's reference quantizers for its Q8_0 and Q4_0 blocks (rounding rules included), so the
// baselines carry exactly the error those caches have.
static void encode_blocks(uint32_t type, const float* x, uint32_t d, uint8_t* row) {
  const bool q8 = fmt::block_base(type) == fmt::Q8_0;
  for (uint32_t b = 0; b < d / fmt::kBlockElems; ++b) {
    const float* v = x + b * fmt::kBlockElems;
    uint8_t* blk = row + b * fmt::block_bytes(type);
    float amax = 0, signed_max = 0;
    for (uint32_t j = 0; j < fmt::kBlockElems; ++j)
      if (std::fabs(v[j]) > amax) {
        amax = std::fabs(v[j]);
        signed_max = v[j];
      }
    const float scale = q8 ? amax / 127.0f : signed_max / -8.0f;
    const float inv = scale != 0.0f ? 1.0f / scale : 0.0f;
    const uint16_t h = f32_to_f16(scale);
    if ((h & 0x7C00u) == 0x7C00u)
      fail(TQKV_ERROR_NON_FINITE, "block scale " + std::to_string(scale) + " overflows f16 (values up to about " +
                                      std::string(q8 ? "8.3e6" : "5.2e5") + " fit)");
    std::memcpy(blk, &h, 2);
    if (q8) {
      for (uint32_t j = 0; j < 32; ++j) blk[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::lround(v[j] * inv)));
    } else {
      for (uint32_t j = 0; j < 16; ++j) {
        const int lo = std::min(15, static_cast<int>(static_cast<int8_t>(v[j] * inv + 8.5f)));
        const int hi = std::min(15, static_cast<int>(static_cast<int8_t>(v[j + 16] * inv + 8.5f)));
        blk[2 + j] = static_cast<uint8_t>(lo | (hi << 4));
      }
    }
  }
}

float block_value(const uint8_t* row, uint32_t type, uint32_t i) {
  const uint8_t* blk = row + (i / fmt::kBlockElems) * fmt::block_bytes(type);
  uint16_t h;
  std::memcpy(&h, blk, 2);
  const float scale = f16_to_f32(h);
  const uint32_t j = i % fmt::kBlockElems;
  if (fmt::block_base(type) == fmt::Q8_0) return float(static_cast<int8_t>(blk[2 + j])) * scale;
  const uint8_t q = blk[2 + (j & 15)];
  return float(int((j < 16 ? q : q >> 4) & 15) - 8) * scale;
}

std::string rotation_overflow_message(uint32_t d) {
  // The bound rounded down to two digits, so that a norm below the printed value does fit.
  const double b = double(std::numeric_limits<float>::max()) / std::sqrt(double(d));
  const double unit = std::pow(10.0, std::floor(std::log10(b)) - 1);
  char bound[32];
  std::snprintf(bound, sizeof bound, "%.1e", std::floor(b / unit) * unit * (1 - 1e-12));
  return "overflows f32 in the rotation (its values, after any key centering, are too large; a row whose norm is "
         "below FLT_MAX / sqrt(head_dim), " + std::string(bound) + " here, always fits)";
}

float encode_row(const CodecParams& p, const float* x, uint8_t* row) {
  const uint32_t d = p.d;
  std::memset(row, 0, fmt::row_stride(p.type, d));
  if (p.type == fmt::F32) {
    std::memcpy(row, x, size_t(d) * 4);
    return 0;
  }
  if (p.type == fmt::F16) {
    uint16_t* h = reinterpret_cast<uint16_t*>(row);
    for (uint32_t i = 0; i < d; ++i) {
      h[i] = f32_to_f16(x[i]);
      if ((h[i] & 0x7C00u) == 0x7C00u)
        fail(TQKV_ERROR_NON_FINITE, "value " + std::to_string(x[i]) +
                                        " overflows the f16 cache (largest finite f16 is 65504)");
    }
    return 0;
  }
  // Rotate in float with the butterfly order of rotation.cpp, so that other encoders can match.
  std::vector<float> y(d);
  if (fmt::is_rotated(p.type)) {
    rotate(p.signs, x, y.data(), d);
    // Finite values from ~FLT_MAX / d can overflow the float butterflies (inf, or inf - inf
    // = NaN). Such a row cannot be stored as given; saying so beats storing a zero row.
    for (uint32_t i = 0; i < d; ++i)
      if (!std::isfinite(y[i])) fail(TQKV_ERROR_NON_FINITE, "row " + rotation_overflow_message(d));
  }
  if (fmt::is_block(p.type)) {
    encode_blocks(p.type, fmt::is_rotated(p.type) ? y.data() : x, d, row);
    return 0;
  }
  double n2 = 0;
  for (uint32_t i = 0; i < d; ++i) n2 += double(y[i]) * double(y[i]);
  const double norm = std::sqrt(n2);
  if (!(norm >= kMinNorm)) {
    const uint32_t zero_idx = quantize(p.cb, 0.0f);
    for (uint32_t i = 0; i < d; ++i) fmt::put_index(row, p.type, d, i, zero_idx);
    return 0;
  }
  const float inv = static_cast<float>(std::sqrt(double(d)) / norm);
  double yc = 0, cc = 0;
  for (uint32_t i = 0; i < d; ++i) {
    const uint32_t idx = quantize(p.cb, y[i] * inv);
    fmt::put_index(row, p.type, d, i, idx);
    const double c = p.cb.centroids[idx];
    yc += double(y[i]) * c;
    cc += c * c;
  }
  // LSQ: the s minimising sum_i (y_i - c_i s / sqrt(d))^2 is sqrt(d) <y,c> / <c,c>.
  double s = p.lsq ? std::sqrt(double(d)) * yc / cc : norm;
  const float sf = static_cast<float>(s);
  if (!std::isfinite(sf))
    fail(TQKV_ERROR_NON_FINITE, "row scale " + std::to_string(s) + " is not representable as f32");
  if (p.scale_f16) {
    const uint16_t h = f32_to_f16(sf);
    if ((h & 0x7C00u) == 0x7C00u)
      fail(TQKV_ERROR_NON_FINITE, "row scale " + std::to_string(s) +
                                      " overflows the f16 scale type (largest 65504); use f32 scales");
    return f16_to_f32(h);
  }
  return sf;
}

void unpack_indices(const CodecParams& p, const uint8_t* row, uint32_t* idx) {
  for (uint32_t i = 0; i < p.d; ++i) idx[i] = fmt::get_index(row, p.type, p.d, i);
}

void decode_row_rotated(const CodecParams& p, const uint8_t* row, float scale, double* y) {
  const uint32_t d = p.d;
  if (p.type == fmt::F32) {
    const float* v = reinterpret_cast<const float*>(row);
    for (uint32_t i = 0; i < d; ++i) y[i] = v[i];
    return;
  }
  if (p.type == fmt::F16) {
    const uint16_t* v = reinterpret_cast<const uint16_t*>(row);
    for (uint32_t i = 0; i < d; ++i) y[i] = f16_to_f32(v[i]);
    return;
  }
  if (fmt::is_block(p.type)) {
    for (uint32_t i = 0; i < d; ++i) y[i] = block_value(row, p.type, i);
    return;
  }
  const double k = double(scale) / std::sqrt(double(d));
  for (uint32_t i = 0; i < d; ++i) y[i] = double(p.cb.centroids[fmt::get_index(row, p.type, d, i)]) * k;
}

void decode_row(const CodecParams& p, const uint8_t* row, float scale, double* x) {
  if (!fmt::is_rotated(p.type)) {
    decode_row_rotated(p, row, scale, x);
    return;
  }
  std::vector<double> y(p.d);
  decode_row_rotated(p, row, scale, y.data());
  unrotate(p.signs, y.data(), x, p.d);
}

}  // namespace tqkv::core
