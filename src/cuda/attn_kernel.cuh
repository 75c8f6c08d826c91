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
#include <cuda_fp16.h>

#include <cstdint>

#include "core/format.h"
#include "cuda/check.cuh"
#include "cuda/codec.cuh"

namespace tqkv::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
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
  uint32_t window;
  float scale, softcap;
  int k_scale_f16, v_scale_f16, centered;
};

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
  static constexpr int kQf = kHeadsPerBlock * D * 4;           // f32 query during rotation
  static constexpr int kS = TK * kHeadsPerBlock * 4;           // scores of one tile
  static constexpr int kLut = 2 * 256 * 2;                     // TQ8 tables for K and V
  static constexpr int kMisc = 4 * kHeadsPerBlock * 4;         // per-head constants
  static constexpr int kTotal = kStages + kQ + kQf + kS + kLut + kMisc;
};

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
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
  return r;
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
  float* qf = reinterpret_cast<float*>(smem + L::kStages + L::kQ);
  float* s_tile = reinterpret_cast<float*>(smem + L::kStages + L::kQ + L::kQf);  // [TK][8]
  __half* lut = reinterpret_cast<__half*>(smem + L::kStages + L::kQ + L::kQf + L::kS);
  float* misc = reinterpret_cast<float*>(smem + L::kStages + L::kQ + L::kQf + L::kS + L::kLut);
  float* q_unscale = misc;                   // [8]: undoes the power-of-two query scaling
  float* bias = misc + kHeadsPerBlock;       // [8]: scale * q . mu (key centering)

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const uint32_t split = blockIdx.x, hkv_idx = blockIdx.y / p.head_chunks, chunk = blockIdx.y % p.head_chunks;
  const uint32_t b = blockIdx.z;
  const uint32_t h0 = hkv_idx * p.group + chunk * kHeadsPerBlock;  // first query head of the block
  const int nh = min(int(p.group - chunk * kHeadsPerBlock), kHeadsPerBlock);

  // ---- visible range of this sequence, then this split's slice of it ----
  const int64_t len = p.lengths[b];
  const int64_t qp = p.q_pos ? p.q_pos[b] : len - 1;
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
  if (hi < lo) hi = lo;
  const int64_t n = hi - lo;
  const int64_t per = ((n + p.nsplit - 1) / p.nsplit + TK - 1) / TK * TK;
  const int64_t my_lo = lo + int64_t(split) * per, my_hi = min(hi, my_lo + per);
  const int64_t row_base = (int64_t(b) * p.hkv + hkv_idx) * p.capacity;

  // ---- prologue: rotate and scale the query heads, build tables ----
  for (int i = tid; i < kHeadsPerBlock * D; i += kThreads) {
    const int h = i / D, c = i % D;
    float x = 0.0f;
    if (h < nh) x = p.q[(size_t(b) * p.num_q_heads + h0 + h) * D + c] * p.scale;
    if (KC::kRotated) x *= p.signs[c];
    qf[i] = x;
  }
  if (tid < kHeadsPerBlock) bias[tid] = 0.0f;
  __syncthreads();
  if (p.centered) {  // bias = scale * q . mu, in the original domain (before the rotation below)
    const float* mu = p.centers + (size_t(b) * p.hkv + hkv_idx) * D;
    for (int h = warp; h < kHeadsPerBlock; h += kWarps) {
      float acc = 0.0f;
      for (int c = lane; c < D; c += 32) acc += (KC::kRotated ? qf[h * D + c] * p.signs[c] : qf[h * D + c]) * mu[c];
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, o);
      if (lane == 0) bias[h] = acc;
    }
    __syncthreads();  // the rotation below overwrites qf
  }
  if (KC::kRotated) {
    for (int len2 = 1; len2 < D; len2 <<= 1) {
      for (int i = tid; i < kHeadsPerBlock * D / 2; i += kThreads) {
        const int h = i / (D / 2), j = i % (D / 2);
        const int a = h * D + (j / len2) * 2 * len2 + (j % len2), c = a + len2;
        const float x = qf[a], y = qf[c];
        qf[a] = x + y;
        qf[c] = x - y;
      }
      __syncthreads();
    }
  }
  __syncthreads();
  // Rotated coordinates (FWHT / sqrt(D)) times 1/sqrt(D) for centroid units: 1/D in all.
  const float post = KC::kRotated ? 1.0f / float(D) : 1.0f;
  for (int h = warp; h < kHeadsPerBlock; h += kWarps) {
    float mx = 0.0f;
    for (int c = lane; c < D; c += 32) mx = fmaxf(mx, fabsf(qf[h * D + c] * post));
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
    // Power-of-two scaling keeps the f16 parts normal: max |q| lands in [2^13, 2^14).
    int e = 0;
    frexpf(mx > 0.0f ? mx : 1.0f, &e);
    const float up = ldexpf(1.0f, 14 - e);
    if (lane == 0) {
      q_unscale[h] = 1.0f / up;
      misc[3 * kHeadsPerBlock + h] = up * post;
    }
  }
  __syncthreads();
  // Fragment order: thread (r = head, t) of k-step s reads logical coordinates t*D/4 + 4s + 0..3.
  for (int i = tid; i < kHeadsPerBlock * D / 4; i += kThreads) {
    const int s = i / (4 * kHeadsPerBlock), t = (i / kHeadsPerBlock) % 4, h = i % kHeadsPerBlock;
    const float mul = misc[3 * kHeadsPerBlock + h];
    const float* src = qf + h * D + t * (D / 4) + 4 * s;
    uint32_t h0w, l0w, h1w, l1w;
    split_half2(src[0] * mul, src[1] * mul, h0w, l0w);
    split_half2(src[2] * mul, src[3] * mul, h1w, l1w);
    uint4* dst = reinterpret_cast<uint4*>(q_hl) + i;
    *dst = make_uint4(h0w, h1w, l0w, l1w);
  }
  if (KT == fmt::TQ8)
    for (int i = tid; i < 256; i += kThreads) lut[i] = __float2half_rn(p.k_centroids[i]);
  if (VT == fmt::TQ8)
    for (int i = tid; i < 256; i += kThreads) lut[256 + i] = __float2half_rn(p.v_centroids[i]);
  __syncthreads();
  typename KC::Table kt;
  typename VC::Table vt;
  KC::init(kt, p.k_centroids, lut);
  VC::init(vt, p.v_centroids, lut + 256);

  // ---- the tile pipeline ----
  const int ntiles = my_hi > my_lo ? int((my_hi - my_lo + TK - 1) / TK) : 0;
  const uint8_t* kbase = p.k_data + row_base * L::kStrideK;
  const uint8_t* vbase = p.v_data + row_base * L::kStrideV;
  const int kss = p.k_scale_f16 ? 2 : 4, vss = p.v_scale_f16 ? 2 : 4;
  const uint8_t* ksb = static_cast<const uint8_t*>(p.k_scales);
  const uint8_t* vsb = static_cast<const uint8_t*>(p.v_scales);
  auto issue = [&](int tile) {
    if (tile < ntiles) {
      uint8_t* st = stages + (tile % STAGES) * L::kStage;
      const int64_t t0 = my_lo + int64_t(tile) * TK;
      constexpr int ck = L::kStrideK / 16, cv = L::kStrideV / 16;
      for (int c = tid; c < TK * (ck + cv); c += kThreads) {
        const bool isk = c < TK * ck;
        const int cc = isk ? c : c - TK * ck, per_row = isk ? ck : cv;
        const int r = cc / per_row, off = (cc % per_row) * 16;
        const int64_t pos = t0 + r;
        const bool valid = pos < my_hi;
        int64_t slot = p.ring ? pos % int64_t(p.capacity) : pos;
        if (!valid) slot = 0;
        const uint8_t* src = (isk ? kbase + slot * L::kStrideK : vbase + slot * L::kStrideV) + off;
        uint8_t* dst = st + (isk ? r * L::kStrideK : L::kTileK + r * L::kStrideV) + off;
        cp_async16(dst, src, valid);
      }
      if (tid < 2 * TK) {  // one scale word per row (TQ types; dense rows have none)
        const bool isk = tid < TK;
        const int r = isk ? tid : tid - TK;
        const int64_t pos = t0 + r;
        const bool has = isk ? fmt::is_tq(KT) : fmt::is_tq(VT);
        const bool valid = pos < my_hi && has;
        const int64_t slot = valid ? (p.ring ? pos % int64_t(p.capacity) : pos) : 0;
        const int64_t idx = row_base + slot;
        const int ss = isk ? kss : vss;
        const uint8_t* src = (isk ? ksb : vsb) + ((idx * ss) & ~int64_t(3));
        uint8_t* dst = st + L::kTileK + L::kTileV + (isk ? 0 : TK * 4) + r * 4;
        if (has) cp_async4(dst, valid ? src : (isk ? ksb : vsb), valid);
      }
    }
    cp_async_commit();
  };
  for (int s = 0; s < STAGES - 1; ++s) issue(s);

  const int r = lane >> 2, t = lane & 3;  // mma fragment coordinates
  float m_run = -INFINITY, l_run = 0.0f;   // for head r (every warp holds the same)
  constexpr int kUnits = D / 128 > 0 ? D / 128 : 1;  // 8-coordinate units of a warp's V slice per thread
  constexpr int kVdims = D / 16;                     // coordinates of the V slice per thread
  float acc[kUnits][2][4];
#pragma unroll
  for (int u = 0; u < kUnits; ++u)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[u][j][e] = 0.0f;
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
    auto parity = [&](int rr, int f16) -> int {
      if (!f16) return 0;
      const int64_t pos = t0 + rr;
      const int64_t slot = p.ring ? pos % int64_t(p.capacity) : pos;
      return 1 + int((row_base + slot) & 1);
    };

    // ---- QK: warp w scores rows [16w, 16w+16) ----
    if (warp * 16 < TK) {
      float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const uint8_t* row0 = ks + (warp * 16 + r) * L::kStrideK;
      const uint8_t* row1 = row0 + 8 * L::kStrideK;
      const uint4* qfrag = reinterpret_cast<const uint4*>(q_hl);
#pragma unroll 4
      for (int u = 0; u < D / 32; ++u) {  // 8 coordinates of each row per unit = 2 k-steps
        uint32_t a0[4], a1[4];
        KC::decode8(kt, row0, t * (D / 4) + 8 * u, D, a0);
        KC::decode8(kt, row1, t * (D / 4) + 8 * u, D, a1);
#pragma unroll
        for (int ss = 0; ss < 2; ++ss) {
          const int s = 2 * u + ss;
          const uint4 qv = qfrag[(s * 4 + t) * kHeadsPerBlock + r];
          const uint32_t a[4] = {a0[2 * ss], a1[2 * ss], a0[2 * ss + 1], a1[2 * ss + 1]};
          mma16816(c, a, qv.x, qv.y);  // hi part of the query
          mma16816(c, a, qv.z, qv.w);  // lo part
        }
      }
      // c0, c1: row r, heads 2t, 2t+1; c2, c3: row r + 8.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int rr = warp * 16 + r + 8 * half;
        const int64_t pos = t0 + rr;
        float ksc = 1.0f;
        if (fmt::is_tq(KT)) ksc = load_scale_word(kscale, rr, parity(rr, p.k_scale_f16));
        float x0 = c[2 * half] * qun * ksc + bias0, x1 = c[2 * half + 1] * qun1 * ksc + bias1;
        if (p.softcap > 0.0f) {
          x0 = p.softcap * tanhf(x0 / p.softcap);
          x1 = p.softcap * tanhf(x1 / p.softcap);
        }
        x0 *= log2e;
        x1 *= log2e;
        if (pos >= my_hi) x0 = x1 = -INFINITY;
        *reinterpret_cast<float2*>(s_tile + rr * kHeadsPerBlock + 2 * t) = make_float2(x0, x1);
      }
    }
    __syncthreads();

    // ---- online softmax (head r; the 4 lanes of a quad share a head) ----
    constexpr int kSub = TK / 16;
    float sv[kSub][4];
    float tmax = -INFINITY;
#pragma unroll
    for (int sub = 0; sub < kSub; ++sub) {
      const int base = sub * 16 + 2 * t;
      sv[sub][0] = s_tile[(base + 0) * kHeadsPerBlock + r];
      sv[sub][1] = s_tile[(base + 1) * kHeadsPerBlock + r];
      sv[sub][2] = s_tile[(base + 8) * kHeadsPerBlock + r];
      sv[sub][3] = s_tile[(base + 9) * kHeadsPerBlock + r];
#pragma unroll
      for (int e = 0; e < 4; ++e) tmax = fmaxf(tmax, sv[sub][e]);
    }
    tmax = fmaxf(tmax, __shfl_xor_sync(0xFFFFFFFFu, tmax, 1));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xFFFFFFFFu, tmax, 2));
    const float m_new = fmaxf(m_run, tmax);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = exp2f(m_run - m_use);
    float psum = 0.0f;
    uint32_t pb[kSub][4];  // per sub: b0 hi, b1 hi, b0 lo, b1 lo
#pragma unroll
    for (int sub = 0; sub < kSub; ++sub) {
      float pe[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        pe[e] = exp2f(sv[sub][e] - m_use);
        psum += pe[e];
      }
      const int base = sub * 16 + 2 * t;
      const int rows[4] = {base, base + 1, base + 8, base + 9};
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (fmt::is_tq(VT)) pe[e] *= load_scale_word(vscale, rows[e], parity(rows[e], p.v_scale_f16)) * vmul;
      split_half2(pe[0], pe[1], pb[sub][0], pb[sub][2]);
      split_half2(pe[2], pe[3], pb[sub][1], pb[sub][3]);
    }
    psum += __shfl_xor_sync(0xFFFFFFFFu, psum, 1);
    psum += __shfl_xor_sync(0xFFFFFFFFu, psum, 2);
    l_run = l_run * alpha + psum;
    m_run = m_new;
    // Rescale the output accumulators: columns are heads 2t and 2t+1, whose alphas live in the
    // quads of lanes 8t and 8t+4.
    const float al0 = __shfl_sync(0xFFFFFFFFu, alpha, 8 * t), al1 = __shfl_sync(0xFFFFFFFFu, alpha, 8 * t + 4);
#pragma unroll
    for (int u = 0; u < kUnits; ++u)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        acc[u][j][0] *= al0;
        acc[u][j][1] *= al1;
        acc[u][j][2] *= al0;
        acc[u][j][3] *= al1;
      }

    // ---- PV: this warp's coordinates [warp*D/4, ...), this thread's kVdims of them ----
    const int c0 = warp * (D / 4) + t * kVdims;
#pragma unroll
    for (int sub = 0; sub < kSub; ++sub) {
      const uint8_t* row0 = vs + (sub * 16 + r) * L::kStrideV;
      const uint8_t* row1 = row0 + 8 * L::kStrideV;
#pragma unroll
      for (int u = 0; u < kUnits; ++u) {
        uint32_t v0[4], v1[4];
        if constexpr (kVdims >= 8) {
          VC::decode8(vt, row0, c0 + 8 * u, D, v0);
          VC::decode8(vt, row1, c0 + 8 * u, D, v1);
        } else {  // D = 64: 4 coordinates per thread; decode the aligned 8 and keep our half
          uint32_t w0[4], w1[4];
          const int base8 = c0 & ~7, off = (c0 & 7) / 2;
          VC::decode8(vt, row0, base8, D, w0);
          VC::decode8(vt, row1, base8, D, w1);
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
          mma16816(acc[u][j], a, pb[sub][0], pb[sub][1]);
          mma16816(acc[u][j], a, pb[sub][2], pb[sub][3]);
        }
      }
    }
  }
  cp_async_wait<0>();

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
        if (head < nh) po[head * head_stride + coord] = bad ? nanv : acc[u][j][e];
      }
  if (warp == 0 && t == 0 && r < nh) {
    float* ml = p.part_ml + ((size_t(b) * p.num_q_heads + h0 + r) * p.nsplit + split) * 2;
    ml[0] = bad ? nanv : m_run;
    ml[1] = bad ? nanv : l_run;
  }
}

// Tile rows and pipeline depth per instance: 64-row tiles unless a stage would pass 48 KB,
// and as many stages (2..4) as fit in about 96 KB, so that two blocks share an SM.
template <int KT, int VT, int D>
struct Config {
  static constexpr int kRowBytes = int(fmt::row_stride(KT, D) + fmt::row_stride(VT, D)) + 8;
  static constexpr int TK = 64 * kRowBytes <= 48 * 1024 ? 64 : 32;
  static constexpr int kStageBytes = TK * kRowBytes;
  static constexpr int STAGES = (96 * 1024) / kStageBytes >= 4 ? 4 : (96 * 1024) / kStageBytes >= 3 ? 3 : 2;
  using Layout = Smem<KT, VT, D, TK, STAGES>;
};

// Launches one instance; the instance files (cuda/instances/) instantiate it.
template <int KT, int VT, int D>
void launch_attn(const AttnKernelParams& p, dim3 grid, cudaStream_t stream) {
  using C = Config<KT, VT, D>;
  auto* kernel = attn_decode_kernel<KT, VT, D, C::TK, C::STAGES>;
  const int bytes = C::Layout::kTotal;
  // Per function and device; cheap, and allowed while a graph is captured.
  TQKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  TQKV_CUDA_LAUNCHED("attn_decode_kernel");
}

#define TQKV_INSTANTIATE_ATTN(KT, VT)                                                       \
  template void launch_attn<KT, VT, 64>(const AttnKernelParams&, dim3, cudaStream_t);  \
  template void launch_attn<KT, VT, 128>(const AttnKernelParams&, dim3, cudaStream_t); \
  template void launch_attn<KT, VT, 256>(const AttnKernelParams&, dim3, cudaStream_t); \
  template void launch_attn<KT, VT, 512>(const AttnKernelParams&, dim3, cudaStream_t);

}  // namespace tqkv::cuda
