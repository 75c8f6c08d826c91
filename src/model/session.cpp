// The forward pass: f32 activations, OpenBLAS matrix products, attention on tqkv caches.
#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/format.h"
#include "model/model.h"

extern "C" void openblas_set_num_threads(int num_threads);

namespace tqkv::model {
namespace {

// y[n][out] = x[n][in] * W^T, W stored [out][in] as GGUF does.
void matmul(const float* x, const std::vector<float>& w, float* y, uint32_t n, uint32_t in, uint32_t out) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(out), int(in), 1.0f, x, int(in), w.data(), int(in),
              0.0f, y, int(out));
}

void rmsnorm(const float* x, const float* w, float* y, uint32_t rows, uint32_t dim, float eps) {
  for (uint32_t r = 0; r < rows; ++r) {
    const float* a = x + size_t(r) * dim;
    float* b = y + size_t(r) * dim;
    double ss = 0;
    for (uint32_t i = 0; i < dim; ++i) ss += double(a[i]) * a[i];
    const float k = float(1.0 / std::sqrt(ss / dim + eps));
    for (uint32_t i = 0; i < dim; ++i) b[i] = a[i] * k * w[i];
  }
}

// Rotary embedding of every head of n rows at positions pos0.. .
void rope(float* x, uint32_t n, uint32_t heads, uint32_t hd, int64_t pos0, double base, bool neox) {
  const uint32_t half = hd / 2;
  for (uint32_t t = 0; t < n; ++t) {
    const double pos = double(pos0 + t);
    for (uint32_t i = 0; i < half; ++i) {
      const double theta = pos * std::pow(base, -2.0 * i / hd);
      const float c = float(std::cos(theta)), s = float(std::sin(theta));
      for (uint32_t h = 0; h < heads; ++h) {
        float* v = x + (size_t(t) * heads + h) * hd;
        const uint32_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        const float x0 = v[a], x1 = v[b];
        v[a] = x0 * c - x1 * s;
        v[b] = x0 * s + x1 * c;
      }
    }
  }
}

float gelu_tanh(float x) { return 0.5f * x * (1.0f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x))); }
float silu(float x) { return x / (1.0f + std::exp(-x)); }

}  // namespace

struct Session::Scratch {
  std::vector<float> x, h, q, k, v, att, o, gate, up;
};

Session::Session(std::shared_ptr<const Model> model, std::vector<LayerCache> caches, uint32_t max_ctx,
                 uint32_t max_chunk, uint32_t threads)
    : model_(std::move(model)), types_(std::move(caches)), max_ctx_(max_ctx), max_chunk_(max_chunk),
      threads_(threads), s_(std::make_unique<Scratch>()) {
  const ModelConfig& c = model_->config();
  if (types_.size() != c.n_layers)
    invalid("caches: " + std::to_string(types_.size()) + " layer types given; the model has " + std::to_string(c.n_layers));
  if (max_ctx == 0 || max_chunk == 0) invalid("max_ctx and max_chunk must be >= 1");
  if (threads_) openblas_set_num_threads(int(threads_));
  for (uint32_t l = 0; l < c.n_layers; ++l) {
    CacheConfig cfg;
    cfg.dims(c.head_dim, c.n_head_kv).seqs(1, max_ctx);
    cfg.k_type = types_[l].k;
    cfg.v_type = types_[l].v;
    cfg.k_center = fmt::is_tq(cfg.k_type) && types_[l].center_tq_keys ? TQKV_CENTER_FIRST_APPEND : TQKV_CENTER_NONE;
    cfg.scale_dtype = types_[l].scale_f16 ? TQKV_SCALE_F16 : TQKV_SCALE_F32;
    // A sliding layer keeps only what a window needs; the chunk's own tokens must not evict
    // positions its earlier tokens still see, hence window + chunk - 1.
    if (c.layer_sliding[l] && uint64_t(c.sliding_window) + max_chunk - 1 < max_ctx) {
      cfg.capacity = c.sliding_window + max_chunk - 1;
      cfg.ring(true);
    }
    caches_.emplace_back(cfg);
  }
  const size_t e = c.n_embd, nq = size_t(c.n_head) * c.head_dim, nkv = size_t(c.n_head_kv) * c.head_dim;
  s_->x.resize(max_chunk * e);
  s_->h.resize(max_chunk * e);
  s_->q.resize(max_chunk * nq);
  s_->k.resize(max_chunk * nkv);
  s_->v.resize(max_chunk * nkv);
  s_->att.resize(max_chunk * nq);
  s_->o.resize(max_chunk * e);
  s_->gate.resize(max_chunk * size_t(c.n_ff));
  s_->up.resize(max_chunk * size_t(c.n_ff));
}

Session::~Session() = default;

void Session::reset() {
  for (auto& c : caches_) c.reset(0);
  pos_ = 0;
}

uint64_t Session::kv_bytes_per_token() const {
  uint64_t b = 0;
  for (const auto& c : caches_) b += c.memory().bytes_per_token;
  return b;
}

void Session::forward(std::span<const int32_t> tokens, uint32_t n_logits, float* logits) {
  const ModelConfig& c = model_->config();
  const uint32_t n = uint32_t(tokens.size());
  if (n == 0) return;
  if (n > max_chunk_) invalid("forward: " + std::to_string(n) + " tokens exceed max_chunk " + std::to_string(max_chunk_));
  if (pos_ + n > max_ctx_)
    fail(TQKV_ERROR_CAPACITY, "forward: position " + std::to_string(pos_ + n - 1) + " exceeds max_ctx " + std::to_string(max_ctx_));
  if (n_logits > n) invalid("forward: n_logits " + std::to_string(n_logits) + " exceeds the chunk's " + std::to_string(n) + " tokens");
  const uint32_t e = c.n_embd, hd = c.head_dim, nq = c.n_head * hd, nkv = c.n_head_kv * hd, ff = c.n_ff;
  Scratch& s = *s_;
  for (uint32_t t = 0; t < n; ++t) {
    if (tokens[t] < 0 || uint32_t(tokens[t]) >= c.vocab)
      invalid("forward: token id " + std::to_string(tokens[t]) + " is outside the vocabulary (" + std::to_string(c.vocab) + ")");
    const float* row = model_->embeddings().data() + size_t(tokens[t]) * e;
    for (uint32_t i = 0; i < e; ++i) s.x[size_t(t) * e + i] = row[i] * c.embed_scale;
  }
  std::vector<int64_t> qpos(n);
  for (uint32_t t = 0; t < n; ++t) qpos[t] = pos_ + t;

  for (uint32_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& w = model_->layers()[l];
    rmsnorm(s.x.data(), w.attn_norm.data(), s.h.data(), n, e, c.rms_eps);
    matmul(s.h.data(), w.wq, s.q.data(), n, e, nq);
    matmul(s.h.data(), w.wk, s.k.data(), n, e, nkv);
    matmul(s.h.data(), w.wv, s.v.data(), n, e, nkv);
    if (!w.q_norm.empty()) {
      rmsnorm(s.q.data(), w.q_norm.data(), s.q.data(), n * c.n_head, hd, c.rms_eps);
      rmsnorm(s.k.data(), w.k_norm.data(), s.k.data(), n * c.n_head_kv, hd, c.rms_eps);
    }
    const double base = c.layer_sliding[l] ? c.rope_base_local : c.rope_base;
    rope(s.q.data(), n, c.n_head, hd, pos_, base, c.rope_neox);
    rope(s.k.data(), n, c.n_head_kv, hd, pos_, base, c.rope_neox);

    Cache& cache = caches_[l];
    cache.append(0, std::span<const float>(s.k.data(), size_t(n) * nkv), std::span<const float>(s.v.data(), size_t(n) * nkv));
    AttnParams p(c.n_head, c.attn_scale);
    if (c.layer_sliding[l]) p.with_mask(Mask::window, c.sliding_window);
    p.with_threads(threads_);
    cache.attend_seq(0, qpos, p, std::span<const float>(s.q.data(), size_t(n) * nq), std::span<float>(s.att.data(), size_t(n) * nq));

    matmul(s.att.data(), w.wo, s.o.data(), n, nq, e);
    if (!w.post_attn_norm.empty()) rmsnorm(s.o.data(), w.post_attn_norm.data(), s.o.data(), n, e, c.rms_eps);
    for (size_t i = 0; i < size_t(n) * e; ++i) s.x[i] += s.o[i];

    rmsnorm(s.x.data(), w.ffn_norm.data(), s.h.data(), n, e, c.rms_eps);
    matmul(s.h.data(), w.w_gate, s.gate.data(), n, e, ff);
    matmul(s.h.data(), w.w_up, s.up.data(), n, e, ff);
    const bool gelu = c.arch == Arch::gemma3;
    for (size_t i = 0; i < size_t(n) * ff; ++i) s.gate[i] = (gelu ? gelu_tanh(s.gate[i]) : silu(s.gate[i])) * s.up[i];
    matmul(s.gate.data(), w.w_down, s.o.data(), n, ff, e);
    if (!w.post_ffn_norm.empty()) rmsnorm(s.o.data(), w.post_ffn_norm.data(), s.o.data(), n, e, c.rms_eps);
    for (size_t i = 0; i < size_t(n) * e; ++i) s.x[i] += s.o[i];
  }
  pos_ += n;
  if (n_logits == 0) return;
  const uint32_t first = n - n_logits;
  rmsnorm(s.x.data() + size_t(first) * e, model_->output_norm().data(), s.h.data(), n_logits, e, c.rms_eps);
  matmul(s.h.data(), model_->output(), logits, n_logits, e, c.vocab);
}

}  // namespace tqkv::model
