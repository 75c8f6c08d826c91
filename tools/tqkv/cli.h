// Subcommands of the tqkv command line.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "tqkv/tqkv.h"

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
  uint32_t capacity = 0;  // rows allocated per sequence (0: the context); more leaves room the calls never read
  uint32_t kbits = 4, vbits = 4, threads = 0;
  uint32_t warmup = 3, repeats = 15;
  uint32_t graph_calls = 20;  // cuda: attend calls captured into one graph
  std::string fill = "append";  // cuda: "append" to the device cache, or "copy" from a host cache
  double read_bw_gbps = 0;    // the card's (or host's) measured read bandwidth; 0 = not known
  bool scale_f16 = false;     // TurboQuant row scales stored as f16 (2 bytes a row instead of 4)
  bool json = false, quiet = false;
  uint32_t rows_per_seq() const { return capacity ? capacity : context; }  // the caches' capacity
};
// Times the compressed cache and the dense caches (cpu: f32 and f16; cuda: f16) on one shape in
// one process.
nlohmann::json bench_attention(const BenchOptions& o);
void print_bench_table(const nlohmann::json& result);

struct AppendBenchOptions {
  std::string backend = "cpu", dtype = "bf16";
  uint32_t dim = 128, kv_heads = 8, tokens = 4096, batch = 1;
  uint32_t kbits = 4, vbits = 4;
  uint32_t warmup = 3, repeats = 15;
  double read_bw_gbps = 0;
  bool scale_f16 = false;  // TurboQuant row scales stored as f16
  bool json = false;
  bool async = false;  // cuda: tqkv_cache_append_batch_async, back to back
  bool graph = false;  // cuda: one asynchronous append captured in a CUDA graph, replayed
};
// Times one prefill-sized tqkv_cache_append_batch (cpu: host input; cuda: device input).
nlohmann::json bench_append(const AppendBenchOptions& o);
void print_append_table(const nlohmann::json& result);
// Shared by both backends' append benchmarks.
tqkv_dtype parse_dtype(const std::string& s);
std::vector<uint8_t> random_input(size_t n, tqkv_dtype dtype, uint64_t seed);  // normal values in dtype
nlohmann::json append_row(const AppendBenchOptions& o, uint64_t bytes_per_token, std::vector<double> us);

#ifdef TQKV_CLI_CUDA
// bench_cuda.cpp, built only with the CUDA backend. Options are validated by the callers.
nlohmann::json bench_attention_cuda(const BenchOptions& o, const std::vector<std::pair<uint32_t, uint32_t>>& caches);
nlohmann::json bench_append_cuda(const AppendBenchOptions& o);
#endif

// --scale-f16 of the bench commands: the caches' scale type, and its name in their JSON.
inline tqkv_scale_dtype scale_dtype(bool f16) { return f16 ? TQKV_SCALE_F16 : TQKV_SCALE_F32; }
inline const char* scale_name(bool f16) { return f16 ? "f16" : "f32"; }

// Parses a cache type given as bits (2, 3, 4, 8) or as 16 / 32 / f16 / f32.
uint32_t parse_type(const std::string& s, const char* flag);
std::string type_name(uint32_t type);

}  // namespace tqkv::cli
