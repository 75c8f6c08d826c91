// One layer's KV cache: K and V planes, each with its own storage type, for a batch of
// sequences. Layout [seq][kv_head][slot] (core/format.h). Host memory; the CUDA backend keeps
// the same bytes on the device.
#pragma once
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "core/codec_ref.h"
#include "tqkv/tqkv.h"

namespace tqkv::core {

struct FreeDeleter {
  void operator()(void* p) const noexcept { std::free(p); }
};
using AlignedBytes = std::unique_ptr<uint8_t[], FreeDeleter>;
AlignedBytes aligned_bytes(size_t n);  // 64-byte aligned, zeroed; throws OUT_OF_MEMORY

struct Plane {
  uint32_t type = 0;
  size_t stride = 0;  // bytes between rows
  bool scale_f16 = false;
  CodecParams codec;
  AlignedBytes data;    // rows
  AlignedBytes scales;  // one scale per row (TQ types)
};

// Global counters behind tqkv_counters_get: proof that a given path really ran.
struct Counters {
  std::atomic<uint64_t> compressed_rows_read{0}, block_rows_read{0}, dense_rows_read{0}, rows_encoded{0}, attend_calls{0};
  std::atomic<uint64_t> cuda_attend_calls{0}, cuda_rows_encoded{0};
};
Counters& counters();

// Throws tqkv::Error naming the first invalid field.
void validate_config(const tqkv_cache_config& cfg);
tqkv_memory_info memory_for(const tqkv_cache_config& cfg);

class Cache {
 public:
  // host_storage = false keeps only the bookkeeping (lengths, key means, validation): the CUDA
  // backend holds the rows on the device and uses this object for everything else.
  explicit Cache(const tqkv_cache_config& cfg, bool host_storage = true);

  const tqkv_cache_config& config() const { return cfg_; }
  uint32_t head_dim() const { return cfg_.head_dim; }
  uint32_t num_kv_heads() const { return cfg_.num_kv_heads; }
  uint32_t num_seqs() const { return cfg_.num_seqs; }
  uint32_t capacity() const { return cfg_.capacity; }
  bool ring() const { return cfg_.layout == TQKV_LAYOUT_RING; }
  const Plane& plane(int which) const { return which == 0 ? k_ : v_; }
  const float* signs() const { return signs_.data(); }
  int64_t length(uint32_t seq) const;
  // Key mean of seq ([num_kv_heads][head_dim]), or nullptr when keys are stored as they are.
  const float* k_center(uint32_t seq) const;
  void set_k_center(uint32_t seq, const float* mu);
  // Oldest position still resident in seq.
  int64_t first_resident(uint32_t seq) const;
  uint32_t slot_of(int64_t pos) const { return static_cast<uint32_t>(ring() ? pos % cfg_.capacity : pos); }
  const uint8_t* row(int which, uint32_t seq, uint32_t kv_head, uint32_t slot) const;
  const void* scale_ptr(int which, uint32_t seq, uint32_t kv_head, uint32_t slot) const;
  tqkv_memory_info memory() const { return memory_for(cfg_); }

  bool host_storage() const { return host_storage_; }
  void append(uint32_t seq, uint32_t n_tokens, tqkv_dtype dtype, const void* k, const void* v);
  void append_batch(const uint32_t* counts, tqkv_dtype dtype, const void* k, const void* v);
  void reset(uint32_t seq);
  void read(uint32_t seq, int which, int64_t first, uint32_t n, float* out) const;

  // For backends that store rows elsewhere (CUDA) and for byte-for-byte copies between caches.
  void check_room(uint32_t seq, uint32_t n_tokens) const;
  void check_seq(uint32_t seq, const char* what) const;
  // Records n_tokens more positions of seq (rows written by another backend).
  void advance(uint32_t seq, uint32_t n_tokens);
  // Sets a sequence's length and key mean (nullptr: none) as a copy from another cache.
  void restore(uint32_t seq, int64_t length, const float* mu);
  Plane& mutable_plane(int which) { return which == 0 ? k_ : v_; }
  // Whether an append to seq now would define its key mean (k_center FIRST_APPEND, first append).
  bool defines_center(uint32_t seq) const;

 private:
  struct Encoded;  // rows encoded for one sequence, not yet committed
  Encoded encode(uint32_t n_tokens, tqkv_dtype dtype, const void* k, const void* v, uint32_t seq) const;
  bool centers_k() const;  // K is a quantized type, so a mean helps
  void commit(uint32_t seq, const Encoded& e);

  tqkv_cache_config cfg_;
  bool host_storage_ = true;
  std::vector<float> signs_;
  Plane k_, v_;
  std::vector<int64_t> lengths_;
  std::vector<float> centers_;     // [seq][kv_head][head_dim]
  std::vector<uint8_t> has_center_;  // [seq]
};

}  // namespace tqkv::core
