// tqkv C++ API: RAII and spans over the C ABI. Errors surface as tqkv::Error, which carries
// the same tqkv_status code and message the C ABI reports.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>

#include "tqkv/tqkv.h"

namespace tqkv {

class Error : public std::runtime_error {
 public:
  Error(tqkv_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  tqkv_status status() const noexcept { return status_; }

 private:
  tqkv_status status_;
};

inline void check(tqkv_status s) {
  if (s != TQKV_OK) throw Error(s, tqkv_last_error());
}

enum class Type : uint32_t {
  tq2 = TQKV_TYPE_TQ2, tq3 = TQKV_TYPE_TQ3, tq4 = TQKV_TYPE_TQ4, tq8 = TQKV_TYPE_TQ8, f16 = TQKV_TYPE_F16, f32 = TQKV_TYPE_F32,
  q4_0 = TQKV_TYPE_Q4_0, q8_0 = TQKV_TYPE_Q8_0, q4_0_had = TQKV_TYPE_Q4_0_HAD, q8_0_had = TQKV_TYPE_Q8_0_HAD
};
enum class Mask : uint32_t { none = TQKV_MASK_NONE, causal = TQKV_MASK_CAUSAL, window = TQKV_MASK_WINDOW };

// Configuration with the library's defaults; fields as in tqkv_cache_config.
struct CacheConfig : tqkv_cache_config {
  CacheConfig() { check(tqkv_cache_config_init(this)); }
  CacheConfig& dims(uint32_t d, uint32_t kv_heads) { head_dim = d; num_kv_heads = kv_heads; return *this; }
  CacheConfig& types(Type k, Type v) { k_type = static_cast<tqkv_type>(k); v_type = static_cast<tqkv_type>(v); return *this; }
  CacheConfig& seqs(uint32_t n, uint32_t cap) { num_seqs = n; capacity = cap; return *this; }
  CacheConfig& ring(bool on = true) { layout = on ? TQKV_LAYOUT_RING : TQKV_LAYOUT_LINEAR; return *this; }
};

struct AttnParams : tqkv_attn_params {
  AttnParams(uint32_t q_heads, float logit_scale) : tqkv_attn_params{} {
    num_q_heads = q_heads;
    scale = logit_scale;
    mask = TQKV_MASK_CAUSAL;
  }
  AttnParams& with_mask(Mask m, uint32_t w = 0) { mask = static_cast<tqkv_mask>(m); window = w; return *this; }
  AttnParams& with_softcap(float c) { softcap = c; return *this; }
  AttnParams& with_sinks(std::span<const float> s) { sinks = s.data(); return *this; }
  AttnParams& with_q_pos(std::span<const int64_t> p) { q_pos = p.data(); return *this; }
  AttnParams& with_threads(uint32_t t) { num_threads = t; return *this; }
};

class Cache {
 public:
  explicit Cache(const tqkv_cache_config& config) {
    tqkv_cache* c = nullptr;
    check(tqkv_cache_create(&config, &c));
    ptr_.reset(c);
  }

  tqkv_cache_config config() const {
    tqkv_cache_config c;
    check(tqkv_cache_get_config(ptr_.get(), &c));
    return c;
  }
  // k and v: [n_tokens][num_kv_heads][head_dim]; the spans' sizes are checked.
  void append(uint32_t seq, std::span<const float> k, std::span<const float> v) {
    append_raw(seq, k.size(), v.size(), TQKV_DTYPE_F32, k.data(), v.data());
  }
  // f16 or bf16 bit patterns.
  void append(uint32_t seq, std::span<const uint16_t> k, std::span<const uint16_t> v, tqkv_dtype dtype) {
    append_raw(seq, k.size(), v.size(), dtype, k.data(), v.data());
  }
  // CUDA caches: appends that do not wait for the stream (tqkv_cache_append_async); k and v are
  // device pointers to n_tokens * num_kv_heads * head_dim values of dtype. Errors come from sync().
  void append_async(uint32_t seq, uint32_t n_tokens, tqkv_dtype dtype, const void* k, const void* v) {
    check(tqkv_cache_append_async(ptr_.get(), seq, n_tokens, dtype, k, v));
  }
  void append_batch_async(const uint32_t* counts, tqkv_dtype dtype, const void* k, const void* v) {
    check(tqkv_cache_append_batch_async(ptr_.get(), counts, dtype, k, v));
  }
  // Waits for the stream; throws the error of a failed asynchronous append.
  void sync() { check(tqkv_cache_sync(ptr_.get())); }
  int64_t length(uint32_t seq) const {
    int64_t n = 0;
    check(tqkv_cache_length(ptr_.get(), seq, &n));
    return n;
  }
  void reset(uint32_t seq) { check(tqkv_cache_reset(ptr_.get(), seq)); }
  // CUDA caches: the cudaStream_t their work runs on (nullptr: the default stream).
  void set_stream(void* stream) { check(tqkv_cache_set_stream(ptr_.get(), stream)); }
  // Device workspace bytes tqkv_attend needs with these params (0 for CPU caches).
  size_t workspace_size(const tqkv_attn_params& p) const {
    size_t n = 0;
    check(tqkv_attend_workspace_size(ptr_.get(), &p, &n));
    return n;
  }
  // Copies every stored byte, length and key mean of src (same configuration but the backend).
  void copy_from(const Cache& src) { check(tqkv_cache_copy(src.ptr_.get(), ptr_.get())); }
  tqkv_memory_info memory() const {
    tqkv_memory_info m;
    check(tqkv_cache_memory(ptr_.get(), &m));
    return m;
  }
  // q, out: [num_seqs][num_q_heads][head_dim]; lse: [num_seqs][num_q_heads] or empty.
  void attend(const tqkv_attn_params& p, std::span<const float> q, std::span<float> out,
              std::span<float> lse = {}) const {
    check_attend_sizes(p, q.size(), out.size(), lse.size());
    check(tqkv_attend(ptr_.get(), &p, q.data(), out.data(), lse.empty() ? nullptr : lse.data()));
  }
  void attend_reference(const tqkv_attn_params& p, std::span<const float> q, std::span<float> out,
                        std::span<float> lse = {}) const {
    check_attend_sizes(p, q.size(), out.size(), lse.size());
    check(tqkv_attend_reference(ptr_.get(), &p, q.data(), out.data(), lse.empty() ? nullptr : lse.data()));
  }
  // Chunked prefill: n_q = q_pos.size() queries of one sequence (tqkv_attend_seq).
  void attend_seq(uint32_t seq, std::span<const int64_t> q_pos, const tqkv_attn_params& p, std::span<const float> q,
                  std::span<float> out, std::span<float> lse = {}) const {
    check_seq_sizes(p, q_pos.size(), q.size(), out.size(), lse.size());
    check(tqkv_attend_seq(ptr_.get(), seq, uint32_t(q_pos.size()), q_pos.data(), &p, q.data(), out.data(),
                          lse.empty() ? nullptr : lse.data()));
  }
  void attend_seq_reference(uint32_t seq, std::span<const int64_t> q_pos, const tqkv_attn_params& p,
                            std::span<const float> q, std::span<float> out, std::span<float> lse = {}) const {
    check_seq_sizes(p, q_pos.size(), q.size(), out.size(), lse.size());
    check(tqkv_attend_seq_reference(ptr_.get(), seq, uint32_t(q_pos.size()), q_pos.data(), &p, q.data(), out.data(),
                                    lse.empty() ? nullptr : lse.data()));
  }
  // Decoded rows (original domain): which = 0 for K, 1 for V.
  void read(uint32_t seq, int which, int64_t first, uint32_t n, std::span<float> out) const {
    const auto c = config();
    if (out.size() < size_t(n) * c.num_kv_heads * c.head_dim)
      throw Error(TQKV_ERROR_INVALID_ARGUMENT, "out: span holds " + std::to_string(out.size()) + " floats; need n * num_kv_heads * head_dim");
    check(tqkv_cache_read(ptr_.get(), seq, which, first, n, out.data()));
  }
  tqkv_cache* get() const noexcept { return ptr_.get(); }

 private:
  struct Deleter {
    void operator()(tqkv_cache* c) const noexcept { tqkv_cache_destroy(c); }
  };

  void append_raw(uint32_t seq, size_t nk, size_t nv, tqkv_dtype dtype, const void* k, const void* v) {
    const auto c = config();
    const size_t row = size_t(c.num_kv_heads) * c.head_dim;
    if (nk != nv || nk % row != 0)
      throw Error(TQKV_ERROR_INVALID_ARGUMENT, "k, v: spans of " + std::to_string(nk) + " and " + std::to_string(nv) +
                                                   " values; both must hold n_tokens * num_kv_heads * head_dim (" +
                                                   std::to_string(row) + " per token)");
    check(tqkv_cache_append(ptr_.get(), seq, static_cast<uint32_t>(nk / row), dtype, k, v));
  }
  void check_attend_sizes(const tqkv_attn_params& p, size_t nq, size_t nout, size_t nlse) const {
    const auto c = config();
    const size_t need = size_t(c.num_seqs) * p.num_q_heads * c.head_dim;
    if (nq < need) throw Error(TQKV_ERROR_INVALID_ARGUMENT, "q: span holds " + std::to_string(nq) + " floats; need " + std::to_string(need));
    if (nout < need) throw Error(TQKV_ERROR_INVALID_ARGUMENT, "out: span holds " + std::to_string(nout) + " floats; need " + std::to_string(need));
    if (nlse != 0 && nlse < size_t(c.num_seqs) * p.num_q_heads)
      throw Error(TQKV_ERROR_INVALID_ARGUMENT, "lse: span holds " + std::to_string(nlse) + " floats; need num_seqs * num_q_heads");
  }

  void check_seq_sizes(const tqkv_attn_params& p, size_t n_q, size_t nq, size_t nout, size_t nlse) const {
    const auto c = config();
    const size_t need = n_q * p.num_q_heads * c.head_dim;
    if (nq < need) throw Error(TQKV_ERROR_INVALID_ARGUMENT, "q: span holds " + std::to_string(nq) + " floats; need " + std::to_string(need));
    if (nout < need) throw Error(TQKV_ERROR_INVALID_ARGUMENT, "out: span holds " + std::to_string(nout) + " floats; need " + std::to_string(need));
    if (nlse != 0 && nlse < n_q * p.num_q_heads)
      throw Error(TQKV_ERROR_INVALID_ARGUMENT, "lse: span holds " + std::to_string(nlse) + " floats; need n_q * num_q_heads");
  }

  std::unique_ptr<tqkv_cache, Deleter> ptr_;
};

inline tqkv_counters counters() {
  tqkv_counters c;
  tqkv_counters_get(&c);
  return c;
}

}  // namespace tqkv
