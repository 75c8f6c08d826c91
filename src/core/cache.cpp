#include "core/cache.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "core/error.h"
#include "core/format.h"
#include "core/rotation.h"
#include "cpu/encode.h"

namespace tqkv::core {

Counters& counters() {
  static Counters c;
  return c;
}

AlignedBytes aligned_bytes(size_t n) {
  const size_t rounded = (n + 63) / 64 * 64;
  void* p = rounded == 0 ? nullptr : std::aligned_alloc(64, rounded);
  if (rounded != 0 && p == nullptr)
    fail(TQKV_ERROR_OUT_OF_MEMORY, "cache: cannot allocate " + std::to_string(rounded) + " bytes");
  if (p) std::memset(p, 0, rounded);
  return AlignedBytes(static_cast<uint8_t*>(p));
}

static std::string type_list() {
  return "2, 3, 4, 8 (TurboQuant bits), 16 (f16), 32 (f32), 40 (q4_0), 41 (q4_0 rotated), 80 (q8_0), 81 (q8_0 rotated)";
}

void validate_config(const tqkv_cache_config& c) {
  if (!fmt::valid_head_dim(c.head_dim))
    invalid("head_dim: " + std::to_string(c.head_dim) + " is not supported; allowed: 64, 128, 256, 512");
  if (c.num_kv_heads == 0) invalid("num_kv_heads: 0 is invalid; must be >= 1");
  if (c.num_seqs == 0) invalid("num_seqs: 0 is invalid; must be >= 1");
  if (c.capacity == 0 || c.capacity > (1u << 31))
    invalid("capacity: " + std::to_string(c.capacity) + " is invalid; allowed: 1 .. 2147483648");
  if (!fmt::valid_type(c.k_type))
    invalid("k_type: " + std::to_string(int(c.k_type)) + " is not a storage type; allowed: " + type_list());
  if (!fmt::valid_type(c.v_type))
    invalid("v_type: " + std::to_string(int(c.v_type)) + " is not a storage type; allowed: " + type_list());
  if (c.layout != TQKV_LAYOUT_LINEAR && c.layout != TQKV_LAYOUT_RING)
    invalid("layout: " + std::to_string(int(c.layout)) + " is invalid; allowed: 0 (linear), 1 (ring)");
  if (c.codebook != TQKV_CODEBOOK_EXACT && c.codebook != TQKV_CODEBOOK_GAUSSIAN)
    invalid("codebook: " + std::to_string(int(c.codebook)) + " is invalid; allowed: 0 (exact), 1 (gaussian)");
  if (c.scale_mode != TQKV_SCALE_NORM && c.scale_mode != TQKV_SCALE_LSQ)
    invalid("scale_mode: " + std::to_string(int(c.scale_mode)) + " is invalid; allowed: 0 (norm), 1 (lsq)");
  if (c.scale_dtype != TQKV_SCALE_F32 && c.scale_dtype != TQKV_SCALE_F16)
    invalid("scale_dtype: " + std::to_string(int(c.scale_dtype)) + " is invalid; allowed: 0 (f32), 1 (f16)");
  if (c.backend != TQKV_BACKEND_CPU && c.backend != TQKV_BACKEND_CUDA)
    invalid("backend: " + std::to_string(int(c.backend)) + " is invalid; allowed: 0 (cpu), 1 (cuda)");
  if (c.k_center != TQKV_CENTER_NONE && c.k_center != TQKV_CENTER_FIRST_APPEND)
    invalid("k_center: " + std::to_string(int(c.k_center)) + " is invalid; allowed: 0 (none), 1 (first append)");
}

tqkv_memory_info memory_for(const tqkv_cache_config& c) {
  validate_config(c);
  const bool f16 = c.scale_dtype == TQKV_SCALE_F16;
  tqkv_memory_info m{};
  m.k_bytes_per_token = uint64_t(c.num_kv_heads) * (fmt::row_stride(c.k_type, c.head_dim) + fmt::scale_bytes(c.k_type, f16));
  m.v_bytes_per_token = uint64_t(c.num_kv_heads) * (fmt::row_stride(c.v_type, c.head_dim) + fmt::scale_bytes(c.v_type, f16));
  m.bytes_per_token = m.k_bytes_per_token + m.v_bytes_per_token;
  const long double total = (long double)m.bytes_per_token * c.capacity * c.num_seqs;
  if (total > (long double)std::numeric_limits<uint64_t>::max() / 2)
    fail(TQKV_ERROR_OUT_OF_MEMORY, "capacity: " + std::to_string(c.capacity) + " x num_seqs " +
                                       std::to_string(c.num_seqs) + " needs more memory than can be addressed");
  m.total_bytes = m.bytes_per_token * c.capacity * c.num_seqs;
  if (c.k_center != TQKV_CENTER_NONE && !fmt::is_dense(c.k_type))  // one key mean per sequence and KV head
    m.total_bytes += uint64_t(c.num_seqs) * c.num_kv_heads * c.head_dim * sizeof(float);
  return m;
}

static void init_plane(Plane& p, uint32_t type, const tqkv_cache_config& c, const float* signs, size_t rows,
                       bool host) {
  p.type = type;
  p.stride = fmt::row_stride(type, c.head_dim);
  p.scale_f16 = c.scale_dtype == TQKV_SCALE_F16;
  p.codec.type = type;
  p.codec.d = c.head_dim;
  p.codec.lsq = c.scale_mode == TQKV_SCALE_LSQ;
  p.codec.scale_f16 = p.scale_f16;
  if (fmt::is_tq(type)) p.codec.cb = codebook(type, c.head_dim, static_cast<CodebookKind>(c.codebook));
  if (fmt::is_rotated(type)) p.codec.signs = signs;
  if (!host) return;
  p.data = aligned_bytes(rows * p.stride);
  p.scales = aligned_bytes(rows * fmt::scale_bytes(type, p.scale_f16));
}

Cache::Cache(const tqkv_cache_config& cfg, bool host_storage) : cfg_(cfg), host_storage_(host_storage) {
  memory_for(cfg);  // validates and checks the size
  signs_ = rotation_signs(cfg.seed, cfg.head_dim);
  const size_t rows = size_t(cfg.num_seqs) * cfg.num_kv_heads * cfg.capacity;
  init_plane(k_, cfg.k_type, cfg, signs_.data(), rows, host_storage);
  init_plane(v_, cfg.v_type, cfg, signs_.data(), rows, host_storage);
  lengths_.assign(cfg.num_seqs, 0);
  has_center_.assign(cfg.num_seqs, 0);
}

bool Cache::centers_k() const { return !fmt::is_dense(k_.type); }

const float* Cache::k_center(uint32_t seq) const {
  check_seq(seq, "k_center");
  return has_center_[seq] ? centers_.data() + size_t(seq) * cfg_.num_kv_heads * cfg_.head_dim : nullptr;
}

void Cache::set_k_center(uint32_t seq, const float* mu) {
  check_seq(seq, "set_k_center");
  if (mu == nullptr) invalid("mu: NULL; must point to num_kv_heads * head_dim floats");
  if (lengths_[seq] != 0)
    invalid("set_k_center: sequence " + std::to_string(seq) + " holds " + std::to_string(lengths_[seq]) +
            " positions; the key mean can only be set while it is empty");
  const size_t n = size_t(cfg_.num_kv_heads) * cfg_.head_dim;
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(mu[i])) fail(TQKV_ERROR_NON_FINITE, "mu: non-finite value at index " + std::to_string(i));
  if (!centers_k()) return;
  if (centers_.empty()) centers_.assign(size_t(cfg_.num_seqs) * n, 0.0f);
  std::copy(mu, mu + n, centers_.begin() + std::ptrdiff_t(size_t(seq) * n));
  has_center_[seq] = 1;
}

bool Cache::defines_center(uint32_t seq) const {
  return centers_k() && !has_center_[seq] && cfg_.k_center == TQKV_CENTER_FIRST_APPEND && lengths_[seq] == 0;
}

void Cache::advance(uint32_t seq, uint32_t n_tokens) {
  check_seq(seq, "advance");
  check_room(seq, n_tokens);
  lengths_[seq] += n_tokens;
  counters().rows_encoded += uint64_t(n_tokens) * cfg_.num_kv_heads * 2;
}

void Cache::restore(uint32_t seq, int64_t length, const float* mu) {
  check_seq(seq, "restore");
  if (length < 0 || (!ring() && length > int64_t(cfg_.capacity)))
    invalid("length: " + std::to_string(length) + " does not fit capacity " + std::to_string(cfg_.capacity));
  lengths_[seq] = 0;
  has_center_[seq] = 0;
  if (mu) set_k_center(seq, mu);
  lengths_[seq] = length;
}

void Cache::check_seq(uint32_t seq, const char* what) const {
  if (seq >= cfg_.num_seqs)
    invalid(std::string(what) + ": seq " + std::to_string(seq) + " is out of range; allowed: 0 .. " +
            std::to_string(cfg_.num_seqs - 1));
}

int64_t Cache::length(uint32_t seq) const {
  check_seq(seq, "length");
  return lengths_[seq];
}

int64_t Cache::first_resident(uint32_t seq) const {
  const int64_t len = length(seq);
  return ring() && len > cfg_.capacity ? len - cfg_.capacity : 0;
}

const uint8_t* Cache::row(int which, uint32_t seq, uint32_t kv_head, uint32_t slot) const {
  const Plane& p = plane(which);
  return p.data.get() + fmt::row_index(seq, kv_head, slot, cfg_.num_kv_heads, cfg_.capacity) * p.stride;
}

const void* Cache::scale_ptr(int which, uint32_t seq, uint32_t kv_head, uint32_t slot) const {
  const Plane& p = plane(which);
  if (!fmt::is_tq(p.type)) return nullptr;
  return p.scales.get() +
         fmt::row_index(seq, kv_head, slot, cfg_.num_kv_heads, cfg_.capacity) * fmt::scale_bytes(p.type, p.scale_f16);
}

void Cache::check_room(uint32_t seq, uint32_t n_tokens) const {
  if (ring()) return;
  const int64_t len = lengths_[seq];
  if (len + n_tokens > int64_t(cfg_.capacity))
    fail(TQKV_ERROR_CAPACITY, "append: sequence " + std::to_string(seq) + " holds " + std::to_string(len) +
                                  " positions; appending " + std::to_string(n_tokens) + " would need position " +
                                  std::to_string(len + n_tokens - 1) + " but capacity is " +
                                  std::to_string(cfg_.capacity) + " (linear layout)");
}

struct Cache::Encoded {
  uint32_t n = 0;
  AlignedBytes k_rows, v_rows, k_scales, v_scales;  // [n][kv_head] rows
  std::vector<float> new_center;                    // set when this append defines the key mean
};

static void check_finite(const float* x, size_t n, uint32_t hkv, uint32_t d, const char* which, uint32_t seq) {
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) {
      const size_t tok = i / (size_t(hkv) * d), head = (i / d) % hkv, coord = i % d;
      fail(TQKV_ERROR_NON_FINITE, std::string(which) + ": non-finite value " + std::to_string(x[i]) +
                                      " at token " + std::to_string(tok) + ", kv head " + std::to_string(head) +
                                      ", coordinate " + std::to_string(coord) + " of sequence " +
                                      std::to_string(seq) + "; nothing was appended");
    }
  }
}

Cache::Encoded Cache::encode(uint32_t n, tqkv_dtype dtype, const void* k, const void* v, uint32_t seq) const {
  const size_t rows = size_t(n) * cfg_.num_kv_heads;
  const size_t vals = rows * cfg_.head_dim;
  std::vector<float> buf(vals);
  Encoded e;
  e.n = n;
  const char* names[2] = {"k", "v"};
  const void* src[2] = {k, v};
  const Plane* planes[2] = {&k_, &v_};
  AlignedBytes* out_rows[2] = {&e.k_rows, &e.v_rows};
  AlignedBytes* out_scales[2] = {&e.k_scales, &e.v_scales};
  for (int w = 0; w < 2; ++w) {
    cpu::to_f32(dtype, src[w], vals, buf.data());
    check_finite(buf.data(), vals, cfg_.num_kv_heads, cfg_.head_dim, names[w], seq);
    const Plane& p = *planes[w];
    if (w == 0 && centers_k()) {
      // The first append of a sequence defines its key mean when k_center asks for it.
      const float* mu = has_center_[seq] ? centers_.data() + size_t(seq) * cfg_.num_kv_heads * cfg_.head_dim : nullptr;
      if (!mu && cfg_.k_center == TQKV_CENTER_FIRST_APPEND && lengths_[seq] == 0) {
        const size_t per_tok = size_t(cfg_.num_kv_heads) * cfg_.head_dim;
        std::vector<double> sum(per_tok, 0.0);
        for (uint32_t t = 0; t < n; ++t)
          for (size_t i = 0; i < per_tok; ++i) sum[i] += buf[size_t(t) * per_tok + i];
        e.new_center.resize(per_tok);
        for (size_t i = 0; i < per_tok; ++i) e.new_center[i] = static_cast<float>(sum[i] / n);
        mu = e.new_center.data();
      }
      if (mu)
        for (size_t i = 0; i < vals; ++i) buf[i] -= mu[i % (size_t(cfg_.num_kv_heads) * cfg_.head_dim)];
    }
    *out_rows[w] = aligned_bytes(rows * p.stride);
    *out_scales[w] = aligned_bytes(rows * fmt::scale_bytes(p.type, p.scale_f16));
    size_t bad = rows;
    try {
      cpu::encode_rows(p.codec, buf.data(), rows, out_rows[w]->get(), out_scales[w]->get(), &bad);
    } catch (const Error& err) {
      // Rows are [token][kv head]; the CUDA backend names the same token, head and sequence.
      const std::string at = bad < rows ? " at token " + std::to_string(bad / cfg_.num_kv_heads) + ", kv head " +
                                              std::to_string(bad % cfg_.num_kv_heads) + " of sequence " +
                                              std::to_string(seq)
                                        : "";
      fail(err.status(), std::string(names[w]) + ": " + err.what() + at + "; nothing was appended");
    }
  }
  return e;
}

void Cache::commit(uint32_t seq, const Encoded& e) {
  const uint32_t hkv = cfg_.num_kv_heads;
  const Plane* planes[2] = {&k_, &v_};
  const AlignedBytes* rows[2] = {&e.k_rows, &e.v_rows};
  const AlignedBytes* scales[2] = {&e.k_scales, &e.v_scales};
  for (int w = 0; w < 2; ++w) {
    const Plane& p = *planes[w];
    const size_t sb = fmt::scale_bytes(p.type, p.scale_f16);
    for (uint32_t t = 0; t < e.n; ++t) {
      const uint32_t slot = slot_of(lengths_[seq] + t);
      for (uint32_t h = 0; h < hkv; ++h) {
        const size_t src = size_t(t) * hkv + h;
        const size_t dst = fmt::row_index(seq, h, slot, hkv, cfg_.capacity);
        std::memcpy(p.data.get() + dst * p.stride, rows[w]->get() + src * p.stride, p.stride);
        if (sb) std::memcpy(p.scales.get() + dst * sb, scales[w]->get() + src * sb, sb);
      }
    }
  }
  if (!e.new_center.empty()) set_k_center(seq, e.new_center.data());
  lengths_[seq] += e.n;
  counters().rows_encoded += uint64_t(e.n) * hkv * 2;
}

static void check_append_args(uint32_t n_tokens, tqkv_dtype dtype, const void* k, const void* v) {
  if (dtype != TQKV_DTYPE_F32 && dtype != TQKV_DTYPE_F16 && dtype != TQKV_DTYPE_BF16)
    invalid("dtype: " + std::to_string(int(dtype)) + " is not an input type; allowed: 0 (f32), 1 (f16), 2 (bf16)");
  if (n_tokens > 0 && k == nullptr) invalid("k: NULL; must point to the new keys");
  if (n_tokens > 0 && v == nullptr) invalid("v: NULL; must point to the new values");
}

void Cache::append(uint32_t seq, uint32_t n_tokens, tqkv_dtype dtype, const void* k, const void* v) {
  if (!host_storage_) fail(TQKV_ERROR_INTERNAL, "cache: rows live on the device; the CUDA backend must handle this call");
  check_seq(seq, "append");
  check_append_args(n_tokens, dtype, k, v);
  if (n_tokens == 0) return;
  check_room(seq, n_tokens);
  commit(seq, encode(n_tokens, dtype, k, v, seq));
}

void Cache::append_batch(const uint32_t* counts, tqkv_dtype dtype, const void* k, const void* v) {
  if (!host_storage_) fail(TQKV_ERROR_INTERNAL, "cache: rows live on the device; the CUDA backend must handle this call");
  if (counts == nullptr) invalid("counts: NULL; must point to num_seqs token counts");
  uint64_t total = 0;
  for (uint32_t s = 0; s < cfg_.num_seqs; ++s) total += counts[s];
  check_append_args(total > 0 ? 1 : 0, dtype, k, v);
  for (uint32_t s = 0; s < cfg_.num_seqs; ++s) check_room(s, counts[s]);
  const size_t elem = dtype == TQKV_DTYPE_F32 ? 4 : 2;
  const size_t per_token = size_t(cfg_.num_kv_heads) * cfg_.head_dim * elem;
  std::vector<Encoded> enc;
  enc.reserve(cfg_.num_seqs);
  size_t offset = 0;
  for (uint32_t s = 0; s < cfg_.num_seqs; ++s) {  // encode everything before committing anything
    enc.push_back(encode(counts[s], dtype, static_cast<const uint8_t*>(k) + offset,
                         static_cast<const uint8_t*>(v) + offset, s));
    offset += size_t(counts[s]) * per_token;
  }
  for (uint32_t s = 0; s < cfg_.num_seqs; ++s)
    if (counts[s]) commit(s, enc[s]);
}

void Cache::reset(uint32_t seq) {
  check_seq(seq, "reset");
  lengths_[seq] = 0;
  has_center_[seq] = 0;
}

void Cache::read(uint32_t seq, int which, int64_t first, uint32_t n, float* out) const {
  if (!host_storage_) fail(TQKV_ERROR_INTERNAL, "cache: rows live on the device; the CUDA backend must handle this call");
  check_seq(seq, "read");
  if (which != 0 && which != 1) invalid("which: " + std::to_string(which) + " is invalid; allowed: 0 (K), 1 (V)");
  if (n > 0 && out == nullptr) invalid("out: NULL; must point to n * num_kv_heads * head_dim floats");
  const int64_t lo = first_resident(seq), len = lengths_[seq];
  if (first < lo || first + int64_t(n) > len)
    invalid("first: positions " + std::to_string(first) + " .. " + std::to_string(first + int64_t(n) - 1) +
            " are not all resident; sequence " + std::to_string(seq) + " holds " + std::to_string(lo) + " .. " +
            std::to_string(len - 1));
  const Plane& p = plane(which);
  const uint32_t d = cfg_.head_dim;
  std::vector<double> x(d);
  for (uint32_t t = 0; t < n; ++t) {
    for (uint32_t h = 0; h < cfg_.num_kv_heads; ++h) {
      const uint32_t slot = slot_of(first + t);
      const void* sp = scale_ptr(which, seq, h, slot);
      const float s = sp ? load_scale(sp, 0, p.scale_f16) : 0.0f;
      decode_row(p.codec, row(which, seq, h, slot), s, x.data());
      float* o = out + (size_t(t) * cfg_.num_kv_heads + h) * d;
      const float* mu = which == 0 ? k_center(seq) : nullptr;
      for (uint32_t i = 0; i < d; ++i) o[i] = static_cast<float>(x[i] + (mu ? double(mu[size_t(h) * d + i]) : 0.0));
    }
  }
}

}  // namespace tqkv::core
