// Selection (support, split count, workspace), the combine kernel, and dispatch to the
// generated attention instances. One function decides each of these; style.md.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "core/format.h"
#include "cuda/attention.h"
#include "cuda/attn_kernel.cuh"
#include "cuda/check.cuh"

namespace tqkv::cuda {

// Instances live in cuda/instances/*.cu (scripts/gen_cuda_instances.py).
#define TQKV_DECLARE_ATTN(KT, VT)                                                                  \
  extern template void launch_attn<KT, VT, 64>(const AttnKernelParams&, dim3, cudaStream_t);  \
  extern template void launch_attn<KT, VT, 128>(const AttnKernelParams&, dim3, cudaStream_t); \
  extern template void launch_attn<KT, VT, 256>(const AttnKernelParams&, dim3, cudaStream_t); \
  extern template void launch_attn<KT, VT, 512>(const AttnKernelParams&, dim3, cudaStream_t);
#include "cuda/instances/list.inc"
#undef TQKV_DECLARE_ATTN

namespace {

constexpr bool cuda_type(uint32_t t) { return fmt::is_tq(t) || t == fmt::F16; }

using Launch = void (*)(const AttnKernelParams&, dim3, cudaStream_t);

template <int KT, int VT>
Launch pick_dim(uint32_t d) {
  switch (d) {
    case 64: return launch_attn<KT, VT, 64>;
    case 128: return launch_attn<KT, VT, 128>;
    case 256: return launch_attn<KT, VT, 256>;
    case 512: return launch_attn<KT, VT, 512>;
    default: return nullptr;
  }
}

// The one table of compiled K/V pairs.
Launch pick(uint32_t kt, uint32_t vt, uint32_t d) {
#define TQKV_DECLARE_ATTN(KT, VT) \
  if (kt == KT && vt == VT) return pick_dim<KT, VT>(d);
#include "cuda/instances/list.inc"
#undef TQKV_DECLARE_ATTN
  return nullptr;
}

uint32_t head_chunks(uint32_t group) { return (group + kHeadsPerBlock - 1) / kHeadsPerBlock; }

// Blocks resident per SM for a typical instance (two: see Config's shared-memory budget); the
// split count aims at two waves of them.
constexpr uint32_t kBlocksPerSm = 2;
constexpr int64_t kMinRowsPerSplit = 256;

uint32_t max_splits(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads) {
  const uint32_t group = std::max(1u, num_q_heads / cfg.num_kv_heads);
  const uint64_t blocks = uint64_t(cfg.num_seqs) * cfg.num_kv_heads * head_chunks(group);
  const uint64_t want = 2ull * kBlocksPerSm * uint64_t(std::max(1, dev.sm_count()));
  return uint32_t(std::clamp<uint64_t>((want + blocks - 1) / blocks, 1, 1024));
}

// Workspace bytes before the tail that carries host q_pos and sinks.
size_t partial_bytes(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads) {
  const size_t ns = max_splits(dev, cfg, num_q_heads);
  const size_t rows = size_t(cfg.num_seqs) * num_q_heads * ns;
  const size_t b = rows * cfg.head_dim * sizeof(float) + rows * 2 * sizeof(float);
  return (b + 255) / 256 * 256;
}

// Merges the splits of one (sequence, query head) and rotates the output back.
__global__ void combine_kernel(const float* part_o, const float* part_ml, const float* sinks, const float* signs,
                               float* out, float* lse, uint32_t num_q_heads, uint32_t nsplit, int d, int rotated) {
  extern __shared__ float y[];  // [d]
  const uint32_t row = blockIdx.x, h = row % num_q_heads;
  const float* ml = part_ml + size_t(row) * nsplit * 2;
  const float* po = part_o + size_t(row) * nsplit * d;
  const float log2e = 1.4426950408889634f;
  float m = sinks ? sinks[h] * log2e : -INFINITY;
  bool bad = false;
  for (uint32_t s = 0; s < nsplit; ++s) {
    const float ms = ml[2 * s];
    bad |= isnan(ms) || isnan(ml[2 * s + 1]);
    m = fmaxf(m, ms);
  }
  const float mu = m == -INFINITY ? 0.0f : m;
  float l = sinks ? exp2f(sinks[h] * log2e - mu) : 0.0f;
  for (uint32_t s = 0; s < nsplit; ++s) l += ml[2 * s + 1] * exp2f(ml[2 * s] - mu);
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.0f;
    for (uint32_t s = 0; s < nsplit; ++s) {
      const float w = exp2f(ml[2 * s] - mu);
      if (w != 0.0f) acc += po[size_t(s) * d + c] * w;
    }
    y[c] = bad ? __int_as_float(0x7FC00000) : acc * inv;
  }
  __syncthreads();
  if (rotated) {  // x = s .* (H y) / sqrt(d)
    for (int len = 1; len < d; len <<= 1) {
      for (int i = threadIdx.x; i < d / 2; i += blockDim.x) {
        const int a = (i / len) * 2 * len + (i % len), b = a + len;
        const float u = y[a], v = y[b];
        y[a] = u + v;
        y[b] = u - v;
      }
      __syncthreads();
    }
  }
  const float norm = rotated ? rsqrtf(float(d)) : 1.0f;
  for (int c = threadIdx.x; c < d; c += blockDim.x) out[size_t(row) * d + c] = y[c] * norm * (rotated ? signs[c] : 1.0f);
  if (lse && threadIdx.x == 0)
    lse[row] = bad ? __int_as_float(0x7FC00000) : (l > 0.0f ? (mu + log2f(l)) * 0.69314718055994531f : -INFINITY);
}

}  // namespace

bool supported(const tqkv_cache_config& cfg, uint32_t group, const char** why) {
  static const char* kTypes =
      "k_type/v_type: this pair is not compiled into the CUDA backend; CUDA supports 2, 3, 4, 8 (TurboQuant "
      "bits) and 16 (f16), all TurboQuant pairs and f16/f16 (configure with TQKV_CUDA_ALL_PAIRS=ON for mixed f16 pairs)";
  if (!cuda_type(cfg.k_type) || !cuda_type(cfg.v_type) || pick(cfg.k_type, cfg.v_type, cfg.head_dim) == nullptr) {
    *why = kTypes;
    return false;
  }
  if (group == 0) {
    *why = "num_q_heads: must be a positive multiple of num_kv_heads";
    return false;
  }
  return true;
}

uint32_t num_splits(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads, int64_t max_visible) {
  const int64_t by_len = std::max<int64_t>(1, (max_visible + kMinRowsPerSplit - 1) / kMinRowsPerSplit);
  return uint32_t(std::min<int64_t>(max_splits(dev, cfg, num_q_heads), by_len));
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
  const Launch launch = pick(cfg.k_type, cfg.v_type, cfg.head_dim);
  if (launch == nullptr) fail(TQKV_ERROR_UNSUPPORTED, "k_type/v_type: this pair is not compiled into the CUDA backend");
  const uint32_t ns = num_splits(dev, cfg, call.num_q_heads, max_visible);
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
  const size_t ns_max = max_splits(dev, cfg, call.num_q_heads);
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
  const dim3 grid(ns, cfg.num_kv_heads * p.head_chunks, cfg.num_seqs);
  launch(p, grid, stream);
  const int threads = std::min<int>(int(cfg.head_dim), 256);
  combine_kernel<<<cfg.num_seqs * call.num_q_heads, threads, cfg.head_dim * sizeof(float), stream>>>(
      p.part_o, p.part_ml, call.sinks, dev.signs(), call.out, call.lse, call.num_q_heads, ns, int(cfg.head_dim),
      fmt::is_tq(v.type) ? 1 : 0);
  TQKV_CUDA_LAUNCHED("combine_kernel");
}

}  // namespace tqkv::cuda
