// tqkv bench attention: the compressed cache against dense caches (cpu: f32 and f16; cuda: f16),
// same shape, same process, same queries; median of repeats after warm-up. The CUDA timing is in
// bench_cuda.cpp, built only with the CUDA backend. tqkv bench append: prefill-sized appends.
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>

#include "cli.h"
#include "core/error.h"
#include "core/format.h"
#include "core/half.h"
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
  cfg.dims(o.dim, o.kv_heads).seqs(o.batch, o.rows_per_seq());
  cfg.k_type = static_cast<tqkv_type>(kt);
  cfg.v_type = static_cast<tqkv_type>(vt);
  cfg.scale_dtype = scale_dtype(o.scale_f16);
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

namespace {

void check_backend(const std::string& backend) {
  if (backend == "cpu") return;
  if (backend != "cuda") invalid("--backend: '" + backend + "' is not a backend; allowed: cpu, cuda");
#ifdef TQKV_CLI_CUDA
  if (!tqkv_backend_available(TQKV_BACKEND_CUDA))
    fail(TQKV_ERROR_UNSUPPORTED, "--backend: cuda is compiled in but no usable CUDA device was found");
#else
  fail(TQKV_ERROR_UNSUPPORTED,
       "--backend: this tqkv binary was built without the CUDA backend (configure with -DTQKV_CUDA=ON where nvcc "
       "is installed); allowed here: cpu");
#endif
}

// The CUDA backend stores TQ2/3/4/8 and f16 only.
void check_cuda_type(const std::string& backend, uint32_t t, const char* flag) {
  if (backend == "cuda" && !(fmt::is_tq(t) || t == 16))
    invalid(std::string(flag) + ": " + type_name(t) + " is not stored by the CUDA backend; allowed there: 2, 3, 4, 8, f16");
}

}  // namespace

nlohmann::json bench_attention(const BenchOptions& o) {
  check_backend(o.backend);
  check_cuda_type(o.backend, o.kbits, "--kbits");
  check_cuda_type(o.backend, o.vbits, "--vbits");
  if (o.context == 0) invalid("--context: must be >= 1");
  if (o.batch == 0) invalid("--batch: must be >= 1");
  if (o.capacity != 0 && o.capacity < o.context)
    invalid("--capacity: " + std::to_string(o.capacity) + " is less than --context (" + std::to_string(o.context) +
            "); allowed: 0 (the context) or >= --context");
  if (o.repeats == 0) invalid("--repeats: must be >= 1");
  if (o.graph_calls == 0) invalid("--graph-calls: must be >= 1");
  if (o.fill != "append" && o.fill != "copy") invalid("--fill: '" + o.fill + "' is not a fill mode; allowed: append, copy");
  if (!(o.read_bw_gbps >= 0)) invalid("--read-bw-gbps: must be >= 0 (0 = unknown)");
  if (o.kv_heads == 0 || o.q_heads % o.kv_heads != 0)
    invalid("--q-heads: " + std::to_string(o.q_heads) + " must be a positive multiple of --kv-heads (" +
            std::to_string(o.kv_heads) + ")");
  const bool cuda = o.backend == "cuda";
  // f32 is the CPU's dense reference; the CUDA backend has no f32 storage, so f16 is its baseline.
  std::vector<std::pair<uint32_t, uint32_t>> caches = {{o.kbits, o.vbits}};
  if (!cuda) caches.emplace_back(32, 32);
  caches.emplace_back(16, 16);
  if (caches.back() == caches.front()) caches.pop_back();
  if (!cuda && caches[1] == caches[0]) caches.erase(caches.begin() + 1);
  nlohmann::json result;
  nlohmann::json rows = nlohmann::json::array();
  if (cuda) {
#ifdef TQKV_CLI_CUDA
    result = bench_attention_cuda(o, caches);
    rows = result["rows"];
#endif
  } else {
    std::mt19937_64 rng(42);
    std::normal_distribution<float> nd;
    std::vector<float> q(size_t(o.batch) * o.q_heads * o.dim);
    for (auto& x : q) x = nd(rng);
    result["shape"] = {{"dim", o.dim},         {"q_heads", o.q_heads}, {"kv_heads", o.kv_heads},
                       {"context", o.context}, {"batch", o.batch},     {"threads", o.threads},
                       {"backend", o.backend}, {"repeats", o.repeats}, {"scale_dtype", scale_name(o.scale_f16)},
                       {"capacity", o.rows_per_seq()}};
    for (size_t i = 0; i < caches.size(); ++i) {
      if (!o.quiet)
        ::fmt::print(stderr, "bench: {} ({}/{}) ...\n", type_name(caches[i].first) + "/" + type_name(caches[i].second),
                     i + 1, caches.size());
      rows.push_back(bench_one(o, caches[i].first, caches[i].second, q, 1234));
    }
  }
  if (o.read_bw_gbps > 0) {
    result["shape"]["read_bw_gbps"] = o.read_bw_gbps;
    for (auto& r : rows) r["frac_of_read_bw"] = r["GBps"].get<double>() / o.read_bw_gbps;
  }
  double f32_us = 0, f16_us = 0, f16_cold_us = 0;
  for (const auto& r : rows) {
    if (r["cache"] == "f32") f32_us = r["us"].get<double>();
    if (r["cache"] == "f16") {
      f16_us = r["us"].get<double>();
      if (cuda) f16_cold_us = r["us_cold"].get<double>();
    }
  }
  for (auto& r : rows) {
    if (!cuda) r["speedup_vs_f32"] = f32_us / r["us"].get<double>();
    r["speedup_vs_f16"] = f16_us / r["us"].get<double>();
    // The same for the L2-cold timing, where the f16 cache pays its full size in DRAM reads.
    if (cuda) r["speedup_vs_f16_cold"] = f16_cold_us / r["us_cold"].get<double>();
  }
  result["rows"] = rows;
  return result;
}

void print_bench_table(const nlohmann::json& res) {
  const auto& s = res["shape"];
  const bool cuda = s["backend"] == "cuda";
  ::fmt::print("attention, backend {}: D={} Hq={} Hkv={} S={} batch={} TQ scales {} {} (median of {})\n",
               s["backend"].get<std::string>(), s["dim"].get<int>(), s["q_heads"].get<int>(), s["kv_heads"].get<int>(),
               s["context"].get<int>(), s["batch"].get<int>(), s.value("scale_dtype", "f32"),
               cuda ? "device " + s["device"].get<std::string>()
                    : "threads=" + (s["threads"].get<int>() ? std::to_string(s["threads"].get<int>()) : std::string("all")),
               s["repeats"].get<int>());
  const bool bw = s.contains("read_bw_gbps");
  if (cuda) {
    ::fmt::print("{:>12} {:>9} {:>9} {:>8} {:>8} {:>6} {:>12} {:>8} {:>8} {:>14}\n", "cache", "us graph", "us cold",
                 "GB/s", "GB/s cold", "of bw", "bytes", "vs f16", "cold", "tq rows read");
    for (const auto& r : res["rows"])
      ::fmt::print("{:>12} {:>9.2f} {:>9.2f} {:>8.1f} {:>8.1f} {:>6} {:>12} {:>7.2f}x {:>7.2f}x {:>14}\n",
                   r["cache"].get<std::string>(), r["us_graph"].get<double>(), r["us_cold"].get<double>(),
                   r["GBps"].get<double>(), r["GBps_cold"].get<double>(),
                   bw ? ::fmt::format("{:.2f}", r["frac_of_read_bw_cold"].get<double>()) : std::string("-"),
                   r["bytes"].get<uint64_t>(), r["speedup_vs_f16"].get<double>(),
                   r["speedup_vs_f16_cold"].get<double>(), r["compressed_rows_read"].get<uint64_t>());
    if (bw) ::fmt::print("(of bw: cold GB/s over the given read bandwidth, {:.0f} GB/s)\n", s["read_bw_gbps"].get<double>());
    // The fastest pure read of each cache's bytes, timed the same ways (read_floor.h).
    for (const auto& r : res["rows"]) {
      if (!r.contains("read_floor")) continue;
      const auto& f = r["read_floor"];
      ::fmt::print("{:>12} read floor {:.2f} us graph, {:.2f} us cold: the attention takes {:.2f}x / {:.2f}x a pure read\n",
                   r["cache"].get<std::string>(), f["us_graph"].get<double>(), f["us_cold"].get<double>(),
                   r["us_graph_over_floor"].get<double>(), r["us_cold_over_floor"].get<double>());
    }
    return;
  }
  ::fmt::print("{:>12} {:>10} {:>8} {:>12} {:>10} {:>14}\n", "cache", "us", "GB/s", "bytes", "vs f32", "tq rows read");
  for (const auto& r : res["rows"])
    ::fmt::print("{:>12} {:>10.1f} {:>8.2f} {:>12} {:>9.2f}x {:>14}\n", r["cache"].get<std::string>(),
                 r["us"].get<double>(), r["GBps"].get<double>(), r["bytes"].get<uint64_t>(),
                 r["speedup_vs_f32"].get<double>(), r["compressed_rows_read"].get<uint64_t>());
}

// ---- append ----

tqkv_dtype parse_dtype(const std::string& s) {
  if (s == "f32") return TQKV_DTYPE_F32;
  if (s == "f16") return TQKV_DTYPE_F16;
  if (s == "bf16") return TQKV_DTYPE_BF16;
  invalid("--dtype: '" + s + "' is not an input type; allowed: f32, f16, bf16");
}

// Host input of the append benchmark in the chosen dtype, random normal values.
std::vector<uint8_t> random_input(size_t n, tqkv_dtype dt, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  const size_t es = dt == TQKV_DTYPE_F32 ? 4 : 2;
  std::vector<uint8_t> buf(n * es);
  for (size_t i = 0; i < n; ++i) {
    const float x = nd(rng);
    if (dt == TQKV_DTYPE_F32) {
      std::memcpy(&buf[i * 4], &x, 4);
    } else {
      const uint16_t h = dt == TQKV_DTYPE_F16 ? f32_to_f16(x) : f32_to_bf16(x);
      std::memcpy(&buf[i * 2], &h, 2);
    }
  }
  return buf;
}

nlohmann::json append_row(const AppendBenchOptions& o, uint64_t bytes_per_token, std::vector<double> us) {
  std::sort(us.begin(), us.end());
  const double med = us[us.size() / 2];
  const size_t es = parse_dtype(o.dtype) == TQKV_DTYPE_F32 ? 4 : 2;
  const double in_bytes = 2.0 * o.batch * o.tokens * o.kv_heads * o.dim * double(es);
  const double out_bytes = double(bytes_per_token) * o.tokens * o.batch;
  nlohmann::json r;
  r["shape"] = {{"dim", o.dim},   {"kv_heads", o.kv_heads}, {"tokens", o.tokens},   {"batch", o.batch},
                {"dtype", o.dtype}, {"backend", o.backend}, {"repeats", o.repeats}, {"k_type", type_name(o.kbits)},
                {"v_type", type_name(o.vbits)}, {"scale_dtype", scale_name(o.scale_f16)}};
  r["us"] = med;
  r["us_min"] = us.front();
  r["bytes_in"] = uint64_t(in_bytes);
  r["bytes_out"] = uint64_t(out_bytes);
  r["bytes"] = uint64_t(in_bytes + out_bytes);
  r["GBps"] = (in_bytes + out_bytes) / (med * 1e-6) / 1e9;
  r["tokens_per_s"] = double(o.tokens) * o.batch / (med * 1e-6);
  if (o.read_bw_gbps > 0) {
    r["shape"]["read_bw_gbps"] = o.read_bw_gbps;
    r["frac_of_read_bw"] = r["GBps"].get<double>() / o.read_bw_gbps;
  }
  return r;
}

nlohmann::json bench_append(const AppendBenchOptions& o) {
  check_backend(o.backend);
  check_cuda_type(o.backend, o.kbits, "--kbits");
  check_cuda_type(o.backend, o.vbits, "--vbits");
  const tqkv_dtype dt = parse_dtype(o.dtype);
  if (o.tokens == 0) invalid("--tokens: must be >= 1");
  if (o.batch == 0) invalid("--batch: must be >= 1");
  if (o.repeats == 0) invalid("--repeats: must be >= 1");
  if (!(o.read_bw_gbps >= 0)) invalid("--read-bw-gbps: must be >= 0 (0 = unknown)");
  if ((o.async || o.graph) && o.backend != "cuda")
    invalid(std::string(o.graph ? "--graph" : "--async") + ": only for --backend cuda (CPU appends are synchronous)");
  if ((o.async || o.graph) && uint64_t(o.tokens) * (o.repeats + 1) > 0xFFFFFFFFull)
    invalid("--async, --graph: --tokens x (--repeats + 1) must fit a cache's capacity (2^32 - 1)");
  if (o.backend == "cuda") {
#ifdef TQKV_CLI_CUDA
    return bench_append_cuda(o);
#endif
  }
  CacheConfig cfg;
  cfg.dims(o.dim, o.kv_heads).seqs(o.batch, o.tokens);
  cfg.k_type = static_cast<tqkv_type>(o.kbits);
  cfg.v_type = static_cast<tqkv_type>(o.vbits);
  cfg.scale_dtype = scale_dtype(o.scale_f16);
  Cache cache(cfg);
  const size_t n = size_t(o.batch) * o.tokens * o.kv_heads * o.dim;
  const auto k = random_input(n, dt, 1), v = random_input(n, dt, 2);
  const std::vector<uint32_t> counts(o.batch, o.tokens);
  std::vector<double> us;
  for (uint32_t i = 0; i < o.warmup + o.repeats; ++i) {
    for (uint32_t s = 0; s < o.batch; ++s) cache.reset(s);
    const auto t0 = std::chrono::steady_clock::now();
    check(tqkv_cache_append_batch(cache.get(), counts.data(), dt, k.data(), v.data()));
    const double t = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    if (i >= o.warmup) us.push_back(t);
  }
  return append_row(o, cache.memory().bytes_per_token, us);
}

void print_append_table(const nlohmann::json& r) {
  const auto& s = r["shape"];
  ::fmt::print("append_batch, backend {}: D={} Hkv={} tokens={} batch={} {} -> K {} V {}, TQ scales {} (median of {})\n",
               s["backend"].get<std::string>(), s["dim"].get<int>(), s["kv_heads"].get<int>(), s["tokens"].get<int>(),
               s["batch"].get<int>(), s["dtype"].get<std::string>(), s["k_type"].get<std::string>(),
               s["v_type"].get<std::string>(), s.value("scale_dtype", "f32"), s["repeats"].get<int>());
  ::fmt::print("  {:.1f} us (min {:.1f}), {:.2f} Mtok/s, {} bytes in + {} out, {:.1f} GB/s{}\n", r["us"].get<double>(),
               r["us_min"].get<double>(), r["tokens_per_s"].get<double>() / 1e6, r["bytes_in"].get<uint64_t>(),
               r["bytes_out"].get<uint64_t>(), r["GBps"].get<double>(),
               r.contains("frac_of_read_bw") ? ::fmt::format(" ({:.2f} of read bandwidth)", r["frac_of_read_bw"].get<double>())
                                             : std::string());
  if (r.value("mode", "") == "graph")
    ::fmt::print("  captured in a CUDA graph: stream time per replay\n");
  else if (r.contains("us_call"))
    ::fmt::print("  asynchronous: stream time per append; the call itself took {:.1f} us\n", r["us_call"].get<double>());
  if (r.contains("stream_floor"))
    ::fmt::print("  stream floor (one pass reading the input's bytes and writing the rows'): {:.1f} us; the append takes "
                 "{:.2f}x that\n",
                 r["stream_floor"]["us"].get<double>(), r["us_over_floor"].get<double>());
}

}  // namespace tqkv::cli
