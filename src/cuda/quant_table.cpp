#include "cuda/quant_table.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "core/error.h"

namespace tqkv::cuda {

const Lut& lut_for(const core::Codebook& cb, uint32_t d) {
  static std::mutex mu;
  static std::map<std::pair<const float*, uint32_t>, Lut> cache;
  std::lock_guard<std::mutex> lock(mu);
  Lut& lut = cache[{cb.boundaries, d}];
  if (!lut.cells.empty()) return lut;
  const std::vector<double> b(cb.boundaries, cb.boundaries + cb.levels - 1);
  const double reach = std::sqrt(double(d)) * 1.001 + 1.0;
  for (int e = 0; e <= 7; ++e) {
    const double s = std::ldexp(1.0, e);
    const auto half = static_cast<uint32_t>(std::ceil(reach * s));
    if (2 * size_t(half) + 1 > kLutMax) break;
    std::vector<uint8_t> cells(2 * size_t(half) + 1);
    bool ok = true;
    for (int64_t k = -int64_t(half); k <= int64_t(half) && ok; ++k) {
      const double lo_edge = (double(k) - 0.5) / s, hi_edge = (double(k) + 0.5) / s;
      const auto below = std::lower_bound(b.begin(), b.end(), lo_edge) - b.begin();  // b < lo_edge
      const auto upto = std::upper_bound(b.begin(), b.end(), hi_edge) - b.begin();   // b <= hi_edge
      ok = upto - below <= 1;
      cells[size_t(k + int64_t(half))] = static_cast<uint8_t>(below);
    }
    if (!ok) continue;
    lut.off = half;
    lut.scale = static_cast<float>(s);
    lut.cells = std::move(cells);
    return lut;
  }
  // Every shipped codebook has one (at most e = 6); a new one that has none must say so.
  fail(TQKV_ERROR_INTERNAL, "cuda encode: no quantization table fits the " + std::to_string(cb.bits) +
                                "-bit codebook at head_dim " + std::to_string(d));
}

}  // namespace tqkv::cuda
