// Model loading (config and weights from GGUF) and cache-type policies.
#include "model/model.h"

#include <cmath>
#include <sstream>

#include "core/error.h"
#include "core/format.h"

namespace tqkv::model {
namespace {

std::vector<float> load_tensor(const GgufFile& f, const std::string& name, std::vector<uint64_t> dims) {
  const GgufTensor& t = f.tensor(name);
  if (t.dims != dims) {
    std::ostringstream o;
    o << "model: tensor '" << name << "' has shape [";
    for (size_t i = 0; i < t.dims.size(); ++i) o << (i ? ", " : "") << t.dims[i];
    o << "], expected [";
    for (size_t i = 0; i < dims.size(); ++i) o << (i ? ", " : "") << dims[i];
    o << "]";
    fail(TQKV_ERROR_IO, o.str());
  }
  return f.to_f32(t);
}

}  // namespace

std::shared_ptr<const Model> Model::load(const std::string& path) {
  GgufFile f = GgufFile::open(path);
  auto m = std::shared_ptr<Model>(new Model());
  ModelConfig& c = m->cfg_;
  const std::string arch = f.get_string("general.architecture");
  if (arch == "llama") c.arch = Arch::llama;
  else if (arch == "gemma3") c.arch = Arch::gemma3;
  else fail(TQKV_ERROR_UNSUPPORTED, "model: architecture '" + arch + "' is not supported; allowed: llama, gemma3");
  const std::string p = arch + ".";
  c.name = f.get_string_or("general.name", arch);
  c.n_layers = uint32_t(f.get_uint(p + "block_count"));
  c.n_embd = uint32_t(f.get_uint(p + "embedding_length"));
  c.n_ff = uint32_t(f.get_uint(p + "feed_forward_length"));
  c.n_head = uint32_t(f.get_uint(p + "attention.head_count"));
  c.n_head_kv = uint32_t(f.get_uint_or(p + "attention.head_count_kv", c.n_head));
  c.head_dim = uint32_t(f.get_uint_or(p + "attention.key_length", c.n_head ? c.n_embd / c.n_head : 0));
  c.ctx_train = uint32_t(f.get_uint_or(p + "context_length", 2048));
  c.rms_eps = float(f.get_float(p + "attention.layer_norm_rms_epsilon"));
  c.rope_base = float(f.get_float_or(p + "rope.freq_base", 10000.0));
  if (c.n_layers == 0 || c.n_head == 0 || c.n_head_kv == 0 || c.n_head % c.n_head_kv != 0)
    fail(TQKV_ERROR_IO, "model: inconsistent head counts (" + std::to_string(c.n_head) + " query, " +
                            std::to_string(c.n_head_kv) + " KV heads) or no layers");
  if (!fmt::valid_head_dim(c.head_dim))
    fail(TQKV_ERROR_UNSUPPORTED, "model: head_dim " + std::to_string(c.head_dim) + " is not supported by tqkv caches; allowed: 64, 128, 256, 512");
  if (f.has(p + "attention.value_length") && f.get_uint(p + "attention.value_length") != c.head_dim)
    fail(TQKV_ERROR_UNSUPPORTED, "model: value_length differs from key_length");
  c.layer_sliding.assign(c.n_layers, false);
  c.attn_scale = 1.0f / std::sqrt(float(c.head_dim));
  if (c.arch == Arch::gemma3) {
    // Gemma 3: five sliding-window layers then one global layer; local RoPE base 10000; NeoX
    // rotation; embeddings scaled by sqrt(n_embd); q/k RMS norms; sandwich norms.
    c.rope_neox = true;
    c.sliding_window = uint32_t(f.get_uint(p + "attention.sliding_window"));
    for (uint32_t l = 0; l < c.n_layers; ++l) c.layer_sliding[l] = l % 6 != 5;
    c.rope_base_local = 10000.0f;
    c.embed_scale = std::sqrt(float(c.n_embd));
  }
  const GgufTensor& te = f.tensor("token_embd.weight");
  if (te.dims.size() != 2 || te.dims[0] != c.n_embd) fail(TQKV_ERROR_IO, "model: token_embd.weight has the wrong shape");
  c.vocab = uint32_t(te.dims[1]);
  m->tok_ = std::make_unique<Tokenizer>(tokenizer_data_from_gguf(f));
  if (m->tok_->vocab_size() > c.vocab)
    fail(TQKV_ERROR_IO, "model: tokenizer has " + std::to_string(m->tok_->vocab_size()) + " tokens, embeddings " +
                            std::to_string(c.vocab));

  const uint64_t e = c.n_embd, hd = c.head_dim, nq = uint64_t(c.n_head) * hd, nkv = uint64_t(c.n_head_kv) * hd,
                 ff = c.n_ff;
  m->embd_ = load_tensor(f, "token_embd.weight", {e, c.vocab});
  if (f.find("output.weight")) m->out_ = load_tensor(f, "output.weight", {e, c.vocab});
  m->out_norm_ = load_tensor(f, "output_norm.weight", {e});
  m->layers_.resize(c.n_layers);
  for (uint32_t l = 0; l < c.n_layers; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    LayerWeights& w = m->layers_[l];
    w.attn_norm = load_tensor(f, b + "attn_norm.weight", {e});
    w.wq = load_tensor(f, b + "attn_q.weight", {e, nq});
    w.wk = load_tensor(f, b + "attn_k.weight", {e, nkv});
    w.wv = load_tensor(f, b + "attn_v.weight", {e, nkv});
    w.wo = load_tensor(f, b + "attn_output.weight", {nq, e});
    w.ffn_norm = load_tensor(f, b + "ffn_norm.weight", {e});
    w.w_gate = load_tensor(f, b + "ffn_gate.weight", {e, ff});
    w.w_up = load_tensor(f, b + "ffn_up.weight", {e, ff});
    w.w_down = load_tensor(f, b + "ffn_down.weight", {ff, e});
    if (c.arch == Arch::gemma3) {
      w.q_norm = load_tensor(f, b + "attn_q_norm.weight", {hd});
      w.k_norm = load_tensor(f, b + "attn_k_norm.weight", {hd});
      w.post_attn_norm = load_tensor(f, b + "post_attention_norm.weight", {e});
      w.post_ffn_norm = load_tensor(f, b + "post_ffw_norm.weight", {e});
    }
  }
  return m;
}

tqkv_type parse_cache_type(const std::string& s) {
  struct Name {
    const char* name;
    tqkv_type type;
  };
  static const Name names[] = {{"f32", TQKV_TYPE_F32},       {"f16", TQKV_TYPE_F16},         {"q8_0", TQKV_TYPE_Q8_0},
                               {"q4_0", TQKV_TYPE_Q4_0},     {"q8_0-rot", TQKV_TYPE_Q8_0_HAD}, {"q4_0-rot", TQKV_TYPE_Q4_0_HAD},
                               {"tq2", TQKV_TYPE_TQ2},       {"tq3", TQKV_TYPE_TQ3},         {"tq4", TQKV_TYPE_TQ4},
                               {"tq8", TQKV_TYPE_TQ8}};
  for (const auto& n : names)
    if (s == n.name) return n.type;
  invalid("cache type: '" + s + "' is not known; allowed: f32, f16, q8_0, q4_0, q8_0-rot, q4_0-rot, tq2, tq3, tq4, tq8");
}

std::string cache_type_name(tqkv_type t) {
  switch (t) {
    case TQKV_TYPE_F32: return "f32";
    case TQKV_TYPE_F16: return "f16";
    case TQKV_TYPE_Q8_0: return "q8_0";
    case TQKV_TYPE_Q4_0: return "q4_0";
    case TQKV_TYPE_Q8_0_HAD: return "q8_0-rot";
    case TQKV_TYPE_Q4_0_HAD: return "q4_0-rot";
    case TQKV_TYPE_TQ2: return "tq2";
    case TQKV_TYPE_TQ3: return "tq3";
    case TQKV_TYPE_TQ4: return "tq4";
    case TQKV_TYPE_TQ8: return "tq8";
    default: return "type" + std::to_string(int(t));
  }
}

std::vector<LayerCache> parse_policy(const std::string& policy, uint32_t n_layers, LayerCache defaults) {
  std::vector<LayerCache> out(n_layers, defaults);
  std::stringstream ss(policy);
  std::string rule;
  while (std::getline(ss, rule, ',')) {
    if (rule.empty()) continue;
    const auto eq = rule.find('=');
    if (eq == std::string::npos) invalid("--policy: rule '" + rule + "' has no '='; expected LAYERS=TYPE or LAYERS=K/V");
    const std::string layers = rule.substr(0, eq), types = rule.substr(eq + 1);
    LayerCache lc;
    const auto slash = types.find('/');
    lc.k = parse_cache_type(types.substr(0, slash));
    lc.v = slash == std::string::npos ? lc.k : parse_cache_type(types.substr(slash + 1));
    uint32_t lo = 0, hi = 0;  // inclusive
    try {
      if (layers.rfind("first", 0) == 0) {
        const uint32_t n = uint32_t(std::stoul(layers.substr(5)));
        if (n == 0) throw std::invalid_argument("0");
        lo = 0;
        hi = std::min(n, n_layers) - 1;
      } else if (layers.rfind("last", 0) == 0) {
        const uint32_t n = uint32_t(std::stoul(layers.substr(4)));
        if (n == 0) throw std::invalid_argument("0");
        lo = n_layers - std::min(n, n_layers);
        hi = n_layers - 1;
      } else {
        const auto dash = layers.find('-');
        lo = uint32_t(std::stoul(layers.substr(0, dash)));
        hi = dash == std::string::npos ? lo : uint32_t(std::stoul(layers.substr(dash + 1)));
      }
    } catch (const std::exception&) {
      invalid("--policy: layers '" + layers + "' are not N, N-M, firstN or lastN (N >= 1 for first/last)");
    }
    if (lo > hi || hi >= n_layers)
      invalid("--policy: layers '" + layers + "' are outside 0 .. " + std::to_string(n_layers - 1));
    for (uint32_t l = lo; l <= hi; ++l) out[l] = lc;
  }
  return out;
}

}  // namespace tqkv::model
