#include "cpu/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/format.h"
#include "core/rotation.h"
#include "cpu/kernel.h"

namespace tqkv::cpu {
namespace {

constexpr uint32_t kMaxGroup = 16;      // query heads one RangeTask carries (kernel.h)
constexpr int64_t kMinChunk = 256;      // below this a work item costs more to merge than it saves

struct Item {
  uint32_t seq, kv_head;
  int64_t lo, hi;  // logical positions
};

RowSpan span(const core::Cache& c, int which, uint32_t seq, uint32_t kvh, uint32_t slot) {
  const core::Plane& p = c.plane(which);
  RowSpan s;
  s.type = p.type;
  s.rows = c.row(which, seq, kvh, slot);
  s.stride = p.stride;
  s.scales = c.scale_ptr(which, seq, kvh, slot);
  s.scale_f16 = p.scale_f16;
  s.centroids = fmt::is_tq(p.type) ? p.codec.cb.centroids : nullptr;
  return s;
}

using RangeFn = void (*)(const RangeTask&);

void attend_impl(const core::Cache& c, const core::AttnPlan& plan, const float* q, float* out, float* lse,
                 RangeFn range_fn) {
  const uint32_t d = c.head_dim(), hkv = c.num_kv_heads(), hq = plan.num_q_heads, g = plan.group;
  const uint32_t nseq = c.num_seqs();
  const uint32_t ktype = c.plane(0).type, vtype = c.plane(1).type;
  const bool kq = fmt::is_tq(ktype), vq = fmt::is_tq(vtype);
  const float inv_sqrt_d = static_cast<float>(1.0 / std::sqrt(double(d)));

  // Queries: rotated once (TQ K), pre-scaled, permuted into K's kernel order.
  std::vector<float> qprep(size_t(nseq) * hq * d), tmp(d);
  const float qscale = plan.scale * (kq ? inv_sqrt_d : 1.0f);
  for (size_t r = 0; r < size_t(nseq) * hq; ++r) {
    const float* src = q + r * d;
    if (kq) core::rotate(c.signs(), src, tmp.data(), d);
    else std::copy(src, src + d, tmp.begin());
    float* dst = qprep.data() + r * d;
    for (uint32_t i = 0; i < d; ++i) dst[fmt::kernel_position(ktype, i)] = tmp[i] * qscale;
  }

  // Work items: each sequence's visible range cut into chunks sized from the total work.
  int64_t total = 0;
  for (const auto& r : plan.ranges) total += r.size() * hkv;
  const int64_t chunk = chunk_positions(total, plan.num_threads);
  std::vector<Item> items;
  std::vector<std::vector<uint32_t>> items_of(size_t(nseq) * hkv);
  for (uint32_t s = 0; s < nseq; ++s) {
    const auto r = plan.ranges[s];
    for (uint32_t kvh = 0; kvh < hkv; ++kvh)
      for (int64_t lo = r.lo; lo < r.hi; lo += chunk) {
        items_of[size_t(s) * hkv + kvh].push_back(static_cast<uint32_t>(items.size()));
        items.push_back({s, kvh, lo, std::min(r.hi, lo + chunk)});
      }
  }

  const size_t state = size_t(g) * d;
  std::vector<float> acc(items.size() * state, 0.0f), ms(items.size() * g, -std::numeric_limits<float>::infinity()),
      ls(items.size() * g, 0.0f);
  const long long n_items = static_cast<long long>(items.size());
  const int threads = static_cast<int>(std::min<int64_t>(plan.num_threads, std::max<long long>(n_items, 1)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (long long it = 0; it < n_items; ++it) {
    const Item& item = items[size_t(it)];
    core::SlotRun runs[2];
    const int nruns = core::slot_runs(c, item.lo, item.hi, runs);
    for (int ri = 0; ri < nruns; ++ri) {
      for (uint32_t h0 = 0; h0 < g; h0 += kMaxGroup) {
        RangeTask t;
        t.d = d;
        t.g = std::min(kMaxGroup, g - h0);
        t.k = span(c, 0, item.seq, item.kv_head, runs[ri].slot);
        t.v = span(c, 1, item.seq, item.kv_head, runs[ri].slot);
        t.n = runs[ri].n;
        t.q = qprep.data() + (size_t(item.seq) * hq + size_t(item.kv_head) * g + h0) * d;
        t.softcap = plan.softcap;
        t.acc = acc.data() + size_t(it) * state + size_t(h0) * d;
        t.m = ms.data() + size_t(it) * g + h0;
        t.l = ls.data() + size_t(it) * g + h0;
        range_fn(t);
      }
    }
  }

  // Merge the partial states of each (sequence, query head) by log-sum-exp, then normalize,
  // un-permute and un-rotate once per head.
  std::vector<double> o(d);
  std::vector<float> ok(d), on(d);
  for (uint32_t s = 0; s < nseq; ++s) {
    for (uint32_t h = 0; h < hq; ++h) {
      const uint32_t kvh = h / g, hh = h % g;
      const auto& mine = items_of[size_t(s) * hkv + kvh];
      double m = -std::numeric_limits<double>::infinity();
      for (uint32_t it : mine)
        if (ls[size_t(it) * g + hh] > 0) m = std::max(m, double(ms[size_t(it) * g + hh]));
      const double sink = plan.sinks ? double(plan.sinks[h]) : -std::numeric_limits<double>::infinity();
      const double mt = std::max(m, sink);
      double l = plan.sinks ? std::exp(sink - mt) : 0.0;
      std::fill(o.begin(), o.end(), 0.0);
      for (uint32_t it : mine) {
        const float li = ls[size_t(it) * g + hh];
        if (!(li > 0)) continue;
        const double w = std::exp(double(ms[size_t(it) * g + hh]) - mt);
        l += w * li;
        const float* a = acc.data() + size_t(it) * state + size_t(hh) * d;
        for (uint32_t i = 0; i < d; ++i) o[i] += w * a[i];
      }
      float* dst = out + (size_t(s) * hq + h) * d;
      if (lse) lse[size_t(s) * hq + h] = l > 0 ? static_cast<float>(mt + std::log(l)) : -std::numeric_limits<float>::infinity();
      if (!(l > 0) || mine.empty()) {
        std::fill(dst, dst + d, 0.0f);
        continue;
      }
      const double norm = (vq ? double(inv_sqrt_d) : 1.0) / l;
      for (uint32_t i = 0; i < d; ++i) on[i] = static_cast<float>(o[fmt::kernel_position(vtype, i)] * norm);
      if (vq) core::unrotate(c.signs(), on.data(), dst, d);
      else std::copy(on.begin(), on.end(), dst);
    }
  }

  int64_t visible = 0;
  for (const auto& r : plan.ranges) visible += r.size() * hkv;
  auto& ctr = core::counters();
  ctr.compressed_rows_read += uint64_t(visible) * ((kq ? 1 : 0) + (vq ? 1 : 0));
  ctr.dense_rows_read += uint64_t(visible) * ((kq ? 0 : 1) + (vq ? 0 : 1));
  ctr.attend_calls += 1;
}

}  // namespace

int64_t chunk_positions(int64_t total_rows, uint32_t threads) {
  // About four items per thread balances unequal sequence lengths under dynamic scheduling.
  const int64_t want = (total_rows + int64_t(threads) * 4 - 1) / (int64_t(threads) * 4);
  return std::max(kMinChunk, want);
}

void attend(const core::Cache& c, const core::AttnPlan& plan, const float* q, float* out, float* lse) {
  attend_impl(c, plan, q, out, lse, &process_range);
}

void attend_generic(const core::Cache& c, const core::AttnPlan& plan, const float* q, float* out, float* lse) {
  attend_impl(c, plan, q, out, lse, &process_range_generic);
}

}  // namespace tqkv::cpu
