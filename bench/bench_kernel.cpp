// Single-thread throughput of the fused decode loop: one (sequence, KV head) run of n = 16384
// slots, d = 128, g = 4, for each cache type pair, plus the generic loop as the baseline.
//
// Each iteration processes the next of several runs laid out one after another, so the bytes
// come from DRAM (working set 64 MiB, above the 32 MiB L3) or from L3 (8 MiB requested, above
// the L2; at least two runs, so F32 gets 32 MiB), never from L1/L2. items_per_second = (K row + V row) pairs per second; bytes_per_second
// counts the K and V payload plus the per-row scales that the loop reads.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/format.h"
#include "core/half.h"
#include "cpu/kernel.h"

namespace tqkv::cpu {
namespace {

constexpr uint32_t kD = 128, kG = 4, kRun = 16384;

const char* type_name(uint32_t t) {
  switch (t) {
    case fmt::TQ2: return "TQ2";
    case fmt::TQ3: return "TQ3";
    case fmt::TQ4: return "TQ4";
    case fmt::TQ8: return "TQ8";
    case fmt::F16: return "F16";
    case fmt::F32: return "F32";
    default: return "?";
  }
}

struct Rng {
  uint64_t s = 0x9E3779B97F4A7C15ull;
  uint64_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  }
  float uniform() { return float(next() >> 40) * (1.0f / 16777216.0f); }  // [0, 1)
};

// runs * kRun rows of one type with f16 scales (the library default), and its codebook.
struct Cache {
  uint32_t type;
  size_t stride;
  std::vector<uint8_t> bytes;
  std::vector<uint16_t> scales;
  std::vector<float> centroids;

  Cache(uint32_t t, uint32_t runs, Rng& rng) : type(t), stride(fmt::row_stride(t, kD)) {
    const size_t rows = size_t(runs) * kRun;
    bytes.resize(rows * stride + 64);
    uint8_t* base = data();
    if (t == fmt::F32) {
      for (size_t i = 0; i < rows * kD; ++i) {
        const float x = rng.uniform() * 2.0f - 1.0f;
        memcpy(base + 4 * i, &x, 4);
      }
    } else if (t == fmt::F16) {
      for (size_t i = 0; i < rows * kD; ++i) {
        const uint16_t h = f32_to_f16(rng.uniform() * 2.0f - 1.0f);
        memcpy(base + 2 * i, &h, 2);
      }
    } else {
      for (size_t i = 0; i < rows * stride; ++i) base[i] = uint8_t(rng.next() >> 56);
      scales.resize(rows);
      for (uint16_t& s : scales) s = f32_to_f16(0.5f + rng.uniform());
      centroids.resize(size_t(1) << t);
      for (size_t i = 0; i < centroids.size(); ++i)
        centroids[i] = (float(i) + 0.5f) / float(centroids.size()) * 4.0f - 2.0f;  // ascending
    }
  }
  uint8_t* data() {
    return bytes.data() + (64 - reinterpret_cast<uintptr_t>(bytes.data()) % 64) % 64;
  }
  RowSpan span(uint32_t run) {
    RowSpan s;
    s.type = type;
    s.rows = data() + size_t(run) * kRun * stride;
    s.stride = stride;
    s.scale_f16 = true;
    s.scales = fmt::is_tq(type) ? scales.data() + size_t(run) * kRun : nullptr;
    s.centroids = centroids.data();
    return s;
  }
  size_t bytes_per_row() const { return fmt::row_payload_bytes(type, kD) + fmt::scale_bytes(type, true); }
};

void BM_Kernel(benchmark::State& state, void (*fn)(const RangeTask&)) {
  const uint32_t kt = uint32_t(state.range(0)), vt = uint32_t(state.range(1));
  const size_t working_set = size_t(state.range(2)) << 20;
  Rng rng;
  const size_t pair_bytes = fmt::row_stride(kt, kD) + fmt::row_stride(vt, kD);
  const uint32_t runs = uint32_t(std::max<size_t>(2, working_set / (pair_bytes * kRun)));
  Cache k(kt, runs, rng), v(vt, runs, rng);
  std::vector<float> q(size_t(kG) * kD), acc(size_t(kG) * kD), m(kG), l(kG);
  for (float& x : q) x = (rng.uniform() * 2.0f - 1.0f) * 0.3f;
  RangeTask t;
  t.d = kD;
  t.g = kG;
  t.n = kRun;
  t.q = q.data();
  t.acc = acc.data();
  t.m = m.data();
  t.l = l.data();
  uint32_t run = 0;
  for (auto _ : state) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.end(), 0.0f);
    t.k = k.span(run);
    t.v = v.span(run);
    fn(t);
    benchmark::DoNotOptimize(acc.data());
    benchmark::ClobberMemory();
    run = (run + 1) % runs;
  }
  state.SetItemsProcessed(int64_t(state.iterations()) * kRun);
  state.SetBytesProcessed(int64_t(state.iterations()) * kRun * int64_t(k.bytes_per_row() + v.bytes_per_row()));
  const size_t ws = (pair_bytes * kRun * runs) >> 20;  // at least 2 runs, so may exceed the request
  state.SetLabel(std::string(type_name(kt)) + "/" + type_name(vt) + " " + std::to_string(ws) + "MiB");
}

void pairs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"K", "V", "MiB"});
  for (int64_t ws : {64, 8}) {
    for (int64_t t : {fmt::TQ4, fmt::TQ8, fmt::TQ2, fmt::TQ3, fmt::F16, fmt::F32}) b->Args({t, t, ws});
  }
  b->Args({fmt::TQ4, fmt::TQ2, 64});
  b->Args({fmt::TQ8, fmt::TQ4, 64});
}

BENCHMARK_CAPTURE(BM_Kernel, simd, &process_range)->Apply(pairs)->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_Kernel, generic, &process_range_generic)
    ->ArgNames({"K", "V", "MiB"})
    ->Args({fmt::TQ4, fmt::TQ4, 64})
    ->Args({fmt::F32, fmt::F32, 64})
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace tqkv::cpu

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  benchmark::AddCustomContext("simd_target", tqkv::cpu::simd_target_name());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
