// The C ABI: the only place where internal errors become tqkv_status codes. No exception
// crosses this file's functions.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <memory>
#include <vector>
#include <new>
#include <string>

#include "core/attention_ref.h"
#include "core/attn_plan.h"
#include "core/cache.h"
#include "core/error.h"
#include "core/format.h"
#include "cpu/attention.h"
#include "api/handle.h"
#include "tqkv/tqkv.h"

#ifdef TQKV_HAVE_CUDA
#include "cuda/attention.h"
#include "cuda/device_cache.h"
#endif

// A CPU cache holds its rows in impl; a CUDA cache keeps impl for bookkeeping (lengths, key
// means, validation) and its rows in dev.
struct tqkv_cache {
  tqkv::core::Cache impl;
#ifdef TQKV_HAVE_CUDA
  std::unique_ptr<tqkv::cuda::DeviceCache> dev;
#endif
  explicit tqkv_cache(const tqkv_cache_config& c) : impl(c, c.backend == TQKV_BACKEND_CPU) {
    if (c.backend == TQKV_BACKEND_CUDA) {
#ifdef TQKV_HAVE_CUDA
      dev = std::make_unique<tqkv::cuda::DeviceCache>(impl);
#else
      tqkv::fail(TQKV_ERROR_UNSUPPORTED, "backend: this build of tqkv has no CUDA backend (configure with "
                                         "TQKV_CUDA=ON where nvcc is installed); use 0 (cpu)");
#endif
    }
  }
  bool cuda() const { return impl.config().backend == TQKV_BACKEND_CUDA; }
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


#ifdef TQKV_HAVE_CUDA
tqkv::cuda::DeviceCache& device_of(const tqkv_cache* c) { return *c->dev; }

// A host cache holding a CUDA cache's bytes, for the calls that read rows on the host.
std::unique_ptr<tqkv_cache> host_mirror(const tqkv_cache* c) {
  tqkv_cache_config cfg = c->impl.config();
  cfg.backend = TQKV_BACKEND_CPU;
  auto h = std::make_unique<tqkv_cache>(cfg);
  c->dev->download(c->impl, h->impl);
  return h;
}

void need_device(const void* p, const char* what, int device) {
  if (p != nullptr && tqkv::cuda::locate(p, device, what) == tqkv::cuda::kHostMemory)
    tqkv::invalid(std::string(what) + ": host pointer; a CUDA cache attends on device memory (cudaMalloc)");
}
#endif

const tqkv_cache* readable(const tqkv_cache* c, std::unique_ptr<tqkv_cache>& keep) {
#ifdef TQKV_HAVE_CUDA
  if (c->cuda()) {
    keep = host_mirror(c);
    return keep.get();
  }
#else
  (void)keep;
#endif
  return c;
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

namespace {

// The four append entry points: one sequence or a batch, waiting for the stream or not (CPU
// appends are always synchronous).
tqkv_status append_one(tqkv_cache* cache, uint32_t seq, uint32_t n_tokens, tqkv_dtype dtype, const void* k,
                       const void* v, bool async) {
  return guarded([&] {
    auto& c = cache_ref(cache);
#ifdef TQKV_HAVE_CUDA
    if (cache->cuda()) {
      c.check_seq(seq, "append");
      std::vector<uint32_t> counts(c.num_seqs(), 0);
      counts[seq] = n_tokens;
      device_of(cache).append(c, counts.data(), dtype, k, v, async);
      return;
    }
#else
    (void)async;
#endif
    c.append(seq, n_tokens, dtype, k, v);
  });
}

tqkv_status append_many(tqkv_cache* cache, const uint32_t* counts, tqkv_dtype dtype, const void* k, const void* v,
                        bool async) {
  return guarded([&] {
    auto& c = cache_ref(cache);
#ifdef TQKV_HAVE_CUDA
    if (cache->cuda()) {
      device_of(cache).append(c, counts, dtype, k, v, async);
      return;
    }
#else
    (void)async;
#endif
    c.append_batch(counts, dtype, k, v);
  });
}

}  // namespace

tqkv_status tqkv_cache_append(tqkv_cache* cache, uint32_t seq, uint32_t n_tokens, tqkv_dtype dtype, const void* k,
                              const void* v) {
  return append_one(cache, seq, n_tokens, dtype, k, v, false);
}

tqkv_status tqkv_cache_append_batch(tqkv_cache* cache, const uint32_t* counts, tqkv_dtype dtype, const void* k,
                                    const void* v) {
  return append_many(cache, counts, dtype, k, v, false);
}

tqkv_status tqkv_cache_append_async(tqkv_cache* cache, uint32_t seq, uint32_t n_tokens, tqkv_dtype dtype,
                                    const void* k, const void* v) {
  return append_one(cache, seq, n_tokens, dtype, k, v, true);
}

tqkv_status tqkv_cache_append_batch_async(tqkv_cache* cache, const uint32_t* counts, tqkv_dtype dtype, const void* k,
                                          const void* v) {
  return append_many(cache, counts, dtype, k, v, true);
}

tqkv_status tqkv_cache_sync(tqkv_cache* cache) {
  return guarded([&] {
    auto& c = cache_ref(cache);
#ifdef TQKV_HAVE_CUDA
    if (cache->cuda()) device_of(cache).sync(c);
#else
    (void)c;
#endif
  });
}

tqkv_status tqkv_cache_length(const tqkv_cache* cache, uint32_t seq, int64_t* out) {
  return guarded([&] {
    const auto& c = cache_ref(cache);
    need(out, "out");
    *out = c.length(seq);
  });
}

tqkv_status tqkv_cache_reset(tqkv_cache* cache, uint32_t seq) {
  return guarded([&] {
    auto& c = cache_ref(cache);
#ifdef TQKV_HAVE_CUDA
    if (cache->cuda()) return device_of(cache).reset(c, seq);
#endif
    c.reset(seq);
  });
}

tqkv_status tqkv_cache_set_k_center(tqkv_cache* cache, uint32_t seq, const float* mu) {
  return guarded([&] {
    auto& c = cache_ref(cache);
#ifdef TQKV_HAVE_CUDA
    if (cache->cuda()) return device_of(cache).set_k_center(c, seq, mu);
#endif
    c.set_k_center(seq, mu);
  });
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
  return guarded([&] {
    cache_ref(cache);
    std::unique_ptr<tqkv_cache> keep;
    readable(cache, keep)->impl.read(seq, which, first, n, out);
  });
}

#ifdef TQKV_HAVE_CUDA
namespace {

void attend_cuda(const tqkv_cache* cache, const tqkv_attn_params* params, const float* q, float* out, float* lse) {
  const auto& c = cache->impl;
  auto& dev = device_of(cache);
  if (params == nullptr) tqkv::invalid("params: NULL; must point to a tqkv_attn_params");
  const tqkv::cuda::DeviceScope scope(dev.device());
  need_device(q, "q", dev.device());
  need_device(out, "out", dev.device());
  need_device(lse, "lse", dev.device());
  const bool cap = tqkv::cuda::capturing(dev.stream());
  // Host-side validation of everything but the values behind device pointers.
  // Device q_pos values are read by the kernel (an out-of-range one gives NaN outputs there).
  // Host sinks are checked there; device ones are read where they are.
  const bool qpos_dev = tqkv::cuda::locate(params->q_pos, dev.device(), "q_pos") != tqkv::cuda::kHostMemory;
  const bool sinks_dev = tqkv::cuda::locate(params->sinks, dev.device(), "sinks") != tqkv::cuda::kHostMemory;
  tqkv_attn_params host_view = *params;
  if (qpos_dev) host_view.q_pos = nullptr;
  if (sinks_dev) host_view.sinks = nullptr;
  const auto plan = tqkv::core::plan_attention(c, &host_view, q, out, /*q_on_host=*/false);
  const char* why = nullptr;
  if (!tqkv::cuda::supported(c.config(), plan.group, &why)) tqkv::fail(TQKV_ERROR_UNSUPPORTED, why);
  tqkv::cuda::AttendCall call;
  call.q = q;
  call.out = out;
  call.lse = lse;
  call.num_q_heads = params->num_q_heads;
  call.scale = params->scale;
  call.softcap = params->softcap;
  call.mask = params->mask;
  call.window = params->window;
  const size_t need_ws = tqkv::cuda::workspace_bytes(dev, c.config(), params->num_q_heads);
  // From here to the launches the cache's workspace, its q_pos/sinks tail and the stream's order
  // belong to this call: several threads may attend on one cache at once (tqkv.h).
  const std::lock_guard<std::mutex> lock(dev.attend_mutex());
  if (params->workspace) {
    need_device(params->workspace, "workspace", dev.device());
    // The kernels read the partials in float2 and float4 and the host q_pos tail as int64.
    if (reinterpret_cast<uintptr_t>(params->workspace) % 16 != 0)
      tqkv::invalid("workspace: must be 16-byte aligned (cudaMalloc returns 256-byte aligned memory)");
    if (params->workspace_bytes < need_ws)
      tqkv::invalid("workspace_bytes: " + std::to_string(params->workspace_bytes) + " is too small; this call needs " +
                    std::to_string(need_ws) + " (tqkv_attend_workspace_size)");
    call.workspace = params->workspace;
    call.workspace_bytes = params->workspace_bytes;
  } else {
    call.workspace = dev.workspace(need_ws, cap);
    call.workspace_bytes = need_ws;
  }
  // Host q_pos / sinks travel in the workspace tail; device ones are read where they are.
  uint8_t* tail = static_cast<uint8_t*>(call.workspace) + tqkv::cuda::workspace_tail_offset(dev, c.config(), params->num_q_heads);
  if (params->q_pos) {
    if (qpos_dev) {
      call.q_pos = params->q_pos;
    } else {
      if (cap) tqkv::invalid("q_pos: host memory cannot be read by a captured graph; pass device memory or NULL");
      tqkv::cuda::copy_to_device(tail, params->q_pos, c.num_seqs() * sizeof(int64_t), dev.stream());
      call.q_pos = reinterpret_cast<const int64_t*>(tail);
    }
  }
  tail += (size_t(c.num_seqs()) * sizeof(int64_t) + 255) / 256 * 256;
  if (params->sinks) {
    if (sinks_dev) {
      call.sinks = params->sinks;
    } else {
      if (cap) tqkv::invalid("sinks: host memory cannot be read by a captured graph; pass device memory");
      tqkv::cuda::copy_to_device(tail, params->sinks, params->num_q_heads * sizeof(float), dev.stream());
      call.sinks = reinterpret_cast<const float*>(tail);
    }
  }
  // The split count must cover every length a replay can see while a graph is captured.
  int64_t max_visible = 0;
  if (cap) {
    max_visible = c.capacity();
  } else {
    for (const auto& qp : plan.queries) max_visible = std::max(max_visible, qp.range.size());
  }
  tqkv::cuda::attend(c.config(), dev, call, max_visible);
  auto& k = tqkv::core::counters();
  int64_t rows = 0;
  for (const auto& qp : plan.queries) rows += qp.range.size();
  const uint64_t kv_rows = uint64_t(rows) * c.num_kv_heads();
  for (int w = 0; w < 2; ++w) {
    const uint32_t t = w == 0 ? c.config().k_type : c.config().v_type;
    (tqkv::fmt::is_tq(t) ? k.compressed_rows_read : k.dense_rows_read) += kv_rows;
  }
  ++k.attend_calls;
  ++k.cuda_attend_calls;
}

}  // namespace
#endif

tqkv_status tqkv_attend(const tqkv_cache* cache, const tqkv_attn_params* params, const float* q, float* out,
                        float* lse) {
  return guarded([&] {
    const auto& c = cache_ref(cache);
#ifdef TQKV_HAVE_CUDA
    if (cache->cuda()) return attend_cuda(cache, params, q, out, lse);
#endif
    const auto plan = tqkv::core::plan_attention(c, params, q, out);
    tqkv::cpu::attend(c, plan, q, out, lse);
  });
}

tqkv_status tqkv_attend_reference(const tqkv_cache* cache, const tqkv_attn_params* params, const float* q,
                                  float* out, float* lse) {
  return guarded([&] {
    cache_ref(cache);
    std::unique_ptr<tqkv_cache> keep;
    const auto& c = readable(cache, keep)->impl;
    const auto plan = tqkv::core::plan_attention(c, params, q, out);
    tqkv::core::attend_reference(c, plan, q, out, lse);
  });
}

tqkv_status tqkv_cache_set_stream(tqkv_cache* cache, void* stream) {
  return guarded([&] {
    cache_ref(cache);
#ifdef TQKV_HAVE_CUDA
    if (cache->cuda()) return device_of(cache).set_stream(stream);
#endif
    if (stream != nullptr) tqkv::invalid("stream: a CPU cache has no stream; pass NULL or use a CUDA cache");
  });
}

tqkv_status tqkv_attend_workspace_size(const tqkv_cache* cache, const tqkv_attn_params* params, size_t* bytes) {
  return guarded([&] {
    const auto& c = cache_ref(cache);
    need(bytes, "bytes");
    if (params == nullptr) tqkv::invalid("params: NULL; must point to a tqkv_attn_params");
    tqkv::core::check_num_q_heads(params->num_q_heads, c.num_kv_heads());
    *bytes = 0;
#ifdef TQKV_HAVE_CUDA
    if (cache->cuda()) *bytes = tqkv::cuda::workspace_bytes(device_of(cache), c.config(), params->num_q_heads);
#endif
  });
}

tqkv_status tqkv_cache_copy(const tqkv_cache* src, tqkv_cache* dst) {
  return guarded([&] {
    const auto& s = cache_ref(src);
    auto& d = cache_ref(dst);
    tqkv_cache_config a = s.config(), b = d.config();
    a.backend = b.backend = TQKV_BACKEND_CPU;
    if (std::memcmp(&a, &b, sizeof a) != 0)
      tqkv::invalid("dst: its configuration differs from src's (only the backend may differ)");
    if (src == dst) return;
    std::unique_ptr<tqkv_cache> keep;
    const tqkv_cache* hs = readable(src, keep);  // a host cache with src's bytes
#ifdef TQKV_HAVE_CUDA
    if (dst->cuda()) return device_of(dst).upload(hs->impl, d);
#endif
    const size_t rows = size_t(a.num_seqs) * a.num_kv_heads * a.capacity;
    for (int w = 0; w < 2; ++w) {
      const auto& from = hs->impl.plane(w);
      auto& to = d.mutable_plane(w);
      std::memcpy(to.data.get(), from.data.get(), rows * from.stride);
      const size_t sb = tqkv::fmt::scale_bytes(from.type, from.scale_f16);
      if (sb) std::memcpy(to.scales.get(), from.scales.get(), rows * sb);
    }
    for (uint32_t q = 0; q < a.num_seqs; ++q) d.restore(q, hs->impl.length(q), hs->impl.k_center(q));
  });
}

tqkv_status tqkv_attend_seq(const tqkv_cache* cache, uint32_t seq, uint32_t n_q, const int64_t* q_pos,
                            const tqkv_attn_params* params, const float* q, float* out, float* lse) {
  return guarded([&] {
    const auto& c = cache_ref(cache);
#ifdef TQKV_HAVE_CUDA
    if (cache->cuda())
      tqkv::fail(TQKV_ERROR_UNSUPPORTED, "cache: tqkv_attend_seq (chunked prefill) is not available on CUDA caches yet; "
                                         "copy to a CPU cache with tqkv_cache_copy or use tqkv_attend per token");
#endif
    const auto plan = tqkv::core::plan_attention_seq(c, seq, n_q, q_pos, params, q, out);
    tqkv::cpu::attend(c, plan, q, out, lse);
  });
}

tqkv_status tqkv_attend_seq_reference(const tqkv_cache* cache, uint32_t seq, uint32_t n_q, const int64_t* q_pos,
                                      const tqkv_attn_params* params, const float* q, float* out, float* lse) {
  return guarded([&] {
    cache_ref(cache);
    std::unique_ptr<tqkv_cache> keep;
    const auto& c = readable(cache, keep)->impl;
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
  out->cuda_attend_calls = c.cuda_attend_calls.load();
  out->cuda_rows_encoded = c.cuda_rows_encoded.load();
}

void tqkv_counters_reset(void) {
  auto& c = tqkv::core::counters();
  c.compressed_rows_read = 0;
  c.block_rows_read = 0;
  c.dense_rows_read = 0;
  c.rows_encoded = 0;
  c.attend_calls = 0;
  c.cuda_attend_calls = 0;
  c.cuda_rows_encoded = 0;
}

}  // extern "C"
