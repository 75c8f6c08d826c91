// GPU encoder: DeviceCache::append. One pass over the input does every check and every row.
//
// Order on the cache's stream:
//   1. per-append tables (sequence offsets, key-mean sources, quantization tables, the starting
//      value of the error keys) uploaded to staging_ in one copy from pinned memory.
//   2. key means of the sequences whose first append defines one (mean_partial, mean_final).
//   3. encode_kernel: one launch for all tokens, heads, sequences, K and V. It encodes every row
//      into a scratch area of staging_ (input order) and, on the way, records the first
//      non-finite input value, dense f16 overflow or unrepresentable scale in the error keys.
//   4. commit_kernel: if no flag is set, scatters the scratch rows and scales into their slots and
//      updates the device lengths and key means; otherwise it writes nothing.
//   5. error keys (and new key means) copied back to pinned memory, one synchronisation, then
//      the host bookkeeping.
// Encoding into scratch and committing afterwards reads the input once; a separate check pass
// before encoding would read it twice, and the input is most of the traffic (bf16 K/V against
// 4-bit rows). The commit re-reads only the encoded bytes, which are still in L2 at prefill sizes.
//
// Exactness against the CPU encoder (core::encode_row), the reference for these bytes:
// - the rotation is bit-identical: signs, the same butterflies (a+b, a-b on pairs (j, j+h) for
//   h = 1 .. d/2, each an exact sign times a value plus another value, so fused or not the rounding
//   is the same) and the same float 1/sqrt(d);
// - sums of squares, <y,c> and <c,c> are double sums of exact products, as on the CPU, but summed
//   in another order (per lane, then across lanes). The double results can differ in their last
//   bits; after rounding to float (1/norm factor, scale) they agree except in the rare case where
//   the double lands next to a float rounding midpoint (of order 1e-9 per row). An index then
//   differs only where u_i sits within a float ulp of a boundary, by one level;
// - a key mean over more than kMeanChunk tokens is summed in chunks (same caveat, per coordinate);
// - quantization (a table lookup, then one comparison) gives exactly core::quantize's index;
// - dense f16 and f16 scales use the hardware round-to-nearest-even conversion, identical to
//   core/half.h for finite values.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "core/cache.h"
#include "core/error.h"
#include "core/format.h"
#include "core/half.h"
#include "cuda/check.cuh"
#include "cuda/warp_fwht.cuh"
#include "cuda/device_cache.h"
#include "cuda/quant_table.h"
#include "cpu/encode.h"

namespace tqkv::cuda {
namespace {

constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr int kWarps = 8;  // warps per encode block
constexpr int kThreads = kWarps * 32;
constexpr uint32_t kMeanChunk = 256;  // tokens summed sequentially per key-mean partial

// Error keys: atomicMin over (kind << kKindShift | flat input index) per tensor, so that a
// non-finite input wins over overflows and, within a kind, the first position wins.
constexpr unsigned long long kNoError = ~0ull;
constexpr int kKindShift = 60;
enum ErrorKind : unsigned long long { kNonFinite = 0, kDenseOverflow = 1, kScaleF16 = 2, kScaleF32 = 3 };

// Lanes per row: d/LANES values per lane (16, or 8 at d = 64), so that most butterfly stages are
// in registers and the double reductions cross few lanes. Several rows share a warp at d <= 256.
template <int D>
struct Geo {
  static constexpr int LANES = D == 64 ? 8 : D / 16;
  static constexpr int V = D / LANES;
  static constexpr int RPW = 32 / LANES;  // rows per warp
};

struct PlaneArgs {
  uint32_t bits = 0;  // 2, 3, 4, 8; 0 = dense f16
  uint32_t stride = 0;
  bool lsq = false, scale_f16 = false;
  const float* boundaries = nullptr;  // device, levels - 1
  const float* centroids = nullptr;   // device, levels
  // Quantization table (see Lut): cell k = round(u * lut_scale) holds the number of boundaries
  // below the cell; one comparison with the next boundary finishes.
  const uint8_t* lut = nullptr;
  uint32_t lut_size = 0, lut_off = 0;
  float lut_scale = 0;
  uint8_t* rows = nullptr;            // scratch [R][stride], input row order
  uint8_t* scales = nullptr;          // scratch [R] scales
};

struct EncodeArgs {
  const void* in[2] = {nullptr, nullptr};  // device K, V input [tokens][hkv][d]
  PlaneArgs plane[2];
  uint64_t rows = 0;   // R = tokens * hkv per tensor
  uint64_t tasks = 0;  // warp tasks per tensor: ceil(R / rows per warp)
  uint32_t hkv = 0, num_seqs = 0;
  bool centered = false;             // some sequence stores keys minus a mean
  const uint64_t* prefix = nullptr;  // [num_seqs + 1] first input token of each sequence
  const int32_t* center = nullptr;   // [num_seqs] -1 none, -2 centers, i >= 0 mu_new[i]
  const float* centers = nullptr;    // DeviceCache::centers_
  const float* mu_new = nullptr;     // [defining][hkv][d]
  const float* signs = nullptr;
  float inv_sqrt_d = 0;  // float(1 / sqrt(d)), as core/rotation.cpp
  double sqrt_d = 0;
  unsigned long long* flags = nullptr;  // [2] K, V
};

__device__ __forceinline__ uint32_t seq_of(const uint64_t* prefix, uint32_t num_seqs, uint64_t token) {
  // Last s with prefix[s] <= token; empty sequences before it are skipped by construction.
  uint32_t lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const uint32_t mid = (lo + hi + 1) / 2;
    if (prefix[mid] <= token) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ void post(unsigned long long* flag, unsigned long long kind, uint64_t flat) {
  atomicMin(flag, (kind << kKindShift) | flat);
}

template <int DT>
__device__ __forceinline__ float from16(uint32_t h) {
  if constexpr (DT == TQKV_DTYPE_F16) return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
  else return __uint_as_float(h << 16);  // bf16
}

// V consecutive input values starting at element off (16-byte aligned: see append()).
template <int DT, int V>
__device__ __forceinline__ void load_values(const void* base, uint64_t off, float (&x)[V]) {
  if constexpr (DT == TQKV_DTYPE_F32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + off);
#pragma unroll
    for (int i = 0; i < V / 4; ++i) {
      const float4 f = __ldg(p + i);
      x[4 * i] = f.x; x[4 * i + 1] = f.y; x[4 * i + 2] = f.z; x[4 * i + 3] = f.w;
    }
  } else {
    const uint4* p = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + off);
#pragma unroll
    for (int i = 0; i < V / 8; ++i) {
      const uint4 q = __ldg(p + i);
      const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        x[8 * i + 2 * k] = from16<DT>(w[k] & 0xFFFFu);
        x[8 * i + 2 * k + 1] = from16<DT>(w[k] >> 16);
      }
    }
  }
}

template <int NB>
__device__ __forceinline__ void store_bytes(uint8_t* dst, const uint32_t* w) {
  static_assert(NB == 1 || NB == 2 || NB == 4 || NB == 8 || NB == 16 || NB == 32, "store size");
  if constexpr (NB == 1) *dst = static_cast<uint8_t>(w[0]);
  else if constexpr (NB == 2) *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(w[0]);
  else if constexpr (NB == 4) *reinterpret_cast<uint32_t*>(dst) = w[0];
  else if constexpr (NB == 8) *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
  else {
#pragma unroll
    for (int i = 0; i < NB / 16; ++i)
      reinterpret_cast<uint4*>(dst)[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
  }
}

// Re-reads a row whose sum of squares is not finite and reports its first non-finite input
// value (there may be none: finite values can overflow the rotation, which the scale checks
// then treat exactly as the CPU encoder does).
template <int DT, int V>
__device__ void report_non_finite(const EncodeArgs& a, int w, uint64_t r, int gl, int d) {
  float x[V];
  load_values<DT, V>(a.in[w], r * d + uint64_t(gl) * V, x);
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (!isfinite(x[j])) {
      post(a.flags + w, kNonFinite, r * d + uint64_t(gl) * V + j);
      break;
    }
}

// One TQ row per lane group: rotate, norm, quantize, scale, pack; all lanes of the warp call it
// (shuffles), `valid` says whether this group's row exists.
template <int D, int DT, int BITS>
__device__ __forceinline__ void encode_tq(const EncodeArgs& a, int w, uint64_t r, bool valid, int gl,
                                          uint32_t signs, const float* sb, const double* sc, const uint8_t* slut) {
  constexpr int V = Geo<D>::V, LANES = Geo<D>::LANES;
  const PlaneArgs& p = a.plane[w];
  float x[V];
  if (valid) {
    load_values<DT, V>(a.in[w], r * D + uint64_t(gl) * V, x);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) x[j] = 0.0f;
  }
  if (w == 0 && a.centered && valid) {
    const uint32_t g = uint32_t(r) / a.hkv;
    const uint32_t s = seq_of(a.prefix, a.num_seqs, g);
    const int32_t src = a.center[s];
    if (src != -1) {
      const float* mu = (src == -2 ? a.centers + size_t(s) * a.hkv * D : a.mu_new + size_t(src) * a.hkv * D) +
                        size_t(uint32_t(r) - g * a.hkv) * D + gl * V;
#pragma unroll
      for (int j = 0; j < V; ++j) x[j] -= __ldg(mu + j);
    }
  }
  // Signs, then the butterflies of core/rotation.cpp: first the strides inside a lane, then the
  // strides across lanes (the lower partner computes a + b, the upper a - b).
#pragma unroll
  for (int j = 0; j < V; ++j) x[j] = __uint_as_float(__float_as_uint(x[j]) ^ ((signs << (31 - j)) & 0x80000000u));
  warp_fwht<V, LANES>(x, gl);
  double n2 = 0;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    x[j] *= a.inv_sqrt_d;
    n2 += double(x[j]) * double(x[j]);
  }
#pragma unroll
  for (int m = 1; m < LANES; m *= 2) n2 += __shfl_xor_sync(kFull, n2, m);
  if (__any_sync(kFull, valid && !isfinite(n2)))
    if (valid && !isfinite(n2)) report_non_finite<DT, V>(a, w, r, gl, D);
  const double norm = sqrt(n2);
  const bool zero = !(norm >= core::kMinNorm);
  const float inv = zero ? 0.0f : static_cast<float>(a.sqrt_d / norm);
  // Quantize, accumulate <y,c> and <c,c>, and pack, in one pass over the lane's values.
  constexpr int kPerWord = BITS == 3 ? 32 : 32 / BITS, kWords = BITS == 3 ? 3 : (V + kPerWord - 1) / kPerWord;
  uint32_t words[kWords];
#pragma unroll
  for (int i = 0; i < kWords; ++i) words[i] = 0;
  double yc = 0, cc = 0;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float u = zero ? 0.0f : x[j] * inv;
    // round(u * 2^e) exactly (the fused add of 1.5 * 2^23 rounds to an integer once), then the
    // cell's count of lower boundaries and one comparison: core::quantize's index.
    const float t = fmaf(u, p.lut_scale, 12582912.0f);
    const uint32_t cell = min(uint32_t(__float_as_int(t) - 0x4B400000 + int(p.lut_off)), p.lut_size - 1);
    const uint32_t lo = slut[cell];
    const uint32_t idx = lo + (u > sb[lo] ? 1u : 0u);
    const double c = sc[idx];
    yc += double(x[j]) * c;
    cc += c * c;
    if constexpr (BITS == 3) {
#pragma unroll
      for (int b = 0; b < 3; ++b) words[b] |= ((idx >> b) & 1u) << j;  // three bit planes
    } else {
      words[j / kPerWord] |= idx << ((j % kPerWord) * BITS);  // little-endian fields
    }
  }
  double s = norm;
  if (p.lsq) {
#pragma unroll
    for (int m = 1; m < LANES; m *= 2) {
      yc += __shfl_xor_sync(kFull, yc, m);
      cc += __shfl_xor_sync(kFull, cc, m);
    }
    s = a.sqrt_d * yc / cc;
  }
  if (!valid) return;
  uint8_t* row = p.rows + r * p.stride;
  if (gl == 0) {
    const float sf = zero ? 0.0f : static_cast<float>(s);
    if (!isfinite(sf)) post(a.flags + w, kScaleF32, r * D);
    if (p.scale_f16) {
      const uint16_t h = __half_as_ushort(__float2half_rn(sf));
      if ((h & 0x7C00u) == 0x7C00u && isfinite(sf)) post(a.flags + w, kScaleF16, r * D);
      reinterpret_cast<uint16_t*>(p.scales)[r] = h;
    } else {
      reinterpret_cast<float*>(p.scales)[r] = sf;
    }
  }
  if constexpr (BITS == 3) {
    // Three bit planes of D/8 bytes; this lane owns V/8 bytes of each.
#pragma unroll
    for (int b = 0; b < 3; ++b) store_bytes<V / 8>(row + b * (D / 8) + gl * (V / 8), &words[b]);
    constexpr int kPad = int(fmt::row_stride(fmt::TQ3, D) - fmt::row_payload_bytes(fmt::TQ3, D));
    if constexpr (kPad > 0) {
      static_assert(kPad == 8, "TQ3 padding");
      const uint32_t zeros[2] = {0, 0};
      if (gl == 0) store_bytes<8>(row + 3 * (D / 8), zeros);
    }
  } else {
    store_bytes<V * BITS / 8>(row + gl * (V * BITS / 8), words);
  }
}

// Dense f16 row: the values rounded to nearest even, never rotated or centered.
template <int D, int DT>
__device__ __forceinline__ void encode_f16(const EncodeArgs& a, int w, uint64_t r, bool valid, int gl) {
  constexpr int V = Geo<D>::V;
  if (!valid) return;
  float x[V];
  load_values<DT, V>(a.in[w], r * D + uint64_t(gl) * V, x);
  uint32_t words[V / 2];
  uint64_t bad_nf = kNoError, bad_of = kNoError;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const uint32_t h = __half_as_ushort(__float2half_rn(x[j]));
    if ((h & 0x7C00u) == 0x7C00u) {
      const uint64_t flat = r * D + uint64_t(gl) * V + j;
      if (!isfinite(x[j])) bad_nf = flat < bad_nf ? flat : bad_nf; else bad_of = flat < bad_of ? flat : bad_of;
    }
    if (j % 2 == 0) words[j / 2] = h; else words[j / 2] |= h << 16;
  }
  if (bad_nf != kNoError) post(a.flags + w, kNonFinite, bad_nf);
  if (bad_of != kNoError) post(a.flags + w, kDenseOverflow, bad_of);
  store_bytes<V * 2>(a.plane[w].rows + r * a.plane[w].stride + gl * V * 2, words);
}

// Four blocks per SM (64 registers) where that costs no spills: the kernel is latency bound.
template <int D, int DT>
__global__ void __launch_bounds__(kThreads, D == 64 || (D == 128 && DT != TQKV_DTYPE_F32) ? 4 : 3) encode_kernel(const __grid_constant__ EncodeArgs a) {
  using G = Geo<D>;
  __shared__ float s_b[2][256];  // boundaries, then +inf (the table's last comparison)
  __shared__ double s_c[2][256];
  __shared__ uint8_t s_lut[2][kLutMax];
  for (int w = 0; w < 2; ++w) {
    const PlaneArgs& p = a.plane[w];
    if (p.bits == 0) continue;
    const int levels = 1 << p.bits;
    for (int i = threadIdx.x; i < levels; i += blockDim.x) {
      s_c[w][i] = p.centroids[i];
      s_b[w][i] = i < levels - 1 ? p.boundaries[i] : INFINITY;
    }
    for (uint32_t i = threadIdx.x; i < p.lut_size; i += blockDim.x) s_lut[w][i] = p.lut[i];
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, gl = lane % G::LANES, group = lane / G::LANES;
  uint32_t signs = 0;  // bit j: coordinate gl * V + j is negated
#pragma unroll
  for (int j = 0; j < G::V; ++j) signs |= (__ldg(a.signs + gl * G::V + j) < 0.0f ? 1u : 0u) << j;
  const uint64_t warps = uint64_t(gridDim.x) * kWarps;
  for (uint64_t task = uint64_t(blockIdx.x) * kWarps + threadIdx.x / 32; task < 2 * a.tasks; task += warps) {
    const int w = task >= a.tasks ? 1 : 0;  // warp-uniform: K and V tasks never share a warp
    const uint64_t r = (task - (w ? a.tasks : 0)) * G::RPW + group;
    const bool valid = r < a.rows;
    switch (a.plane[w].bits) {
      case 2: encode_tq<D, DT, 2>(a, w, r, valid, gl, signs, s_b[w], s_c[w], s_lut[w]); break;
      case 3: encode_tq<D, DT, 3>(a, w, r, valid, gl, signs, s_b[w], s_c[w], s_lut[w]); break;
      case 4: encode_tq<D, DT, 4>(a, w, r, valid, gl, signs, s_b[w], s_c[w], s_lut[w]); break;
      case 8: encode_tq<D, DT, 8>(a, w, r, valid, gl, signs, s_b[w], s_c[w], s_lut[w]); break;
      default: encode_f16<D, DT>(a, w, r, valid, gl); break;
    }
  }
}

// Key means, summed in double per (kv head, coordinate) like Cache::encode: each partial sums up
// to kMeanChunk tokens in order, the final pass adds the partials in order.
template <int DT>
__global__ void mean_partial(const void* k, const uint64_t* prefix, const int32_t* def_seq, uint32_t cols,
                             uint32_t chunks, double* partial) {
  const uint32_t col = blockIdx.x * blockDim.x + threadIdx.x, ch = blockIdx.y, di = blockIdx.z;
  if (col >= cols) return;
  const uint32_t s = uint32_t(def_seq[di]);
  const uint64_t t0 = prefix[s] + uint64_t(ch) * kMeanChunk, t1 = min(t0 + kMeanChunk, prefix[s + 1]);
  double sum = 0;
#pragma unroll 8
  for (uint64_t t = t0; t < t1; ++t) {
    const uint64_t i = t * cols + col;
    float x;
    if constexpr (DT == TQKV_DTYPE_F32) x = static_cast<const float*>(k)[i];
    else x = from16<DT>(static_cast<const uint16_t*>(k)[i]);
    sum += double(x);
  }
  partial[(uint64_t(di) * chunks + ch) * cols + col] = sum;
}

__global__ void mean_final(const double* partial, const uint64_t* prefix, const int32_t* def_seq, uint32_t cols,
                           uint32_t chunks, float* mu) {
  const uint32_t col = blockIdx.x * blockDim.x + threadIdx.x, di = blockIdx.y;
  if (col >= cols) return;
  const uint32_t s = uint32_t(def_seq[di]);
  const uint64_t n = prefix[s + 1] - prefix[s];
  const uint64_t used = (n + kMeanChunk - 1) / kMeanChunk;
  double sum = 0;
  for (uint64_t ch = 0; ch < used; ++ch) sum += partial[(uint64_t(di) * chunks + ch) * cols + col];
  mu[uint64_t(di) * cols + col] = static_cast<float>(sum / double(n));
}

struct CommitArgs {
  const uint8_t* rows[2] = {nullptr, nullptr};    // scratch
  const uint8_t* scales[2] = {nullptr, nullptr};  // scratch
  uint8_t* dst_rows[2] = {nullptr, nullptr};
  uint8_t* dst_scales[2] = {nullptr, nullptr};
  uint32_t stride[2] = {0, 0}, sb[2] = {0, 0};
  uint32_t nrows = 0;  // R < 2^32 (append() checks)
  uint32_t hkv = 0, cap = 0, num_seqs = 0;
  bool ring = false;
  const uint64_t* prefix = nullptr;
  const int64_t* start = nullptr;  // [num_seqs] length before this append
  const int32_t* def_seq = nullptr;
  uint32_t ndef = 0, cols = 0;
  const float* mu_new = nullptr;
  float* centers = nullptr;
  int64_t* lengths = nullptr;
  const unsigned long long* flags = nullptr;
};

// Destination row of scratch row r, or false when a later token of the same append takes its
// ring slot (the CPU path writes both in order; here only the survivor is written).
__device__ __forceinline__ bool dst_row(const CommitArgs& a, uint32_t r, uint64_t& dst) {
  const uint32_t g = r / a.hkv;
  const uint32_t s = seq_of(a.prefix, a.num_seqs, g);
  const uint64_t t = g - a.prefix[s], n = a.prefix[s + 1] - a.prefix[s];
  if (a.ring && n - t > a.cap) return false;
  const int64_t pos = a.start[s] + int64_t(t);
  const uint32_t slot = static_cast<uint32_t>(a.ring ? pos % a.cap : pos);
  dst = fmt::row_index(s, r - g * a.hkv, slot, a.hkv, a.cap);
  return true;
}

// One thread per 16 bytes of a scratch row (blockIdx.y: K or V); the first of a row also moves
// its scale. Many small independent copies keep enough loads in flight.
__global__ void commit_kernel(const __grid_constant__ CommitArgs a) {
  if (a.flags[0] != kNoError || a.flags[1] != kNoError) return;  // a failed append writes nothing
  const int w = blockIdx.y;
  const uint32_t tid = blockIdx.x * blockDim.x + threadIdx.x, nthreads = gridDim.x * blockDim.x;
  const uint32_t per_row = a.stride[w] / 16, n = a.nrows * per_row;
  for (uint32_t i = tid; i < n; i += nthreads) {
    const uint32_t r = i / per_row, part = i - r * per_row;
    uint64_t dst;
    if (!dst_row(a, r, dst)) continue;
    reinterpret_cast<uint4*>(a.dst_rows[w] + dst * a.stride[w])[part] =
        reinterpret_cast<const uint4*>(a.rows[w] + uint64_t(r) * a.stride[w])[part];
    if (part != 0) continue;
    if (a.sb[w] == 4)
      reinterpret_cast<float*>(a.dst_scales[w])[dst] = reinterpret_cast<const float*>(a.scales[w])[r];
    else if (a.sb[w] == 2)
      reinterpret_cast<uint16_t*>(a.dst_scales[w])[dst] = reinterpret_cast<const uint16_t*>(a.scales[w])[r];
  }
  if (w != 0) return;
  for (uint32_t s = tid; s < a.num_seqs; s += nthreads)
    a.lengths[s] = a.start[s] + int64_t(a.prefix[s + 1] - a.prefix[s]);
  for (uint64_t i = tid; i < uint64_t(a.ndef) * a.cols; i += nthreads)
    a.centers[uint64_t(a.def_seq[i / a.cols]) * a.cols + i % a.cols] = a.mu_new[i];
}

template <typename K>
int resident_blocks(K kernel, int threads) {
  int n = 0;
  TQKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0));
  return std::max(n, 1);
}

template <int D, int DT>
void launch_encode(const EncodeArgs& a, int sm_count, cudaStream_t st) {
  static const int per_sm = resident_blocks(encode_kernel<D, DT>, kThreads);
  const uint64_t want = (2 * a.tasks + kWarps - 1) / kWarps;
  const unsigned blocks = static_cast<unsigned>(std::min<uint64_t>(want, uint64_t(per_sm) * uint64_t(sm_count)));
  encode_kernel<D, DT><<<blocks, kThreads, 0, st>>>(a);
  TQKV_CUDA_LAUNCHED("encode_kernel");
}

template <int DT>
void launch_encode_d(uint32_t d, const EncodeArgs& a, int sm_count, cudaStream_t st) {
  switch (d) {
    case 64: return launch_encode<64, DT>(a, sm_count, st);
    case 128: return launch_encode<128, DT>(a, sm_count, st);
    case 256: return launch_encode<256, DT>(a, sm_count, st);
    case 512: return launch_encode<512, DT>(a, sm_count, st);
    default: fail(TQKV_ERROR_INTERNAL, "cuda encode: head_dim " + std::to_string(d));
  }
}

template <int DT>
void launch_mean(const void* k, const uint64_t* prefix, const int32_t* def_seq, uint32_t ndef, uint32_t cols,
                 uint32_t chunks, double* partial, float* mu, cudaStream_t st) {
  const dim3 block(128);
  const uint32_t xblocks = (cols + 127) / 128;
  for (uint32_t first = 0; first < ndef; first += 65535) {  // grid y and z limits
    const uint32_t n = std::min(ndef - first, 65535u);
    mean_partial<DT><<<dim3(xblocks, chunks, n), block, 0, st>>>(k, prefix, def_seq + first, cols, chunks, partial);
    TQKV_CUDA_LAUNCHED("mean_partial");
    mean_final<<<dim3(xblocks, n), block, 0, st>>>(partial, prefix, def_seq + first, cols, chunks,
                                                   mu + size_t(first) * cols);
    TQKV_CUDA_LAUNCHED("mean_final");
  }
}

size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

float input_value(const void* base, tqkv_dtype dtype, uint64_t i) {
  // Error path only: one element of the caller's input, wherever it lives.
  const size_t es = dtype == TQKV_DTYPE_F32 ? 4 : 2;
  uint8_t b[4] = {0, 0, 0, 0};
  const uint8_t* src = static_cast<const uint8_t*>(base) + i * es;
  if (on_device(base)) {
    if (cudaMemcpy(b, src, es, cudaMemcpyDeviceToHost) != cudaSuccess) {
      (void)cudaGetLastError();
      return std::nanf("");
    }
  } else {
    std::memcpy(b, src, es);
  }
  float f = 0;
  cpu::to_f32(dtype, b, 1, &f);
  return f;
}

}  // namespace

void DeviceCache::append(core::Cache& meta, const uint32_t* counts, tqkv_dtype dtype, const void* k, const void* v) {
  // Validation in the order of core::Cache::append_batch, before anything is enqueued.
  if (counts == nullptr) invalid("counts: NULL; must point to num_seqs token counts");
  uint64_t total = 0;
  for (uint32_t s = 0; s < seqs_; ++s) total += counts[s];
  if (dtype != TQKV_DTYPE_F32 && dtype != TQKV_DTYPE_F16 && dtype != TQKV_DTYPE_BF16)
    invalid("dtype: " + std::to_string(int(dtype)) + " is not an input type; allowed: 0 (f32), 1 (f16), 2 (bf16)");
  if (total > 0 && k == nullptr) invalid("k: NULL; must point to the new keys");
  if (total > 0 && v == nullptr) invalid("v: NULL; must point to the new values");
  for (uint32_t s = 0; s < seqs_; ++s) meta.check_room(s, counts[s]);
  if (total == 0) return;
  if (total * hkv_ * (std::max(k_.stride, v_.stride) / 16) >= (1ull << 32))
    fail(TQKV_ERROR_UNSUPPORTED, "append: " + std::to_string(total) + " tokens x " + std::to_string(hkv_) +
                                     " kv heads is too much for one call (2^32 16-byte row pieces); split it");

  auto st = static_cast<cudaStream_t>(stream_);
  const size_t es = dtype == TQKV_DTYPE_F32 ? 4 : 2;
  const uint64_t R = total * hkv_;
  const size_t in_bytes = size_t(R) * d_ * es;
  const uint32_t cols = hkv_ * d_;

  // Per-append tables: token offsets, lengths before the append, key-mean sources.
  std::vector<uint64_t> prefix(seqs_ + 1, 0);
  std::vector<int64_t> start(seqs_);
  std::vector<int32_t> center(seqs_, -1), def_seq;
  uint64_t max_def_tokens = 0;
  for (uint32_t s = 0; s < seqs_; ++s) {
    prefix[s + 1] = prefix[s] + counts[s];
    start[s] = meta.length(s);
    if (!fmt::is_tq(k_.type)) continue;  // dense K is stored as it is
    if (meta.k_center(s) != nullptr) {
      center[s] = -2;
    } else if (counts[s] > 0 && meta.defines_center(s)) {
      center[s] = static_cast<int32_t>(def_seq.size());
      def_seq.push_back(static_cast<int32_t>(s));
      max_def_tokens = std::max<uint64_t>(max_def_tokens, counts[s]);
    }
  }
  const uint32_t ndef = static_cast<uint32_t>(def_seq.size());
  const uint32_t chunks = static_cast<uint32_t>((max_def_tokens + kMeanChunk - 1) / kMeanChunk);
  if (chunks > 65535) fail(TQKV_ERROR_UNSUPPORTED, "append: a first append of more than 16776960 tokens to one "
                                                   "sequence with k_center FIRST_APPEND is not supported on CUDA");
  bool centered = false;
  for (uint32_t s = 0; s < seqs_; ++s) centered = centered || center[s] != -1;

  // staging_ layout; every part 256-byte aligned. Input in host memory, or device memory not
  // aligned for vector loads, is copied in first.
  const bool copy_in[2] = {!on_device(k) || reinterpret_cast<uintptr_t>(k) % 16 != 0,
                           !on_device(v) || reinterpret_cast<uintptr_t>(v) % 16 != 0};
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off = align_up(off + bytes, 256);
    return at;
  };
  const size_t o_in[2] = {copy_in[0] ? take(in_bytes) : 0, copy_in[1] ? take(in_bytes) : 0};
  // Everything the kernels read from the host goes up in one copy: sequence tables, key-mean
  // sources, quantization tables.
  std::vector<uint8_t> tab;
  auto put = [&](const void* src, size_t bytes) {
    const size_t at = align_up(tab.size(), 16);
    tab.resize(at + bytes);
    if (bytes) std::memcpy(tab.data() + at, src, bytes);
    return at;
  };
  const size_t t_prefix = put(prefix.data(), prefix.size() * sizeof(uint64_t));
  const size_t t_start = put(start.data(), start.size() * sizeof(int64_t));
  const size_t t_center = put(center.data(), center.size() * sizeof(int32_t));
  const size_t t_def = put(def_seq.data(), def_seq.size() * sizeof(int32_t));
  // The error keys start at "no error" with the tables: no separate memset on the stream.
  const unsigned long long no_error[2] = {kNoError, kNoError};
  const size_t t_flags = put(no_error, sizeof no_error);
  const Lut* luts[2] = {nullptr, nullptr};
  size_t t_lut[2] = {0, 0};
  for (int w = 0; w < 2; ++w) {
    const core::Plane& hp = meta.plane(w);
    if (!fmt::is_tq(hp.type)) continue;
    luts[w] = &lut_for(hp.codec.cb, d_);
    t_lut[w] = put(luts[w]->cells.data(), luts[w]->cells.size());
  }
  const size_t o_tab = take(tab.size());
  const size_t o_partial = take(size_t(std::min(ndef, 65535u)) * chunks * cols * sizeof(double));
  const size_t o_mu = take(size_t(ndef) * cols * sizeof(float));
  const DevPlane* planes[2] = {&k_, &v_};
  size_t o_rows[2], o_scales[2];
  for (int w = 0; w < 2; ++w) {
    o_rows[w] = take(size_t(R) * planes[w]->stride);
    o_scales[w] = take(size_t(R) * fmt::scale_bytes(planes[w]->type, planes[w]->scale_f16));
  }
  if (off > staging_bytes_) {
    TQKV_CUDA_CHECK(cudaStreamSynchronize(st));  // earlier work on the stream may still read it
    grow(staging_, staging_bytes_, off, false, "append staging");
  }
  uint8_t* stage = static_cast<uint8_t*>(staging_);
  auto* flags = reinterpret_cast<unsigned long long*>(stage + o_tab + t_flags);
  // Pinned: the tables going up, then the error keys and new key means coming back.
  const size_t h_flags = align_up(tab.size(), 16), h_mu = h_flags + sizeof no_error;
  uint8_t* host = host_stage(h_mu + size_t(ndef) * cols * sizeof(float));
  std::memcpy(host, tab.data(), tab.size());
  const float* mu_host = reinterpret_cast<const float*>(host + h_mu);

  try {
    const void* in[2] = {k, v};
    for (int w = 0; w < 2; ++w)
      if (copy_in[w]) {
        TQKV_CUDA_CHECK(cudaMemcpyAsync(stage + o_in[w], in[w], in_bytes, cudaMemcpyDefault, st));
        in[w] = stage + o_in[w];
      }
    TQKV_CUDA_CHECK(cudaMemcpyAsync(stage + o_tab, host, tab.size(), cudaMemcpyHostToDevice, st));
    const uint8_t* dtab = stage + o_tab;
    const auto* d_prefix = reinterpret_cast<const uint64_t*>(dtab + t_prefix);
    const auto* d_def = reinterpret_cast<const int32_t*>(dtab + t_def);
    auto* d_mu = reinterpret_cast<float*>(stage + o_mu);
    if (ndef > 0) {
      auto* partial = reinterpret_cast<double*>(stage + o_partial);
      switch (dtype) {
        case TQKV_DTYPE_F32: launch_mean<TQKV_DTYPE_F32>(in[0], d_prefix, d_def, ndef, cols, chunks, partial, d_mu, st); break;
        case TQKV_DTYPE_F16: launch_mean<TQKV_DTYPE_F16>(in[0], d_prefix, d_def, ndef, cols, chunks, partial, d_mu, st); break;
        default: launch_mean<TQKV_DTYPE_BF16>(in[0], d_prefix, d_def, ndef, cols, chunks, partial, d_mu, st); break;
      }
    }

    EncodeArgs ea;
    ea.rows = R;
    const uint32_t rpw = d_ == 64 ? Geo<64>::RPW : d_ == 128 ? Geo<128>::RPW : d_ == 256 ? Geo<256>::RPW : Geo<512>::RPW;
    ea.tasks = (R + rpw - 1) / rpw;
    ea.hkv = hkv_;
    ea.num_seqs = seqs_;
    ea.centered = centered;
    ea.prefix = d_prefix;
    ea.center = reinterpret_cast<const int32_t*>(dtab + t_center);
    ea.centers = centers_;
    ea.mu_new = d_mu;
    ea.signs = signs_;
    ea.inv_sqrt_d = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d_)));
    ea.sqrt_d = std::sqrt(static_cast<double>(d_));
    ea.flags = flags;
    CommitArgs ca;
    for (int w = 0; w < 2; ++w) {
      const DevPlane& p = *planes[w];
      ea.in[w] = in[w];
      PlaneArgs& pa = ea.plane[w];
      pa.bits = fmt::is_tq(p.type) ? p.type : 0;
      pa.stride = static_cast<uint32_t>(p.stride);
      pa.lsq = p.lsq;
      pa.scale_f16 = p.scale_f16;
      pa.boundaries = p.boundaries;
      pa.centroids = p.centroids;
      if (luts[w]) {
        pa.lut = dtab + t_lut[w];
        pa.lut_size = static_cast<uint32_t>(luts[w]->cells.size());
        pa.lut_off = luts[w]->off;
        pa.lut_scale = luts[w]->scale;
      }
      pa.rows = stage + o_rows[w];
      pa.scales = stage + o_scales[w];
      ca.rows[w] = pa.rows;
      ca.scales[w] = pa.scales;
      ca.dst_rows[w] = p.data;
      ca.dst_scales[w] = static_cast<uint8_t*>(p.scales);
      ca.stride[w] = pa.stride;
      ca.sb[w] = static_cast<uint32_t>(fmt::scale_bytes(p.type, p.scale_f16));
    }
    switch (dtype) {
      case TQKV_DTYPE_F32: launch_encode_d<TQKV_DTYPE_F32>(d_, ea, sm_count_, st); break;
      case TQKV_DTYPE_F16: launch_encode_d<TQKV_DTYPE_F16>(d_, ea, sm_count_, st); break;
      default: launch_encode_d<TQKV_DTYPE_BF16>(d_, ea, sm_count_, st); break;
    }

    ca.nrows = static_cast<uint32_t>(R);
    ca.hkv = hkv_;
    ca.cap = cap_;
    ca.num_seqs = seqs_;
    ca.ring = meta.ring();
    ca.prefix = d_prefix;
    ca.start = reinterpret_cast<const int64_t*>(dtab + t_start);
    ca.def_seq = d_def;
    ca.ndef = ndef;
    ca.cols = cols;
    ca.mu_new = d_mu;
    ca.centers = centers_;
    ca.lengths = lengths_;
    ca.flags = flags;
    const uint64_t chunks = R * (std::max(k_.stride, v_.stride) / 16);
    const auto cblocks = static_cast<unsigned>(std::min<uint64_t>((chunks + 255) / 256, uint64_t(sm_count_) * 16));
    commit_kernel<<<dim3(cblocks, 2), 256, 0, st>>>(ca);
    TQKV_CUDA_LAUNCHED("commit_kernel");

    TQKV_CUDA_CHECK(cudaMemcpyAsync(host + h_flags, flags, sizeof no_error, cudaMemcpyDeviceToHost, st));
    if (ndef > 0)
      TQKV_CUDA_CHECK(cudaMemcpyAsync(host + h_mu, d_mu, size_t(ndef) * cols * sizeof(float), cudaMemcpyDeviceToHost, st));
    TQKV_CUDA_CHECK(cudaStreamSynchronize(st));
  } catch (...) {
    // Nothing may still be reading the host tables or writing mu_host once they are gone.
    (void)cudaStreamSynchronize(st);
    (void)cudaGetLastError();
    throw;
  }

  unsigned long long key[2];
  std::memcpy(key, host + h_flags, sizeof key);
  if (key[0] != kNoError || key[1] != kNoError) {
    // Report the error of the earliest sequence, K before V (the CPU path's order).
    auto where = [&](unsigned long long kk, uint64_t& flat, uint32_t& s) {
      flat = kk & ((1ull << kKindShift) - 1);
      const uint64_t g = flat / d_ / hkv_;
      s = static_cast<uint32_t>(std::upper_bound(prefix.begin(), prefix.end(), g) - prefix.begin() - 1);
    };
    int w = key[0] != kNoError ? 0 : 1;
    if (key[0] != kNoError && key[1] != kNoError) {
      uint64_t f0, f1;
      uint32_t s0, s1;
      where(key[0], f0, s0);
      where(key[1], f1, s1);
      w = s1 < s0 ? 1 : 0;
    }
    uint64_t flat;
    uint32_t s;
    where(key[w], flat, s);
    const auto kind = static_cast<ErrorKind>(key[w] >> kKindShift);
    const uint64_t g = flat / d_ / hkv_;
    const std::string name = w == 0 ? "k" : "v";
    const std::string tok = std::to_string(g - prefix[s]), head = std::to_string(flat / d_ % hkv_),
                      coord = std::to_string(flat % d_), seq = std::to_string(s);
    const std::string at = " at token " + tok + ", kv head " + head + ", coordinate " + coord + " of sequence " + seq;
    const std::string row = " of token " + tok + ", kv head " + head + " of sequence " + seq;
    const float x = kind <= kDenseOverflow ? input_value(w == 0 ? k : v, dtype, flat) : 0.0f;
    switch (kind) {
      case kNonFinite:
        fail(TQKV_ERROR_NON_FINITE, name + ": non-finite value " + std::to_string(x) + at + "; nothing was appended");
      case kDenseOverflow:
        fail(TQKV_ERROR_NON_FINITE, name + ": value " + std::to_string(x) + at +
                                        " overflows the f16 cache (largest finite f16 is 65504); nothing was appended");
      case kScaleF16:
        fail(TQKV_ERROR_NON_FINITE, name + ": row scale" + row +
                                        " overflows the f16 scale type (largest 65504); use f32 scales; nothing was "
                                        "appended");
      default:
        fail(TQKV_ERROR_NON_FINITE, name + ": row scale" + row + " is not representable as f32; nothing was appended");
    }
  }

  // The device already holds the new rows, lengths and key means (commit_kernel); the host
  // bookkeeping follows. If it threw, the device is brought back in line with the host.
  try {
    for (uint32_t i = 0; i < ndef; ++i)
      meta.set_k_center(uint32_t(def_seq[i]), mu_host + size_t(i) * cols);
    for (uint32_t s = 0; s < seqs_; ++s)
      if (counts[s]) meta.advance(s, counts[s]);
  } catch (...) {
    push_state(meta);
    throw;
  }
  core::counters().cuda_rows_encoded += R * 2;
}

}  // namespace tqkv::cuda
