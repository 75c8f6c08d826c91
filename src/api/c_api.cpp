// The C ABI: the only place where internal errors become tqkv_status codes. No exception
// crosses this file's functions.
#include <cstring>
#include <exception>
#include <new>
#include <string>

#include "core/attention_ref.h"
#include "core/attn_plan.h"
#include "core/cache.h"
#include "core/error.h"
#include "cpu/attention.h"
#include "api/handle.h"
#include "tqkv/tqkv.h"

#ifdef TQKV_HAVE_CUDA
namespace tqkv::cuda {
bool device_available();
}
#endif

struct tqkv_cache {
  tqkv::core::Cache impl;
  explicit tqkv_cache(const tqkv_cache_config& c) : impl(c) {}
};

namespace {

thread_local std::string g_last_error;

template <typename F>
tqkv_status guarded(F&& f) {
  try {
    f();
    g_last_error.clear();
    return TQKV_OK;
  } catch (const tqkv::Error& e) {
    g_last_error = e.what();
    return e.status();
  } catch (const std::bad_alloc&) {
    g_last_error = "out of memory";
    return TQKV_ERROR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    g_last_error = std::string("internal error: ") + e.what();
    return TQKV_ERROR_INTERNAL;
  } catch (...) {
    g_last_error = "internal error: unknown exception";
    return TQKV_ERROR_INTERNAL;
  }
}

const tqkv::core::Cache& cache_ref(const tqkv_cache* c) {
  if (c == nullptr) tqkv::invalid("cache: NULL; must be a cache from tqkv_cache_create");
  return c->impl;
}
tqkv::core::Cache& cache_ref(tqkv_cache* c) {
  if (c == nullptr) tqkv::invalid("cache: NULL; must be a cache from tqkv_cache_create");
  return c->impl;
}
void need(const void* p, const char* what) {
  if (p == nullptr) tqkv::invalid(std::string(what) + ": NULL; must point to the output");
}

}  // namespace

namespace tqkv::api {
const core::Cache& unwrap(const tqkv_cache* cache) { return cache_ref(cache); }
}  // namespace tqkv::api

extern "C" {

uint32_t tqkv_version_number(void) { return TQKV_VERSION_NUMBER; }

const char* tqkv_version_string(void) {
#define TQKV_STR2(x) #x
#define TQKV_STR(x) TQKV_STR2(x)
  return TQKV_STR(TQKV_VERSION_MAJOR) "." TQKV_STR(TQKV_VERSION_MINOR) "." TQKV_STR(TQKV_VERSION_PATCH);
}

const char* tqkv_status_string(tqkv_status s) {
  switch (s) {
    case TQKV_OK: return "ok";
    case TQKV_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case TQKV_ERROR_UNSUPPORTED: return "unsupported";
    case TQKV_ERROR_CAPACITY: return "capacity exceeded";
    case TQKV_ERROR_NON_FINITE: return "non-finite or unrepresentable value";
    case TQKV_ERROR_OUT_OF_MEMORY: return "out of memory";
    case TQKV_ERROR_BACKEND: return "backend error";
    case TQKV_ERROR_INTERNAL: return "internal error";
    case TQKV_ERROR_IO: return "file error";
    default: break;
  }
  return "unknown status";
}

const char* tqkv_last_error(void) { return g_last_error.c_str(); }

int tqkv_backend_available(tqkv_backend backend) {
  if (backend == TQKV_BACKEND_CPU) return 1;
#ifdef TQKV_HAVE_CUDA
  if (backend == TQKV_BACKEND_CUDA) return tqkv::cuda::device_available() ? 1 : 0;
#endif
  return 0;
}

tqkv_status tqkv_cache_config_init(tqkv_cache_config* c) {
  return guarded([&] {
    need(c, "config");
    std::memset(c, 0, sizeof *c);
    c->head_dim = 128;
    c->num_kv_heads = 1;
    c->num_seqs = 1;
    c->capacity = 4096;
    c->k_type = TQKV_TYPE_TQ4;
    c->v_type = TQKV_TYPE_TQ4;
    c->layout = TQKV_LAYOUT_LINEAR;
    c->codebook = TQKV_CODEBOOK_EXACT;
    c->scale_mode = TQKV_SCALE_LSQ;
    c->scale_dtype = TQKV_SCALE_F32;
    c->backend = TQKV_BACKEND_CPU;
    c->seed = TQKV_DEFAULT_SEED;
    c->k_center = TQKV_CENTER_NONE;
  });
}

tqkv_status tqkv_cache_create(const tqkv_cache_config* config, tqkv_cache** out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    if (config == nullptr) tqkv::invalid("config: NULL; initialise one with tqkv_cache_config_init");
    *out = new tqkv_cache(*config);
  });
}

void tqkv_cache_destroy(tqkv_cache* cache) { delete cache; }

tqkv_status tqkv_cache_get_config(const tqkv_cache* cache, tqkv_cache_config* out) {
  return guarded([&] {
    const auto& c = cache_ref(cache);
    need(out, "out");
    *out = c.config();
  });
}

tqkv_status tqkv_cache_append(tqkv_cache* cache, uint32_t seq, uint32_t n_tokens, tqkv_dtype dtype, const void* k,
                              const void* v) {
  return guarded([&] { cache_ref(cache).append(seq, n_tokens, dtype, k, v); });
}

tqkv_status tqkv_cache_append_batch(tqkv_cache* cache, const uint32_t* counts, tqkv_dtype dtype, const void* k,
                                    const void* v) {
  return guarded([&] { cache_ref(cache).append_batch(counts, dtype, k, v); });
}

tqkv_status tqkv_cache_length(const tqkv_cache* cache, uint32_t seq, int64_t* out) {
  return guarded([&] {
    const auto& c = cache_ref(cache);
    need(out, "out");
    *out = c.length(seq);
  });
}

tqkv_status tqkv_cache_reset(tqkv_cache* cache, uint32_t seq) {
  return guarded([&] { cache_ref(cache).reset(seq); });
}

tqkv_status tqkv_cache_set_k_center(tqkv_cache* cache, uint32_t seq, const float* mu) {
  return guarded([&] { cache_ref(cache).set_k_center(seq, mu); });
}

tqkv_status tqkv_cache_memory(const tqkv_cache* cache, tqkv_memory_info* out) {
  return guarded([&] {
    const auto& c = cache_ref(cache);
    need(out, "out");
    *out = c.memory();
  });
}

tqkv_status tqkv_config_memory(const tqkv_cache_config* config, tqkv_memory_info* out) {
  return guarded([&] {
    if (config == nullptr) tqkv::invalid("config: NULL; initialise one with tqkv_cache_config_init");
    need(out, "out");
    *out = tqkv::core::memory_for(*config);
  });
}

tqkv_status tqkv_cache_read(const tqkv_cache* cache, uint32_t seq, int which, int64_t first, uint32_t n, float* out) {
  return guarded([&] { cache_ref(cache).read(seq, which, first, n, out); });
}

tqkv_status tqkv_attend(const tqkv_cache* cache, const tqkv_attn_params* params, const float* q, float* out,
                        float* lse) {
  return guarded([&] {
    const auto& c = cache_ref(cache);
    const auto plan = tqkv::core::plan_attention(c, params, q, out);
    tqkv::cpu::attend(c, plan, q, out, lse);
  });
}

tqkv_status tqkv_attend_reference(const tqkv_cache* cache, const tqkv_attn_params* params, const float* q,
                                  float* out, float* lse) {
  return guarded([&] {
    const auto& c = cache_ref(cache);
    const auto plan = tqkv::core::plan_attention(c, params, q, out);
    tqkv::core::attend_reference(c, plan, q, out, lse);
  });
}

tqkv_status tqkv_attend_seq(const tqkv_cache* cache, uint32_t seq, uint32_t n_q, const int64_t* q_pos,
                            const tqkv_attn_params* params, const float* q, float* out, float* lse) {
  return guarded([&] {
    const auto& c = cache_ref(cache);
    const auto plan = tqkv::core::plan_attention_seq(c, seq, n_q, q_pos, params, q, out);
    tqkv::cpu::attend(c, plan, q, out, lse);
  });
}

tqkv_status tqkv_attend_seq_reference(const tqkv_cache* cache, uint32_t seq, uint32_t n_q, const int64_t* q_pos,
                                      const tqkv_attn_params* params, const float* q, float* out, float* lse) {
  return guarded([&] {
    const auto& c = cache_ref(cache);
    const auto plan = tqkv::core::plan_attention_seq(c, seq, n_q, q_pos, params, q, out);
    tqkv::core::attend_reference(c, plan, q, out, lse);
  });
}

void tqkv_counters_get(tqkv_counters* out) {
  if (out == nullptr) return;
  auto& c = tqkv::core::counters();
  out->compressed_rows_read = c.compressed_rows_read.load();
  out->block_rows_read = c.block_rows_read.load();
  out->dense_rows_read = c.dense_rows_read.load();
  out->rows_encoded = c.rows_encoded.load();
  out->attend_calls = c.attend_calls.load();
}

void tqkv_counters_reset(void) {
  auto& c = tqkv::core::counters();
  c.compressed_rows_read = 0;
  c.block_rows_read = 0;
  c.dense_rows_read = 0;
  c.rows_encoded = 0;
  c.attend_calls = 0;
}

}  // extern "C"
