#include "core/attn_plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <thread>

#include "core/error.h"

namespace tqkv::core {
namespace {

std::string num(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

}  // namespace

void check_num_q_heads(uint32_t num_q_heads, uint32_t hkv) {
  if (num_q_heads == 0 || num_q_heads % hkv != 0 || num_q_heads > kMaxQHeads)
    invalid("num_q_heads: " + std::to_string(num_q_heads) + " is invalid; must be a positive multiple of num_kv_heads (" +
            std::to_string(hkv) + "), at most " + std::to_string(kMaxQHeads));
}

namespace {

AttnPlan plan_common(const Cache& c, const tqkv_attn_params* p, const float* q, const float* out) {
  if (p == nullptr) invalid("params: NULL; must point to a tqkv_attn_params");
  if (q == nullptr) invalid("q: NULL; must point to the queries");
  if (out == nullptr) invalid("out: NULL; must point to room for the outputs");
  const uint32_t hkv = c.num_kv_heads();
  check_num_q_heads(p->num_q_heads, hkv);
  if (!std::isfinite(p->scale) || p->scale == 0.0f)
    invalid("scale: " + num(p->scale) + " is invalid; must be finite and non-zero");
  if (!std::isfinite(p->softcap) || p->softcap < 0.0f)
    invalid("softcap: " + num(p->softcap) + " is invalid; allowed: 0 (off) or a finite value > 0");
  if (p->mask != TQKV_MASK_NONE && p->mask != TQKV_MASK_CAUSAL && p->mask != TQKV_MASK_WINDOW)
    invalid("mask: " + std::to_string(int(p->mask)) + " is invalid; allowed: 0 (none), 1 (causal), 2 (window)");
  if (p->mask == TQKV_MASK_WINDOW) {
    if (p->window == 0) invalid("window: 0 is invalid with TQKV_MASK_WINDOW; must be >= 1");
    if (c.ring() && p->window > c.capacity())
      invalid("window: " + std::to_string(p->window) + " is larger than the ring capacity " +
              std::to_string(c.capacity()) + "; a ring cache holds only the last capacity positions");
  }
  if (p->sinks)
    for (uint32_t h = 0; h < p->num_q_heads; ++h)
      if (!std::isfinite(p->sinks[h]))
        fail(TQKV_ERROR_NON_FINITE, "sinks[" + std::to_string(h) + "]: " + num(p->sinks[h]) + " is not finite");
  AttnPlan plan;
  plan.num_q_heads = p->num_q_heads;
  plan.group = p->num_q_heads / hkv;
  plan.scale = p->scale;
  plan.softcap = p->softcap;
  plan.sinks = p->sinks;
  plan.num_threads = p->num_threads ? p->num_threads : std::max(1u, std::thread::hardware_concurrency());
  return plan;
}

// The visible logical range of a query at position qp (len - 1 for "the next token") of seq.
VisibleRange visible(const Cache& c, const tqkv_attn_params* p, uint32_t seq, int64_t qp, const std::string& who) {
  const int64_t len = c.length(seq);
  VisibleRange r;
  switch (p->mask) {
    case TQKV_MASK_NONE: r = {0, len}; break;
    case TQKV_MASK_CAUSAL: r = {0, qp + 1}; break;
    case TQKV_MASK_WINDOW: r = {std::max<int64_t>(0, qp - int64_t(p->window) + 1), qp + 1}; break;
    default: break;  // rejected in plan_common
  }
  const int64_t resident = c.first_resident(seq);
  if (r.size() > 0 && r.lo < resident)
    invalid("mask: " + who + " of sequence " + std::to_string(seq) + " needs positions from " + std::to_string(r.lo) +
            " but the ring cache holds only " + std::to_string(resident) + " .. " + std::to_string(len - 1) +
            "; use TQKV_MASK_WINDOW with window <= capacity (" + std::to_string(c.capacity()) + ")");
  return r;
}

void check_finite_q(const float* q, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(q[i])) fail(TQKV_ERROR_NON_FINITE, "q: non-finite value at index " + std::to_string(i));
}

}  // namespace

AttnPlan plan_attention(const Cache& c, const tqkv_attn_params* p, const float* q, const float* out, bool q_on_host) {
  AttnPlan plan = plan_common(c, p, q, out);
  plan.queries.resize(c.num_seqs());
  for (uint32_t s = 0; s < c.num_seqs(); ++s) {
    const int64_t len = c.length(s);
    int64_t qp = len - 1;
    if (p->q_pos) {
      qp = p->q_pos[s];
      if (qp < 0 || qp >= len)
        invalid("q_pos[" + std::to_string(s) + "]: " + std::to_string(qp) + " is out of range; sequence " +
                std::to_string(s) + " holds positions 0 .. " + std::to_string(len - 1));
    }
    plan.queries[s] = {s, visible(c, p, s, qp, "the query")};
  }
  if (q_on_host) check_finite_q(q, size_t(c.num_seqs()) * p->num_q_heads * c.head_dim());
  return plan;
}

AttnPlan plan_attention_seq(const Cache& c, uint32_t seq, uint32_t n_q, const int64_t* q_pos,
                            const tqkv_attn_params* p, const float* q, const float* out) {
  AttnPlan plan = plan_common(c, p, q, out);
  if (p->q_pos != nullptr) invalid("params.q_pos: must be NULL for tqkv_attend_seq; pass the positions as q_pos");
  if (seq >= c.num_seqs())
    invalid("seq: " + std::to_string(seq) + " is out of range; allowed: 0 .. " + std::to_string(c.num_seqs() - 1));
  if (n_q > 0 && q_pos == nullptr) invalid("q_pos: NULL; must point to n_q query positions");
  const int64_t len = c.length(seq);
  plan.queries.resize(n_q);
  for (uint32_t i = 0; i < n_q; ++i) {
    const int64_t qp = q_pos[i];
    if (qp < 0 || qp >= len)
      invalid("q_pos[" + std::to_string(i) + "]: " + std::to_string(qp) + " is out of range; sequence " +
              std::to_string(seq) + " holds positions 0 .. " + std::to_string(len - 1));
    if (i > 0 && qp < q_pos[i - 1])
      invalid("q_pos[" + std::to_string(i) + "]: " + std::to_string(qp) + " is smaller than q_pos[" +
              std::to_string(i - 1) + "] (" + std::to_string(q_pos[i - 1]) + "); positions must be non-decreasing");
    plan.queries[i] = {seq, visible(c, p, seq, qp, "query " + std::to_string(i))};
  }
  check_finite_q(q, size_t(n_q) * p->num_q_heads * c.head_dim());
  return plan;
}

int slot_runs(const Cache& c, int64_t lo, int64_t hi, SlotRun runs[2]) {
  if (hi <= lo) return 0;
  const uint32_t first = c.slot_of(lo);
  const int64_t n = hi - lo;
  const int64_t until_wrap = c.ring() ? int64_t(c.capacity()) - first : n;
  if (n <= until_wrap) {
    runs[0] = {first, static_cast<uint32_t>(n)};
    return 1;
  }
  runs[0] = {first, static_cast<uint32_t>(until_wrap)};
  runs[1] = {0, static_cast<uint32_t>(n - until_wrap)};
  return 2;
}

}  // namespace tqkv::core
