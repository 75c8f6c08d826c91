// CUDA backend robustness: calls that must not crash, corrupt or fail for reasons that are not
// theirs. Each test can fail on the bug it names:
//  - an earlier, unrelated CUDA error (the caller's failed cudaMalloc) must not make the next
//    append or attend report failure (an append would land on the device while the host counts
//    it as failed);
//  - reading a cache back during graph capture is refused without breaking the capture;
//  - a graph captured with the cache's own workspace (or append staging) keeps valid memory
//    after a later call grows it;
//  - several threads attending on one cache at once (which tqkv.h allows) get their own results;
//  - launch limits (sequences, query heads) give errors naming the parameter;
//  - a cache made on GPU 1 works while the calling thread's current device is GPU 0 (two-GPU
//    machines only), and pointers on the wrong GPU are refused by name.
// Skips without a CUDA device (CI has none); scripts/gpu-run.sh runs it on the H100.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"
#ifdef TQKV_TEST_CUDA
#include "cuda_test_util.h"
#endif

using namespace tqkv;

namespace {

#ifdef TQKV_TEST_CUDA

using test::DevBuf;

// A non-blocking stream the cache runs on for the scope; the cache goes back to the default
// stream at its end.
struct CacheStream {
  Cache& cache;
  cudaStream_t s = nullptr;
  explicit CacheStream(Cache& c) : cache(c) {
    if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess) cache.set_stream(s);
  }
  ~CacheStream() {
    tqkv_cache_set_stream(cache.get(), nullptr);
    cudaStreamDestroy(s);
  }
  CacheStream(const CacheStream&) = delete;
  CacheStream& operator=(const CacheStream&) = delete;
};

// A graph and its executable, destroyed with the scope.
struct GraphExec {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ~GraphExec() {
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
  }
};

bool has(const char* needle) { return std::string(tqkv_last_error()).find(needle) != std::string::npos; }

// A CUDA cache (D = 128, 2 KV heads, TQ4) holding `len` random tokens in sequence 0, and a CPU
// copy of it for reference results.
struct Filled {
  CacheConfig cfg;
  Cache host, dev;
  Filled(int64_t len, uint32_t cap, std::mt19937_64& rng, bool ring = false)
      : host(make(cap, ring, TQKV_BACKEND_CPU)), dev(make(cap, ring, TQKV_BACKEND_CUDA)) {
    test::fill_random(host, {len}, 2, 128, false, 500, rng);
    dev.copy_from(host);
  }
  static tqkv_cache_config make(uint32_t cap, bool ring, tqkv_backend b) {
    CacheConfig c;
    c.dims(128, 2).types(Type::tq4, Type::tq4).seqs(1, cap).ring(ring);
    c.backend = b;
    return c;
  }
};

// The CPU cache's answer for q (hq heads), to compare the GPU's with: the codec is the same, the
// GPU multiplies by f16 centroids (relative differences ~1e-3).
std::vector<float> cpu_out(Filled& f, const AttnParams& p, const std::vector<float>& q) {
  std::vector<float> out(q.size());
  f.host.attend(p, q, out);
  return out;
}

TEST(CudaRobust, StaleCudaErrorDoesNotFailTheNextCall) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Filled f(300, 1024, rng);
  // The caller's failed allocation leaves an error recorded on this thread (cudaMalloc returned
  // it; a caller may well not clear it).
  void* huge = nullptr;
  ASSERT_NE(cudaMalloc(&huge, size_t(1) << 52), cudaSuccess);
  auto k = test::gaussian(2 * 128, rng), v = test::gaussian(2 * 128, rng);
  ASSERT_EQ(tqkv_cache_append(f.dev.get(), 0, 1, TQKV_DTYPE_F32, k.data(), v.data()), TQKV_OK) << tqkv_last_error();
  ASSERT_EQ(tqkv_cache_sync(f.dev.get()), TQKV_OK) << tqkv_last_error();
  EXPECT_EQ(f.dev.length(0), 301);
  f.host.append(0, k, v);
  // Host and device agree on what the cache holds: the rows read back are the CPU cache's.
  std::vector<float> got(2 * 128), want(2 * 128);
  f.dev.read(0, 0, 300, 1, got);
  f.host.read(0, 0, 300, 1, want);
  EXPECT_EQ(got, want);

  ASSERT_NE(cudaMalloc(&huge, size_t(1) << 52), cudaSuccess);
  const AttnParams p(8, 1.0f / std::sqrt(128.0f));
  auto q = test::gaussian(8 * 128, rng);
  DevBuf dq(q.size() * 4), dout(q.size() * 4);
  CU(cudaMemcpy(dq.p, q.data(), q.size() * 4, cudaMemcpyHostToDevice));
  ASSERT_NE(cudaMalloc(&huge, size_t(1) << 52), cudaSuccess);
  dout.poison();
  ASSERT_EQ(tqkv_attend(f.dev.get(), &p, dq.f(), dout.f(), nullptr), TQKV_OK) << tqkv_last_error();
  EXPECT_LE(test::rel_err(dout.host(), cpu_out(f, p, q)), 3e-3);
}

TEST(CudaRobust, ReadBackDuringCaptureIsRefusedAndTheCaptureSurvives) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Filled f(100, 256, rng);
  CacheStream cs(f.dev);
  std::vector<float> rows(2 * 128);
  GraphExec g;
  CU(cudaStreamBeginCapture(cs.s, cudaStreamCaptureModeGlobal));
  const tqkv_status st = tqkv_cache_read(f.dev.get(), 0, 0, 0, 1, rows.data());
  const std::string msg = tqkv_last_error();
  const cudaError_t end = cudaStreamEndCapture(cs.s, &g.graph);
  EXPECT_EQ(st, TQKV_ERROR_UNSUPPORTED);
  EXPECT_NE(msg.find("captured into a CUDA graph"), std::string::npos) << msg;
  EXPECT_EQ(end, cudaSuccess) << cudaGetErrorString(end);
  // Outside the capture the same read works.
  EXPECT_EQ(tqkv_cache_read(f.dev.get(), 0, 0, 0, 1, rows.data()), TQKV_OK) << tqkv_last_error();
}

// The graph replays into memory the test then owns if the cache freed the old workspace
// (cudaMalloc hands a just-freed block of the same size straight back): `guard` must not change.
TEST(CudaRobust, GrowingTheWorkspaceKeepsCapturedGraphsValid) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Filled f(2000, 4096, rng);
  CacheStream cs(f.dev);
  const cudaStream_t stream = cs.s;
  const AttnParams p4(4, 1.0f / std::sqrt(128.0f)), p32(32, 1.0f / std::sqrt(128.0f));
  auto q = test::gaussian(4 * 128, rng), q32 = test::gaussian(32 * 128, rng);
  DevBuf dq(q.size() * 4), dout(q.size() * 4), dq32(q32.size() * 4), dout32(q32.size() * 4);
  CU(cudaMemcpy(dq.p, q.data(), q.size() * 4, cudaMemcpyHostToDevice));
  CU(cudaMemcpy(dq32.p, q32.data(), q32.size() * 4, cudaMemcpyHostToDevice));
  ASSERT_EQ(tqkv_attend(f.dev.get(), &p4, dq.f(), dout.f(), nullptr), TQKV_OK) << tqkv_last_error();
  const size_t old_ws = f.dev.workspace_size(p4);
  GraphExec g;
  CU(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const tqkv_status st = tqkv_attend(f.dev.get(), &p4, dq.f(), dout.f(), nullptr);
  CU(cudaStreamEndCapture(stream, &g.graph));
  ASSERT_EQ(st, TQKV_OK) << tqkv_last_error();
  CU(cudaGraphInstantiate(&g.exec, g.graph, 0));
  // More query heads need a larger workspace: the cache grows its own.
  ASSERT_GT(f.dev.workspace_size(p32), old_ws);
  ASSERT_EQ(tqkv_attend(f.dev.get(), &p32, dq32.f(), dout32.f(), nullptr), TQKV_OK) << tqkv_last_error();
  CU(cudaStreamSynchronize(stream));
  DevBuf guard(old_ws);
  guard.poison();
  dout.poison();
  CU(cudaGraphLaunch(g.exec, stream));
  CU(cudaStreamSynchronize(stream));
  for (float x : guard.host()) ASSERT_TRUE(std::isnan(x)) << "the replay wrote into freed workspace";
  EXPECT_LE(test::rel_err(dout.host(), cpu_out(f, p4, q)), 3e-3);
  EXPECT_LE(test::rel_err(dout32.host(), cpu_out(f, p32, q32)), 3e-3);
}

// The same for the append staging a captured ring append uses.
TEST(CudaRobust, GrowingAppendStagingKeepsCapturedGraphsValid) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Filled f(50, 256, rng, /*ring=*/true);
  CacheStream cs(f.dev);
  const cudaStream_t stream = cs.s;
  auto k = test::gaussian(2 * 128, rng), v = test::gaussian(2 * 128, rng);
  DevBuf dk(k.size() * 4), dv(v.size() * 4);
  CU(cudaMemcpy(dk.p, k.data(), k.size() * 4, cudaMemcpyHostToDevice));
  CU(cudaMemcpy(dv.p, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
  f.dev.append_async(0, 1, TQKV_DTYPE_F32, dk.p, dv.p);  // sizes the staging for this shape
  f.dev.sync();
  GraphExec g;
  CU(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const tqkv_status st = tqkv_cache_append_async(f.dev.get(), 0, 1, TQKV_DTYPE_F32, dk.p, dv.p);
  CU(cudaStreamEndCapture(stream, &g.graph));
  ASSERT_EQ(st, TQKV_OK) << tqkv_last_error();
  CU(cudaGraphInstantiate(&g.exec, g.graph, 0));
  CU(cudaGraphLaunch(g.exec, stream));
  f.dev.sync();
  // A large append from host memory grows the staging (to ~20 MB: a block of its own, so the
  // old one is not simply extended in place).
  auto kb = test::gaussian(size_t(10000) * 2 * 128, rng), vb = test::gaussian(size_t(10000) * 2 * 128, rng);
  f.dev.append(0, kb, vb);
  f.dev.sync();
  // Blocks of every size the old staging could have had, so one of them likely reuses it if it
  // was freed.
  std::vector<std::unique_ptr<DevBuf>> guards;
  for (int i = 0; i < 9; ++i)
    for (int j = 0; j < 4; ++j) {
      guards.push_back(std::make_unique<DevBuf>(size_t(256) << i));
      guards.back()->poison();
    }
  CU(cudaGraphLaunch(g.exec, stream));
  CU(cudaStreamSynchronize(stream));
  for (const auto& b : guards)
    for (float x : b->host()) ASSERT_TRUE(std::isnan(x)) << "the replay wrote into freed staging";
  f.dev.sync();
  EXPECT_EQ(f.dev.length(0), 50 + 1 + 1 + 10000 + 1);
  // The replayed token is the ring's newest row.
  f.host.append(0, k, v);
  f.host.append(0, k, v);
  f.host.append(0, kb, vb);
  f.host.append(0, k, v);
  std::vector<float> got(2 * 128), want(2 * 128);
  f.dev.read(0, 0, f.dev.length(0) - 1, 1, got);
  f.host.read(0, 0, f.host.length(0) - 1, 1, want);
  EXPECT_EQ(got, want);
}

TEST(CudaRobust, ThreadsAttendingOnOneCacheGetTheirOwnResults) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Filled f(3000, 4096, rng);
  constexpr int kThreads = 4, kCalls = 40;
  const AttnParams p(8, 1.0f / std::sqrt(128.0f));
  std::vector<std::vector<float>> q(kThreads), alone(kThreads);
  std::vector<DevBuf*> dq, dout;
  for (int t = 0; t < kThreads; ++t) {
    q[t] = test::gaussian(8 * 128, rng);
    dq.push_back(new DevBuf(q[t].size() * 4));
    dout.push_back(new DevBuf(q[t].size() * 4));
    CU(cudaMemcpy(dq[t]->p, q[t].data(), q[t].size() * 4, cudaMemcpyHostToDevice));
    ASSERT_EQ(tqkv_attend(f.dev.get(), &p, dq[t]->f(), dout[t]->f(), nullptr), TQKV_OK) << tqkv_last_error();
    CU(cudaDeviceSynchronize());
    alone[t] = dout[t]->host();
  }
  std::vector<int> mismatches(kThreads, 0), failures(kThreads, 0);
  std::vector<std::thread> th;
  for (int t = 0; t < kThreads; ++t)
    th.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        if (tqkv_attend(f.dev.get(), &p, dq[t]->f(), dout[t]->f(), nullptr) != TQKV_OK) ++failures[t];
        // The cache's stream orders this thread's call before whatever is queued after it.
        cudaStreamSynchronize(nullptr);
        if (dout[t]->host() != alone[t]) ++mismatches[t];
      }
    });
  for (auto& x : th) x.join();
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(failures[t], 0) << "thread " << t;
    EXPECT_EQ(mismatches[t], 0) << "thread " << t << ": results differ from its calls made alone";
    delete dq[t];
    delete dout[t];
  }
}

TEST(CudaRobust, LaunchLimitsNameTheParameter) {
  SKIP_WITHOUT_GPU();
  CacheConfig many;
  many.dims(64, 1).types(Type::tq4, Type::tq4).seqs(65536, 1);
  many.backend = TQKV_BACKEND_CUDA;
  tqkv_cache* h = nullptr;
  EXPECT_EQ(tqkv_cache_create(&many, &h), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(has("num_seqs")) << tqkv_last_error();
  EXPECT_TRUE(has("65535")) << tqkv_last_error();

  CacheConfig one;
  one.dims(64, 1).types(Type::tq4, Type::tq4).seqs(1, 16);
  one.backend = TQKV_BACKEND_CUDA;
  Cache c1(one);
  AttnParams p(0xFFFFFFFFu, 0.125f);
  size_t bytes = 0;
  EXPECT_EQ(tqkv_attend_workspace_size(c1.get(), &p, &bytes), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(has("num_q_heads")) << tqkv_last_error();
  DevBuf dq(64 * 4), dout(64 * 4);
  EXPECT_EQ(tqkv_attend(c1.get(), &p, dq.f(), dout.f(), nullptr), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(has("num_q_heads")) << tqkv_last_error();

  // 65536 KV heads with one query head each: 65536 blocks in the grid's y dimension.
  CacheConfig wide;
  wide.dims(64, 65536).types(Type::tq4, Type::tq4).seqs(1, 16);
  wide.backend = TQKV_BACKEND_CUDA;
  Cache cw(wide);
  const AttnParams pw(65536, 0.125f);
  DevBuf wq(size_t(65536) * 64 * 4), wout(size_t(65536) * 64 * 4);
  EXPECT_EQ(tqkv_attend(cw.get(), &pw, wq.f(), wout.f(), nullptr), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(has("num_q_heads")) << tqkv_last_error();
  EXPECT_TRUE(has("65535")) << tqkv_last_error();
}

// A device q_pos past the length (or negative) poisons its sequence's outputs and reads nothing:
// before, the range ran past the sequence's rows (a q_pos of 2^40 faulted the context). The other
// sequence is unaffected. Both kernels: the 4-bit pair takes the table-lookup kernel, 2-bit the
// tile kernel.
TEST(CudaRobust, DeviceQueryPositionOutOfRangeGivesNaNAndReadsNothing) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  for (Type t : {Type::tq4, Type::tq2})
    for (Mask m : {Mask::causal, Mask::window})
      for (int64_t bad : {int64_t(1024 + 5000), int64_t(1) << 40, int64_t(-3)}) {
        CacheConfig cfg;
        cfg.dims(128, 2).types(t, t).seqs(2, 1024);
        Cache host(cfg);
        test::fill_random(host, {500, 300}, 2, 128, false, 200, rng);
        CacheConfig dcfg = cfg;
        dcfg.backend = TQKV_BACKEND_CUDA;
        Cache dev(dcfg);
        dev.copy_from(host);
        AttnParams p(8, 1.0f / std::sqrt(128.0f));
        p.with_mask(m, m == Mask::window ? 64 : 0);
        const std::vector<int64_t> pos{bad, 200};
        DevBuf dpos(2 * sizeof(int64_t));
        CU(cudaMemcpy(dpos.p, pos.data(), sizeof(int64_t) * 2, cudaMemcpyHostToDevice));
        auto q = test::gaussian(2 * 8 * 128, rng);
        DevBuf dq(q.size() * 4), dout(q.size() * 4), dlse(2 * 8 * 4);
        CU(cudaMemcpy(dq.p, q.data(), q.size() * 4, cudaMemcpyHostToDevice));
        AttnParams pd = p;
        pd.q_pos = static_cast<const int64_t*>(dpos.p);
        dout.poison();
        ASSERT_EQ(tqkv_attend(dev.get(), &pd, dq.f(), dout.f(), dlse.f()), TQKV_OK) << tqkv_last_error();
        CU(cudaDeviceSynchronize());
        const auto out = dout.host(), lse = dlse.host();
        for (size_t i = 0; i < 8 * 128; ++i) ASSERT_TRUE(std::isnan(out[i])) << "q_pos " << bad << " element " << i;
        for (size_t h = 0; h < 8; ++h) EXPECT_TRUE(std::isnan(lse[h]));
        // Sequence 1 (q_pos 200) against the CPU cache, given a valid q_pos for sequence 0.
        const std::vector<int64_t> ok{499, 200};
        p.with_q_pos(ok);
        std::vector<float> ref(q.size());
        host.attend(p, q, ref);
        const std::vector<float> got1(out.begin() + 8 * 128, out.end()), ref1(ref.begin() + 8 * 128, ref.end());
        EXPECT_LE(test::rel_err(got1, ref1), 3e-3) << "q_pos " << bad;
      }
}

// The limit tqkv.h states: V is weighed in f16 hi + lo parts, so a V row whose root-mean-square
// coordinate is past 65504 (f32 scales) gives NaN where the CPU gives the row. Pinned here so
// that the header stays true.
TEST(CudaRobust, VRowsPastTheF16RangeGiveNaN) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  CacheConfig cfg;
  cfg.dims(128, 2).types(Type::tq4, Type::tq4).seqs(1, 64);
  Cache host(cfg);
  auto k = test::gaussian(2 * 128, rng), v = test::gaussian(2 * 128, rng, 1e5f);
  host.append(0, k, v);
  CacheConfig dcfg = cfg;
  dcfg.backend = TQKV_BACKEND_CUDA;
  Cache dev(dcfg);
  dev.copy_from(host);
  const AttnParams p(8, 1.0f / std::sqrt(128.0f));
  auto q = test::gaussian(8 * 128, rng);
  std::vector<float> ref(q.size());
  host.attend(p, q, ref);
  ASSERT_TRUE(test::all_finite(ref));
  DevBuf dq(q.size() * 4), dout(q.size() * 4);
  CU(cudaMemcpy(dq.p, q.data(), q.size() * 4, cudaMemcpyHostToDevice));
  ASSERT_EQ(tqkv_attend(dev.get(), &p, dq.f(), dout.f(), nullptr), TQKV_OK) << tqkv_last_error();
  const auto out = dout.host();
  size_t nan = 0;
  for (float x : out) nan += std::isnan(x) ? 1 : 0;
  EXPECT_GT(nan, 0u) << "V rows past the f16 range gave finite outputs: update tqkv.h (and this test)";
}

TEST(CudaRobust, CacheOnTheSecondGpu) {
  SKIP_WITHOUT_GPU();
  int n = 0;
  CU(cudaGetDeviceCount(&n));
  if (n < 2) GTEST_SKIP() << "one GPU: the two-GPU test needs two";
  std::mt19937_64 rng(test::fresh_seed());
  CU(cudaSetDevice(1));
  Filled f(700, 1024, rng);  // made while GPU 1 is current: the cache lives there
  const AttnParams p(8, 1.0f / std::sqrt(128.0f));
  auto q = test::gaussian(8 * 128, rng);
  DevBuf dq1(q.size() * 4), dout1(q.size() * 4);
  CU(cudaMemcpy(dq1.p, q.data(), q.size() * 4, cudaMemcpyHostToDevice));
  CU(cudaSetDevice(0));
  DevBuf dq0(q.size() * 4), dout0(q.size() * 4);
  // Every call from a thread whose current device is GPU 0.
  auto k = test::gaussian(2 * 128, rng), v = test::gaussian(2 * 128, rng);
  f.dev.append(0, k, v);
  f.host.append(0, k, v);
  f.dev.sync();
  EXPECT_EQ(f.dev.length(0), 701);
  dout1.poison();
  ASSERT_EQ(tqkv_attend(f.dev.get(), &p, dq1.f(), dout1.f(), nullptr), TQKV_OK) << tqkv_last_error();
  CU(cudaSetDevice(1));
  CU(cudaDeviceSynchronize());
  const auto out = dout1.host();
  CU(cudaSetDevice(0));
  EXPECT_LE(test::rel_err(out, cpu_out(f, p, q)), 3e-3);
  int cur = -1;
  CU(cudaGetDevice(&cur));
  EXPECT_EQ(cur, 0) << "the call left another device current";
  EXPECT_EQ(tqkv_attend(f.dev.get(), &p, dq0.f(), dout1.f(), nullptr), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(has("q: device memory of GPU 0")) << tqkv_last_error();
  EXPECT_EQ(tqkv_cache_append_async(f.dev.get(), 0, 1, TQKV_DTYPE_F32, dq0.p, dq1.p), TQKV_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(has("k: device memory of GPU 0")) << tqkv_last_error();
  EXPECT_EQ(f.dev.length(0), 701);
}

#else

TEST(CudaRobust, SkippedWithoutCuda) { GTEST_SKIP() << "built without the CUDA backend"; }

#endif

}  // namespace
