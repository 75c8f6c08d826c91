// Reference codec: packing layout, round trips, measured MSE, scale modes, edge inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/codec_ref.h"
#include "core/error.h"
#include "core/format.h"
#include "core/half.h"
#include "core/rotation.h"
#include "test_util.h"

using namespace tqkv;

namespace {

struct Codec {
  std::vector<float> signs;
  core::CodecParams p;
  Codec(uint32_t type, uint32_t d, core::CodebookKind kind = core::CodebookKind::exact, bool lsq = false,
        bool f16 = false, uint64_t seed = TQKV_DEFAULT_SEED) {
    signs = core::rotation_signs(seed, d);
    p.type = type;
    p.d = d;
    if (fmt::is_tq(type)) {
      p.cb = core::codebook(type, d, kind);
      p.signs = signs.data();
    }
    p.lsq = lsq;
    p.scale_f16 = f16;
  }
};

// Mean over random vectors of ||x - decode(encode(x))||^2 / ||x||^2: the MSE per unit vector.
double measured_mse(const Codec& c, int n_vectors, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const uint32_t d = c.p.d;
  std::vector<uint8_t> row(fmt::row_stride(c.p.type, d));
  std::vector<double> back(d);
  double sum = 0;
  for (int v = 0; v < n_vectors; ++v) {
    auto x = test::gaussian(d, rng);
    const float s = core::encode_row(c.p, x.data(), row.data());
    core::decode_row(c.p, row.data(), s, back.data());
    double e = 0, nx = 0;
    for (uint32_t i = 0; i < d; ++i) {
      e += (back[i] - x[i]) * (back[i] - x[i]);
      nx += double(x[i]) * x[i];
    }
    sum += e / nx;
  }
  return sum / n_vectors;
}

}  // namespace

TEST(Format, RowStridesAreSixteenByteAlignedAndMinimal) {
  for (uint32_t d : {64u, 128u, 256u, 512u})
    for (uint32_t t : {2u, 3u, 4u, 8u, 16u, 32u}) {
      const size_t payload = fmt::is_tq(t) ? size_t(d) * t / 8 : size_t(d) * t / 8;
      EXPECT_EQ(fmt::row_payload_bytes(t, d), payload);
      EXPECT_EQ(fmt::row_stride(t, d) % 16, 0u);
      EXPECT_GE(fmt::row_stride(t, d), payload);
      EXPECT_LT(fmt::row_stride(t, d), payload + 16);
    }
  EXPECT_EQ(fmt::row_stride(fmt::TQ3, 64), 32u);  // 24 payload bytes, padded
  EXPECT_EQ(fmt::row_stride(fmt::TQ4, 128), 64u);
}

TEST(Format, PackingMatchesTheDocumentedLayoutByteForByte) {
  const uint32_t d = 64;
  // TQ4: byte m = idx[2m] | idx[2m+1] << 4, with idx_i = i mod 16.
  std::vector<uint8_t> row(64, 0);
  for (uint32_t i = 0; i < d; ++i) fmt::put_index(row.data(), fmt::TQ4, d, i, i % 16);
  const uint8_t tq4[8] = {0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE};
  for (uint32_t m = 0; m < 32; ++m) EXPECT_EQ(row[m], tq4[m % 8]) << "byte " << m;
  // TQ2: byte m = idx[4m] | idx[4m+1] << 2 | idx[4m+2] << 4 | idx[4m+3] << 6, idx_i = i mod 4.
  std::fill(row.begin(), row.end(), 0);
  for (uint32_t i = 0; i < d; ++i) fmt::put_index(row.data(), fmt::TQ2, d, i, i % 4);
  for (uint32_t m = 0; m < 16; ++m) EXPECT_EQ(row[m], 0xE4);
  // TQ3: planes of d/8 bytes; bit k of byte m of plane p = bit p of idx[8m + k]; idx_i = i mod 8.
  std::fill(row.begin(), row.end(), 0);
  for (uint32_t i = 0; i < d; ++i) fmt::put_index(row.data(), fmt::TQ3, d, i, i % 8);
  for (uint32_t m = 0; m < 8; ++m) {
    EXPECT_EQ(row[m], 0xAA);
    EXPECT_EQ(row[8 + m], 0xCC);
    EXPECT_EQ(row[16 + m], 0xF0);
  }
  // TQ8: one byte per index.
  std::fill(row.begin(), row.end(), 0);
  for (uint32_t i = 0; i < d; ++i) fmt::put_index(row.data(), fmt::TQ8, d, i, (i * 37) % 256);
  for (uint32_t i = 0; i < d; ++i) EXPECT_EQ(row[i], (i * 37) % 256);
  // get_index inverts put_index for every type.
  std::mt19937_64 rng(test::fresh_seed());
  for (uint32_t t : {2u, 3u, 4u, 8u}) {
    std::vector<uint32_t> idx(d);
    std::fill(row.begin(), row.end(), 0);
    for (uint32_t i = 0; i < d; ++i) {
      idx[i] = uint32_t(rng() % (1u << t));
      fmt::put_index(row.data(), t, d, i, idx[i]);
    }
    for (uint32_t i = 0; i < d; ++i) EXPECT_EQ(fmt::get_index(row.data(), t, d, i), idx[i]);
  }
}

TEST(Format, KernelOrderIsAPermutation) {
  for (uint32_t t : {2u, 3u, 4u, 8u, 16u, 32u})
    for (uint32_t d : {64u, 512u}) {
      std::vector<int> seen(d, 0);
      for (uint32_t i = 0; i < d; ++i) ++seen[fmt::kernel_position(t, i)];
      for (uint32_t i = 0; i < d; ++i) EXPECT_EQ(seen[i], 1);
    }
  // TQ4: within each 32-coordinate block the 16 even coordinates come first.
  EXPECT_EQ(fmt::kernel_position(fmt::TQ4, 0), 0u);
  EXPECT_EQ(fmt::kernel_position(fmt::TQ4, 1), 16u);
  EXPECT_EQ(fmt::kernel_position(fmt::TQ4, 2), 1u);
  EXPECT_EQ(fmt::kernel_position(fmt::TQ4, 33), 48u);
  EXPECT_EQ(fmt::kernel_position(fmt::TQ2, 5), 17u);
}

TEST(Codec, EncodeProducesTheExpectedBytesForAKnownVector) {
  // Build x whose rotation has known coordinates: the first d-16 sit exactly on centroids
  // (mid-cell, so float rounding cannot move them), cycling through the inner levels; the last
  // 16 are set so that the vector's norm is exactly sqrt(d) * k, which makes the encoder's
  // normalised coordinates equal the chosen centroids.
  for (uint32_t t : {2u, 3u, 4u, 8u}) {
    const uint32_t d = 256, tail = 16;
    Codec c(t, d);
    const auto& cb = c.p.cb;
    std::vector<uint32_t> inner;
    for (uint32_t l = 0; l < cb.levels; ++l)
      if (std::fabs(cb.centroids[l]) < 1.0f) inner.push_back(l);
    const double k = 0.75;
    std::vector<double> y(d), xd(d);
    std::vector<uint32_t> idx(d);
    double sq = 0;
    for (uint32_t i = 0; i < d - tail; ++i) {
      idx[i] = inner[i % inner.size()];
      y[i] = cb.centroids[idx[i]] * k;
      sq += double(cb.centroids[idx[i]]) * cb.centroids[idx[i]];
    }
    const double u_tail = std::sqrt((double(d) - sq) / tail);
    uint32_t tail_idx = 0;  // count of boundaries below u_tail (the documented rule), by linear scan
    for (uint32_t b = 0; b + 1 < cb.levels; ++b) tail_idx += u_tail > cb.boundaries[b];
    for (uint32_t i = d - tail; i < d; ++i) {
      idx[i] = tail_idx;
      y[i] = u_tail * k;
    }
    core::unrotate(c.signs.data(), y.data(), xd.data(), d);
    std::vector<float> x(xd.begin(), xd.end());
    std::vector<uint8_t> row(fmt::row_stride(t, d)), want(row.size(), 0);
    const float s = core::encode_row(c.p, x.data(), row.data());
    for (uint32_t i = 0; i < d; ++i) fmt::put_index(want.data(), t, d, i, idx[i]);
    EXPECT_EQ(0, std::memcmp(row.data(), want.data(), row.size())) << "type " << t;
    EXPECT_NEAR(s, k * std::sqrt(double(d)), 1e-5);
  }
}

TEST(Codec, RoundTripErrorMatchesTheCodebookForEveryTypeAndHeadDim) {
  for (uint32_t d : {64u, 128u, 256u, 512u})
    for (uint32_t t : {2u, 3u, 4u, 8u}) {
      Codec c(t, d);
      std::vector<double> cents(c.p.cb.centroids, c.p.cb.centroids + c.p.cb.levels);
      const double expect = core::codebook_mse(cents, d);
      // The 8-bit error is dominated by rare tail coordinates (|u| > 4.6 lands in wide outer
      // cells), so its sample mean swings by several percent even over 400k coordinates.
      const double got = measured_mse(c, int(400000 / d), test::fresh_seed());
      EXPECT_NEAR(got, expect, (t == 8 ? 0.15 : 0.05) * expect) << "d=" << d << " bits=" << t;
    }
}

TEST(Codec, MeasuredMseAtD256MatchesLloydMaxFigures) {
  // The Gaussian-limit Lloyd-Max MSE per coordinate (paper Table / peers.md A1.2).
  const double want[3] = {0.1175, 0.0346, 0.0095};
  const uint32_t bits[3] = {2, 3, 4};
  for (int i = 0; i < 3; ++i) {
    const uint64_t seed = test::fresh_seed();
    const double g = measured_mse(Codec(bits[i], 256, core::CodebookKind::gaussian), 3000, seed);
    const double e = measured_mse(Codec(bits[i], 256, core::CodebookKind::exact), 3000, seed);
    EXPECT_NEAR(g, want[i], 0.03 * want[i]) << "bits " << bits[i];
    EXPECT_LE(e, g * 1.002) << "exact-d codebook must do no worse, bits " << bits[i];
    EXPECT_NEAR(e, want[i], 0.03 * want[i]) << "bits " << bits[i];
  }
}

TEST(Codec, LeastSquaresScaleNeverIncreasesAVectorsError) {
  std::mt19937_64 rng(test::fresh_seed());
  for (uint32_t t : {2u, 3u, 4u, 8u}) {
    const uint32_t d = 128;
    Codec norm(t, d, core::CodebookKind::exact, false), lsq(t, d, core::CodebookKind::exact, true);
    std::vector<uint8_t> r1(fmt::row_stride(t, d)), r2(r1.size());
    std::vector<double> b1(d), b2(d);
    for (int v = 0; v < 200; ++v) {
      auto x = test::gaussian(d, rng);
      const float s1 = core::encode_row(norm.p, x.data(), r1.data());
      const float s2 = core::encode_row(lsq.p, x.data(), r2.data());
      EXPECT_EQ(0, std::memcmp(r1.data(), r2.data(), r1.size()));  // same indices, other scale
      core::decode_row(norm.p, r1.data(), s1, b1.data());
      core::decode_row(lsq.p, r2.data(), s2, b2.data());
      double e1 = 0, e2 = 0;
      for (uint32_t i = 0; i < d; ++i) {
        e1 += (b1[i] - x[i]) * (b1[i] - x[i]);
        e2 += (b2[i] - x[i]) * (b2[i] - x[i]);
      }
      EXPECT_LE(e2, e1 * (1 + 1e-6) + 1e-12);
    }
  }
}

TEST(Codec, ZeroVectorRoundTripsToZero) {
  for (uint32_t t : {2u, 3u, 4u, 8u, 16u, 32u}) {
    Codec c(t, 128, core::CodebookKind::exact, true);
    std::vector<float> x(128, 0.0f);
    std::vector<uint8_t> row(fmt::row_stride(t, 128));
    std::vector<double> back(128, 1.0);
    const float s = core::encode_row(c.p, x.data(), row.data());
    core::decode_row(c.p, row.data(), s, back.data());
    for (double b : back) EXPECT_EQ(b, 0.0);
  }
}

TEST(Codec, F16ScalesRoundAndOverflowIsAnError) {
  Codec c(4, 128, core::CodebookKind::exact, false, true);
  std::mt19937_64 rng(test::fresh_seed());
  auto x = test::gaussian(128, rng, 10.0f);
  std::vector<uint8_t> row(64);
  const float s = core::encode_row(c.p, x.data(), row.data());
  double n = 0;
  for (float v : x) n += double(v) * v;
  EXPECT_NEAR(s, std::sqrt(n), std::sqrt(n) * 1e-3);
  EXPECT_EQ(s, f16_to_f32(f32_to_f16(s)));  // exactly an f16 value
  auto big = test::gaussian(128, rng, 20000.0f);
  try {
    core::encode_row(c.p, big.data(), row.data());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), TQKV_ERROR_NON_FINITE);
    EXPECT_NE(std::string(e.what()).find("f16"), std::string::npos);
  }
}

TEST(Codec, DenseTypesStoreValuesAndF16OverflowIsAnError) {
  std::mt19937_64 rng(test::fresh_seed());
  auto x = test::gaussian(64, rng);
  for (uint32_t t : {16u, 32u}) {
    Codec c(t, 64);
    std::vector<uint8_t> row(fmt::row_stride(t, 64));
    core::encode_row(c.p, x.data(), row.data());
    std::vector<double> back(64);
    core::decode_row(c.p, row.data(), 0, back.data());
    for (int i = 0; i < 64; ++i) EXPECT_NEAR(back[i], x[i], t == 32 ? 0.0 : 1e-3 * std::fabs(x[i]) + 1e-7);
  }
  Codec h(16, 64);
  x[5] = 70000.0f;
  std::vector<uint8_t> row(128);
  EXPECT_THROW(core::encode_row(h.p, x.data(), row.data()), Error);
}

TEST(Half, ConversionsRoundToNearestEven) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3C00);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);
  EXPECT_EQ(f32_to_f16(-2.0f), 0xC000);
  EXPECT_EQ(f32_to_f16(5.960464477539063e-08f), 0x0001);  // smallest subnormal
  EXPECT_EQ(f32_to_f16(1.0f + 1.0f / 2048), 0x3C00);     // tie to even
  EXPECT_EQ(f32_to_f16(1.0f + 3.0f / 2048), 0x3C02);
  for (uint32_t h = 0; h < 0x7C00; ++h) EXPECT_EQ(f32_to_f16(f16_to_f32(uint16_t(h))), h);
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(bf16_to_f32(0x4049), 3.140625f);
}
