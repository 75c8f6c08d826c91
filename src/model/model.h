// Transformer forward pass on the CPU for the llama and gemma3 architectures, with every
// layer's attention running on a tqkv cache of a chosen type (the thing under test).
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "model/gguf.h"
#include "model/tokenizer.h"
#include "tqkv/tqkv.hpp"

namespace tqkv::model {

enum class Arch { llama, gemma3 };

struct ModelConfig {
  Arch arch = Arch::llama;
  std::string name;
  uint32_t n_layers = 0, n_embd = 0, n_ff = 0, n_head = 0, n_head_kv = 0, head_dim = 0, vocab = 0;
  uint32_t ctx_train = 0;
  float rms_eps = 1e-5f;
  float rope_base = 10000.0f;        // global layers
  float rope_base_local = 10000.0f;  // sliding-window layers (gemma3)
  bool rope_neox = false;            // rotate (i, i + d/2) pairs instead of (2i, 2i + 1)
  uint32_t sliding_window = 0;       // 0: none
  std::vector<bool> layer_sliding;   // [n_layers]
  float attn_scale = 0;              // logit scale
  float embed_scale = 1.0f;          // gemma multiplies embeddings by sqrt(n_embd)
};

struct LayerWeights {
  std::vector<float> attn_norm, wq, wk, wv, wo, q_norm, k_norm, post_attn_norm;
  std::vector<float> ffn_norm, w_gate, w_up, w_down, post_ffn_norm;
};

class Model {
 public:
  // Loads a GGUF file; weights are dequantized to f32 once. Throws tqkv::Error.
  static std::shared_ptr<const Model> load(const std::string& path);

  const ModelConfig& config() const { return cfg_; }
  const Tokenizer& tokenizer() const { return *tok_; }
  const std::vector<LayerWeights>& layers() const { return layers_; }
  const std::vector<float>& embeddings() const { return embd_; }  // [vocab][n_embd]
  const std::vector<float>& output() const { return out_.empty() ? embd_ : out_; }
  const std::vector<float>& output_norm() const { return out_norm_; }

 private:
  ModelConfig cfg_;
  std::unique_ptr<Tokenizer> tok_;
  std::vector<LayerWeights> layers_;
  std::vector<float> embd_, out_, out_norm_;
};

// K and V storage types of one layer.
struct LayerCache {
  tqkv_type k = TQKV_TYPE_F32, v = TQKV_TYPE_F32;
  // Key centering (tqkv_center) for TurboQuant keys: exact, and it halves the key error on
  // real models. The llama.cpp baselines (q8_0, q4_0) never center, as llama.cpp does not.
  bool center_tq_keys = true;
  bool scale_f16 = false;  // TurboQuant row scales as f16 (2 bytes instead of 4)
};

// Parses a cache type name: f32, f16, q8_0, q4_0, q8_0-rot, q4_0-rot, tq2, tq3, tq4, tq8.
tqkv_type parse_cache_type(const std::string& name);
std::string cache_type_name(tqkv_type t);
// Per-layer types: the defaults, overridden by a policy such as "first2=tq8,last2=tq8,10-12=f16/tq4"
// (rules separated by commas; layers as N, N-M, firstN or lastN; types as T (K and V) or K/V).
std::vector<LayerCache> parse_policy(const std::string& policy, uint32_t n_layers, LayerCache defaults);

// One sequence's state: a tqkv cache per layer, and the forward pass over it.
class Session {
 public:
  // max_ctx: positions the session may hold; max_chunk: most tokens per forward call (a sliding
  // layer's ring holds window + max_chunk - 1 positions so a chunk never evicts what it needs).
  Session(std::shared_ptr<const Model> model, std::vector<LayerCache> caches, uint32_t max_ctx, uint32_t max_chunk,
          uint32_t threads = 0);
  ~Session();

  // Runs tokens at the next positions. Writes logits for the last `n_logits` tokens of the chunk
  // into logits ([n_logits][vocab]); n_logits may be 0.
  void forward(std::span<const int32_t> tokens, uint32_t n_logits, float* logits);
  void reset();
  int64_t position() const { return pos_; }
  // KV bytes per token summed over layers (scales included).
  uint64_t kv_bytes_per_token() const;
  const std::vector<LayerCache>& caches() const { return types_; }
  // Layer l's cache (sequence 0), for reading back what a forward stored.
  const Cache& cache(uint32_t layer) const { return caches_.at(layer); }

 private:
  struct Scratch;
  std::shared_ptr<const Model> model_;
  std::vector<LayerCache> types_;
  std::vector<Cache> caches_;
  uint32_t max_ctx_, max_chunk_, threads_;
  int64_t pos_ = 0;
  std::unique_ptr<Scratch> s_;
};

}  // namespace tqkv::model
