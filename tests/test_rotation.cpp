#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <random>

#include "core/rotation.h"
#include "test_util.h"

using namespace tqkv;

TEST(Rotation, SplitMix64MatchesPublishedSequence) {
  // First outputs of SplitMix64 seeded with 0 (Vigna's reference implementation).
  uint64_t s = 0;
  EXPECT_EQ(core::splitmix64(s), 0xE220A8397B1DCDAFull);
  EXPECT_EQ(core::splitmix64(s), 0x6E789E6AA1B965F4ull);
  EXPECT_EQ(core::splitmix64(s), 0x06C45D188009454Full);
}

TEST(Rotation, SignsFollowTheDocumentedBitOrder) {
  for (uint64_t seed : {uint64_t(0), uint64_t(TQKV_DEFAULT_SEED), uint64_t(12345)}) {
    const auto s = core::rotation_signs(seed, 512);
    uint64_t st = seed;
    for (uint32_t w = 0; w < 8; ++w) {
      const uint64_t word = core::splitmix64(st);
      for (uint32_t b = 0; b < 64; ++b) EXPECT_EQ(s[w * 64 + b], ((word >> b) & 1) ? -1.0f : 1.0f);
    }
    // Shorter heads use a prefix of the same stream.
    const auto s64 = core::rotation_signs(seed, 64);
    for (uint32_t i = 0; i < 64; ++i) EXPECT_EQ(s64[i], s[i]);
  }
  // Roughly balanced, and different seeds give different signs.
  const auto a = core::rotation_signs(TQKV_DEFAULT_SEED, 512), b = core::rotation_signs(1, 512);
  int neg = 0, diff = 0;
  for (uint32_t i = 0; i < 512; ++i) {
    neg += a[i] < 0;
    diff += a[i] != b[i];
  }
  EXPECT_GT(neg, 200);
  EXPECT_LT(neg, 312);
  EXPECT_GT(diff, 200);
}

TEST(Rotation, FwhtIsTheNaturalOrderHadamardMatrix) {
  for (uint32_t d : {2u, 4u, 64u, 128u}) {
    std::mt19937_64 rng(test::fresh_seed());
    auto x = test::gaussian(d, rng);
    std::vector<double> xd(x.begin(), x.end()), want(d, 0.0);
    for (uint32_t i = 0; i < d; ++i)
      for (uint32_t j = 0; j < d; ++j) want[i] += ((std::popcount(i & j) & 1) ? -1.0 : 1.0) * xd[j];
    core::fwht(xd.data(), d);
    for (uint32_t i = 0; i < d; ++i) EXPECT_NEAR(xd[i], want[i], 1e-9 * std::sqrt(double(d)));
  }
  double v[4] = {1, 1, 1, 1};
  core::fwht(v, 4);
  EXPECT_EQ(v[0], 4);
  EXPECT_EQ(v[1], 0);
  EXPECT_EQ(v[2], 0);
  EXPECT_EQ(v[3], 0);
}

TEST(Rotation, RotateIsOrthonormalAndUnrotateInvertsIt) {
  for (uint32_t d : {64u, 128u, 256u, 512u}) {
    std::mt19937_64 rng(test::fresh_seed());
    const auto signs = core::rotation_signs(rng(), d);
    auto x = test::gaussian(d, rng);
    std::vector<float> y(d), back(d);
    core::rotate(signs.data(), x.data(), y.data(), d);
    double nx = 0, ny = 0;
    for (uint32_t i = 0; i < d; ++i) {
      nx += double(x[i]) * x[i];
      ny += double(y[i]) * y[i];
    }
    EXPECT_NEAR(std::sqrt(ny), std::sqrt(nx), 1e-5 * std::sqrt(nx));
    core::unrotate(signs.data(), y.data(), back.data(), d);
    EXPECT_LT(test::rel_err(back, x), 1e-6);
    // Inner products survive rotation (the reason attention can run in the rotated domain).
    auto z = test::gaussian(d, rng);
    std::vector<double> xd(x.begin(), x.end()), zd(z.begin(), z.end()), rx(d), rz(d);
    core::rotate(signs.data(), xd.data(), rx.data(), d);
    core::rotate(signs.data(), zd.data(), rz.data(), d);
    double a = 0, b = 0;
    for (uint32_t i = 0; i < d; ++i) {
      a += xd[i] * zd[i];
      b += rx[i] * rz[i];
    }
    EXPECT_NEAR(a, b, 1e-9 * d);
  }
}
