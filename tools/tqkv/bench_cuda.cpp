// tqkv bench attention / append --backend cuda. Built only with the CUDA backend: the benchmark
// drives the CUDA runtime itself (device q/out, events, graphs, L2 flushes); its one kernel, the
// streaming read of the read floor, is in read_floor.cu.
//
// Timing rules, so that the numbers compare with torch's (bench/gpu/compare.py times SDPA the
// same two ways):
// - graph: N attend calls captured into one CUDA graph; replays are timed with events, per call
//   = replay time / N, median over replays. Data stays in L2 where it fits (steady decode).
// - cold: before each eager call a >= 2x L2 buffer is written, so the cache comes from DRAM;
//   events time only the attend.
// In both, the stream is held by a host gate until everything is queued, so the GPU never idles
// between the start event and the work while the host is still launching (the host side of
// tqkv_attend would otherwise be counted as GPU time).
// - read floor: a pure streaming read of the same number of bytes, timed both ways.
#include <cuda_runtime.h>
#include <fmt/core.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <random>
#include <thread>

#include "cli.h"
#include "core/error.h"
#include "core/format.h"
#include "cuda/check.cuh"
#include "read_floor.h"
#include "tqkv/tqkv.hpp"

namespace tqkv::cli {
namespace {

#define CK(call) TQKV_CUDA_CHECK(call)

template <class T>
class DevBuf {
 public:
  explicit DevBuf(size_t n) : n_(n) { CK(cudaMalloc(reinterpret_cast<void**>(&p_), std::max<size_t>(n, 1) * sizeof(T))); }
  ~DevBuf() { cudaFree(p_); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  T* get() const { return p_; }
  size_t bytes() const { return n_ * sizeof(T); }

 private:
  T* p_ = nullptr;
  size_t n_;
};

struct Stream {
  cudaStream_t s{};
  Stream() { CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

struct Event {
  cudaEvent_t e{};
  Event() { CK(cudaEventCreate(&e)); }
  ~Event() { cudaEventDestroy(e); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
};

double elapsed_us(const Event& a, const Event& b) {
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a.e, b.e));
  return double(ms) * 1e3;
}

struct Graph {
  cudaGraph_t g{};
  cudaGraphExec_t exec{};
  ~Graph() {
    if (exec) cudaGraphExecDestroy(exec);
    if (g) cudaGraphDestroy(g);
  }
};

// Holds a stream until the host has queued everything to be timed (see the file comment). A host
// function blocks the stream; it gives up after a few seconds so that a library call that waits
// for its own stream (which tqkv_attend must not do) shows up as an error rather than a hang.
class Gate {
 public:
  explicit Gate(cudaStream_t s) : s_(s) {}
  // The host function may still be queued when an error unwinds: let it pass before freeing it.
  ~Gate() {
    open_ = 1;
    cudaStreamSynchronize(s_);
  }
  Gate(const Gate&) = delete;
  Gate& operator=(const Gate&) = delete;
  void close() {
    open_ = 0;
    CK(cudaLaunchHostFunc(s_, &Gate::wait, this));
  }
  void release() { open_ = 1; }
  // After the stream has passed the gate.
  void check(const char* what) const {
    if (timed_out_)
      fail(TQKV_ERROR_BACKEND, std::string(what) + ": the stream waited on itself while work was queued (does "
                                                    "tqkv_attend synchronise?); timing is invalid");
  }

 private:
  static void CUDART_CB wait(void* self) {
    auto* g = static_cast<Gate*>(self);
    const auto t0 = std::chrono::steady_clock::now();
    while (!g->open_.load()) {
      if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(5)) {
        g->timed_out_ = true;
        return;
      }
      std::this_thread::yield();
    }
  }
  cudaStream_t s_;
  std::atomic<int> open_{1};
  std::atomic<bool> timed_out_{false};
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Gpu {
  int id = 0;
  cudaDeviceProp prop{};
  Gpu() {
    CK(cudaGetDevice(&id));
    CK(cudaGetDeviceProperties(&prop, id));
  }
};

// Random K/V reused for every chunk: drawing fresh normals for a 8 x 128k-token cache would take
// longer than the benchmark, and the kernels' speed does not depend on the values.
struct FillPool {
  uint32_t chunk = 0;  // tokens per sequence per append
  std::vector<float> k, v;
  FillPool(const BenchOptions& o, uint64_t seed) {
    const size_t row = size_t(o.kv_heads) * o.dim;
    chunk = uint32_t(std::clamp<size_t>((size_t(1) << 23) / (row * o.batch), 1, o.context));
    k.resize(size_t(chunk) * o.batch * row);
    v.resize(k.size());
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd;
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
  }
};

struct Shared {
  Gpu gpu;
  Stream stream;
  std::unique_ptr<DevBuf<uint8_t>> flush;  // written between cold calls to evict L2
  std::vector<float> q_host;
  std::unique_ptr<DevBuf<float>> q, out;
  std::unique_ptr<FillPool> pool;
};

// Per-call µs of `calls` invocations captured into one CUDA graph, one value per timed replay.
std::vector<double> time_graph(cudaStream_t st, uint32_t calls, uint32_t repeats, const std::function<void()>& call) {
  Graph graph;
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));  // torch's default mode: strictest
  try {
    for (uint32_t i = 0; i < calls; ++i) call();
  } catch (...) {
    cudaGraph_t g{};
    cudaStreamEndCapture(st, &g);  // leave the stream usable; the call's error is the one to report
    if (g) cudaGraphDestroy(g);
    throw;
  }
  CK(cudaStreamEndCapture(st, &graph.g));
  CK(cudaGraphInstantiate(&graph.exec, graph.g, 0));
  CK(cudaGraphLaunch(graph.exec, st));  // warm-up replay (uploads the graph)
  CK(cudaStreamSynchronize(st));
  std::vector<Event> ev(repeats + 1);
  Gate gate(st);
  gate.close();
  CK(cudaEventRecord(ev[0].e, st));
  for (uint32_t i = 0; i < repeats; ++i) {
    CK(cudaGraphLaunch(graph.exec, st));
    CK(cudaEventRecord(ev[i + 1].e, st));
  }
  gate.release();
  CK(cudaStreamSynchronize(st));
  gate.check("graph timing");
  std::vector<double> us;
  for (uint32_t i = 0; i < repeats; ++i) us.push_back(elapsed_us(ev[i], ev[i + 1]) / calls);
  return us;
}

// µs of single eager calls, each after a write of `flush` (>= 2x L2) so that its data come from DRAM.
std::vector<double> time_cold(cudaStream_t st, const DevBuf<uint8_t>& flush, uint32_t repeats,
                              const std::function<void()>& call) {
  std::vector<Event> ev(2);
  Gate gate(st);
  std::vector<double> us;
  for (uint32_t i = 0; i < repeats; ++i) {
    gate.close();
    CK(cudaMemsetAsync(flush.get(), int(i & 0xff), flush.bytes(), st));
    CK(cudaEventRecord(ev[0].e, st));
    call();
    CK(cudaEventRecord(ev[1].e, st));
    gate.release();
    CK(cudaEventSynchronize(ev[1].e));
    gate.check("cold timing");
    us.push_back(elapsed_us(ev[0], ev[1]));
  }
  return us;
}

// The read floor (read_floor.h) of `bytes`, timed like the attention: the fastest variant's
// median in each mode, and the attention's time over it (1 = as fast as a pure read).
void add_read_floor(const BenchOptions& o, Shared& sh, uint64_t bytes, nlohmann::json& r) {
  const size_t n = (bytes + 15) / 16 * 16;
  DevBuf<uint8_t> buf(n);
  DevBuf<uint32_t> sink(1);
  const cudaStream_t st = sh.stream.s;
  CK(cudaMemsetAsync(buf.get(), 0x5A, n, st));
  double best_g = INFINITY, best_c = INFINITY;
  std::string name_g, name_c;
  for (int v = 0; v < read_floor_variants(); ++v) {
    const auto read = [&] { launch_read_floor(v, buf.get(), n, sink.get(), sh.gpu.prop.multiProcessorCount, st); };
    read();  // warm-up
    const double g = median(time_graph(st, o.graph_calls, o.repeats, read));
    const double c = median(time_cold(st, *sh.flush, o.repeats, read));
    if (g < best_g) best_g = g, name_g = read_floor_name(v);
    if (c < best_c) best_c = c, name_c = read_floor_name(v);
  }
  CK(cudaStreamSynchronize(st));
  r["read_floor"] = {{"us_graph", best_g},   {"us_cold", best_c},  {"variant_graph", name_g},
                     {"variant_cold", name_c}, {"bytes", n}};
  r["us_graph_over_floor"] = r["us_graph"].get<double>() / best_g;
  r["us_cold_over_floor"] = r["us_cold"].get<double>() / best_c;
  if (o.read_bw_gbps > 0) {
    r["read_floor"]["frac_of_read_bw_graph"] = double(n) / (best_g * 1e-6) / 1e9 / o.read_bw_gbps;
    r["read_floor"]["frac_of_read_bw_cold"] = double(n) / (best_c * 1e-6) / 1e9 / o.read_bw_gbps;
  }
}

nlohmann::json bench_one(const BenchOptions& o, Shared& sh, uint32_t kt, uint32_t vt) {
  CacheConfig cfg;
  cfg.dims(o.dim, o.kv_heads).seqs(o.batch, o.rows_per_seq());
  cfg.k_type = static_cast<tqkv_type>(kt);
  cfg.v_type = static_cast<tqkv_type>(vt);
  cfg.scale_dtype = scale_dtype(o.scale_f16);
  cfg.backend = TQKV_BACKEND_CUDA;
  Cache cache(cfg);
  const cudaStream_t st = sh.stream.s;
  check(tqkv_cache_set_stream(cache.get(), st));
  const auto& pool = *sh.pool;
  std::vector<uint32_t> counts(o.batch);
  const auto fill = [&](tqkv_cache* c) {
    for (uint32_t done = 0; done < o.context; done += pool.chunk) {
      const uint32_t n = std::min(pool.chunk, o.context - done);
      std::fill(counts.begin(), counts.end(), n);
      // Host input: a CUDA cache stages and encodes it on the device.
      check(tqkv_cache_append_batch(c, counts.data(), TQKV_DTYPE_F32, pool.k.data(), pool.v.data()));
    }
  };
  if (o.fill == "copy") {
    // Encoded by the CPU backend and copied byte for byte: times attention without the device encoder.
    CacheConfig host_cfg = cfg;
    host_cfg.backend = TQKV_BACKEND_CPU;
    Cache host(host_cfg);
    fill(host.get());
    check(tqkv_cache_copy(host.get(), cache.get()));
  } else {
    fill(cache.get());
  }
  CK(cudaStreamSynchronize(st));

  AttnParams p(o.q_heads, 1.0f / std::sqrt(float(o.dim)));
  auto attend = [&] { check(tqkv_attend(cache.get(), &p, sh.q->get(), sh.out->get(), nullptr)); };
  // Warm-up; the first call also allocates the cache's workspace, which cannot grow during capture.
  for (uint32_t i = 0; i < std::max(o.warmup, 1u); ++i) attend();
  CK(cudaStreamSynchronize(st));

  const uint64_t per_call = uint64_t(o.batch) * o.context * o.kv_heads;
  const uint64_t tq_per_call = per_call * (fmt::is_tq(kt) + fmt::is_tq(vt));
  const uint64_t dense_per_call = per_call * 2 - tq_per_call;

  // (a) graph. Counters move while calls are captured (the host side runs then), not on replay.
  const auto c0 = counters();
  const std::vector<double> graph_us = time_graph(st, o.graph_calls, o.repeats, attend);
  const auto c1 = counters();
  // (b) cold: L2 flushed before each eager call.
  const auto c2 = counters();
  const std::vector<double> cold_us = time_cold(st, *sh.flush, o.repeats, attend);
  const auto c3 = counters();

  // The compressed path really ran: rows decoded per call match the shape, for captured and eager calls.
  const auto expect = [&](uint64_t got, uint64_t want, const char* what, const char* phase) {
    if (got != want)
      fail(TQKV_ERROR_INTERNAL, ::fmt::format("counters: {} moved by {} during {} {} calls; expected {}", what, got,
                                              phase, kt == vt ? type_name(kt) : type_name(kt) + "/" + type_name(vt), want));
  };
  expect(c1.compressed_rows_read - c0.compressed_rows_read, tq_per_call * o.graph_calls, "compressed_rows_read", "captured");
  expect(c3.compressed_rows_read - c2.compressed_rows_read, tq_per_call * o.repeats, "compressed_rows_read", "cold");
  expect(c3.dense_rows_read - c2.dense_rows_read, dense_per_call * o.repeats, "dense_rows_read", "cold");
  expect(c3.cuda_attend_calls - c2.cuda_attend_calls, o.repeats, "cuda_attend_calls", "cold");

  // Timing garbage is worse than no timing: the output must be finite and match the reference.
  std::vector<float> out(size_t(o.batch) * o.q_heads * o.dim);
  CK(cudaMemcpy(out.data(), sh.out->get(), out.size() * sizeof(float), cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < out.size(); ++i)
    if (!std::isfinite(out[i])) fail(TQKV_ERROR_INTERNAL, ::fmt::format("out[{}] = {} after the timed calls", i, out[i]));
  nlohmann::json max_err = nullptr;
  if (uint64_t(o.batch) * o.context <= (uint64_t(1) << 16)) {  // the f64 reference is slow on long caches
    std::vector<float> ref(out.size());
    check(tqkv_attend_reference(cache.get(), &p, sh.q_host.data(), ref.data(), nullptr));
    double e = 0;
    for (size_t i = 0; i < out.size(); ++i) e = std::max(e, double(std::fabs(out[i] - ref[i])));
    if (e > 5e-2) fail(TQKV_ERROR_INTERNAL, ::fmt::format("out differs from tqkv_attend_reference by {} (max abs)", e));
    max_err = e;
  }

  const auto mem = cache.memory();
  const double bytes = double(mem.bytes_per_token) * o.context * o.batch;
  const double g_med = median(graph_us), c_med = median(cold_us);
  nlohmann::json r;
  r["cache"] = kt == vt ? type_name(kt) : "k" + type_name(kt) + "/v" + type_name(vt);
  r["k_type"] = type_name(kt);
  r["v_type"] = type_name(vt);
  r["us"] = g_med;
  r["us_min"] = *std::min_element(graph_us.begin(), graph_us.end());
  r["us_graph"] = g_med;
  r["us_cold"] = c_med;
  r["us_cold_min"] = *std::min_element(cold_us.begin(), cold_us.end());
  r["GBps"] = bytes / (g_med * 1e-6) / 1e9;
  r["GBps_cold"] = bytes / (c_med * 1e-6) / 1e9;
  if (o.read_bw_gbps > 0) r["frac_of_read_bw_cold"] = r["GBps_cold"].get<double>() / o.read_bw_gbps;
  r["bytes"] = uint64_t(bytes);
  r["bytes_per_token"] = mem.bytes_per_token;
  // Rows decoded from TQ storage by the timed eager (cold) calls; graph replays do not count.
  r["compressed_rows_read"] = c3.compressed_rows_read - c2.compressed_rows_read;
  r["dense_rows_read"] = c3.dense_rows_read - c2.dense_rows_read;
  r["cuda_attend_calls"] = c3.cuda_attend_calls - c2.cuda_attend_calls;
  r["max_abs_err_vs_reference"] = max_err;
  size_t ws = 0;
  check(tqkv_attend_workspace_size(cache.get(), &p, &ws));
  r["workspace_bytes"] = ws;
  add_read_floor(o, sh, uint64_t(bytes), r);
  return r;
}

}  // namespace

nlohmann::json bench_attention_cuda(const BenchOptions& o, const std::vector<std::pair<uint32_t, uint32_t>>& caches) {
  Shared sh;
  const size_t l2 = size_t(std::max(sh.gpu.prop.l2CacheSize, 0));
  sh.flush = std::make_unique<DevBuf<uint8_t>>(std::max<size_t>(2 * l2, size_t(64) << 20));
  const size_t nq = size_t(o.batch) * o.q_heads * o.dim;
  std::mt19937_64 rng(42);
  std::normal_distribution<float> nd;
  sh.q_host.resize(nq);
  for (auto& x : sh.q_host) x = nd(rng);
  sh.q = std::make_unique<DevBuf<float>>(nq);
  sh.out = std::make_unique<DevBuf<float>>(nq);
  CK(cudaMemcpy(sh.q->get(), sh.q_host.data(), nq * sizeof(float), cudaMemcpyHostToDevice));
  sh.pool = std::make_unique<FillPool>(o, 1234);

  nlohmann::json result;
  result["shape"] = {{"dim", o.dim},         {"q_heads", o.q_heads},         {"kv_heads", o.kv_heads},
                     {"context", o.context}, {"capacity", o.rows_per_seq()},
                     {"batch", o.batch},     {"threads", o.threads},
                     {"backend", o.backend}, {"repeats", o.repeats},         {"graph_calls", o.graph_calls}, {"fill", o.fill},
                     {"scale_dtype", scale_name(o.scale_f16)},
                     {"device", std::string(sh.gpu.prop.name)}, {"l2_bytes", l2}, {"flush_bytes", sh.flush->bytes()}};
  nlohmann::json rows = nlohmann::json::array();
  for (size_t i = 0; i < caches.size(); ++i) {
    if (!o.quiet)
      ::fmt::print(stderr, "bench: {} ({}/{}) on {} ...\n", type_name(caches[i].first) + "/" + type_name(caches[i].second),
                   i + 1, caches.size(), sh.gpu.prop.name);
    rows.push_back(bench_one(o, sh, caches[i].first, caches[i].second));
  }
  result["rows"] = rows;
  return result;
}

namespace {

// --async and --graph: after the timed appends (between e0 and e1 on the cache's stream), the
// sync that reports any failure and counts graph replays on the host, the check that every
// sequence holds all the appended tokens (the trace that they landed), and the row.
nlohmann::json kept_row(const AppendBenchOptions& o, Cache& cache, const Gpu& gpu, const Event& e0, const Event& e1) {
  CK(cudaEventSynchronize(e1.e));
  check(tqkv_cache_sync(cache.get()));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, e0.e, e1.e));
  const int64_t want = int64_t(o.tokens) * (o.repeats + 1);
  for (uint32_t s = 0; s < o.batch; ++s)
    if (cache.length(s) != want)
      fail(TQKV_ERROR_INTERNAL,
           ::fmt::format("sequence {} holds {} tokens after the appends; expected {}", s, cache.length(s), want));
  auto r = append_row(o, cache.memory().bytes_per_token, {double(ms) * 1e3 / o.repeats});
  r["shape"]["device"] = std::string(gpu.prop.name);
  return r;
}

// The stream floor of an append (read_floor.h): one pass reading bytes_in and writing bytes_out,
// launched --repeats times back to back like the asynchronous appends; the fastest variant's
// stream time per pass, and the append's time over it.
void add_stream_floor(const AppendBenchOptions& o, const Gpu& gpu, nlohmann::json& r) {
  Stream stream;
  const auto round16 = [](uint64_t b) { return size_t((b + 15) / 16 * 16); };
  const size_t ni = round16(r["bytes_in"].get<uint64_t>()), no = round16(r["bytes_out"].get<uint64_t>());
  DevBuf<uint8_t> in(ni), out(no);
  CK(cudaMemsetAsync(in.get(), 0x5A, ni, stream.s));
  double best = INFINITY;
  std::string name;
  for (int v = 0; v < read_floor_variants(); ++v) {
    const auto pass = [&] {
      launch_stream_floor(v, in.get(), ni, out.get(), no, gpu.prop.multiProcessorCount, stream.s);
    };
    pass();  // warm-up
    Event e0, e1;
    CK(cudaEventRecord(e0.e, stream.s));
    for (uint32_t i = 0; i < o.repeats; ++i) pass();
    CK(cudaEventRecord(e1.e, stream.s));
    CK(cudaEventSynchronize(e1.e));
    const double us = elapsed_us(e0, e1) / o.repeats;
    if (us < best) best = us, name = read_floor_name(v);
  }
  r["stream_floor"] = {{"us", best}, {"variant", name}, {"bytes_in", ni}, {"bytes_out", no}};
  r["us_over_floor"] = r["us"].get<double>() / best;
}

nlohmann::json append_cuda_timed(const AppendBenchOptions& o, const Gpu& gpu) {
  Stream stream;
  CacheConfig cfg;
  // --async: every timed append stays in the cache (resetting would wait for the stream).
  const bool keep = o.async || o.graph;  // every timed append stays in the cache
  cfg.dims(o.dim, o.kv_heads).seqs(o.batch, keep ? o.tokens * (o.repeats + 1) : o.tokens);
  cfg.k_type = static_cast<tqkv_type>(o.kbits);
  cfg.v_type = static_cast<tqkv_type>(o.vbits);
  cfg.scale_dtype = scale_dtype(o.scale_f16);
  cfg.backend = TQKV_BACKEND_CUDA;
  Cache cache(cfg);
  check(tqkv_cache_set_stream(cache.get(), stream.s));
  const tqkv_dtype dt = parse_dtype(o.dtype);
  const size_t n = size_t(o.batch) * o.tokens * o.kv_heads * o.dim;
  const auto kh = random_input(n, dt, 1), vh = random_input(n, dt, 2);
  DevBuf<uint8_t> k(kh.size()), v(vh.size());
  CK(cudaMemcpy(k.get(), kh.data(), kh.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(v.get(), vh.data(), vh.size(), cudaMemcpyHostToDevice));
  const std::vector<uint32_t> counts(o.batch, o.tokens);
  std::vector<double> us;
  tqkv_counters before{}, after{};
  if (o.graph) {
    // One untimed asynchronous append (first-call allocations, staging), then one captured and
    // replayed --repeats times back to back: stream time per replay, no host work in it.
    check(tqkv_cache_append_batch_async(cache.get(), counts.data(), dt, k.get(), v.get()));
    cudaGraph_t g = nullptr;
    CK(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeThreadLocal));
    const tqkv_status st = tqkv_cache_append_batch_async(cache.get(), counts.data(), dt, k.get(), v.get());
    const std::string msg = st == TQKV_OK ? std::string() : tqkv_last_error();
    CK(cudaStreamEndCapture(stream.s, &g));
    if (st != TQKV_OK) {
      cudaGraphDestroy(g);
      throw Error(st, msg);
    }
    cudaGraphExec_t exec = nullptr;
    CK(cudaGraphInstantiate(&exec, g, 0));
    Event e0, e1;
    CK(cudaEventRecord(e0.e, stream.s));
    for (uint32_t i = 0; i < o.repeats; ++i) CK(cudaGraphLaunch(exec, stream.s));
    CK(cudaEventRecord(e1.e, stream.s));
    CK(cudaEventSynchronize(e1.e));
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(g);
    auto r = kept_row(o, cache, gpu, e0, e1);
    r["mode"] = "graph";
    return r;
  }
  if (o.async) {
    // One untimed append (first-call allocations), then --repeats queued without waiting; the
    // stream time between two events over all of them, per append, and the host time per call.
    check(tqkv_cache_append_batch(cache.get(), counts.data(), dt, k.get(), v.get()));
    Event e0, e1;
    before = counters();
    CK(cudaEventRecord(e0.e, stream.s));
    const auto t0 = std::chrono::steady_clock::now();
    for (uint32_t i = 0; i < o.repeats; ++i)
      check(tqkv_cache_append_batch_async(cache.get(), counts.data(), dt, k.get(), v.get()));
    const double call_us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / o.repeats;
    CK(cudaEventRecord(e1.e, stream.s));
    auto r = kept_row(o, cache, gpu, e0, e1);  // waits for e1
    after = counters();
    r["mode"] = "async";
    r["us_call"] = call_us;
    r["rows_encoded"] = after.rows_encoded - before.rows_encoded;
    r["cuda_rows_encoded"] = after.cuda_rows_encoded - before.cuda_rows_encoded;
    return r;
  }
  for (uint32_t i = 0; i < o.warmup + o.repeats; ++i) {
    for (uint32_t s = 0; s < o.batch; ++s) cache.reset(s);
    CK(cudaStreamSynchronize(stream.s));  // the reset's device work is not the append's
    if (i == o.warmup) before = counters();
    // Wall clock: the call waits for its stream before returning (the all-or-nothing check), so
    // host time is what a caller pays.
    const auto t0 = std::chrono::steady_clock::now();
    check(tqkv_cache_append_batch(cache.get(), counts.data(), dt, k.get(), v.get()));
    const double t = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    if (i >= o.warmup) us.push_back(t);
  }
  after = counters();
  for (uint32_t s = 0; s < o.batch; ++s)
    if (cache.length(s) != o.tokens)
      fail(TQKV_ERROR_INTERNAL, ::fmt::format("sequence {} holds {} tokens after the append; expected {}", s,
                                              cache.length(s), o.tokens));
  auto r = append_row(o, cache.memory().bytes_per_token, us);
  r["mode"] = "sync";
  r["shape"]["device"] = std::string(gpu.prop.name);
  r["rows_encoded"] = after.rows_encoded - before.rows_encoded;
  r["cuda_rows_encoded"] = after.cuda_rows_encoded - before.cuda_rows_encoded;
  return r;
}

}  // namespace

nlohmann::json bench_append_cuda(const AppendBenchOptions& o) {
  const Gpu gpu;
  nlohmann::json r = append_cuda_timed(o, gpu);
  add_stream_floor(o, gpu, r);
  return r;
}

}  // namespace tqkv::cli
