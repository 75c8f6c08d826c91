// What both decode kernels share (the tile kernel, attn_kernel.cuh, and the table-lookup
// kernel, attn_lut_kernel.cuh): their parameters, programmatic launches, mma fragment helpers,
// each split's slice of the positions, and the query prologue.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "core/format.h"
#include "cuda/check.cuh"
#include "cuda/codec.cuh"
#include "cuda/warp_fwht.cuh"

namespace tqkv::cuda {

constexpr int kHeadsPerBlock = 8;  // the mma's n

struct AttnKernelParams {
  const uint8_t* k_data;
  const uint8_t* v_data;
  const void* k_scales;
  const void* v_scales;
  const float* k_centroids;  // TQ K
  const float* v_centroids;  // TQ V
  const float* signs;        // [D]
  const int64_t* lengths;    // [B]
  const int64_t* q_pos;      // [B] or null
  const float* centers;      // [B][Hkv][D]
  const float* q;            // [B][Hq][D]
  float* part_o;             // [B][Hq][nsplit][D], rotated domain
  float* part_ml;            // [B][Hq][nsplit][2]: running max (log2 units) and sum
  uint32_t hkv, group, num_q_heads, capacity, nsplit, head_chunks;
  int ring, mask;
  int prefetch;  // lut kernel launched as a programmatic dependent: L2 hints before the wait
  int smem_floor;  // host only: the lut kernel's launch takes at least this much shared memory
  uint32_t window;
  uint32_t order_zero;  // always 0, unknown to the compilers: orders the lut kernel's loads (load)
  float scale, softcap;
  int k_scale_f16, v_scale_f16, centered;
  HalfBytes k_tab, v_tab;  // f16 centroid tables for 2/3/4-bit types, built on the host
};

// cp.async, global -> shared: 16 bytes bypassing L1, 4 bytes through it (the least a copy takes).
// The tile kernel's forms take a generic pointer and zero-fill invalid rows (read nothing); the
// table-lookup kernel's take a shared-window address and always copy.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // 0: zero-fill, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const uint8_t* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const uint8_t* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
// No memory clobber: the shared-memory reads after a wait are volatile asm (or follow a barrier),
// which the compiler keeps in order with it.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// Programmatic dependent launch (sm_90; no-ops before). The combine and the table-lookup kernel
// are launched as programmatic dependents of the stream's previous kernel (launch_ex): their
// blocks may be scheduled while that kernel finishes, do only work that reads nothing produced
// on the stream, and pass griddepcontrol.wait (which returns once the previous grid has
// completed and its writes are visible) before anything else. The attention kernels trigger
// after their main loops, the combine as soon as it starts, so the next call's table-lookup
// blocks are resident and have built their tables before it ends.
__device__ __forceinline__ void grid_dependency_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Sum / max of a and b over the 8 lanes sharing lane & 3: the 16 rows of an mma C fragment
// for the column pair (2t, 2t+1) that lane holds.
__device__ __forceinline__ void rows_sum(float& a, float& b) {
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {
    a += __shfl_xor_sync(0xFFFFFFFFu, a, o);
    b += __shfl_xor_sync(0xFFFFFFFFu, b, o);
  }
}
__device__ __forceinline__ void rows_max(float& a) {
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) a = fmaxf(a, __shfl_xor_sync(0xFFFFFFFFu, a, o));
}
__device__ __forceinline__ void rows_max(float& a, float& b) {
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {
    a = fmaxf(a, __shfl_xor_sync(0xFFFFFFFFu, a, o));
    b = fmaxf(b, __shfl_xor_sync(0xFFFFFFFFu, b, o));
  }
}

// Not volatile: the compiler may interleave independent mma chains with other work.
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t r;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
  return r;
}

// 2^x for x <= 0 (and -inf -> 0): the hardware approximation, relative error ~2^-22.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_half2(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
// x = hi + lo with both parts f16: hi carries 11 bits, lo the next 11.
__device__ __forceinline__ void split_half2(float a, float b, uint32_t& hi, uint32_t& lo) {
  const __half ha = __float2half_rn(a), hb = __float2half_rn(b);
  hi = uint32_t(__half_as_ushort(ha)) | (uint32_t(__half_as_ushort(hb)) << 16);
  lo = pack_half2(a - __half2float(ha), b - __half2float(hb));
}

// x as the f16 pair (hi, lo), x = hi + lo: one head's two columns of a packed weight fragment.
__device__ __forceinline__ uint32_t hi_lo_half2(float x) {
  const float hi = __half2float(__float2half_rn(x));
  return pack_half2(x, x - hi);  // x rounds to hi again
}

// The visible positions of sequence b and split `split`'s slice of them: positions
// [lo, hi) of the sequence; each split takes `align`-row multiples.
struct Slice {
  int64_t lo, hi;
  bool bad;  // a position the mask needs is not stored: the output is poisoned (NaN)
};
// GUESS: read the length and q_pos with relaxed loads, before griddepcontrol.wait, while the
// previous kernel on the stream (an append) may still change them: for prefetch hints only.
__device__ __forceinline__ int64_t ld_relaxed(const int64_t* a) {
  int64_t v;
  asm volatile("ld.relaxed.gpu.global.s64 %0, [%1];" : "=l"(v) : "l"(a));
  return v;
}
template <bool GUESS = false>
__device__ __forceinline__ Slice split_slice(const AttnKernelParams& p, uint32_t b, uint32_t split, int align) {
  const int64_t len = GUESS ? ld_relaxed(p.lengths + b) : p.lengths[b];
  const int64_t qp = p.q_pos ? (GUESS ? ld_relaxed(p.q_pos + b) : p.q_pos[b]) : len - 1;
  int64_t lo = 0, hi = len;
  if (p.mask == TQKV_MASK_CAUSAL) hi = qp + 1;
  if (p.mask == TQKV_MASK_WINDOW) {
    hi = qp + 1;
    lo = max(int64_t(0), qp - int64_t(p.window) + 1);
  }
  const int64_t resident = (p.ring && len > int64_t(p.capacity)) ? len - int64_t(p.capacity) : 0;
  // A position that is not stored (q_pos out of range, or a ring that wrapped past what the mask
  // needs after the call was captured) poisons the output instead of being silently dropped.
  const bool bad = (p.q_pos && (qp < 0 || qp >= len)) || (hi > lo && lo < resident);
  // Nothing is read for a poisoned output: a q_pos far past the length (or a ring range longer
  // than the capacity) would otherwise send the loads past the sequence's rows, into another
  // head's or out of the buffer.
  if (bad) hi = lo;
  if (hi < lo) hi = lo;
  // The range is cut into align-row chunks, dealt out as evenly as whole chunks allow: the
  // first (chunks % nsplit) splits take one more. Splits of equal size rounded up to a chunk
  // left nearly every split with the larger count (and the last one short): at batch 1,
  // S = 131072 on the H100, 32 of a KV head's 33 blocks then had a warp with 32 chunks,
  // against 8 of 33 now, and the call took 55.9 instead of 54.6 us (kernel notes, step 65).
  // The counts fit 32 bits: a range is never longer than the capacity (a uint32), or it is bad
  // and empty (a ring's range starts at or after its oldest resident row, above).
  const uint32_t chunks = uint32_t((hi - lo + align - 1) / align);
  const uint32_t base = chunks / p.nsplit, rem = chunks - base * p.nsplit;
  const uint32_t c0 = split * base + min(split, rem);
  const uint32_t c1 = c0 + base + (split < rem ? 1u : 0u);
  return {lo + int64_t(c0) * align, min(hi, lo + int64_t(c1) * align), bad};
}

// The query's registers in the prologue: register j of lane l holds coordinate qcoord<D>(l, j),
// runs of 4 (of 2 at D = 64) per lane with the lanes side by side, so that each load of q, the
// key mean and the signs reads 512 contiguous bytes. Lane-contiguous rows (l*D/32 + j) made a
// wide head's loads touch 16 lines each, 48 of them per lane at D = 512, and the block's L1
// spent microseconds on them (docs/cuda-kernel-notes.md, step 44). The Hadamard transform
// (warp_fwht) needs no other layout: its butterflies commute.
template <int D>
__device__ __forceinline__ int qcoord(int lane, int j) {
  constexpr int R = D / 32 < 4 ? D / 32 : 4;  // run length
  return (j / R) * (32 * R) + lane * R + j % R;
}

// Four floats from a 16-byte aligned address.
__device__ __forceinline__ void load4(const float* src, float* x) {
  const float4 f = *reinterpret_cast<const float4*>(src);
  x[0] = f.x;
  x[1] = f.y;
  x[2] = f.z;
  x[3] = f.w;
}

// V floats of src in the qcoord layout (src 16-byte aligned when ALIGNED: float4 runs).
template <int D, bool ALIGNED>
__device__ __forceinline__ void load_qlayout(const float* src, int lane, float (&x)[D / 32]) {
  constexpr int V = D / 32;
  if constexpr (ALIGNED && V >= 4) {
#pragma unroll
    for (int j = 0; j < V; j += 4) load4(src + qcoord<D>(lane, j), x + j);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) x[j] = src[qcoord<D>(lane, j)];
  }
}

// The query fragment (uint4) of k-step s for mma lane `lane` (= 4 * head + t). SWZ: lanes
// XOR-swizzled by s. A prologue lane writes one head's run of consecutive k-steps at once,
// which otherwise falls on one bank group per 8 lanes (8-way conflicts per 16-byte store);
// swizzled, the mma's reads of a k-step still take 32 distinct entries of one 512-byte row, but
// with 8 lane patterns (8 address registers where the loop reads the query from shared
// memory), so only the kernel whose loop reads it there anyway uses it.
template <bool SWZ>
__device__ __forceinline__ int qslot(int s, int lane) { return s * 32 + (SWZ ? lane ^ (s & 7) : lane); }

// Prologue shared by the kernels: warps w, w + WARPS, ... rotate and scale query heads of the
// block in registers, then write them as the QK mma's B fragments: thread (r = head, t) of
// k-step s reads coordinates t*D/4 + 4s + 0..3, as uint4 {hi(0,1), hi(2,3), lo(0,1), lo(2,3)}
// at qslot<SWZ>(s, head*4 + t).
// DS < D: the coordinates form D/DS slices of DS, each laid out as above for a head of DS
// (slice j's k-steps are j*DS/16 ..), for kernels that give each slice its own warp.
// Rotated coordinates (FWHT / sqrt(D)) also carry 1/sqrt(D) for centroid units: 1/D in all.
// q_unscale[h] undoes the power-of-two scaling, bias[h] = scale * q . mu (key centering).
// It comes in two halves, query_load (memory) and query_finish (arithmetic and the fragment
// stores), so that a kernel whose warps take one head each can put the query's loads in flight
// before other loads that wait on memory (the table-lookup kernel: before the lengths').
template <int D>
struct QueryIn {
  float x[D / 32];   // the head's query, qcoord layout (zero for a head past nh)
  float mu[D / 32];  // the KV head's key mean, when the cache is centered
};

// The rotation signs in the qcoord layout: the library's, 16-byte aligned, and written only at
// cache creation, so a kernel may read them before griddepcontrol.wait.
template <int D>
__device__ __forceinline__ void query_signs(const AttnKernelParams& p, int lane, float (&sg)[D / 32]) {
  load_qlayout<D, true>(p.signs, lane, sg);
}

template <int D>
__device__ __forceinline__ void query_load(const AttnKernelParams& p, uint32_t b, uint32_t hkv_idx, uint32_t h0,
                                           int nh, int h, int lane, QueryIn<D>& in) {
  constexpr int V = D / 32;
  if (h < nh) {
    const float* qrow = p.q + (size_t(b) * p.num_q_heads + h0 + h) * D;
    // q is the caller's and may sit at any float offset; the key means are the library's.
    if ((reinterpret_cast<uintptr_t>(p.q) & 15) == 0) load_qlayout<D, true>(qrow, lane, in.x);
    else load_qlayout<D, false>(qrow, lane, in.x);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) in.x[j] = 0.0f;
  }
  if (p.centered) load_qlayout<D, true>(p.centers + (size_t(b) * p.hkv + hkv_idx) * D, lane, in.mu);
}

template <int D, bool ROTATED, int DS = D, bool SWZ = false>
__device__ __forceinline__ void query_finish(const AttnKernelParams& p, int h, int lane, const float (&sg)[D / 32],
                                             QueryIn<D>& in, uint32_t* q_hl, float* q_unscale, float* bias) {
  constexpr int V = D / 32;
  const float post = ROTATED ? 1.0f / float(D) : 1.0f;
  float(&x)[V] = in.x;
  float dot = 0.0f;
#pragma unroll
  for (int j = 0; j < V; ++j) x[j] *= p.scale;
  if (p.centered) {  // bias = scale * q . mu, original domain
#pragma unroll
    for (int j = 0; j < V; ++j) dot += x[j] * in.mu[j];
  }
  if (ROTATED) {
#pragma unroll
    for (int j = 0; j < V; ++j) x[j] *= sg[j];
    // warp_fwht's butterflies read the registers as lane-major rows, but the Hadamard
    // matrix is the same under any consistent permutation of the index bits, so on the
    // qcoord layout they give the transform by coordinate.
    warp_fwht<V>(x, lane);
  }
  float mx = 0.0f;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    x[j] *= post;
    mx = fmaxf(mx, fabsf(x[j]));
  }
  for (int o = 16; o > 0; o >>= 1) {
    mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
    dot += __shfl_xor_sync(0xFFFFFFFFu, dot, o);
  }
  // Power-of-two scaling keeps the f16 parts normal: max |q| lands in [2^13, 2^14).
  int e = 0;
  frexpf(mx > 0.0f ? mx : 1.0f, &e);
  const float up = ldexpf(1.0f, 14 - e);
  if (lane == 0) {
    q_unscale[h] = 1.0f / up;
    bias[h] = p.centered ? dot : 0.0f;
  }
  // The fragment entry (uint4 index) holding coordinate c: k-step sq, quad tq.
  auto entry = [&](int c) {
    const int cs = c % DS;
    const int tq = cs / (DS / 4), sq = c / DS * (DS / 16) + (cs % (DS / 4)) / 4;
    return qslot<SWZ>(sq, h * 4 + tq);
  };
  if constexpr (V >= 4) {
    // A run of four coordinates (c % 4 == 0) is one whole entry: one 16-byte store.
#pragma unroll
    for (int j = 0; j < V; j += 4) {
      uint32_t h01, l01, h23, l23;
      split_half2(x[j] * up, x[j + 1] * up, h01, l01);
      split_half2(x[j + 2] * up, x[j + 3] * up, h23, l23);
      reinterpret_cast<uint4*>(q_hl)[entry(qcoord<D>(lane, j))] = make_uint4(h01, h23, l01, l23);
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; j += 2) {
      const int c = qcoord<D>(lane, j);  // even: a pair (c, c+1) lands in one 32-bit word
      uint32_t hw, lw;
      split_half2(x[j] * up, x[j + 1] * up, hw, lw);
      uint32_t* dst = q_hl + entry(c) * 4;
      dst[(c % 4) / 2] = hw;
      dst[2 + (c % 4) / 2] = lw;
    }
  }
}

template <int D, int WARPS, bool ROTATED, int DS = D, bool SWZ = false>
__device__ __forceinline__ void query_fragments(const AttnKernelParams& p, uint32_t b, uint32_t hkv_idx, uint32_t h0,
                                                int nh, int warp, int lane, uint32_t* q_hl, float* q_unscale,
                                                float* bias) {
  float sg[D / 32];
  if (ROTATED) query_signs<D>(p, lane, sg);
  for (int h = warp; h < kHeadsPerBlock; h += WARPS) {
    QueryIn<D> in;
    query_load<D>(p, b, hkv_idx, h0, nh, h, lane, in);
    query_finish<D, ROTATED, DS, SWZ>(p, h, lane, sg, in, q_hl, q_unscale, bias);
  }
}

// Launches kernel(args...) on stream, as a programmatic dependent of the stream's previous
// kernel when pdl is set (callers set it on sm_90 only; see grid_dependency_wait). Works under
// graph capture, where it becomes a programmatic edge.
template <typename... Params, typename... Args>
void launch_ex(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
               Args&&... args) {
  cudaLaunchConfig_t lc{};
  lc.gridDim = grid;
  lc.blockDim = block;
  lc.dynamicSmemBytes = smem;
  lc.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  if (pdl) {
    lc.attrs = &attr;
    lc.numAttrs = 1;
  }
  TQKV_CUDA_CHECK(cudaLaunchKernelEx(&lc, kernel, std::forward<Args>(args)...));
}

}  // namespace tqkv::cuda
