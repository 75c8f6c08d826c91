// GPU encoder kernels: every check and every row of an append in one pass over the input, and
// the block that decides whether the append lands (cuda/encode.h has the pipeline).
//
// Encoding and deciding afterwards reads the input once; a separate check pass before encoding
// would read it twice, and the input is most of the traffic (bf16 K/V against 4-bit rows).
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
#include <atomic>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "core/codec_ref.h"
#include "core/error.h"
#include "core/format.h"
#include "cuda/check.cuh"
#include "cuda/encode.h"
#include "cuda/quant_table.h"
#include "cuda/warp_fwht.cuh"

namespace tqkv::cuda::enc {
namespace {

constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr int kWarps = 8;  // warps per encode block
constexpr int kThreads = kWarps * 32;

// VPL values per lane (d/VPL lanes per row, 32/(d/VPL) rows per warp). Appends that fill the GPU
// take 32, so that most butterfly stages are in registers and the work done once per row (norm,
// scale, reductions), which every lane of the row repeats, is shared by many values: against 16
// values per lane this measured 12% faster at d = 128 and 10% at d = 256 on an H100; against 8 at
// d = 64, 34%. Small appends (a decode step) take kSmallV: a warp then encodes fewer rows with
// shorter chains, and the append's latency is one warp's task (values_per_lane decides).
template <int D, int VPL = 32>
struct Geo {
  static_assert(D / VPL >= 1 && D / VPL <= 32, "lanes per row");
  static constexpr int LANES = D / VPL;
  static constexpr int V = VPL;
  static constexpr int RPW = 32 / LANES;  // rows per warp
};
template <int D>
constexpr int kSmallV = D == 512 ? 16 : 8;  // at most 32 lanes per row

// The per-append tables wherever they are, and the lengths before the append (start: the
// device lengths, or a shared-memory copy of them). t must be the kernel's __grid_constant__
// parameter (or live in device memory): the addresses of its arrays then point into parameter space.
struct TabView {
  const uint64_t* prefix;
  const int64_t* start;
  const int32_t* center;
  const int32_t* def_seq;
};
__device__ __forceinline__ TabView view(const Tables& t, const int64_t* lengths) {
  if (t.inline_tabs) return {t.in.prefix, lengths, t.in.center, t.in.def_seq};
  return {t.prefix, lengths, t.center, t.def_seq};
}

__device__ __forceinline__ uint32_t seq_of(const uint64_t* prefix, uint32_t num_seqs, uint64_t token) {
  // Last s with prefix[s] <= token; empty sequences before it are skipped by construction.
  if (num_seqs == 1) return 0;
  uint32_t lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const uint32_t mid = (lo + hi + 1) / 2;
    if (prefix[mid] <= token) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Whether this block posted an error key (the encoder's prologue clears it): a one-block append
// that posted none decides without reading the keys back.
__device__ __forceinline__ int& block_posted() {
  __shared__ int posted;
  return posted;
}

__device__ __forceinline__ void post(unsigned long long* flag, unsigned long long kind, uint64_t flat) {
  atomicMin(flag, (kind << kKindShift) | flat);
  atomicOr(&block_posted(), 1);  // atomic: several threads may post at once (errors only)
}

// Destination row of input row r (token-major: r = token * hkv + head): kWrite, kSkip when a
// later token of the same append takes its ring slot (the CPU path writes both in order; here
// only the survivor is written), or kPastCapacity past a linear cache's capacity (pos: the position).
// 32-bit index arithmetic: R < 2^31 rows per append (append() checks). g: r's token, r / hkv.
enum Dst { kWrite, kSkip, kPastCapacity };
__device__ __forceinline__ Dst dst_row(const TabView& tv, uint32_t num_seqs, uint32_t hkv, uint32_t cap, bool ring,
                                       uint32_t r, uint32_t g, uint64_t& dst, int64_t& pos) {
  const uint32_t s = seq_of(tv.prefix, num_seqs, g);
  const uint32_t t = g - uint32_t(tv.prefix[s]), n = uint32_t(tv.prefix[s + 1] - tv.prefix[s]);
  if (ring && n - t > cap) return kSkip;
  pos = tv.start[s] + int64_t(t);
  if (!ring && pos >= int64_t(cap)) return kPastCapacity;
  const uint32_t slot = ring ? static_cast<uint32_t>(pos % cap) : static_cast<uint32_t>(pos);
  dst = fmt::row_index(s, r - g * hkv, slot, hkv, cap);
  return kWrite;
}


// The token of input row r (r < 2^31): a multiply-high instead of a division.
__device__ __forceinline__ uint32_t token_of(const EncodeArgs& a, uint64_t r) {
  return a.hkv == 1 ? uint32_t(r) : __umulhi(uint32_t(r), a.hkv_mul) >> a.hkv_shift;
}

// Where encode_kernel writes row r: its slot (direct) or its scratch row. False: write nothing
// (a capacity error is posted once per row).
__device__ __forceinline__ bool out_row(const EncodeArgs& a, const TabView& tv, int w, uint64_t r, int gl,
                                        uint64_t& at) {
  if (!a.direct) {
    at = r;
    return true;
  }
  int64_t pos = 0;
  const Dst d = dst_row(tv, a.num_seqs, a.hkv, a.cap, a.ring, uint32_t(r), token_of(a, r), at, pos);
  if (d == kPastCapacity && gl == 0) post(a.fin.state->flags + w, kCapacity, r * a.fin.d);
  return d == kWrite;
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
  static_assert(NB == 1 || NB == 2 || NB == 4 || NB == 8 || NB % 16 == 0, "store size");
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
// value (there may be none: finite values can overflow the rotation, which the caller reports
// as kRotation, a kind that a non-finite input outranks).
template <int DT, int V>
__device__ void report_non_finite(const EncodeArgs& a, int w, uint64_t r, int gl, int d) {
  float x[V];
  load_values<DT, V>(a.in[w], r * d + uint64_t(gl) * V, x);
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (!isfinite(x[j])) {
      post(a.fin.state->flags + w, kNonFinite, r * d + uint64_t(gl) * V + j);
      break;
    }
}

// This lane's VPL input values of row r (zero for a row past the end).
template <int D, int DT, int VPL>
__device__ __forceinline__ void row_values(const EncodeArgs& a, int w, uint64_t r, bool valid, int gl,
                                           float (&x)[VPL]) {
  if (valid) {
    load_values<DT, VPL>(a.in[w], r * D + uint64_t(gl) * VPL, x);
  } else {
#pragma unroll
    for (int j = 0; j < VPL; ++j) x[j] = 0.0f;
  }
}

// One TQ row per lane group: rotate, norm, quantize, scale, pack; all lanes of the warp call it
// (shuffles), `valid` says whether this group's row exists. x: the row's values when `loaded`
// (the kernel loads its first task's before its prologue's barrier), else filled here.
template <int D, int DT, int VPL, int BITS>
__device__ __forceinline__ void encode_tq(const EncodeArgs& a, const TabView& tv, int w, uint64_t r, bool valid,
                                          int gl, uint32_t signs, const float* sb, const double* sc,
                                          const uint8_t* slut, float (&x)[VPL], bool loaded) {
  constexpr int V = Geo<D, VPL>::V, LANES = Geo<D, VPL>::LANES;
  const PlaneArgs& p = a.plane[w];
  if (!loaded) row_values<D, DT, VPL>(a, w, r, valid, gl, x);
  if (w == 0 && a.centered && valid) {
    const uint32_t g = token_of(a, r);
    const uint32_t s = seq_of(tv.prefix, a.num_seqs, g);
    const int32_t src = tv.center[s];
    if (src != -1) {
      const float* mu = (src == -2 ? a.centers + size_t(s) * a.hkv * D : a.fin.mu_new + size_t(src) * a.hkv * D) +
                        size_t(uint32_t(r) - g * a.hkv) * D + gl * V;
      // 16-byte loads (mu is 16-byte aligned: cudaMalloc'd or 256-byte staging, rows of d floats):
      // scalar ones touched 4x the L1 wavefronts and made a centered append ~1.7x slower.
#pragma unroll
      for (int i = 0; i < V / 4; ++i) {
        const float4 m = __ldg(reinterpret_cast<const float4*>(mu) + i);
        x[4 * i] -= m.x;
        x[4 * i + 1] -= m.y;
        x[4 * i + 2] -= m.z;
        x[4 * i + 3] -= m.w;
      }
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
    if (valid && !isfinite(n2)) {
      report_non_finite<DT, V>(a, w, r, gl, D);
      if (gl == 0) post(a.fin.state->flags + w, kRotation, r * D);
    }
  const double norm = sqrt(n2);
  // A row that failed above is encoded as a zero row (the append is refused anyway), so that its
  // NaN scale posts no second error that would outrank kRotation.
  const bool zero = !(norm >= core::kMinNorm && norm < double(INFINITY));
  const float inv = zero ? 0.0f : static_cast<float>(a.sqrt_d / norm);
  // Quantize, accumulate <y,c> and <c,c>, and pack, in one pass over the lane's values.
  constexpr int kPerWord = BITS == 3 ? 32 : 32 / BITS, kWords = BITS == 3 ? 3 : (V + kPerWord - 1) / kPerWord;
  uint32_t words[kWords];
#pragma unroll
  for (int i = 0; i < kWords; ++i) words[i] = 0;
  double yc = 0, cc = 0;
  // 1.5 * 2^23 + the table's offset + this plane's table in slut (both planes' tables, one array
  // at a fixed shared address): t below is a float whose low mantissa bits are the cell's index
  // in slut (exact: far below 2^24), so a lookup needs no add to find its plane's table.
  const uint32_t lut_first = uint32_t(w) * kLutMax;
  const float magic = 12582912.0f + float(p.lut_off + lut_first);
  const uint32_t lut_last = lut_first + p.lut_size - 1;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    // A zero row takes the index of 0, as on the CPU: inv is 0 there, and its values are finite
    // (x * 0 = +-0) unless the row is refused (a non-finite input or rotation, reported above),
    // whose bytes are never read: NaN u then lands on the table's last cell.
    const float u = x[j] * inv;
    // round(u * 2^e) exactly (the fused add rounds to an integer once; a tie may round either
    // way, which the table allows), then the cell's count of lower boundaries and one
    // comparison: core::quantize's index. The table spans |u| <= sqrt(d) * 1.001 + 1
    // (quant_table.cpp), so only NaN needs the clamp.
    const float t = fmaf(u, p.lut_scale, magic);
    const uint32_t cell = min(uint32_t(__float_as_int(t) - 0x4B400000), lut_last);
    // Three small loads that hit few distinct words (no bank conflicts); one 16-byte table entry
    // holding boundary and both centroids measured 3% slower (its loads conflict).
    const uint32_t lo = slut[cell];
    const uint32_t idx = lo + (u > sb[lo] ? 1u : 0u);
    const double c = sc[idx];
    yc += double(x[j]) * c;
    cc += c * c;
    if constexpr (BITS == 3) {
#pragma unroll
      for (int b = 0; b < 3; ++b) words[b] |= ((idx >> b) & 1u) << j;  // three bit planes
    } else {
      // Little-endian fields; + rather than | (the fields are disjoint and idx < 2^BITS), so that
      // shift and add are one instruction (lea).
      words[j / kPerWord] += idx << ((j % kPerWord) * BITS);
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
  uint64_t at = r;
  if (!valid || !out_row(a, tv, w, r, gl, at)) return;
  uint8_t* row = p.rows + at * p.stride;
  if (gl == 0) {
    const float sf = zero ? 0.0f : static_cast<float>(s);
    if (!isfinite(sf)) post(a.fin.state->flags + w, kScaleF32, r * D);
    if (p.scale_f16) {
      const uint16_t h = __half_as_ushort(__float2half_rn(sf));
      if ((h & 0x7C00u) == 0x7C00u && isfinite(sf)) post(a.fin.state->flags + w, kScaleF16, r * D);
      reinterpret_cast<uint16_t*>(p.scales)[at] = h;
    } else {
      reinterpret_cast<float*>(p.scales)[at] = sf;
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
template <int D, int DT, int VPL>
__device__ __forceinline__ void encode_f16(const EncodeArgs& a, const TabView& tv, int w, uint64_t r, bool valid,
                                           int gl) {
  constexpr int V = Geo<D, VPL>::V;
  uint64_t at = r;
  if (!valid || !out_row(a, tv, w, r, gl, at)) return;
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
  if (bad_nf != kNoError) post(a.fin.state->flags + w, kNonFinite, bad_nf);
  if (bad_of != kNoError) post(a.fin.state->flags + w, kDenseOverflow, bad_of);
  store_bytes<V * 2>(a.plane[w].rows + at * a.plane[w].stride + gl * V * 2, words);
}

// Grids that decide count their blocks in 16 bits of State::ticket (decide); they are far smaller
// (resident blocks only), which the launchers check.
constexpr unsigned kMaxDecideBlocks = 1u << 16;

// The append's new lengths and key means (the deciding block, no error key set).
__device__ __forceinline__ void commit_lengths(const Finish& f, const TabView& tv, uint32_t num_seqs) {
  for (uint32_t s = threadIdx.x; s < num_seqs; s += blockDim.x)
    f.lengths[s] = tv.start[s] + int64_t(tv.prefix[s + 1] - tv.prefix[s]);
  for (uint64_t i = threadIdx.x; i < uint64_t(f.ndef) * f.cols; i += blockDim.x)
    f.centers[uint64_t(tv.def_seq[i / f.cols]) * f.cols + i % f.cols] = f.mu_new[i];
}

// The block that finishes last (blocks: the grid's size) commits the append, or records its
// failure; then it makes State ready for the next append. Every thread of every block calls it.
// own_keys: every error key of this append was posted by this kernel (block_posted tracks them).
__device__ void decide(const Finish& f, const TabView& tv, uint32_t num_seqs, uint32_t hkv, unsigned blocks,
                       bool own_keys) {
  __shared__ bool last, clean;
  __syncthreads();
  if (blocks == 1 && own_keys && block_posted() == 0) {  // nothing to read back, nothing to reset
    commit_lengths(f, tv, num_seqs);
    return;
  }
  State* st = f.state;
  // A grid of one block (a decode step at batch 1) decides without a ticket: the fences and the
  // atomic round trip were a third of such an append's time.
  if (blocks > 1) {
    if (threadIdx.x == 0) {
      __threadfence();  // this block's rows and error keys before its ticket
      // The ticket counts the blocks in its low 16 bits (grids stay far below 2^16 blocks) and,
      // when every key is this kernel's, the blocks that posted one above them: then the last
      // block knows without reading the keys back whether any was set.
      const unsigned add = 1u + (own_keys && block_posted() != 0 ? 0x10000u : 0u);
      const unsigned t = atomicAdd(&st->ticket, add) + add;
      last = (t & 0xFFFFu) == blocks;
      clean = own_keys && (t >> 16) == 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (clean) {
      commit_lengths(f, tv, num_seqs);
      if (threadIdx.x == 0) st->ticket = 0;  // every block has counted itself; the keys are untouched
      return;
    }
  }
  const unsigned long long k0 = atomicOr(&st->flags[0], 0ull), k1 = atomicOr(&st->flags[1], 0ull);
  if (k0 == kNoError && k1 == kNoError) {
    commit_lengths(f, tv, num_seqs);
  } else if (threadIdx.x == 0) {
    // The error of the earliest sequence, K before V (the CPU path's order).
    constexpr unsigned long long kFlat = (1ull << kKindShift) - 1;
    const uint32_t s0 = k0 == kNoError ? ~0u : seq_of(tv.prefix, num_seqs, (k0 & kFlat) / f.d / hkv);
    const uint32_t s1 = k1 == kNoError ? ~0u : seq_of(tv.prefix, num_seqs, (k1 & kFlat) / f.d / hkv);
    const bool k_first = k0 != kNoError && s0 <= s1;
    const unsigned long long key = k_first ? k0 : k1, flat = key & kFlat;
    const uint32_t seq = k_first ? s0 : s1;
    st->failed = f.serial;
    st->rows_back += f.rows2;
    st->w = k_first ? 0u : 1u;
    st->kind = unsigned(key >> kKindShift);
    st->seq = seq;
    st->token = flat / f.d / hkv - tv.prefix[seq];
    st->head = unsigned(flat / f.d % hkv);
    st->coord = unsigned(flat % f.d);
    st->flat = st->kind == kCapacity ? uint64_t(tv.start[seq]) + st->token : flat;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    st->flags[0] = st->flags[1] = kNoError;
    st->ticket = 0;
  }
}

// After a failed append nothing lands until the host has read the failure. counts: this kernel
// would have decided, so it counts the skipped append. failed: State::failed as failed_now read
// it (it does not change while an append kernel runs: only a deciding block or the host sets it).
__device__ __forceinline__ unsigned failed_now(const Finish& f) {
  return *static_cast<volatile unsigned*>(&f.state->failed);
}
__device__ __forceinline__ bool skipped(const Finish& f, bool counts, unsigned failed) {
  if (failed == 0) return false;
  if (counts && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) {
    atomicAdd(&f.state->dropped, 1u);
    atomicAdd(&f.state->rows_back, static_cast<unsigned long long>(f.rows2));
  }
  return true;
}

// The input row of lane group `group` in warp task `task` (RPW rows per warp); w: its plane (0 K,
// 1 V), warp-uniform: K and V tasks never share a warp.
template <int RPW>
__device__ __forceinline__ uint64_t task_row(const EncodeArgs& a, uint64_t task, int group, int& w) {
  w = task >= a.tasks ? 1 : 0;
  return (task - (w ? a.tasks : 0)) * RPW + group;
}

// Two blocks per SM: 128 registers for 32 values per lane.
template <int D, int DT, int VPL>
__global__ void __launch_bounds__(kThreads, 2) encode_kernel(const __grid_constant__ EncodeArgs a) {
  using G = Geo<D, VPL>;
  // The first task's input, State::failed and the tables are all requested before anything
  // waits for one of them: a small append's time is mostly such round trips.
  const unsigned failed = failed_now(a.fin);
  const int lane = threadIdx.x & 31, gl = lane % G::LANES, group = lane / G::LANES;
  const uint64_t first = uint64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  float x[G::V];
  bool loaded = false;
  if (first < 2 * a.tasks) {
    int w;
    const uint64_t r = task_row<G::RPW>(a, first, group, w);
    loaded = a.plane[w].bits != 0;  // dense planes load their own
    if (loaded) row_values<D, DT, VPL>(a, w, r, r < a.rows, gl, x);
  }
  TabView tv = view(a.tabs, a.fin.lengths);
  // Inline tables move to shared memory: rows look up their sequence there (parameter space
  // read through a generic pointer is slow for per-lane indices).
  __shared__ uint64_t s_prefix[kTabSeqs + 1];
  __shared__ int64_t s_start[kTabSeqs];
  __shared__ int32_t s_center[kTabSeqs];
  if (a.tabs.inline_tabs) {
    for (uint32_t i = threadIdx.x; i <= a.num_seqs; i += blockDim.x) {
      s_prefix[i] = tv.prefix[i];
      if (i < a.num_seqs) {
        s_start[i] = tv.start[i];  // the device lengths: every block reads them before the last decides
        s_center[i] = tv.center[i];
      }
    }
    tv.prefix = s_prefix;
    tv.start = s_start;
    tv.center = s_center;
  }
  __shared__ float s_b[2][256];  // boundaries, then +inf (the table's last comparison)
  __shared__ double s_c[2][256];
  __shared__ uint8_t s_lut[2 * kLutMax];  // plane w's table at w * kLutMax (encode_tq)
  for (int w = 0; w < 2; ++w) {
    const PlaneArgs& p = a.plane[w];
    if (p.bits == 0) continue;
    const int levels = 1 << p.bits;
    for (int i = threadIdx.x; i < levels; i += blockDim.x) {
      s_c[w][i] = p.centroids[i];
      s_b[w][i] = i < levels - 1 ? p.boundaries[i] : INFINITY;
    }
    for (uint32_t i = threadIdx.x; i < p.lut_size; i += blockDim.x) s_lut[w * kLutMax + i] = p.lut[i];
  }
  if (skipped(a.fin, a.direct, failed)) return;  // the same value in every thread of the grid
  if (threadIdx.x == 0) block_posted() = 0;
  __syncthreads();
  // Bit j: coordinate gl * V + j is negated (V divides 32).
  const uint32_t signs =
      (a.sign_bits[gl * G::V / 32] >> (gl * G::V % 32)) & (G::V == 32 ? ~0u : (1u << G::V) - 1u);
  const uint64_t warps = uint64_t(gridDim.x) * kWarps;
  for (uint64_t task = first; task < 2 * a.tasks; task += warps, loaded = false) {
    int w;
    const uint64_t r = task_row<G::RPW>(a, task, group, w);
    const bool valid = r < a.rows;
    auto tq = [&](auto bits) {
      encode_tq<D, DT, VPL, decltype(bits)::value>(a, tv, w, r, valid, gl, signs, s_b[w], s_c[w], s_lut, x, loaded);
    };
    switch (a.plane[w].bits) {
      case 2: tq(std::integral_constant<int, 2>{}); break;
      case 3: tq(std::integral_constant<int, 3>{}); break;
      case 4: tq(std::integral_constant<int, 4>{}); break;
      case 8: tq(std::integral_constant<int, 8>{}); break;
      default: encode_f16<D, DT, VPL>(a, tv, w, r, valid, gl); break;
    }
  }
  if (a.direct) decide(a.fin, tv, a.num_seqs, a.hkv, gridDim.x, true);
}

// Key means, summed in double per (kv head, coordinate) like Cache::encode: each partial sums up
// to kMeanChunk tokens in order, the final pass adds the partials in order. first: the first
// defining sequence of this launch (grid limits).
template <int DT>
__global__ void mean_partial(const __grid_constant__ MeanArgs m, uint32_t first) {
  const uint32_t col = blockIdx.x * blockDim.x + threadIdx.x, ch = blockIdx.y, di = first + blockIdx.z;
  if (col >= m.cols) return;
  const TabView tv = view(m.tabs, nullptr);
  const uint32_t s = uint32_t(tv.def_seq[di]);
  const uint64_t t0 = tv.prefix[s] + uint64_t(ch) * kMeanChunk, t1 = min(t0 + kMeanChunk, tv.prefix[s + 1]);
  double sum = 0;
#pragma unroll 8
  for (uint64_t t = t0; t < t1; ++t) {
    const uint64_t i = t * m.cols + col;
    float x;
    if constexpr (DT == TQKV_DTYPE_F32) x = static_cast<const float*>(m.k)[i];
    else x = from16<DT>(static_cast<const uint16_t*>(m.k)[i]);
    sum += double(x);
  }
  m.partial[(uint64_t(blockIdx.z) * m.chunks + ch) * m.cols + col] = sum;
}

__global__ void mean_final(const __grid_constant__ MeanArgs m, uint32_t first) {
  const uint32_t col = blockIdx.x * blockDim.x + threadIdx.x, di = first + blockIdx.y;
  if (col >= m.cols) return;
  const TabView tv = view(m.tabs, nullptr);
  const uint32_t s = uint32_t(tv.def_seq[di]);
  const uint64_t n = tv.prefix[s + 1] - tv.prefix[s];
  const uint64_t used = (n + kMeanChunk - 1) / kMeanChunk;
  double sum = 0;
  for (uint64_t ch = 0; ch < used; ++ch) sum += m.partial[(uint64_t(blockIdx.y) * m.chunks + ch) * m.cols + col];
  m.mu[uint64_t(di) * m.cols + col] = static_cast<float>(sum / double(n));
}

// One thread per 16 bytes of a scratch row (blockIdx.y: K or V); the first of a row also moves
// its scale. Many small independent copies keep enough loads in flight.
__global__ void commit_kernel(const __grid_constant__ CommitArgs a) {
  if (skipped(a.fin, true, failed_now(a.fin))) return;
  const TabView tv = view(a.tabs, a.fin.lengths);
  const State* st = a.fin.state;
  // A failed append writes nothing; decide() then records the failure.
  const bool ok = st->flags[0] == kNoError && st->flags[1] == kNoError;
  const int w = blockIdx.y;
  const PlaneArgs& p = a.plane[w];
  const uint32_t tid = blockIdx.x * blockDim.x + threadIdx.x, nthreads = gridDim.x * blockDim.x;
  const uint32_t per_row = p.stride / 16, n = ok ? a.nrows * per_row : 0;
  for (uint32_t i = tid; i < n; i += nthreads) {
    const uint32_t r = i / per_row, part = i - r * per_row;
    uint64_t dst;
    int64_t pos;
    if (dst_row(tv, a.num_seqs, a.hkv, a.cap, a.ring, r, r / a.hkv, dst, pos) != kWrite) continue;  // a ring: never kPastCapacity
    reinterpret_cast<uint4*>(p.dst_rows + dst * p.stride)[part] =
        reinterpret_cast<const uint4*>(p.rows + uint64_t(r) * p.stride)[part];
    if (part != 0) continue;
    if (p.sb == 4)
      reinterpret_cast<float*>(p.dst_scales)[dst] = reinterpret_cast<const float*>(p.scales)[r];
    else if (p.sb == 2)
      reinterpret_cast<uint16_t*>(p.dst_scales)[dst] = reinterpret_cast<const uint16_t*>(p.scales)[r];
  }
  decide(a.fin, tv, a.num_seqs, a.hkv, gridDim.x * gridDim.y, false);
}

// f(std::integral_constant<int, D>) for the encoder's head_dim d, and f(...<int, DT>) for an input
// dtype: the one mapping from runtime values to kernel instances.
template <typename F>
decltype(auto) with_head_dim(uint32_t d, F&& f) {
  switch (d) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
    case 512: return f(std::integral_constant<int, 512>{});
    default: fail(TQKV_ERROR_INTERNAL, "cuda encode: head_dim " + std::to_string(d));
  }
}
template <typename F>
decltype(auto) with_dtype(tqkv_dtype dt, F&& f) {
  switch (dt) {
    case TQKV_DTYPE_F32: return f(std::integral_constant<int, TQKV_DTYPE_F32>{});
    case TQKV_DTYPE_F16: return f(std::integral_constant<int, TQKV_DTYPE_F16>{});
    default: return f(std::integral_constant<int, TQKV_DTYPE_BF16>{});
  }
}

template <typename K>
int resident_blocks(K kernel, int threads) {
  int n = 0;
  TQKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0));
  return std::max(n, 1);
}

template <int D, int DT, int VPL>
int resident_per_sm() {
  static const int per_sm = resident_blocks(encode_kernel<D, DT, VPL>, kThreads);
  return per_sm;
}

template <int D, int DT, int VPL>
void launch_encode_v(const EncodeArgs& a, int sm_count, cudaStream_t st) {
  // Never more blocks than are resident at once: every block must have started (and read State)
  // before the last one to finish decides.
  const uint64_t want = (2 * a.tasks + kWarps - 1) / kWarps;
  const unsigned blocks = static_cast<unsigned>(
      std::min<uint64_t>(want, uint64_t(resident_per_sm<D, DT, VPL>()) * uint64_t(sm_count)));
  if (blocks >= kMaxDecideBlocks) fail(TQKV_ERROR_INTERNAL, "cuda encode: " + std::to_string(blocks) + " blocks");
  TQKV_CUDA_CLEAR_STALE();
  encode_kernel<D, DT, VPL><<<blocks, kThreads, 0, st>>>(a);
  TQKV_CUDA_LAUNCHED("encode_kernel");
}

template <int D, int DT>
void launch_encode_t(const EncodeArgs& a, int sm_count, cudaStream_t st) {
  if (a.vpl == 32) launch_encode_v<D, DT, 32>(a, sm_count, st);
  else if (a.vpl == uint32_t(kSmallV<D>)) launch_encode_v<D, DT, kSmallV<D>>(a, sm_count, st);
  else fail(TQKV_ERROR_INTERNAL, "cuda encode: " + std::to_string(a.vpl) + " values per lane at head_dim " +
                                      std::to_string(D));
}

std::atomic<int>& forced_lanes() {
  static std::atomic<int> forced([] {
    const char* e = std::getenv("TQKV_CUDA_ENCODE_VPL");
    const std::string v = e ? e : "";
    return int(v == "32" ? Lanes::kWide : v == "small" ? Lanes::kNarrow : Lanes::kAuto);
  }());
  return forced;
}

template <int D>
uint32_t values_per_lane_d(tqkv_dtype dt, uint64_t rows, int sm_count) {
  constexpr uint32_t small = kSmallV<D>;
  const int forced = forced_lanes().load(std::memory_order_relaxed);
  if (forced != int(Lanes::kAuto)) return forced == int(Lanes::kWide) ? 32u : small;
  // The small geometry when its tasks (K and V) fill at most half a round of resident warps: the
  // append then takes one short task's time instead of one long one's. (At a full round it was
  // slower on an H100: D = 128, 512 tokens x 8 heads 11.2 against 10.2 us.)
  const int per_sm = with_dtype(dt, [](auto t) { return resident_per_sm<D, decltype(t)::value, kSmallV<D>>(); });
  const uint64_t rpw = Geo<D, kSmallV<D>>::RPW;
  const uint64_t tasks = 2 * ((rows + rpw - 1) / rpw);
  return 2 * tasks <= uint64_t(per_sm) * uint64_t(sm_count) * kWarps ? small : 32u;
}

template <int DT>
void launch_means_t(const MeanArgs& m, cudaStream_t st) {
  const dim3 block(128);
  const uint32_t xblocks = (m.cols + 127) / 128;
  for (uint32_t first = 0; first < m.ndef; first += 65535) {  // grid y and z limits
    const uint32_t n = std::min(m.ndef - first, 65535u);
    TQKV_CUDA_CLEAR_STALE();
    mean_partial<DT><<<dim3(xblocks, m.chunks, n), block, 0, st>>>(m, first);
    TQKV_CUDA_LAUNCHED("mean_partial");
    mean_final<<<dim3(xblocks, n), block, 0, st>>>(m, first);
    TQKV_CUDA_LAUNCHED("mean_final");
  }
}

}  // namespace

uint32_t values_per_lane(uint32_t d, tqkv_dtype dt, uint64_t rows, int sm_count) {
  return with_head_dim(d, [&](auto dd) { return values_per_lane_d<decltype(dd)::value>(dt, rows, sm_count); });
}

uint32_t rows_per_warp(uint32_t d, uint32_t vpl) { return 32 / (d / vpl); }

void force_lanes(Lanes lanes) { forced_lanes().store(int(lanes), std::memory_order_relaxed); }

void launch_means(tqkv_dtype dt, const MeanArgs& m, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  with_dtype(dt, [&](auto t) { launch_means_t<decltype(t)::value>(m, st); });
}

void launch_encode(uint32_t d, tqkv_dtype dt, const EncodeArgs& a, int sm_count, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  with_dtype(dt, [&](auto t) {
    with_head_dim(d, [&](auto dd) { launch_encode_t<decltype(dd)::value, decltype(t)::value>(a, sm_count, st); });
  });
}

void launch_commit(const CommitArgs& a, int sm_count, void* stream) {
  // 256 threads without shared memory: 8 blocks fit an SM, so 2 per SM are resident at once, as
  // decide() needs.
  const uint64_t chunks = uint64_t(a.nrows) * (std::max(a.plane[0].stride, a.plane[1].stride) / 16);
  const auto x = static_cast<unsigned>(
      std::max<uint64_t>(1, std::min<uint64_t>((chunks + 255) / 256, uint64_t(sm_count) * 2)));
  if (2 * x >= kMaxDecideBlocks) fail(TQKV_ERROR_INTERNAL, "cuda commit: " + std::to_string(2 * x) + " blocks");
  TQKV_CUDA_CLEAR_STALE();
  commit_kernel<<<dim3(x, 2), 256, 0, static_cast<cudaStream_t>(stream)>>>(a);
  TQKV_CUDA_LAUNCHED("commit_kernel");
}

}  // namespace tqkv::cuda::enc
