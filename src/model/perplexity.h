// llama.cpp-style chunked perplexity, with the f32-cache reference run in lockstep so that every
// cache type also gets KL divergence and top-1 agreement against it on the same tokens.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/model.h"

namespace tqkv::model {

struct CacheSetup {
  std::string label;
  std::vector<LayerCache> layers;
};

struct PerplexityOptions {
  uint32_t ctx = 512;     // tokens per chunk; the second half of each chunk is scored
  uint32_t chunks = 0;    // 0: as many as the text holds
  uint32_t batch = 256;   // tokens per forward call (prefill chunk)
  uint32_t threads = 0;
  std::function<void(double fraction)> progress;
};

struct PerplexityRow {
  std::string label;
  double ppl = 0, ppl_err = 0;           // exp(mean NLL) and its standard error
  double kl_mean = 0, kl_p99 = 0, kl_max = 0;  // KL(f32 reference || this), nats per token
  double top1 = 0;                       // fraction of tokens whose argmax equals the reference's
  uint64_t kv_bytes_per_token = 0;       // all layers, K + V + scales
  double tokens_per_s = 0;               // forward throughput of this configuration
  uint64_t scored = 0;
  uint64_t tq_rows = 0, block_rows = 0, dense_rows = 0;  // trace: rows read by fused attention
};

// The reference (f32 K and V on every layer) is always run and is the first row.
std::vector<PerplexityRow> run_perplexity(std::shared_ptr<const Model> model, const std::vector<int32_t>& tokens,
                                          const std::vector<CacheSetup>& setups, const PerplexityOptions& opt);

}  // namespace tqkv::model
