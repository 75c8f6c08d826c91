#include "core/codec_ref.h"

#include <cmath>
#include <cstring>
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
  rotate(p.signs, x, y.data(), d);
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
  const double k = double(scale) / std::sqrt(double(d));
  for (uint32_t i = 0; i < d; ++i) y[i] = double(p.cb.centroids[fmt::get_index(row, p.type, d, i)]) * k;
}

void decode_row(const CodecParams& p, const uint8_t* row, float scale, double* x) {
  if (!fmt::is_tq(p.type)) {
    decode_row_rotated(p, row, scale, x);
    return;
  }
  std::vector<double> y(p.d);
  decode_row_rotated(p, row, scale, y.data());
  unrotate(p.signs, y.data(), x, p.d);
}

}  // namespace tqkv::core
