// Fused split-K decode attention over a device cache (attention.cu, combine in the same file).
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/cache.h"
#include "cuda/device_cache.h"
#include "tqkv/tqkv.h"

namespace tqkv::cuda {

struct AttendCall {
  const float* q = nullptr;  // device [num_seqs][num_q_heads][head_dim]
  float* out = nullptr;      // device, same shape
  float* lse = nullptr;      // device [num_seqs][num_q_heads] or null
  const int64_t* q_pos = nullptr;  // device [num_seqs] or null (last position)
  const float* sinks = nullptr;    // device [num_q_heads] or null
  uint32_t num_q_heads = 0;
  float scale = 1, softcap = 0;
  tqkv_mask mask = TQKV_MASK_NONE;
  uint32_t window = 0;
  void* workspace = nullptr;  // device, >= workspace_bytes(...)
  size_t workspace_bytes = 0;
};

// Whether the fused kernel handles this K/V pair, head_dim and group (query heads per KV head);
// the message names what is not.
bool supported(const tqkv_cache_config& cfg, uint32_t group, const char** why);

// Workspace bytes for any length the cache can hold.
size_t workspace_bytes(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads);

// Offset in the workspace of the room for host q_pos and sinks (after the split partials).
size_t workspace_tail_offset(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads);

// Splits per sequence for a visible length bound (the selection the launch uses).
uint32_t num_splits(const DeviceCache& dev, const tqkv_cache_config& cfg, uint32_t num_q_heads, int64_t max_visible);

// Launches the attention and the combine on dev.stream(). max_visible bounds the visible range
// of every sequence (from host lengths, or from capacity while a graph is captured).
void attend(const tqkv_cache_config& cfg, const DeviceCache& dev, const AttendCall& call, int64_t max_visible);

}  // namespace tqkv::cuda
