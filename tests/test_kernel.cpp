// process_range (Highway, every compiled target this CPU runs) against process_range_generic,
// the specification, and both against a float64 evaluation of the same function.
#include <gtest/gtest.h>
#include <hwy/targets.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/format.h"
#include "core/half.h"
#include "cpu/kernel.h"

namespace tqkv::cpu {
namespace {

constexpr uint32_t kTypes[] = {fmt::TQ2, fmt::TQ3, fmt::TQ4, fmt::TQ8, fmt::F16, fmt::F32};
constexpr uint32_t kDims[] = {64, 128, 256, 512};
constexpr uint32_t kGs[] = {1, 2, 3, 4, 8, 16};
constexpr uint32_t kNs[] = {1, 2, 31, 32, 33, 257};
constexpr uint32_t kMaxN = 257, kMaxG = 16;

// Rows of one span: random payload, random scales stored both as f32 and f16, a random
// ascending codebook.
struct Span {
  uint32_t type = 0, d = 0;
  size_t stride = 0;
  // Exactly kMaxN rows on a 64-byte boundary, so that AddressSanitizer sees any read past them.
  std::unique_ptr<uint8_t, decltype(&free)> bytes{nullptr, &free};
  uint8_t* rows = nullptr;
  std::vector<float> scale32;
  std::vector<uint16_t> scale16;
  std::vector<float> centroids;

  Span(uint32_t t, uint32_t dim, size_t pad, std::mt19937& rng) : type(t), d(dim) {
    stride = fmt::row_stride(t, dim) + pad;
    void* p = nullptr;
    if (posix_memalign(&p, 64, stride * kMaxN) != 0) abort();
    bytes.reset(static_cast<uint8_t*>(p));
    rows = bytes.get();
    memset(rows, 0, stride * kMaxN);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_int_distribution<int> byte(0, 255);
    for (uint32_t j = 0; j < kMaxN; ++j) {
      uint8_t* row = rows + j * stride;
      if (t == fmt::F32) {
        for (uint32_t i = 0; i < dim; ++i) {
          const float x = normal(rng);
          memcpy(row + 4 * i, &x, 4);
        }
      } else if (t == fmt::F16) {
        for (uint32_t i = 0; i < dim; ++i) {
          const uint16_t h = f32_to_f16(normal(rng));
          memcpy(row + 2 * i, &h, 2);
        }
      } else {
        // Every byte pattern is a valid index for every TQ type.
        for (size_t i = 0; i < fmt::row_payload_bytes(t, dim); ++i) row[i] = uint8_t(byte(rng));
      }
    }
    std::uniform_real_distribution<float> scale(0.5f, 1.5f);
    for (uint32_t j = 0; j < kMaxN; ++j) {
      scale16.push_back(f32_to_f16(scale(rng)));
      scale32.push_back(scale(rng));
    }
    if (fmt::is_tq(t)) {
      centroids.resize(size_t(1) << t);
      for (float& c : centroids) c = 2.0f * normal(rng);
      std::sort(centroids.begin(), centroids.end());
    }
  }

  RowSpan span(uint32_t first, bool f16) const {
    RowSpan s;
    s.type = type;
    s.rows = rows + first * stride;
    s.stride = stride;
    s.scale_f16 = f16;
    s.scales = f16 ? static_cast<const void*>(scale16.data() + first) : scale32.data() + first;
    s.centroids = centroids.data();
    return s;
  }
};

// `offset` floats past a 64-byte boundary: the kernel must not depend on the caller's alignment.
struct Floats {
  std::vector<float> storage;
  float* p;
  Floats(const std::vector<float>& v, size_t offset) : storage(v.size() + 16 + offset) {
    p = storage.data() + (64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64 / sizeof(float) + offset;
    std::copy(v.begin(), v.end(), p);
  }
  float& operator[](size_t i) { return p[i]; }
  float operator[](size_t i) const { return p[i]; }
};

struct State {
  Floats acc;
  std::vector<float> m, l;
  State(uint32_t g, uint32_t d, size_t offset = 0)
      : acc(std::vector<float>(size_t(g) * d, 0.0f), offset),
        m(g, -std::numeric_limits<float>::infinity()),
        l(g, 0.0f) {}
};

RangeTask make_task(const Span& k, const Span& v, const float* q, uint32_t g, uint32_t first, uint32_t n,
                    float softcap, bool f16, State& st) {
  RangeTask t;
  t.d = k.d;
  t.g = g;
  t.k = k.span(first, f16);
  t.v = v.span(first, f16);
  t.n = n;
  t.q = q;
  t.softcap = softcap;
  t.acc = st.acc.p;
  t.m = st.m.data();
  t.l = st.l.data();
  return t;
}

// Worst relative error of `got` against `want` over the heads: acc as a norm, l per head.
struct Err {
  double acc = 0, l = 0, m = 0;
  bool finite = true;
  void merge(const Err& e) {
    acc = std::max(acc, e.acc);
    l = std::max(l, e.l);
    m = std::max(m, e.m);
    finite = finite && e.finite;
  }
  double worst() const { return std::max({acc, l, m}); }
};

template <class A, class T>
Err compare(const State& got, const A& acc, const std::vector<T>& m, const std::vector<T>& l, uint32_t g,
            uint32_t d) {
  Err e;
  // m is a logit; a small one can come out of cancellation, so it is measured against the
  // largest logit of the group rather than itself.
  double m_norm = 1.0;
  for (uint32_t h = 0; h < g; ++h) m_norm = std::max(m_norm, std::abs(double(m[h])));
  for (uint32_t h = 0; h < g; ++h) {
    double diff = 0, norm = 0;
    for (uint32_t i = 0; i < d; ++i) {
      const double a = got.acc[h * d + i], b = double(acc[h * d + i]);
      if (!std::isfinite(a)) e.finite = false;
      diff += (a - b) * (a - b);
      norm += b * b;
    }
    e.acc = std::max(e.acc, std::sqrt(diff / std::max(norm, 1e-30)));
    if (!std::isfinite(got.l[h]) || !std::isfinite(got.m[h])) e.finite = false;
    e.l = std::max(e.l, std::abs(double(got.l[h]) - double(l[h])) / std::max(double(l[h]), 1e-30));
    e.m = std::max(e.m, std::abs(double(got.m[h]) - double(m[h])) / m_norm);
  }
  return e;
}

Err compare(const State& got, const State& want, uint32_t g, uint32_t d) {
  return compare(got, want.acc, want.m, want.l, g, d);
}

std::vector<float> random_q(uint32_t d, float magnitude, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, magnitude / std::sqrt(float(d)));
  std::vector<float> q(size_t(kMaxG) * d);
  for (float& x : q) x = normal(rng);
  return q;
}

// The targets compiled here (same HWY_TARGETS policy as kernel_hwy.cpp) that this CPU runs.
std::vector<int64_t> targets() { return hwy::SupportedAndGeneratedTargets(); }

void process_range_f64(const Span& k, const Span& v, const float* q, uint32_t g, uint32_t n, float softcap,
                       bool f16, std::vector<double>& acc, std::vector<double>& m, std::vector<double>& l);

// Both sides round the d-term dot products differently (the generic one sums sequentially), and
// an absolute logit error e is a relative error e of every weight: the bound grows like sqrt(d).
double tolerance(uint32_t d) { return 1e-5 * std::sqrt(d / 64.0); }

// Every type pair, head_dim, group size and run length; softcap off/on, f32/f16 scales; once in
// one call and once split into two calls (the second starts from a non-empty state), on every
// target. The generic result is computed once per case.
TEST(Kernel, MatchesGenericEverywhere) {
  const std::vector<int64_t> tg = targets();
  std::vector<Err> worst(tg.size());
  int cases = 0;
  std::mt19937 rng(1234);
  for (uint32_t kt : kTypes) {
    for (uint32_t vt : kTypes) {
      for (uint32_t d : kDims) {
        const Span k(kt, d, d == 256 ? 32 : 0, rng), v(vt, d, d == 64 ? 16 : 0, rng);
        for (float cap : {0.0f, 30.0f}) {
          // With softcap on, push logits into the curved part of tanh.
          const std::vector<float> q = random_q(d, cap > 0 ? 15.0f : 3.0f, rng);
          for (bool f16 : {false, true}) {
            for (uint32_t g : kGs) {
              for (uint32_t n : kNs) {
                const uint32_t first = n == kMaxN ? 0 : 3;
                const size_t misalign = (g + n) % 2;  // q and acc 4 bytes past a 64-byte boundary
                const Floats qa(q, misalign);
                State want(g, d);
                process_range_generic(make_task(k, v, qa.p, g, first, n, cap, f16, want));
                for (size_t ti = 0; ti < tg.size(); ++ti) {
                  hwy::SetSupportedTargetsForTest(tg[ti]);
                  State once(g, d, misalign);
                  process_range(make_task(k, v, qa.p, g, first, n, cap, f16, once));
                  State split(g, d, misalign);
                  const uint32_t n1 = n / 2;
                  if (n1 > 0) process_range(make_task(k, v, qa.p, g, first, n1, cap, f16, split));
                  process_range(make_task(k, v, qa.p, g, first + n1, n - n1, cap, f16, split));
                  Err e = compare(once, want, g, d);
                  e.merge(compare(split, want, g, d));
                  worst[ti].merge(e);
                  if (!e.finite || e.worst() > tolerance(d)) {
                    ADD_FAILURE() << hwy::TargetName(tg[ti]) << " K=" << kt << " V=" << vt << " d=" << d
                                  << " g=" << g << " n=" << n << " cap=" << cap << " f16=" << f16
                                  << ": acc " << e.acc << " l " << e.l << " m " << e.m
                                  << (e.finite ? "" : " (non-finite)");
                    hwy::SetSupportedTargetsForTest(0);
                    return;
                  }
                }
                ++cases;
              }
            }
          }
        }
      }
    }
  }
  hwy::SetSupportedTargetsForTest(0);
  for (size_t ti = 0; ti < tg.size(); ++ti)
    printf("  %-7s %d cases: max rel err vs generic: acc %.2e  l %.2e  m %.2e\n", hwy::TargetName(tg[ti]),
           cases, worst[ti].acc, worst[ti].l, worst[ti].m);
}

TEST(Kernel, TargetName) {
  for (int64_t t : targets()) {
    hwy::SetSupportedTargetsForTest(t);
    EXPECT_EQ(std::string(simd_target_name()), hwy::TargetName(t));
  }
  hwy::SetSupportedTargetsForTest(0);
  printf("  process_range dispatches to %s\n", simd_target_name());
}

// Logit sequences that stress the online softmax: the running max moving at every row, never
// moving, creeping up by less than any rebase threshold, a range that underflows exp, ties,
// isolated spikes. K is dense so that the logits are exactly (h + 1) * a_j.
TEST(Kernel, ScorePatterns) {
  std::mt19937 rng(7);
  const uint32_t d = 128, g = 3, n = 257;
  Span k(fmt::F32, d, 0, rng);
  const Span v(fmt::TQ4, d, 0, rng);
  std::vector<float> q(size_t(kMaxG) * d, 0.0f);
  for (uint32_t h = 0; h < g; ++h) q[h * d] = 1.0f + float(h);
  std::uniform_real_distribution<float> wide(-1000.0f, 1000.0f);
  const char* names[] = {"ramp up", "ramp down", "creep", "huge range", "ties", "spikes"};
  for (int pattern = 0; pattern < 6; ++pattern) {
    for (uint32_t j = 0; j < kMaxN; ++j) {
      const float x = float(j);
      const float a = pattern == 0 ? 0.5f * x
                      : pattern == 1 ? -0.5f * x
                      : pattern == 2 ? 0.01f * x
                      : pattern == 3 ? wide(rng)
                      : pattern == 4 ? 3.0f
                                     : (j % 50 == 49 ? 20.0f : 0.0f);
      float* row = reinterpret_cast<float*>(k.rows + j * k.stride);
      std::fill(row, row + d, 0.0f);
      row[0] = a;
    }
    for (float cap : {0.0f, 30.0f}) {
      State want(g, d);
      process_range_generic(make_task(k, v, q.data(), g, 0, n, cap, false, want));
      std::vector<double> acc, m, l;
      process_range_f64(k, v, q.data(), g, n, cap, false, acc, m, l);
      for (int64_t target : targets()) {
        hwy::SetSupportedTargetsForTest(target);
        for (uint32_t split : {0u, 1u, 40u, 100u}) {
          State got(g, d);
          if (split > 0) process_range(make_task(k, v, q.data(), g, 0, split, cap, false, got));
          process_range(make_task(k, v, q.data(), g, split, n - split, cap, false, got));
          const Err e = compare(got, want, g, d), e64 = compare(got, acc, m, l, g, d);
          EXPECT_TRUE(e.finite && e.worst() <= 1e-5 && e64.worst() <= 1e-5)
              << hwy::TargetName(target) << " " << names[pattern] << " cap=" << cap << " split=" << split
              << ": vs generic " << e.worst() << ", vs float64 " << e64.worst();
        }
      }
      hwy::SetSupportedTargetsForTest(0);
    }
  }
}

// Calls from several threads at once (the scratch memory is per thread).
TEST(Kernel, ConcurrentCalls) {
  std::mt19937 rng(3);
  const uint32_t d = 128, g = 4, n = 257;
  const Span k(fmt::TQ4, d, 0, rng), v(fmt::TQ3, d, 0, rng);
  std::vector<std::vector<float>> qs;
  for (int i = 0; i < 4; ++i) qs.push_back(random_q(d, 3.0f, rng));
  std::vector<State> want, got;
  for (int i = 0; i < 4; ++i) {
    want.emplace_back(g, d);
    got.emplace_back(g, d);
    process_range_generic(make_task(k, v, qs[i].data(), g, 0, n, 0.0f, i % 2 == 1, want[i]));
  }
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      for (int rep = 0; rep < 50; ++rep) {
        State st(g, d);
        process_range(make_task(k, v, qs[i].data(), g, 0, n, 0.0f, i % 2 == 1, st));
        if (rep == 49) got[i] = std::move(st);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < 4; ++i) EXPECT_LE(compare(got[i], want[i], g, d).worst(), tolerance(d)) << i;
}

// float64 evaluation of the specification.
void process_range_f64(const Span& k, const Span& v, const float* q, uint32_t g, uint32_t n, float softcap,
                       bool f16, std::vector<double>& acc, std::vector<double>& m, std::vector<double>& l) {
  const uint32_t d = k.d;
  acc.assign(size_t(g) * d, 0.0);
  m.assign(g, -std::numeric_limits<double>::infinity());
  l.assign(g, 0.0);
  auto decode = [&](const Span& s, uint32_t j, std::vector<double>& out, double& scale) {
    const uint8_t* row = s.rows + j * s.stride;
    scale = !fmt::is_tq(s.type) ? 1.0 : f16 ? double(f16_to_f32(s.scale16[j])) : double(s.scale32[j]);
    out.assign(d, 0.0);
    for (uint32_t i = 0; i < d; ++i) {
      if (s.type == fmt::F32) {
        float x;
        memcpy(&x, row + 4 * i, 4);
        out[i] = x;
      } else if (s.type == fmt::F16) {
        uint16_t h;
        memcpy(&h, row + 2 * i, 2);
        out[i] = f16_to_f32(h);
      } else {
        out[fmt::kernel_position(s.type, i)] = s.centroids[fmt::get_index(row, s.type, d, i)];
      }
    }
  };
  std::vector<double> kr, vr;
  for (uint32_t j = 0; j < n; ++j) {
    double ks, vs;
    decode(k, j, kr, ks);
    decode(v, j, vr, vs);
    for (uint32_t h = 0; h < g; ++h) {
      double dot = 0;
      for (uint32_t i = 0; i < d; ++i) dot += double(q[h * d + i]) * kr[i];
      double s = dot * ks;
      if (softcap > 0) s = softcap * std::tanh(s / softcap);
      const double m_new = std::max(m[h], s);
      const double alpha = std::exp(m[h] - m_new), p = std::exp(s - m_new);
      for (uint32_t i = 0; i < d; ++i) acc[h * d + i] = acc[h * d + i] * alpha + p * vs * vr[i];
      l[h] = l[h] * alpha + p;
      m[h] = m_new;
    }
  }
}

TEST(Kernel, CloseToFloat64) {
  struct Case {
    uint32_t kt, vt, d, g, n;
    float cap;
    bool f16;
  };
  const Case cases[] = {{fmt::TQ4, fmt::TQ4, 128, 4, 257, 0, false}, {fmt::TQ4, fmt::TQ4, 128, 4, 257, 30, true},
                        {fmt::TQ3, fmt::F16, 256, 8, 257, 0, true},  {fmt::F32, fmt::TQ8, 64, 3, 257, 30, false},
                        {fmt::TQ2, fmt::TQ2, 512, 16, 200, 0, false}, {fmt::F16, fmt::F32, 128, 2, 257, 0, false}};
  std::mt19937 rng(99);
  double worst_simd = 0, worst_generic = 0;
  for (const Case& c : cases) {
    const Span k(c.kt, c.d, 0, rng), v(c.vt, c.d, 0, rng);
    const std::vector<float> q = random_q(c.d, c.cap > 0 ? 15.0f : 3.0f, rng);
    std::vector<double> acc, m, l;
    process_range_f64(k, v, q.data(), c.g, c.n, c.cap, c.f16, acc, m, l);
    State simd(c.g, c.d), generic(c.g, c.d);
    process_range(make_task(k, v, q.data(), c.g, 0, c.n, c.cap, c.f16, simd));
    process_range_generic(make_task(k, v, q.data(), c.g, 0, c.n, c.cap, c.f16, generic));
    const Err es = compare(simd, acc, m, l, c.g, c.d), eg = compare(generic, acc, m, l, c.g, c.d);
    EXPECT_TRUE(es.finite);
    EXPECT_LE(es.worst(), 1e-5) << "K=" << c.kt << " V=" << c.vt << " d=" << c.d;
    EXPECT_LE(eg.worst(), 1e-5) << "K=" << c.kt << " V=" << c.vt << " d=" << c.d;
    worst_simd = std::max(worst_simd, es.worst());
    worst_generic = std::max(worst_generic, eg.worst());
  }
  printf("  max rel err vs float64: simd %.2e, generic %.2e\n", worst_simd, worst_generic);
}

}  // namespace
}  // namespace tqkv::cpu
