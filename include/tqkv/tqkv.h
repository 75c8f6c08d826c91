/* tqkv: a TurboQuant-compressed KV cache with fused attention over the compressed bytes.
 *
 * C ABI. Every function returns a tqkv_status; on failure a message naming the bad parameter
 * and the allowed values is available from tqkv_last_error() on the calling thread. No function
 * aborts on user input, and a failed call leaves the cache exactly as it was (an asynchronous
 * append's bad values are reported by a later call; see tqkv_cache_append_async).
 *
 * Thread safety: distinct caches may be used from distinct threads at once. One cache may be
 * read by tqkv_attend from several threads at once, but must not be appended to, synced, reset
 * or destroyed while another call uses it.
 */
#ifndef TQKV_TQKV_H
#define TQKV_TQKV_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && defined(TQKV_SHARED_BUILD)
#define TQKV_API __declspec(dllexport)
#elif defined(__GNUC__)
#define TQKV_API __attribute__((visibility("default")))
#else
#define TQKV_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define TQKV_VERSION_MAJOR 0
#define TQKV_VERSION_MINOR 1
#define TQKV_VERSION_PATCH 0
#define TQKV_VERSION_NUMBER (TQKV_VERSION_MAJOR * 10000 + TQKV_VERSION_MINOR * 100 + TQKV_VERSION_PATCH)

/* Default seed of the rotation's sign vector ("tqkv" in ASCII). docs/format.md gives the generator. */
#define TQKV_DEFAULT_SEED 0x74716B76ull

/* Values are pinned: they never change meaning between versions. Every enum has a *_MAX_ENUM
 * member so that it is 32 bits wide and any value a C caller passes is representable (and rejected
 * with a clear error if invalid). */
typedef enum tqkv_status {
  TQKV_OK = 0,
  TQKV_ERROR_INVALID_ARGUMENT = 1, /* a parameter is outside its allowed values */
  TQKV_ERROR_UNSUPPORTED = 2,      /* valid in principle, not supported by this build/backend */
  TQKV_ERROR_CAPACITY = 3,         /* an append would pass the cache's capacity */
  TQKV_ERROR_NON_FINITE = 4,       /* NaN or Inf in input data, or a value the storage type cannot hold */
  TQKV_ERROR_OUT_OF_MEMORY = 5,
  TQKV_ERROR_BACKEND = 6,          /* the backend failed (for example a CUDA error) */
  TQKV_ERROR_INTERNAL = 7,
  TQKV_ERROR_IO = 8,               /* a file is missing, unreadable, truncated or corrupt */
  TQKV_STATUS_MAX_ENUM = 0x7FFFFFFF
} tqkv_status;

/* Storage type of one of K or V. The TQ types are TurboQuant codes of that many bits. Q8_0 and
 * Q4_0 are llama.cpp's block formats (32 values, one f16 scale), stored as-is (the baselines a
 * quantized llama.cpp cache uses); the _HAD variants rotate each vector with the same
 * randomized Hadamard transform as TQ first (llama.cpp's rotation of quantized caches). */
typedef enum tqkv_type {
  TQKV_TYPE_TQ2 = 2,
  TQKV_TYPE_TQ3 = 3,
  TQKV_TYPE_TQ4 = 4,
  TQKV_TYPE_TQ8 = 8,
  TQKV_TYPE_F16 = 16,
  TQKV_TYPE_F32 = 32,
  TQKV_TYPE_Q4_0 = 40,
  TQKV_TYPE_Q8_0 = 80,
  TQKV_TYPE_Q4_0_HAD = 41,
  TQKV_TYPE_Q8_0_HAD = 81,
  TQKV_TYPE_MAX_ENUM = 0x7FFFFFFF
} tqkv_type;

/* Element type of input data (appended K/V). Queries and outputs are always f32. */
typedef enum tqkv_dtype {
  TQKV_DTYPE_F32 = 0,
  TQKV_DTYPE_F16 = 1,
  TQKV_DTYPE_BF16 = 2,
  TQKV_DTYPE_MAX_ENUM = 0x7FFFFFFF
} tqkv_dtype;

typedef enum tqkv_layout {
  TQKV_LAYOUT_LINEAR = 0, /* position p lives in slot p; appending past capacity is an error */
  TQKV_LAYOUT_RING = 1,   /* position p lives in slot p mod capacity (sliding-window layers) */
  TQKV_LAYOUT_MAX_ENUM = 0x7FFFFFFF
} tqkv_layout;

/* Which Lloyd-Max codebook quantizes the rotated coordinates. */
typedef enum tqkv_codebook {
  TQKV_CODEBOOK_EXACT = 0,   /* optimal for the exact coordinate law at this head_dim (default) */
  TQKV_CODEBOOK_GAUSSIAN = 1, /* optimal for N(0,1), the large-d limit */
  TQKV_CODEBOOK_MAX_ENUM = 0x7FFFFFFF
} tqkv_codebook;

/* How the one per-vector scale is chosen. Decoding is the same for both. */
typedef enum tqkv_scale_mode {
  TQKV_SCALE_NORM = 0, /* the vector's L2 norm */
  TQKV_SCALE_LSQ = 1,  /* least squares: minimises this vector's reconstruction error */
  TQKV_SCALE_MODE_MAX_ENUM = 0x7FFFFFFF
} tqkv_scale_mode;

typedef enum tqkv_scale_dtype {
  TQKV_SCALE_F32 = 0,
  TQKV_SCALE_F16 = 1,
  TQKV_SCALE_DTYPE_MAX_ENUM = 0x7FFFFFFF
} tqkv_scale_dtype;

/* Key centering: K rows are stored as k - mu with one mean vector mu per (sequence, KV head), and
 * attention adds scale * (q . mu) back to every logit, so results are exact while the codec only
 * spends its bits on what differs between keys (real keys share a large common component).
 * Applies to quantized K types (TQ, q8_0, q4_0); dense K is stored as is. */
typedef enum tqkv_center {
  TQKV_CENTER_NONE = 0,         /* store keys as they are (default) */
  TQKV_CENTER_FIRST_APPEND = 1, /* mu = mean of the keys of the first append to an empty sequence */
  TQKV_CENTER_MAX_ENUM = 0x7FFFFFFF
} tqkv_center;

typedef enum tqkv_backend {
  TQKV_BACKEND_CPU = 0,
  TQKV_BACKEND_CUDA = 1,
  TQKV_BACKEND_MAX_ENUM = 0x7FFFFFFF
} tqkv_backend;

typedef enum tqkv_mask {
  TQKV_MASK_NONE = 0,   /* every stored position */
  TQKV_MASK_CAUSAL = 1, /* positions <= the query position */
  TQKV_MASK_WINDOW = 2, /* positions in (q_pos - window, q_pos] */
  TQKV_MASK_MAX_ENUM = 0x7FFFFFFF
} tqkv_mask;

typedef struct tqkv_cache_config {
  uint32_t head_dim;     /* 64, 128, 256 or 512 */
  uint32_t num_kv_heads; /* >= 1 */
  uint32_t num_seqs;     /* sequences in the batch, >= 1 */
  uint32_t capacity;     /* slots per sequence and KV head, >= 1 */
  tqkv_type k_type;
  tqkv_type v_type;
  tqkv_layout layout;
  tqkv_codebook codebook;
  tqkv_scale_mode scale_mode;
  tqkv_scale_dtype scale_dtype;
  tqkv_backend backend;
  uint64_t seed; /* rotation sign seed */
  tqkv_center k_center;
} tqkv_cache_config;

typedef struct tqkv_attn_params {
  uint32_t num_q_heads;    /* a multiple of num_kv_heads */
  float scale;             /* logit scale, finite and non-zero (usually 1/sqrt(head_dim)) */
  float softcap;           /* 0 = off; else > 0 and finite: s -> softcap * tanh(s / softcap) */
  tqkv_mask mask;
  uint32_t window;         /* TQKV_MASK_WINDOW only: >= 1 */
  const int64_t* q_pos;    /* [num_seqs] query positions, or NULL = each sequence's last position */
  const float* sinks;      /* [num_q_heads] sink logits joining each softmax denominator, or NULL */
  uint32_t num_threads;    /* CPU: 0 = all available */
  /* CUDA: device scratch for the split-K partials, at least tqkv_attend_workspace_size bytes and
   * 16-byte aligned, or NULL to use one the cache owns (grown on first use; it cannot grow during
   * graph capture). */
  void* workspace;
  size_t workspace_bytes;
} tqkv_attn_params;

typedef struct tqkv_memory_info {
  uint64_t k_bytes_per_token; /* K bytes per token per layer, all KV heads, scales included */
  uint64_t v_bytes_per_token;
  uint64_t bytes_per_token;   /* k + v */
  uint64_t total_bytes;       /* bytes of K, V and scales held for all slots of all sequences */
} tqkv_memory_info;

typedef struct tqkv_cache tqkv_cache; /* opaque: one layer's K and V cache */

/* ---- library ---- */
TQKV_API uint32_t tqkv_version_number(void);
TQKV_API const char* tqkv_version_string(void);
TQKV_API const char* tqkv_status_string(tqkv_status status);
/* Message of the last failed call on this thread ("" if none). Valid until the next call. */
TQKV_API const char* tqkv_last_error(void);
/* Whether a backend is compiled in and has a usable device. */
TQKV_API int tqkv_backend_available(tqkv_backend backend);

/* ---- cache ---- */
/* Fills *config with defaults: head_dim 128, 1 KV head, 1 sequence, capacity 4096, K4/V4, linear,
 * exact codebook, LSQ or norm scale as docs/format.md says, f32 scales, CPU, default seed. */
TQKV_API tqkv_status tqkv_cache_config_init(tqkv_cache_config* config);
TQKV_API tqkv_status tqkv_cache_create(const tqkv_cache_config* config, tqkv_cache** out);
TQKV_API void tqkv_cache_destroy(tqkv_cache* cache); /* NULL is a no-op */
TQKV_API tqkv_status tqkv_cache_get_config(const tqkv_cache* cache, tqkv_cache_config* out);

/* Appends n_tokens tokens to sequence seq. k and v are [n_tokens][num_kv_heads][head_dim] of
 * dtype, contiguous. All of the input is checked (finite, representable) before the append lands;
 * on any error the cache is unchanged: every stored position, length and key mean. (A CUDA
 * append writes rows in place when no stored position is overwritten, so a failed one may leave
 * bytes in slots past a sequence's length, which hold no position.) */
TQKV_API tqkv_status tqkv_cache_append(tqkv_cache* cache, uint32_t seq, uint32_t n_tokens,
                                       tqkv_dtype dtype, const void* k, const void* v);
/* Appends counts[s] tokens to every sequence s at once. k and v hold the tokens of sequence 0,
 * then sequence 1, ..., each [counts[s]][num_kv_heads][head_dim]. All-or-nothing. */
TQKV_API tqkv_status tqkv_cache_append_batch(tqkv_cache* cache, const uint32_t* counts,
                                             tqkv_dtype dtype, const void* k, const void* v);
/* Asynchronous appends, for CUDA caches in a decode loop: the same as tqkv_cache_append and
 * tqkv_cache_append_batch, but they do not wait for the cache's stream. k and v must be device
 * memory that stays valid until the stream has run the append. The arguments are checked at
 * once (capacity included); the values are checked on the device as ever, and a failed append
 * still changes nothing on the device, but its error comes later: from tqkv_cache_sync, or from
 * the next call that waits for the stream (tqkv_cache_append/_batch, reset, set_k_center, copy
 * into the cache), which then does nothing else. Until then lengths count the appends, and every
 * append after a failed one is skipped on the device; reporting the error takes them all back,
 * so lengths and key means are those from before the failed append. Rows land at the lengths
 * the device holds when the append runs (and a linear cache's capacity is checked there too).
 * CUDA graphs: an asynchronous append may be captured (a decode step: append, then attend), if
 * the cache has at most 64 sequences and does not use k_center FIRST_APPEND; captured appends
 * encode against the key means stored when they replay, or, when no key mean was set at capture,
 * without one (tqkv_cache_set_k_center is then refused on that cache). Each replay lands after
 * the previous one. Replays are
 * counted on the host (tqkv_cache_length) at the next tqkv_cache_sync, which also reports a
 * replay that failed (TQKV_ERROR_CAPACITY when a linear cache is full). Make one asynchronous
 * append of the captured shape before capturing (staging it may need is allocated then). A
 * synchronous append cannot be captured. On a CPU cache these are the synchronous calls. */
TQKV_API tqkv_status tqkv_cache_append_async(tqkv_cache* cache, uint32_t seq, uint32_t n_tokens,
                                             tqkv_dtype dtype, const void* k, const void* v);
TQKV_API tqkv_status tqkv_cache_append_batch_async(tqkv_cache* cache, const uint32_t* counts,
                                                   tqkv_dtype dtype, const void* k, const void* v);
/* Waits for the cache's stream and reports the first failed asynchronous append since the last
 * sync (see above); TQKV_OK when there was none. A no-op on CPU caches. */
TQKV_API tqkv_status tqkv_cache_sync(tqkv_cache* cache);
/* Number of positions appended to seq since creation or reset (may exceed capacity in ring mode). */
TQKV_API tqkv_status tqkv_cache_length(const tqkv_cache* cache, uint32_t seq, int64_t* out);
/* Empties seq (its key mean too, if any). */
TQKV_API tqkv_status tqkv_cache_reset(tqkv_cache* cache, uint32_t seq);
/* Sets the key mean of an empty sequence explicitly (for example from calibration): mu is
 * [num_kv_heads][head_dim]. Works whatever k_center says; has no effect on dense K. */
TQKV_API tqkv_status tqkv_cache_set_k_center(tqkv_cache* cache, uint32_t seq, const float* mu);
TQKV_API tqkv_status tqkv_cache_memory(const tqkv_cache* cache, tqkv_memory_info* out);
/* Memory figures for a configuration without creating it. */
TQKV_API tqkv_status tqkv_config_memory(const tqkv_cache_config* config, tqkv_memory_info* out);

/* Reads stored rows back, decoded to f32 in the original (unrotated) domain.
 * out is [n][num_kv_heads][head_dim] for positions first..first+n-1 of seq; which = 0 for K, 1 for V.
 * Every position must still be resident. */
TQKV_API tqkv_status tqkv_cache_read(const tqkv_cache* cache, uint32_t seq, int which,
                                     int64_t first, uint32_t n, float* out);

/* ---- attention ---- */
/* Decode attention: one query token per sequence.
 * q:   [num_seqs][num_q_heads][head_dim] f32.
 * out: [num_seqs][num_q_heads][head_dim] f32.
 * lse: [num_seqs][num_q_heads] natural-log log-sum-exp of the (scaled, softcapped) logits, sink
 *      included, or NULL. A sequence with no visible position gets out = 0 and lse = -inf
 *      (or the sink logit when sinks are given). */
TQKV_API tqkv_status tqkv_attend(const tqkv_cache* cache, const tqkv_attn_params* params,
                                 const float* q, float* out, float* lse);
/* The same attention computed by the float64 reference on the decoded cache (slow; for checks). */
TQKV_API tqkv_status tqkv_attend_reference(const tqkv_cache* cache, const tqkv_attn_params* params,
                                           const float* q, float* out, float* lse);

/* Attention for n_q query tokens of one sequence, for chunked prefill: append a chunk of tokens,
 * then let each of them attend over the cache as decode would. Query i sits at position q_pos[i]
 * (non-decreasing, each < the sequence's length); with TQKV_MASK_CAUSAL it sees positions
 * <= q_pos[i], with TQKV_MASK_WINDOW positions in (q_pos[i] - window, q_pos[i]].
 * q, out: [n_q][num_q_heads][head_dim]; lse: [n_q][num_q_heads] or NULL. params->q_pos must be NULL.
 * On a ring cache, appending a chunk of n tokens overwrites the oldest slots, so chunked prefill
 * over a sliding window needs capacity >= window + n - 1 (an error says so otherwise). */
TQKV_API tqkv_status tqkv_attend_seq(const tqkv_cache* cache, uint32_t seq, uint32_t n_q, const int64_t* q_pos,
                                     const tqkv_attn_params* params, const float* q, float* out, float* lse);
TQKV_API tqkv_status tqkv_attend_seq_reference(const tqkv_cache* cache, uint32_t seq, uint32_t n_q,
                                               const int64_t* q_pos, const tqkv_attn_params* params,
                                               const float* q, float* out, float* lse);

/* ---- CUDA backend ----
 * A cache created with backend TQKV_BACKEND_CUDA keeps its rows in device memory (cudaMalloc on
 * the device current at creation), in the same format as a CPU cache. On such a cache:
 * - append / append_batch take k and v in device or host memory (the pointer's kind is looked
 *   up); every value is checked on the device, then the call waits for its stream once, so an
 *   error leaves the cache unchanged; the _async variants do not wait (see them);
 * - tqkv_attend takes q, out and lse in device memory and runs on the cache's stream without
 *   waiting for it, allocating nothing after the first call, so it can be captured in a CUDA
 *   graph. Each sequence's length is read from device memory when the kernel runs, so a replayed
 *   graph sees the appends made since capture. params->q_pos and params->sinks may point to
 *   host memory (copied at call time; not allowed during capture) or device memory. q is not
 *   scanned for non-finite values (that would need a synchronisation);
 * - tqkv_attend_seq is not available (TQKV_ERROR_UNSUPPORTED); tqkv_cache_read,
 *   tqkv_attend_reference and tqkv_attend_seq_reference copy the cache to the host and work on
 *   host pointers (refused during graph capture: they wait for the stream);
 * - every call works on the cache's device whatever device is current on the calling thread,
 *   which it leaves as it was; device pointers of another GPU are refused (managed memory is
 *   accepted). At most 65535 sequences per CUDA cache;
 * - tqkv_attend multiplies V in f16 hi + lo parts: a V row whose root-mean-square coordinate
 *   exceeds 65504 (possible with f32 scales only) makes the outputs that weigh it NaN;
 * - a device q_pos out of range (or a ring that wrapped past what a captured call's mask needs)
 *   gives NaN outputs for that sequence, and nothing is read for it;
 * - several threads may call tqkv_attend on one cache at once: calls that share the cache's own
 *   workspace are queued one after another. A graph captured with that workspace stays valid
 *   when a later call needs a larger one (the old one is kept until the cache is destroyed). */
/* Sets the cudaStream_t (passed as void*) that the cache's work runs on; NULL = default stream. */
TQKV_API tqkv_status tqkv_cache_set_stream(tqkv_cache* cache, void* stream);
/* Bytes of device workspace tqkv_attend needs on this cache with these params, for any length
 * the cache can reach (so one allocation serves every later call). 0 for CPU caches. */
TQKV_API tqkv_status tqkv_attend_workspace_size(const tqkv_cache* cache, const tqkv_attn_params* params,
                                                size_t* bytes);
/* Copies every stored byte, length and key mean of src into dst, which must have the same
 * configuration except the backend (host <-> device copies, or same-backend clones). */
TQKV_API tqkv_status tqkv_cache_copy(const tqkv_cache* src, tqkv_cache* dst);

/* ---- counters (trace that the compressed path really ran) ---- */
typedef struct tqkv_counters {
  uint64_t compressed_rows_read; /* TurboQuant K and V rows decoded inside fused attention (CUDA with
                                    device q_pos: the rows the last position sees, an upper bound) */
  uint64_t block_rows_read;      /* q8_0 / q4_0 rows decoded inside fused attention */
  uint64_t dense_rows_read;      /* f16 / f32 rows read by fused attention */
  uint64_t rows_encoded;         /* rows quantized on append */
  uint64_t attend_calls;
  uint64_t cuda_attend_calls;    /* of attend_calls, those run by CUDA kernels */
  uint64_t cuda_rows_encoded;    /* of rows_encoded, those encoded by CUDA kernels */
} tqkv_counters;
TQKV_API void tqkv_counters_get(tqkv_counters* out);
TQKV_API void tqkv_counters_reset(void);

#ifdef __cplusplus
}
#endif
#endif /* TQKV_TQKV_H */
