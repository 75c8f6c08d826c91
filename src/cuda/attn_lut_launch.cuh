// Host side of the table-lookup attention kernel (attn_lut_kernel.cuh): the launchable
// variants with their shared-memory bytes, the variant of a call, and the resident blocks per SM
// that size the split count.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda/attn_lut_kernel.cuh"

namespace tqkv::cuda {
namespace lut {

// Two blocks per SM where a warp holds at most 128 coordinates, one for slices of 256 (Layout).
template <int D>
constexpr int kMinBlocks = kSlice<D> <= 128 ? 2 : 1;

// One launchable variant: its kernel for a call's scale type and its shared-memory bytes, both
// from the same template arguments, so that the two cannot disagree.
template <int D, bool PACK, bool TWIN = false>
struct Variant {
  static constexpr int kBytes = Layout<D, kSepMerge<D, PACK, TWIN>, TWIN, kStaged<D, PACK, TWIN>>::kBytes;
  static void launch(const AttnKernelParams& p, dim3 grid, cudaStream_t stream, bool pdl) {
    constexpr int MB = kMinBlocks<D>;
    const int bytes = std::max(kBytes, p.smem_floor);
    auto* kernel = p.k_scale_f16 ? attn_lut_kernel<D, MB, true, PACK, TWIN> : attn_lut_kernel<D, MB, false, PACK, TWIN>;
    TQKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    launch_ex(kernel, grid, dim3(kThreads), bytes, stream, pdl, p);
  }
};

// The variant of a call: TWIN for D = 256 with at most 2 query heads per block, PACK for at most
// 4 (one head chunk), else the general kernel.
template <int D>
void launch(const AttnKernelParams& p, dim3 grid, cudaStream_t stream, bool pdl) {
  if constexpr (D == 256)
    if (p.group <= kTwinMaxHeads) return Variant<D, true, true>::launch(p, grid, stream, pdl);
  if (p.group <= kPackMaxHeads) return Variant<D, true>::launch(p, grid, stream, pdl);
  Variant<D, false>::launch(p, grid, stream, pdl);
}

// Resident blocks per SM (the split count fills one wave of them).
template <int D>
int blocks_per_sm() {
  static const int n = [] {
    // The packed variant's separate merge buffer makes it the larger; the split count must fill
    // the slots of whichever variant a call launches.
    constexpr int bytes = std::max({Variant<D, false>::kBytes, Variant<D, true>::kBytes,
                                    D == 256 ? Variant<D, true, true>::kBytes : 0});
    auto* kernel = attn_lut_kernel<D, kMinBlocks<D>, false, false>;
    TQKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    int k = 0;
    TQKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&k, kernel, kThreads, bytes));
    return k > 0 ? k : 1;
  }();
  return n;
}

}  // namespace lut

#define TQKV_INSTANTIATE_ATTN_LUT(D)                                                          \
  template void lut::launch<D>(const AttnKernelParams&, dim3, cudaStream_t, bool); \
  template int lut::blocks_per_sm<D>();

}  // namespace tqkv::cuda
