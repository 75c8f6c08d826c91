#include "core/attention_ref.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace tqkv::core {

void attend_reference(const Cache& c, const AttnPlan& plan, const float* q, float* out, float* lse) {
  const uint32_t d = c.head_dim(), hkv = c.num_kv_heads(), hq = plan.num_q_heads, g = plan.group;
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> keys, vals, logits;
  for (size_t qi = 0; qi < plan.queries.size(); ++qi) {
    const uint32_t s = plan.queries[qi].seq;
    const VisibleRange r = plan.queries[qi].range;
    const int64_t n = r.size();
    for (uint32_t kvh = 0; kvh < hkv; ++kvh) {
      keys.assign(size_t(n) * d, 0);
      vals.assign(size_t(n) * d, 0);
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t slot = c.slot_of(r.lo + j);
        for (int w = 0; w < 2; ++w) {
          const Plane& p = c.plane(w);
          const void* sp = c.scale_ptr(w, s, kvh, slot);
          const float sc = sp ? load_scale(sp, 0, p.scale_f16) : 0.0f;
          double* dst = (w == 0 ? keys : vals).data() + size_t(j) * d;
          decode_row(p.codec, c.row(w, s, kvh, slot), sc, dst);
          const float* mu = w == 0 ? c.k_center(s) : nullptr;
          if (mu)
            for (uint32_t i = 0; i < d; ++i) dst[i] += mu[size_t(kvh) * d + i];
        }
      }
      for (uint32_t hh = 0; hh < g; ++hh) {
        const uint32_t h = kvh * g + hh;
        const float* qh = q + (qi * hq + h) * d;
        logits.assign(size_t(n), 0);
        double m = plan.sinks ? double(plan.sinks[h]) : -inf;
        for (int64_t j = 0; j < n; ++j) {
          double dot = 0;
          for (uint32_t i = 0; i < d; ++i) dot += double(qh[i]) * keys[size_t(j) * d + i];
          double x = double(plan.scale) * dot;
          if (plan.softcap > 0) x = double(plan.softcap) * std::tanh(x / double(plan.softcap));
          logits[size_t(j)] = x;
          m = std::max(m, x);
        }
        double sum = plan.sinks ? std::exp(double(plan.sinks[h]) - m) : 0.0;
        std::vector<double> o(d, 0.0);
        for (int64_t j = 0; j < n; ++j) {
          const double p = std::exp(logits[size_t(j)] - m);
          sum += p;
          for (uint32_t i = 0; i < d; ++i) o[i] += p * vals[size_t(j) * d + i];
        }
        float* oh = out + (qi * hq + h) * d;
        for (uint32_t i = 0; i < d; ++i) oh[i] = sum > 0 && n > 0 ? static_cast<float>(o[i] / sum) : 0.0f;
        if (lse) lse[qi * hq + h] = sum > 0 ? static_cast<float>(m + std::log(sum)) : -std::numeric_limits<float>::infinity();
      }
    }
  }
}

}  // namespace tqkv::core
