// Selection (support, split count, workspace), the combine kernel, and dispatch to the
// generated attention instances. One function decides each of these; style.md.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "core/format.h"
#include "cuda/attention.h"
#include "cuda/attn_kernel.cuh"
#include "cuda/attn_lut_kernel.cuh"
#include "cuda/check.cuh"
#include "cuda/warp_fwht.cuh"

namespace tqkv::cuda {

// Instances live in cuda/instances/*.cu (scripts/gen_cuda_instances.py).
#define TQKV_DECLARE_ATTN_D(KT, VT, D)                                                          \
  extern template void launch_attn<KT, VT, D>(const AttnKernelParams&, dim3, cudaStream_t); \
  extern template int attn_blocks_per_sm<KT, VT, D>();
#define TQKV_DECLARE_ATTN(KT, VT)  \
  TQKV_DECLARE_ATTN_D(KT, VT, 64)  \
  TQKV_DECLARE_ATTN_D(KT, VT, 128) \
  TQKV_DECLARE_ATTN_D(KT, VT, 256) \
  TQKV_DECLARE_ATTN_D(KT, VT, 512)
#include "cuda/instances/list.inc"
#undef TQKV_DECLARE_ATTN
#define TQKV_DECLARE_ATTN_LUT(D)                                                             \
  extern template void lut::launch<D>(const AttnKernelParams&, dim3, cudaStream_t); \
  extern template int lut::blocks_per_sm<D>();
TQKV_DECLARE_ATTN_LUT(64)
TQKV_DECLARE_ATTN_LUT(128)
TQKV_DECLARE_ATTN_LUT(256)
#undef TQKV_DECLARE_ATTN_LUT

namespace {

constexpr bool cuda_type(uint32_t t) { return fmt::is_tq(t) || t == fmt::F16; }

struct Instance {
  void (*launch)(const AttnKernelParams&, dim3, cudaStream_t) = nullptr;
  int (*blocks_per_sm)() = nullptr;
  int64_t min_rows_per_split = 0;  // fewer rows per split spread short contexts wider but grow the combine
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

// The table-lookup kernel: 4-bit K and V up to head_dim 256.
Instance pick_lut(uint32_t kt, uint32_t vt, uint32_t d) {
  if (kt != fmt::TQ4 || vt != fmt::TQ4) return {};
  switch (d) {
    case 64: return {lut::launch<64>, lut::blocks_per_sm<64>, lut::kMinRowsPerSplit};
    case 128: return {lut::launch<128>, lut::blocks_per_sm<128>, lut::kMinRowsPerSplit};
    case 256: return {lut::launch<256>, lut::blocks_per_sm<256>, lut::kMinRowsPerSplit};
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

// Visible rows from which the table-lookup kernel is used: below it, building its 64 KB of
// tables per block outweighs its faster rows and the tile kernel is faster (H100: S = 4096 takes
// 11.1 us on the tile kernel, 13.3 on this one; S = 8192, 17.0 against 15.5;
// docs/cuda-kernel-notes.md).
constexpr int64_t kLutMinRows = 8192;

// The one selection of the kernel for a call; max_visible bounds every sequence's visible rows.
Instance pick(uint32_t kt, uint32_t vt, uint32_t d, int64_t max_visible) {
  const int forced = forced_kernel();
  if (forced == 2 || (forced == 0 && max_visible >= kLutMinRows))
    if (Instance lut = pick_lut(kt, vt, d)) return lut;
  return pick_tile(kt, vt, d);
}

uint32_t head_chunks(uint32_t group) { return (group + kHeadsPerBlock - 1) / kHeadsPerBlock; }

// Blocks per split: one per (sequence, KV head, chunk of up to 8 query heads).
uint64_t blocks_per_split(const tqkv_cache_config& cfg, uint32_t num_q_heads) {
  const uint32_t group = std::max(1u, num_q_heads / cfg.num_kv_heads);
  return uint64_t(cfg.num_seqs) * cfg.num_kv_heads * head_chunks(group);
}

// Splits per (sequence, KV head, head chunk) for long contexts: as many as fill the resident
// block slots of the device exactly once (one wave, no tail of a second partial wave).
uint32_t max_splits(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads, const Instance& inst) {
  const uint64_t pairs = blocks_per_split(cfg, num_q_heads);
  const uint64_t per_sm = inst ? uint64_t(inst.blocks_per_sm()) : 1;
  const uint64_t slots = per_sm * uint64_t(std::max(1, dev.sm_count()));
  return uint32_t(std::clamp<uint64_t>(slots / pairs, 1, 1024));
}

// Splits the workspace is laid out for: the most either kernel can use.
uint32_t workspace_splits(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads) {
  const Instance tile = pick_tile(cfg.k_type, cfg.v_type, cfg.head_dim);
  const Instance lut = pick_lut(cfg.k_type, cfg.v_type, cfg.head_dim);
  return std::max(max_splits(dev, cfg, num_q_heads, tile), lut ? max_splits(dev, cfg, num_q_heads, lut) : 0u);
}

// Workspace bytes before the tail that carries host q_pos and sinks.
size_t partial_bytes(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads) {
  const size_t ns = workspace_splits(dev, cfg, num_q_heads);
  const size_t rows = size_t(cfg.num_seqs) * num_q_heads * ns;
  const size_t b = rows * cfg.head_dim * sizeof(float) + rows * 2 * sizeof(float);
  return (b + 255) / 256 * 256;
}

// Merges the splits of one (sequence, query head) and rotates the output back. Four warps:
// warp w sums splits w, w+4, ... with lane l holding coordinates l*V .. l*V+V-1 (no shared-
// memory passes), then warp 0 adds the four partial sums, applies the inverse rotation in
// registers (FWHT strides below V in the lane, larger ones across lanes) and writes.
constexpr int kCombineWarps = 4;

template <int D>
__global__ void __launch_bounds__(kCombineWarps * 32)
    combine_kernel(const float* part_o, const float* part_ml, const float* sinks, const float* signs, float* out,
                   float* lse, uint32_t num_q_heads, uint32_t nsplit, int rotated) {
  constexpr int V = D / 32;
  __shared__ float part[kCombineWarps][D];
  __shared__ float red[2][kCombineWarps];
  __shared__ int red_bad[kCombineWarps];
  grid_dependency_wait();
  const uint32_t row = blockIdx.x, h = row % num_q_heads;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float* ml = part_ml + size_t(row) * nsplit * 2;
  const float* po = part_o + size_t(row) * nsplit * D;
  const float log2e = 1.4426950408889634f;
  float m = -INFINITY;
  int bad = 0;  // a poisoned split (NaN) poisons the result
  for (uint32_t s = threadIdx.x; s < nsplit; s += kCombineWarps * 32) {
    const float2 v = *reinterpret_cast<const float2*>(ml + 2 * s);
    bad |= isnan(v.x) || isnan(v.y);
    m = fmaxf(m, v.x);
  }
  for (int o = 16; o > 0; o >>= 1) {
    m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
    bad |= __shfl_xor_sync(0xFFFFFFFFu, bad, o);
  }
  if (lane == 0) {
    red[0][warp] = m;
    red_bad[warp] = bad;
  }
  __syncthreads();
  m = sinks ? sinks[h] * log2e : -INFINITY;
  bad = 0;
  for (int i = 0; i < kCombineWarps; ++i) {
    m = fmaxf(m, red[0][i]);
    bad |= red_bad[i];
  }
  const float mu = m == -INFINITY ? 0.0f : m;
  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.0f;
  float l = 0.0f;
#pragma unroll 4
  for (uint32_t s = warp; s < nsplit; s += kCombineWarps) {
    const float2 v = *reinterpret_cast<const float2*>(ml + 2 * s);
    const float w = exp2f(v.x - mu);
    l += v.y * w;
#pragma unroll
    for (int j = 0; j < V; j += 2) {
      const float2 o = *reinterpret_cast<const float2*>(po + size_t(s) * D + lane * V + j);
      acc[j] += o.x * w;
      acc[j + 1] += o.y * w;
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) part[warp][lane * V + j] = acc[j];
  if (lane == 0) red[1][warp] = l;
  __syncthreads();
  if (warp != 0) return;
  l = sinks ? exp2f(sinks[h] * log2e - mu) : 0.0f;
  for (int i = 0; i < kCombineWarps; ++i) l += red[1][i];
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  float y[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    float sum = 0.0f;
    for (int i = 0; i < kCombineWarps; ++i) sum += part[i][lane * V + j];
    y[j] = bad ? __int_as_float(0x7FC00000) : sum * inv;
  }
  if (rotated) {  // x = s .* (H y) / sqrt(D)
    warp_fwht<V>(y, lane);
    const float norm = rsqrtf(float(D));
#pragma unroll
    for (int j = 0; j < V; ++j) y[j] *= norm * signs[lane * V + j];
  }
#pragma unroll
  for (int j = 0; j < V; j += 2)
    *reinterpret_cast<float2*>(out + size_t(row) * D + lane * V + j) = make_float2(y[j], y[j + 1]);
  if (lse && lane == 0)
    lse[row] = bad ? __int_as_float(0x7FC00000) : (l > 0.0f ? (mu + log2f(l)) * 0.69314718055994531f : -INFINITY);
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
  // A short context whose blocks would not reach half the SMs takes half-size splits: at
  // S = 1024, batch 1, Hkv = 8 on the H100 that is 7.2 instead of 8.1 us; where the blocks
  // already cover half the SMs (S = 2048, or batch 8) halving was slower (docs/cuda-kernel-notes.md).
  const uint64_t pairs = blocks_per_split(cfg, num_q_heads);
  if (uint64_t(n) * pairs * 2 <= uint64_t(std::max(1, dev.sm_count()))) n = by_len(std::max<int64_t>(1, min_rows / 2));
  return uint32_t(std::min<int64_t>(max_splits(dev, cfg, num_q_heads, inst), n));
}

}  // namespace

uint32_t num_splits(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads, int64_t max_visible) {
  return splits_for(dev, cfg, num_q_heads, max_visible, pick(cfg.k_type, cfg.v_type, cfg.head_dim, max_visible));
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
  const Instance inst = pick(cfg.k_type, cfg.v_type, cfg.head_dim, max_visible);
  if (!inst) fail(TQKV_ERROR_UNSUPPORTED, "k_type/v_type: this pair is not compiled into the CUDA backend");
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
  p.scale = call.scale;
  p.softcap = call.softcap;
  p.k_scale_f16 = k.scale_f16 && fmt::is_tq(k.type);
  p.v_scale_f16 = v.scale_f16 && fmt::is_tq(v.type);
  p.centered = fmt::is_tq(k.type);
  p.k_tab = k.tab;
  p.v_tab = v.tab;
  const dim3 grid(ns, cfg.num_kv_heads * p.head_chunks, cfg.num_seqs);
  inst.launch(p, grid, stream);
  const uint32_t rows = cfg.num_seqs * call.num_q_heads;
  const int rot = fmt::is_tq(v.type) ? 1 : 0;
  auto* combine = cfg.head_dim == 64    ? combine_kernel<64>
                  : cfg.head_dim == 128 ? combine_kernel<128>
                  : cfg.head_dim == 256 ? combine_kernel<256>
                                        : combine_kernel<512>;
  // Programmatic dependent launch (sm_90): the combine's blocks are scheduled while the last
  // attention blocks finish and wait in griddepcontrol.wait, which hides its launch latency.
  cudaLaunchConfig_t lc{};
  lc.gridDim = dim3(rows);
  lc.blockDim = dim3(kCombineWarps * 32);
  lc.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  if (dev.cc_major() >= 9) {
    lc.attrs = &attr;
    lc.numAttrs = 1;
  }
  TQKV_CUDA_CHECK(cudaLaunchKernelEx(&lc, combine, static_cast<const float*>(p.part_o),
                                     static_cast<const float*>(p.part_ml), call.sinks, dev.signs(), call.out, call.lse,
                                     call.num_q_heads, ns, rot));
  TQKV_CUDA_LAUNCHED("combine_kernel");
}

}  // namespace tqkv::cuda
