// Small device operations of the table-lookup attention kernel (attn_lut_kernel.cuh): its
// global loads in fragment order, row scales as stored, the pair table's lookup, nibble merges,
// named barriers and 16-byte shared-memory moves.
#pragma once
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/attn_common.cuh"

namespace tqkv::cuda {
namespace lut {

template <int N>
__device__ __forceinline__ void ldg_words(const uint8_t* p, uint32_t* w) {
  if constexpr (N == 1) {
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(w[0]) : "l"(p));
  } else if constexpr (N == 2) {
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "l"(p));
  } else {
#pragma unroll
    for (int i = 0; i < N; i += 4)
      asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
          : "=r"(w[i]), "=r"(w[i + 1]), "=r"(w[i + 2]), "=r"(w[i + 3])
          : "l"(p + 4 * i));
  }
}

// A row scale as stored (f16: its bits), converted by scale_of where the softmax uses it.
// Converted right at the load, the compiler placed the conversion next to it, so every chunk
// waited there for the next chunk's f16 scales before working on its own: f16 scales were 2-8%
// slower than f32 ones (H100), now the same (kernel notes, step 70).
template <bool F16>
__device__ __forceinline__ std::conditional_t<F16, uint32_t, float> ldg_scale(const uint8_t* p) {
  if constexpr (F16) {
    unsigned short h;
    asm("ld.global.nc.u16 %0, [%1];" : "=h"(h) : "l"(p));
    return h;
  } else {
    float f;
    asm("ld.global.nc.f32 %0, [%1];" : "=f"(f) : "l"(p));
    return f;
  }
}
__device__ __forceinline__ float scale_of(float f) { return f; }
__device__ __forceinline__ float scale_of(uint32_t h) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
}

// A head's running maximum m raised to cm (its chunk's maximum over the rows' lanes): mu, the
// offset its weights are taken against (0 while m is -inf), follows, its sum l shrinks by the
// returned factor, and so must its output.
__device__ __forceinline__ float raise_max(float& m, float& mu, float& l, float cm) {
  const float mn = fmaxf(m, cm);
  mu = mn == -INFINITY ? 0.0f : mn;
  const float al = fast_exp2(m - mu);
  l *= al;
  m = mn;
  return al;
}

// The table entry for byte J of w: the permute puts lane_off (the lane's offset, 4l) in byte 0
// and the stored byte in byte 1, which is the entry's byte offset from tab (K's and V's alike).
template <int J>
__device__ __forceinline__ uint32_t lookup(const uint8_t* tab, uint32_t lane_off, uint32_t w) {
  return *reinterpret_cast<const uint32_t*>(tab + prmt(w, lane_off, 0x5504u | (J << 4)));
}

// w & zero, where zero is 0 at run time (AttnKernelParams::order_zero): a value that exists only
// once w has arrived. Volatile keeps nvcc from moving it; ptxas still sank it into a branch that
// alone used it (the path around the branch then waited for w later, and for every load issued
// meanwhile), so the kernel uses it in the branch's condition.
__device__ __forceinline__ uint32_t arrived(uint32_t w, uint32_t zero) {
  uint32_t r;
  asm volatile("and.b32 %0, %1, %2;" : "=r"(r) : "r"(w), "r"(zero));
  return r;
}

// (a & 0x0F0F0F0F) | (b & 0xF0F0F0F0) in one instruction.
__device__ __forceinline__ uint32_t select_nibbles(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xE4;" : "=r"(r) : "r"(a), "r"(b), "r"(0x0F0F0F0Fu));
  return r;
}

// Named barrier 1 + g (0 is __syncthreads) for the `threads` threads of group g. Immediate ids:
// with an id in a register ptxas reserves all 16 barriers of the block.
template <int G>
__device__ __forceinline__ void group_barrier(int g, int threads) {
  static_assert(G <= 4, "barrier ids");
  if (g == 0) asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
  else if (G > 1 && g == 1) asm volatile("bar.sync 2, %0;" ::"r"(threads) : "memory");
  else if (G > 2 && g == 2) asm volatile("bar.sync 3, %0;" ::"r"(threads) : "memory");
  else if (G > 3) asm volatile("bar.sync 4, %0;" ::"r"(threads) : "memory");
}

__device__ __forceinline__ void sts128(uint32_t a, float4 v) {
  asm volatile("st.shared.v4.f32 [%0], {%1,%2,%3,%4};" ::"r"(a), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
}
__device__ __forceinline__ float4 lds128(uint32_t a) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(a) : "memory");
  return v;
}

__device__ __forceinline__ uint4 lds_u4(uint32_t a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a) : "memory");
  return v;
}
__device__ __forceinline__ uint2 lds_u2(uint32_t a) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(a) : "memory");
  return v;
}

}  // namespace lut
}  // namespace tqkv::cuda
