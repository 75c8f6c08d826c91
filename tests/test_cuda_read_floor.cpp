// The benchmark's read floor and stream floor kernels (tools/tqkv/read_floor.cu) must move every
// byte they are given: a floor that skipped part of its buffer would flatter the hardware and
// make the attention look worse than it is. The read kernel writes its sink only when one
// thread's loads XOR to a magic word, so a buffer of zeros with that word in one 16-byte unit
// shows whether the unit at that position was read. Skips without a CUDA device (CI).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "tqkv/tqkv.h"

#ifdef TQKV_TEST_READ_FLOOR
#include <cuda_runtime.h>

#include "read_floor.h"

namespace {

#define CK(call) ASSERT_EQ((call), cudaSuccess) << #call

int sm_count() {
  int dev = 0, n = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  return n;
}

void check_reads(size_t units, const std::vector<size_t>& positions) {
  const size_t bytes = units * 16;
  uint8_t* buf = nullptr;
  uint32_t* sink = nullptr;
  CK(cudaMalloc(&buf, bytes));
  CK(cudaMalloc(&sink, sizeof(uint32_t)));
  CK(cudaMemset(buf, 0, bytes));
  const uint32_t word[4] = {tqkv::cli::kReadFloorSinkWord, 0, 0, 0};
  for (size_t pos : positions) {
    CK(cudaMemcpy(buf + pos * 16, word, 16, cudaMemcpyHostToDevice));
    for (int v = 0; v < tqkv::cli::read_floor_variants(); ++v) {
      CK(cudaMemset(sink, 0, sizeof(uint32_t)));
      tqkv::cli::launch_read_floor(v, buf, bytes, sink, sm_count(), nullptr);
      CK(cudaDeviceSynchronize());
      uint32_t got = 0;
      CK(cudaMemcpy(&got, sink, sizeof(got), cudaMemcpyDeviceToHost));
      EXPECT_EQ(got, tqkv::cli::kReadFloorSinkWord)
          << "unit " << pos << " of " << units << " not read by " << tqkv::cli::read_floor_name(v);
    }
    CK(cudaMemset(buf + pos * 16, 0, 16));
  }
  cudaFree(buf);
  cudaFree(sink);
}

void check_stream(size_t n_in, size_t n_out) {
  constexpr size_t kGuard = 64;  // units past n_out that must stay untouched
  std::vector<uint8_t> in(n_in * 16);
  std::mt19937 rng(static_cast<uint32_t>(n_in * 31 + n_out));
  for (auto& b : in) b = static_cast<uint8_t>(rng());
  uint8_t *din = nullptr, *dout = nullptr;
  CK(cudaMalloc(&din, in.size() + 16));
  CK(cudaMalloc(&dout, (n_out + kGuard) * 16));
  CK(cudaMemcpy(din, in.data(), in.size(), cudaMemcpyHostToDevice));
  std::vector<uint8_t> out((n_out + kGuard) * 16);
  for (int v = 0; v < tqkv::cli::read_floor_variants(); ++v) {
    CK(cudaMemset(dout, 0xA5, out.size()));  // poison
    tqkv::cli::launch_stream_floor(v, din, n_in * 16, dout, n_out * 16, sm_count(), nullptr);
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(out.data(), dout, out.size(), cudaMemcpyDeviceToHost));
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      const size_t unit = i / 16;
      const uint8_t want = unit >= n_out ? 0xA5 : unit < n_in ? in[i] : 0;
      if (out[i] != want && bad++ == 0) first = i;
    }
    EXPECT_EQ(bad, 0u) << "stream floor " << tqkv::cli::read_floor_name(v) << ", " << n_in << " units in, " << n_out
                       << " out: first wrong byte " << first;
  }
  cudaFree(din);
  cudaFree(dout);
}

}  // namespace

TEST(CudaReadFloor, ReadsEveryUnit) {
  if (!tqkv_backend_available(TQKV_BACKEND_CUDA)) GTEST_SKIP() << "no CUDA device";
  // Every position of a few small buffers (shorter than one grid, one unit past a warp's loads,
  // odd counts), then the ends and random positions of buffers spanning many grid strides.
  for (size_t units : {size_t(1), size_t(33), size_t(1000)}) {
    std::vector<size_t> all(units);
    for (size_t i = 0; i < units; ++i) all[i] = i;
    check_reads(units, all);
  }
  std::mt19937_64 rng(7);
  for (size_t units : {size_t(1) << 20, (size_t(1) << 21) + 7, size_t(2228224) + 3}) {
    std::vector<size_t> pos = {0, 1, units / 2, units - 2, units - 1};
    for (int i = 0; i < 8; ++i) pos.push_back(rng() % units);
    check_reads(units, pos);
  }
}

TEST(CudaReadFloor, StreamMovesEveryUnit) {
  if (!tqkv_backend_available(TQKV_BACKEND_CUDA)) GTEST_SKIP() << "no CUDA device";
  // An append's shape (4:1 in to out), the reverse, equal sizes, and odd counts.
  const std::pair<size_t, size_t> cases[] = {{1, 1},           {5, 1},           {1, 5},          {1048576, 278528},
                                             {1048583, 262147}, {262147, 1048583}, {100003, 100003}};
  for (const auto& [ni, no] : cases) check_stream(ni, no);
}

#else

TEST(CudaReadFloor, ReadsEveryUnit) { GTEST_SKIP() << "built without the CUDA backend"; }

#endif
