// DeviceCache::append and DeviceCache::sync: validation, the per-append tables, the launches of
// cuda/encode.h, and the host side of a failed append.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/cache.h"
#include "core/error.h"
#include "core/format.h"
#include "cpu/encode.h"
#include "cuda/check.cuh"
#include "cuda/device_cache.h"
#include "cuda/encode.h"

namespace tqkv::cuda {

namespace {

size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

float input_value(const void* base, tqkv_dtype dtype, uint64_t i) {
  // Error path only: one element of the caller's input, wherever it lives.
  const size_t es = dtype == TQKV_DTYPE_F32 ? 4 : 2;
  uint8_t b[4] = {0, 0, 0, 0};
  const uint8_t* src = static_cast<const uint8_t*>(base) + i * es;
  if (on_device(base)) {
    if (cudaMemcpy(b, src, es, cudaMemcpyDeviceToHost) != cudaSuccess) {
      (void)cudaGetLastError();
      return std::nanf("");
    }
  } else {
    std::memcpy(b, src, es);
  }
  float f = 0;
  cpu::to_f32(dtype, b, 1, &f);
  return f;
}

// The status of a failed append: a linear cache was full, or a value could not be stored.
tqkv_status status_of(const enc::State& st) {
  return st.kind == enc::kCapacity ? TQKV_ERROR_CAPACITY : TQKV_ERROR_NON_FINITE;
}

// The message of a failed append. value: the offending input value when the caller still has
// the input (a synchronous append), else NaN and left out; tail: what happened to the cache.
std::string describe(const enc::State& st, uint32_t d, bool has_value, float value, const std::string& tail) {
  const std::string name = st.w == 0 ? "k" : "v";
  const std::string tok = std::to_string(st.token), head = std::to_string(st.head),
                    seq = std::to_string(st.seq);
  const std::string at = " at token " + tok + ", kv head " + head + ", coordinate " + std::to_string(st.coord) +
                         " of sequence " + seq;
  const std::string row = " of token " + tok + ", kv head " + head + " of sequence " + seq;
  const std::string val = has_value ? " " + std::to_string(value) : "";
  switch (st.kind) {
    case enc::kNonFinite: return name + ": non-finite value" + val + at + tail;
    case enc::kDenseOverflow:
      return name + ": value" + val + at + " overflows the f16 cache (largest finite f16 is 65504)" + tail;
    case enc::kScaleF16:
      return name + ": row scale" + row + " overflows the f16 scale type (largest 65504); use f32 scales" + tail;
    case enc::kRotation: return name + ": row" + row + " " + core::rotation_overflow_message(d) + tail;
    case enc::kCapacity:
      return "append: token " + tok + " of sequence " + seq + " would be position " + std::to_string(st.flat) +
             ", past the capacity (linear layout)" + tail;
    default: return name + ": row scale" + row + " is not representable as f32" + tail;
  }
}

}  // namespace

struct DeviceCache::SyncContext {
  unsigned serial;
  tqkv_dtype dtype;
  const void* k;
  const void* v;
};

void DeviceCache::append(core::Cache& meta, const uint32_t* counts, tqkv_dtype dtype, const void* k, const void* v,
                         bool async) {
  DeviceScope scope(device_);
  if (!async && capturing(stream_))  // before sync(), whose wait would break the capture
    fail(TQKV_ERROR_UNSUPPORTED, "append: a synchronous append waits for its stream, which graph capture does not "
                                 "allow; use tqkv_cache_append_batch_async");
  if (!async) sync(meta);
  // Validation in the order of core::Cache::append_batch, before anything is enqueued.
  if (counts == nullptr) invalid("counts: NULL; must point to num_seqs token counts");
  uint64_t total = 0;
  for (uint32_t s = 0; s < seqs_; ++s) total += counts[s];
  if (dtype != TQKV_DTYPE_F32 && dtype != TQKV_DTYPE_F16 && dtype != TQKV_DTYPE_BF16)
    invalid("dtype: " + std::to_string(int(dtype)) + " is not an input type; allowed: 0 (f32), 1 (f16), 2 (bf16)");
  if (total > 0 && k == nullptr) invalid("k: NULL; must point to the new keys");
  if (total > 0 && v == nullptr) invalid("v: NULL; must point to the new values");
  for (uint32_t s = 0; s < seqs_; ++s) meta.check_room(s, counts[s]);
  if (total == 0) return;
  if (total * hkv_ * std::max<size_t>(1, std::max(k_.stride, v_.stride) / 16) >= (1ull << 31))
    fail(TQKV_ERROR_UNSUPPORTED, "append: " + std::to_string(total) + " tokens x " + std::to_string(hkv_) +
                                     " kv heads is too much for one call (2^31 16-byte row pieces); split it");
  // One pointer lookup each (cudaPointerGetAttributes costs about a microsecond).
  const bool k_dev = locate(k, device_, "k") != kHostMemory, v_dev = locate(v, device_, "v") != kHostMemory;
  bool graph = false;  // captured into a CUDA graph: runs only when the graph is replayed
  if (async) {
    if (!k_dev) invalid("k: host memory; an asynchronous append reads device memory (tqkv_cache_append_batch copies host input)");
    if (!v_dev) invalid("v: host memory; an asynchronous append reads device memory (tqkv_cache_append_batch copies host input)");
    graph = capturing(stream_);
    if (graph && seqs_ > enc::kTabSeqs)
      fail(TQKV_ERROR_UNSUPPORTED, "append: a captured append takes at most " + std::to_string(enc::kTabSeqs) +
                                       " sequences (num_seqs is " + std::to_string(seqs_) + "); append outside the capture");
    if (graph && fmt::is_tq(k_.type) && meta.config().k_center == TQKV_CENTER_FIRST_APPEND)
      fail(TQKV_ERROR_UNSUPPORTED, "append: k_center FIRST_APPEND: a first append replayed from a graph would have to "
                                   "define the key mean, which a captured append cannot; use k_center NONE, or "
                                   "tqkv_cache_set_k_center, or append outside the capture");
  }

  auto st = static_cast<cudaStream_t>(stream_);
  const size_t es = dtype == TQKV_DTYPE_F32 ? 4 : 2;
  const uint64_t R = total * hkv_;
  const size_t in_bytes = size_t(R) * d_ * es;
  const uint32_t cols = hkv_ * d_;

  // Per-append tables: token offsets and key-mean sources (the rows' positions come from the
  // device lengths when the kernels run).
  std::vector<uint64_t> prefix(seqs_ + 1, 0);
  std::vector<int32_t> center(seqs_, -1), def_seq;
  uint64_t max_def_tokens = 0;
  // No slot written holds a live row (cuda/encode.h). The host lengths miss appends replayed
  // from graphs, so after one a ring always takes the staged path.
  bool direct = !(meta.ring() && (graph || graph_appends_));
  // A captured append encodes against the stored key means as they are at replay, unless none
  // is set at capture: then it skips centering (faster), and set_k_center is refused afterwards.
  bool graph_centered = false;
  for (uint32_t s = 0; s < seqs_ && graph; ++s) graph_centered = graph_centered || meta.k_center(s) != nullptr;
  for (uint32_t s = 0; s < seqs_; ++s) {
    prefix[s + 1] = prefix[s] + counts[s];
    if (counts[s] && meta.ring() && meta.length(s) + int64_t(counts[s]) > int64_t(cap_)) direct = false;
    if (!fmt::is_tq(k_.type)) continue;  // dense K is stored as it is
    // A centered graph uses the stored mean whatever it is at replay (zero when none: the same bytes).
    if (graph ? graph_centered : meta.k_center(s) != nullptr) {
      center[s] = -2;
    } else if (counts[s] > 0 && meta.defines_center(s)) {
      center[s] = static_cast<int32_t>(def_seq.size());
      def_seq.push_back(static_cast<int32_t>(s));
      max_def_tokens = std::max<uint64_t>(max_def_tokens, counts[s]);
    }
  }
  const uint32_t ndef = static_cast<uint32_t>(def_seq.size());
  const uint32_t chunks = static_cast<uint32_t>((max_def_tokens + enc::kMeanChunk - 1) / enc::kMeanChunk);
  if (chunks > 65535) fail(TQKV_ERROR_UNSUPPORTED, "append: a first append of more than 16776960 tokens to one "
                                                   "sequence with k_center FIRST_APPEND is not supported on CUDA");
  bool centered = false;
  for (uint32_t s = 0; s < seqs_; ++s) centered = centered || center[s] != -1;

  enc::Tables tabs;
  tabs.inline_tabs = seqs_ <= enc::kTabSeqs;
  if (tabs.inline_tabs) {
    std::copy(prefix.begin(), prefix.end(), tabs.in.prefix);
    std::copy(center.begin(), center.end(), tabs.in.center);
    std::copy(def_seq.begin(), def_seq.end(), tabs.in.def_seq);
  }

  // staging_ layout; every part 256-byte aligned. Input in host memory, or device memory not
  // aligned for vector loads, is copied in first.
  const bool copy_in[2] = {!k_dev || reinterpret_cast<uintptr_t>(k) % 16 != 0,
                           !v_dev || reinterpret_cast<uintptr_t>(v) % 16 != 0};
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off = align_up(off + bytes, 256);
    return at;
  };
  const size_t o_in[2] = {copy_in[0] ? take(in_bytes) : 0, copy_in[1] ? take(in_bytes) : 0};
  std::vector<uint8_t> tab;  // the tables for device memory, when they do not fit the parameters
  auto put = [&](const void* src, size_t bytes) {
    const size_t at = align_up(tab.size(), 16);
    tab.resize(at + bytes);
    if (bytes) std::memcpy(tab.data() + at, src, bytes);
    return at;
  };
  size_t t_prefix = 0, t_center = 0, t_def = 0;
  if (!tabs.inline_tabs) {
    t_prefix = put(prefix.data(), prefix.size() * sizeof(uint64_t));
    t_center = put(center.data(), center.size() * sizeof(int32_t));
    t_def = put(def_seq.data(), def_seq.size() * sizeof(int32_t));
  }
  const size_t o_tab = take(tab.size());
  const size_t o_partial = take(size_t(std::min(ndef, 65535u)) * chunks * cols * sizeof(double));
  const size_t o_mu = take(size_t(ndef) * cols * sizeof(float));
  const DevPlane* planes[2] = {&k_, &v_};
  size_t o_rows[2] = {0, 0}, o_scales[2] = {0, 0};
  // A ring reserves the scratch even when this append writes in place: a later append of the
  // same shape captured into a graph takes the staged path and cannot grow the staging then.
  if (!direct || meta.ring())
    for (int w = 0; w < 2; ++w) {
      o_rows[w] = take(size_t(R) * planes[w]->stride);
      o_scales[w] = take(size_t(R) * fmt::scale_bytes(planes[w]->type, planes[w]->scale_f16));
    }
  if (off > staging_bytes_) {
    if (graph)
      fail(TQKV_ERROR_UNSUPPORTED, "append: this captured append needs " + std::to_string(off) +
                                       " bytes of device staging and the cache has " + std::to_string(staging_bytes_) +
                                       "; it cannot grow during capture: make one asynchronous append of the same "
                                       "shape before capturing");
    TQKV_CUDA_CHECK(cudaStreamSynchronize(st));  // earlier work on the stream may still read it
    // A graph with a captured append may hold the old staging in its kernels' parameters.
    grow(staging_, staging_bytes_, off, false, "append staging", graph_appends_);
  }
  uint8_t* stage = static_cast<uint8_t*>(staging_);

  // 0 means "none" on the device, kGraphSerial "replayed from a graph".
  unsigned serial = kGraphSerial;
  if (!graph) {
    serial = ++serial_;
    if (serial == 0 || serial == kGraphSerial) serial = serial_ = 1;
  }
  try {
    const void* in[2] = {k, v};
    for (int w = 0; w < 2; ++w)
      if (copy_in[w]) {
        TQKV_CUDA_CHECK(cudaMemcpyAsync(stage + o_in[w], in[w], in_bytes, cudaMemcpyDefault, st));
        in[w] = stage + o_in[w];
      }
    if (!tabs.inline_tabs) {
      // Pinned, so the copy is asynchronous; the previous one from this buffer must be done.
      TQKV_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(stage_event_)));
      uint8_t* host = host_stage(tab.size());
      std::memcpy(host, tab.data(), tab.size());
      TQKV_CUDA_CHECK(cudaMemcpyAsync(stage + o_tab, host, tab.size(), cudaMemcpyHostToDevice, st));
      TQKV_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(stage_event_), st));
      tabs.prefix = reinterpret_cast<const uint64_t*>(stage + o_tab + t_prefix);
      tabs.center = reinterpret_cast<const int32_t*>(stage + o_tab + t_center);
      tabs.def_seq = reinterpret_cast<const int32_t*>(stage + o_tab + t_def);
    }
    auto* d_mu = reinterpret_cast<float*>(stage + o_mu);
    if (ndef > 0) {
      enc::MeanArgs m;
      m.k = in[0];
      m.tabs = tabs;
      m.ndef = ndef;
      m.cols = cols;
      m.chunks = chunks;
      m.partial = reinterpret_cast<double*>(stage + o_partial);
      m.mu = d_mu;
      enc::launch_means(dtype, m, st);
    }

    enc::Finish fin;
    fin.state = state_;
    fin.serial = serial;
    fin.rows2 = graph ? 0 : R * 2;  // replays are not counted on the host
    fin.lengths = lengths_;
    fin.centers = centers_;
    fin.mu_new = d_mu;
    fin.ndef = ndef;
    fin.cols = cols;
    fin.d = d_;
    enc::EncodeArgs ea;
    ea.tabs = tabs;
    ea.fin = fin;
    ea.rows = R;
    ea.vpl = enc::values_per_lane(d_, dtype, R, sm_count_);
    const uint32_t rpw = enc::rows_per_warp(d_, ea.vpl);
    ea.tasks = (R + rpw - 1) / rpw;
    ea.hkv = hkv_;
    if (hkv_ > 1) {  // r / hkv = __umulhi(r, mul) >> shift for r < 2^31 (division by invariant integers)
      uint32_t l = 0;
      while ((1u << l) < hkv_) ++l;
      const uint32_t p = 31 + l;
      ea.hkv_mul = static_cast<uint32_t>(((1ull << p) + hkv_ - 1) / hkv_);
      ea.hkv_shift = p - 32;
    }
    ea.num_seqs = seqs_;
    ea.cap = cap_;
    ea.ring = meta.ring();
    ea.direct = direct;
    ea.centered = centered;
    ea.centers = centers_;
    std::copy(sign_bits_, sign_bits_ + 16, ea.sign_bits);
    ea.inv_sqrt_d = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d_)));
    ea.sqrt_d = std::sqrt(static_cast<double>(d_));
    for (int w = 0; w < 2; ++w) {
      const DevPlane& p = *planes[w];
      ea.in[w] = in[w];
      enc::PlaneArgs& pa = ea.plane[w];
      pa.bits = fmt::is_tq(p.type) ? p.type : 0;
      pa.stride = static_cast<uint32_t>(p.stride);
      pa.sb = static_cast<uint32_t>(fmt::scale_bytes(p.type, p.scale_f16));
      pa.lsq = p.lsq;
      pa.scale_f16 = p.scale_f16;
      pa.boundaries = p.boundaries;
      pa.centroids = p.centroids;
      pa.lut = p.lut;
      pa.lut_size = p.lut_size;
      pa.lut_off = p.lut_off;
      pa.lut_scale = p.lut_scale;
      pa.dst_rows = p.data;
      pa.dst_scales = static_cast<uint8_t*>(p.scales);
      pa.rows = direct ? pa.dst_rows : stage + o_rows[w];
      pa.scales = direct ? pa.dst_scales : stage + o_scales[w];
    }
    enc::launch_encode(d_, dtype, ea, sm_count_, st);
    if (!direct) {
      enc::CommitArgs ca;
      ca.plane[0] = ea.plane[0];
      ca.plane[1] = ea.plane[1];
      ca.tabs = tabs;
      ca.fin = fin;
      ca.nrows = static_cast<uint32_t>(R);
      ca.hkv = hkv_;
      ca.cap = cap_;
      ca.num_seqs = seqs_;
      ca.ring = meta.ring();
      enc::launch_commit(ca, sm_count_, st);
    }
  } catch (...) {
    if (graph) throw;  // nothing ran; waiting now would break the caller's capture
    // Nothing may still be reading host memory this call handed over once it returns. A launch
    // that failed half way may leave error keys or a ticket behind: the next append must start
    // clean (a recorded failure stays).
    (void)cudaStreamSynchronize(st);
    (void)cudaGetLastError();
    enc::State now{};
    if (cudaMemcpy(&now, state_, sizeof now, cudaMemcpyDeviceToHost) == cudaSuccess) {
      now.flags[0] = now.flags[1] = enc::kNoError;
      now.ticket = 0;
      (void)cudaMemcpy(state_, &now, sizeof now, cudaMemcpyHostToDevice);
    }
    (void)cudaGetLastError();
    throw;
  }

  // Replays are counted by the device alone; sync() brings the host lengths up to date.
  if (graph) {
    graph_appends_ = true;
    if (!graph_centered && fmt::is_tq(k_.type)) graph_uncentered_ = true;
    return;
  }
  // The host counts the append now; sync() takes it back if the device refused it.
  for (uint32_t i = 0; i < ndef; ++i) {
    const std::vector<float> placeholder(cols, 0.0f);  // the device's mean is fetched by sync()
    meta.set_k_center(uint32_t(def_seq[i]), placeholder.data());
    center_serial_[size_t(def_seq[i])] = serial;
  }
  for (uint32_t s = 0; s < seqs_; ++s)
    if (counts[s]) meta.advance(s, counts[s]);
  core::counters().cuda_rows_encoded += R * 2;
  if (!async) {
    const SyncContext ctx{serial, dtype, k, v};
    sync_impl(meta, &ctx);
  }
}

void DeviceCache::sync(core::Cache& meta) {
  DeviceScope scope(device_);
  sync_impl(meta, nullptr);
}

std::vector<int64_t> DeviceCache::device_lengths() const {
  std::vector<int64_t> len(seqs_);
  TQKV_CUDA_CHECK(cudaMemcpy(len.data(), lengths_, len.size() * sizeof(int64_t), cudaMemcpyDeviceToHost));
  return len;
}

std::vector<float> DeviceCache::device_centers() const {
  bool any = false;
  for (unsigned c : center_serial_) any = any || c != 0;
  if (!any) return {};
  std::vector<float> mu(size_t(seqs_) * hkv_ * d_);
  TQKV_CUDA_CHECK(cudaMemcpy(mu.data(), centers_, mu.size() * sizeof(float), cudaMemcpyDeviceToHost));
  return mu;
}

void DeviceCache::check_no_failure() const {
  enc::State rec{};
  TQKV_CUDA_CHECK(cudaMemcpy(&rec, state_, sizeof rec, cudaMemcpyDeviceToHost));
  if (rec.failed != 0)
    fail(status_of(rec),
         describe(rec, d_, false, 0.0f, "; an asynchronous append failed there and no tqkv_cache_sync has reported it "
                                    "yet: call it, which also brings the cache back to what it held before"));
}

void DeviceCache::sync_impl(core::Cache& meta, const SyncContext* ctx) {
  if (capturing(stream_))  // waiting would invalidate the caller's capture
    fail(TQKV_ERROR_UNSUPPORTED, "cache: this call waits for the cache's stream, which is being captured into a CUDA "
                                 "graph; make it outside the capture");
  auto st = static_cast<cudaStream_t>(stream_);
  if (serial_ == synced_ && !graph_appends_) {  // no append since the last look
    TQKV_CUDA_CHECK(cudaStreamSynchronize(st));
    return;
  }
  auto* rec_host = reinterpret_cast<enc::State*>(host_stage(sizeof(enc::State)));
  TQKV_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(stage_event_)));
  TQKV_CUDA_CHECK(cudaMemcpyAsync(rec_host, state_, sizeof(enc::State), cudaMemcpyDeviceToHost, st));
  TQKV_CUDA_CHECK(cudaStreamSynchronize(st));
  const enc::State rec = *rec_host;
  const std::vector<float> mu = device_centers();
  const unsigned base = synced_, made = serial_ - synced_;
  synced_ = serial_;

  // Bring the host bookkeeping to the device's: key means that asynchronous appends defined
  // (unless taken back), and the device lengths after a failure (the device skipped the failed
  // append and every later one) or after graph replays (which the host never counted). Serial
  // numbers count from base, so a wrap of the counter between two syncs does not matter.
  const unsigned failed_at = rec.failed == 0 || rec.failed == kGraphSerial ? ~0u : rec.failed - base;
  const std::vector<int64_t> len = rec.failed != 0 || graph_appends_ ? device_lengths() : std::vector<int64_t>();
  for (uint32_t s = 0; s < seqs_; ++s) {
    const float* c = meta.k_center(s);
    if (center_serial_[s]) c = center_serial_[s] - base < failed_at ? mu.data() + size_t(s) * hkv_ * d_ : nullptr;
    const int64_t n = len.empty() ? meta.length(s) : len[s];
    center_serial_[s] = 0;
    if (c == meta.k_center(s) && n == meta.length(s)) continue;
    std::vector<float> keep;
    if (c) keep.assign(c, c + size_t(hkv_) * d_);  // restore() may overwrite what c points to
    meta.restore(s, n, c ? keep.data() : nullptr);
  }
  if (rec.failed == 0) return;

  core::counters().cuda_rows_encoded -= rec.rows_back;
  core::counters().rows_encoded -= rec.rows_back;
  enc::State clean = rec;
  clean.failed = 0;
  clean.dropped = 0;
  clean.rows_back = 0;
  *rec_host = clean;
  TQKV_CUDA_CHECK(cudaMemcpyAsync(state_, rec_host, sizeof clean, cudaMemcpyHostToDevice, st));
  TQKV_CUDA_CHECK(cudaStreamSynchronize(st));

  const tqkv_status code = status_of(rec);
  if (ctx && ctx->serial == rec.failed) {
    const bool has_value = rec.kind <= enc::kDenseOverflow;
    const float x = has_value ? input_value(rec.w == 0 ? ctx->k : ctx->v, ctx->dtype, rec.flat) : 0.0f;
    fail(code, describe(rec, d_, has_value, x, "; nothing was appended"));
  }
  const std::string which = rec.failed == kGraphSerial
                                ? ", in an append replayed from a CUDA graph"
                                : ", in asynchronous append " + std::to_string(failed_at) + " of the " +
                                      std::to_string(made) + " made since the last sync";
  fail(code, describe(rec, d_, false, 0.0f,
                      which + "; it and the " + std::to_string(rec.dropped) +
                          " after it were not applied, so the cache holds what it held before it"));
}

}  // namespace tqkv::cuda
