#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/format.h"
#include "core/rotation.h"
#include "cpu/kernel.h"

namespace tqkv::cpu {
namespace {

constexpr uint32_t kMaxGroup = 16;  // query rows one RangeTask carries (kernel.h)
constexpr int64_t kMinChunk = 256;  // below this a work item costs more to merge than it saves
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A block: consecutive queries of one sequence that share every K/V row they load.
struct Block {
  uint32_t first, count;  // query indices
  int64_t lo, hi;         // union of their visible ranges
};

// A work item: one block, one KV head, one chunk of positions; it owns a partial softmax state.
struct Item {
  uint32_t block, kv_head;
  int64_t lo, hi;
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

bool simd_handles(uint32_t type) { return fmt::is_tq(type) || fmt::is_dense(type); }

using RangeFn = void (*)(const RangeTask&);

struct Driver {
  const core::Cache& c;
  const core::AttnPlan& plan;
  RangeFn range_fn;
  uint32_t d, hkv, hq, g, nq, qb;  // qb: queries per block
  uint32_t ktype, vtype;
  std::vector<float> qprep;  // [kv_head][query][g][d], K's kernel order, pre-scaled
  std::vector<float> bias;   // [kv_head][query][g]: scale * q . mu (key centering), empty if none
  std::vector<Block> blocks;
  std::vector<Item> items;
  std::vector<std::vector<uint32_t>> items_of;  // [block * hkv + kv_head]
  size_t state_rows;                            // qb * g rows of state per item
  std::vector<float> acc, ms, ls;

  Driver(const core::Cache& cache, const core::AttnPlan& p, RangeFn fn)
      : c(cache), plan(p), range_fn(fn), d(cache.head_dim()), hkv(cache.num_kv_heads()), hq(p.num_q_heads),
        g(p.group), nq(uint32_t(p.queries.size())), qb(std::max(1u, kMaxGroup / p.group)),
        ktype(cache.plane(0).type), vtype(cache.plane(1).type), state_rows(size_t(qb) * g) {}

  void prepare_queries(const float* q) {
    const bool rot = fmt::is_rotated(ktype);
    const float qscale = plan.scale * (fmt::is_tq(ktype) ? static_cast<float>(1.0 / std::sqrt(double(d))) : 1.0f);
    qprep.assign(size_t(hkv) * nq * g * d, 0.0f);
    std::vector<float> tmp(d);
    for (uint32_t i = 0; i < nq; ++i)
      for (uint32_t h = 0; h < hq; ++h) {
        const float* src = q + (size_t(i) * hq + h) * d;
        if (rot) core::rotate(c.signs(), src, tmp.data(), d);
        else std::copy(src, src + d, tmp.begin());
        float* dst = qprep.data() + ((size_t(h / g) * nq + i) * g + h % g) * d;
        for (uint32_t x = 0; x < d; ++x) dst[fmt::kernel_position(ktype, x)] = tmp[x] * qscale;
      }
  }

  // Key centering stores k - mu; every score of a (query, head) then lacks the constant
  // scale * q . mu, computed here once in double.
  void prepare_bias(const float* q) {
    bool any = false;
    for (const auto& qp : plan.queries) any = any || c.k_center(qp.seq) != nullptr;
    if (!any) return;
    bias.assign(size_t(hkv) * nq * g, 0.0f);
    for (uint32_t i = 0; i < nq; ++i) {
      const float* mu = c.k_center(plan.queries[i].seq);
      if (!mu) continue;
      for (uint32_t h = 0; h < hq; ++h) {
        const float* qh = q + (size_t(i) * hq + h) * d;
        const float* m = mu + size_t(h / g) * d;
        double dot = 0;
        for (uint32_t x = 0; x < d; ++x) dot += double(qh[x]) * m[x];
        bias[(size_t(h / g) * nq + i) * g + h % g] = static_cast<float>(double(plan.scale) * dot);
      }
    }
  }

  void make_items() {
    for (uint32_t i = 0; i < nq;) {
      Block b{i, 0, plan.queries[i].range.lo, plan.queries[i].range.hi};
      while (i < nq && b.count < qb && plan.queries[i].seq == plan.queries[b.first].seq) {
        b.lo = std::min(b.lo, plan.queries[i].range.lo);
        b.hi = std::max(b.hi, plan.queries[i].range.hi);
        ++b.count;
        ++i;
      }
      blocks.push_back(b);
    }
    int64_t total = 0;
    for (const auto& b : blocks) total += std::max<int64_t>(0, b.hi - b.lo) * hkv;
    const int64_t chunk = chunk_positions(total, plan.num_threads);
    items_of.resize(blocks.size() * hkv);
    for (uint32_t bi = 0; bi < blocks.size(); ++bi)
      for (uint32_t kvh = 0; kvh < hkv; ++kvh)
        for (int64_t lo = blocks[bi].lo; lo < blocks[bi].hi; lo += chunk) {
          items_of[size_t(bi) * hkv + kvh].push_back(uint32_t(items.size()));
          items.push_back({bi, kvh, lo, std::min(blocks[bi].hi, lo + chunk)});
        }
    acc.assign(items.size() * state_rows * d, 0.0f);
    ms.assign(items.size() * state_rows, kNegInf);
    ls.assign(items.size() * state_rows, 0.0f);
  }

  // Feeds positions [lo, hi) to the state rows of queries [a, b) of the item's block.
  void feed(size_t it, const Block& blk, uint32_t kvh, uint32_t a, uint32_t b, int64_t lo, int64_t hi) {
    const uint32_t seq = plan.queries[blk.first].seq;
    core::SlotRun runs[2];
    const int nruns = core::slot_runs(c, lo, hi, runs);
    const uint32_t rows = (b - a) * g;
    for (int ri = 0; ri < nruns; ++ri) {
      for (uint32_t r0 = 0; r0 < rows; r0 += kMaxGroup) {
        RangeTask t;
        t.d = d;
        t.g = std::min(kMaxGroup, rows - r0);
        t.k = span(c, 0, seq, kvh, runs[ri].slot);
        t.v = span(c, 1, seq, kvh, runs[ri].slot);
        t.n = runs[ri].n;
        t.q = qprep.data() + ((size_t(kvh) * nq + blk.first + a) * g + r0) * d;
        t.softcap = plan.softcap;
        if (!bias.empty() && plan.softcap > 0) t.bias = bias.data() + (size_t(kvh) * nq + blk.first + a) * g + r0;
        const size_t row0 = it * state_rows + size_t(a) * g + r0;
        t.acc = acc.data() + row0 * d;
        t.m = ms.data() + row0;
        t.l = ls.data() + row0;
        range_fn(t);
      }
    }
  }

  // Within the item's chunk, the queries seeing a position form a contiguous range [a, b)
  // because their ranges are non-decreasing at both ends; walk the breakpoints.
  void run_item(size_t it) {
    const Item& item = items[it];
    const Block& blk = blocks[item.block];
    std::vector<int64_t> cuts{item.lo, item.hi};
    for (uint32_t i = 0; i < blk.count; ++i)
      for (int64_t x : {plan.queries[blk.first + i].range.lo, plan.queries[blk.first + i].range.hi})
        if (x > item.lo && x < item.hi) cuts.push_back(x);
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    for (size_t k = 0; k + 1 < cuts.size(); ++k) {
      const int64_t lo = cuts[k], hi = cuts[k + 1];
      uint32_t a = 0, b = 0;
      bool found = false;
      for (uint32_t i = 0; i < blk.count; ++i) {
        const auto& r = plan.queries[blk.first + i].range;
        if (r.lo <= lo && hi <= r.hi) {
          if (!found) a = i;
          found = true;
          b = i + 1;
        }
      }
      if (found) feed(it, blk, item.kv_head, a, b, lo, hi);
    }
  }

  void merge(float* out, float* lse) const {
    const bool vq = fmt::is_tq(vtype), vrot = fmt::is_rotated(vtype);
    const double inv_sqrt_d = 1.0 / std::sqrt(double(d));
    std::vector<double> o(d);
    std::vector<float> on(d);
    for (uint32_t bi = 0; bi < blocks.size(); ++bi) {
      const Block& blk = blocks[bi];
      for (uint32_t i = 0; i < blk.count; ++i) {
        const uint32_t qi = blk.first + i;
        for (uint32_t h = 0; h < hq; ++h) {
          const uint32_t kvh = h / g;
          const size_t row = size_t(i) * g + h % g;
          const auto& mine = items_of[size_t(bi) * hkv + kvh];
          // Without a softcap the centering offset is a constant shift of every score: add it
          // to the running maxima here (exact); with a softcap the kernel already added it.
          const double shift =
              !bias.empty() && plan.softcap == 0 ? double(bias[(size_t(kvh) * nq + qi) * g + h % g]) : 0.0;
          auto mval = [&](uint32_t it) { return double(ms[it * state_rows + row]) + shift; };
          double m = -std::numeric_limits<double>::infinity();
          for (uint32_t it : mine)
            if (ls[it * state_rows + row] > 0) m = std::max(m, mval(it));
          const double sink = plan.sinks ? double(plan.sinks[h]) : -std::numeric_limits<double>::infinity();
          const double mt = std::max(m, sink);
          double l = plan.sinks ? std::exp(sink - mt) : 0.0;
          std::fill(o.begin(), o.end(), 0.0);
          bool any = false;
          for (uint32_t it : mine) {
            const float li = ls[it * state_rows + row];
            if (!(li > 0)) continue;
            any = true;
            const double w = std::exp(mval(it) - mt);
            l += w * li;
            const float* a = acc.data() + (it * state_rows + row) * d;
            for (uint32_t x = 0; x < d; ++x) o[x] += w * a[x];
          }
          float* dst = out + (size_t(qi) * hq + h) * d;
          if (lse)
            lse[size_t(qi) * hq + h] = l > 0 ? static_cast<float>(mt + std::log(l)) : -std::numeric_limits<float>::infinity();
          if (!any) {
            std::fill(dst, dst + d, 0.0f);
            continue;
          }
          const double norm = (vq ? inv_sqrt_d : 1.0) / l;
          for (uint32_t x = 0; x < d; ++x) on[x] = static_cast<float>(o[fmt::kernel_position(vtype, x)] * norm);
          if (vrot) core::unrotate(c.signs(), on.data(), dst, d);
          else std::copy(on.begin(), on.end(), dst);
        }
      }
    }
  }

  void count() const {
    int64_t visible = 0;
    for (const auto& q : plan.queries) visible += q.range.size() * hkv;
    auto& ctr = core::counters();
    for (uint32_t t : {ktype, vtype}) {
      auto& counter = fmt::is_tq(t) ? ctr.compressed_rows_read : fmt::is_block(t) ? ctr.block_rows_read : ctr.dense_rows_read;
      counter += uint64_t(visible);
    }
    ctr.attend_calls += 1;
  }
};

void attend_impl(const core::Cache& c, const core::AttnPlan& plan, const float* q, float* out, float* lse, RangeFn fn) {
  if (!simd_handles(c.plane(0).type) || !simd_handles(c.plane(1).type)) fn = &process_range_generic;
  Driver dr(c, plan, fn);
  dr.prepare_queries(q);
  dr.prepare_bias(q);
  if (!dr.bias.empty() && plan.softcap > 0) dr.range_fn = &process_range_generic;
  dr.make_items();
  const long long n_items = static_cast<long long>(dr.items.size());
  const int threads = static_cast<int>(std::max<long long>(1, std::min<long long>(plan.num_threads, n_items)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (long long it = 0; it < n_items; ++it) dr.run_item(size_t(it));
  dr.merge(out, lse);
  dr.count();
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
