// SIMD fused attention loop: Highway dynamic dispatch over the per-target bodies in
// kernel_hwy-inl.h. process_range_generic (kernel_generic.cpp) is the specification.
#include "cpu/kernel.h"

// Scalable-vector targets are left out: the kernel keeps fixed-size arrays of vectors in
// registers, which sizeless SVE/RVV vector types do not allow. Those machines get NEON/scalar.
#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SVE | HWY_SVE2 | HWY_SVE_256 | HWY_SVE2_128 | HWY_RVV)
#endif

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/kernel_hwy.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "cpu/kernel_hwy-inl.h"

#if HWY_ONCE
namespace tqkv::cpu {

HWY_EXPORT(ProcessRangeT);
HWY_EXPORT(TargetBit);

void process_range(const RangeTask& t) { HWY_DYNAMIC_DISPATCH(ProcessRangeT)(t); }

const char* simd_target_name() { return hwy::TargetName(HWY_DYNAMIC_DISPATCH(TargetBit)()); }

}  // namespace tqkv::cpu
#endif  // HWY_ONCE
