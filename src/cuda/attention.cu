// Selection (support, split count, workspace), the combine kernel, and dispatch to the
// generated attention instances. One function decides each of these; style.md.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/format.h"
#include "cuda/attention.h"
#include "cuda/attn_kernel.cuh"
#include "cuda/attn_lut_launch.cuh"
#include "cuda/check.cuh"
#include "cuda/warp_fwht.cuh"

namespace tqkv::cuda {

// Instances live in cuda/instances/*.cu (scripts/gen_cuda_instances.py).
#define TQKV_DECLARE_ATTN_D(KT, VT, D)                                                          \
  extern template void launch_attn<KT, VT, D>(const AttnKernelParams&, dim3, cudaStream_t, bool); \
  extern template int attn_blocks_per_sm<KT, VT, D>();
#define TQKV_DECLARE_ATTN(KT, VT)  \
  TQKV_DECLARE_ATTN_D(KT, VT, 64)  \
  TQKV_DECLARE_ATTN_D(KT, VT, 128) \
  TQKV_DECLARE_ATTN_D(KT, VT, 256) \
  TQKV_DECLARE_ATTN_D(KT, VT, 512)
#include "cuda/instances/list.inc"
#undef TQKV_DECLARE_ATTN
#define TQKV_DECLARE_ATTN_LUT(D)                                                             \
  extern template void lut::launch<D>(const AttnKernelParams&, dim3, cudaStream_t, bool); \
  extern template int lut::blocks_per_sm<D>();
TQKV_DECLARE_ATTN_LUT(64)
TQKV_DECLARE_ATTN_LUT(128)
TQKV_DECLARE_ATTN_LUT(256)
TQKV_DECLARE_ATTN_LUT(512)
#undef TQKV_DECLARE_ATTN_LUT

namespace {

constexpr bool cuda_type(uint32_t t) { return fmt::is_tq(t) || t == fmt::F16; }

struct Instance {
  void (*launch)(const AttnKernelParams&, dim3, cudaStream_t, bool pdl) = nullptr;
  int (*blocks_per_sm)() = nullptr;
  int64_t min_rows_per_split = 0;  // fewer rows per split spread short contexts wider but grow the combine
  bool pdl = false;                 // launched as a programmatic dependent (sm_90)
  // Where one block per SM gives every split at most this many rows, one block per SM is used
  // (0: never). The table-lookup kernel at D = 128 (two blocks fit an SM) builds its tables
  // once per SM instead of twice and keeps a second chunk in flight per warp: H100, batch 1,
  // S = 4096 9.5 -> 8.2 us, S = 8192 11.1 -> 10.4, batch 8 S = 512 9.2 -> 8.4; with 8 chunks
  // per warp (1024 rows) two blocks per SM were faster (S = 16384: 14.4 against 19.4), and at
  // D = 64 one block per SM was slower (S = 8192: 8.7 against 9.8). Such grids are launched so
  // that two of their blocks cannot share an SM (smem_floor in attend). docs/cuda-kernel-notes.md,
  // steps 29 and 64.
  int64_t one_block_max_rows = 0;
  bool one_table = false;  // reads V's centroid pairs from K's table (the table-lookup kernel)
  explicit operator bool() const { return launch != nullptr; }
};

// Two tiles of the tile kernel (measured on the H100: docs/cuda-kernel-notes.md).
constexpr int64_t kMinRowsPerSplit = 128;

template <int KT, int VT>
Instance pick_dim(uint32_t d) {
  switch (d) {
    case 64: return {launch_attn<KT, VT, 64>, attn_blocks_per_sm<KT, VT, 64>, kMinRowsPerSplit};
    case 128: return {launch_attn<KT, VT, 128>, attn_blocks_per_sm<KT, VT, 128>, kMinRowsPerSplit};
    case 256: return {launch_attn<KT, VT, 256>, attn_blocks_per_sm<KT, VT, 256>, kMinRowsPerSplit};
    case 512: return {launch_attn<KT, VT, 512>, attn_blocks_per_sm<KT, VT, 512>, kMinRowsPerSplit};
    default: return {};
  }
}

// The tile kernel: every compiled pair.
Instance pick_tile(uint32_t kt, uint32_t vt, uint32_t d) {
#define TQKV_DECLARE_ATTN(KT, VT) \
  if (kt == KT && vt == VT) return pick_dim<KT, VT>(d);
#include "cuda/instances/list.inc"
#undef TQKV_DECLARE_ATTN
  return {};
}

// The table-lookup kernel: 4-bit K and V, every head_dim.
Instance pick_lut(uint32_t kt, uint32_t vt, uint32_t d) {
  if (kt != fmt::TQ4 || vt != fmt::TQ4) return {};
  switch (d) {
    case 64: return {lut::launch<64>, lut::blocks_per_sm<64>, lut::kMinRowsPerSplit, true, 0, true};
    case 128:
      return {lut::launch<128>, lut::blocks_per_sm<128>, lut::kMinRowsPerSplit, true, 4 * lut::kMinRowsPerSplit, true};
    case 256: return {lut::launch<256>, lut::blocks_per_sm<256>, lut::kMinRowsPerSplit, true, 0, true};
    case 512: return {lut::launch<512>, lut::blocks_per_sm<512>, lut::kMinRowsPerSplit, true, 0, true};
    default: return {};
  }
}

// TQKV_CUDA_KERNEL=tile (or =lut) fixes the choice below: for A/B benchmarks and for the parity
// test, which checks both kernels on the 4-bit pair.
int forced_kernel() {  // 0: by length, 1: tile, 2: lut
  static const int forced = [] {
    const char* e = std::getenv("TQKV_CUDA_KERNEL");
    const std::string v = e ? e : "";
    return v == "tile" ? 1 : v == "lut" ? 2 : 0;
  }();
  return forced;
}

// TQKV_CUDA_PREFETCH=0 turns the lut kernel's L2 hints off (A/B measurements).
bool prefetch_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("TQKV_CUDA_PREFETCH");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

// Visible rows from which the table-lookup kernel is used when a block holds more than 4 query
// heads: below it, building its 64 KB table region per block outweighed its faster rows (H100,
// before the packed variant and its programmatic launch: S = 4096 took 11.1 us on the tile
// kernel, 13.3 on this one). With at most 4 heads (the packed variant) the table-lookup kernel
// is faster at every length measured, S = 1024 included (docs/cuda-kernel-notes.md, step 24).
constexpr int64_t kLutMinRows = 8192;

// The one selection of the kernel for a call; max_visible bounds every sequence's visible rows.
Instance pick(uint32_t kt, uint32_t vt, uint32_t d, uint32_t group, int64_t max_visible) {
  const int forced = forced_kernel();
  if (forced == 2 || (forced == 0 && (group <= lut::kPackMaxHeads || max_visible >= kLutMinRows)))
    if (Instance lut = pick_lut(kt, vt, d)) return lut;
  return pick_tile(kt, vt, d);
}

// Most rows one split takes: the kernels count a split's rows in 32 bits.
constexpr int64_t kMaxSplitRows = int64_t(1) << 30;

uint32_t head_chunks(uint32_t group) { return (group + kHeadsPerBlock - 1) / kHeadsPerBlock; }

// Blocks per split: one per (sequence, KV head, chunk of up to 8 query heads).
uint64_t blocks_per_split(const tqkv_cache_config& cfg, uint32_t num_q_heads) {
  const uint32_t group = std::max(1u, num_q_heads / cfg.num_kv_heads);
  return uint64_t(cfg.num_seqs) * cfg.num_kv_heads * head_chunks(group);
}

// Resident block slots of the device for a kernel: blocks per SM x SMs.
uint64_t block_slots(const DeviceCache& dev, const Instance& inst) {
  const uint64_t per_sm = inst ? uint64_t(inst.blocks_per_sm()) : 1;
  return per_sm * uint64_t(std::max(1, dev.sm_count()));
}

// Splits per (sequence, KV head, head chunk) that fill `slots` resident block slots once with
// `pairs` blocks a split (one wave, no tail of a second partial wave).
uint32_t max_splits(uint64_t slots, uint64_t pairs) { return uint32_t(std::clamp<uint64_t>(slots / pairs, 1, 1024)); }

// Where one wave leaves slots idle (the blocks of a split do not divide the slots), long
// contexts may take more splits, over up to kMaxWaves waves (split_count below).
constexpr uint64_t kMaxWaves = 4;
uint32_t most_splits(uint64_t slots, uint64_t pairs) {
  return std::max(max_splits(slots, pairs), uint32_t(std::min<uint64_t>(kMaxWaves * slots / pairs, 1024)));
}

// A block's fixed cost (table build, query prologue, the merge of its warps, its partial's store
// and the combine's read of it) in rows of its loop: ~3.7 us against ~8.6 ns a row at D = 128
// (H200; docs/cuda-kernel-notes.md, step 85).
constexpr int64_t kBlockCostRows = 512;

// The split count for `rows` visible rows (at most `limit` splits) with the least predicted
// time, waves x (fixed cost + rows per split), taking more than one wave's `one` only where
// that predicts at least 5% less: one wave is what the kernels were tuned on, and a second
// wave of the same blocks cost batch 8 ~5% (S = 32768: 4 splits 74.5 us, 8 splits 78.3).
// Where one wave leaves slots idle it pays (H200, D = 128, Hkv 8, one wave -> this choice):
// batch 17 S = 32768 (136 blocks a split, 264 slots, 1 split -> 5) 270 -> 190 us, batch 12
// 141 -> 120, batch 20 S = 8192 72.5 -> 58.5, batch 9 95 -> 90 (kernel notes, step 85).
int64_t split_count(uint64_t pairs, uint64_t slots, int64_t one, int64_t limit, int64_t rows) {
  auto cost = [&](int64_t k) {
    const uint64_t waves = (pairs * uint64_t(k) + slots - 1) / slots;
    return double(waves) * double(kBlockCostRows + (rows + k - 1) / k);
  };
  const double base = cost(one);
  int64_t best = one;
  double best_cost = base;
  for (int64_t k = one + 1; k <= limit; ++k)
    if (const double c = cost(k); c < best_cost) {
      best = k;
      best_cost = c;
    }
  return best_cost < 0.95 * base ? best : one;
}

// Splits the workspace is laid out for: the most either kernel can use.
uint32_t workspace_splits(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads) {
  const Instance tile = pick_tile(cfg.k_type, cfg.v_type, cfg.head_dim);
  const Instance lut = pick_lut(cfg.k_type, cfg.v_type, cfg.head_dim);
  // splits_for takes at least one split per kMaxSplitRows visible rows.
  const uint32_t fewest = uint32_t((int64_t(cfg.capacity) + kMaxSplitRows - 1) / kMaxSplitRows);
  const uint64_t pairs = blocks_per_split(cfg, num_q_heads);
  return std::max({most_splits(block_slots(dev, tile), pairs), lut ? most_splits(block_slots(dev, lut), pairs) : 0u, fewest});
}

// Workspace bytes before the tail that carries host q_pos and sinks.
size_t partial_bytes(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads) {
  const size_t ns = workspace_splits(dev, cfg, num_q_heads);
  const size_t rows = size_t(cfg.num_seqs) * num_q_heads * ns;
  const size_t b = rows * cfg.head_dim * sizeof(float) + rows * 2 * sizeof(float);
  return (b + 255) / 256 * 256;
}

// Merges the splits of one (sequence, query head) and rotates the output back. Four warps:
// warp w merges splits w, w+4, ... with lane l holding coordinates l*V .. l*V+V-1. A warp loads
// a whole batch of splits (maxima, sums and outputs together) before using any of it and keeps
// an online maximum, so a call with up to 4 * kBatch splits per head (64 at D = 128) waits for memory
// once. Warp 0 then merges the four warps, applies the inverse rotation in registers (FWHT
// strides below V in the lane, larger ones across lanes) and writes.
constexpr int kCombineWarps = 4;

template <int D>
__global__ void __launch_bounds__(kCombineWarps * 32)
    combine_kernel(const float* part_o, const float* part_ml, const float* sinks, const float* signs, float* out,
                   float* lse, uint32_t num_q_heads, uint32_t nsplit, int rotated) {
  constexpr int V = D / 32;
  // Splits per warp in flight: 64 output registers, but at least 9, so that the 33 splits of a
  // batch-1 call on an H100 (one wave of 132 SMs over 4 or 8 KV heads) are loaded in one round
  // trip by the 4 warps: 32 a trip at D = 256 and 16 at D = 512 left one split for a second trip,
  // or 17 for two more (H100: D = 512 0.4-0.9 us faster; kernel notes, step 67).
  constexpr int kBatch = 64 / V < 9 ? 9 : 64 / V;
  __shared__ float part[kCombineWarps][D];
  __shared__ float red[2][kCombineWarps];
  __shared__ int red_bad[kCombineWarps];
  const uint32_t row = blockIdx.x, h = row % num_q_heads;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // The signs and the sink are read before the wait: the attention kernel does not write them,
  // and whatever kernel came before it on the stream has ended (every attention block waited
  // for it before triggering this launch). Read after the merge, the signs were one more memory
  // round trip at the end of every call (H100: D = 128 batch 1 S = 1024 6.14 -> 6.05 us,
  // S = 32768 20.4 -> 20.0, D = 512 S = 32768 42.4 -> 42.2). At D = 256 the early read was
  // 0.6-1.0 us slower with 8 splits per warp in flight and is 0.1-0.5 us faster with 9 (kernel
  // notes, steps 65 and 67; no cause found for either).
  float sg[V];
#pragma unroll
  for (int j = 0; j < V; ++j) sg[j] = 1.0f;
  if (warp == 0 && rotated) {
    if constexpr (V >= 4) {  // the library's signs: 16-byte aligned
#pragma unroll
      for (int j = 0; j < V; j += 4) load4(signs + lane * V + j, sg + j);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) sg[j] = signs[lane * V + j];
    }
  }
  const float sink = warp == 0 && sinks ? sinks[h] : 0.0f;
  grid_dependency_wait();
  grid_dependency_trigger();  // the next call's attention blocks may be scheduled now
  const float* ml = part_ml + size_t(row) * nsplit * 2;
  const float* po = part_o + size_t(row) * nsplit * D + lane * V;
  float m = -INFINITY, l = 0.0f, acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.0f;
  bool bad = false;  // a poisoned split (NaN) poisons the result
  for (uint32_t s0 = warp; s0 < nsplit; s0 += kCombineWarps * kBatch) {
    float2 v[kBatch];
    float o[kBatch][V];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const uint32_t s = s0 + i * kCombineWarps;
      v[i] = make_float2(-INFINITY, 0.0f);
#pragma unroll
      for (int j = 0; j < V; ++j) o[i][j] = 0.0f;
      if (s < nsplit) {
        v[i] = *reinterpret_cast<const float2*>(ml + 2 * s);
        if constexpr (V >= 8) {  // wide heads; 16-byte aligned: the workspace is, and so is lane * V
#pragma unroll
          for (int j = 0; j < V; j += 4) load4(po + size_t(s) * D + j, o[i] + j);
        } else {
#pragma unroll
          for (int j = 0; j < V; j += 2) {
            const float2 x = *reinterpret_cast<const float2*>(po + size_t(s) * D + j);
            o[i][j] = x.x;
            o[i][j + 1] = x.y;
          }
        }
      }
    }
    float bm = m;
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      bad |= isnan(v[i].x) || isnan(v[i].y);
      bm = fmaxf(bm, v[i].x);
    }
    const float bmu = bm == -INFINITY ? 0.0f : bm;
    const float a = exp2f(m - bmu);
    l *= a;
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] *= a;
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const float w = exp2f(v[i].x - bmu);
      l += v[i].y * w;
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += o[i][j] * w;
    }
    m = bm;
  }
  bad = __any_sync(0xFFFFFFFFu, bad);
  if (lane == 0) {
    red[0][warp] = m;
    red[1][warp] = l;
    red_bad[warp] = bad;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) part[warp][lane * V + j] = acc[j];
  __syncthreads();
  if (warp != 0) return;
  const float log2e = 1.4426950408889634f;
  float mx = sinks ? sink * log2e : -INFINITY;
  int any_bad = 0;
  for (int i = 0; i < kCombineWarps; ++i) {
    mx = fmaxf(mx, red[0][i]);
    any_bad |= red_bad[i];
  }
  const float mu = mx == -INFINITY ? 0.0f : mx;
  float f[kCombineWarps];
  l = sinks ? exp2f(sink * log2e - mu) : 0.0f;
#pragma unroll
  for (int i = 0; i < kCombineWarps; ++i) {
    f[i] = exp2f(red[0][i] - mu);
    l += red[1][i] * f[i];
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  float y[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kCombineWarps; ++i) sum += part[i][lane * V + j] * f[i];
    y[j] = any_bad ? __int_as_float(0x7FC00000) : sum * inv;
  }
  if (rotated) {  // x = s .* (H y) / sqrt(D)
    warp_fwht<V>(y, lane);
    const float norm = rsqrtf(float(D));
#pragma unroll
    for (int j = 0; j < V; ++j) y[j] *= norm * sg[j];
  }
  // out is the caller's and may be any float* (a view at an odd offset included): fours or
  // pairs only where it is 16- or 8-byte aligned (the same for every lane and row).
  float* dst = out + size_t(row) * D + lane * V;
  const uintptr_t oa = reinterpret_cast<uintptr_t>(out);
  if (V >= 4 && (oa & 15) == 0) {
    if constexpr (V >= 4)
#pragma unroll
      for (int j = 0; j < V; j += 4) *reinterpret_cast<float4*>(dst + j) = make_float4(y[j], y[j + 1], y[j + 2], y[j + 3]);
  } else if ((oa & 7) == 0) {
#pragma unroll
    for (int j = 0; j < V; j += 2) *reinterpret_cast<float2*>(dst + j) = make_float2(y[j], y[j + 1]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) dst[j] = y[j];
  }
  if (lse && lane == 0)
    lse[row] = any_bad ? __int_as_float(0x7FC00000) : (l > 0.0f ? (mu + log2f(l)) * 0.69314718055994531f : -INFINITY);
}

}  // namespace

bool supported(const tqkv_cache_config& cfg, uint32_t group, const char** why) {
  static const char* kTypes =
      "k_type/v_type: this pair is not compiled into the CUDA backend; CUDA supports 2, 3, 4, 8 (TurboQuant "
      "bits) and 16 (f16), all TurboQuant pairs and f16/f16 (configure with TQKV_CUDA_ALL_PAIRS=ON for mixed f16 pairs)";
  if (!cuda_type(cfg.k_type) || !cuda_type(cfg.v_type) || !pick_tile(cfg.k_type, cfg.v_type, cfg.head_dim)) {
    *why = kTypes;
    return false;
  }
  if (group == 0) {
    *why = "num_q_heads: must be a positive multiple of num_kv_heads";
    return false;
  }
  return true;
}

namespace {

// Splits for a call on the kernel `inst` (the one pick() chose for max_visible).
uint32_t splits_for(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads, int64_t max_visible,
                    const Instance& inst) {
  const int64_t min_rows = inst ? inst.min_rows_per_split : kMinRowsPerSplit;
  auto by_len = [&](int64_t rows) { return std::max<int64_t>(1, (max_visible + rows - 1) / rows); };
  int64_t n = by_len(min_rows);
  const int64_t fewest = by_len(kMaxSplitRows);
  // A short context whose blocks would not reach half the SMs takes half-size splits: at
  // S = 1024, batch 1, Hkv = 8 on the H100 that is 7.2 instead of 8.1 us; where the blocks
  // already cover half the SMs (S = 2048, or batch 8) halving was slower (docs/cuda-kernel-notes.md).
  const uint64_t pairs = blocks_per_split(cfg, num_q_heads);
  const int64_t sms = std::max(1, dev.sm_count());
  if (uint64_t(n) * pairs * 2 <= uint64_t(sms)) n = by_len(std::max<int64_t>(1, min_rows / 2));
  // Short contexts on an instance that is faster with one block per SM there (see Instance).
  if (inst.one_block_max_rows > 0) {
    const int64_t one = std::max<int64_t>(1, sms / int64_t(pairs));  // splits for one block per SM
    if ((max_visible + one - 1) / one <= inst.one_block_max_rows)
      n = std::min(one, by_len(std::max<int64_t>(1, min_rows / 2)));
  }
  const uint64_t slots = block_slots(dev, inst);
  const int64_t wave = max_splits(slots, pairs);
  if (n > wave) n = split_count(pairs, slots, wave, std::min<int64_t>(n, most_splits(slots, pairs)), max_visible);
  return uint32_t(std::max(fewest, n));
}

}  // namespace

uint32_t num_splits(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads, int64_t max_visible) {
  const uint32_t group = num_q_heads / cfg.num_kv_heads;
  return splits_for(dev, cfg, num_q_heads, max_visible, pick(cfg.k_type, cfg.v_type, cfg.head_dim, group, max_visible));
}

size_t workspace_tail_offset(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads) {
  return partial_bytes(dev, cfg, num_q_heads);
}

size_t workspace_bytes(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads) {
  const size_t tail = (size_t(cfg.num_seqs) * sizeof(int64_t) + 255) / 256 * 256 + size_t(num_q_heads) * sizeof(float);
  return partial_bytes(dev, cfg, num_q_heads) + tail;
}

void attend(const tqkv_cache_config& cfg, const DeviceCache& dev, const AttendCall& call, int64_t max_visible) {
  const uint32_t group = call.num_q_heads / cfg.num_kv_heads;
  // The grids: (split, KV head x head chunk, sequence) for the attention, one block per
  // (sequence, query head) for the combine. num_seqs <= 65535 is checked when the cache is made.
  const uint64_t grid_y = uint64_t(cfg.num_kv_heads) * head_chunks(group);
  if (grid_y > 65535 || uint64_t(cfg.num_seqs) * call.num_q_heads > uint64_t(INT32_MAX))
    invalid("num_q_heads: " + std::to_string(call.num_q_heads) + " is too many for the CUDA backend with " +
            std::to_string(cfg.num_kv_heads) + " KV heads and " + std::to_string(cfg.num_seqs) +
            " sequences; allowed: num_kv_heads x ceil(num_q_heads / num_kv_heads / 8) <= 65535 and num_seqs x "
            "num_q_heads < 2^31");
  const Instance inst = pick(cfg.k_type, cfg.v_type, cfg.head_dim, group, max_visible);
  if (!inst) fail(TQKV_ERROR_UNSUPPORTED, "k_type/v_type: this pair is not compiled into the CUDA backend");
  // One codebook per cache makes the two planes' tables equal; this guards that assumption.
  if (inst.one_table && std::memcmp(&dev.plane(0).tab, &dev.plane(1).tab, sizeof(HalfBytes)) != 0)
    fail(TQKV_ERROR_INTERNAL, "CUDA attention: the table-lookup kernel needs one codebook for K and V");
  const uint32_t ns = splits_for(dev, cfg, call.num_q_heads, max_visible, inst);
  auto stream = static_cast<cudaStream_t>(dev.stream());
  AttnKernelParams p{};
  const DevPlane& k = dev.plane(0);
  const DevPlane& v = dev.plane(1);
  p.k_data = k.data;
  p.v_data = v.data;
  p.k_scales = k.scales;
  p.v_scales = v.scales;
  p.k_centroids = k.centroids;
  p.v_centroids = v.centroids;
  p.signs = dev.signs();
  p.lengths = dev.lengths();
  p.q_pos = call.q_pos;
  p.centers = dev.centers();
  p.q = call.q;
  p.part_o = static_cast<float*>(call.workspace);
  // The partial sums follow the largest partial-output block any split count can need.
  const size_t ns_max = workspace_splits(dev, cfg, call.num_q_heads);
  p.part_ml = p.part_o + size_t(cfg.num_seqs) * call.num_q_heads * ns_max * cfg.head_dim;
  p.hkv = cfg.num_kv_heads;
  p.group = group;
  p.num_q_heads = call.num_q_heads;
  p.capacity = cfg.capacity;
  p.nsplit = ns;
  p.head_chunks = head_chunks(group);
  p.ring = cfg.layout == TQKV_LAYOUT_RING;
  p.mask = call.mask;
  p.window = call.window;
  p.order_zero = 0;  // see AttnKernelParams: a zero the kernel compiles as unknown
  p.scale = call.scale;
  p.softcap = call.softcap;
  p.k_scale_f16 = k.scale_f16 && fmt::is_tq(k.type);
  p.v_scale_f16 = v.scale_f16 && fmt::is_tq(v.type);
  p.centered = fmt::is_tq(k.type);
  p.k_tab = k.tab;
  p.v_tab = v.tab;
  const dim3 grid(ns, cfg.num_kv_heads * p.head_chunks, cfg.num_seqs);
  // Programmatic dependents on sm_90 (see grid_dependency_wait): the table-lookup kernel's
  // launch and table build overlap the end of the previous kernel (the previous call's combine,
  // say), and the combine's launch the end of the attention. The tile kernel is launched plainly:
  // as a dependent it was slower (H100: B8 S1024 13.8 -> 14.9 us, B1 S4096 9.9 -> 11.0).
  const bool pdl = dev.cc_major() >= 9;
  p.prefetch = pdl && inst.pdl && prefetch_enabled();
  // A table-lookup grid with at most one block per SM asks for over half an SM's shared memory,
  // so that no SM gets two of its blocks while another gets none. Without that floor, calls
  // back to back with one block per SM at D = 128 ran bimodally, and with the padded merge
  // layout up to 19% slower (H100, 20 calls in a graph: batch 8 S = 1024 12.4 against 10.3 us,
  // batch 1 S = 8192 12.3 against 10.2), while single calls were not slower: blocks doubling up
  // where the previous call's combine still held SMs, most likely. The floor removed it (kernel
  // notes, step 64). The rest of the SM stays free for the combine's blocks.
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  if (blocks <= uint64_t(dev.sm_count()) && dev.smem_per_sm() > 0) {
    const int half = dev.smem_per_sm() / 2 + 1024;  // two, with the 1 KB each reserves, exceed an SM
    if (half <= dev.smem_per_block()) p.smem_floor = half;
  }
  inst.launch(p, grid, stream, pdl && inst.pdl);
  const uint32_t rows = cfg.num_seqs * call.num_q_heads;
  const int rot = fmt::is_tq(v.type) ? 1 : 0;
  auto* combine = cfg.head_dim == 64    ? combine_kernel<64>
                  : cfg.head_dim == 128 ? combine_kernel<128>
                  : cfg.head_dim == 256 ? combine_kernel<256>
                                        : combine_kernel<512>;
  launch_ex(combine, dim3(rows), dim3(kCombineWarps * 32), 0, stream, pdl, static_cast<const float*>(p.part_o),
            static_cast<const float*>(p.part_ml), call.sinks, dev.signs(), call.out, call.lse, call.num_q_heads, ns, rot);
}

}  // namespace tqkv::cuda
