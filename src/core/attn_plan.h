// Validation of attention parameters, and the one place masks are interpreted: every mask
// becomes a contiguous range of logical positions per sequence, which every backend then walks.
#pragma once
#include <cstdint>
#include <vector>

#include "core/cache.h"
#include "tqkv/tqkv.h"

namespace tqkv::core {

struct VisibleRange {
  int64_t lo = 0, hi = 0;  // logical positions [lo, hi); empty when hi <= lo
  int64_t size() const { return hi > lo ? hi - lo : 0; }
};

// One query token: row i of q / out / lse belongs to queries[i].
struct QueryPlan {
  uint32_t seq = 0;
  VisibleRange range;
};

struct AttnPlan {
  uint32_t num_q_heads = 0;
  uint32_t group = 0;  // query heads per KV head
  float scale = 1, softcap = 0;
  const float* sinks = nullptr;
  uint32_t num_threads = 1;
  // Queries of one sequence are consecutive with non-decreasing ranges (both ends), which the
  // fused driver relies on to share every K/V row among a block of queries.
  std::vector<QueryPlan> queries;
};

// Most query heads a call takes (any sane model has far fewer; this bounds the sizes derived
// from it). check_num_q_heads throws INVALID_ARGUMENT naming num_q_heads unless it is a positive
// multiple of hkv and at most kMaxQHeads.
constexpr uint32_t kMaxQHeads = 65536;
void check_num_q_heads(uint32_t num_q_heads, uint32_t hkv);

// Decode: one query per sequence. Throws tqkv::Error naming the invalid parameter; checks q for
// non-finite values.
// q_on_host = false (CUDA: q in device memory) skips the scan of q's values. q_pos and sinks
// are always read here: a caller with them in device memory passes them as NULL.
AttnPlan plan_attention(const Cache& cache, const tqkv_attn_params* params, const float* q, const float* out,
                        bool q_on_host = true);
// Several query tokens of one sequence at positions q_pos[0..n_q) (non-decreasing), as in
// chunked prefill. params->q_pos must be NULL.
AttnPlan plan_attention_seq(const Cache& cache, uint32_t seq, uint32_t n_q, const int64_t* q_pos,
                            const tqkv_attn_params* params, const float* q, const float* out);

// A run of physical slots holding consecutive logical positions.
struct SlotRun {
  uint32_t slot = 0, n = 0;
};
// Splits logical positions [lo, hi) into at most two slot runs (ring buffers wrap once).
int slot_runs(const Cache& cache, int64_t lo, int64_t hi, SlotRun runs[2]);

}  // namespace tqkv::core
