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

// Per target: pick the template instances once per call and run the tiles.
HWY_BEFORE_NAMESPACE();
namespace tqkv::cpu::HWY_NAMESPACE {

// ---------------------------------------------------------------- dispatch on types

using ScoreFn = void (*)(Ctx&, const RowSpan&, uint32_t, uint32_t);
using AccumFn = void (*)(Ctx&, const RowSpan&, uint32_t, uint32_t, float*);
using SoftmaxFn = void (*)(Ctx&, const RangeTask&, uint32_t, float*);

template <uint32_t D>
ScoreFn PickScoreD(uint32_t type) {
  switch (type) {
    case fmt::TQ2: return &ScoreTile<fmt::TQ2, D>;
    case fmt::TQ3: return &ScoreTile<fmt::TQ3, D>;
    case fmt::TQ4: return &ScoreTile<fmt::TQ4, D>;
    case fmt::TQ8: return &ScoreTile<fmt::TQ8, D>;
    case fmt::F16: return &ScoreTile<fmt::F16, D>;
    case fmt::F32: return &ScoreTile<fmt::F32, D>;
    default: return nullptr;
  }
}
template <uint32_t D>
AccumFn PickAccumD(uint32_t type) {
  switch (type) {
    case fmt::TQ2: return &AccumTile<fmt::TQ2, D>;
    case fmt::TQ3: return &AccumTile<fmt::TQ3, D>;
    case fmt::TQ4: return &AccumTile<fmt::TQ4, D>;
    case fmt::TQ8: return &AccumTile<fmt::TQ8, D>;
    case fmt::F16: return &AccumTile<fmt::F16, D>;
    case fmt::F32: return &AccumTile<fmt::F32, D>;
    default: return nullptr;
  }
}
inline ScoreFn PickScore(uint32_t d, uint32_t type) {
  switch (d) {
    case 64: return PickScoreD<64>(type);
    case 128: return PickScoreD<128>(type);
    case 256: return PickScoreD<256>(type);
    case 512: return PickScoreD<512>(type);
    default: return nullptr;
  }
}
inline AccumFn PickAccum(uint32_t d, uint32_t type) {
  switch (d) {
    case 64: return PickAccumD<64>(type);
    case 128: return PickAccumD<128>(type);
    case 256: return PickAccumD<256>(type);
    case 512: return PickAccumD<512>(type);
    default: return nullptr;
  }
}

inline SoftmaxFn PickSoftmax(bool scale_k, bool scale_v, bool cap) {
  static constexpr SoftmaxFn kTable[8] = {
      &SoftmaxTile<false, false, false>, &SoftmaxTile<false, false, true>, &SoftmaxTile<false, true, false>,
      &SoftmaxTile<false, true, true>,   &SoftmaxTile<true, false, false>, &SoftmaxTile<true, false, true>,
      &SoftmaxTile<true, true, false>,   &SoftmaxTile<true, true, true>};
  return kTable[(scale_k ? 4 : 0) + (scale_v ? 2 : 0) + (cap ? 1 : 0)];
}

inline void FillCodebook(const RowSpan& s, Codebook& cb) {
  if (!fmt::is_tq(s.type)) return;
  cb.c = s.centroids;
  if (s.type == fmt::TQ8) return;
  const size_t k = size_t(1) << s.type;
  memcpy(cb.tab, s.centroids, k * sizeof(float));
  std::fill(cb.tab + k, cb.tab + 16, 0.0f);
  if (kBytePlanes) {
    for (size_t j = 0; j < 16; ++j) {
      uint32_t bits;
      memcpy(&bits, cb.tab + j, 4);
      for (size_t b = 0; b < 4; ++b) cb.planes[b][j] = uint8_t(bits >> (8 * b));
    }
  }
}

inline bool VectorAligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % (kN * sizeof(float)) == 0; }

HWY_NOINLINE void ProcessRangeT(const RangeTask& t) {
  if (t.n == 0 || t.g == 0) return;
  const ScoreFn score = PickScore(t.d, t.k.type);
  const AccumFn accum = PickAccum(t.d, t.v.type);
  if (score == nullptr || accum == nullptr || t.g > kMaxG) {
    process_range_generic(t);  // outside the contract of RangeTask; keep the answer right
    return;
  }
  const bool tq_k = fmt::is_tq(t.k.type), tq_v = fmt::is_tq(t.v.type);
  const SoftmaxFn softmax = PickSoftmax(tq_k, tq_v, t.softcap > 0);
  Ctx& c = *new (tls_scratch.bytes) Ctx;  // no-op constructor: just names the storage
  c.g = t.g;
  c.n = t.n;
  const size_t qa = size_t(t.g) * t.d;
  c.q = t.q;
  if (!VectorAligned(t.q)) {
    memcpy(c.qbuf, t.q, qa * sizeof(float));
    c.q = c.qbuf;
  }
  float* acc = t.acc;
  if (!VectorAligned(t.acc)) {
    memcpy(c.accbuf, t.acc, qa * sizeof(float));
    acc = c.accbuf;
  }
  FillCodebook(t.k, c.kcb);
  FillCodebook(t.v, c.vcb);
  c.pf_k = tq_k ? nullptr : t.k.rows;
  c.pf_v = tq_v ? nullptr : t.v.rows;
  c.pf_k_stride = t.k.stride;
  c.pf_v_stride = t.v.stride;
  c.pf_k_bytes = fmt::row_payload_bytes(t.k.type, t.d);
  c.pf_v_bytes = fmt::row_payload_bytes(t.v.type, t.d);
  StartState(c, t);
  for (uint32_t j0 = 0; j0 < t.n; j0 += kTile) {
    const uint32_t nt = std::min(kTile, t.n - j0);
    score(c, t.k, j0, nt);
    if (nt < kTile) {
      // Rows past the end of the run still enter the transpose; give them defined values.
      const uint32_t end = std::min(kTile, (nt + kN - 1) / kN * kN);
      for (uint32_t h = 0; h < t.g; ++h)
        memset(c.partial + (size_t(h) * kTile + nt) * kN, 0, (end - nt) * kN * sizeof(float));
    }
    if (tq_k) LoadScales(t.k, j0, nt, c.ks);
    if (tq_v) LoadScales(t.v, j0, nt, c.vs);
    softmax(c, t, nt, acc);
    accum(c, t.v, j0, nt, acc);
  }
  FinishState(c, t, acc);
  if (acc != t.acc) memcpy(t.acc, acc, qa * sizeof(float));
}

inline int64_t TargetBit() { return HWY_TARGET; }

}  // namespace tqkv::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace tqkv::cpu {

HWY_EXPORT(ProcessRangeT);
HWY_EXPORT(TargetBit);

void process_range(const RangeTask& t) { HWY_DYNAMIC_DISPATCH(ProcessRangeT)(t); }

const char* simd_target_name() { return hwy::TargetName(HWY_DYNAMIC_DISPATCH(TargetBit)()); }

}  // namespace tqkv::cpu
#endif  // HWY_ONCE
