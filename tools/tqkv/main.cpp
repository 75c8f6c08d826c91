// tqkv: codec statistics, memory figures and attention benchmarks from the command line.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "cli.h"
#include "model_cmds.h"
#include "core/format.h"
#include "cpu/kernel.h"
#include "tqkv/tqkv.hpp"

using namespace tqkv;

namespace {

// The default job: the codec table and a side-by-side attention benchmark on embedded shapes.
int run_default() {
  ::fmt::print("tqkv {} (CPU SIMD target: {})\n\n", tqkv_version_string(), cpu::simd_target_name());
  std::vector<nlohmann::json> rows;
  for (uint32_t bits : {2u, 3u, 4u, 8u}) {
    cli::CodecStatsOptions o;
    o.dim = 128;
    o.bits = bits;
    o.samples = 4000;
    rows.push_back(cli::codec_stats(o));
  }
  ::fmt::print("codec on random unit vectors (d=128, MSE per unit vector; paper: TurboQuant Thm. 1)\n");
  cli::print_codec_table(rows);
  for (uint32_t context : {4096u, 16384u}) {
    cli::BenchOptions b;  // Llama-3-8B-like layer: D=128, 32 query heads over 8 KV heads
    b.context = context;
    b.quiet = true;
    ::fmt::print("\n");
    cli::print_bench_table(cli::bench_attention(b));
  }
  return 0;
}

// The same flag on every command that builds a cache.
void add_scale_flag(CLI::App* cmd, bool& f16) {
  cmd->add_flag("--scale-f16", f16, "store TurboQuant row scales as f16 (default f32)");
}

}  // namespace

int main(int argc, char** argv) {
  // Idle OpenMP workers spin by default and then starve OpenBLAS's threads between layers
  // (decode: 5 tok/s spinning vs 31 tok/s passive on 2 cores). libgomp reads the policy when it
  // loads, before main, so set it and start again unless the user chose one.
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    setenv("OMP_WAIT_POLICY", "passive", 1);
    execv("/proc/self/exe", argv);  // on failure, carry on with the default policy
  }
  CLI::App app{"tqkv: TurboQuant-compressed KV cache with fused attention"};
  app.require_subcommand(0, 1);
  app.set_version_flag("--version", tqkv_version_string());

  cli::CodecStatsOptions cs;
  auto* codec = app.add_subcommand("codec-stats", "Codec error on random unit vectors next to the paper's figures");
  codec->add_option("--dim", cs.dim, "head_dim: 64, 128, 256 or 512")->capture_default_str();
  codec->add_option("--bits", cs.bits, "bits per coordinate: 2, 3, 4 or 8")->capture_default_str();
  codec->add_option("--samples", cs.samples, "random vectors to encode")->capture_default_str();
  codec->add_option("--codebook", cs.codebook, "exact or gaussian")->capture_default_str();
  codec->add_option("--scale", cs.scale, "norm or lsq")->capture_default_str();
  codec->add_option("--seed", cs.seed, "random seed")->capture_default_str();
  codec->add_flag("--json", cs.json, "print JSON");

  cli::BenchOptions bo;
  std::string kbits = "4", vbits = "4";
  auto* bench = app.add_subcommand("bench", "Benchmarks");
  bench->require_subcommand(1);
  auto* attn = bench->add_subcommand(
      "attention",
      "Decode attention: compressed vs dense caches (cpu: f32, f16; cuda: f16), one run. On cuda, q/out live in "
      "device memory and each cache is timed two ways: 'graph' (graph-calls attend calls captured in a CUDA graph, "
      "replayed; per call) and 'cold' (L2 flushed before each eager call)");
  attn->add_option("--backend", bo.backend, "cpu or cuda")->capture_default_str();
  attn->add_option("--dim", bo.dim, "head_dim")->capture_default_str();
  attn->add_option("--q-heads", bo.q_heads, "query heads")->capture_default_str();
  attn->add_option("--kv-heads", bo.kv_heads, "KV heads")->capture_default_str();
  attn->add_option("--context", bo.context, "positions per sequence")->capture_default_str();
  attn->add_option("--batch", bo.batch, "sequences")->capture_default_str();
  attn->add_option("--capacity", bo.capacity,
                   "rows allocated per sequence, >= --context (0: the context); shifts where each sequence's rows start")
      ->capture_default_str();
  attn->add_option("--kbits", kbits, "K type: 2, 3, 4, 8, f16, f32")->capture_default_str();
  attn->add_option("--vbits", vbits, "V type: 2, 3, 4, 8, f16, f32")->capture_default_str();
  attn->add_option("--threads", bo.threads, "threads (0 = all)")->capture_default_str();
  attn->add_option("--warmup", bo.warmup, "untimed calls first")->capture_default_str();
  attn->add_option("--repeats", bo.repeats, "timed calls (median reported); cuda: graph replays and cold calls")
      ->capture_default_str();
  attn->add_option("--graph-calls", bo.graph_calls, "cuda: attend calls per captured graph")->capture_default_str();
  attn->add_option("--fill", bo.fill,
                   "cuda: 'append' (encode on the device) or 'copy' (encode in a host cache, tqkv_cache_copy it over)")
      ->capture_default_str();
  attn->add_option("--read-bw-gbps", bo.read_bw_gbps, "measured memory read bandwidth in GB/s; adds frac_of_read_bw")
      ->capture_default_str();
  add_scale_flag(attn, bo.scale_f16);
  attn->add_flag("--json", bo.json, "print JSON");

  cli::AppendBenchOptions ao;
  std::string akbits = "4", avbits = "4";
  auto* app_bench = bench->add_subcommand(
      "append",
      "Prefill-sized tqkv_cache_append_batch: --tokens to each of --batch sequences, cache reset between repeats "
      "(cpu: host input; cuda: device input, the call waits for its stream once; --async: it does not)");
  app_bench->add_option("--backend", ao.backend, "cpu or cuda")->capture_default_str();
  app_bench->add_option("--dim", ao.dim, "head_dim")->capture_default_str();
  app_bench->add_option("--kv-heads", ao.kv_heads, "KV heads")->capture_default_str();
  app_bench->add_option("--tokens", ao.tokens, "tokens per sequence per call")->capture_default_str();
  app_bench->add_option("--batch", ao.batch, "sequences")->capture_default_str();
  app_bench->add_option("--bits", akbits, "K and V type: 2, 3, 4, 8, f16, f32 (cuda: not f32)")->capture_default_str();
  app_bench->add_option("--vbits", avbits, "V type if it differs from --bits");
  app_bench->add_option("--dtype", ao.dtype, "input type: f32, f16, bf16")->capture_default_str();
  app_bench->add_option("--warmup", ao.warmup, "untimed calls first")->capture_default_str();
  app_bench->add_option("--repeats", ao.repeats, "timed calls (median reported)")->capture_default_str();
  app_bench->add_option("--read-bw-gbps", ao.read_bw_gbps, "measured memory read bandwidth in GB/s")->capture_default_str();
  add_scale_flag(app_bench, ao.scale_f16);
  app_bench->add_flag("--json", ao.json, "print JSON");
  app_bench->add_flag("--async", ao.async,
                      "cuda: time --repeats asynchronous appends queued back to back (stream time per append; "
                      "the cache holds all of them)");
  app_bench->add_flag("--graph", ao.graph,
                      "cuda: capture one asynchronous append in a CUDA graph and time --repeats replays (stream "
                      "time per replay; implies --async)");

  uint32_t md = 128, mh = 8;
  std::string mk = "4", mv = "4";
  auto* memory = app.add_subcommand("memory", "KV bytes per token per layer for a cache configuration");
  memory->add_option("--dim", md, "head_dim")->capture_default_str();
  memory->add_option("--kv-heads", mh, "KV heads")->capture_default_str();
  memory->add_option("--kbits", mk, "K type: 2, 3, 4, 8, f16, f32")->capture_default_str();
  memory->add_option("--vbits", mv, "V type: 2, 3, 4, 8, f16, f32")->capture_default_str();

  cli::PerplexityCmd pc;
  auto* ppl = app.add_subcommand("perplexity", "Perplexity, KL divergence and top-1 agreement vs the f32 cache on a real model");
  ppl->add_option("--model", pc.model, "GGUF path, or smollm2 / gemma3 (fetched into ~/.cache/tqkv)")->capture_default_str();
  ppl->add_option("--file", pc.file, "text to score")->capture_default_str();
  ppl->add_option("--ctx", pc.ctx, "tokens per chunk (the second half is scored)")->capture_default_str();
  ppl->add_option("--chunks", pc.chunks, "chunks to score (0 = all)")->capture_default_str();
  ppl->add_option("--batch", pc.batch, "tokens per forward call (prefill chunk)")->capture_default_str();
  ppl->add_option("--cache-k", pc.cache_k, "K cache type: f32 f16 q8_0 q4_0 q8_0-rot q4_0-rot tq2 tq3 tq4 tq8")->capture_default_str();
  ppl->add_option("--cache-v", pc.cache_v, "V cache type (same names)")->capture_default_str();
  ppl->add_option("--policy", pc.cache.policy, "per-layer overrides, e.g. first2=tq8,last2=tq8,10-12=f16/tq4");
  ppl->add_option("--k-center", pc.cache.center, "center TurboQuant keys (exact; 1 or 0)")->capture_default_str();
  add_scale_flag(ppl, pc.cache.scale_f16);
  ppl->add_option("--compare", pc.compare, "several cache types in one run, e.g. f16,q4_0-rot,tq8/tq4,tq4");
  ppl->add_option("--threads", pc.threads, "threads (0 = all)")->capture_default_str();
  ppl->add_flag("--json", pc.json, "print JSON");

  cli::GenerateCmd gc;
  auto* gen = app.add_subcommand("generate", "Streaming generation with a chosen KV cache");
  gen->add_option("--model", gc.model, "GGUF path, or smollm2 / gemma3")->capture_default_str();
  gen->add_option("--prompt", gc.prompt, "prompt text")->required();
  gen->add_option("-n,--n-tokens", gc.n_tokens, "tokens to generate")->capture_default_str();
  gen->add_option("--cache-k", gc.cache_k, "K cache type")->capture_default_str();
  gen->add_option("--cache-v", gc.cache_v, "V cache type")->capture_default_str();
  gen->add_option("--policy", gc.cache.policy, "per-layer overrides");
  gen->add_option("--k-center", gc.cache.center, "center TurboQuant keys (exact; 1 or 0)")->capture_default_str();
  add_scale_flag(gen, gc.cache.scale_f16);
  gen->add_option("--temp", gc.temperature, "sampling temperature (0 = greedy)")->capture_default_str();
  gen->add_option("--seed", gc.seed, "sampling seed")->capture_default_str();
  gen->add_option("--threads", gc.threads, "threads (0 = all)")->capture_default_str();
  gen->add_flag("--chat", gc.chat, "wrap the prompt in the model's chat template");

  cli::DemoCmd dc;
  auto* demo = app.add_subcommand("demo", "Fetch SmolLM2 and compare every KV cache type on it, then generate");
  demo->add_option("--model", dc.model, "smollm2, gemma3 or a GGUF path")->capture_default_str();
  demo->add_option("--ctx", dc.ctx, "tokens per chunk")->capture_default_str();
  demo->add_option("--chunks", dc.chunks, "chunks to score")->capture_default_str();
  demo->add_option("--threads", dc.threads, "threads (0 = all)")->capture_default_str();

  cli::DumpLogitsCmd lg;
  auto* dump = app.add_subcommand("dump-logits", "Write every position's logits for a prompt (for cross-checks)");
  dump->add_option("--model", lg.model, "GGUF path, or smollm2 / gemma3")->capture_default_str();
  dump->add_option("--prompt", lg.prompt, "prompt text")->required();
  dump->add_option("--out", lg.out, "raw f32 output file [tokens][vocab]")->required();
  dump->add_option("--cache-k", lg.cache_k, "K cache type")->capture_default_str();
  dump->add_option("--cache-v", lg.cache_v, "V cache type")->capture_default_str();
  dump->add_option("--threads", lg.threads, "threads (0 = all)")->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (codec->parsed()) {
      const auto r = cli::codec_stats(cs);
      if (cs.json) ::fmt::print("{}\n", r.dump(2));
      else cli::print_codec_table({r});
    } else if (attn->parsed()) {
      bo.kbits = cli::parse_type(kbits, "--kbits");
      bo.vbits = cli::parse_type(vbits, "--vbits");
      bo.quiet = bo.json;
      const auto r = cli::bench_attention(bo);
      if (bo.json) ::fmt::print("{}\n", r.dump(2));
      else cli::print_bench_table(r);
    } else if (app_bench->parsed()) {
      ao.kbits = cli::parse_type(akbits, "--bits");
      ao.vbits = app_bench->count("--vbits") ? cli::parse_type(avbits, "--vbits") : ao.kbits;
      const auto r = cli::bench_append(ao);
      if (ao.json) ::fmt::print("{}\n", r.dump(2));
      else cli::print_append_table(r);
    } else if (ppl->parsed()) {
      pc.quiet = pc.json;
      const auto r = cli::perplexity(pc);
      if (pc.json) ::fmt::print("{}\n", r.dump(2));
      else cli::print_perplexity(r);
    } else if (gen->parsed()) {
      cli::generate(gc);
    } else if (dump->parsed()) {
      cli::dump_logits(lg);
    } else if (demo->parsed()) {
      return cli::demo(dc);
    } else if (memory->parsed()) {
      CacheConfig cfg;
      cfg.dims(md, mh);
      cfg.k_type = static_cast<tqkv_type>(cli::parse_type(mk, "--kbits"));
      cfg.v_type = static_cast<tqkv_type>(cli::parse_type(mv, "--vbits"));
      tqkv_memory_info m;
      check(tqkv_config_memory(&cfg, &m));
      CacheConfig f16 = cfg;
      f16.k_type = f16.v_type = TQKV_TYPE_F16;
      tqkv_memory_info mf;
      check(tqkv_config_memory(&f16, &mf));
      ::fmt::print("K {} + V {}: {} bytes per token per layer (K {}, V {}); f16 cache {} ({:.2f}x smaller)\n",
                   cli::type_name(cfg.k_type), cli::type_name(cfg.v_type), m.bytes_per_token, m.k_bytes_per_token,
                   m.v_bytes_per_token, mf.bytes_per_token, double(mf.bytes_per_token) / double(m.bytes_per_token));
    } else {
      return run_default();
    }
  } catch (const Error& e) {
    ::fmt::print(stderr, "tqkv: error: {}\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    ::fmt::print(stderr, "tqkv: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
