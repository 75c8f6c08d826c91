// Decode attention for 4-bit TurboQuant K and V (head_dim 64-512) with no per-tile block
// barriers: every warp streams its own chunks (16 rows; 8 with TWIN) from global memory into
// registers, in the byte order the mma fragments want (the packed D = 128 variant through three
// shared-memory stages of its own, attn_lut_stage.cuh), and keeps its own running max, sum and
// output; the block merges its warps once at the end.
//
// Why (docs/cuda-kernel-notes.md, "The table-lookup kernel"): the tile kernel (attn_kernel.cuh) spent ~950
// instructions per warp per 16 rows, a third of them on the 4-bit decode with byte permutes
// (three integer-pipe operations per value, and that pipe is half width). Here a whole byte
// (two indices) is decoded by one shared-memory load from a 256-entry table of f16 pairs
// (one copy per bank, so the 32 lanes never conflict), and the rest of the tile machinery
// (cp.async, swizzles, barriers, scores through shared memory) is gone.
//
// Fragment layout (lane = 4r + t; D here is a warp's slice of the row, DS <= 256, see Layout):
//   QK: A = K rows (r, r+8) of the chunk; the lane loads bytes [t*D/8, (t+1)*D/8) of each row,
//       and k-step s uses bytes 2s, 2s+1: coordinates t*D/4 + 4s + 0..3 (the query is laid out
//       to match, as in the tile kernel). B = query heads (hi + lo f16 parts; PACK: both in one
//       B, see the kernel).
//   PV: A = V^T: the lane loads bytes [r*D/16, (r+1)*D/16) of rows 2t, 2t+1, 2t+8, 2t+9; the
//       nibbles of two rows at one coordinate are merged into one byte, so one table load gives
//       the (row 2t, row 2t+1) pair the fragment wants. M-tile i, row m = r is coordinate
//       r*D/8 + 2i, m = r+8 is r*D/8 + 2i + 1. B = the weights, transposed in registers with
//       movmatrix.
//   TWIN (D = 256 with at most 2 heads, see Layout): the same with D = 128 per half, 8 rows a
//   step, and fragment rows r + 8 (K) and 2t + 8, 2t + 9 (V) the second halves of rows r and
//   2t, 2t + 1.
#pragma once
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/attn_common.cuh"
#include "cuda/attn_lut_ops.cuh"
#include "cuda/attn_lut_stage.cuh"

namespace tqkv::cuda {
namespace lut {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;                       // rows per warp step (the mma's m)
// The pair table: entry e for lane l at byte e*256 + 4l, so a single byte permute forms a
// lookup's whole address (lane offset in the low byte, the stored byte above it) and every lane
// reads its own bank. K and V share it: both planes of a cache quantize with one codebook (same
// bits, head_dim and codebook choice), which the host checks (Instance::one_table). Bytes
// 128-255 of each entry's 256 are unused: the permute's address wants the 256-byte stride.
constexpr int kTableBytes = 256 * 256;
constexpr int kMinRowsPerSplit = kWarps * kRows;  // every group (every warp at D <= 128) gets a chunk
constexpr uint32_t kPackMaxHeads = 4;  // query heads per KV head up to which PACK applies
constexpr uint32_t kTwinMaxHeads = 2;  // and TWIN (D = 256; see Layout)

// Heads wider than 128 are cut into slices, one warp per slice: the NS warps of a group take the
// same rows, add their partial scores through shared memory (one named barrier per chunk) and
// each accumulates its own slice of the output. Whole rows per warp needed 243 registers at
// D = 256 and more than a thread has at D = 512. D = 256: two slices of 128, so a warp holds what
// it holds at D = 128 (128 registers, two blocks per SM; as fast as whole rows). D = 512: two
// slices of 256 (252 registers, one block per SM), faster than four of 128, which spilled and
// repeated the softmax four times (docs/cuda-kernel-notes.md, steps 39-40).
template <int D>
constexpr int kSlice = D <= 128 ? D : D == 512 ? 256 : 128;

// SEP: the merge buffer has its own region after the tables, for blocks of at most
// kPackMaxHeads heads (PACK) up to D = 128 and of kTwinMaxHeads with TWIN, where it is small
// enough for two blocks to share an SM still; the warps then store their outputs into it as
// soon as their loops end and the block merges them after a single barrier (TWIN: 0.3-0.4 us
// off a call, H100). Without SEP it reuses the tables' region (8 heads: 50 KB at D = 128),
// which every warp must be done with first, so the merge takes two barriers. (At D = 256 in
// slices the single-barrier merge spilled 16 bytes.)
template <int D, bool PACK, bool TWIN = false>
constexpr bool kSepMerge = PACK && (D <= 128 || TWIN);
// TWIN (D = 256, at most 2 query heads per block): a warp takes whole rows, 8 per step, and
// the mma's 16 rows are each row's two halves of 128 coordinates (rows r and r + 8 of the
// fragments: row r's halves). The query's columns are then (lo part, head, half), so of the
// four scores a lane's QK fragment holds, two are a row's halves against their own half of the
// query (added in registers) and two are cross terms left unused; PV gives each half its own
// columns by zeroing the other half's weights. A warp's chunk is then the packed D = 128 chunk
// (2 KB, the same registers and mma count) with no partial scores through shared memory and no
// barrier per chunk, where slices of 128 (below) need both.
// STAGED (the packed D = 128 variant): each warp's chunks come through three stages of shared
// memory (attn_lut_stage.cuh): two here, whose space the warp's merge rows reuse after its
// loop, and one in the table's unused upper halves.
// (TWIN, whose chunks have the same shape, was 6% faster so with f16 scales and level or slower
// with f32 ones, where it spilled: kernel notes, step 84.)
template <int D, bool PACK, bool TWIN = false>
constexpr bool kStaged = PACK && !TWIN && D == 128;
template <int D, bool SEP = false, bool TWIN = false, bool STAGED = false>
struct Layout {
  static constexpr int DS = TWIN ? D / 2 : kSlice<D>;   // coordinates per warp (TWIN: per half)
  static constexpr int NS = TWIN ? 1 : D / DS;          // warps per group (slices of a row)
  static constexpr int kGroups = kWarps / NS;           // groups: each streams its own chunks
  static constexpr int kSteps = DS / 16;                // QK k-steps = PV m-tiles of a slice
  // Merge buffer [group][head][column]. D >= 128: coordinate c sits at column mcol(c), four
  // floats of padding after each run of DS/8 (what one lane row r of the accumulators holds),
  // and rows of heads 4 (mod 32) floats apart: the warps' float2 stores then take 4 wavefronts
  // each at most, against 16 with rows D + 8 apart, where every lane row r fell on the same
  // banks (D = 512: 51 -> 44 us at S = 32768 with the prologue's loads, kernel notes step 44),
  // while the float4 reads stay contiguous and aligned. At D = 128 it takes 0.3-0.5 us off a
  // call (H100); it had been slower for calls back to back with one block per SM and 3-4 chunks
  // per warp, until such grids took enough shared memory to stay one block per SM (attend's
  // smem_floor; kernel notes steps 48, 61 and 64).
  static constexpr bool kPadRuns = D >= 128;
  static constexpr int kRun = DS / 8;
  static constexpr int kHeadStride = kPadRuns ? D + (D / kRun) * 4 + 4 : D + 8;
  __host__ __device__ static constexpr int mcol(int c) { return kPadRuns ? c + (c / kRun) * 4 : c; }
  static_assert(!kPadRuns || (kRun % 4 == 0 && kHeadStride % 32 == 4), "merge layout");
  static constexpr int kMergeHeads = SEP ? int(TWIN ? kTwinMaxHeads : kPackMaxHeads) : kHeadsPerBlock;
  static constexpr int kStagesWarp = 2 * kStageBytes;
  // Floats from one group's merge rows to the next (STAGED: a warp's own stages).
  static constexpr int kGroupFloats = STAGED ? kStagesWarp / 4 : kMergeHeads * kHeadStride;
  static constexpr int kMerge = STAGED ? kWarps * kStagesWarp : kGroups * kGroupFloats * 4;
  static constexpr int kMergeAt = SEP ? kTableBytes : 0;  // byte offset of the merge buffer
  static constexpr int kQ = (D / 16) * 32 * 16;         // uint4 per (k-step, lane)
  static constexpr int kXWarp = 32 * 16;                        // one warp's partial scores: a float4 per lane
  static constexpr int kX = NS > 1 ? 2 * kWarps * kXWarp : 0;  // two chunks' worth
  static constexpr int kMisc = (2 + 2 * kWarps) * kHeadsPerBlock * 4;
  static constexpr int kRegion = SEP ? kTableBytes + kMerge : kTableBytes > kMerge ? kTableBytes : kMerge;
  static constexpr int kBytes = kRegion + kQ + kX + kMisc;
  static_assert(kWarps % NS == 0, "whole groups per block");
  static_assert(!STAGED || (SEP && NS == 1 && D == 128 && kMergeHeads * kHeadStride * 4 <= kStagesWarp), "staged layout");
};

template <int D, bool SF16>
struct Chunk {
  static constexpr int KW = D / 32;  // 32-bit words of one K row per lane (D/8 bytes)
  static constexpr int VW = D / 64;  // of one V row per lane (D/16 bytes)
  uint32_t k[2][KW];                 // rows r, r+8
  uint32_t v[4][VW];                 // rows 2t, 2t+1, 2t+8, 2t+9
  // Scales of rows r, r+8 as stored (f16: its bits; scale_of converts).
  std::conditional_t<SF16, uint32_t, float> kn[2], vn[2];
};

// MINB: resident blocks per SM asked of the register allocator (2 caps a thread at 128).
// SF16: the row scales are f16 (else f32); one configuration field sets both planes.
// PACK (at most 4 query heads per block): the mma's 8 head columns carry both the hi and the lo
// parts of the heads (ONEH below: head h in columns 2h, 2h + 1), so QK and PV take one mma per
// step instead of two (hi and lo). With 4 or fewer heads those columns were zero padding.
template <int D, int MINB, bool SF16, bool PACK, bool TWIN = false>
__global__ void __launch_bounds__(kThreads, MINB) attn_lut_kernel(const AttnKernelParams p) {
  static_assert(!TWIN || (PACK && D == 256), "TWIN: D = 256 with packed heads");
  constexpr bool SEP = kSepMerge<D, PACK, TWIN>;
  // One head per lane in the loop (see the query's columns below): halves the softmax's work per
  // chunk and takes a shuffle off its chain.
  constexpr bool ONEH = PACK && !TWIN && D != 256;
  constexpr bool STAGED = kStaged<D, PACK, TWIN>;
  using Lay = Layout<D, SEP, TWIN, STAGED>;
  constexpr int R = TWIN ? kRows / 2 : kRows;  // rows per warp step
  constexpr int DS = Lay::DS, NS = Lay::NS, G = Lay::kGroups;
  using Ch = Chunk<DS, SF16>;
  constexpr int S = Lay::kSteps;
  // Slices wider than 128 read the query from shared memory in the loop (kQHi below), so its
  // fragments are stored swizzled there (qslot), which the prologue writes without conflicts.
  constexpr bool kQSwz = DS > 128;
  constexpr int KS = D / 2, VS = D / 2;  // row strides of TQ4 rows (D/2 bytes, 16-aligned)
  extern __shared__ __align__(16) uint8_t smem[];
  const uint8_t* tab = smem;
  float* merge = reinterpret_cast<float*>(smem + Lay::kMergeAt);  // without SEP: the tables' region
  uint32_t* q_hl = reinterpret_cast<uint32_t*>(smem + Lay::kRegion);
  float* misc = reinterpret_cast<float*>(smem + Lay::kRegion + Lay::kQ + Lay::kX);
  float* q_unscale = misc;
  float* bias = misc + kHeadsPerBlock;
  float* wm = bias + kHeadsPerBlock;       // [warp][head]
  float* wl = wm + kWarps * kHeadsPerBlock;  // [warp][head]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int slice = warp % NS, grp = warp / NS;
  const uint32_t split = blockIdx.x, hkv_idx = blockIdx.y / p.head_chunks, hchunk = blockIdx.y % p.head_chunks;
  const uint32_t b = blockIdx.z;
  const uint32_t h0 = hkv_idx * p.group + hchunk * kHeadsPerBlock;
  const int nh = min(int(p.group - hchunk * kHeadsPerBlock), kHeadsPerBlock);

  // The table: thread e makes entry e and writes its 32 replicas, 16 bytes at a time (rotated by
  // e so the stores of a warp spread over the banks). It comes from the kernel parameters only,
  // so it is built before griddepcontrol.wait, while the previous kernel on the stream may still
  // run. Built here: copying it from L2 was no faster (docs/cuda-kernel-notes.md, step 17).
  static_assert(kThreads == 256, "one thread per table entry");
  {
    uint32_t pair, unused;
    lookup4_16(p.k_tab, uint32_t(tid), pair, unused);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int part = (j + tid) & 7;  // uint4 `part` of the entry's first 128 bytes
      reinterpret_cast<uint4*>(smem)[tid * 16 + part] = make_uint4(pair, pair, pair, pair);
    }
  }
  constexpr uint32_t kss = SF16 ? 2 : 4, vss = kss;  // bytes of a row's scale
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // While the previous kernel on the stream ends, ask L2 for the first two chunks this group will
  // read (its K and V rows and their scales). That kernel (an append, say) may still change
  // the length, so the rows are a guess: a wrong one costs L2 traffic, never a wrong result.
  // Wide heads only: at D = 256 and 512 it took 0.3-1.2 us off a call (H100); at D = 128 the
  // same code, even switched off, made the kernel ~1 us slower at S = 131072 (kernel notes,
  // step 63).
  if constexpr (D >= 256) {
    if (slice == 0 && p.prefetch) {
      const Slice g = split_slice<true>(p, b, split, R);
      // row_base below, again: computing that one here, before the wait, changed the compiled kernels.
      const int64_t base = (int64_t(b) * p.hkv + hkv_idx) * p.capacity;
      constexpr int kLines = R * D / 256;  // 128-byte lines of a chunk's R rows of D/2 bytes
      for (int c = 0; c < 2; ++c) {
        const int64_t rel = int64_t(grp + c * G) * R;
        if (g.lo + rel >= g.hi) break;
        const int64_t s0 = p.ring ? (g.lo + rel) % int64_t(p.capacity) : g.lo + rel;
        if (s0 + R > int64_t(p.capacity)) continue;  // wraps (the next chunk may not), or not stored
        const uint8_t* kc = p.k_data + (base + s0) * (D / 2);
        const uint8_t* vc = p.v_data + (base + s0) * (D / 2);
        for (int i = lane; i < kLines; i += 32) {
          asm volatile("prefetch.global.L2 [%0];" ::"l"(kc + 128 * i));
          asm volatile("prefetch.global.L2 [%0];" ::"l"(vc + 128 * i));
        }
        if (lane < 2) {  // the scales of rows s0 and s0 + R - 1 (at most two lines)
          const int64_t at = (base + s0 + (R - 1) * lane) * kss;
          const uint8_t* ks = static_cast<const uint8_t*>(p.k_scales) + at;
          const uint8_t* vs = static_cast<const uint8_t*>(p.v_scales) + at;
          asm volatile("prefetch.global.L2 [%0];" ::"l"(ks));
          asm volatile("prefetch.global.L2 [%0];" ::"l"(vs));
        }
      }
    }
  }
#endif
  // The query prologue's loads go out first, the signs before the wait (nothing on the stream
  // writes them) and the query (which the previous kernel may write) right after it, so that
  // they are in flight while the lengths' load below and then the first chunk's wait on memory.
  static_assert(kWarps == kHeadsPerBlock, "one query head per warp");
  float sg[D / 32];
  query_signs<D>(p, lane, sg);
  grid_dependency_wait();
  QueryIn<D> qin;
  query_load<D>(p, b, hkv_idx, h0, nh, warp, lane, qin);

  // ---- this split's slice of the visible positions (R-row multiples) ----
  const Slice sl = split_slice(p, b, split, R);
  const int64_t my_lo = sl.lo, my_hi = sl.hi;
  const bool bad = sl.bad;
  const int64_t row_base = (int64_t(b) * p.hkv + hkv_idx) * p.capacity;
  const uint32_t cap = p.capacity;

  const int r = lane >> 2, t = lane & 3;
  // This lane's bytes of slot 0 of the sequence's KV head, within the warp's slice (bytes
  // [slice*DS/2, ...) of a row): K columns [t*DS/8, ...), V columns [r*DS/16, ...); a row at
  // slot x is x strides further.
  const uint8_t* kl = p.k_data + row_base * KS + slice * (DS / 2) + t * (DS / 8);
  const uint8_t* vl = p.v_data + row_base * VS + slice * (DS / 2) + r * (DS / 16);
  const uint8_t* knl = static_cast<const uint8_t*>(p.k_scales) + row_base * kss;
  const uint8_t* vnl = static_cast<const uint8_t*>(p.v_scales) + row_base * vss;
  // Positions are counted from my_lo in 32 bits (a split holds far fewer than 2^31 rows).
  const int n_my = int(max(my_hi - my_lo, int64_t(0)));

  // Fragment rows r + 8 (K) and 2t + 8, 2t + 9 (V): 8 rows further, or (TWIN) the same rows'
  // second halves.
  constexpr int kHi = TWIN ? DS / 2 : 8 * KS, vHi = TWIN ? DS / 2 : 8 * VS;
  // Loads the chunk at split offset rel (slot s0). Full chunks that do not wrap take fixed
  // offsets from one pointer per plane; others clamp rows past the slice to its last row
  // (finite data, weight 0) and wrap each row on its own.
  //
  // `after` is 0, computed from a word of the chunk the warp computes next (`arrived`),
  // so these loads issue only once that chunk has arrived. ptxas gives every chunk load one
  // scoreboard, and a wait on it is a wait for all of them: loaded ahead of that arrival, the
  // chunk after next was waited for at the next chunk's first use, its whole latency exposed
  // every other chunk (ncu: 28% of the loop's stall samples on that one wait; kernel notes,
  // step 80).
  auto load = [&](Ch& c, int rel, uint32_t s0, uint32_t after) {
    s0 += after;
    if (rel + R <= n_my && (!p.ring || s0 + R <= cap)) {
      const uint8_t* kp = kl + size_t(s0 + r) * KS;
      const uint8_t* vp = vl + size_t(s0 + 2 * t) * VS;
      ldg_words<Ch::KW>(kp, c.k[0]);
      ldg_words<Ch::KW>(kp + kHi, c.k[1]);
      ldg_words<Ch::VW>(vp, c.v[0]);
      ldg_words<Ch::VW>(vp + VS, c.v[1]);
      ldg_words<Ch::VW>(vp + vHi, c.v[2]);
      ldg_words<Ch::VW>(vp + vHi + VS, c.v[3]);
      // Row r + 8 as an immediate offset from row r's address: written as size_t(s0 + r + 8),
      // the 32-bit sum may wrap, so the compiler built a second address per plane.
      const uint8_t* knp = knl + size_t(s0 + r) * kss;
      const uint8_t* vnp = vnl + size_t(s0 + r) * vss;
      c.kn[0] = ldg_scale<SF16>(knp);
      c.vn[0] = ldg_scale<SF16>(vnp);
      if constexpr (!TWIN) {  // TWIN: a lane's weights are for row r alone
        c.kn[1] = ldg_scale<SF16>(knp + 8 * kss);
        c.vn[1] = ldg_scale<SF16>(vnp + 8 * vss);
      }
      return;
    }
    const int last = n_my - 1 - rel;
    auto slot = [&](int x) -> uint32_t {
      uint32_t sx = s0 + uint32_t(min(x, last));
      if (p.ring)
        while (sx >= cap) sx -= cap;
      return sx;
    };
    constexpr int kRow8 = TWIN ? 0 : 8;  // fragment row r + 8 is row r + kRow8, at kHi - kRow8 * KS
    const uint32_t sr0 = slot(r), sr1 = slot(r + kRow8);
    ldg_words<Ch::KW>(kl + size_t(sr0) * KS, c.k[0]);
    ldg_words<Ch::KW>(kl + size_t(sr1) * KS + (kHi - kRow8 * KS), c.k[1]);
    const int vx[4] = {2 * t, 2 * t + 1, 2 * t + kRow8, 2 * t + kRow8 + 1};
#pragma unroll
    for (int i = 0; i < 4; ++i) ldg_words<Ch::VW>(vl + size_t(slot(vx[i])) * VS + (i >= 2 ? vHi - kRow8 * VS : 0), c.v[i]);
    c.kn[0] = ldg_scale<SF16>(knl + size_t(sr0) * kss);
    c.vn[0] = ldg_scale<SF16>(vnl + size_t(sr0) * vss);
    if constexpr (!TWIN) {
      c.kn[1] = ldg_scale<SF16>(knl + size_t(sr1) * kss);
      c.vn[1] = ldg_scale<SF16>(vnl + size_t(sr1) * vss);
    }
  };

  // First chunk's loads go out before the prologue. The warps of a group take the same chunks.
  constexpr int step = G * R;
  int rel = grp * R;
  uint32_t s0 = p.ring ? uint32_t((my_lo + rel) % int64_t(cap)) : uint32_t(my_lo + rel);
  Ch cur, nxt;
  auto advance = [&](uint32_t x) {
    x += uint32_t(step);
    if (p.ring)
      while (x >= cap) x -= cap;
    return x;
  };
  // STAGED: the warp's chunks through its three stages (attn_lut_stage.cuh; unused, and dropped
  // by the compiler, in the other variants).
  static_assert(kWarps * kStagePieces <= 256, "stage 2 of every warp in the table's upper halves");
  const Stages<SF16> stg(uint32_t(__cvta_generic_to_shared(smem + Lay::kMergeAt)) + uint32_t(warp * Lay::kStagesWarp),
                         uint32_t(__cvta_generic_to_shared(smem)) + uint32_t(warp * kStagePieces * 256 + 128), lane, p,
                         row_base, n_my);
  // Chunk rel (slot s0) from stage SI into c, then the stage refilled with the chunk three on.
  // One commit group per chunk, empty or not, so that waiting for all but the latest two groups
  // always waits for exactly this chunk.
  // s3: the slot of chunk rel + 3 step, which refills the stage, advanced with s0 once a chunk:
  // three advances from s0 there (with the ring's wrap each) took ~13 more instructions a chunk
  // and the lane's stage address rebuilt from the thread index (kernel notes, step 85).
  auto fetch = [&](auto& c, auto sc, int rel, uint32_t s0, uint32_t s3) {  // generic: only STAGED instantiates it
    constexpr int SI = decltype(sc)::value;
    cp_async_wait<2>();
    __syncwarp();
    stg.template read<SI>(c, rel, s0);
    __syncwarp();
    if (rel + 3 * step < n_my) stg.template issue<SI>(rel + 3 * step, s3);
    cp_async_commit();
  };
  uint32_t s3 = 0;
  if constexpr (STAGED) {
    const uint32_t s1 = advance(s0), s2 = advance(s1);
    s3 = advance(s2);
    if (rel < n_my) stg.template issue<0>(rel, s0);
    cp_async_commit();
    if (rel + step < n_my) stg.template issue<1>(rel + step, s1);
    cp_async_commit();
    if (rel + 2 * step < n_my) stg.template issue<2>(rel + 2 * step, s2);
    cp_async_commit();
  } else if (rel < n_my) {
    load(cur, rel, s0, 0u);
  }

  // ---- prologue: each warp rotates and scales one query head ----
  query_finish<D, true, DS, kQSwz>(p, warp, lane, sg, qin, q_hl, q_unscale, bias);
  __syncthreads();

  // The query's hi parts (PACK: this lane's column, hi or lo) stay in registers up to a slice of
  // 128, the lo parts only at 64 (more would spill at 128 registers); the rest are read from
  // shared memory per k-step. PACK with ONEH: column r is part r & 1 (hi, lo) of head r >> 1,
  // which the prologue stored as the hi and lo halves of lane 4 (r >> 1) + t's entry, so columns
  // 2t and 2t + 1 of a lane's C fragment are both parts of head t: the lane adds them for its
  // scores, and runs head t's softmax for rows r and r + 8. Without ONEH (D = 256 in slices,
  // where the ONEH code spilled): column r >= 4 is the lo part of head r - 4, stored at
  // lane - 16; lanes t and t ^ 2 add their columns with a shuffle, and both run the softmax of
  // heads hd, hd + 1 (four scores).
  constexpr bool kQHi = DS <= 128, kQLo = DS <= 64 && !PACK;
  // TWIN: column r is (lo part, head, half) = (r >> 2, (r >> 1) & 1, r & 1), the head's half
  // laid out as a slice of 128 (query_finish with DS = 128: half j's k-steps are 8j ..).
  const int qlane = TWIN ? ((r >> 1) & 1) * 4 + t : ONEH ? (r >> 1) * 4 + t : PACK && r >= 4 ? lane - 16 : lane;
  const int qhalf = ONEH ? (r & 1) : PACK && r >= 4 ? 1 : 0;  // uint2 of the uint4: 0 hi, 1 lo
  uint2 qhi[kQHi ? S : 1], qlo[kQLo ? S : 1];
  // This slice's k-steps: slice * S + s, where (slice * S + s) & 7 == s & 7 (slice is 0 with one
  // slice, else S is a multiple of 8), so qslot(s, .) indexes from q4.
  static_assert(NS == 1 || S % 8 == 0, "q_hl swizzle per slice");
  const uint4* q4 = reinterpret_cast<const uint4*>(q_hl) + (TWIN ? (r & 1) : slice) * S * 32;
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const uint4 v = q4[qslot<kQSwz>(s, qlane)];
    if constexpr (kQHi) qhi[kQHi ? s : 0] = qhalf ? make_uint2(v.z, v.w) : make_uint2(v.x, v.y);
    if constexpr (kQLo) qlo[kQLo ? s : 0] = make_uint2(v.z, v.w);
  }
  // Heads of this lane's C fragment columns in the block merge (PACK: lanes t and t^2 hold the
  // same heads; TWIN: one head, both halves), and in the loop (ONEH: head t alone).
  const int hd = TWIN ? (t & 1) : PACK ? 2 * (t & 1) : 2 * t;
  const int hq = ONEH ? t : hd;
  const float log2e = 1.4426950408889634f;
  const bool capped = p.softcap > 0.0f;
  // Scores come out in log2 units: without a softcap log2(e) is folded into the query's unscale
  // factor and bias here; with one, tanh takes natural units and the factor follows it.
  const float to_x = capped ? 1.0f : log2e;
  const float qun0 = q_unscale[hq] * to_x, qun1 = q_unscale[hq + 1] * to_x;
  const float bias0 = bias[hq] * to_x, bias1 = bias[hq + 1] * to_x;
  const float vmul = rsqrtf(float(D));
  // Partial scores, [chunk parity][warp][lane] float4 (shared-window addresses: fewer registers).
  // xw: this lane's slot in this chunk's half; the group's first slot is slice * kXWarp below.
  constexpr uint32_t kXWarp = Lay::kXWarp, kXHalf = kWarps * kXWarp;
  uint32_t xw = uint32_t(__cvta_generic_to_shared(smem + Lay::kRegion + Lay::kQ)) + uint32_t(warp * 32 + lane) * 16;
  uint32_t xflip = kXHalf;  // added to xw after each chunk, negated each time
  // One lane offset and one table for K and V.
  const uint32_t ktl = 4u * uint32_t(lane);

  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
  float mu0 = 0.0f, mu1 = 0.0f;  // the maxima as exponent offsets (0 while a maximum is -inf)
  float acc[S][4];
#pragma unroll
  for (int i = 0; i < S; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;

  // A score through the softcap (natural units in, log2 units out).
  auto soft_cap = [&](float x) { return p.softcap * tanhf(x / p.softcap) * log2e; };
  auto compute = [&](const Ch& c, int rel) {
    // ---- QK: mma chains over alternate k-steps (PACK), or the query's hi and lo parts; without
    // PACK, slices of 256 (16 k-steps) split those by k-step parity too: no chain over 8 mma ----
    constexpr int kChains = !PACK && S > 8 ? 4 : 2;
    float cc[kChains][4];
#pragma unroll
    for (int i = 0; i < kChains; ++i) cc[i][0] = cc[i][1] = cc[i][2] = cc[i][3] = 0.0f;
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int w = s >> 1;
      uint32_t a[4];
      if (s & 1) {
        a[0] = lookup<2>(tab, ktl, c.k[0][w]);
        a[1] = lookup<2>(tab, ktl, c.k[1][w]);
        a[2] = lookup<3>(tab, ktl, c.k[0][w]);
        a[3] = lookup<3>(tab, ktl, c.k[1][w]);
      } else {
        a[0] = lookup<0>(tab, ktl, c.k[0][w]);
        a[1] = lookup<0>(tab, ktl, c.k[1][w]);
        a[2] = lookup<1>(tab, ktl, c.k[0][w]);
        a[3] = lookup<1>(tab, ktl, c.k[1][w]);
      }
      const uint2 qh = kQHi ? qhi[kQHi ? s : 0] : reinterpret_cast<const uint2*>(q4 + qslot<kQSwz>(s, qlane))[qhalf];
      if constexpr (PACK) {
        mma16816(cc[s & 1], a, qh.x, qh.y);  // two chains over alternate k-steps
      } else {
        const uint2 ql = kQLo ? qlo[kQLo ? s : 0] : reinterpret_cast<const uint2*>(q4 + qslot<kQSwz>(s, lane))[1];
        const int ch = kChains == 4 ? 2 * (s & 1) : 0;
        mma16816(cc[ch], a, qh.x, qh.y);
        mma16816(cc[ch + 1], a, ql.x, ql.y);
      }
    }
    // B fragments of the weights (f16 hi, and lo without PACK) for the PV mma.
    uint32_t b_hi0, b_hi1, b_lo0 = 0u, b_lo1 = 0u;
    if constexpr (TWIN) {
      // C fragment entry 0 is row r's first half against column 2t (its head's first half),
      // entry 3 its second half against column 2t + 1; entries 1 and 2 are the cross terms.
      float dot = (cc[0][0] + cc[1][0]) + (cc[0][3] + cc[1][3]);
      dot += __shfl_xor_sync(0xFFFFFFFFu, dot, 2);  // hi columns + lo columns
      float x = fmaf(dot, qun0 * scale_of(c.kn[0]), bias0);
      if (capped) x = soft_cap(x);
      if (rel + r >= n_my) x = -INFINITY;
      // Online softmax as below, for one score per lane (lanes t and t^2 hold the same).
      if (__any_sync(0xFFFFFFFFu, x > m0)) {
        float cm = x;
        rows_max(cm);
        const float al = raise_max(m0, mu0, l0, cm);
#pragma unroll
        for (int i = 0; i < S; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][e] *= al;
      }
      const float pr = fast_exp2(x - mu0);
      l0 += pr;
      // Row r's weight in column 2t (the first half's rows, B rows 0-7) and 2t + 1 (the
      // second half's, B rows 8-15); the other half's column is 0. Lanes t >= 2: lo parts.
      uint32_t whi, wlo;
      split_half2(pr * (scale_of(c.vn[0]) * vmul), 0.0f, whi, wlo);
      const uint32_t w = t >= 2 ? wlo : whi;
      b_hi0 = transpose8x8(w);
      b_hi1 = transpose8x8(w << 16);
    } else {
      // dotv: rows r, r+8 x columns 2t, 2t+1 (C fragment order): heads hd, hd+1, or (ONEH) head
      // t's hi and lo parts.
      float dotv[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        dotv[e] = cc[0][e] + cc[1][e];
        if constexpr (kChains == 4) dotv[e] += cc[2][e] + cc[3][e];
        if constexpr (PACK && !ONEH) dotv[e] += __shfl_xor_sync(0xFFFFFFFFu, dotv[e], 2);  // hi columns + lo columns
      }
      if constexpr (NS > 1) {
        // The group's slices add up in one fixed order, so its warps hold bit-identical scores and
        // take identical softmax decisions (the merge uses one warp's maxima and sums per group).
        // Two buffers by chunk parity: a warp can rewrite one only after the next barrier, which
        // every warp of the group passes after reading it.
        sts128(xw, make_float4(dotv[0], dotv[1], dotv[2], dotv[3]));
        group_barrier<G>(grp, NS * 32);
        const uint32_t x0 = xw - uint32_t(slice) * kXWarp;
        float4 sum = lds128(x0);
#pragma unroll
        for (int j = 1; j < NS; ++j) {
          const float4 o = lds128(x0 + uint32_t(j) * kXWarp);
          sum.x += o.x;
          sum.y += o.y;
          sum.z += o.z;
          sum.w += o.w;
        }
        dotv[0] = sum.x;
        dotv[1] = sum.y;
        dotv[2] = sum.z;
        dotv[3] = sum.w;
        xw += xflip;
        xflip = 0u - xflip;
      }
      if constexpr (ONEH) {
        // Head t's scores of rows r and r + 8 (hi part + lo part), in log2 units.
        float x0 = fmaf(dotv[0] + dotv[1], qun0 * scale_of(c.kn[0]), bias0);
        float x1 = fmaf(dotv[2] + dotv[3], qun0 * scale_of(c.kn[1]), bias0);
        if (capped) {
          x0 = soft_cap(x0);
          x1 = soft_cap(x1);
        }
        if (rel + R > n_my) {
          if (rel + r >= n_my) x0 = -INFINITY;
          if (rel + r + 8 >= n_my) x1 = -INFINITY;
        }
        // The online softmax of the other branch below, for one head.
        float cm = fmaxf(x0, x1);
        if (__any_sync(0xFFFFFFFFu, cm > m0)) {
          rows_max(cm);
          const float al = raise_max(m0, mu0, l0, cm);
#pragma unroll
          for (int i = 0; i < S; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][e] *= al;
        }
        const float p0 = fast_exp2(x0 - mu0), p1 = fast_exp2(x1 - mu0);
        l0 += p0 + p1;
        // Row r's weight as head t's (hi, lo) columns 2t, 2t + 1; row r + 8's below it.
        b_hi0 = transpose8x8(hi_lo_half2(p0 * (scale_of(c.vn[0]) * vmul)));
        b_hi1 = transpose8x8(hi_lo_half2(p1 * (scale_of(c.vn[1]) * vmul)));
      } else {
        // x: rows r, r+8 x heads hd, hd+1, in log2 units.
        float x[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) x[e] = fmaf(dotv[e], (e & 1 ? qun1 : qun0) * scale_of(c.kn[e >> 1]), e & 1 ? bias1 : bias0);
        if (capped)  // one branch for the chunk's four scores
#pragma unroll
          for (int e = 0; e < 4; ++e) x[e] = soft_cap(x[e]);
        if (rel + R > n_my) {
          if (rel + r >= n_my) x[0] = x[1] = -INFINITY;
          if (rel + r + 8 >= n_my) x[2] = x[3] = -INFINITY;
        }
        // ---- online softmax over the chunk (lanes sharing t hold heads hd, hd+1) ----
        float cm0 = fmaxf(x[0], x[2]), cm1 = fmaxf(x[1], x[3]);
        // The maxima are reduced across the rows' lanes and the output rescaled only when some
        // lane's score exceeds its head's maximum (rare after the first chunks): a lane's own
        // scores exceed m exactly when the reduced maximum would, so the decisions and values are
        // those of reducing every chunk, without its three shuffle rounds on the chunk's path.
        if (__any_sync(0xFFFFFFFFu, cm0 > m0 || cm1 > m1)) {
          rows_max(cm0, cm1);
          const float al0 = raise_max(m0, mu0, l0, cm0), al1 = raise_max(m1, mu1, l1, cm1);
#pragma unroll
          for (int i = 0; i < S; ++i) {
            acc[i][0] *= al0;
            acc[i][1] *= al1;
            acc[i][2] *= al0;
            acc[i][3] *= al1;
          }
        }
        const float pr[4] = {fast_exp2(x[0] - mu0), fast_exp2(x[1] - mu1), fast_exp2(x[2] - mu0), fast_exp2(x[3] - mu1)};
        l0 += pr[0] + pr[2];
        l1 += pr[1] + pr[3];
        // Weights with the V row scale folded in, f16 hi + lo, transposed into B fragments.
        const float vs0 = scale_of(c.vn[0]) * vmul, vs1 = scale_of(c.vn[1]) * vmul;
        uint32_t top_hi, top_lo, bot_hi, bot_lo;
        split_half2(pr[0] * vs0, pr[1] * vs0, top_hi, top_lo);
        split_half2(pr[2] * vs1, pr[3] * vs1, bot_hi, bot_lo);
        if constexpr (PACK) {  // columns 4-7 (lanes t >= 2) take the lo parts
          top_hi = t >= 2 ? top_lo : top_hi;
          bot_hi = t >= 2 ? bot_lo : bot_hi;
        }
        b_hi0 = transpose8x8(top_hi);
        b_hi1 = transpose8x8(bot_hi);
        if constexpr (!PACK) {
          b_lo0 = transpose8x8(top_lo);
          b_lo1 = transpose8x8(bot_lo);
        }
      }
    }
    // ---- PV: nibbles of rows (2t, 2t+1) and (2t+8, 2t+9) merged per coordinate ----
#pragma unroll
    for (int w = 0; w < Ch::VW; ++w) {
      uint32_t lo_n[2], hi_n[2];
#pragma unroll
      for (int pp = 0; pp < 2; ++pp) {
        const uint32_t w0 = c.v[2 * pp][w], w1 = c.v[2 * pp + 1][w];
        lo_n[pp] = select_nibbles(w0, w1 << 4);
        hi_n[pp] = select_nibbles(w0 >> 4, w1);
      }
      auto pv = [&](auto jc) {
        constexpr int j = decltype(jc)::value;
        const int i = 4 * w + j;
        const uint32_t a[4] = {lookup<j>(tab, ktl, lo_n[0]), lookup<j>(tab, ktl, hi_n[0]),
                               lookup<j>(tab, ktl, lo_n[1]), lookup<j>(tab, ktl, hi_n[1])};
        mma16816(acc[i], a, b_hi0, b_hi1);
        if constexpr (!PACK) mma16816(acc[i], a, b_lo0, b_lo1);
      };
      pv(std::integral_constant<int, 0>{});
      pv(std::integral_constant<int, 1>{});
      pv(std::integral_constant<int, 2>{});
      pv(std::integral_constant<int, 3>{});
    }
  };

  // STAGED: one chunk of registers, read from its stage at the chunk's start (two, alternating as
  // in the loop below, cost more than that exposed shared-memory read: kernel notes, step 84);
  // three chunks per trip, one per stage, so that each stage's addresses are fixed.
  // Otherwise two chunks per trip so the loaded registers alternate without copies.
  if constexpr (STAGED) {
    auto chunk = [&](auto si) {
      if (rel >= n_my) return false;
      fetch(cur, si, rel, s0, s3);
      compute(cur, rel);
      rel += step;
      s0 = advance(s0);
      s3 = advance(s3);
      return true;
    };
    while (chunk(std::integral_constant<int, 0>{}) && chunk(std::integral_constant<int, 1>{}) &&
           chunk(std::integral_constant<int, 2>{})) {
    }
    cp_async_wait<0>();  // every copy was read; the merge reuses the stages
    __syncwarp();
  } else
  while (rel < n_my) {
    const int rel1 = rel + step;
    const uint32_t s1 = advance(s0);
    // In the branch's condition, so it waits for the chunk on both of its paths (see load).
    const uint32_t after_cur = arrived(cur.k[0][0], p.order_zero);
    if (rel1 + int(after_cur) < n_my) load(nxt, rel1, s1, after_cur);
    compute(cur, rel);
    if (rel1 >= n_my) break;
    rel = rel1 + step;
    s0 = advance(s1);
    const uint32_t after_nxt = arrived(nxt.k[0][0], p.order_zero);
    if (rel + int(after_nxt) < n_my) load(cur, rel, s0, after_nxt);
    compute(nxt, rel1);
  }

  grid_dependency_trigger();
  if constexpr (ONEH) {
    // Head t's outputs are its hi-column plus lo-column sums; the merge below takes a lane's
    // values in the general layout (heads hd, hd + 1 of rows r, r + 8), from lanes 4r + hd and
    // 4r + hd + 1.
    const int src0 = (lane & ~3) | hd, src1 = src0 + 1;
#pragma unroll
    for (int i = 0; i < S; ++i) {
      const float va = acc[i][0] + acc[i][1], vb = acc[i][2] + acc[i][3];
      acc[i][0] = __shfl_sync(0xFFFFFFFFu, va, src0);
      acc[i][1] = __shfl_sync(0xFFFFFFFFu, va, src1);
      acc[i][2] = __shfl_sync(0xFFFFFFFFu, vb, src0);
      acc[i][3] = __shfl_sync(0xFFFFFFFFu, vb, src1);
    }
    m1 = __shfl_sync(0xFFFFFFFFu, m0, src1);
    m0 = __shfl_sync(0xFFFFFFFFu, m0, src0);
    l1 = __shfl_sync(0xFFFFFFFFu, l0, src1);
    l0 = __shfl_sync(0xFFFFFFFFu, l0, src0);
  } else if constexpr (PACK) {  // the hi-column and lo-column sums of each head
#pragma unroll
    for (int i = 0; i < S; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][e] += __shfl_xor_sync(0xFFFFFFFFu, acc[i][e], 2);
  }
  // ---- merge the warps: maxima and sums per head, then the rescaled outputs ----
  // (PACK: lanes t and t^2 hold the same heads and values; both store them.)
  rows_sum(l0, l1);
  if (r == 0) {
    wm[warp * kHeadsPerBlock + hd] = m0;
    wl[warp * kHeadsPerBlock + hd] = l0;
    if constexpr (!TWIN) {
      wm[warp * kHeadsPerBlock + hd + 1] = m1;
      wl[warp * kHeadsPerBlock + hd + 1] = l1;
    }
  }
  float* mw = merge + grp * Lay::kGroupFloats;
  // Without SEP: every warp must be done with the tables, which the merge buffer reuses, and
  // the outputs are rescaled to the block's maxima before they are stored. With SEP they are
  // stored as they are and the threads that add the groups rescale them (group_factors).
  float f0 = 1.0f, f1 = 1.0f;
  float bm0 = -INFINITY, bm1 = -INFINITY;
  auto block_maxima = [&] {  // one warp per group speaks for it (its slices hold the same maxima)
#pragma unroll
    for (int w = 0; w < kWarps; w += NS) {
      bm0 = fmaxf(bm0, wm[w * kHeadsPerBlock + hd]);
      if constexpr (!TWIN) bm1 = fmaxf(bm1, wm[w * kHeadsPerBlock + hd + 1]);
    }
  };
  if constexpr (!SEP) {
    __syncthreads();
    block_maxima();
    f0 = fast_exp2(m0 - (bm0 == -INFINITY ? 0.0f : bm0));
    f1 = TWIN ? f0 : fast_exp2(m1 - (bm1 == -INFINITY ? 0.0f : bm1));
  }
  // Columns 2t + 1 hold head hd + 1, or (TWIN) head hd's second half.
  const int hd1 = TWIN ? hd : hd + 1, c1 = TWIN ? DS : 0;
#pragma unroll
  for (int i = 0; i < S; ++i) {
    const int coord = slice * DS + r * (DS / 8) + 2 * i;
    *reinterpret_cast<float2*>(mw + hd * Lay::kHeadStride + Lay::mcol(coord)) =
        make_float2(acc[i][0] * f0, acc[i][2] * f0);
    *reinterpret_cast<float2*>(mw + hd1 * Lay::kHeadStride + Lay::mcol(coord + c1)) =
        make_float2(acc[i][1] * f1, acc[i][3] * f1);
  }
  __syncthreads();
  // SEP: the factor of group g for head `head` (from the block's maximum over the groups').
  auto group_factors = [&](int head, float (&fg)[G]) {
    if constexpr (!SEP) {
#pragma unroll
      for (int g = 0; g < G; ++g) fg[g] = 1.0f;  // stored rescaled already
      return;
    }
    float bm = -INFINITY;
#pragma unroll
    for (int g = 0; g < G; ++g) bm = fmaxf(bm, wm[g * NS * kHeadsPerBlock + head]);
    const float bmu = bm == -INFINITY ? 0.0f : bm;
#pragma unroll
    for (int g = 0; g < G; ++g) fg[g] = fast_exp2(wm[g * NS * kHeadsPerBlock + head] - bmu);
  };
  if constexpr (SEP) block_maxima();  // for the sums below
  const size_t head_stride = size_t(p.nsplit) * D;
  float* po = p.part_o + ((size_t(b) * p.num_q_heads + h0) * p.nsplit + split) * D;
  const float nanv = __int_as_float(0x7FC00000);
  if constexpr (D >= 256) {
    // Four coordinates per thread and step (wide heads: 16 steps of one at D = 512): the merge
    // columns (runs of a multiple of 4 floats, rows of a multiple of 4) and the partials
    // (16-byte aligned workspace, D-float rows) are both 16-byte aligned. (A build doing this
    // at D = 128 too was slower there: kernel notes, step 42.)
    for (int idx = 4 * tid; idx < nh * D; idx += 4 * kThreads) {
      const int head = idx / D, coord = idx % D;
      float fg[G];
      group_factors(head, fg);
      float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float4 m = *reinterpret_cast<const float4*>(merge + g * Lay::kGroupFloats + head * Lay::kHeadStride + Lay::mcol(coord));
        sum.x = fmaf(m.x, fg[g], sum.x);
        sum.y = fmaf(m.y, fg[g], sum.y);
        sum.z = fmaf(m.z, fg[g], sum.z);
        sum.w = fmaf(m.w, fg[g], sum.w);
      }
      *reinterpret_cast<float4*>(po + head * head_stride + coord) = bad ? make_float4(nanv, nanv, nanv, nanv) : sum;
    }
  } else {
    for (int idx = tid; idx < nh * D; idx += kThreads) {
      const int head = idx / D, coord = idx % D;
      float fg[G];
      group_factors(head, fg);
      float sum = 0.0f;
#pragma unroll
      for (int g = 0; g < G; ++g) sum = fmaf(merge[g * Lay::kGroupFloats + head * Lay::kHeadStride + Lay::mcol(coord)], fg[g], sum);
      po[head * head_stride + coord] = bad ? nanv : sum;
    }
  }
  // The block's sums, by the lanes that already hold its maxima for heads hd, hd+1.
  if (warp == 0 && r == 0 && (!PACK || t < 2))
#pragma unroll
    for (int e = 0; e < (TWIN ? 1 : 2); ++e) {
      const int head = hd + e;
      if (head >= nh) continue;
      const float bm = e ? bm1 : bm0, bmu = bm == -INFINITY ? 0.0f : bm;
      float l = 0.0f;
      for (int w = 0; w < kWarps; w += NS)
        l += wl[w * kHeadsPerBlock + head] * fast_exp2(wm[w * kHeadsPerBlock + head] - bmu);
      float* ml = p.part_ml + ((size_t(b) * p.num_q_heads + h0 + head) * p.nsplit + split) * 2;
      ml[0] = bad ? nanv : bm;
      ml[1] = bad ? nanv : l;
    }
}

}  // namespace lut
}  // namespace tqkv::cuda
