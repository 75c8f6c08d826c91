// The fused attention inner loop: one (sequence, KV head), a run of contiguous slots, all g query
// heads of the GQA group. Every K and V row is loaded and decoded once for the whole group.
//
// Codecs plug in through two operations per type: score a K row against g queries, and
// accumulate a weighted V row into g accumulators. Masks never reach this level: the driver turns
// every mask into contiguous slot runs (src/cpu/attention.cpp).
#pragma once
#include <cstddef>
#include <cstdint>

namespace tqkv::cpu {

struct RowSpan {
  uint32_t type = 0;              // fmt::Type
  const uint8_t* rows = nullptr;  // row of the first slot of the run
  size_t stride = 0;              // bytes between rows
  const void* scales = nullptr;   // scale of the first slot (TQ types), f32 or f16
  bool scale_f16 = false;
  const float* centroids = nullptr;  // [1 << bits] (TQ types)
};

struct RangeTask {
  uint32_t d = 0;  // head_dim
  uint32_t g = 0;  // query heads in the group (1..16 supported by every kernel; more are split by the driver)
  RowSpan k, v;
  uint32_t n = 0;  // slots in the run
  // [g][d] prepared queries in K's kernel order (fmt::kernel_position), already multiplied by the
  // logit scale and, for TQ K, rotated and divided by sqrt(d): score = scale_k * dot(q, centroid[idx]).
  const float* q = nullptr;
  float softcap = 0;  // 0 = off, else s -> softcap * tanh(s / softcap)
  // [g] added to each head's scores before the softcap (key centering), or nullptr. Only the
  // portable loop takes it: the driver adds constant offsets after the fact when there is no
  // softcap, which is exact, and routes the rare softcap case here.
  const float* bias = nullptr;
  // Running online-softmax state, updated in place. acc is [g][d] in V's kernel order and
  // unnormalized; a TQ V row contributes p * scale_v * centroid[idx] (the 1/sqrt(d) is applied
  // once by the driver). m starts at -inf and l at 0.
  float* acc = nullptr;
  float* m = nullptr;
  float* l = nullptr;
};

// Portable C++ version: the specification of the fused loop, and the fallback.
void process_range_generic(const RangeTask& t);
// SIMD version (Highway, dynamic dispatch to the best target of this CPU).
void process_range(const RangeTask& t);
// Name of the SIMD target process_range dispatches to on this CPU (for reports).
const char* simd_target_name();

}  // namespace tqkv::cpu
