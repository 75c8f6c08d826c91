// tqkv bench attention: the compressed cache against dense f32 and f16 caches, same shape,
// same process, same queries; median of repeats after warm-up.
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>

#include "cli.h"
#include "core/error.h"
#include "core/format.h"
#include "tqkv/tqkv.hpp"

namespace tqkv::cli {

uint32_t parse_type(const std::string& s, const char* flag) {
  if (s == "2" || s == "3" || s == "4" || s == "8" || s == "16" || s == "32") return uint32_t(std::stoul(s));
  if (s == "f16") return 16;
  if (s == "f32") return 32;
  invalid(std::string(flag) + ": '" + s + "' is not a cache type; allowed: 2, 3, 4, 8 (TurboQuant bits), f16, f32");
}

std::string type_name(uint32_t t) { return fmt::is_tq(t) ? "tq" + std::to_string(t) : "f" + std::to_string(t); }

namespace {

struct Timing {
  double median_us = 0, min_us = 0;
};

nlohmann::json bench_one(const BenchOptions& o, uint32_t kt, uint32_t vt, const std::vector<float>& q, uint64_t seed) {
  CacheConfig cfg;
  cfg.dims(o.dim, o.kv_heads).seqs(o.batch, o.context);
  cfg.k_type = static_cast<tqkv_type>(kt);
  cfg.v_type = static_cast<tqkv_type>(vt);
  Cache cache(cfg);
  // Fill in chunks so the input buffer stays small whatever the context.
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  const uint32_t chunk = 1024;
  std::vector<float> k(size_t(chunk) * o.kv_heads * o.dim), v(k.size());
  for (uint32_t s = 0; s < o.batch; ++s)
    for (uint32_t done = 0; done < o.context; done += chunk) {
      const uint32_t n = std::min(chunk, o.context - done);
      for (size_t i = 0; i < size_t(n) * o.kv_heads * o.dim; ++i) {
        k[i] = nd(rng);
        v[i] = nd(rng);
      }
      cache.append(s, std::span<const float>(k).first(size_t(n) * o.kv_heads * o.dim),
                   std::span<const float>(v).first(size_t(n) * o.kv_heads * o.dim));
    }
  AttnParams p(o.q_heads, 1.0f / std::sqrt(float(o.dim)));
  p.with_threads(o.threads);
  std::vector<float> out(size_t(o.batch) * o.q_heads * o.dim);
  for (uint32_t i = 0; i < o.warmup; ++i) cache.attend(p, q, out);
  const auto before = counters();
  std::vector<double> us;
  for (uint32_t i = 0; i < o.repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    cache.attend(p, q, out);
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  const auto after = counters();
  std::sort(us.begin(), us.end());
  const auto mem = cache.memory();
  const double bytes = double(mem.bytes_per_token) * o.context * o.batch;
  const double med = us[us.size() / 2];
  nlohmann::json r;
  r["cache"] = kt == vt ? type_name(kt) : "k" + type_name(kt) + "/v" + type_name(vt);
  r["k_type"] = type_name(kt);
  r["v_type"] = type_name(vt);
  r["us"] = med;
  r["us_min"] = us.front();
  r["GBps"] = bytes / (med * 1e-6) / 1e9;
  r["bytes"] = uint64_t(bytes);
  r["bytes_per_token"] = mem.bytes_per_token;
  // Trace: rows the fused kernels decoded from TQ storage during the timed calls.
  r["compressed_rows_read"] = after.compressed_rows_read - before.compressed_rows_read;
  r["dense_rows_read"] = after.dense_rows_read - before.dense_rows_read;
  return r;
}

}  // namespace

nlohmann::json bench_attention(const BenchOptions& o) {
  if (o.backend != "cpu") {
    if (o.backend == "cuda")
      fail(TQKV_ERROR_UNSUPPORTED, "--backend: cuda is not available in this version; allowed: cpu");
    invalid("--backend: '" + o.backend + "' is not a backend; allowed: cpu");
  }
  if (o.context == 0) invalid("--context: must be >= 1");
  if (o.batch == 0) invalid("--batch: must be >= 1");
  if (o.repeats == 0) invalid("--repeats: must be >= 1");
  if (o.kv_heads == 0 || o.q_heads % o.kv_heads != 0)
    invalid("--q-heads: " + std::to_string(o.q_heads) + " must be a positive multiple of --kv-heads (" +
            std::to_string(o.kv_heads) + ")");
  std::mt19937_64 rng(42);
  std::normal_distribution<float> nd;
  std::vector<float> q(size_t(o.batch) * o.q_heads * o.dim);
  for (auto& x : q) x = nd(rng);
  nlohmann::json result;
  result["shape"] = {{"dim", o.dim},         {"q_heads", o.q_heads}, {"kv_heads", o.kv_heads},
                     {"context", o.context}, {"batch", o.batch},     {"threads", o.threads},
                     {"backend", o.backend}, {"repeats", o.repeats}};
  std::vector<std::pair<uint32_t, uint32_t>> caches = {{o.kbits, o.vbits}, {32, 32}, {16, 16}};
  nlohmann::json rows = nlohmann::json::array();
  for (size_t i = 0; i < caches.size(); ++i) {
    if (i > 0 && caches[i] == caches[0]) continue;
    if (!o.quiet)
      ::fmt::print(stderr, "bench: {} ({}/{}) ...\n", type_name(caches[i].first) + "/" + type_name(caches[i].second),
                   i + 1, caches.size());
    rows.push_back(bench_one(o, caches[i].first, caches[i].second, q, 1234));
  }
  double f32_us = 0;
  for (const auto& r : rows)
    if (r["cache"] == "f32") f32_us = r["us"].get<double>();
  for (auto& r : rows) r["speedup_vs_f32"] = f32_us / r["us"].get<double>();
  result["rows"] = rows;
  return result;
}

void print_bench_table(const nlohmann::json& res) {
  const auto& s = res["shape"];
  ::fmt::print("attention, backend {}: D={} Hq={} Hkv={} S={} batch={} threads={} (median of {})\n",
               s["backend"].get<std::string>(), s["dim"].get<int>(), s["q_heads"].get<int>(), s["kv_heads"].get<int>(),
               s["context"].get<int>(), s["batch"].get<int>(),
               s["threads"].get<int>() ? std::to_string(s["threads"].get<int>()) : std::string("all"),
               s["repeats"].get<int>());
  ::fmt::print("{:>12} {:>10} {:>8} {:>12} {:>10} {:>14}\n", "cache", "us", "GB/s", "bytes", "vs f32", "tq rows read");
  for (const auto& r : res["rows"])
    ::fmt::print("{:>12} {:>10.1f} {:>8.2f} {:>12} {:>9.2f}x {:>14}\n", r["cache"].get<std::string>(),
                 r["us"].get<double>(), r["GBps"].get<double>(), r["bytes"].get<uint64_t>(),
                 r["speedup_vs_f32"].get<double>(), r["compressed_rows_read"].get<uint64_t>());
}

}  // namespace tqkv::cli
