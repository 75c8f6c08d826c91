// Portable fused loop: the specification that the SIMD kernels must match to float rounding.
#include <cmath>
#include <limits>
#include <vector>

#include "core/codec_ref.h"
#include "core/format.h"
#include "core/half.h"
#include "cpu/kernel.h"

namespace tqkv::cpu {
namespace {

float row_scale(const RowSpan& s, uint32_t j) {
  if (!fmt::is_tq(s.type)) return 1.0f;
  return s.scale_f16 ? f16_to_f32(static_cast<const uint16_t*>(s.scales)[j])
                     : static_cast<const float*>(s.scales)[j];
}

// Row j of the span, decoded without its scale, written in the type's kernel order.
void decode_kernel_order(const RowSpan& s, uint32_t j, uint32_t d, float* out) {
  const uint8_t* row = s.rows + size_t(j) * s.stride;
  if (s.type == fmt::F32) {
    const float* v = reinterpret_cast<const float*>(row);
    for (uint32_t i = 0; i < d; ++i) out[i] = v[i];
  } else if (s.type == fmt::F16) {
    const uint16_t* v = reinterpret_cast<const uint16_t*>(row);
    for (uint32_t i = 0; i < d; ++i) out[i] = f16_to_f32(v[i]);
  } else if (fmt::is_block(s.type)) {
    for (uint32_t i = 0; i < d; ++i) out[i] = core::block_value(row, s.type, i);
  } else {
    for (uint32_t i = 0; i < d; ++i)
      out[fmt::kernel_position(s.type, i)] = s.centroids[fmt::get_index(row, s.type, d, i)];
  }
}

}  // namespace

void process_range_generic(const RangeTask& t) {
  const uint32_t d = t.d, g = t.g;
  std::vector<float> krow(d), vrow(d);
  for (uint32_t j = 0; j < t.n; ++j) {
    decode_kernel_order(t.k, j, d, krow.data());
    decode_kernel_order(t.v, j, d, vrow.data());
    const float ks = row_scale(t.k, j), vs = row_scale(t.v, j);
    for (uint32_t h = 0; h < g; ++h) {
      const float* q = t.q + size_t(h) * d;
      float dot = 0;
      for (uint32_t i = 0; i < d; ++i) dot += q[i] * krow[i];
      float s = dot * ks + (t.bias ? t.bias[h] : 0.0f);
      if (t.softcap > 0) s = t.softcap * std::tanh(s / t.softcap);
      const float m_old = t.m[h];
      const float m_new = std::max(m_old, s);
      const float alpha = m_old == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(m_old - m_new);
      const float p = std::exp(s - m_new);
      float* acc = t.acc + size_t(h) * d;
      const float w = p * vs;
      for (uint32_t i = 0; i < d; ++i) acc[i] = acc[i] * alpha + w * vrow[i];
      t.l[h] = t.l[h] * alpha + p;
      t.m[h] = m_new;
    }
  }
}

}  // namespace tqkv::cpu
