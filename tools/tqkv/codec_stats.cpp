// tqkv codec-stats: measured codec error on random unit vectors next to the paper's figures.
#include <fmt/core.h>

#include <cmath>
#include <random>

#include "cli.h"
#include "core/codec_ref.h"
#include "core/error.h"
#include "core/format.h"
#include "core/rotation.h"

namespace tqkv::cli {

static nlohmann::json paper_mse(uint32_t bits) {
  // TurboQuant paper (arXiv 2504.19874), Theorem 1 table: D_mse for b = 1..4.
  switch (bits) {
    case 1: return 0.36;
    case 2: return 0.117;
    case 3: return 0.03;
    case 4: return 0.009;
    default: return nullptr;
  }
}

nlohmann::json codec_stats(const CodecStatsOptions& o) {
  if (!fmt::is_tq(o.bits)) invalid("--bits: " + std::to_string(o.bits) + " is not supported; allowed: 2, 3, 4, 8");
  if (!fmt::valid_head_dim(o.dim)) invalid("--dim: " + std::to_string(o.dim) + " is not supported; allowed: 64, 128, 256, 512");
  if (o.samples == 0) invalid("--samples: must be >= 1");
  if (o.codebook != "exact" && o.codebook != "gaussian")
    invalid("--codebook: '" + o.codebook + "' is not a codebook; allowed: exact, gaussian");
  if (o.scale != "norm" && o.scale != "lsq") invalid("--scale: '" + o.scale + "' is not a scale mode; allowed: norm, lsq");
  const uint32_t d = o.dim;
  const auto signs = core::rotation_signs(TQKV_DEFAULT_SEED, d);
  core::CodecParams p;
  p.type = o.bits;
  p.d = d;
  p.cb = core::codebook(o.bits, d, o.codebook == "exact" ? core::CodebookKind::exact : core::CodebookKind::gaussian);
  p.signs = signs.data();
  p.lsq = o.scale == "lsq";
  std::mt19937_64 rng(o.seed);
  std::normal_distribution<double> nd;
  std::vector<float> x(d);
  std::vector<double> xd(d), back(d), y(d);
  std::vector<uint8_t> row(fmt::row_stride(o.bits, d));
  double mse = 0, ip = 0, ip_bias = 0;
  const uint64_t progress_every = o.samples >= 200000 ? o.samples / 20 : 0;
  for (uint64_t s = 0; s < o.samples; ++s) {
    double n = 0, ny = 0;
    for (uint32_t i = 0; i < d; ++i) {
      xd[i] = nd(rng);
      n += xd[i] * xd[i];
      y[i] = nd(rng);
      ny += y[i] * y[i];
    }
    for (uint32_t i = 0; i < d; ++i) x[i] = static_cast<float>(xd[i] / std::sqrt(n));  // unit vector
    const float sc = core::encode_row(p, x.data(), row.data());
    core::decode_row(p, row.data(), sc, back.data());
    double e = 0, dot = 0, dot_hat = 0;
    for (uint32_t i = 0; i < d; ++i) {
      e += (back[i] - x[i]) * (back[i] - x[i]);
      dot += y[i] * x[i];
      dot_hat += y[i] * back[i];
    }
    mse += e;
    // Scaled as the paper reports inner-product distortion: in units of ||y||^2 / d.
    ip += (dot - dot_hat) * (dot - dot_hat) * d / ny;
    ip_bias += (dot_hat - dot) * dot * d / ny;
    if (progress_every && (s + 1) % progress_every == 0)
      ::fmt::print(stderr, "\rcodec-stats: {:3.0f}%", 100.0 * double(s + 1) / double(o.samples));
  }
  if (progress_every) ::fmt::print(stderr, "\n");
  const double ns = double(o.samples);
  nlohmann::json r;
  r["dim"] = d;
  r["bits"] = o.bits;
  r["codebook"] = o.codebook;
  r["scale"] = o.scale;
  r["samples"] = o.samples;
  r["mse"] = mse / ns;
  r["ip_error"] = ip / ns;
  r["ip_bias"] = ip_bias / ns;  // E[(<y,x^>-<y,x>)<y,x>]: < 0 means inner products shrink
  r["bytes_per_vector"] = fmt::row_stride(o.bits, d) + 4;
  r["bits_per_coordinate"] = double(fmt::row_stride(o.bits, d) + 4) * 8.0 / d;
  r["paper_mse"] = paper_mse(o.bits);
  r["shannon_lower_bound"] = std::pow(4.0, -double(o.bits));
  return r;
}

void print_codec_table(const std::vector<nlohmann::json>& rows) {
  ::fmt::print("{:>4} {:>5} {:>9} {:>6} {:>10} {:>10} {:>10} {:>10} {:>9} {:>7}\n", "dim", "bits", "codebook", "scale",
               "mse", "paper_mse", "4^-b", "ip_error", "bytes/vec", "bits/c");
  for (const auto& r : rows) {
    const std::string paper = r["paper_mse"].is_null() ? "-" : ::fmt::format("{:.4g}", r["paper_mse"].get<double>());
    ::fmt::print("{:>4} {:>5} {:>9} {:>6} {:>10.5g} {:>10} {:>10.4g} {:>10.5g} {:>9} {:>7.3f}\n", r["dim"].get<int>(),
                 r["bits"].get<int>(), r["codebook"].get<std::string>(), r["scale"].get<std::string>(),
                 r["mse"].get<double>(), paper, r["shannon_lower_bound"].get<double>(), r["ip_error"].get<double>(),
                 r["bytes_per_vector"].get<int>(), r["bits_per_coordinate"].get<double>());
  }
}

}  // namespace tqkv::cli
