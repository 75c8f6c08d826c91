// Shared-memory stages of the table-lookup kernel's packed D = 128 loop (attn_lut_kernel.cuh,
// STAGED): each warp's chunks come in by cp.async three chunks ahead of their compute.
//
// Why (docs/cuda-kernel-notes.md, step 84): ptxas counts every global load of the loop on one
// scoreboard, and a wait on it waits for all of them, so chunks loaded into registers never have
// more than one in flight at a wait (step 80 ordered the loads so that that one is not lost);
// on the H200 a warp's chunk then took a loaded memory round trip (~1.4 us) where its compute
// takes ~0.8. cp.async groups are waited for by count: chunk j goes through stage j % 3, which
// the warp refills with chunk j + 3 right after reading chunk j into registers at the start of
// its compute, so each chunk has three chunks' compute to arrive. Stages 0 and 1 of a warp lie
// in the kernel's merge region (which the warp's merge rows reuse after its loop), stage 2 in
// the table's unused upper halves (bytes 128-255 of every 256-byte entry): 17 entries per warp,
// a stage offset o at 2 (o & ~127) + (o & 127) from the warp's first, so its 128-byte runs keep
// their banks and the reads and copies below take doubled immediates there.
//
// Lane l copies 16-byte pieces of the chunk's K rows and of its V rows (L1 bypassed) to stage
// offsets 16l and 16l + 512 of each plane's part, and one scale (4 bytes, the least a copy
// takes); the lanes then read each other's pieces, hence the warp barriers around the reads.
// A stage (bytes):
//   K at 0: row x at 64x, as stored, so a lane's fragment rows r, r + 8 are at 16l, 16l + 512.
//   V at 1024: rows 2p, 2p + 1 in the 128 bytes at 128p, row 2p + e in half e ^ h, its 16-byte
//     pieces rotated by 32 rho bytes within the half, (h, rho) = ((p & 3) >> 1, p & 1): the
//     fragment reads (8 bytes of rows 2t, 2t + 1, 2t + 8, 2t + 9 at byte 8r) then cover all 32
//     banks in each half-warp, where rows as stored put lanes t and t + 2 on the same banks. The
//     copies take their sources in that order, so that their destinations stay 16l.
//   Scales at 2048: {K r, K r + 8, V r, V r + 8} at 16r, one 16-byte read (f16: the 4-byte word
//     that holds the scale; the device cache pads the f16 array by 2 bytes for the last word).
#pragma once
#include <cstdint>

#include "cuda/attn_common.cuh"
#include "cuda/attn_lut_ops.cuh"

namespace tqkv::cuda {
namespace lut {

constexpr int kStageBytes = 2 * 16 * 64 + 128;  // 16 rows of K and of V (64 bytes each), 32 scales
constexpr int kStagePieces = kStageBytes / 128;  // table entries whose upper halves hold a warp's stage 2
static_assert(kStageBytes % 128 == 0, "stage 2 in 128-byte runs");

template <bool SF16>
struct Stages {
  static constexpr int KS = 64, kRows = 16;  // D = 128: row bytes; rows per chunk
  uint32_t st0;                               // this warp's stage 0 (shared window)
  uint32_t st_l, st_s, st_v;                  // 16l, the scale copy's slot, row 2t's V read
  uint32_t hl, hs, hv, hr;                    // the same in the third stage (the table's upper halves), and 16r's scales
  const uint8_t *k_l, *v_l, *s_l;             // this lane's copy sources for slot 0
  int64_t row_base;
  int r, vx, sx, n_my;
  uint32_t cap;
  bool ring;

  // warp_stages: the warp's stages 0 and 1; warp_hi: byte 128 of its first stage-2 table entry.
  __device__ __forceinline__ Stages(uint32_t warp_stages, uint32_t warp_hi, int lane, const AttnKernelParams& p, int64_t base, int n)
      : st0(warp_stages), row_base(base), r(lane >> 2), n_my(n), cap(p.capacity), ring(p.ring) {
    const int t = lane & 3;
    st_l = st0 + 16u * uint32_t(lane);
    st_s = st0 + 2048u + 4u * uint32_t(lane);
    const uint32_t vo = uint32_t(1024 + 128 * t + 64 * (t >> 1) + ((8 * r + 32 * (t & 1)) & 63));
    st_v = st0 + vo;
    // Third stage: offset o at warp_hi + 2 (o & ~127) + (o & 127) (128-byte pieces every 256).
    auto f = [&](uint32_t o) { return warp_hi + 2u * (o & ~127u) + (o & 127u); };
    hl = f(16u * uint32_t(lane));
    hs = f(2048u + 4u * uint32_t(lane));
    hv = f(vo);
    hr = f(2048u + 16u * uint32_t(r));
    // The V piece whose place is 16l: pair pp = l >> 3, half (l >> 2) & 1, rotated piece l & 3.
    const int pp = lane >> 3;
    vx = 2 * pp + (((lane >> 2) & 1) ^ ((pp & 3) >> 1));
    const int vsp = ((lane & 3) - 2 * (pp & 1)) & 3;
    sx = (lane >> 2) + 8 * (lane & 1);  // plane (lane >> 1) & 1
    constexpr uint32_t ss = SF16 ? 2 : 4;
    k_l = p.k_data + base * KS + KS * (lane >> 2) + 16 * t;
    v_l = p.v_data + base * KS + KS * vx + 16 * vsp;
    s_l = static_cast<const uint8_t*>((lane & 2) ? p.v_scales : p.k_scales) + (base + sx) * ss;
  }

  // A full chunk that does not wrap: rows at fixed offsets from slot s0.
  __device__ __forceinline__ bool whole(int rel, uint32_t s0) const {
    return rel + kRows <= n_my && (!ring || s0 + kRows <= cap);
  }
  // Slot of chunk row x: rows past the split's last take the last (finite data, weight 0), and
  // ring slots wrap.
  __device__ __forceinline__ uint32_t slot(int rel, uint32_t s0, int x) const {
    uint32_t s = s0 + uint32_t(min(x, n_my - 1 - rel));
    if (ring)
      while (s >= cap) s -= cap;
    return s;
  }

  // Copies chunk rel (slot s0) into stage S (0, 1 in the merge region; 2 in the table's halves).
  template <int S>
  __device__ __forceinline__ void issue(int rel, uint32_t s0) const {
    constexpr uint32_t M = S == 2 ? 2 : 1, so = S == 1 ? uint32_t(kStageBytes) : 0u;
    const uint32_t bl = S == 2 ? hl : st_l + so, bs = S == 2 ? hs : st_s + so;
    constexpr uint32_t ss = SF16 ? 2 : 4;
    const uint8_t *k0 = k_l + size_t(s0) * KS, *k1 = k0 + 8 * KS;
    const uint8_t *v0 = v_l + size_t(s0) * KS, *v1 = v0 + 8 * KS;
    const uint8_t* sc = s_l + size_t(s0) * ss;
    if (!whole(rel, s0)) {  // each row on its own: what to add to its pointer
      auto at = [&](int x) { return int64_t(slot(rel, s0, x)) - int64_t(s0) - x; };
      k0 += at(r) * KS;
      k1 += at(r + 8) * KS;
      v0 += at(vx) * KS;
      v1 += at(vx + 8) * KS;
      sc += at(sx) * int64_t(ss);
    }
    cp_async16(bl, k0);
    cp_async16(bl + 512 * M, k1);
    cp_async16(bl + 1024 * M, v0);
    cp_async16(bl + 1536 * M, v1);
    cp_async4(bs, reinterpret_cast<const uint8_t*>(uintptr_t(sc) & ~uintptr_t(3)));
  }

  // Chunk rel (slot s0) from stage S into the registers the kernel computes on.
  template <int S, class Ch>
  __device__ __forceinline__ void read(Ch& c, int rel, uint32_t s0) const {
    constexpr uint32_t M = S == 2 ? 2 : 1, so = S == 1 ? uint32_t(kStageBytes) : 0u;
    const uint32_t bl = S == 2 ? hl : st_l + so, bv = S == 2 ? hv : st_v + so;
    const uint32_t br = S == 2 ? hr : st0 + so + 2048u + 16u * uint32_t(r);
    const uint4 k0 = lds_u4(bl), k1 = lds_u4(bl + 512 * M);
    c.k[0][0] = k0.x, c.k[0][1] = k0.y, c.k[0][2] = k0.z, c.k[0][3] = k0.w;
    c.k[1][0] = k1.x, c.k[1][1] = k1.y, c.k[1][2] = k1.z, c.k[1][3] = k1.w;
    const uint2 v0 = lds_u2(bv), v1 = lds_u2(bv ^ 64u);  // rows 2t, 2t + 1
    const uint2 v2 = lds_u2(bv + 512 * M), v3 = lds_u2((bv ^ 64u) + 512 * M);
    c.v[0][0] = v0.x, c.v[0][1] = v0.y, c.v[1][0] = v1.x, c.v[1][1] = v1.y;
    c.v[2][0] = v2.x, c.v[2][1] = v2.y, c.v[3][0] = v3.x, c.v[3][1] = v3.y;
    const uint4 sw = lds_u4(br);
    if constexpr (SF16) {  // the half of each word that holds the row's scale
      uint32_t x0 = s0 + uint32_t(r), x1 = x0 + 8u;
      if (!whole(rel, s0)) {
        x0 = slot(rel, s0, r);
        x1 = slot(rel, s0, r + 8);
      }
      const uint32_t sh0 = uint32_t((row_base + x0) & 1) * 16u, sh1 = uint32_t((row_base + x1) & 1) * 16u;
      c.kn[0] = (sw.x >> sh0) & 0xFFFFu;
      c.kn[1] = (sw.y >> sh1) & 0xFFFFu;
      c.vn[0] = (sw.z >> sh0) & 0xFFFFu;
      c.vn[1] = (sw.w >> sh1) & 0xFFFFu;
    } else {
      c.kn[0] = __uint_as_float(sw.x);
      c.kn[1] = __uint_as_float(sw.y);
      c.vn[0] = __uint_as_float(sw.z);
      c.vn[1] = __uint_as_float(sw.w);
    }
  }
};

}  // namespace lut
}  // namespace tqkv::cuda
