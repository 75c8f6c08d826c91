// Fused decode attention on the CPU over any cache (TQ or dense planes).
#pragma once
#include "core/attn_plan.h"

namespace tqkv::cpu {

// Chooses how many positions one work item covers, from the total work and the thread count.
int64_t chunk_positions(int64_t total_rows, uint32_t threads);

void attend(const core::Cache& cache, const core::AttnPlan& plan, const float* q, float* out, float* lse);

// The same, with the portable inner loop instead of the SIMD one (tests compare the two).
void attend_generic(const core::Cache& cache, const core::AttnPlan& plan, const float* q, float* out, float* lse);

}  // namespace tqkv::cpu
