// Fused split-K decode attention over a TurboQuant (or f16) cache, on tensor cores.
//
// One block = (split, KV head, group of up to 8 query heads, sequence); 4 warps. The block walks
// its slice of the visible positions in tiles of TK rows, copied global -> shared with cp.async,
// STAGES tiles in flight. Per tile:
//   QK: warp w scores rows [16w, 16w+16) against all (<= 8) query heads with mma.m16n8k16:
//       A = the 16 K rows decoded to f16 (rows x coordinates), B = the rotated query (f16 hi + lo
//       parts, so the query keeps ~22 bits), f32 accumulation.
//   softmax: every warp reads the tile's scores from shared memory and keeps the same running
//       max and sum (redundantly: cheaper than a second barrier).
//   PV: warp w owns coordinates [w*D/4, (w+1)*D/4) of the output. A = V^T (coordinates x rows),
//       made from row-major decoded V by movmatrix.trans; B = P (rows x heads) as f16 hi + lo with
//       the V row scale folded in.
// The query is rotated in the prologue and the partial output written in the rotated domain;
// combine (attention.cu) merges the splits by log-sum-exp and rotates back once per head.
// Why this shape: docs/kernel-notes.md ("CUDA decode kernel").
#pragma once
#include "cuda/attn_common.cuh"

namespace tqkv::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

// Shared memory layout of one block, in bytes.
template <int KT, int VT, int D, int TK, int STAGES>
struct Smem {
  static constexpr int kStrideK = int(fmt::row_stride(KT, D));
  static constexpr int kStrideV = int(fmt::row_stride(VT, D));
  static constexpr int kTileK = TK * kStrideK;
  static constexpr int kTileV = TK * kStrideV;
  static constexpr int kStage = kTileK + kTileV + 2 * TK * 4;  // rows + one scale word per row
  static constexpr int kStages = STAGES * kStage;
  static constexpr int kQ = 2 * kHeadsPerBlock * D * 2;        // query hi and lo parts (f16)
  // Softmax exchange: per-warp maxima and sums per head, then the tile's weights as f16 hi/lo
  // in the PV mma's B-fragment order ([sub-tile][lane] x 16 bytes).
  static constexpr int kS = 2 * kWarps * kHeadsPerBlock * 4 + (TK / 16) * 32 * 16;
  static constexpr int kLut = (KT == fmt::TQ8 || VT == fmt::TQ8) ? 2 * 256 * 2 : 0;  // TQ8 tables
  static constexpr int kMisc = 4 * kHeadsPerBlock * 4;         // per-head constants
  static constexpr int kTotal = kStages + kQ + kS + kLut + kMisc;
};

// Byte offset of (row, byte) in a tile whose rows are STRIDE bytes apart: 16-byte chunks are
// permuted per row so that 8 consecutive rows reading the same chunk hit different banks.
template <int STRIDE>
__device__ __forceinline__ int swz(int row, int byte) {
  constexpr int cpr = STRIDE / 16;
  int x = 0;
  if constexpr (cpr % 8 == 0) x = row & 7;
  else if constexpr (cpr % 4 == 0) x = (row >> 1) & 3;
  else if constexpr (cpr % 2 == 0) x = (row >> 2) & 1;
  return row * STRIDE + (((byte >> 4) ^ x) << 4) + (byte & 15);
}


__device__ __forceinline__ float load_scale_word(const float* words, int row, int parity_f16) {
  // f32 scales: the word is the scale. f16 scales: the aligned word holding it; parity_f16 is
  // 1 + (row index & 1) to say which half, 0 for f32.
  const float w = words[row];
  if (parity_f16 == 0) return w;
  const uint32_t u = __float_as_uint(w);
  const uint16_t h = uint16_t(parity_f16 == 2 ? (u >> 16) : (u & 0xFFFF));
  return __half2float(__ushort_as_half(h));
}

template <int KT, int VT, int D, int TK, int STAGES>
__global__ void __launch_bounds__(kThreads) attn_decode_kernel(const AttnKernelParams p) {
  using KC = Codec<KT>;
  using VC = Codec<VT>;
  using L = Smem<KT, VT, D, TK, STAGES>;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* stages = smem;
  uint32_t* q_hl = reinterpret_cast<uint32_t*>(smem + L::kStages);  // [k-step][quad t][head][hi0 hi1 lo0 lo1]
  float* w_max = reinterpret_cast<float*>(smem + L::kStages + L::kQ);  // [warp][head]
  float* w_sum = w_max + kWarps * kHeadsPerBlock;                         // [warp][head]
  uint32_t* p_tile = reinterpret_cast<uint32_t*>(w_sum + kWarps * kHeadsPerBlock);
  __half* lut = reinterpret_cast<__half*>(smem + L::kStages + L::kQ + L::kS);
  float* misc = reinterpret_cast<float*>(smem + L::kStages + L::kQ + L::kS + L::kLut);
  float* q_unscale = misc;                   // [8]: undoes the power-of-two query scaling
  float* bias = misc + kHeadsPerBlock;       // [8]: scale * q . mu (key centering)

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const uint32_t split = blockIdx.x, hkv_idx = blockIdx.y / p.head_chunks, chunk = blockIdx.y % p.head_chunks;
  const uint32_t b = blockIdx.z;
  const uint32_t h0 = hkv_idx * p.group + chunk * kHeadsPerBlock;  // first query head of the block
  const int nh = min(int(p.group - chunk * kHeadsPerBlock), kHeadsPerBlock);

  // ---- this split's slice of the visible positions ----
  const Slice sl = split_slice(p, b, split, TK);
  const int64_t my_lo = sl.lo, my_hi = sl.hi;
  const bool bad = sl.bad;
  const int64_t row_base = (int64_t(b) * p.hkv + hkv_idx) * p.capacity;

  // ---- the first tiles' copies go out before the prologue, so memory is busy at once ----
  // ---- the tile pipeline ----
  const int ntiles = my_hi > my_lo ? int((my_hi - my_lo + TK - 1) / TK) : 0;
  const uint8_t* kbase = p.k_data + row_base * L::kStrideK;
  const uint8_t* vbase = p.v_data + row_base * L::kStrideV;
  const int kss = p.k_scale_f16 ? 2 : 4, vss = p.v_scale_f16 ? 2 : 4;
  const uint8_t* ksb = static_cast<const uint8_t*>(p.k_scales);
  const uint8_t* vsb = static_cast<const uint8_t*>(p.v_scales);
  // Which 16-byte chunks of a tile this thread copies is fixed, so their offsets inside a row
  // and a stage are computed once; per tile only the first slot moves (consecutive positions;
  // a ring wraps at most once inside a tile: rows from `wrap_at` on start again at slot 0).
  const uint32_t cap = p.capacity;
  constexpr int kCk = L::kStrideK / 16, kCv = L::kStrideV / 16;
  constexpr int kItK = (TK * kCk + kThreads - 1) / kThreads, kItV = (TK * kCv + kThreads - 1) / kThreads;
  auto copy_rows = [&](const uint8_t* rowp, int64_t wrap_bytes, int wrap_at, uint8_t* dst0, int nvalid,
                       auto stride_c, auto cpr_c, auto iters_c) {
    constexpr int stride = decltype(stride_c)::value, cpr = decltype(cpr_c)::value, iters = decltype(iters_c)::value;
#pragma unroll
    for (int i = 0; i < iters; ++i) {
      const int c = tid + i * kThreads;
      if (TK * cpr % kThreads != 0 && c >= TK * cpr) break;
      const int rr = c / cpr, off = rr * stride + (c % cpr) * 16;
      const bool valid = rr < nvalid;
      const uint8_t* src = rowp + off - (rr >= wrap_at ? wrap_bytes : 0);
      cp_async16(dst0 + swz<stride>(rr, (c % cpr) * 16), valid ? src : rowp, valid);
    }
  };
  auto issue = [&](int tile) {
    if (tile < ntiles) {
      uint8_t* st = stages + (tile % STAGES) * L::kStage;
      const int64_t t0 = my_lo + int64_t(tile) * TK;
      const int64_t slot0 = p.ring ? t0 % int64_t(cap) : t0;
      const int nvalid = int(min(int64_t(TK), my_hi - t0));
      const int wrap_at = p.ring ? int(min(int64_t(TK), int64_t(cap) - slot0)) : TK;
      copy_rows(kbase + slot0 * L::kStrideK, int64_t(cap) * L::kStrideK, wrap_at, st, nvalid,
                std::integral_constant<int, L::kStrideK>{}, std::integral_constant<int, kCk>{},
                std::integral_constant<int, kItK>{});
      copy_rows(vbase + slot0 * L::kStrideV, int64_t(cap) * L::kStrideV, wrap_at, st + L::kTileK, nvalid,
                std::integral_constant<int, L::kStrideV>{}, std::integral_constant<int, kCv>{},
                std::integral_constant<int, kItV>{});
      if (tid < 2 * TK) {  // one scale word per row (TQ types; dense rows have none)
        const bool isk = tid < TK;
        const int rr = isk ? tid : tid - TK;
        const bool has = isk ? fmt::is_tq(KT) : fmt::is_tq(VT);
        if (has) {
          const bool valid = rr < nvalid;
          const int ss = isk ? kss : vss;
          const uint8_t* sb = isk ? ksb : vsb;
          const int64_t slot = slot0 + rr - (rr >= wrap_at ? int64_t(cap) : 0);
          const uint8_t* src = valid ? sb + (((row_base + slot) * ss) & ~int64_t(3)) : sb;
          cp_async4(st + L::kTileK + L::kTileV + (isk ? 0 : TK * 4) + rr * 4, src, valid);
        }
      }
    }
    cp_async_commit();
  };
  for (int s = 0; s < STAGES - 1; ++s) issue(s);

  // ---- prologue: each warp rotates and scales two query heads in registers ----
  query_fragments<D, kWarps, KC::kRotated>(p, b, hkv_idx, h0, nh, warp, lane, q_hl, q_unscale, bias);
  if (KT == fmt::TQ8)
    for (int i = tid; i < 256; i += kThreads) lut[i] = __float2half_rn(p.k_centroids[i]);
  if (VT == fmt::TQ8)
    for (int i = tid; i < 256; i += kThreads) lut[256 + i] = __float2half_rn(p.v_centroids[i]);
  __syncthreads();
  typename KC::Table kt;
  typename VC::Table vt;
  KC::init(kt, p.k_tab, lut);
  VC::init(vt, p.v_tab, lut + 256);


  const int r = lane >> 2, t = lane & 3;  // mma fragment coordinates
  // Running max and sum for heads 2t and 2t+1 (every warp holds the same values).
  float m_run0 = -INFINITY, m_run1 = -INFINITY, l_run0 = 0.0f, l_run1 = 0.0f;
  constexpr int kUnits = D / 128 > 0 ? D / 128 : 1;  // 8-coordinate units of a warp's V slice per thread
  constexpr int kVdims = D / 16;                     // coordinates of the V slice per thread
  // The lo parts of the weights accumulate separately (two mma chains) where registers allow.
  constexpr int kAccSets = D <= 256 ? 2 : 1;
  float acc[kAccSets][kUnits][2][4];
#pragma unroll
  for (int q = 0; q < kAccSets; ++q)
#pragma unroll
    for (int u = 0; u < kUnits; ++u)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[q][u][j][e] = 0.0f;
  const float qun = q_unscale[2 * t], qun1 = q_unscale[2 * t + 1];
  const float bias0 = bias[2 * t], bias1 = bias[2 * t + 1];
  const float log2e = 1.4426950408889634f;
  const float vmul = VC::kRotated ? rsqrtf(float(D)) : 1.0f;

  for (int tile = 0; tile < ntiles; ++tile) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile's stage landed for everyone; everyone finished tile - 1
    issue(tile + STAGES - 1);
    const uint8_t* st = stages + (tile % STAGES) * L::kStage;
    const uint8_t* ks = st;
    const uint8_t* vs = st + L::kTileK;
    const float* kscale = reinterpret_cast<const float*>(st + L::kTileK + L::kTileV);
    const float* vscale = kscale + TK;
    const int64_t t0 = my_lo + int64_t(tile) * TK;
    // Which half of a scale word holds row rr's f16 scale (0: f32 scales).
    // f16 scales: which half of the copied word holds row rr's scale. Row index parity is
    // (row_base + slot0 + rr) & 1, shifted by cap's parity past the ring's wrap point.
    int base_par = 0, wrap_at = TK, cap_par = 0;
    if (p.k_scale_f16 || p.v_scale_f16) {
      const int64_t slot0 = p.ring ? t0 % int64_t(cap) : t0;
      base_par = int((row_base + slot0) & 1);
      wrap_at = p.ring ? int(min(int64_t(TK), int64_t(cap) - slot0)) : TK;
      cap_par = int(cap & 1);
    }
    auto parity = [&](int rr, int f16) -> int {
      return f16 ? 1 + ((base_par + rr + (rr >= wrap_at ? cap_par : 0)) & 1) : 0;
    };

    // ---- QK: warp w scores rows [16w, 16w+16) ----
    // x[0], x[1]: row r, heads 2t, 2t+1; x[2], x[3]: row r + 8 (the mma's C fragment).
    const bool has_rows = warp * 16 < TK;
    const int kr0 = warp * 16 + r, kr1 = kr0 + 8;
    float x[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    if (has_rows) {
      // Four independent accumulators (unit parity x query hi/lo) keep four mma chains in flight.
      float cc[4][4] = {};
      auto at0 = [&](int off) { return ks + swz<L::kStrideK>(kr0, off); };
      auto at1 = [&](int off) { return ks + swz<L::kStrideK>(kr1, off); };
      const uint4* qfrag = reinterpret_cast<const uint4*>(q_hl);
#pragma unroll 4
      for (int u = 0; u < D / 32; ++u) {  // 8 coordinates of each row per unit = 2 k-steps
        uint32_t a0[4], a1[4];
        KC::decode8(kt, at0, t * (D / 4) + 8 * u, D, a0);
        KC::decode8(kt, at1, t * (D / 4) + 8 * u, D, a1);
#pragma unroll
        for (int ss = 0; ss < 2; ++ss) {
          const int s = 2 * u + ss;
          const uint4 qv = qfrag[qslot<false>(s, lane)];
          const uint32_t a[4] = {a0[2 * ss], a1[2 * ss], a0[2 * ss + 1], a1[2 * ss + 1]};
          mma16816(cc[2 * (u & 1)], a, qv.x, qv.y);      // hi part of the query
          mma16816(cc[2 * (u & 1) + 1], a, qv.z, qv.w);  // lo part
        }
      }
      float c[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) c[e] = (cc[0][e] + cc[2][e]) + (cc[1][e] + cc[3][e]);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int rr = half ? kr1 : kr0;
        float ksc = 1.0f;
        if (fmt::is_tq(KT)) ksc = p.k_scale_f16 ? load_scale_word(kscale, rr, parity(rr, 1)) : kscale[rr];
        float x0 = c[2 * half] * qun * ksc + bias0, x1 = c[2 * half + 1] * qun1 * ksc + bias1;
        if (p.softcap > 0.0f) {
          x0 = p.softcap * tanhf(x0 / p.softcap);
          x1 = p.softcap * tanhf(x1 / p.softcap);
        }
        const bool live = t0 + rr < my_hi;
        x[2 * half] = live ? x0 * log2e : -INFINITY;
        x[2 * half + 1] = live ? x1 * log2e : -INFINITY;
      }
    }
    // ---- online softmax, each score computed by the warp that owns its row ----
    // Per-warp maxima per head (lanes sharing t hold heads 2t, 2t+1), then the tile's.
    float mx0 = fmaxf(x[0], x[2]), mx1 = fmaxf(x[1], x[3]);
    rows_max(mx0, mx1);
    if (r == 0) {
      w_max[warp * kHeadsPerBlock + 2 * t] = mx0;
      w_max[warp * kHeadsPerBlock + 2 * t + 1] = mx1;
    }
    __syncthreads();
    float tm0 = -INFINITY, tm1 = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      tm0 = fmaxf(tm0, w_max[w * kHeadsPerBlock + 2 * t]);
      tm1 = fmaxf(tm1, w_max[w * kHeadsPerBlock + 2 * t + 1]);
    }
    const float mn0 = fmaxf(m_run0, tm0), mn1 = fmaxf(m_run1, tm1);
    const float mu0 = mn0 == -INFINITY ? 0.0f : mn0, mu1 = mn1 == -INFINITY ? 0.0f : mn1;
    const float al0 = fast_exp2(m_run0 - mu0), al1 = fast_exp2(m_run1 - mu1);
    m_run0 = mn0;
    m_run1 = mn1;
    {
      const float pr[4] = {fast_exp2(x[0] - mu0), fast_exp2(x[1] - mu1), fast_exp2(x[2] - mu0), fast_exp2(x[3] - mu1)};
      float ps0 = pr[0] + pr[2], ps1 = pr[1] + pr[3];
      rows_sum(ps0, ps1);
      if (r == 0) {
        w_sum[warp * kHeadsPerBlock + 2 * t] = ps0;
        w_sum[warp * kHeadsPerBlock + 2 * t + 1] = ps1;
      }
      if (has_rows) {
        // The V row scale is folded into the weights; f16 hi + lo parts go where the PV mma's
        // B fragment of sub-tile `warp` expects them: key k, head h -> lane h*4 + (k%8)/2,
        // word (k >= 8) (+2 for lo), half k%2.
        float vs0 = 1.0f, vs1 = 1.0f;
        if (fmt::is_tq(VT)) {
          vs0 = (p.v_scale_f16 ? load_scale_word(vscale, kr0, parity(kr0, 1)) : vscale[kr0]) * vmul;
          vs1 = (p.v_scale_f16 ? load_scale_word(vscale, kr1, parity(kr1, 1)) : vscale[kr1]) * vmul;
        }
        __half* pw = reinterpret_cast<__half*>(p_tile) + warp * 32 * 8;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float v = pr[e] * (e < 2 ? vs0 : vs1);
          const __half hv = __float2half_rn(v);
          const __half lv = __float2half_rn(v - __half2float(hv));
          const int head = 2 * t + (e & 1), word = e >> 1;
          const int dst = ((head * 4 + (r >> 1)) * 4 + word) * 2 + (r & 1);
          pw[dst] = hv;
          pw[dst + 4] = lv;
        }
      }
    }
    __syncthreads();
    float ts0 = 0.0f, ts1 = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      ts0 += w_sum[w * kHeadsPerBlock + 2 * t];
      ts1 += w_sum[w * kHeadsPerBlock + 2 * t + 1];
    }
    l_run0 = l_run0 * al0 + ts0;
    l_run1 = l_run1 * al1 + ts1;
    constexpr int kSub = TK / 16;
    uint32_t pb[kSub][4];  // per sub: b0 hi, b1 hi, b0 lo, b1 lo
#pragma unroll
    for (int sub = 0; sub < kSub; ++sub) {
      const uint4 v = reinterpret_cast<const uint4*>(p_tile)[sub * 32 + lane];
      pb[sub][0] = v.x;
      pb[sub][1] = v.y;
      pb[sub][2] = v.z;
      pb[sub][3] = v.w;
    }
    // Output accumulator columns are heads 2t, 2t+1: the same lanes' alphas.
#pragma unroll
    for (int q = 0; q < kAccSets; ++q)
#pragma unroll
      for (int u = 0; u < kUnits; ++u)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          acc[q][u][j][0] *= al0;
          acc[q][u][j][1] *= al1;
          acc[q][u][j][2] *= al0;
          acc[q][u][j][3] *= al1;
        }

    // ---- PV: this warp's coordinates [warp*D/4, ...), this thread's kVdims of them ----
    const int c0 = warp * (D / 4) + t * kVdims;
#pragma unroll
    for (int sub = 0; sub < kSub; ++sub) {
      const int vr0 = sub * 16 + r, vr1 = vr0 + 8;
      auto at0 = [&](int off) { return vs + swz<L::kStrideV>(vr0, off); };
      auto at1 = [&](int off) { return vs + swz<L::kStrideV>(vr1, off); };
#pragma unroll
      for (int u = 0; u < kUnits; ++u) {
        uint32_t v0[4], v1[4];
        if constexpr (kVdims >= 8) {
          VC::decode8(vt, at0, c0 + 8 * u, D, v0);
          VC::decode8(vt, at1, c0 + 8 * u, D, v1);
        } else {  // D = 64: 4 coordinates per thread; decode the aligned 8 and keep our half
          uint32_t w0[4], w1[4];
          const int base8 = c0 & ~7, off = (c0 & 7) / 2;
          VC::decode8(vt, at0, base8, D, w0);
          VC::decode8(vt, at1, base8, D, w1);
          v0[0] = off ? w0[2] : w0[0];  // constant indices keep the arrays in registers
          v0[1] = off ? w0[3] : w0[1];
          v1[0] = off ? w1[2] : w1[0];
          v1[1] = off ? w1[3] : w1[1];
          v0[2] = v0[3] = v1[2] = v1[3] = 0u;
        }
#pragma unroll
        for (int j = 0; j < (kVdims >= 8 ? 2 : 1); ++j) {
          // M rows 0-7: pair 2j; rows 8-15: pair 2j+1. K (rows of the tile): 0-7 from row0, 8-15 from row1.
          const uint32_t a[4] = {transpose8x8(v0[2 * j]), transpose8x8(v0[2 * j + 1]), transpose8x8(v1[2 * j]),
                                 transpose8x8(v1[2 * j + 1])};
          mma16816(acc[0][u][j], a, pb[sub][0], pb[sub][1]);
          mma16816(acc[kAccSets - 1][u][j], a, pb[sub][2], pb[sub][3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  grid_dependency_trigger();

  // ---- epilogue: partial output (rotated domain), max and sum ----
  // acc[u][j][0/1]: coordinate c0' + 8u + 2(2j) + (r & 1), heads 2t, 2t+1, where c0' is the
  // slice start of thread r/2 of the quad that loaded it; [2/3]: pair 2j+1.
  const size_t head_stride = size_t(p.nsplit) * D;
  float* po = p.part_o + ((size_t(b) * p.num_q_heads + h0) * p.nsplit + split) * D;
  const float nanv = __int_as_float(0x7FC00000);
#pragma unroll
  for (int u = 0; u < kUnits; ++u)
#pragma unroll
    for (int j = 0; j < (kVdims >= 8 ? 2 : 1); ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int head = 2 * t + (e & 1);
        const int pair = 2 * j + (e >> 1);
        const int coord = warp * (D / 4) + (r >> 1) * kVdims + 8 * u + 2 * pair + (r & 1);
        const float val = kAccSets == 2 ? acc[0][u][j][e] + acc[kAccSets - 1][u][j][e] : acc[0][u][j][e];
        if (head < nh) po[head * head_stride + coord] = bad ? nanv : val;
      }
  if (warp == 0 && r == 0)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int head = 2 * t + e;
      if (head >= nh) continue;
      float* ml = p.part_ml + ((size_t(b) * p.num_q_heads + h0 + head) * p.nsplit + split) * 2;
      ml[0] = bad ? nanv : (e ? m_run1 : m_run0);
      ml[1] = bad ? nanv : (e ? l_run1 : l_run0);
    }
}

// Tile rows and pipeline depth per instance: 64-row tiles unless a stage would pass 48 KB;
// three stages when a stage is small (several blocks share an SM), else two.
template <int KT, int VT, int D>
struct Config {
  static constexpr int kRowBytes = int(fmt::row_stride(KT, D) + fmt::row_stride(VT, D)) + 8;
  static constexpr int TK = 64 * kRowBytes <= 48 * 1024 ? 64 : 32;
  static constexpr int kStageBytes = TK * kRowBytes;
  static constexpr int STAGES = kStageBytes <= 24 * 1024 ? 3 : 2;
  using Layout = Smem<KT, VT, D, TK, STAGES>;
};


// Launches one instance; the instance files (cuda/instances/) instantiate it.
template <int KT, int VT, int D>
void launch_attn(const AttnKernelParams& p, dim3 grid, cudaStream_t stream, bool pdl) {
  using C = Config<KT, VT, D>;
  auto* kernel = attn_decode_kernel<KT, VT, D, C::TK, C::STAGES>;
  const int bytes = C::Layout::kTotal;
  // Per function and device; cheap, and allowed while a graph is captured.
  TQKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  launch_ex(kernel, grid, dim3(kThreads), bytes, stream, pdl, p);
}

// Blocks of this instance that fit on one SM (the split count fills exactly whole waves).
template <int KT, int VT, int D>
int attn_blocks_per_sm_uncached() {
  using C = Config<KT, VT, D>;
  auto* kernel = attn_decode_kernel<KT, VT, D, C::TK, C::STAGES>;
  const int bytes = C::Layout::kTotal;
  TQKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  int n = 0;
  TQKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, bytes));
  return n > 0 ? n : 1;
}
template <int KT, int VT, int D>
int attn_blocks_per_sm() {
  static const int n = attn_blocks_per_sm_uncached<KT, VT, D>();  // per process: one device kind assumed
  return n;
}

#define TQKV_INSTANTIATE_ATTN_D(KT, VT, D)                                              \
  template void launch_attn<KT, VT, D>(const AttnKernelParams&, dim3, cudaStream_t, bool); \
  template int attn_blocks_per_sm<KT, VT, D>();
#define TQKV_INSTANTIATE_ATTN(KT, VT)     \
  TQKV_INSTANTIATE_ATTN_D(KT, VT, 64)     \
  TQKV_INSTANTIATE_ATTN_D(KT, VT, 128)    \
  TQKV_INSTANTIATE_ATTN_D(KT, VT, 256)    \
  TQKV_INSTANTIATE_ATTN_D(KT, VT, 512)

}  // namespace tqkv::cuda
