// Float64 reference attention on the decoded cache: the independent oracle. It decodes every
// visible row to the original domain (un-rotating TQ rows) and runs textbook softmax attention
// there, so it shares nothing with the fused kernels but the stored bytes and the codebook.
#pragma once
#include "core/attn_plan.h"

namespace tqkv::core {

void attend_reference(const Cache& cache, const AttnPlan& plan, const float* q, float* out, float* lse);

}  // namespace tqkv::core
