// Per-target building blocks of the SIMD fused loop (included once per Highway target by
// kernel_hwy.cpp, which holds the per-call driver). The specification is process_range_generic
// (kernel_generic.cpp); docs/kernel-notes.md has the measurements behind the choices made here.
//
// Positions are processed in tiles of kTile rows. For a tile,
//   1. every K row is decoded once, in registers, and dotted with all g queries; each
//      (row, head) leaves one vector of partial sums,
//   2. the kN partial vectors of kN rows are reduced together by a transpose-add tree, so one
//      vector holds the logits of kN rows; row scales, softcap, the tile max, exp and the sum
//      are then vector operations, and acc is rescaled only when the reference max moves,
//   3. every V row is decoded once, in registers, and added with weight p * scale_v into the g
//      accumulators.
// Scales never touch the decoded elements: scale_k multiplies the reduced logits, scale_v the
// softmax weight.

#if defined(TQKV_CPU_KERNEL_HWY_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TQKV_CPU_KERNEL_HWY_INL_H_
#undef TQKV_CPU_KERNEL_HWY_INL_H_
#else
#define TQKV_CPU_KERNEL_HWY_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>

#include <hwy/cache_control.h>
#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include "core/format.h"
#include "core/half.h"
#include "cpu/kernel.h"

#ifndef TQKV_CPU_KERNEL_HWY_SCRATCH_
#define TQKV_CPU_KERNEL_HWY_SCRATCH_
namespace tqkv::cpu {
// Per-thread working memory of process_range (~100 KiB: tile partial sums, aligned copies of q
// and acc), shared by all targets; thread-local rather than on the caller's stack.
struct alignas(64) Scratch {
  unsigned char bytes[112 * 1024];
};
inline thread_local Scratch tls_scratch;
}  // namespace tqkv::cpu
#endif

HWY_BEFORE_NAMESPACE();
namespace tqkv::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// At most 16 lanes: the tile transpose and the TQ4/TQ2 16-byte block both assume N <= 16.
using DF = hn::CappedTag<float, 16>;
using DI = hn::RebindToSigned<DF>;
using D8 = hn::Rebind<uint8_t, DF>;
using DH = hn::Rebind<hwy::float16_t, DF>;
using VF = hn::Vec<DF>;
using VI = hn::Vec<DI>;

constexpr uint32_t kN = static_cast<uint32_t>(hn::MaxLanes(DF()));
constexpr uint32_t kTile = 32;  // rows per tile
constexpr uint32_t kGroups = kTile / kN;  // score vectors per head and tile
constexpr uint32_t kMaxG = 16;  // heads per call (RangeTask contract)
#if (HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3) || HWY_ARCH_ARM_A64
constexpr uint32_t kRegs = 32;
#else
constexpr uint32_t kRegs = 16;
#endif
static_assert(kTile % kN == 0, "tile must be a whole number of vectors");

#define TQKV_UNROLL HWY_UNROLL(32)

// ---------------------------------------------------------------- codebook lookup

// Codebook of a TQ span, padded with zeros to 16 entries so that K <= 16 tables are whole
// vectors; TQ8 (256 entries) gathers from the caller's array instead.
struct Codebook {
  alignas(64) float tab[16];
  const float* c;
  alignas(16) uint8_t planes[4][16];  // byte b of every centroid (128-bit targets, TQ3/TQ4)
};

#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
constexpr bool kPermute2 = true;  // vpermt2ps: one lookup in 32 entries
HWY_INLINE VF Lookup32(const float* HWY_RESTRICT tab, VI idx) {
  const DF df;
  return VF{_mm512_permutex2var_ps(hn::LoadU(df, tab).raw, idx.raw, hn::LoadU(df, tab + 16).raw)};
}
#else
constexpr bool kPermute2 = false;
HWY_INLINE VF Lookup32(const float*, VI) { return VF(); }
#endif

// Select tree: parts[i] holds the lookup for high bits i of idx (from bit `lsb` up).
template <uint32_t kParts>
HWY_INLINE VF SelectByHighBits(VF* part, VI idx, uint32_t lsb) {
  const DF df;
  const DI di;
  TQKV_UNROLL
  for (uint32_t bit = lsb, width = kParts; width > 1; bit <<= 1, width >>= 1) {
    const auto m = hn::RebindMask(df, hn::TestBit(idx, hn::Set(di, int32_t(bit))));
    TQKV_UNROLL
    for (uint32_t i = 0; i < width / 2; ++i) part[i] = hn::IfThenElse(m, part[2 * i + 1], part[2 * i]);
  }
  return part[0];
}

// centroid[idx] for 1 << B entries; idx in [0, 1 << B).
template <uint32_t B>
HWY_INLINE VF Lookup(const Codebook& cb, VI idx) {
  const DF df;
  const DI di;
  constexpr uint32_t K = 1u << B;
  if constexpr (B == 8 && kPermute2) {
    // Gathers are microcoded and slow on AMD; eight 32-entry permutes and a 3-level select
    // cost about half as much per vector.
    VF part[8];
    TQKV_UNROLL
    for (uint32_t i = 0; i < 8; ++i) part[i] = Lookup32(cb.c + 32 * i, idx);
    return SelectByHighBits<8>(part, idx, 32);
  } else if constexpr (B == 8 || kN < 4) {
    return hn::GatherIndex(df, cb.c, idx);
  } else if constexpr (K <= kN) {
    // One table register: vpermps on AVX-512 (TQ2, TQ3, TQ4), AVX2 (TQ2, TQ3).
    return hn::TableLookupLanes(hn::LoadU(df, cb.tab), hn::IndicesFromVec(df, idx));
  } else {
    // K / kN table registers indexed by the low bits, then a select tree on the high bits.
    constexpr uint32_t kTabs = K / kN;
    const auto lo = hn::IndicesFromVec(df, hn::And(idx, hn::Set(di, int32_t(kN - 1))));
    VF part[kTabs];
    TQKV_UNROLL
    for (uint32_t i = 0; i < kTabs; ++i) part[i] = hn::TableLookupLanes(hn::LoadU(df, cb.tab + i * kN), lo);
    return SelectByHighBits<kTabs>(part, idx, kN);
  }
}

// ---------------------------------------------------------------- row decoding
// A row is decoded in units: the vectors one load of packed bytes yields. Vector j (decode
// order) covers the kN kernel-order coordinates starting at VecPos(j).

// AVX-512BW turns 64 plane bits into 64 byte lanes with one masked move, so TQ3 indices are
// built for 64 coordinates at once and then widened.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
constexpr bool kByteMasks = true;
#else
constexpr bool kByteMasks = false;
#endif

// 128-bit targets look TQ4/TQ3 codes up in four byte planes of the codebook (pshufb / tbl on 16
// indices at once) and interleave the planes back into floats, which comes out in kernel order.
// Their 32-bit table lookup costs several ops per 4 lanes instead.
#if HWY_TARGET != HWY_SCALAR && HWY_MAX_BYTES == 16
#define TQKV_BYTE_PLANES 1
#else
#define TQKV_BYTE_PLANES 0
#endif
constexpr bool kBytePlanes = TQKV_BYTE_PLANES;
static_assert(!kBytePlanes || kN == 4);

template <uint32_t T>
constexpr uint32_t UnitVecs() {
  if constexpr (T == fmt::TQ4) return kBytePlanes ? 8 : 2;
  if constexpr (T == fmt::TQ2) return 4;
  if constexpr (T == fmt::TQ3) return kByteMasks || kBytePlanes ? 4 : 1;
  return 1;
}

template <uint32_t T>
constexpr uint32_t VecPos(uint32_t j) {
  if constexpr ((T == fmt::TQ4 && !kBytePlanes) || T == fmt::TQ2) {
    // One unit = kN packed bytes at offset o of a 16-byte block; sub-vector k holds field k of
    // each byte, which kernel order places at 16 * k + o within the block.
    constexpr uint32_t kFields = UnitVecs<T>(), kBlock = 16 * kFields;
    const uint32_t byte = (j / kFields) * kN, k = j % kFields;
    return (byte / 16) * kBlock + 16 * k + byte % 16;
  } else {
    return j * kN;
  }
}

// Bits [c, c + kN) of a TQ3 plane as a lane mask.
template <class M>
HWY_INLINE M PlaneMask(const uint8_t* plane, uint32_t c) {
  const DF df;
  if constexpr (kN % 8 == 0) {
    return hn::LoadMaskBits(df, plane + c / 8);
  } else {
    const DI di;
    alignas(64) static constexpr int32_t kLaneBit[16] = {1,     2,     4,     8,     16,    32,
                                                         64,    128,   256,   512,   1024,  2048,
                                                         4096,  8192,  16384, 32768};
    const int32_t bits = (plane[c / 8] >> (c % 8)) & ((1 << kN) - 1);
    return hn::RebindMask(df, hn::TestBit(hn::Set(di, bits), hn::Load(di, kLaneBit)));
  }
}

#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
// Indices of 64 TQ3 coordinates (8 bytes of each plane) as 4 vectors of i32 (bit-cast to float
// for the caller's array).
HWY_INLINE void TQ3Indices64(const uint8_t* HWY_RESTRICT p, uint32_t plane, VF* out) {
  const hn::Repartition<uint8_t, DF> d8x64;
  const auto idx = hn::Or(hn::Or(hn::IfThenElseZero(hn::LoadMaskBits(d8x64, p), hn::Set(d8x64, 1)),
                                 hn::IfThenElseZero(hn::LoadMaskBits(d8x64, p + plane), hn::Set(d8x64, 2))),
                          hn::IfThenElseZero(hn::LoadMaskBits(d8x64, p + 2 * plane), hn::Set(d8x64, 4)));
  const __m512i raw = idx.raw;
  out[0] = VF{_mm512_castsi512_ps(_mm512_cvtepu8_epi32(_mm512_castsi512_si128(raw)))};
  out[1] = VF{_mm512_castsi512_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(raw, 1)))};
  out[2] = VF{_mm512_castsi512_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(raw, 2)))};
  out[3] = VF{_mm512_castsi512_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(raw, 3)))};
}
#else
HWY_INLINE void TQ3Indices64(const uint8_t*, uint32_t, VF*) {}
#endif

#if HWY_TARGET == HWY_AVX2
// AVX2 lookups with raw intrinsics: vpermps reads only 3 index bits and vblendvps only the sign
// bit, so nibble and crumb fields never need isolating (about half the ops of the generic path,
// which must keep indices in [0, N) and build full-width masks).
constexpr bool kAvx2Paths = true;

HWY_INLINE void DecodeTQ4Avx2(const Codebook& cb, const uint8_t* HWY_RESTRICT p, VF* out) {
  const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256 t0 = _mm256_load_ps(cb.tab), t1 = _mm256_load_ps(cb.tab + 8);
  const __m256i h = _mm256_srli_epi32(x, 4);
  out[0] = VF{_mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, x), _mm256_permutevar8x32_ps(t1, x),
                               _mm256_castsi256_ps(_mm256_slli_epi32(x, 28)))};
  out[1] = VF{_mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, h), _mm256_permutevar8x32_ps(t1, h),
                               _mm256_castsi256_ps(_mm256_slli_epi32(x, 24)))};
}

HWY_INLINE void DecodeTQ2Avx2(const Codebook& cb, const uint8_t* HWY_RESTRICT p, VF* out) {
  const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256 t = _mm256_load_ps(cb.tab);
  const __m256 t2 = _mm256_permute2f128_ps(t, t, 0x00);  // c0..c3 twice: bit 2 is don't-care
  out[0] = VF{_mm256_permutevar8x32_ps(t2, x)};
  out[1] = VF{_mm256_permutevar8x32_ps(t2, _mm256_srli_epi32(x, 2))};
  out[2] = VF{_mm256_permutevar8x32_ps(t2, _mm256_srli_epi32(x, 4))};
  out[3] = VF{_mm256_permutevar8x32_ps(t2, _mm256_srli_epi32(x, 6))};
}

// 8 coordinates: the three plane bytes side by side in one word, shifted by the lane number,
// leave bit p of index i at bit 8p; two shifts fold them into bits 0..2.
HWY_INLINE void DecodeTQ3Avx2(const Codebook& cb, const uint8_t* HWY_RESTRICT p, uint32_t plane, VF* out) {
  const int w = int(p[0] | uint32_t(p[plane]) << 8 | uint32_t(p[2 * plane]) << 16);
  const __m256i v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                                     _mm256_set1_epi32(0x10101));
  const __m256i idx = _mm256_or_si256(v, _mm256_or_si256(_mm256_srli_epi32(v, 7), _mm256_srli_epi32(v, 14)));
  out[0] = VF{_mm256_permutevar8x32_ps(_mm256_load_ps(cb.tab), idx)};
}
#else
constexpr bool kAvx2Paths = false;
HWY_INLINE void DecodeTQ4Avx2(const Codebook&, const uint8_t*, VF*) {}
HWY_INLINE void DecodeTQ2Avx2(const Codebook&, const uint8_t*, VF*) {}
HWY_INLINE void DecodeTQ3Avx2(const Codebook&, const uint8_t*, uint32_t, VF*) {}
#endif

#if TQKV_BYTE_PLANES
// 16 codes (bytes < 16) -> 16 floats in 4 vectors, in order.
HWY_INLINE void LookupBytePlanes(const Codebook& cb, hn::Vec<hn::Full128<uint8_t>> idx, VF* out) {
  const hn::Full128<uint8_t> d8;
  const hn::Full128<uint16_t> d16;
  const DF df;
  using V8 = hn::Vec<decltype(d8)>;
  const V8 p0 = hn::TableLookupBytes(hn::Load(d8, cb.planes[0]), idx);
  const V8 p1 = hn::TableLookupBytes(hn::Load(d8, cb.planes[1]), idx);
  const V8 p2 = hn::TableLookupBytes(hn::Load(d8, cb.planes[2]), idx);
  const V8 p3 = hn::TableLookupBytes(hn::Load(d8, cb.planes[3]), idx);
  const auto w01l = hn::BitCast(d16, hn::InterleaveLower(d8, p0, p1));
  const auto w01h = hn::BitCast(d16, hn::InterleaveUpper(d8, p0, p1));
  const auto w23l = hn::BitCast(d16, hn::InterleaveLower(d8, p2, p3));
  const auto w23h = hn::BitCast(d16, hn::InterleaveUpper(d8, p2, p3));
  out[0] = hn::BitCast(df, hn::InterleaveLower(d16, w01l, w23l));
  out[1] = hn::BitCast(df, hn::InterleaveUpper(d16, w01l, w23l));
  out[2] = hn::BitCast(df, hn::InterleaveLower(d16, w01h, w23h));
  out[3] = hn::BitCast(df, hn::InterleaveUpper(d16, w01h, w23h));
}

// TQ4 block of 16 bytes -> 32 codes in kernel order (low nibbles, then high nibbles).
HWY_INLINE void DecodeTQ4BytePlanes(const Codebook& cb, const uint8_t* HWY_RESTRICT p, VF* out) {
  const hn::Full128<uint8_t> d8;
  const auto x = hn::LoadU(d8, p);
  const auto m = hn::Set(d8, 0x0F);
  LookupBytePlanes(cb, hn::And(x, m), out);
  LookupBytePlanes(cb, hn::And(hn::ShiftRight<4>(x), m), out + 4);
}

// 16 TQ3 coordinates (2 bytes of each plane) -> 16 floats.
HWY_INLINE void DecodeTQ3BytePlanes(const Codebook& cb, const uint8_t* HWY_RESTRICT p, uint32_t plane, VF* out) {
  const hn::Full128<uint8_t> d8;
  const auto idx =
      hn::Or(hn::Or(hn::IfThenElseZero(hn::LoadMaskBits(d8, p), hn::Set(d8, 1)),
                    hn::IfThenElseZero(hn::LoadMaskBits(d8, p + plane), hn::Set(d8, 2))),
             hn::IfThenElseZero(hn::LoadMaskBits(d8, p + 2 * plane), hn::Set(d8, 4)));
  LookupBytePlanes(cb, idx, out);
}
#else
HWY_INLINE void DecodeTQ4BytePlanes(const Codebook&, const uint8_t*, VF*) {}
HWY_INLINE void DecodeTQ3BytePlanes(const Codebook&, const uint8_t*, uint32_t, VF*) {}
#endif

template <uint32_t T, uint32_t D>
HWY_INLINE void DecodeUnit(const Codebook& cb, const uint8_t* HWY_RESTRICT row, uint32_t u, VF* out) {
  const DF df;
  const DI di;
  const D8 d8;
  if constexpr (T == fmt::F32) {
    out[0] = hn::LoadU(df, reinterpret_cast<const float*>(row) + u * kN);
  } else if constexpr (T == fmt::F16) {
    const DH dh;
    out[0] = hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(row) + u * kN));
  } else if constexpr (T == fmt::TQ8) {
    out[0] = Lookup<8>(cb, hn::PromoteTo(di, hn::LoadU(d8, row + u * kN)));
  } else if constexpr (T == fmt::TQ4 && kBytePlanes) {
    DecodeTQ4BytePlanes(cb, row + u * 16, out);
  } else if constexpr (T == fmt::TQ3 && kBytePlanes) {
    DecodeTQ3BytePlanes(cb, row + u * 2, D / 8, out);
  } else if constexpr (T == fmt::TQ4 && kAvx2Paths) {
    DecodeTQ4Avx2(cb, row + u * kN, out);
  } else if constexpr (T == fmt::TQ2 && kAvx2Paths) {
    DecodeTQ2Avx2(cb, row + u * kN, out);
  } else if constexpr (T == fmt::TQ3 && kAvx2Paths) {
    DecodeTQ3Avx2(cb, row + u, D / 8, out);
  } else if constexpr (T == fmt::TQ4) {
    const VI x = hn::PromoteTo(di, hn::LoadU(d8, row + u * kN));
    out[0] = Lookup<4>(cb, hn::And(x, hn::Set(di, 0xF)));
    out[1] = Lookup<4>(cb, hn::ShiftRight<4>(x));
  } else if constexpr (T == fmt::TQ2) {
    const VI x = hn::PromoteTo(di, hn::LoadU(d8, row + u * kN));
    const VI m3 = hn::Set(di, 3);
    out[0] = Lookup<2>(cb, hn::And(x, m3));
    out[1] = Lookup<2>(cb, hn::And(hn::ShiftRight<2>(x), m3));
    out[2] = Lookup<2>(cb, hn::And(hn::ShiftRight<4>(x), m3));
    out[3] = Lookup<2>(cb, hn::ShiftRight<6>(x));
  } else {
    static_assert(T == fmt::TQ3, "unknown type");
    constexpr uint32_t kPlane = D / 8;
    if constexpr (kByteMasks) {
      TQ3Indices64(row + u * 8, kPlane, out);
      TQKV_UNROLL
      for (uint32_t k = 0; k < 4; ++k) out[k] = Lookup<3>(cb, hn::BitCast(di, out[k]));
      return;
    }
    using MI = hn::Mask<DI>;
    const uint32_t c = u * kN;
    const MI b0 = hn::RebindMask(di, PlaneMask<hn::Mask<DF>>(row, c));
    const MI b1 = hn::RebindMask(di, PlaneMask<hn::Mask<DF>>(row + kPlane, c));
    const MI b2 = hn::RebindMask(di, PlaneMask<hn::Mask<DF>>(row + 2 * kPlane, c));
    const VI idx = hn::Or(hn::Or(hn::IfThenElseZero(b0, hn::Set(di, 1)), hn::IfThenElseZero(b1, hn::Set(di, 2))),
                          hn::IfThenElseZero(b2, hn::Set(di, 4)));
    out[0] = Lookup<3>(cb, idx);
  }
}

// Register blocking. A K chunk of kKC vectors of kKR rows stays in registers while all g
// queries stream past it; a V chunk of kVC vectors of kVR rows while all g accumulators do.
template <uint32_t T, uint32_t D>
struct Blocking {
  static constexpr uint32_t kVecs = D / kN;  // vectors per row
  static constexpr uint32_t kUV = UnitVecs<T>();
  static constexpr uint32_t kKC = std::min(kVecs, std::max(kUV, kRegs / 4));
  static constexpr uint32_t kKR = std::max(1u, std::min(4u, (kRegs / 2) / kKC));
  static constexpr uint32_t kVC = std::min(kVecs, std::max(kUV, 2u));
  static constexpr uint32_t kVR = std::max(1u, (kRegs / 2) / kVC);
  static_assert(kVecs % kKC == 0 && kKC % kUV == 0 && kVecs % kVC == 0 && kVC % kUV == 0);
};

// ---------------------------------------------------------------- per-call state

// Trivially constructible: it lives in the per-thread scratch (ProcessRangeT sets what it uses).
struct Ctx {
  uint32_t g, n;
  const float* q;  // [g][d], vector-aligned
  Codebook kcb, vcb;
  // Dense rows are too long for the hardware prefetcher to run far enough ahead; the V rows of
  // a tile are requested while its K rows are scored, the next tile's K rows while V is added.
  const uint8_t* pf_k;  // K rows when dense, else null
  const uint8_t* pf_v;
  size_t pf_k_stride, pf_v_stride, pf_k_bytes, pf_v_bytes;
  // Per tile scratch: partial[h][r] is one vector of partial dot products; w[h][r] the weight
  // of V row r for head h.
  alignas(64) float partial[kMaxG * kTile * kN];
  alignas(64) float w[kMaxG * kTile];
  alignas(64) float ks[kTile], vs[kTile];
  // Per head softmax state for the call (see SoftmaxTile): the reference max of acc and lsum,
  // and lane-wise running sums of p and maxima of the scores.
  float ref[kMaxG];
  alignas(64) float lsum[kMaxG * kN];
  alignas(64) float smax[kMaxG * kN];
  // Aligned copies of q and acc for callers whose buffers are not vector-aligned: every q load
  // of the score loop and every acc access would otherwise straddle two cache lines, which
  // costs a quarter of the throughput (docs/kernel-notes.md).
  alignas(64) float qbuf[kMaxG * 512];
  alignas(64) float accbuf[kMaxG * 512];
};
static_assert(sizeof(Ctx) <= sizeof(Scratch) && alignof(Ctx) <= alignof(Scratch), "grow Scratch");

HWY_INLINE void PrefetchRows(const uint8_t* rows, size_t stride, size_t bytes, uint32_t first, uint32_t count) {
  for (uint32_t r = 0; r < count; ++r) {
    const uint8_t* row = rows + size_t(first + r) * stride;
    for (size_t o = 0; o < bytes; o += 64) hwy::Prefetch(row + o);
  }
}

// GCC folds a loaded vector into every instruction that uses it (one load per use); keeping it
// in a register once is measurably faster where it is used by several FMAs.
template <class V>
HWY_INLINE void InRegister(V& v) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3 && HWY_COMPILER_GCC
  asm("" : "+v"(v.raw));
#elif HWY_ARCH_X86 && HWY_TARGET == HWY_AVX2 && HWY_COMPILER_GCC
  asm("" : "+x"(v.raw));
#else
  (void)v;
#endif
}

// ---------------------------------------------------------------- K: scores

template <uint32_t T, uint32_t D, uint32_t R>
HWY_INLINE void ScoreRows(Ctx& c, const RowSpan& k, uint32_t j, uint32_t rt) {
  using B = Blocking<T, D>;
  constexpr uint32_t C = B::kKC;
  const DF df;
  const uint8_t* rows[R];
  TQKV_UNROLL
  for (uint32_t r = 0; r < R; ++r) rows[r] = k.rows + size_t(j + r) * k.stride;
  if (c.pf_v != nullptr) PrefetchRows(c.pf_v, c.pf_v_stride, c.pf_v_bytes, j, R);
  for (uint32_t ch = 0; ch < B::kVecs / C; ++ch) {
    VF kd[R][C];
    TQKV_UNROLL
    for (uint32_t r = 0; r < R; ++r) {
      TQKV_UNROLL
      for (uint32_t u = 0; u < C / B::kUV; ++u) DecodeUnit<T, D>(c.kcb, rows[r], ch * (C / B::kUV) + u, &kd[r][u * B::kUV]);
    }
    for (uint32_t h = 0; h < c.g; ++h) {
      const float* HWY_RESTRICT qh = c.q + size_t(h) * D;
      float* HWY_RESTRICT ph = c.partial + size_t(h * kTile + rt) * kN;
      // Two chains per row: an FMA chain of C would be latency-bound.
      VF a0[R], a1[R];
      TQKV_UNROLL
      for (uint32_t r = 0; r < R; ++r) {
        a0[r] = ch == 0 ? hn::Zero(df) : hn::Load(df, ph + r * kN);
        a1[r] = hn::Zero(df);
      }
      TQKV_UNROLL
      for (uint32_t v = 0; v < C; ++v) {
        VF qv = hn::LoadU(df, qh + VecPos<T>(ch * C + v));
        InRegister(qv);
        TQKV_UNROLL
        for (uint32_t r = 0; r < R; ++r) {
          if (v % 2 == 0) {
            a0[r] = hn::MulAdd(qv, kd[r][v], a0[r]);
          } else {
            a1[r] = hn::MulAdd(qv, kd[r][v], a1[r]);
          }
        }
      }
      TQKV_UNROLL
      for (uint32_t r = 0; r < R; ++r) hn::Store(hn::Add(a0[r], a1[r]), df, ph + r * kN);
    }
  }
}

template <uint32_t T, uint32_t D>
HWY_NOINLINE void ScoreTile(Ctx& c, const RowSpan& k, uint32_t j0, uint32_t nt) {
  constexpr uint32_t R = Blocking<T, D>::kKR;
  uint32_t r = 0;
  for (; r + R <= nt; r += R) ScoreRows<T, D, R>(c, k, j0 + r, r);
  for (; r < nt; ++r) ScoreRows<T, D, 1>(c, k, j0 + r, r);
}

// ---------------------------------------------------------------- V: accumulation

template <uint32_t T, uint32_t D, uint32_t R>
HWY_INLINE void AccumRows(Ctx& c, const RowSpan& v, uint32_t j, uint32_t rt, float* HWY_RESTRICT acc) {
  using B = Blocking<T, D>;
  constexpr uint32_t C = B::kVC;
  const DF df;
  const uint8_t* rows[R];
  TQKV_UNROLL
  for (uint32_t r = 0; r < R; ++r) rows[r] = v.rows + size_t(j + r) * v.stride;
  if (c.pf_k != nullptr && j + kTile + R <= c.n) PrefetchRows(c.pf_k, c.pf_k_stride, c.pf_k_bytes, j + kTile, R);
  for (uint32_t ch = 0; ch < B::kVecs / C; ++ch) {
    VF vd[R][C];
    TQKV_UNROLL
    for (uint32_t r = 0; r < R; ++r) {
      TQKV_UNROLL
      for (uint32_t u = 0; u < C / B::kUV; ++u) DecodeUnit<T, D>(c.vcb, rows[r], ch * (C / B::kUV) + u, &vd[r][u * B::kUV]);
    }
    for (uint32_t h = 0; h < c.g; ++h) {
      const float* HWY_RESTRICT wh = c.w + h * kTile + rt;
      float* HWY_RESTRICT ah = acc + size_t(h) * D;
      VF wv[R];
      TQKV_UNROLL
      for (uint32_t r = 0; r < R; ++r) {
        wv[r] = hn::Set(df, wh[r]);
        InRegister(wv[r]);
      }
      TQKV_UNROLL
      for (uint32_t x = 0; x < C; ++x) {
        float* p = ah + VecPos<T>(ch * C + x);
        VF a = hn::LoadU(df, p);
        TQKV_UNROLL
        for (uint32_t r = 0; r < R; ++r) a = hn::MulAdd(wv[r], vd[r][x], a);
        hn::StoreU(a, df, p);
      }
    }
  }
}

template <uint32_t T, uint32_t D>
HWY_NOINLINE void AccumTile(Ctx& c, const RowSpan& v, uint32_t j0, uint32_t nt, float* acc) {
  constexpr uint32_t R = Blocking<T, D>::kVR;
  uint32_t r = 0;
  for (; r + R <= nt; r += R) AccumRows<T, D, R>(c, v, j0 + r, r, acc);
  for (; r < nt; ++r) AccumRows<T, D, 1>(c, v, j0 + r, r, acc);
}

// ---------------------------------------------------------------- tile softmax

// Lane i of the result = sum of the lanes of vector i of p[0..kN). The pairing at each level is
// chosen so that the result comes out in row order.
#if HWY_TARGET != HWY_SCALAR  // the scalar target has one lane and lacks these ops
template <class D, class V>
HWY_INLINE V Reduce4(D df, V v0, V v1, V v2, V v3) {
  const hn::Repartition<uint64_t, D> d64;
  const V s01 = hn::Add(hn::InterleaveLower(df, v0, v1), hn::InterleaveUpper(df, v0, v1));
  const V s23 = hn::Add(hn::InterleaveLower(df, v2, v3), hn::InterleaveUpper(df, v2, v3));
  const auto a = hn::BitCast(d64, s01), b = hn::BitCast(d64, s23);
  return hn::Add(hn::BitCast(df, hn::InterleaveLower(d64, a, b)), hn::BitCast(df, hn::InterleaveUpper(d64, a, b)));
}

#endif

template <class D>
HWY_INLINE hn::Vec<D> TransposeSum(D df, const float* HWY_RESTRICT p) {
  constexpr size_t N = hn::MaxLanes(D());
#if HWY_TARGET == HWY_SCALAR
  static_assert(N == 1);
  return hn::Load(df, p);
#else
  using V = hn::Vec<D>;
  if constexpr (N == 4) {
    return Reduce4(df, hn::Load(df, p), hn::Load(df, p + 4), hn::Load(df, p + 8), hn::Load(df, p + 12));
  } else if constexpr (N == 8) {
    V w[4];
    TQKV_UNROLL
    for (uint32_t i = 0; i < 4; ++i) {
      const V lo = hn::Load(df, p + i * 8), hi = hn::Load(df, p + (i + 4) * 8);
      w[i] = hn::Add(hn::ConcatLowerLower(df, hi, lo), hn::ConcatUpperUpper(df, hi, lo));
    }
    return Reduce4(df, w[0], w[1], w[2], w[3]);
  } else {
    static_assert(N == 16, "unsupported vector length");
    V w[8], x[4];
    TQKV_UNROLL
    for (uint32_t i = 0; i < 8; ++i) {
      const V lo = hn::Load(df, p + i * 16), hi = hn::Load(df, p + (i + 8) * 16);
      w[i] = hn::Add(hn::ConcatLowerLower(df, hi, lo), hn::ConcatUpperUpper(df, hi, lo));
    }
    // 128-bit block b of x[i] = rows i, i + 4, i + 8, i + 12 for b = 0..3.
    TQKV_UNROLL
    for (uint32_t i = 0; i < 4; ++i) {
      const V lo = w[i], hi = w[i + 4];
      x[i] = hn::Add(hn::OddEvenBlocks(hi, lo),
                     hn::OddEvenBlocks(hn::SwapAdjacentBlocks(hi), hn::SwapAdjacentBlocks(lo)));
    }
    return Reduce4(df, x[0], x[1], x[2], x[3]);
  }
#endif
}

// Scales of rows [j0, j0 + nt) of a TQ span as f32, zero-padded to kTile.
HWY_INLINE void LoadScales(const RowSpan& s, uint32_t j0, uint32_t nt, float* HWY_RESTRICT out) {
  const DF df;
  if (s.scale_f16) {
    const uint16_t* p = static_cast<const uint16_t*>(s.scales) + j0;
    if (nt == kTile) {
      const DH dh;
      TQKV_UNROLL
      for (uint32_t i = 0; i < kTile; i += kN)
        hn::Store(hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(p) + i)), df, out + i);
      return;
    }
    for (uint32_t i = 0; i < nt; ++i) out[i] = f16_to_f32(p[i]);
  } else {
    memcpy(out, static_cast<const float*>(s.scales) + j0, nt * sizeof(float));
  }
  for (uint32_t i = nt; i < kTile; ++i) out[i] = 0.0f;
}

// Online softmax with a lazy reference: within a call, acc and l are kept relative to ref[h],
// which only moves when a score exceeds it by more than kSlack (p <= e^kSlack cannot overflow).
// The tile max therefore never needs a horizontal reduction, nor does l; both stay lane-wise
// until FinishState rebases everything on the true max, so the state a call leaves is the one
// the sequential definition produces (to rounding).
constexpr float kSlack = 8.0f;

HWY_INLINE void StartState(Ctx& c, const RangeTask& t) {
  const DF df;
  for (uint32_t h = 0; h < t.g; ++h) {
    c.ref[h] = t.m[h];
    hn::Store(hn::Zero(df), df, c.lsum + h * kN);
    c.lsum[h * kN] = t.l[h];
    hn::Store(hn::Set(df, -std::numeric_limits<float>::infinity()), df, c.smax + h * kN);
  }
}

// acc[h] *= f, l-state of head h *= f.
HWY_INLINE void ScaleHead(Ctx& c, uint32_t h, uint32_t d, float f, float* HWY_RESTRICT acc) {
  const DF df;
  const VF fv = hn::Set(df, f);
  float* HWY_RESTRICT ah = acc + size_t(h) * d;
  for (uint32_t i = 0; i < d; i += kN) hn::StoreU(hn::Mul(hn::LoadU(df, ah + i), fv), df, ah + i);
  hn::Store(hn::Mul(hn::Load(df, c.lsum + h * kN), fv), df, c.lsum + h * kN);
}

HWY_NOINLINE void FinishState(Ctx& c, const RangeTask& t, float* HWY_RESTRICT acc) {
  const DF df;
  for (uint32_t h = 0; h < t.g; ++h) {
    const float m = std::max(c.ref[h], hn::GetLane(hn::MaxOfLanes(df, hn::Load(df, c.smax + h * kN))));
    // ref <= m always; when they differ, ref came from an earlier maximum within kSlack of m.
    if (m != c.ref[h]) ScaleHead(c, h, t.d, std::exp(c.ref[h] - m), acc);
    t.l[h] = hn::GetLane(hn::SumOfLanes(df, hn::Load(df, c.lsum + h * kN)));
    t.m[h] = m;
  }
}

template <bool kScaleK, bool kScaleV, bool kCap>
HWY_NOINLINE void SoftmaxTile(Ctx& c, const RangeTask& t, uint32_t nt, float* HWY_RESTRICT acc) {
  const DF df;
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const VF cap = hn::Set(df, t.softcap);
  for (uint32_t h = 0; h < c.g; ++h) {
    float* HWY_RESTRICT ph = c.partial + size_t(h) * kTile * kN;
    VF s[kGroups];
    VF mx = hn::Set(df, kNegInf);
    TQKV_UNROLL
    for (uint32_t i = 0; i < kGroups; ++i) {
      if (HWY_UNLIKELY(nt <= i * kN)) {  // past the end of the run
        s[i] = hn::Set(df, kNegInf);
        continue;
      }
      s[i] = TransposeSum(df, ph + i * kN * kN);
      if constexpr (kScaleK) s[i] = hn::Mul(s[i], hn::Load(df, c.ks + i * kN));
      if constexpr (kCap) s[i] = hn::Mul(cap, hn::Tanh(df, hn::Div(s[i], cap)));
      if (nt < (i + 1) * kN) s[i] = hn::IfThenElse(hn::FirstN(df, nt - i * kN), s[i], hn::Set(df, kNegInf));
      mx = hn::Max(mx, s[i]);
    }
    float* HWY_RESTRICT smax = c.smax + h * kN;
    const VF all_max = hn::Max(hn::Load(df, smax), mx);
    hn::Store(all_max, df, smax);
    if (HWY_UNLIKELY(!hn::AllFalse(df, hn::Gt(mx, hn::Set(df, c.ref[h] + kSlack))))) {
      // Rebase on the max so far; ref = -inf only before the first row, where acc is scaled by 0
      // as in the sequential definition.
      const float ref = hn::GetLane(hn::MaxOfLanes(df, all_max));
      ScaleHead(c, h, t.d, c.ref[h] == kNegInf ? 0.0f : std::exp(c.ref[h] - ref), acc);
      c.ref[h] = ref;
    }
    TQKV_UNROLL
    for (uint32_t i = 0; i < kGroups; ++i) hn::Store(s[i], df, c.w + h * kTile + i * kN);  // logits for now
  }
  // Second pass (logits -> weights): short independent iterations overlap better across heads
  // than one long dependency chain per head (+4 %).
  for (uint32_t h = 0; h < c.g; ++h) {
    const VF ref = hn::Set(df, c.ref[h]);
    VF sum = hn::Load(df, c.lsum + h * kN);
    TQKV_UNROLL
    for (uint32_t i = 0; i < kGroups; ++i) {
      const VF p = hn::Exp(df, hn::Sub(hn::Load(df, c.w + h * kTile + i * kN), ref));
      sum = hn::Add(sum, p);
      hn::Store(kScaleV ? hn::Mul(p, hn::Load(df, c.vs + i * kN)) : p, df, c.w + h * kTile + i * kN);
    }
    hn::Store(sum, df, c.lsum + h * kN);
  }
}

#undef TQKV_UNROLL
#undef TQKV_BYTE_PLANES

}  // namespace tqkv::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // TQKV_CPU_KERNEL_HWY_INL_H_
