/* Compiled as C11: proves tqkv.h is C-clean and the ABI works from C. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tqkv/tqkv.h"

static int failures = 0;
#define CHECK(cond)                                                  \
  do {                                                               \
    if (!(cond)) {                                                   \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                    \
    }                                                                \
  } while (0)

static float frand(unsigned* s) {
  *s = *s * 1664525u + 1013904223u;
  return (float)((*s >> 8) & 0xFFFF) / 32768.0f - 1.0f;
}

int main(void) {
  tqkv_cache_config cfg;
  tqkv_cache* cache = NULL;
  unsigned seed = 7;
  enum { D = 64, HKV = 2, HQ = 4, N = 40 };
  float k[N * HKV * D], v[N * HKV * D], q[HQ * D], out[HQ * D], ref[HQ * D], lse[HQ], lse_ref[HQ];
  int i;
  double err = 0, nrm = 0;
  tqkv_attn_params p;
  tqkv_memory_info mem;
  int64_t len = 0;

  CHECK(tqkv_version_number() == TQKV_VERSION_NUMBER);
  CHECK(strlen(tqkv_version_string()) > 0);
  CHECK(tqkv_cache_config_init(&cfg) == TQKV_OK);
  cfg.head_dim = 100;
  CHECK(tqkv_cache_create(&cfg, &cache) == TQKV_ERROR_INVALID_ARGUMENT);
  CHECK(cache == NULL);
  CHECK(strstr(tqkv_last_error(), "head_dim") != NULL);
  cfg.head_dim = D;
  cfg.num_kv_heads = HKV;
  cfg.capacity = 64;
  CHECK(tqkv_cache_create(&cfg, &cache) == TQKV_OK);
  CHECK(cache != NULL);
  for (i = 0; i < N * HKV * D; ++i) {
    k[i] = frand(&seed);
    v[i] = frand(&seed);
  }
  for (i = 0; i < HQ * D; ++i) q[i] = frand(&seed);
  CHECK(tqkv_cache_append(cache, 0, N, TQKV_DTYPE_F32, k, v) == TQKV_OK);
  CHECK(tqkv_cache_length(cache, 0, &len) == TQKV_OK && len == N);
  CHECK(tqkv_cache_append(NULL, 0, 1, TQKV_DTYPE_F32, k, v) == TQKV_ERROR_INVALID_ARGUMENT);
  CHECK(tqkv_cache_append(cache, 1, 1, TQKV_DTYPE_F32, k, v) == TQKV_ERROR_INVALID_ARGUMENT);
  CHECK(tqkv_cache_append(cache, 0, 30, TQKV_DTYPE_F32, k, v) == TQKV_ERROR_CAPACITY);
  CHECK(strstr(tqkv_last_error(), "capacity") != NULL);
  CHECK(tqkv_cache_length(cache, 0, &len) == TQKV_OK && len == N);
  /* On a CPU cache the asynchronous calls are the synchronous ones: errors at once. */
  CHECK(tqkv_cache_append_async(cache, 0, 30, TQKV_DTYPE_F32, k, v) == TQKV_ERROR_CAPACITY);
  CHECK(tqkv_cache_append_async(cache, 0, 1, TQKV_DTYPE_F32, k, v) == TQKV_OK);
  CHECK(tqkv_cache_sync(cache) == TQKV_OK);
  CHECK(tqkv_cache_sync(NULL) == TQKV_ERROR_INVALID_ARGUMENT);
  CHECK(tqkv_cache_length(cache, 0, &len) == TQKV_OK && len == N + 1);
  CHECK(tqkv_cache_reset(cache, 0) == TQKV_OK);
  CHECK(tqkv_cache_append(cache, 0, N, TQKV_DTYPE_F32, k, v) == TQKV_OK);

  memset(&p, 0, sizeof p);
  p.num_q_heads = HQ;
  p.scale = 0.125f;
  p.mask = TQKV_MASK_CAUSAL;
  CHECK(tqkv_attend(cache, &p, q, out, lse) == TQKV_OK);
  CHECK(tqkv_attend_reference(cache, &p, q, ref, lse_ref) == TQKV_OK);
  for (i = 0; i < HQ * D; ++i) {
    err += (double)(out[i] - ref[i]) * (out[i] - ref[i]);
    nrm += (double)ref[i] * ref[i];
  }
  CHECK(nrm > 0 && sqrt(err / nrm) < 2e-5);
  for (i = 0; i < HQ; ++i) CHECK(fabsf(lse[i] - lse_ref[i]) < 1e-4f);
  p.num_q_heads = 3;
  CHECK(tqkv_attend(cache, &p, q, out, NULL) == TQKV_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(tqkv_last_error(), "num_q_heads") != NULL);

  CHECK(tqkv_cache_memory(cache, &mem) == TQKV_OK);
  CHECK(mem.bytes_per_token == (uint64_t)HKV * 2 * (D / 2 + 4));
  CHECK(mem.total_bytes == mem.bytes_per_token * 64);
  tqkv_cache_destroy(cache);
  tqkv_cache_destroy(NULL);
  if (failures == 0) printf("c api: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
