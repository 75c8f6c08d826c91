#include "model/perplexity.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.h"

namespace tqkv::model {
namespace {

// log-softmax of one row, in double for the sums (KL of near-identical rows is tiny).
void log_softmax(const float* x, uint32_t n, std::vector<double>& out) {
  out.resize(n);
  const float m = *std::max_element(x, x + n);
  double s = 0;
  for (uint32_t i = 0; i < n; ++i) s += std::exp(double(x[i]) - m);
  const double ls = std::log(s) + m;
  for (uint32_t i = 0; i < n; ++i) out[i] = double(x[i]) - ls;
}

struct Run {
  CacheSetup setup;
  std::unique_ptr<Session> session;
  double seconds = 0;
  uint64_t tokens = 0;
  std::vector<double> nll, kl;
  uint64_t agree = 0;
  tqkv_counters traced{};
};

}  // namespace

std::vector<PerplexityRow> run_perplexity(std::shared_ptr<const Model> model, const std::vector<int32_t>& tokens,
                                          const std::vector<CacheSetup>& setups, const PerplexityOptions& opt) {
  const ModelConfig& c = model->config();
  if (opt.ctx < 4) invalid("--ctx: " + std::to_string(opt.ctx) + " is too small; must be >= 4");
  if (opt.batch == 0) invalid("--batch: must be >= 1");
  const uint64_t available = tokens.size() / opt.ctx;
  if (available == 0)
    invalid("--ctx: the text has " + std::to_string(tokens.size()) + " tokens, fewer than one chunk of " +
            std::to_string(opt.ctx));
  const uint64_t n_chunks = opt.chunks ? std::min<uint64_t>(opt.chunks, available) : available;
  const uint32_t batch = std::min(opt.batch, opt.ctx);
  // llama.cpp's perplexity puts BOS first in every chunk when the model's tokenizer adds one.
  const std::vector<int32_t> empty = model->tokenizer().encode("", true);
  const bool add_bos = !empty.empty() && empty[0] == model->tokenizer().bos();

  std::vector<Run> runs(setups.size() + 1);
  runs[0].setup = CacheSetup{"f32", std::vector<LayerCache>(c.n_layers, LayerCache{})};
  for (size_t i = 0; i < setups.size(); ++i) runs[i + 1].setup = setups[i];
  for (auto& r : runs) r.session = std::make_unique<Session>(model, r.setup.layers, opt.ctx, batch, opt.threads);

  const uint32_t first = opt.ctx / 2;  // score positions first .. ctx-2 (predicting first+1 .. ctx-1)
  std::vector<float> ref_logits, logits;
  std::vector<double> lp_ref, lp;
  const double total_work = double(n_chunks) * opt.ctx * double(runs.size());
  double done_work = 0;
  for (uint64_t ch = 0; ch < n_chunks; ++ch) {
    std::vector<int32_t> toks(tokens.begin() + ch * opt.ctx, tokens.begin() + (ch + 1) * opt.ctx);
    if (add_bos) toks[0] = model->tokenizer().bos();
    for (auto& r : runs) r.session->reset();
    for (uint32_t b0 = 0; b0 < opt.ctx; b0 += batch) {
      const uint32_t b1 = std::min(opt.ctx, b0 + batch);
      const uint32_t lo = std::max(b0, first);
      const uint32_t n_logits = b1 > lo ? b1 - lo : 0;
      for (size_t ri = 0; ri < runs.size(); ++ri) {
        Run& r = runs[ri];
        std::vector<float>& out = ri == 0 ? ref_logits : logits;
        out.resize(size_t(n_logits) * c.vocab);
        tqkv_counters before, after;
        tqkv_counters_get(&before);
        const auto t0 = std::chrono::steady_clock::now();
        r.session->forward(std::span<const int32_t>(toks.data() + b0, b1 - b0), n_logits, out.data());
        r.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        tqkv_counters_get(&after);
        r.traced.compressed_rows_read += after.compressed_rows_read - before.compressed_rows_read;
        r.traced.block_rows_read += after.block_rows_read - before.block_rows_read;
        r.traced.dense_rows_read += after.dense_rows_read - before.dense_rows_read;
        r.tokens += b1 - b0;
        for (uint32_t t = lo; t < b1 && t + 1 < opt.ctx; ++t) {
          const size_t row = size_t(t - lo) * c.vocab;
          if (ri == 0) log_softmax(ref_logits.data() + row, c.vocab, lp_ref);
          log_softmax(out.data() + row, c.vocab, lp);
          if (ri != 0) log_softmax(ref_logits.data() + row, c.vocab, lp_ref);
          r.nll.push_back(-lp[size_t(toks[t + 1])]);
          double kl = 0;
          for (uint32_t i = 0; i < c.vocab; ++i) kl += std::exp(lp_ref[i]) * (lp_ref[i] - lp[i]);
          r.kl.push_back(std::max(0.0, kl));
          const auto am_ref = std::max_element(lp_ref.begin(), lp_ref.end()) - lp_ref.begin();
          const auto am = std::max_element(lp.begin(), lp.end()) - lp.begin();
          r.agree += am_ref == am;
        }
        done_work += b1 - b0;
        if (opt.progress) opt.progress(done_work / total_work);
      }
    }
  }

  std::vector<PerplexityRow> rows;
  for (auto& r : runs) {
    PerplexityRow row;
    row.label = r.setup.label;
    row.scored = r.nll.size();
    double mean = 0, sq = 0;
    for (double x : r.nll) {
      mean += x;
      sq += x * x;
    }
    mean /= double(row.scored);
    const double var = std::max(0.0, sq / double(row.scored) - mean * mean);
    row.ppl = std::exp(mean);
    row.ppl_err = row.ppl * std::sqrt(var / double(std::max<uint64_t>(1, row.scored - 1)));
    std::vector<double> kl = r.kl;
    std::sort(kl.begin(), kl.end());
    for (double x : kl) row.kl_mean += x;
    row.kl_mean /= double(kl.size());
    row.kl_p99 = kl[std::min(kl.size() - 1, size_t(0.99 * double(kl.size())))];
    row.kl_max = kl.back();
    row.top1 = double(r.agree) / double(row.scored);
    row.kv_bytes_per_token = r.session->kv_bytes_per_token();
    row.tokens_per_s = double(r.tokens) / r.seconds;
    row.tq_rows = r.traced.compressed_rows_read;
    row.block_rows = r.traced.block_rows_read;
    row.dense_rows = r.traced.dense_rows_read;
    rows.push_back(row);
  }
  return rows;
}

}  // namespace tqkv::model
