// Commands that run real models (src/model).
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/model.h"
#include "model/perplexity.h"

namespace tqkv::cli {

// "smollm2" / "gemma3" resolve to the user cache (fetched when missing); anything else is a path.
std::string resolve_model(const std::string& name);
// Items are T or K/V cache type names; options apply to every layer of every item.
struct CacheOptions {
  std::string policy;
  bool center = true, scale_f16 = false;
};
std::vector<model::CacheSetup> parse_compare(const std::string& list, const CacheOptions& o, uint32_t n_layers);

struct PerplexityCmd {
  std::string model = "smollm2", file = "/usr/share/common-licenses/GPL-3";
  uint32_t ctx = 512, chunks = 0, batch = 256, threads = 0;
  std::string cache_k = "tq4", cache_v = "tq4", compare;
  CacheOptions cache;
  bool json = false, quiet = false;
};
nlohmann::json perplexity(const PerplexityCmd& o);
void print_perplexity(const nlohmann::json& r);

struct GenerateCmd {
  std::string model = "smollm2", prompt, cache_k = "tq4", cache_v = "tq4";
  CacheOptions cache;
  uint32_t n_tokens = 64, threads = 0;
  float temperature = 0;
  uint64_t seed = 1;
  bool chat = false;
};
void generate(const GenerateCmd& o);

// Writes the logits of every position of the prompt (f32 cache unless told otherwise) to a raw
// little-endian f32 file [n_tokens][vocab] and prints {"tokens": [...], "vocab": V} as JSON.
struct DumpLogitsCmd {
  std::string model = "smollm2", prompt, out, cache_k = "f32", cache_v = "f32";
  uint32_t threads = 0;
};
void dump_logits(const DumpLogitsCmd& o);

struct DemoCmd {
  std::string model = "smollm2";
  uint32_t ctx = 512, chunks = 3, threads = 0;
};
int demo(const DemoCmd& o);

}  // namespace tqkv::cli
