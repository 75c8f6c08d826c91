// Subcommands of the tqkv command line.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace tqkv::cli {

struct CodecStatsOptions {
  uint32_t dim = 128, bits = 4;
  uint64_t samples = 20000;
  std::string codebook = "exact", scale = "lsq";
  uint64_t seed = 1;
  bool json = false;
};
nlohmann::json codec_stats(const CodecStatsOptions& o);
void print_codec_table(const std::vector<nlohmann::json>& rows);

struct BenchOptions {
  std::string backend = "cpu";
  uint32_t dim = 128, q_heads = 32, kv_heads = 8, context = 16384, batch = 1;
  uint32_t kbits = 4, vbits = 4, threads = 0;
  uint32_t warmup = 3, repeats = 15;
  bool json = false, quiet = false;
};
// Times the compressed cache and the dense f32 and f16 caches on one shape in one process.
nlohmann::json bench_attention(const BenchOptions& o);
void print_bench_table(const nlohmann::json& result);

// Parses a cache type given as bits (2, 3, 4, 8) or as 16 / 32 / f16 / f32.
uint32_t parse_type(const std::string& s, const char* flag);
std::string type_name(uint32_t type);

}  // namespace tqkv::cli
